"""Zero-knowledge proofs with the real ZoKrates (zokrates-js) worker and the built circuits.

Needs ``joynode circuits build`` (``make test`` runs it first).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from web3 import Web3

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
from joynode.zk.zokrates import ZokratesError, ZokratesWorker
from tests.chain_fixtures import Chain, anvil_url, chain, deployed

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
    from joynode.chain.artifacts import load_artifacts

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
    def h(value: str) -> int:
        return int(value, 16)

    p = proven.proof["proof"]
    proof = (
        tuple(map(h, p["a"])),
        tuple(tuple(map(h, pair)) for pair in p["b"]),
        tuple(map(h, p["c"])),
    )
    return proof, proven.public_inputs
