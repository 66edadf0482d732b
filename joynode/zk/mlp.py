"""zk-friendly models: a quantized 16 -> 16 -> 4 MLP, run in Python exactly as the circuit runs it.

``circuits/mlp_inference.zok`` proves one inference of this network: int8
weights and inputs, ReLU on the hidden layer, integer logits out. ``infer``
computes the same integers; ``prove`` has the circuit compute them too and
returns them with a Groth16 proof whose public values are the weights
commitment, the input hash and the logits (in that order). Commitments are
Poseidon hashes computed by the circuit itself (``commitments``), so Python
and circuit can never disagree on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from joynode.zk.circuits import MLP_INFERENCE, Circuit
from joynode.zk.zokrates import ZokratesWorker

FIELD = 21888242871839275222246405745257275088548364400416034343698204186575808495617  # bn128
IN, HIDDEN, OUT = 16, 16, 4
WEIGHTS = HIDDEN * IN + HIDDEN + OUT * HIDDEN + OUT  # 340, the circuit's order
INT8 = (-128, 127)
Int64Array = npt.NDArray[np.int64]


def to_field(value: int) -> int:
    return value % FIELD


def from_field(element: int) -> int:
    """A field element as the signed integer it encodes (negatives are p - |x|)."""
    return element - FIELD if element > FIELD // 2 else element


def _int8(values: Sequence[int], what: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if any(not INT8[0] <= v <= INT8[1] for v in out):
        raise ValueError(f"{what} must be int8 (-128..127)")
    return out


@dataclass(frozen=True)
class QuantizedMlp:
    """The network's int8 weights: W1 (HIDDEN x IN, row-major), b1, W2 (OUT x HIDDEN), b2."""

    weights: tuple[int, ...]  # WEIGHTS values in the circuit's order

    def __post_init__(self) -> None:
        if len(self.weights) != WEIGHTS:
            raise ValueError(f"a {IN}-{HIDDEN}-{OUT} network has {WEIGHTS} weights")
        _int8(self.weights, "weights")

    @classmethod
    def from_layers(
        cls,
        w1: npt.ArrayLike,
        b1: npt.ArrayLike,
        w2: npt.ArrayLike,
        b2: npt.ArrayLike,
    ) -> QuantizedMlp:
        parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in (w1, b1, w2, b2)]
        return cls(tuple(int(v) for v in np.concatenate(parts)))

    @classmethod
    def quantize(
        cls,
        w1: npt.ArrayLike,
        b1: npt.ArrayLike,
        w2: npt.ArrayLike,
        b2: npt.ArrayLike,
    ) -> tuple[QuantizedMlp, float]:
        """Float weights to int8 with one symmetric scale per network; (model, scale).

        One scale keeps the layers' products on one fixed-point grid: logits
        come out in units of scale^3 times the input's scale, and argmax is
        unchanged by it.
        """
        arrays = [np.asarray(p, dtype=np.float64) for p in (w1, b1, w2, b2)]
        largest = max(float(np.abs(a).max()) for a in arrays) or 1.0
        scale = largest / INT8[1]
        quantized = [np.clip(np.rint(a / scale), *INT8).astype(np.int64) for a in arrays]
        return cls.from_layers(*quantized), scale

    def layers(
        self,
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
    ]:
        w = np.asarray(self.weights, dtype=np.int64)
        w1 = w[: HIDDEN * IN].reshape(HIDDEN, IN)
        b1 = w[HIDDEN * IN : HIDDEN * IN + HIDDEN]
        w2 = w[HIDDEN * IN + HIDDEN : WEIGHTS - OUT].reshape(OUT, HIDDEN)
        b2 = w[WEIGHTS - OUT :]
        return w1, b1, w2, b2

    def infer(self, x: Sequence[int]) -> list[int]:
        """The logits, in integers, exactly as the circuit computes them."""
        inputs = np.asarray(_int8(x, "inputs"), dtype=np.int64)
        if inputs.shape != (IN,):
            raise ValueError(f"the input has {IN} values")
        w1, b1, w2, b2 = self.layers()
        hidden = np.maximum(w1 @ inputs + b1, 0)  # int64 holds |values| < 2^31 here
        return [int(v) for v in w2 @ hidden + b2]

    def weight_bytes(self) -> list[str]:
        return [str(v + 128) for v in self.weights]


WEIGHTS_FORMAT = "joynode/zk-mlp-16-16-4-int8"


class WeightsFileError(ValueError):
    """A weights file that is missing, unreadable or not a 16-16-4 int8 network."""


def save_weights(path: Path, model: QuantizedMlp, scale: float, commitment: int) -> None:
    """Write what ``joynode zk quantize`` makes; the commitment is there for people to read."""
    document = {
        "format": WEIGHTS_FORMAT,
        "weights_commitment": f"0x{commitment:064x}",
        "scale": scale,
        "weights": list(model.weights),
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def load_weights(path: Path) -> tuple[QuantizedMlp, int]:
    """The network in a weights file and the commitment the file claims for it."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsFileError(f"{path}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != WEIGHTS_FORMAT:
        raise WeightsFileError(f"{path}: not a weights file (format {WEIGHTS_FORMAT!r})")
    weights, commitment = document.get("weights"), document.get("weights_commitment")
    if not isinstance(weights, list) or not all(type(v) is int for v in weights):
        raise WeightsFileError(f"{path}: weights must be a list of integers")
    if not isinstance(commitment, str) or not commitment.startswith("0x"):
        raise WeightsFileError(f"{path}: weights_commitment must be a 0x hex string")
    try:
        return QuantizedMlp(tuple(weights)), int(commitment, 16)
    except ValueError as exc:
        raise WeightsFileError(f"{path}: {exc}") from None


def input_bytes(x: Sequence[int]) -> list[str]:
    values = _int8(x, "inputs")
    if len(values) != IN:
        raise ValueError(f"the input has {IN} values")
    return [str(v + 128) for v in values]


@dataclass(frozen=True)
class MlpProof:
    """One proven inference: the public values and the Groth16 proof (zokrates-js JSON)."""

    weights_commitment: int
    input_hash: int
    logits: tuple[int, ...]  # signed
    proof: dict[str, Any]

    @property
    def public_inputs(self) -> list[int]:
        """What the Solidity verifier's ``verifyTx`` takes as its inputs."""
        return [self.weights_commitment, self.input_hash, *(to_field(v) for v in self.logits)]


def _public(output: list[str]) -> tuple[int, int, tuple[int, ...]]:
    values = [int(v) for v in output]
    return values[0], values[1], tuple(from_field(v) for v in values[2:])


async def commitments(
    worker: ZokratesWorker, model: QuantizedMlp, x: Sequence[int], circuit: Circuit = MLP_INFERENCE
) -> tuple[int, int, tuple[int, ...]]:
    """(weights commitment, input hash, logits) as the circuit computes them, no proof."""
    result = await worker.call(
        "compute-witness",
        input=circuit.program,
        abi=circuit.abi,
        args=[model.weight_bytes(), input_bytes(x)],
    )
    return _public(result["output"])


async def input_hash(worker: ZokratesWorker, x: Sequence[int]) -> int:
    """The circuit's Poseidon hash of an input: what a paid request for a zk model carries."""
    return (await commitments(worker, QuantizedMlp((0,) * WEIGHTS), x))[1]


async def prove(
    worker: ZokratesWorker, model: QuantizedMlp, x: Sequence[int], circuit: Circuit = MLP_INFERENCE
) -> MlpProof:
    result = await worker.call(
        "prove",
        input=circuit.program,
        abi=circuit.abi,
        proving_key=circuit.proving_key,
        args=[model.weight_bytes(), input_bytes(x)],
    )
    commitment, input_hash, logits = _public(result["output"])
    return MlpProof(commitment, input_hash, logits, result["proof"])


async def verify(
    worker: ZokratesWorker, proof: dict[str, Any], circuit: Circuit = MLP_INFERENCE
) -> bool:
    result = await worker.call("verify", verification_key=circuit.verification_key, proof=proof)
    return bool(result["verified"])
