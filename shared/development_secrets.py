"""The development defaults of the compose files' secrets, refused unless asked for.

docker-compose.yml gives every secret a default so that `docker compose up` works on a
laptop; those values are public, so a stack that reaches a network with them is open to
anyone who read the file. The API and every worker read their settings through
`Settings`, whose validator calls `refuse_development_secrets`: one line names each default
still in use and how to make a real one, unless TUNERY_DEV_SECRETS=1 says this is development.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from shared.settings import Settings

DEV_SECRET_KEY = "dHVuZXJ5LWRldi1vbmx5LWtleS0tY2hhbmdlLWl0ISE="
DEV_S3_SECRET = "tunery-dev-secret"
DEV_POSTGRES_PASSWORD = "tunery-dev-password"
DEV_ENGINE_TOKEN = "tunery-dev-engine-token"
DEV_METRICS_TOKEN = "tunery-dev-metrics-token"

MAKE_A_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
MAKE_A_FERNET_KEY = ('python -c "from cryptography.fernet import Fernet; '
                     'print(Fernet.generate_key().decode())"')


def development_secrets_in_use(settings: Settings) -> list[str]:
    """The variables of `settings` that hold a compose file's development default."""
    found = []
    keys = settings.secret_key.get_secret_value().split(",") if settings.secret_key else []
    if DEV_SECRET_KEY in (key.strip() for key in keys):
        found.append("TUNERY_SECRET_KEY")
    if _password(settings.database.url) == DEV_POSTGRES_PASSWORD:
        found.append("TUNERY_DATABASE_URL's password (TUNERY_POSTGRES_PASSWORD in compose)")
    if settings.storage.s3_secret_access_key == DEV_S3_SECRET:
        found.append("TUNERY_S3_SECRET_ACCESS_KEY (MinIO's root password in compose)")
    token = settings.inference.engine_token
    if token is not None and token.get_secret_value() == DEV_ENGINE_TOKEN:
        found.append("TUNERY_INFERENCE_ENGINE_TOKEN")
    token = settings.metrics.token
    if token is not None and token.get_secret_value() == DEV_METRICS_TOKEN:
        found.append("TUNERY_METRICS_TOKEN")
    return found


def refuse_development_secrets(settings: Settings) -> None:
    """Raise ValueError, one line, when a development default is in use without
    TUNERY_DEV_SECRETS."""
    if settings.dev_secrets:
        return
    found = development_secrets_in_use(settings)
    if found:
        raise ValueError(
            f"{', '.join(found)}: a development default from the compose files; set a real "
            f"one ({MAKE_A_SECRET}; TUNERY_SECRET_KEY takes a Fernet key: {MAKE_A_FERNET_KEY}),"
            " or TUNERY_DEV_SECRETS=1 on a development machine"
        )


def _password(database_url: str) -> str | None:
    try:
        return make_url(database_url).password
    except ArgumentError:
        return None
