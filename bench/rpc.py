"""The chain RPC gateway against anvil itself and against a plain pass-through proxy.

One anvil (its own process) with a history: a contract that logs, ``--txs``
transactions, then 100 empty blocks so the early ones are final (anvil finalizes 64
under the head). One client (``httpx.AsyncClient`` with keep-alive) in this trio
process, ``--concurrency`` calls in flight. Three paths to the same anvil:

- ``direct``: anvil's own JSON-RPC; the baseline;
- ``passthrough``: a plain proxy (Starlette on hypercorn, forwarding each body with
  httpx) in a process of its own: what any HTTP hop in Python costs;
- ``gateway``: a ``joynode run`` process's ``/rpc/31337``, ``rpc.verify_state`` on.

With ``--upstream-latency-ms L`` the upstream is anvil behind another such proxy
that waits L ms before each call (a remote provider's round trip), for all three
paths: what a node in front of a real provider saves.

Workloads, each ``--calls`` calls per path:

- ``cached``: final blocks by number and receipts of final transactions, cycled (the
  gateway keeps them after the first call; goal: 5x direct or more);
- ``uncached``: ``eth_getBalance`` and ``eth_call`` at ``latest`` (never kept;
  goal: at most 5 % over direct... and over the pass-through, which pays the hop);
- ``logs``: ``eth_getLogs`` over the whole final range, and over ``latest``;
- ``verified``: ``eth_getBalance`` at a recent block number (not final, so never
  kept: each call is checked against that block's state root with a proof).

Run from the repository root::

    .venv/bin/python -m bench.rpc
    .venv/bin/python -m bench.rpc --quick
"""

from __future__ import annotations

import argparse
import itertools
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.consensus import p50
from joynode.chain.anvil import running_anvil
from joynode.control.client import ControlClient
from tests.factories import NodeProcess, make_home

TOPIC = "ee" * 32
RUNTIME = "3660006000377f" + TOPIC + "366000a100"
EMITTER = "60" + f"{len(RUNTIME) // 2:02x}" + "80600b6000396000f3" + RUNTIME

Call = Callable[[int], tuple[str, list[Any]]]  # call i -> (method, params)


async def rpc(
    client: httpx.AsyncClient, url: str, method: str, params: list[Any], **kw: Any
) -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    reply = await client.post(url, json=body, **kw)
    answer = reply.json()
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


async def history(client: httpx.AsyncClient, url: str, txs: int) -> dict[str, Any]:
    """A contract that logs, ``txs`` calls to it, then 100 empty blocks."""
    accounts = await rpc(client, url, "eth_accounts", [])
    sender = accounts[0]
    deploy = await rpc(
        client, url, "eth_sendTransaction", [{"from": sender, "data": "0x" + EMITTER}]
    )
    for _ in range(100):  # (anvil mines it at once; the receipt may lag a moment)
        receipt = await rpc(client, url, "eth_getTransactionReceipt", [deploy])
        if receipt is not None:
            break
        await trio.sleep(0.05)
    contract = receipt["contractAddress"]
    hashes = []
    for i in range(txs):
        tx = {"from": sender, "to": contract, "data": "0x" + f"{i:064x}"}
        hashes.append(await rpc(client, url, "eth_sendTransaction", [tx]))
    await rpc(client, url, "anvil_mine", ["0x64"])
    head = int(await rpc(client, url, "eth_blockNumber", []), 16)
    return {"accounts": accounts, "contract": contract, "hashes": hashes, "head": head}


WARM_CALLS = 200  # a whole cycle of every workload below (blocks 50, receipts 40, x2)


def workloads(chain: dict[str, Any]) -> dict[str, Call]:
    head, hashes, accounts = chain["head"], chain["hashes"], chain["accounts"]
    final = max(1, head - 64)

    def cached(i: int) -> tuple[str, list[Any]]:
        if i % 2:
            return "eth_getTransactionReceipt", [hashes[i % len(hashes)]]
        return "eth_getBlockByNumber", [hex(1 + i % min(50, final)), False]

    def uncached(i: int) -> tuple[str, list[Any]]:
        if i % 2:
            return "eth_getBalance", [accounts[i % len(accounts)], "latest"]
        return "eth_call", [{"to": chain["contract"], "data": "0x"}, "latest"]

    def logs(i: int) -> tuple[str, list[Any]]:
        to = hex(final) if i % 2 else "latest"
        return "eth_getLogs", [{"fromBlock": "0x0", "toBlock": to, "topics": ["0x" + TOPIC]}]

    def verified(i: int) -> tuple[str, list[Any]]:
        return "eth_getBalance", [accounts[i % len(accounts)], hex(head - 1 - i % 10)]

    return {"cached": cached, "uncached": uncached, "logs": logs, "verified": verified}


async def measure(
    client: httpx.AsyncClient, url: str, call: Call, calls: int, concurrency: int, **kw: Any
) -> tuple[float, float]:
    """(calls/s, p50 ms) for ``calls`` calls with ``concurrency`` in flight, after a pass
    over every distinct call of the workload, unmeasured (each workload repeats within
    ``WARM_CALLS``): what a gateway keeps is then kept, as it is in steady use."""
    await _pass(client, url, call, WARM_CALLS, concurrency, **kw)
    return await _pass(client, url, call, calls, concurrency, **kw)


async def _pass(
    client: httpx.AsyncClient, url: str, call: Call, calls: int, concurrency: int, **kw: Any
) -> tuple[float, float]:
    latencies: list[float] = []
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < calls:
            began = time.perf_counter()
            reply = await client.post(
                url,
                json={"jsonrpc": "2.0", "id": i, "method": call(i)[0], "params": call(i)[1]},
                **kw,
            )
            assert "result" in reply.json(), reply.text
            latencies.append(1000 * (time.perf_counter() - began))

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return calls / (time.perf_counter() - began), p50(latencies)


async def serve_passthrough(target: str, delay_ms: float) -> None:
    """A plain forwarding proxy: each body to ``target``, each answer back after
    ``delay_ms`` (a remote provider's round trip); prints its URL."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=256)) as forward:

        async def relay(request: Request) -> Response:
            await trio.sleep(delay_ms / 1000)
            headers = {"content-type": "application/json"}
            reply = await forward.post(target, content=await request.body(), headers=headers)
            return Response(reply.content, media_type="application/json")

        app = Starlette(routes=[Route("/", relay, methods=["POST"])])
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, cast(Any, app), config, mode="asgi"))
            print(binds[0], flush=True)


@asynccontextmanager
async def passthrough(target: str, delay_ms: float = 0.0) -> AsyncIterator[str]:
    """The pass-through proxy in a process of its own; its URL."""
    command = [
        sys.executable,
        "-m",
        "bench.rpc",
        "--passthrough",
        target,
        "--delay-ms",
        str(delay_ms),
    ]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
        yield line.decode().strip()
    finally:
        process.kill()
        await process.wait()


@asynccontextmanager
async def gateway_process(tmp: Path, upstream: str) -> AsyncIterator[tuple[str, str]]:
    """A ``joynode run`` process serving the chain; its ``/rpc/31337`` URL and an API key."""
    home = make_home(tmp / "node")
    chains = f'[{{chain_id = 31337, name = "anvil", upstreams = ["{upstream}"]}}]'
    home.set("rpc", "chains", chains)
    home.set("rpc", "head_poll_s", "0.5")
    home.set("rpc", "rate_per_minute", "1000000")
    home.set("log", "level", '"warning"')
    node = NodeProcess(home)
    try:
        endpoints = await trio.to_thread.run_sync(node.wait_ready, 60.0)
        async with ControlClient.connect(endpoints.control_url, home.token.value) as control:
            made = await control.call(
                "apikeys.create", {"name": "bench", "rate_per_minute": 100000}
            )
        assert endpoints.http_url is not None
        await trio.sleep(1.0)  # the head and the finalized block read
        yield endpoints.http_url + "/rpc/31337", str(made["key"])
    finally:
        node.stop()


async def main(calls: int, concurrency: int, txs: int, latency_ms: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            running_anvil(chain_id=31337) as anvil,
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=256)) as client,
            passthrough(anvil.url, latency_ms) as remote,
        ):
            # The upstream: anvil itself, or anvil behind a provider's round trip.
            upstream = remote if latency_ms else anvil.url
            chain = await history(client, anvil.url, txs)
            async with (
                passthrough(upstream) as proxied,
                gateway_process(Path(tmp), upstream) as (gateway, key),
            ):
                auth = {"headers": {"authorization": f"Bearer {key}"}}
                print(
                    f"anvil, {chain['head']} blocks, {txs} logging transactions, "
                    f"{latency_ms:g} ms added to each upstream call; {calls} calls per path and "
                    f"workload, {concurrency} in flight",
                    flush=True,
                )
                columns = ("calls/s", "p50 ms", "vs direct", "vs proxy")
                print(f"{'workload':<10} {'path':<12} " + " ".join(f"{c:>9}" for c in columns))
                for name, call in workloads(chain).items():
                    figures = {}
                    for path, url, kw in (
                        ("direct", upstream, {}),
                        ("passthrough", proxied, {}),
                        ("gateway", gateway, auth),
                    ):
                        figures[path] = await measure(client, url, call, calls, concurrency, **kw)
                    base, hop = figures["direct"][0], figures["passthrough"][0]
                    for path, (rate, median) in figures.items():
                        print(
                            f"{name:<10} {path:<12} {rate:9.0f} {median:9.2f} "
                            f"{rate / base:8.2f}x {rate / hop:8.2f}x",
                            flush=True,
                        )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--txs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="200 calls per workload")
    parser.add_argument(
        "--upstream-latency-ms",
        type=float,
        default=0.0,
        help="a round trip added to every upstream call (a remote provider); 0: anvil itself",
    )
    parser.add_argument("--passthrough", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passthrough:
        trio.run(serve_passthrough, args.passthrough, args.delay_ms)
        return
    calls = 200 if args.quick else args.calls
    trio.run(main, calls, args.concurrency, args.txs, args.upstream_latency_ms)


if __name__ == "__main__":
    cli()
