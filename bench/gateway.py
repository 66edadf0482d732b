"""The OpenAI-compatible gateway against vLLM's own OpenAI server, side by side.

One model (the tiny test model, float32), one engine configuration (eager, seed 0,
``--max-num-seqs``, ``MAX_MODEL_LEN``, the same KV cache bytes), one kind of
request (``POST /v1/completions``, greedy, ``--max-tokens`` new tokens, prompts
cycled from a fixed list), one client (``httpx.AsyncClient`` with keep-alive in
this trio process). Four paths:

- ``vllm``: vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``) in
  a process of its own, its engine in that process (as a node's is in the
  node's); the baseline;
- ``local``: node 0's ``/v1/completions`` with ``"joynet": {"verification":
  "local"}``: the node's engine, the answer signed by the node alone and
  stored;
- ``control``: the same request as ``infer.local`` over node 0's websocket
  control socket (``ControlClient``), no HTTP;
- ``committee``: node 0's ``/v1/completions`` as a verified job (default
  ``committee``) on 3 nodes in this process sharing node 0's engine, so every
  request is 3 inferences on one engine: the price of verification by
  replication.

Each path runs alone (the vLLM server is stopped before the nodes start: the
machine's cores are not shared between them). Per path: ``--requests``
requests one at a time (p50 and p95 latency), then ``--requests`` with
``--concurrency`` in flight (requests/s, and p50/p95 under load). Ratios are
against ``vllm`` in the same run. The goal (issue 19): ``local`` within 10 %
of ``vllm``.

Run from the repository root (it prepares the tiny model into
.joynode/models/tiny if missing)::

    .venv/bin/python -m bench.gateway
    .venv/bin/python -m bench.gateway --quick
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.consensus import MODEL_DIR, PROMPTS, p50, percentile
from joynode.control.client import ControlClient
from joynode.gateway import apikeys
from joynode.inference.engine import VLLM_ENVIRONMENT, EngineSpec, VllmEngine
from joynode.inference.models import prepare
from joynode.node import Node
from tests.factories import NodeHome, running_node, wait_for
from tests.test_consensus import consensus_home

MAX_MODEL_LEN = 256
KV_CACHE_GIB = 0.25
READY_TIMEOUT_S = 180.0

Ask = Callable[[int], Awaitable[int]]  # request i -> completion tokens


@dataclass(frozen=True)
class Settings:
    requests: int
    concurrency: int
    max_tokens: int
    max_num_seqs: int


@dataclass
class PathResult:
    name: str
    sequential_ms: list[float]
    loaded_ms: list[float]
    rate: float  # requests/s with `concurrency` in flight
    tokens: int  # completion tokens of the last sequential request (same for every path)


def p95(values: list[float]) -> float:
    return percentile(sorted(values), 0.95)


def body(i: int, settings: Settings, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": settings.max_tokens,
        "temperature": 0,
        **extra,
    }


async def measure(name: str, ask: Ask, settings: Settings) -> PathResult:
    for i in range(3):  # warm-up
        await ask(i)
    sequential: list[float] = []
    tokens = 0
    for i in range(settings.requests):
        began = time.perf_counter()
        tokens = await ask(i)
        sequential.append(1000 * (time.perf_counter() - began))
    loaded: list[float] = []
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < settings.requests:
            began = time.perf_counter()
            await ask(i)
            loaded.append(1000 * (time.perf_counter() - began))

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(settings.concurrency):
            nursery.start_soon(worker)
    rate = settings.requests / (time.perf_counter() - began)
    print(
        f"  {name:<10} p50 {p50(sequential):7.1f} ms  p95 {p95(sequential):7.1f} ms  "
        f"| {rate:6.2f} req/s, p50 {p50(loaded):7.1f} ms under load",
        flush=True,
    )
    return PathResult(name, sequential, loaded, rate, tokens)


def http_ask(client: httpx.AsyncClient, url: str, settings: Settings, **extra: Any) -> Ask:
    async def ask(i: int) -> int:
        reply = await client.post(url, json=body(i, settings, **extra))
        reply.raise_for_status()
        return int(reply.json()["usage"]["completion_tokens"])

    return ask


# ---- vLLM's own server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def vllm_server(model: Path, settings: Settings, log: Path) -> AsyncIterator[str]:
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "tiny",
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(settings.max_num_seqs), "--enforce-eager", "--seed", "0",
        "--kv-cache-memory-bytes", str(int(KV_CACHE_GIB * (1 << 30))),
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-log-stats", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    environment = {
        **os.environ,
        **VLLM_ENVIRONMENT,
        "OMP_WAIT_POLICY": "PASSIVE",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            command, stdout=out, stderr=subprocess.STDOUT, env=environment
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient() as probe:
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"vLLM's server exited: see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get(url + "/health")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM's server not up in {READY_TIMEOUT_S} s: {log}")
                await trio.sleep(0.5)
        yield url
    finally:
        process.terminate()
        with trio.move_on_after(30) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()


# ---- the nodes


@asynccontextmanager
async def cluster(
    root: Path, model: Path, engine: VllmEngine, size: int
) -> AsyncIterator[list[tuple[Node, NodeHome]]]:
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        homes: list[NodeHome] = []
        for i in range(size):
            bootstrap = nodes[0].p2p.listen_addrs() if nodes else None
            home = consensus_home(root / f"n{i}", model, bootstrap)
            home.set("consensus", "committee_size", str(size))
            homes.append(home)
            nodes.append(await stack.enter_async_context(running_node(home, {"tiny": engine})))
        model_id = str(nodes[0].inference.model_id("tiny"))
        for node in nodes:
            others = [n.p2p.peer_id for n in nodes if n is not node]

            def serving(node: Node = node, others: list[str] = others) -> bool:
                records = {r.peer_id: r for r in node.p2p.peers.records()}
                return all(p in records and model_id in records[p].models for p in others)

            await wait_for(serving, 30, "every node sees the others serving")
        yield list(zip(nodes, homes, strict=True))


@asynccontextmanager
async def gateway_client(node: Node) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client with an API key made on ``node``, and its completions URL."""
    assert node.http.url is not None
    key, _ = await node.state.write(lambda c: apikeys.create(c, "bench", 1_000_000, None))
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        yield client, node.http.url + "/v1/completions"


async def main(settings: Settings) -> None:
    if not MODEL_DIR.exists():
        prepare("tiny", MODEL_DIR)
    model = MODEL_DIR.resolve()
    results: list[PathResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        print("vLLM's OpenAI server (its own process):", flush=True)
        async with (
            vllm_server(model, settings, root / "vllm.log") as url,
            httpx.AsyncClient(timeout=120) as client,
        ):
            results.append(
                await measure("vllm", http_ask(client, url + "/v1/completions", settings), settings)
            )
        engine = VllmEngine(
            EngineSpec(model, "float32", "auto", settings.max_num_seqs, MAX_MODEL_LEN, KV_CACHE_GIB)
        )
        await engine.start()
        try:
            print("one node, its engine in this process:", flush=True)
            async with cluster(root / "alone", model, engine, 1) as nodes:
                node, home = nodes[0]
                async with gateway_client(node) as (client, url):
                    local = http_ask(client, url, settings, joynet={"verification": "local"})
                    results.append(await measure("local", local, settings))
                assert node.control.url is not None
                async with ControlClient.connect(node.control.url, home.token.value) as control:

                    async def by_control(i: int) -> int:
                        reply = await control.call("infer.local", body(i, settings))
                        return len(reply["token_ids"])

                    results.append(await measure("control", by_control, settings))
            print("three nodes in this process, sharing that engine:", flush=True)
            async with (
                cluster(root / "three", model, engine, 3) as nodes,
                gateway_client(nodes[0][0]) as (client, url),
            ):
                committee = http_ask(client, url, settings)
                results.append(await measure("committee", committee, settings))
        finally:
            await engine.stop()
    report(results, settings)


def report(results: list[PathResult], settings: Settings) -> None:
    base = results[0]
    print()
    print(
        f"{settings.requests} requests per path, {settings.max_tokens} new tokens "
        f"({base.tokens} generated), greedy; {settings.concurrency} in flight under load"
    )
    print(
        "| path | p50 | p95 | vs vllm (p50) | req/s, loaded | vs vllm | p50 loaded | p95 loaded |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} | {p50(r.sequential_ms):.1f} ms | {p95(r.sequential_ms):.1f} ms | "
            f"{p50(r.sequential_ms) / p50(base.sequential_ms):.2f}x | {r.rate:.2f} | "
            f"{r.rate / base.rate:.2f}x | {p50(r.loaded_ms):.1f} ms | {p95(r.loaded_ms):.1f} ms |"
        )


def parse(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="20 requests")
    args = parser.parse_args(argv)
    requests = 20 if args.quick else args.requests
    return Settings(requests, args.concurrency, args.max_tokens, args.max_num_seqs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    trio.run(main, parse(sys.argv[1:]))
