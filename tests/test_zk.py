"""Zero-knowledge proofs with the real ZoKrates (zokrates-js) worker and the built circuits.

Needs ``joynode circuits build`` (``make test`` runs it first).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from web3 import Web3
from web3.logs import DISCARD

from joynode.chain.artifacts import load_artifacts
from joynode.chain.deploy import JOY
from joynode.chain.sender import TransactionFailed
from joynode.control.client import ControlClient
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.zk import circuits
from joynode.zk.mlp import (
    FIELD,
    HIDDEN,
    IN,
    OUT,
    WEIGHTS,
    MlpProof,
    QuantizedMlp,
    commitments,
    prove,
    to_field,
    verify,
)
from joynode.zk.zokrates import ZokratesError, ZokratesWorker, solidity_proof
from tests.chain_fixtures import Chain, anvil_url, chain, deployed, dev_account
from tests.factories import make_home, running_node

__all__ = ["anvil_url", "chain", "deployed"]

int8 = st.integers(-128, 127)


@pytest.fixture
async def worker() -> AsyncIterator[ZokratesWorker]:
    for circuit in circuits.ALL:
        assert circuit.built(), "run `joynode circuits build` (make test does)"
    async with ZokratesWorker() as zokrates:
        yield zokrates


def random_model(seed: int) -> QuantizedMlp:
    rng = np.random.default_rng(seed)
    return QuantizedMlp(tuple(int(v) for v in rng.integers(-128, 128, WEIGHTS)))


@settings(max_examples=5, deadline=None)
@given(
    cases=st.lists(
        st.tuples(
            st.lists(int8, min_size=WEIGHTS, max_size=WEIGHTS),
            st.lists(int8, min_size=IN, max_size=IN),
        ),
        min_size=3,
        max_size=3,
    )
)
def test_python_inference_equals_the_circuits(cases: list[tuple[list[int], list[int]]]) -> None:
    async def circuit_logits() -> list[list[int]]:
        async with ZokratesWorker() as zokrates:  # one worker per example, for all its cases
            return [
                list((await commitments(zokrates, QuantizedMlp(tuple(w)), x))[2]) for w, x in cases
            ]

    assert trio.run(circuit_logits) == [QuantizedMlp(tuple(w)).infer(x) for w, x in cases]


async def test_a_proof_verifies_and_tampering_with_any_public_value_fails(
    worker: ZokratesWorker,
) -> None:
    model = random_model(1)
    x = [3, -7, 12, 0, 127, -128, 5, 5, 9, -1, 44, 2, -60, 8, 1, 0]
    proven = await prove(worker, model, x)
    commitment, input_hash, logits = await commitments(worker, model, x)
    assert (proven.weights_commitment, proven.input_hash, proven.logits) == (
        commitment,
        input_hash,
        logits,
    )
    assert list(proven.logits) == model.infer(x)
    assert await verify(worker, proven.proof)

    # Public values, in the verifier's order: commitment, input hash, logits.
    for index, what in [(0, "weights commitment"), (1, "input hash"), (2, "an output")]:
        forged = copy.deepcopy(proven.proof)
        forged["inputs"][index] = hex((int(forged["inputs"][index], 16) + 1) % FIELD)
        assert not await verify(worker, forged), what
    # A proof is bound to its circuit's keys: another circuit's verifier refuses it.
    with pytest.raises(ZokratesError):
        await verify(worker, proven.proof, circuits.VOTE_COMMITMENT)

    # Another model (other weights) or input gives other public values.
    other = await commitments(worker, random_model(2), x)
    assert other[0] != commitment
    assert (await commitments(worker, model, [*x[:-1], 1]))[1] != input_hash


async def test_inputs_out_of_range_are_refused_before_zokrates(worker: ZokratesWorker) -> None:
    model = random_model(3)
    with pytest.raises(ValueError, match="int8"):
        model.infer([200] * IN)
    with pytest.raises(ValueError, match="16 values"):
        await prove(worker, model, [1] * (IN - 1))
    with pytest.raises(ValueError, match="340 weights"):
        QuantizedMlp((1, 2, 3))
    # ZoKrates itself refuses a value that is no byte, and the worker keeps serving.
    with pytest.raises(ZokratesError):
        await worker.call(
            "compute-witness",
            input=circuits.MLP_INFERENCE.program,
            abi=circuits.MLP_INFERENCE.abi,
            args=[["300"] * WEIGHTS, ["0"] * IN],
        )
    assert len((await commitments(worker, model, [0] * IN))[2]) == OUT


def test_a_classifier_trained_on_synthetic_data_keeps_its_accuracy_when_quantized() -> None:
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 1, (OUT, IN))
    labels = rng.integers(0, OUT, 800)
    samples = centers[labels] + rng.normal(0, 0.35, (800, IN))
    w1 = rng.normal(0, 0.3, (HIDDEN, IN))
    b1 = np.zeros(HIDDEN)
    w2 = rng.normal(0, 0.3, (OUT, HIDDEN))
    b2 = np.zeros(OUT)
    onehot = np.eye(OUT)[labels]
    for _ in range(300):  # full-batch gradient descent on softmax cross-entropy
        hidden = np.maximum(samples @ w1.T + b1, 0)
        logits = hidden @ w2.T + b2
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        grad = (probs - onehot) / len(samples)
        grad_hidden = (grad @ w2) * (hidden > 0)
        w2 -= 0.5 * grad.T @ hidden
        b2 -= 0.5 * grad.sum(0)
        w1 -= 0.5 * grad_hidden.T @ samples
        b1 -= 0.5 * grad_hidden.sum(0)
    float_pred = (np.maximum(samples @ w1.T + b1, 0) @ w2.T + b2).argmax(1)
    model, _ = QuantizedMlp.quantize(w1, b1, w2, b2)
    x_scale = float(np.abs(samples).max()) / 127
    quantized = np.clip(np.rint(samples / x_scale), -128, 127).astype(int)
    quant_pred = np.array([np.argmax(model.infer(list(row))) for row in quantized])
    assert (float_pred == labels).mean() > 0.9
    assert (quant_pred == float_pred).mean() > 0.9


async def test_the_exported_verifier_accepts_the_proof_on_chain_and_refuses_tampering(
    worker: ZokratesWorker, chain: Chain
) -> None:
    compiled = load_artifacts()["MlpInferenceVerifier"]
    address, _ = chain.sender(chain.admin).deploy(compiled)
    verifier = chain.w3.eth.contract(address=Web3.to_checksum_address(address), abi=compiled.abi)
    proven = await prove(worker, random_model(4), [1] * IN)
    args = _verifier_args(proven)
    assert verifier.functions.verifyTx(*args).call() is True
    inputs = list(args[1])
    inputs[2] = to_field(proven.logits[0] + 1)
    assert verifier.functions.verifyTx(args[0], inputs).call() is False
    gas = verifier.functions.verifyTx(*args).estimate_gas()
    assert 200_000 < gas < 600_000  # 6 public inputs


def _verifier_args(proven: MlpProof) -> tuple[object, list[int]]:
    return solidity_proof(proven.proof), proven.public_inputs


async def test_a_zk_model_request_settles_on_a_valid_proof_only(
    worker: ZokratesWorker, chain: Chain
) -> None:
    owner, client, prover = dev_account(10), dev_account(12), dev_account(13)
    artifacts = load_artifacts()
    verifier, _ = chain.sender(chain.admin).deploy(artifacts["MlpInferenceVerifier"])
    wrong_verifier, _ = chain.sender(chain.admin).deploy(artifacts["VoteCommitmentVerifier"])
    model = random_model(5)
    x = [4, -3, 2, 1, 0, 9, -9, 12, 7, 7, -1, 3, 100, -100, 5, 6]
    commitment, input_hash, logits = await commitments(worker, model, x)
    market = chain.contract("ModelMarketplace")
    proof_of_inference = chain.contract("ProofOfInference")
    price = 10 * JOY

    def register(cid: str, weights_commitment: int, verifier_address: str) -> bytes:
        chain.sender(owner).transact(
            market.functions.registerModel(
                cid, price, 0, 1, [], [], weights_commitment.to_bytes(32, "big"), verifier_address
            )
        )
        return bytes(market.functions.modelIdOf(cid).call())

    def request(model_key: bytes, digest: int) -> bytes:
        sender = chain.sender(client)
        sender.transact(chain.contract("JoyToken").functions.approve(market.address, price))
        deadline = chain.w3.eth.get_block("latest")["timestamp"] + 600
        receipt = sender.transact(
            market.functions.requestInference(
                model_key, digest.to_bytes(32, "big"), price, deadline
            )
        )
        (event,) = market.events.InferenceRequested().process_receipt(receipt, errors=DISCARD)
        request_id = bytes(event["args"]["requestId"])
        assert market.functions.requestInfo(request_id).call()[6] == []  # a zk model has none
        return request_id

    zk_model = register("zk-mlp-a", commitment, verifier)
    request_id = request(zk_model, input_hash)
    proven = await prove(worker, model, x)
    proof, public = _verifier_args(proven)
    outputs = public[2:]

    def submit(rid: bytes, values: list[int], with_proof: object = proof) -> None:
        chain.sender(prover).transact(
            proof_of_inference.functions.submitZkResult(rid, with_proof, values)
        )

    # Tampered outputs, another model's proof, another input's proof: refused.
    with pytest.raises(TransactionFailed, match="BadProof"):
        submit(request_id, [outputs[0] + 1, *outputs[1:]])
    other_model = await prove(worker, random_model(6), x)
    with pytest.raises(TransactionFailed, match="BadProof"):
        submit(request_id, _verifier_args(other_model)[1][2:], _verifier_args(other_model)[0])
    other_input = await prove(worker, model, [0] * IN)
    with pytest.raises(TransactionFailed, match="BadProof"):
        submit(request_id, _verifier_args(other_input)[1][2:], _verifier_args(other_input)[0])
    # A model whose verifier is another circuit's refuses the proof too.
    mismatched = request(register("zk-mlp-b", commitment, wrong_verifier), input_hash)
    with pytest.raises(TransactionFailed):
        submit(mismatched, outputs)

    before = chain.balance(owner.address)
    submit(request_id, outputs)
    assert market.functions.requestInfo(request_id).call()[5] == 2  # Settled
    fee = price * 250 // 10_000
    assert chain.balance(owner.address) == before + price - fee
    assert chain.contract("NodeCoordinator").functions.earned(prover.address).call() > 0
    assert [to_field(v) for v in logits] == outputs
    with pytest.raises(TransactionFailed, match="NotPending"):
        submit(request_id, outputs)  # settled once


async def test_the_prover_actor_proves_through_the_control_socket_and_keeps_the_proof(
    tmp_path: Path,
) -> None:
    home = make_home(tmp_path / "node")
    model = random_model(8)
    x = [1, 2, 3, 4, 5, 6, 7, 8, -1, -2, -3, -4, -5, -6, -7, -8]
    async with (
        running_node(home) as node,
        ControlClient.connect(node.control.url or "", home.token.value) as client,
    ):
        made = await client.call("proof.generate", {"weights": list(model.weights), "input": x})
        assert made["logits"] == model.infer(x)
        assert (await client.call("proof.verify", {"proof": made["proof"]}))["verified"] is True
        forged = copy.deepcopy(made["proof"])
        forged["inputs"][2] = hex(int(forged["inputs"][2], 16) ^ 1)
        assert (await client.call("proof.verify", {"proof": forged}))["verified"] is False
        stored = await client.call("proof.get", {"proof_id": made["proof_id"]})
        assert stored["proof"] == made["proof"]
        assert stored["logits"] == made["logits"]
        # Bad requests get clear errors; the prover keeps serving.
        for params, message in [
            ({"weights": [0] * WEIGHTS, "input": [200] * IN}, "less than or equal to 127"),
            ({"weights": [0] * 3, "input": [0] * IN}, "at least 340"),
        ]:
            with pytest.raises(RpcError) as caught:
                await client.call("proof.generate", params)
            assert caught.value.code == INVALID_PARAMS
            assert message in caught.value.message
        with pytest.raises(RpcError, match="not a proof"):
            await client.call("proof.verify", {"proof": {"scheme": "g16"}})
        with pytest.raises(RpcError, match="no proof 999"):
            await client.call("proof.get", {"proof_id": 999})
        again = await client.call("proof.generate", {"weights": list(model.weights), "input": x})
        assert again["proof_id"] == made["proof_id"] + 1


async def test_a_call_cancelled_mid_proof_retires_the_worker_instead_of_desynchronising() -> None:
    model = random_model(9)
    async with ZokratesWorker() as worker:
        with trio.move_on_after(0.2):  # a proof takes seconds: cancelled mid-way
            await prove(worker, model, [0] * IN)
        with pytest.raises(ZokratesError, match="not running"):
            await commitments(worker, model, [0] * IN)
    async with ZokratesWorker() as fresh:  # a new one answers in turn
        assert list((await commitments(fresh, model, [0] * IN))[2]) == model.infer([0] * IN)
