"""Three ``joynode run`` processes serve 30 prepaid requests of a client that is no node.

The client (dev account 19) deposits JOY once, then for each request asks a node
for a quote (``prepaid.quote``), signs its EIP-712 typed data with its own key
(eth-account in Python; every third request viem in Node, given the quote's JSON
as is, as a web client would be), and submits it (``infer.submit`` with ``prepaid``), to each of
the three nodes in turn. No transaction of its own stands on the request path.
The nodes settle the certified requests in batches; the test checks that every
request settled once, in fewer transactions than requests, and that the client
paid exactly the price of each.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account.signers.local import LocalAccount

from joynode.chain.deploy import JOY
from joynode.inference.models import model_id
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import NodeHome, NodeProcess, wait_for
from tests.inference_fixtures import tiny_model
from tests.test_consensus_chain import register_model, stake
from tests.test_consensus_processes import call, paid_home, sees_serving
from tests.test_prepaid_nodes import balance_of, deposit
from tests.test_storage_processes import addrs

__all__ = ["anvil_url", "chain", "deployed", "tiny_model"]

FIRST_ACCOUNT = 13
CLIENT = dev_account(19)
REQUESTS = 30
PRICE = 100 * JOY  # test_consensus_chain.register_model's
ROOT = Path(__file__).resolve().parent.parent
VIEM_SIGN = ROOT / "tests" / "viem_sign.mjs"


async def signed_request(relay: NodeHome, client: LocalAccount, i: int) -> dict[str, Any]:
    """What a client does: a quote from ``relay``, signed, and the job to submit with it."""
    job = {"model": "tiny", "prompt": f"Request {i}:", "max_tokens": 8, "ignore_eos": True}
    quote = await call(relay, "prepaid.quote", {**job, "client": client.address})
    if i % 3 == 2:
        signature = await viem_signature(client, quote["typed_data"])
    else:
        signature = (
            "0x" + bytes(client.sign_typed_data(full_message=quote["typed_data"]).signature).hex()
        )
    return {**job, "prepaid": {**quote["prepaid"], "signature": signature}}


async def viem_signature(client: LocalAccount, typed_data: dict[str, Any]) -> str:
    """The signature viem makes of the typed data, JSON-encoded as the node sent it."""
    stdin = json.dumps({"key": "0x" + bytes(client.key).hex(), "typed_data": typed_data})
    done = await trio.run_process(
        ["node", str(VIEM_SIGN)], stdin=stdin.encode(), capture_stdout=True, cwd=ROOT
    )
    return done.stdout.decode()


async def mirrors_registry(home: NodeHome, count: int) -> bool:
    return bool((await call(home, "chain.status"))["registered_nodes"] == count)


async def owes_nothing(home: NodeHome) -> bool:
    by_state = (await call(home, "prepaid.settlements", {"limit": 1}))["by_state"]
    return not any(by_state.get(s) for s in ("pending", "certified", "sending"))


@pytest.mark.slow
async def test_three_processes_serve_and_settle_thirty_signed_requests_in_batches(
    tmp_path: Path, tiny_model: Path, chain: Chain
) -> None:
    chain.deployment.write(tmp_path / "deployment.json")
    accounts = [dev_account(FIRST_ACCOUNT + i) for i in range(3)]
    for account in accounts:
        await trio.to_thread.run_sync(stake, chain, account)
    await trio.to_thread.run_sync(deposit, chain, CLIENT, (REQUESTS + 2) * PRICE)

    def home(name: str, index: int, bootstrap: list[str] | None) -> NodeHome:
        h = paid_home(tmp_path / name, tiny_model, chain, FIRST_ACCOUNT + index, bootstrap)
        h.set("prepaid", "batch_size", "8")
        h.set("prepaid", "max_age_s", "5")
        h.set("prepaid", "takeover_s", "20")
        return h

    homes = [home("a", 0, None)]
    processes = [NodeProcess(homes[0])]
    try:
        await trio.to_thread.run_sync(processes[0].wait_ready, 120)
        for i, name in ((1, "b"), (2, "c")):
            homes.append(home(name, i, addrs(homes[0])))
            processes.append(NodeProcess(homes[-1]))
        for process in processes[1:]:
            await trio.to_thread.run_sync(process.wait_ready, 180)
        for h in homes:
            assert (await call(h, "node.register"))["models"]
        cid = model_id(tiny_model)
        await trio.to_thread.run_sync(register_model, chain, cid, 3)
        for h in homes:
            await wait_for(partial(sees_serving, h, cid, 2), 30, "every node sees the others")
            await wait_for(partial(mirrors_registry, h, 3), 30, "every node mirrors the registry")

        submitted: list[tuple[NodeHome, str]] = []

        async def submit(i: int) -> None:
            relay = homes[i % 3]
            job = await call(relay, "infer.submit", await signed_request(relay, CLIENT, i))
            submitted.append((relay, job["request_id"]))

        for start in range(0, REQUESTS, 10):  # ten at a time
            async with trio.open_nursery() as wave:
                for i in range(start, start + 10):
                    wave.start_soon(submit, i)
        assert len({rid for _, rid in submitted}) == REQUESTS
        for relay, request_id in submitted:
            done = await call(relay, "job.wait", {"request_id": request_id, "timeout_s": 180})
            assert done["status"] == "certified", done["reason"]
            assert done["prepaid"]["client"] == CLIENT.address

        prepaid = chain.contract("PrepaidInference")
        ids = {bytes.fromhex(rid[2:]) for _, rid in submitted}

        async def settled_ids() -> set[bytes]:
            def read() -> set[bytes]:
                logs = prepaid.events.Settled().get_logs(from_block=0)
                return {bytes(rid) for e in logs for rid in e["args"]["requestIds"]}

            return await trio.to_thread.run_sync(read)

        async def all_settled() -> bool:
            return ids <= await settled_ids()

        await wait_for(all_settled, 120, "all thirty settled")
        logs = prepaid.events.Settled().get_logs(from_block=0)
        mine = [(e, rid) for e in logs for rid in e["args"]["requestIds"] if bytes(rid) in ids]
        assert len(mine) == REQUESTS  # each once
        batches = {e["transactionHash"] for e, _ in mine}
        assert len(batches) < REQUESTS // 2, f"{len(batches)} transactions"
        assert balance_of(chain, CLIENT) == 2 * PRICE  # paid the price of each, once

        # Every node's ledger: nothing owed any more; and the client's balance as a node shows it.
        for h in homes:
            await wait_for(partial(owes_nothing, h), 30, "every ledger sees them settled")
        balance = await call(homes[0], "balance.get", {"client": CLIENT.address})
        assert int(balance["balance"]) == 2 * PRICE
        assert balance["pending"] == "0"
    finally:
        for process in processes:
            process.kill()
