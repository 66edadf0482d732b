"""Where the devnet's processes listen: loopback, or one network namespace per node.

On loopback (the default) anvil and every node listen on 127.0.0.1. With
``--netns`` (root only) the devnet makes a bridge in this namespace with a /24
of its own (``10.237.N.0/24``, the first N whose bridge name ``jnbrN`` is free),
anvil listens on the bridge's address (``.1``), and node i runs in namespace
``jnNnI`` on ``.10+i``, joined to the bridge by a veth pair. Nodes then reach
each other, anvil and this namespace through the bridge only, so a partition
is a route away (``ip -n jnNn1 route add blackhole 10.237.N.10``) and nothing
else on the machine changes. Everything made is removed when the devnet stops;
what a killed devnet left behind is removed by the next start in its folder.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from typing import Any

import trio

LOOPBACK_HOST = "127.0.0.1"
SUBNETS = 256  # 10.237.0.0/24 ... 10.237.255.0/24
FIRST_NODE_HOST = 10  # node i is .10+i


class NetworkError(Exception):
    """The namespaces cannot be made (not root, no iproute2, no free subnet)."""


@dataclass(frozen=True)
class DevnetNetwork:
    """Loopback (no bridge), or the bridge, its subnet and one namespace per node."""

    bridge: str | None = None
    subnet: str | None = None
    namespaces: tuple[str, ...] = ()

    @property
    def chain_host(self) -> str:
        """Where anvil listens (and the address nodes reach this namespace at)."""
        return LOOPBACK_HOST if self.subnet is None else self._address(1)

    def node_host(self, index: int) -> str:
        return LOOPBACK_HOST if self.subnet is None else self._address(FIRST_NODE_HOST + index)

    def command(self, index: int, argv: list[str]) -> list[str]:
        """``argv`` run in node ``index``'s namespace (``ip netns exec`` keeps the pid)."""
        if not self.namespaces:
            return argv
        return ["ip", "netns", "exec", self.namespaces[index], *argv]

    def _address(self, host: int) -> str:
        assert self.subnet is not None
        return str(ipaddress.ip_network(self.subnet)[host])

    def to_json(self) -> dict[str, Any] | None:
        if self.subnet is None:
            return None
        return {"bridge": self.bridge, "subnet": self.subnet, "namespaces": list(self.namespaces)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DevnetNetwork:
        if data is None:
            return cls()
        return cls(str(data["bridge"]), str(data["subnet"]), tuple(data["namespaces"]))


async def create_namespaces(nodes: int) -> DevnetNetwork:
    """A bridge with a free /24 and ``nodes`` namespaces on it; removed again if any step fails."""
    if shutil.which("ip") is None:
        raise NetworkError("--netns needs iproute2's `ip` command")
    used = await _addresses_in_use()
    for n in range(SUBNETS):
        subnet = ipaddress.ip_network(f"10.237.{n}.0/24")
        if any(address in subnet for address in used):
            continue
        bridge = f"jnbr{n}"
        try:  # claiming the name is what keeps two devnets off one subnet
            await _ip("link", "add", bridge, "type", "bridge")
        except NetworkError as exc:
            if "File exists" in str(exc):
                continue
            raise
        network = DevnetNetwork(bridge, str(subnet), tuple(f"jn{n}n{i}" for i in range(nodes)))
        try:
            await _ip("addr", "add", f"{network.chain_host}/24", "dev", bridge)
            await _ip("link", "set", bridge, "up")
            for index, namespace in enumerate(network.namespaces):
                veth = f"jn{n}v{index}"
                await _ip("netns", "add", namespace)
                await _ip("link", "add", veth, "type", "veth", "peer", "eth0", "netns", namespace)
                await _ip("link", "set", veth, "master", bridge, "up")
                await _ip(
                    "-n", namespace, "addr", "add", f"{network.node_host(index)}/24", "dev", "eth0"
                )
                await _ip("-n", namespace, "link", "set", "eth0", "up")
                await _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            with trio.CancelScope(shield=True):
                await remove_namespaces(network)
            raise
        return network
    raise NetworkError("no free subnet in 10.237.0.0/16 for the devnet's bridge")


async def remove_namespaces(network: DevnetNetwork) -> None:
    """Remove the namespaces (their veth pairs go with them) and the bridge; missing is fine."""
    for namespace in network.namespaces:
        await _ip("netns", "del", namespace, missing_ok=True)
    if network.bridge is not None:
        await _ip("link", "del", network.bridge, missing_ok=True)


async def _addresses_in_use() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    result = await trio.run_process(["ip", "-4", "-o", "addr", "show"], capture_stdout=True)
    found = []
    for line in result.stdout.decode().splitlines():
        fields = line.split()
        if "inet" in fields:
            found.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip)
    return found


async def _ip(*args: str, missing_ok: bool = False) -> None:
    result = await trio.run_process(
        ["ip", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode == 0:
        return
    error = result.stderr.decode(errors="replace").strip()
    if missing_ok and ("Cannot find" in error or "No such file" in error or "not exist" in error):
        return
    if "Operation not permitted" in error:
        raise NetworkError(f"--netns needs root: `ip {' '.join(args)}`: {error}")
    raise NetworkError(f"`ip {' '.join(args)}` failed: {error}")
