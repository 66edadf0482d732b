"""API keys for the gateway's clients, in SQLite (table ``api_keys``).

A key is ``jn-<id>-<secret>``: ``id`` (12 hex digits) names it in lists, logs
and metrics; ``secret`` is 32 random bytes (base64url). Only the secret's
SHA-256 is stored: a key carries 256 bits of entropy, so a slow password hash
would add nothing (GitHub and Stripe tokens are stored the same way), and the
key is shown once, when it is made. A presented key is checked by its id's
row, comparing digests with ``hmac.compare_digest``. Each key has its own
rate limit (requests per minute, enforced by the gateway in memory) and an
optional quota of tokens (prompt and completion), counted here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

PREFIX = "jn"
_KEY = re.compile(r"^jn-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
MAX_NAME = 64


@dataclass(frozen=True)
class ApiKey:
    """A key as listed: never its secret."""

    id: str
    name: str
    rate_per_minute: int
    quota_tokens: int | None  # None: no quota
    used_tokens: int
    used_requests: int
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    @property
    def over_quota(self) -> bool:
        return self.quota_tokens is not None and self.used_tokens >= self.quota_tokens

    def to_json(self) -> dict[str, object]:
        return {**vars(self), "over_quota": self.over_quota}


_SELECT_BY_ID = (
    "SELECT id, name, rate_per_minute, quota_tokens, used_tokens, used_requests, created_at, "
    "last_used_at, revoked_at FROM api_keys WHERE id = ?"
)
_SELECT_WITH_DIGEST = (
    "SELECT id, name, rate_per_minute, quota_tokens, used_tokens, used_requests, created_at, "
    "last_used_at, revoked_at, secret_sha256 FROM api_keys WHERE id = ?"
)
_SELECT_ALL = (
    "SELECT id, name, rate_per_minute, quota_tokens, used_tokens, used_requests, created_at, "
    "last_used_at, revoked_at FROM api_keys WHERE revoked_at IS NULL OR ? ORDER BY created_at"
)


def create(
    conn: sqlite3.Connection, name: str, rate_per_minute: int, quota_tokens: int | None
) -> tuple[str, ApiKey]:
    """A new key: (the key itself, to show once; its record)."""
    if not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise ValueError(f"a key's name is 1 to {MAX_NAME} printable characters")
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    conn.execute(
        "INSERT INTO api_keys (id, name, secret_sha256, rate_per_minute, quota_tokens, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (key_id, name, _digest(secret), rate_per_minute, quota_tokens, time.time()),
    )
    record = get(conn, key_id)
    assert record is not None
    return f"{PREFIX}-{key_id}-{secret}", record


def get(conn: sqlite3.Connection, key_id: str) -> ApiKey | None:
    row = conn.execute(_SELECT_BY_ID, (key_id,)).fetchone()
    return ApiKey(*row) if row is not None else None


def listed(conn: sqlite3.Connection, *, revoked: bool = False) -> list[ApiKey]:
    return [ApiKey(*row) for row in conn.execute(_SELECT_ALL, (revoked,))]


def revoke(conn: sqlite3.Connection, key_id: str) -> ApiKey | None:
    """Revoke a key (again: no change); None if there is no such key."""
    conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (time.time(), key_id),
    )
    return get(conn, key_id)


def authenticate(conn: sqlite3.Connection, presented: str) -> ApiKey | None:
    """The live key ``presented`` is, or None (malformed, unknown, wrong or revoked)."""
    match = _KEY.match(presented)
    if match is None:
        return None
    key_id, secret = match.groups()
    row = conn.execute(_SELECT_WITH_DIGEST, (key_id,)).fetchone()
    if row is None or not hmac.compare_digest(bytes(row[-1]), _digest(secret)):
        return None
    key = ApiKey(*row[:-1])
    return key if key.revoked_at is None else None


def record_use(conn: sqlite3.Connection, key_id: str, tokens: int) -> None:
    """Count one request of ``tokens`` (prompt and completion) against the key."""
    conn.execute(
        "UPDATE api_keys SET used_tokens = used_tokens + ?, used_requests = used_requests + 1, "
        "last_used_at = ? WHERE id = ?",
        (tokens, time.time(), key_id),
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
