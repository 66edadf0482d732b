"""``DIR/devnet.json``: what a devnet is doing, for ``joynode devnet status`` and for tests.

The devnet rewrites it (atomically) whenever a process it keeps changes state:
its own pid and phase, anvil's and each node's state (starting, up, down,
stopped), pid, restarts, and the exits it saw (status, and how many processes
each dead node left behind), plus the network namespaces when it has them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "devnet.json"


def write_status(directory: Path, data: dict[str, Any]) -> None:
    path = directory / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_status(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_running(data: dict[str, Any]) -> bool:
    """Whether the devnet that wrote ``data`` is still running."""
    if data.get("phase") == "stopped":
        return False
    try:
        os.kill(int(data["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def status_lines(data: dict[str, Any]) -> list[str]:
    """``joynode devnet status``: the devnet, anvil, the second chain, then one line per
    node."""
    now = time.time()
    chain = data["chain"]
    lines = [
        f"devnet {data['dir']}: {data['phase']} (pid {data['pid']}); "
        f"anvil {chain['url']} {_state(chain, now)}"
    ]
    side = data.get("side_chain")
    if side:  # (a status file from before the second chain has none)
        lines.append(f"second chain (id 31338) {side['url']} {_state(side, now)}")
    for node in data["nodes"]:
        line = f"node {node['node']}  {_state(node, now)}  control {node['control']}"
        lines.append(line + f"  log {node['log']}")
    lines += data.get("governance", [])
    network = data.get("network")
    if network:
        lines.append(
            f"network namespaces {', '.join(network['namespaces'])} on bridge "
            f"{network['bridge']} ({network['subnet']})"
        )
    return lines


def _state(entry: dict[str, Any], now: float) -> str:
    text = f"{entry['state']} for {now - entry['since']:.0f} s"
    if entry.get("pid") and entry["state"] in ("starting", "up"):
        text += f" (pid {entry['pid']})"
    if entry["restarts"]:
        text += f", {entry['restarts']} restart(s)"
    if entry["exits"]:
        last = entry["exits"][-1]
        at = time.strftime("%H:%M:%S", time.localtime(last["at"]))
        text += f", last exit: {last['status']} at {at}"
    return text
