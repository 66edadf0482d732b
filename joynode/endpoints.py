"""The running node's actual addresses, for clients when the config says port 0.

Written by the node once every actor is ready, removed on clean exit. ``joynode
ctl`` reads it so that tests and devnets can let the kernel pick ports.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILENAME = "endpoints.json"


@dataclass(frozen=True)
class Endpoints:
    pid: int
    control_url: str
    http_url: str | None
    p2p_addrs: list[str]

    def write(self, data_dir: Path) -> None:
        path = data_dir / FILENAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, data_dir: Path) -> Endpoints | None:
        try:
            data = json.loads((data_dir / FILENAME).read_text(encoding="utf-8"))
            return cls(
                int(data["pid"]),
                str(data["control_url"]),
                data.get("http_url"),
                [str(a) for a in data.get("p2p_addrs", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def remove(data_dir: Path) -> None:
        # The data dir may not even be a folder: the node stopping for that must not fail here.
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            (data_dir / FILENAME).unlink()
