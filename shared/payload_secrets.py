"""Secrets inside job payloads: `hf_config.hf_token`, `logging_config.wandb_login_key` and
`user_session_token`.

They are encrypted before the payload is stored (`seal_secrets`), decrypted by the worker just
before it trains (`open_secrets`), and replaced by `REDACTED` when the job ends and in every
payload the API shows (`drop_secrets`). An encrypted value reads `enc:v1:<Fernet token>`; the
version leaves room for another scheme later.

The key is `TUNERY_SECRET_KEY`: one or more comma-separated Fernet keys, the first encrypts
and all decrypt (rotation). Unset, a key is generated once into `data_dir/secret.key` (mode
0600), which the embedded API and worker share; separate hosts must all set the same key.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.settings import Settings, get_settings

SECRET_FIELDS: tuple[tuple[str | None, str], ...] = (
    ("hf_config", "hf_token"),
    ("logging_config", "wandb_login_key"),
    (None, "user_session_token"),
)
"""Where secrets live in a payload: (section, field); section None is the top level. The one
list: sealing, opening, dropping, showing and log redaction all walk it."""

ENCRYPTED_PREFIX = "enc:v1:"
REDACTED = "***"
KEY_FILE_NAME = "secret.key"


class SecretsUnreadable(Exception):
    """A stored secret cannot be decrypted with this process's key."""


def key_file(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE_NAME


def _read_or_create_key_file(path: Path) -> str:
    """The key in `path`, generated (mode 0600) if the file does not exist yet.

    The key is written to a private temporary file and hard-linked into place, so two
    processes (the embedded API and worker) or threads starting at once agree on one key and
    none ever reads a half-written file.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per caller: threads of one process create it at once too.
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, Fernet.generate_key() + b"\n")
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won; its key is the one
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


@lru_cache(maxsize=8)
def _fernet(keys: str) -> MultiFernet:
    try:
        return MultiFernet([Fernet(k.strip()) for k in keys.split(",") if k.strip()])
    except ValueError:
        raise ValueError(
            "TUNERY_SECRET_KEY must be one or more comma-separated Fernet keys (32 url-safe "
            "base64-encoded bytes each); make one with `python -c \"from cryptography.fernet "
            "import Fernet; print(Fernet.generate_key().decode())\"`"
        ) from None


def payload_cipher(settings: Settings | None = None) -> MultiFernet:
    """The cipher for payload secrets: `settings.secret_key`, else the data dir's key file."""
    settings = settings or get_settings()
    if settings.secret_key is not None and settings.secret_key.get_secret_value().strip():
        return _fernet(settings.secret_key.get_secret_value())
    return _fernet(_read_or_create_key_file(key_file(settings)))


def _secret_slots(payload: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(container, field) of every non-empty secret in `payload`."""
    for section, field in SECRET_FIELDS:
        container = payload if section is None else payload.get(section)
        if isinstance(container, dict) and isinstance(container.get(field), str) \
                and container[field]:
            yield container, field


def _copy(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in payload.items()}


def seal_secrets(payload: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """A copy of `payload` with every secret encrypted, as it is stored."""
    data = _copy(payload)
    slots = list(_secret_slots(data))
    if not slots:
        return data
    cipher = payload_cipher(settings)
    for container, field in slots:
        value = container[field]
        if not value.startswith(ENCRYPTED_PREFIX):
            container[field] = ENCRYPTED_PREFIX + cipher.encrypt(value.encode()).decode()
    return data


def open_secrets(payload: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """A copy of a stored `payload` with its secrets decrypted, for the worker to train with.

    Values stored before encryption (no `enc:v1:` prefix) pass through unchanged. Raises
    `SecretsUnreadable`, naming the field but never the value, if this process's key cannot
    decrypt one.
    """
    data = _copy(payload)
    for container, field in _secret_slots(data):
        value = container[field]
        if not value.startswith(ENCRYPTED_PREFIX):
            continue
        try:
            plain = payload_cipher(settings).decrypt(value.removeprefix(ENCRYPTED_PREFIX))
        except InvalidToken:
            raise SecretsUnreadable(
                f"the job's {field} cannot be decrypted: it was encrypted with another "
                "TUNERY_SECRET_KEY than this worker's; give the API and every worker the "
                "same TUNERY_SECRET_KEY, then submit the job again"
            ) from None
        container[field] = plain.decode()
    return data


def drop_secrets(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of `payload` with every secret replaced by `REDACTED`: what a finished job keeps.

    The marker (rather than null) keeps the payload valid against the schema, which requires
    a token beside `hf_model_path`.
    """
    data = _copy(payload)
    for container, field in _secret_slots(data):
        container[field] = REDACTED
    return data


def secret_values(payload: dict[str, Any]) -> list[str]:
    """The plaintext secrets of a decrypted payload, for `redact_secrets`."""
    return [
        container[field] for container, field in _secret_slots(payload)
        if container[field] != REDACTED and not container[field].startswith(ENCRYPTED_PREFIX)
    ]


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `REDACTED`: for log lines and
    failure reasons built from third-party exception messages (hub, W&B) that may echo one."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text

