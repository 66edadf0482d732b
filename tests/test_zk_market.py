"""zk models in the marketplace: nodes on a real anvil, the real prover, gossip between them.

A requester node pays for an inference of a zk model; a node that serves the
model (``[[zk.models]]``, a weights file made by ``joynode zk quantize``)
takes the job from gossip, proves it and settles it with ``submitZkResult``.
Needs ``joynode circuits build`` (``make test`` runs it first).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio
from web3.logs import DISCARD

from joynode import wire
from joynode.chain.deploy import JOY
from joynode.cli import main as joynode_main
from joynode.config import SettingError
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.keys import NodeKey
from joynode.messages import RequestStatus
from joynode.node import Node
from joynode.p2p.gossip import ZK_JOBS
from joynode.zk.mlp import HIDDEN, IN, OUT, WeightsFileError, load_weights
from joynode.zk.service import ZK_ERROR
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account, rpc_proxy
from tests.factories import (
    LIBP2P_TEARDOWN_LEAK,
    NodeHome,
    fast_p2p,
    make_home,
    running_node,
    wait_for,
)

__all__ = ["anvil_url", "chain", "deployed"]

pytestmark = LIBP2P_TEARDOWN_LEAK

MODEL = "zk-demo"
PRICE_JOY = 5
X = [12, -7, 33, 0, 5, -128, 127, 64, -1, 2, 3, -90, 44, 8, 0, -3]
REQUESTER, PROVER, WALLET = dev_account(12), dev_account(14), dev_account(15)


def float_layers(seed: int) -> dict[str, list[object]]:
    rng = np.random.default_rng(seed)
    shapes = {"w1": (HIDDEN, IN), "b1": (HIDDEN,), "w2": (OUT, HIDDEN), "b2": (OUT,)}
    return {name: rng.normal(0, 0.5, shape).tolist() for name, shape in shapes.items()}


async def quantized_weights(tmp_path: Path, seed: int = 3) -> tuple[Path, str]:
    """A weights file made by ``joynode zk quantize``, and the commitment it printed."""
    floats, out = tmp_path / f"floats{seed}.json", tmp_path / f"weights{seed}.json"
    floats.write_text(json.dumps(float_layers(seed)))
    code = await trio.to_thread.run_sync(
        joynode_main, ["zk", "quantize", str(floats), "-o", str(out)]
    )
    assert code == 0
    return out, json.loads(out.read_text())["weights_commitment"]


def chain_home(
    path: Path,
    chain: Chain,
    account: object,
    bootstrap: list[str] | None,
    rpc_url: str | None = None,
) -> NodeHome:
    home = fast_p2p(make_home(path), bootstrap=bootstrap)
    NodeKey(bytes(account.key)).save(home.config.node.key_file, force=True)  # type: ignore[attr-defined]
    deployment = path / "deployment.json"
    chain.deployment.write(deployment)
    home.set("chain", "mode", '"rpc"')
    home.set("chain", "rpc_url", f'"{rpc_url or chain.url}"')
    home.set("chain", "deployment_file", f'"{deployment}"')
    home.set("chain", "poll_interval_s", "0.1")
    home.set("chain", "retry_max_s", "1.0")
    return home


@asynccontextmanager
async def requester_and_prover(
    tmp_path: Path, chain: Chain, weights: Path | None, prover_rpc: str | None = None
) -> AsyncIterator[tuple[ControlClient, ControlClient, Node]]:
    """A requester node and a prover node (serving ``weights``; its RPC ``prover_rpc``)."""
    prover_home = chain_home(tmp_path / "prover", chain, PROVER, None, prover_rpc)
    if weights is not None:
        prover_home.set("zk", "models", f'[{{name = "{MODEL}", weights = "{weights}"}}]')
    async with running_node(prover_home) as prover:
        home = chain_home(tmp_path / "requester", chain, REQUESTER, prover.p2p.listen_addrs())
        async with (
            running_node(home) as requester,
            ControlClient.connect(requester.control.url or "", home.token.value) as a,
            ControlClient.connect(prover.control.url or "", prover_home.token.value) as b,
        ):
            await wait_for(lambda: prover.p2p.peer_id in requester.p2p.connected_peers(), 15, "up")
            yield a, b, requester


def registration(commitment: str) -> dict[str, object]:
    return {"model": MODEL, "kind": "zk", "price_joy": PRICE_JOY, "weights_commitment": commitment}


def balance(chain: Chain, address: str) -> int:
    return int(chain.contract("JoyToken").functions.balanceOf(address).call())


async def test_a_serving_peer_proves_and_settles_a_paid_zk_request(
    chain: Chain, tmp_path: Path
) -> None:
    weights, commitment = await quantized_weights(tmp_path)
    model = load_weights(weights)[0]
    async with requester_and_prover(tmp_path, chain, weights) as (a, b, requester):
        registered = await b.call(
            "models.register",
            {
                "model": MODEL,
                "kind": "zk",
                "price_joy": PRICE_JOY,
                "weights_commitment": commitment,
            },
        )
        assert registered["tx"].startswith("0x")
        assert (await b.call("zk.jobs", {}))["served"] == [MODEL]
        paid_before = balance(chain, REQUESTER.address)

        result = await a.call("zk.infer", {"model": MODEL, "input": X})

        assert result["status"] == "settled"
        assert result["logits"] == model.infer(X)
        assert result["prover"] == PROVER.address
        assert paid_before - balance(chain, REQUESTER.address) == PRICE_JOY * JOY
        market = chain.contract("ModelMarketplace")
        request_id = bytes.fromhex(result["request_id"][2:])
        assert market.functions.requestInfo(request_id).call()[5] == RequestStatus.SETTLED
        # The requester learns of the settlement from its watcher, the prover from its
        # transaction's receipt: either may come first, so wait for the prover's record.
        await wait_for(
            lambda: _has_job(b, result["request_id"], "settled"), 30, "the prover recorded it"
        )
        (job,) = (await b.call("zk.jobs", {}))["jobs"]
        assert (job["status"], job["tx"], job["input"]) == ("settled", result["tx"], X)

        # A relayed job whose input is not the paid one is refused by the prover, and
        # the requester refuses to relay it; the right input then settles.
        wallet_request = await trio.to_thread.run_sync(wallet_pays, chain, result["request_id"])
        forged = wire.ZkJob(bytes.fromhex(wallet_request[2:]), MODEL, [0] * IN)
        await requester.p2p.publish(ZK_JOBS, forged)
        await wait_for(lambda: _has_job(b, wallet_request, "refused"), 30, "forged job refused")
        with pytest.raises(RpcError, match="not the one") as refused:
            await a.call(
                "zk.infer", {"model": MODEL, "input": [1] * IN, "request_id": wallet_request}
            )
        assert refused.value.code == ZK_ERROR
        relayed = await a.call(
            "zk.infer", {"model": MODEL, "input": X, "request_id": wallet_request}
        )
        assert (relayed["status"], relayed["logits"]) == ("settled", model.infer(X))

        for params, message in [
            ({"model": "no-such-model", "input": X}, "not an active zk model"),
            ({"model": MODEL, "input": [200] * IN}, "less than or equal to 127"),
            ({"model": MODEL, "input": X[:3]}, "at least 16"),
        ]:
            with pytest.raises(RpcError, match=message) as bad:
                await a.call("zk.infer", params)
            assert bad.value.code == INVALID_PARAMS


def wallet_pays(chain: Chain, earlier_request: str) -> str:
    """A wallet pays for the same input as an earlier request (so the same input hash)."""
    market = chain.contract("ModelMarketplace")
    _, _, input_hash, price, *_ = market.functions.requestInfo(
        bytes.fromhex(earlier_request[2:])
    ).call()
    sender = chain.sender(WALLET)
    sender.transact(chain.contract("JoyToken").functions.approve(market.address, price))
    deadline = chain.w3.eth.get_block("latest")["timestamp"] + 600
    receipt = sender.transact(
        market.functions.requestInference(
            market.functions.modelIdOf(MODEL).call(), input_hash, price, deadline
        )
    )
    (event,) = market.events.InferenceRequested().process_receipt(receipt, errors=DISCARD)
    return "0x" + bytes(event["args"]["requestId"]).hex()


async def _has_job(control: ControlClient, request_id: str | None, status: str) -> bool:
    """Whether ``control``'s node has a zk job (``request_id``'s, or any) in ``status``."""
    jobs = (await control.call("zk.jobs", {}))["jobs"]
    return any(request_id in (None, j["request_id"]) and j["status"] == status for j in jobs)


async def test_a_prover_that_loses_its_rpc_lands_its_proof_when_it_returns(
    chain: Chain, tmp_path: Path
) -> None:
    weights, commitment = await quantized_weights(tmp_path)
    model = load_weights(weights)[0]
    async with (
        rpc_proxy(chain.url) as rpc,
        requester_and_prover(tmp_path, chain, weights, prover_rpc=rpc.url) as (a, b, _),
    ):
        await b.call("models.register", registration(commitment))
        results: list[dict[str, object]] = []

        async def infer() -> None:
            results.append(await a.call("zk.infer", {"model": MODEL, "input": X}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(infer)
            await wait_for(lambda: _has_job(b, None, "proving"), 60, "the prover took it")
            # While it proves (3 s or more, CPU-bound): its submission finds no RPC.
            await rpc.cut()
            await wait_for(lambda: _chain_state(b, "degraded"), 30, "the prover noticed")
            (job,) = (await b.call("zk.jobs", {}))["jobs"]
            assert job["status"] == "proving"  # retrying, not given up
            market = chain.contract("ModelMarketplace")
            request_id = bytes.fromhex(str(job["request_id"])[2:])
            assert market.functions.requestInfo(request_id).call()[5] == RequestStatus.PENDING
            await rpc.restore()
        (result,) = results
        assert (result["status"], result["logits"]) == ("settled", model.infer(X))
        assert result["prover"] == PROVER.address
        await wait_for(lambda: _has_job(b, job["request_id"], "settled"), 30, "recorded")
        await wait_for(lambda: _chain_state(b, "ready"), 30, "the prover recovered")


async def _chain_state(control: ControlClient, state: str) -> bool:
    return bool((await control.call("node.status"))["actors"]["chain"]["state"] == state)


async def test_a_zk_request_nobody_proves_is_refunded(chain: Chain, tmp_path: Path) -> None:
    _, commitment = await quantized_weights(tmp_path)
    async with requester_and_prover(tmp_path, chain, None) as (a, b, _):
        await b.call(
            "models.register",
            {
                "model": MODEL,
                "kind": "zk",
                "price_joy": PRICE_JOY,
                "weights_commitment": commitment,
            },
        )
        before = balance(chain, REQUESTER.address)
        with pytest.raises(RpcError, match=r"no prover settled .* refunded"):
            await a.call("zk.infer", {"model": MODEL, "input": X, "timeout_s": 20})
        assert balance(chain, REQUESTER.address) == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda doc: doc.update(weights_commitment="0x" + "11" * 32), "claims commitment"),
        (lambda doc: doc.update(weights=doc["weights"][:10]), "340 weights"),
        (lambda doc: doc.update(format="other"), "not a weights file"),
    ],
)
async def test_a_bad_weights_file_stops_the_node_with_a_clear_error(
    tmp_path: Path, damage: object, message: str
) -> None:
    weights, _ = await quantized_weights(tmp_path)
    document = json.loads(weights.read_text())
    damage(document)  # type: ignore[operator]
    weights.write_text(json.dumps(document))
    home = make_home(tmp_path / "node")
    home.set("zk", "models", f'[{{name = "{MODEL}", weights = "{weights}"}}]')
    node = Node(home.config, home.key, home.token)

    def names_the_weights(exc: SettingError) -> bool:
        return exc.key == "zk.models[0].weights" and message in str(exc)

    with pytest.RaisesGroup(
        pytest.RaisesExc(SettingError, check=names_the_weights), flatten_subgroups=True
    ):
        await node.run()
    assert node.status()["actors"]["zk"]["state"] == "failed"


def test_quantize_refuses_float_weights_of_the_wrong_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    floats = tmp_path / "floats.json"
    layers = float_layers(1)
    floats.write_text(json.dumps({**layers, "w1": layers["w1"][:3]}))
    assert joynode_main(["zk", "quantize", str(floats), "-o", str(tmp_path / "w.json")]) == 2
    assert "w1 must be finite numbers of shape (16, 16)" in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()


def test_weights_files_that_are_not_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.json"
    for content in ["", "[]", '{"format": "joynode/zk-mlp-16-16-4-int8", "weights": [1.5]}']:
        path.write_text(content)
        with pytest.raises(WeightsFileError):
            load_weights(path)
    with pytest.raises(WeightsFileError, match="No such file"):
        load_weights(tmp_path / "missing.json")
