"""Chaos: a devnet serves paid and unpaid jobs while it is hurt, and nothing is lost.

A 3-node devnet (each node in its own network namespace) on the tiny model
runs jobs from a few clients while a killer SIGKILLs committee members at
chosen points of a job's life (before the commit, between commit and reveal,
while the certificate is being landed), restarts anvil mid-job and cuts one
node off the other two for a while. Then every job is waited out and the
invariants are checked, not timings:

- every job ends certified or failed, and every paid one settled or refunded;
- no escrow is paid twice or lost: each paid request is settled or refunded
  on-chain, at most one event of either kind each, and the marketplace holds
  no JOY at the end;
- no node leaves an orphan: what a killed node started is gone, and nothing
  of the devnet runs once it has stopped;
- every node's database agrees with the chain: a request the chain settled is
  certified there with the output hash the chain verified; a refunded one is
  refunded.

``make test`` runs a bounded plan (CHAOS_JOBS=12, CHAOS_KILLS=3). The full
run, whose figures are in docs/benchmarks.md, is ``make chaos`` (100 jobs, 10
kills). CHAOS_SEED replays a run; the summary line at the end gives the seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from web3 import Web3

from joynode.control.client import ControlClient
from joynode.devnet import DevnetOptions, RunningDevnet, run_devnet
from joynode.devnet.processes import DevnetNode
from joynode.devnet.status import read_status
from tests.factories import wait_for
from tests.test_devnet import in_session, joynode_processes

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="partitions need network namespaces (root)"),
]

NODES = 3
PHASES = ("between_commit_and_reveal", "settling", "before_commit", "offerer")
CLIENTS = 3
# Short phases, so that a failed paid job is refunded within a minute.
CONSENSUS = {
    "commit_timeout_s": "20",
    "reveal_timeout_s": "5",
    "settle_timeout_s": "20",
    "takeover_s": "3",
}
PARTITION_S = 20.0
RECOVERY_S = 240.0  # a killed node is up again (vLLM start included) within this
SETTLED_S = 300.0  # after the last job: every job over, every escrow resolved


@dataclass(frozen=True)
class Plan:
    jobs: int
    kills: int
    seed: int

    @classmethod
    def from_environment(cls) -> Plan:
        seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 32))
        return cls(
            int(os.environ.get("CHAOS_JOBS", "12")), int(os.environ.get("CHAOS_KILLS", "3")), seed
        )


@dataclass
class Submitted:
    request_id: str
    paid: bool
    submitter: int
    committee: list[str]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Kill:
    phase: str
    victim: int
    pid: int
    at: float
    job: str = ""  # the request id it was made in
    recovered_s: float | None = None


@dataclass
class Chaos:
    devnet: RunningDevnet
    dir: Path
    rng: random.Random
    jobs: list[Submitted] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)

    def node(self, index: int) -> DevnetNode:
        return self.devnet.nodes[index]

    def index_of(self, address: str) -> int:
        for node in self.devnet.nodes:
            if node.key.address.lower() == address.lower():
                return node.index
        raise KeyError(address)

    def up(self) -> list[int]:
        return [n.index for n in self.devnet.nodes if n.supervised.state == "up"]

    def say(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        print(self.events[-1], flush=True)


async def call(node: DevnetNode, method: str, params: dict[str, Any] | None = None) -> Any:
    """One control call; None when the node is down or restarting (a chaos run expects that)."""
    try:
        with trio.fail_after(30):
            async with ControlClient.connect(node.control_url(), node.token.value) as client:
                return await client.call(method, params)
    except Exception:
        return None


def job_params(number: int, paid: bool) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": f"chaos job {number}",
        "max_tokens": 8,
        "ignore_eos": True,
        "nonce": number,
        **({"paid": True} if paid else {"committee_size": NODES}),
    }


async def submit(chaos: Chaos, number: int, paid: bool) -> Submitted:
    """Job ``number`` offered through a node that is up (another one if that one goes down)."""
    while True:
        index = chaos.rng.choice(chaos.up() or [0])
        result = await call(chaos.node(index), "infer.submit", job_params(number, paid))
        if result is not None:
            job = Submitted(result["request_id"], paid, index, result["committee"])
            chaos.jobs.append(job)
            return job
        chaos.refused[f"node {index}"] += 1
        await trio.sleep(1)


async def submit_jobs(chaos: Chaos, numbers: list[int], pause_s: float) -> None:
    """One client: each job to a node that is up, then waits until it is decided (or 60 s)."""
    for number in numbers:
        job = await submit(chaos, number, paid=number % 2 == 0)
        with trio.move_on_after(60):
            while True:
                state = await job_state(chaos, job)
                if state is not None and state["status"] != "pending":
                    break
                await trio.sleep(0.5)
        await trio.sleep(chaos.rng.uniform(0, 2 * pause_s))


async def job_state(chaos: Chaos, job: Submitted) -> dict[str, Any] | None:
    """The job as its submitter has it (None while the submitter is down)."""
    result: dict[str, Any] | None = await call(
        chaos.node(job.submitter), "job.get", {"request_id": job.request_id}
    )
    return result


def reached(phase: str, progress: dict[str, Any]) -> bool:
    """Whether a job's ``job.progress`` shows it at ``phase`` (the kill's moment)."""
    if phase == "between_commit_and_reveal":
        return bool(progress["commits"]) and not progress["reveals"]
    return bool(progress["status"] == "certified" and progress["payment"] == "escrowed")


async def kill_in_a_job(chaos: Chaos, number: int, phase: str) -> None:
    """Offer job ``number`` and SIGKILL a node at ``phase`` of it, as its offerer reports it.

    ``offerer``: the node that offered a paid job, at once; ``before_commit``:
    another member, at once; ``between_commit_and_reveal``: another member at
    the first commit the offerer hears; ``settling``: the member ranked first
    to land the certificate (else the next) once the job is certified.
    """
    paid = phase in ("offerer", "settling") or number % 2 == 0
    job = await submit(chaos, number, paid)
    members = [chaos.index_of(m) for m in job.committee]
    others = [m for m in members if m != job.submitter and m in chaos.up()] or [job.submitter]
    victim = job.submitter if phase == "offerer" else others[0]
    if phase in ("offerer", "before_commit"):
        kill(chaos, phase, victim)
    else:

        def on_progress(notification: dict[str, Any]) -> None:
            done = any(k.job == job.request_id for k in chaos.kills)
            if not done and reached(phase, notification["params"]):
                kill(chaos, phase, victim, job.request_id)

        with contextlib.suppress(Exception):  # the offerer's socket, when a node goes
            node = chaos.node(job.submitter)
            async with ControlClient.connect(
                node.control_url(), node.token.value, on_notification=on_progress
            ) as client:
                await client.call("job.wait", {"request_id": job.request_id, "timeout_s": 60})
        if not any(k.job == job.request_id for k in chaos.kills):
            kill(chaos, f"{phase} (missed: after the job)", victim, job.request_id)
    last = chaos.kills[-1]
    node = chaos.node(last.victim)
    await wait_for(partial(restarted, node, last.pid), RECOVERY_S, f"node {last.victim} up")
    last.recovered_s = time.monotonic() - last.at
    left = in_session(last.pid)
    assert left == [], f"node {last.victim} left processes running: {left}"
    chaos.say(f"node {last.victim} up again after {last.recovered_s:.1f} s")


def kill(chaos: Chaos, phase: str, victim: int, job: str = "") -> None:
    node = chaos.node(victim)
    assert node.process is not None
    pid = node.process.pid
    os.kill(pid, signal.SIGKILL)
    chaos.kills.append(Kill(phase, victim, pid, time.monotonic(), job))
    chaos.say(f"kill {len(chaos.kills)}: node {victim} (pid {pid}), {phase}")


async def kill_in_jobs(chaos: Chaos, kills: int, first_number: int) -> None:
    """One node down at a time: each kill in a job of its own, at the next phase in turn."""
    for number in range(kills):
        await trio.sleep(chaos.rng.uniform(1, 4))
        await kill_in_a_job(chaos, first_number + number, PHASES[number % len(PHASES)])


def restarted(node: DevnetNode, old_pid: int) -> bool:
    return node.supervised.state == "up" and node.supervised.pid != old_pid


async def restart_anvil(chaos: Chaos) -> None:
    """Stop anvil (it saves its state) mid-run; the devnet starts it again on its address."""
    status = read_status(chaos.dir)
    assert status is not None
    pid = status["chain"]["pid"]
    os.kill(pid, signal.SIGTERM)
    chaos.say(f"anvil (pid {pid}) stopped")

    def anvil_up_again() -> bool:
        chain = (read_status(chaos.dir) or {}).get("chain", {})
        return bool(chain.get("state") == "up" and chain.get("pid") != pid)

    await wait_for(anvil_up_again, 60, "anvil up again")
    chaos.say("anvil up again")


async def ip(*args: str) -> None:
    await trio.run_process(["ip", *args], capture_stdout=True)


@asynccontextmanager
async def partition(chaos: Chaos, alone: int) -> AsyncIterator[None]:
    """Node ``alone`` cannot reach the other nodes, nor they it (the chain stays reachable)."""
    network = (read_status(chaos.dir) or {})["network"]
    namespaces: list[str] = network["namespaces"]
    subnet = network["subnet"].rsplit(".", 1)[0]
    routes = [
        (namespaces[i], f"{subnet}.{10 + j}/32")
        for i in range(NODES)
        for j in range(NODES)
        if i != j and alone in (i, j)
    ]
    for namespace, prefix in routes:
        await ip("-n", namespace, "route", "add", "blackhole", prefix)
    chaos.say(f"partition: node {alone} cut off")
    try:
        yield
    finally:
        for namespace, prefix in routes:
            await ip("-n", namespace, "route", "del", "blackhole", prefix)
        chaos.say("partition healed")


async def wait_until_over(chaos: Chaos) -> dict[str, dict[str, Any]]:
    """Every job, as its submitter finally has it: decided, and its escrow resolved."""
    over: dict[str, dict[str, Any]] = {}
    with trio.move_on_after(SETTLED_S):
        while len(over) < len(chaos.jobs):
            for job in chaos.jobs:
                if job.request_id in over:
                    continue
                state = await job_state(chaos, job)
                payment = (state or {}).get("payment") or {}
                if state is None or state["status"] == "pending":
                    continue
                if job.paid and payment.get("status") not in ("settled", "refunded"):
                    continue
                over[job.request_id] = state
            await trio.sleep(1)
    return over


def chain_outcomes(devnet: RunningDevnet, jobs: list[Submitted]) -> dict[str, tuple[str, str]]:
    """Each paid request's on-chain status and verified output hash; the escrow invariants."""
    w3 = Web3(Web3.HTTPProvider(devnet.rpc_url))
    market = devnet.deployment.contract(w3, "ModelMarketplace")
    proofs = devnet.deployment.contract(w3, "ProofOfInference")
    token = devnet.deployment.contract(w3, "JoyToken")
    outcomes: dict[str, tuple[str, str]] = {}
    for job in (j for j in jobs if j.paid):
        status = market.functions.requestInfo(job.request_id).call()[5]
        name = {2: "settled", 3: "refunded"}.get(status, f"status {status}")
        output = "0x" + bytes(proofs.functions.verifiedOutput(job.request_id).call()).hex()
        outcomes[job.request_id] = (name, output)
    for event in ("InferenceSettled", "InferenceRefunded"):
        logs = getattr(market.events, event).get_logs(from_block=0)
        counts = Counter("0x" + bytes(log.args.requestId).hex() for log in logs)
        twice = [r for r, n in counts.items() if n > 1]
        assert not twice, f"{event} more than once for {twice}"
    held = token.functions.balanceOf(market.address).call()
    assert held == 0, f"the marketplace still holds {held} wei of JOY: an escrow is lost"
    return outcomes


def database_rows(node: DevnetNode) -> list[tuple[str, str, dict[str, Any] | None, str | None]]:
    with sqlite3.connect(f"file:{node.data_dir / 'state.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT request_id, status, payment, certificate FROM jobs").fetchall()
    return [
        (
            "0x" + bytes(r[0]).hex(),
            r[1],
            json.loads(r[2]) if r[2] else None,
            json.loads(r[3])["output_hash"] if r[3] else None,
        )
        for r in rows
    ]


async def test_jobs_survive_kills_an_anvil_restart_and_a_partition(tmp_path: Path) -> None:
    plan = Plan.from_environment()
    directory = tmp_path / "devnet"
    options = DevnetOptions(
        dir=directory,
        nodes=NODES,
        model="tiny",
        models_dir=tmp_path / "models",
        netns=True,
        overrides=tuple(("consensus", k, v) for k, v in CONSENSUS.items()),
    )
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        devnet: RunningDevnet = await nursery.start(run_devnet, options)
        chaos = Chaos(devnet, directory, random.Random(plan.seed))
        chaos.say(f"chaos: {plan.jobs} jobs, {plan.kills} kills, seed {plan.seed}")
        async with trio.open_nursery() as clients:
            numbers = list(range(plan.jobs - plan.kills))
            # Spread the clients' jobs over the kills (a restart takes about 20 s).
            pause_s = plan.kills * 20 / max(1, len(numbers) / CLIENTS)
            for client in range(CLIENTS):
                clients.start_soon(submit_jobs, chaos, numbers[client::CLIENTS], pause_s)
            clients.start_soon(kill_in_jobs, chaos, plan.kills, len(numbers))

            async def hurt_the_network() -> None:
                await wait_for(lambda: len(chaos.jobs) >= plan.jobs // 3, 3600, "a third")
                await restart_anvil(chaos)
                await wait_for(lambda: len(chaos.jobs) >= plan.jobs // 2, 3600, "half the jobs")
                alone = chaos.rng.randrange(NODES)
                async with partition(chaos, alone):
                    await trio.sleep(PARTITION_S)

            clients.start_soon(hurt_the_network)
        chaos.say(f"all {len(chaos.jobs)} jobs submitted; waiting for every outcome")
        over = await wait_until_over(chaos)
        outcomes = await trio.to_thread.run_sync(chain_outcomes, devnet, chaos.jobs)
        rows = {node.index: database_rows(node) for node in devnet.nodes}
        sessions = [kill.pid for kill in chaos.kills]
        nursery.cancel_scope.cancel()
    elapsed = time.monotonic() - started

    stuck = [j.request_id for j in chaos.jobs if j.request_id not in over]
    assert not stuck, f"not over within {SETTLED_S:.0f} s: {stuck}\n" + "\n".join(chaos.events)
    for job in chaos.jobs:
        state = over[job.request_id]
        assert state["status"] in ("certified", "failed"), state
        if job.paid:
            onchain, output = outcomes[job.request_id]
            assert onchain in ("settled", "refunded"), (job, onchain)
            assert state["payment"]["status"] == onchain, (job, state["payment"], onchain)
    for index, node_rows in rows.items():
        for request_id, status, payment, certified in node_rows:
            if request_id not in outcomes or payment is None:
                continue
            onchain, output = outcomes[request_id]
            where = f"node {index}, job {request_id}: {status}, {payment}; chain: {onchain}"
            assert payment["status"] == onchain, where
            if onchain == "settled":
                assert status == "certified", where
                assert certified == output, where
    assert joynode_processes(directory) == []
    for session in sessions:
        assert in_session(session) == []

    figures = Counter(
        (s["status"], (s.get("payment") or {}).get("status", "unpaid")) for s in over.values()
    )
    recoveries = [k.recovered_s for k in chaos.kills if k.recovered_s is not None]
    print(
        f"chaos summary: seed {plan.seed}; {len(chaos.jobs)} jobs "
        f"({sum(j.paid for j in chaos.jobs)} paid) in {elapsed:.0f} s; "
        f"outcomes {dict(sorted(figures.items()))}; {len(chaos.kills)} kills "
        f"({dict(Counter(k.phase for k in chaos.kills))}), recovered in "
        f"{statistics.mean(recoveries):.1f} s mean, {max(recoveries):.1f} s max; "
        f"1 anvil restart, 1 partition of {PARTITION_S:.0f} s; "
        f"submits refused by a down node: {sum(chaos.refused.values())}",
        flush=True,
    )
