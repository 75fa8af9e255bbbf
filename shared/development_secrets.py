"""The development defaults of the compose files' secrets, refused unless asked for.

docker-compose.yml gives every secret a default so that `docker compose up` works on a
laptop; those values are public, so a stack that reaches a network with them is open to
anyone who read the file. The API and every worker read their settings through
`Settings`, whose validator hands the secrets to `refuse_development_secrets`: one line names
each default still in use and how to make a real one, unless TUNERY_DEV_SECRETS=1 says this
is development. Values, not the settings object: settings imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEV_SECRET_KEY = "dHVuZXJ5LWRldi1vbmx5LWtleS0tY2hhbmdlLWl0ISE="
DEV_S3_SECRET = "tunery-dev-secret"
DEV_POSTGRES_PASSWORD = "tunery-dev-password"
DEV_ENGINE_TOKEN = "tunery-dev-engine-token"
DEV_METRICS_TOKEN = "tunery-dev-metrics-token"

MAKE_A_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
MAKE_A_FERNET_KEY = ('python -c "from cryptography.fernet import Fernet; '
                     'print(Fernet.generate_key().decode())"')


@dataclass(frozen=True)
class Secrets:
    """The settings' secret values, as plain strings (None: unset)."""

    secret_key: str | None
    database_url: str
    s3_secret_access_key: str | None
    engine_token: str | None
    metrics_token: str | None


def development_secrets_in_use(secrets: Secrets) -> list[str]:
    """The variables that hold a compose file's development default."""
    found = []
    keys = (secrets.secret_key or "").split(",")
    if DEV_SECRET_KEY in (key.strip() for key in keys):
        found.append("TUNERY_SECRET_KEY")
    if _password(secrets.database_url) == DEV_POSTGRES_PASSWORD:
        found.append("TUNERY_DATABASE_URL's password (TUNERY_POSTGRES_PASSWORD in compose)")
    if secrets.s3_secret_access_key == DEV_S3_SECRET:
        found.append("TUNERY_S3_SECRET_ACCESS_KEY (MinIO's root password in compose)")
    if secrets.engine_token == DEV_ENGINE_TOKEN:
        found.append("TUNERY_INFERENCE_ENGINE_TOKEN")
    if secrets.metrics_token == DEV_METRICS_TOKEN:
        found.append("TUNERY_METRICS_TOKEN")
    return found


def refuse_development_secrets(secrets: Secrets, *, allowed: bool) -> None:
    """Raise ValueError, one line, when a development default is in use and not `allowed`
    (TUNERY_DEV_SECRETS)."""
    if allowed:
        return
    found = development_secrets_in_use(secrets)
    if found:
        raise ValueError(
            f"{', '.join(found)}: a development default from the compose files; set a real "
            f"one ({MAKE_A_SECRET}; TUNERY_SECRET_KEY takes a Fernet key: {MAKE_A_FERNET_KEY}),"
            " or TUNERY_DEV_SECRETS=1 on a development machine"
        )


def _password(database_url: str) -> str | None:
    # urllib, not SQLAlchemy's make_url: the vLLM plugin reads these settings and must not
    # load SQLAlchemy into the engine's process.
    try:
        password = urlsplit(database_url).password
    except ValueError:
        return None
    return None if password is None else unquote(password)
