"""Three (``make soak``: five) ``joynode run`` processes settle paid jobs on anvil, through
kills and a restart.

Each process is a dev account (staked by the test), registers itself with
``node.register``, and serves the tiny model, which the marketplace prices
with a committee of all of them. Paid jobs go through ``infer.submit`` on A:

1. all honest: certified, the certificate lands, every member gains reputation;
2. the last member SIGKILLed mid-job: the others still certify and settle, the
   dead one loses reputation; restarted, it takes the job up again from
   SQLite, catches up on the votes and ends certified, with no equivocation;
3. a majority SIGKILLed mid-job: no majority is left, the job fails with that
   reason, and A gets the escrow back after the deadline.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from joynode.control.client import ControlClient
from joynode.control.jsonrpc import RpcError
from joynode.inference.models import model_id
from joynode.keys import NodeKey
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import NodeHome, NodeProcess, fast_p2p, make_home, wait_for
from tests.inference_fixtures import small_engine, tiny_model
from tests.test_consensus_chain import node_info, register_model, stake
from tests.test_storage_processes import addrs

__all__ = ["anvil_url", "chain", "deployed", "tiny_model"]

FIRST_ACCOUNT = 13
PROMPT = {"model": "tiny", "prompt": "Hello world", "max_tokens": 16, "ignore_eos": True}


def paid_home(
    path: Path, tiny_model: Path, chain: Chain, index: int, bootstrap: list[str] | None
) -> NodeHome:
    home = small_engine(fast_p2p(make_home(path), bootstrap=bootstrap))
    NodeKey(bytes(dev_account(index).key)).save(home.config.node.key_file, force=True)
    home.set("inference", "models", f'[{{name = "tiny", path = "{tiny_model}"}}]')
    deployment_file = path.parent / "deployment.json"
    home.set("chain", "mode", '"rpc"')
    home.set("chain", "rpc_url", f'"{chain.url}"')
    home.set("chain", "deployment_file", f'"{deployment_file}"')
    home.set("chain", "poll_interval_s", "0.2")
    home.set("consensus", "commit_timeout_s", "25")
    home.set("consensus", "reveal_timeout_s", "5")
    home.set("consensus", "settle_timeout_s", "15")
    home.set("consensus", "takeover_s", "2")
    return home


async def call(home: NodeHome, method: str, params: dict[str, Any] | None = None) -> Any:
    endpoints = home.endpoints()
    assert endpoints is not None
    async with ControlClient.connect(endpoints.control_url, home.token.value) as client:
        return await client.call(method, params)


async def sees_serving(home: NodeHome, model: str, peers: int) -> bool:
    table = await call(home, "peers.list")
    return sum(1 for p in table if p["state"] == "up" and model in p["models"]) >= peers


async def _refunded(home: NodeHome, request_id: str) -> bool:
    job = await call(home, "job.get", {"request_id": request_id})
    return bool(job["payment"]["status"] == "refunded")


async def _has_job(home: NodeHome, request_id: str) -> bool:
    try:
        await call(home, "job.get", {"request_id": request_id})
    except RpcError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("count", [3, pytest.param(5, marks=pytest.mark.soak)])
async def test_processes_settle_paid_jobs_through_kills_and_a_restart(
    tmp_path: Path, tiny_model: Path, chain: Chain, count: int
) -> None:
    chain.deployment.write(tmp_path / "deployment.json")
    accounts = [dev_account(FIRST_ACCOUNT + i) for i in range(count)]
    for account in accounts:
        await trio.to_thread.run_sync(stake, chain, account)
    names = "abcde"[:count]
    homes = [paid_home(tmp_path / "a", tiny_model, chain, FIRST_ACCOUNT, None)]
    processes = {homes[0].dir.name: NodeProcess(homes[0])}
    try:
        await trio.to_thread.run_sync(processes["a"].wait_ready, 120)
        for i, name in enumerate(names[1:], start=1):
            home = paid_home(tmp_path / name, tiny_model, chain, FIRST_ACCOUNT + i, addrs(homes[0]))
            homes.append(home)
            processes[name] = NodeProcess(home)
        for name in names[1:]:
            await trio.to_thread.run_sync(processes[name].wait_ready, 180)
        for home in homes:
            assert (await call(home, "node.register"))["models"]
        a = homes[0]
        cid = model_id(tiny_model)
        await trio.to_thread.run_sync(register_model, chain, cid, count)
        for home in homes:
            await wait_for(
                partial(sees_serving, home, cid, count - 1),
                30,
                "every node sees all the others serving",
            )
        members = [acc.address for acc in accounts]

        # 1. All honest.
        submitted = await call(a, "infer.submit", {**PROMPT, "paid": True})
        assert sorted(submitted["committee"]) == sorted(members)
        done = await call(a, "job.wait", {"request_id": submitted["request_id"], "timeout_s": 120})
        assert done["status"] == "certified", done["reason"]
        assert done["payment"]["status"] == "settled", done["payment"]
        assert sorted(done["certificate"]["signers"]) == sorted(members)
        for address in members:
            assert node_info(chain, address)[1] == 1010

        # 2. The last node dies as soon as it has the job, and comes back afterwards.
        submitted = await call(a, "infer.submit", {**PROMPT, "paid": True, "nonce": 2})
        request_id = submitted["request_id"]
        last, last_home = names[-1], homes[-1]
        await wait_for(partial(_has_job, last_home, request_id), 30, "the last node has the job")
        processes[last].kill()
        done = await call(a, "job.wait", {"request_id": request_id, "timeout_s": 120})
        assert done["status"] == "certified", done["reason"]
        assert done["payment"]["status"] == "settled", done["payment"]
        signers = done["certificate"]["signers"]
        if accounts[-1].address not in signers:  # it died before revealing
            assert node_info(chain, accounts[-1].address)[1] == 1010 - 20
        processes[last] = NodeProcess(last_home)
        await trio.to_thread.run_sync(processes[last].wait_ready, 180)
        with trio.fail_after(60):
            again = await call(last_home, "job.wait", {"request_id": request_id, "timeout_s": 60})
        assert again["status"] == "certified", again["reason"]
        assert again["certificate"]["output_hash"] == done["certificate"]["output_hash"]
        assert again["payment"]["status"] == "settled"
        assert again["equivocators"] == []
        assert (await call(a, "job.get", {"request_id": request_id}))["equivocators"] == []

        # 3. A majority dies mid-job: no majority can be left.
        before = chain.balance(accounts[0].address)
        submitted = await call(a, "infer.submit", {**PROMPT, "paid": True, "nonce": 3})
        request_id = submitted["request_id"]
        for name in names[-(count // 2 + 1) :]:
            processes[name].kill()
        done = await call(a, "job.wait", {"request_id": request_id, "timeout_s": 150})
        assert done["status"] == "failed"
        assert "no majority" in done["reason"]
        assert "no reveal from" in done["reason"]
        await wait_for(partial(_refunded, a, request_id), 60, "A got the escrow back")
        assert chain.balance(accounts[0].address) == before
        assert processes["a"].proc.poll() is None  # A kept running throughout
    finally:
        for process in processes.values():
            process.kill()
