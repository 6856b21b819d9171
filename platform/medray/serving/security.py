"""API keys and request limits: who may call, and what a request may carry.

Keys are bearer tokens read from an environment variable (comma-separated) or a
secrets file (one per line). Only their SHA-256 digests travel to the replicas, and a
token is checked in constant time against every digest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from medray.config import ConfigError

IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
"""Gallery image ids: a filename-like token; no slash, so no path can be built from it."""


@dataclass(frozen=True)
class KeySet:
    """Digests of the accepted API keys and a sentence saying where they came from."""

    digests: tuple[str, ...]
    source: str
    local_key: str | None = field(default=None, repr=False)
    """One accepted key, kept only in this process (for `medray demo` to query itself)."""
    generated: bool = False
    """True when no key was configured and one was made up for this session."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str) -> list[str]:
    """Keys from `a,b` or one per line; blanks and `#` comment lines are ignored."""
    keys = []
    for line in text.replace(",", "\n").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def resolve_keys(env_name: str, secrets_file: str | None, generate: bool = False) -> KeySet:
    """Keys from $env_name, else from `secrets_file`; else a generated key or ConfigError."""
    env_keys = parse_keys(os.environ.get(env_name, ""))
    if env_keys:
        source = f"env ${env_name} ({len(env_keys)} keys)"
        return KeySet(tuple(digest(k) for k in env_keys), source, local_key=env_keys[0])
    if secrets_file:
        path = Path(secrets_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"api_keys_file: {path} not found")
        file_keys = parse_keys(path.read_text())
        if not file_keys:
            raise ConfigError(f"api_keys_file: {path} holds no keys")
        source = f"file {path} ({len(file_keys)} keys)"
        return KeySet(tuple(digest(k) for k in file_keys), source, local_key=file_keys[0])
    if not generate:
        raise ConfigError(
            f"no API keys: set ${env_name} (comma-separated) or api_keys_file in the serve config"
        )
    key = secrets.token_urlsafe(24)
    source = f"generated for this session (set ${env_name} to choose): {key}"
    return KeySet((digest(key),), source, local_key=key, generated=True)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_allowed(token: str | None, digests: tuple[str, ...]) -> bool:
    """Constant-time comparison of the token's digest with every accepted digest."""
    if not token:
        return False
    candidate = digest(token)
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(candidate, d)
    return ok


def valid_image_id(image_id: str) -> bool:
    """True for ids that are plain tokens (no `/`, `\\`, `..` prefix, control characters)."""
    return bool(IMAGE_ID.fullmatch(image_id)) and ".." not in image_id
