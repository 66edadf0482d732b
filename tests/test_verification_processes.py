"""Three and five ``joynode run`` processes on anvil settle a ``prefill`` job on-chain.

Node A owns the model: it registers it through ``models.register`` with a
prefill policy, which the watcher mirrors into every node's SQLite. A paid
job through A then goes to a committee of all of them: the first-ranked
member executes, the others check its tokens by prefill and sign the same
output, and the certificate lands in ``ProofOfInference`` unchanged.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from joynode.inference.models import model_id
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import NodeProcess, wait_for
from tests.inference_fixtures import tiny_model
from tests.test_consensus_chain import node_info, stake
from tests.test_consensus_processes import call, paid_home, sees_serving
from tests.test_storage_processes import addrs

__all__ = ["anvil_url", "chain", "deployed", "tiny_model"]

FIRST_ACCOUNT = 13
PROMPT = {"model": "tiny", "prompt": "Hello world", "max_tokens": 16, "ignore_eos": True}


@pytest.mark.slow
@pytest.mark.parametrize("count", [3, pytest.param(5, marks=pytest.mark.soak)])
async def test_processes_settle_a_prefill_job_on_chain(
    tmp_path: Path, tiny_model: Path, chain: Chain, count: int
) -> None:
    chain.deployment.write(tmp_path / "deployment.json")
    accounts = [dev_account(FIRST_ACCOUNT + i) for i in range(count)]
    for account in accounts:
        await trio.to_thread.run_sync(stake, chain, account)
    names = "abcde"[:count]
    homes = [paid_home(tmp_path / "a", tiny_model, chain, FIRST_ACCOUNT, None)]
    processes = {"a": NodeProcess(homes[0])}
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
        registered = await call(
            a,
            "models.register",
            {
                "model": cid,
                "price_joy": 1,
                "committee_size": count,
                "verification": "prefill",
                "margin_nats": 0.5,
                "max_outside": 0.05,
            },
        )
        assert registered["verification_tx"].startswith("0x")
        market = chain.contract("ModelMarketplace")
        policy = market.functions.verificationOf(bytes.fromhex(registered["model"][2:])).call()
        assert list(policy) == [1, 500, 500, 5000]
        for home in homes:
            await wait_for(
                partial(sees_serving, home, cid, count - 1), 30, "every node sees the others"
            )
        members = [acc.address for acc in accounts]

        submitted = await call(a, "infer.submit", {**PROMPT, "paid": True})
        assert sorted(submitted["committee"]) == sorted(members)
        done = await call(a, "job.wait", {"request_id": submitted["request_id"], "timeout_s": 120})
        assert done["status"] == "certified", done["reason"]
        assert done["verification"] == "prefill"
        assert done["refusals"] == []
        assert done["payment"]["status"] == "settled", done["payment"]
        assert sorted(done["certificate"]["signers"]) == sorted(members)
        for address in members:
            assert node_info(chain, address)[1] == 1010  # every signer gained reputation
        landed = market.functions.requestInfo(bytes.fromhex(submitted["request_id"][2:])).call()
        assert landed[5] == 2  # Status.Settled
        # Every member followed the same job under the registered policy.
        for home in homes[1:]:
            theirs = await call(home, "job.get", {"request_id": submitted["request_id"]})
            assert theirs["verification"] == "prefill"
            assert theirs["certificate"]["output_hash"] == done["certificate"]["output_hash"]
    finally:
        for process in processes.values():
            process.kill()
