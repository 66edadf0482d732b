"""Logging for operators: readable text by default, JSON lines for collectors.

Secrets must never reach a log line. Code does not log them, and as a second
line of defence every handler passes records through a ``SecretRedactor`` that
knows the node's key and token and masks them wherever they would appear.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

REDACTED = "***"

# Fields every LogRecord has; anything else was passed with ``extra=`` and is context.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class SecretRedactor:
    """Masks registered secret strings in formatted log output."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if secret:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class TextFormatter(logging.Formatter):
    def __init__(self, redactor: SecretRedactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            line += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return self._redactor.redact(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: SecretRedactor) -> None:
        super().__init__()
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self._redactor.redact(json.dumps(entry, default=str))


def configure_logging(
    level: str, fmt: str, redactor: SecretRedactor, stream: TextIO = sys.stderr
) -> None:
    """Install one handler on the root logger (replacing any earlier one)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party libraries are chatty at debug; keep them at warning unless asked.
    for name in ("libp2p", "multiaddr", "trio-websocket", "hpack", "urllib3", "web3", "vllm"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
