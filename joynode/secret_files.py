"""Secrets in files: created mode 0600, refused when others can read them, and the
control token kept in one.

Apart from the node key (``joynode.keys``) so that reading a token, as every
``joynode ctl`` does, does not load the Ethereum and libp2p stacks.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path


class SecretFileError(Exception):
    """A key or token file that is missing, unreadable, unsafe or malformed."""


def write_secret_file(path: Path, content: str, *, force: bool = False) -> None:
    """Create ``path`` with mode 0600 from the first byte on (no window where it is readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SecretFileError(f"{path} already exists (use --force to overwrite)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(content)


def read_secret_file(path: Path, what: str) -> str:
    """Read a secret file, refusing one that group or others can access (as ssh does)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(
            f"{what} {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"cannot read {what} {path}: {exc}") from None


class ControlToken:
    """The bearer token of the control socket; compared in constant time."""

    def __init__(self, value: str) -> None:
        if len(value) < 32:
            raise SecretFileError("a control token has at least 32 characters")
        self._value = value

    def __repr__(self) -> str:
        return "ControlToken(***)"

    @classmethod
    def generate(cls) -> ControlToken:
        return cls(secrets.token_hex(32))

    @property
    def value(self) -> str:
        """The token itself, for clients that must send it; never log it."""
        return self._value

    def matches(self, candidate: str) -> bool:
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def save(self, path: Path, *, force: bool = False) -> None:
        write_secret_file(path, self._value + "\n", force=force)

    @classmethod
    def load(cls, path: Path) -> ControlToken:
        return cls(read_secret_file(path, "control token file"))
