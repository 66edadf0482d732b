"""Zero-knowledge proofs: what JoyNet's ZoKrates circuits cost to build, prove and verify.

For each circuit of ``joynode.zk.circuits.ALL`` (``mlp_inference``, ``vote_commitment``):

- Build. ``compile`` and Groth16 ``setup`` (with the circuit's own dev entropy,
  ``Circuit.entropy()``, so the keys should come out byte for byte as
  ``circuits/build``'s; checked) as requests to one warm ``ZokratesWorker``, as
  ``joynode circuits build`` sends them, into a temporary folder, ``--builds``
  times each; ``circuits/build`` is only read. Constraints and the program's and
  proving key's sizes come from those replies.
- Proofs, warm: one ``ZokratesWorker`` (the node keeps one), after one warm-up
  proof, ``--proofs`` times the three steps of the ZoKrates command line as
  worker requests against the built keys: ``compute-witness`` (the witness
  written to a file), ``generate-proof`` (from that file, the proof written to
  a file) and ``verify`` (of that file); and the worker's one-step ``prove``
  (witness kept in memory, which is what ``joynode.zk.mlp.prove`` sends)
  followed by ``verify`` of the proof in memory (``joynode.zk.mlp.verify``).
- Proofs, cold: the same three steps as one-shot processes,
  ``node circuits/zokrates.mjs compute-witness|generate-proof|verify ...``,
  one per step: each pays Node's start, the wasm's instantiation and reading
  (and parsing) the program and keys. Warm and cold proofs alternate, so both
  see the same machine load.
- A fresh worker: its start (until it says "ready") and its first ``prove``,
  which reads the program and proving key that it then keeps in memory.
- On chain: on a fresh anvil (``bench.gas.fresh_anvil``), the exported verifier
  (``MlpInferenceVerifier``, ``VoteCommitmentVerifier`` from
  ``load_artifacts()``) is deployed and ``verifyTx`` is sent as a transaction
  with a proof made in this run; the figures are the receipts' ``gasUsed``
  (21 000 intrinsic gas and the calldata included). ``eth_call`` checks that
  the proof is accepted and that the same proof with its last public input
  plus one is refused.

Inputs. mlp_inference: a random int8 model and input (``QuantizedMlp``,
``input_bytes``); the circuit's logits must equal ``QuantizedMlp.infer``'s and
the proof's public inputs ``MlpProof.public_inputs``. vote_commitment: random
256-bit request id and output hash (as 128-bit halves) and a random salt; its
public ``commitment`` (Poseidon of the five values) is computed by a throwaway
circuit that returns ``poseidon([a, b, c, d, e])``, compiled into the temporary
folder and run with ``compute-witness``, so the circuit is the only Poseidon.

"ms" is wall time measured here, around a worker request or a process; "wasm"
is the time ``zokrates.mjs`` reports for the step itself (its ``ms``), without
the request's JSON round trip or the process's start. Figures are p50 over the
repetitions. zokrates-js runs single-threaded in wasm, so one proof uses one
core. Run from the repository root, with the circuits built
(``.venv/bin/joynode circuits build``)::

    .venv/bin/python -m bench.zk            # 3 builds and 8 proofs of each kind per circuit
    .venv/bin/python -m bench.zk --quick    # 1 build and 2 proofs
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from web3 import Web3

from bench.consensus import p50
from bench.gas import fresh_anvil
from joynode.chain.anvil import anvil_binary, dev_account
from joynode.chain.artifacts import load_artifacts
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.zk import mlp
from joynode.zk.circuits import ALL, MLP_INFERENCE, Circuit
from joynode.zk.mlp import FIELD, IN, WEIGHTS, QuantizedMlp
from joynode.zk.zokrates import CLI, REPO, ZokratesWorker, solidity_proof

POSEIDON5 = """\
import "hashes/poseidon/poseidon" as poseidon;

def main(field a, field b, field c, field d, field e) -> field {
    return poseidon([a, b, c, d, e]);
}
"""
CLI_STEPS = ("compute-witness", "generate-proof", "verify")
HALF = 1 << 128
NODE = shutil.which("node") or "node"  # as ZokratesWorker runs it: from PATH


# ---- measuring


@dataclass
class Steps:
    """Each step's wall and wasm ms, one entry per repetition."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    wasm: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: str, wall_ms: float, wasm_ms: float) -> None:
        self.wall.setdefault(step, []).append(wall_ms)
        self.wasm.setdefault(step, []).append(wasm_ms)

    def total(self, steps: Sequence[str]) -> list[float]:
        """Per repetition, the wall ms of ``steps`` together (one proof, end to end)."""
        return [sum(parts) for parts in zip(*(self.wall[s] for s in steps), strict=True)]

    def p50_wall(self, step: str) -> float:
        return p50(self.wall[step])

    def p50_wasm(self, step: str) -> float:
        return p50(self.wasm[step])


@dataclass
class CircuitResult:
    circuit: Circuit
    public_inputs: int = 0
    constraints: int = 0
    program_bytes: int = 0
    proving_key_bytes: int = 0
    witness_bytes: int = 0
    keys_as_built: bool = False
    build: Steps = field(default_factory=Steps)
    warm: Steps = field(default_factory=Steps)
    cold: Steps = field(default_factory=Steps)
    worker_start_ms: float = 0.0
    first_prove_ms: float = 0.0
    proof: dict[str, Any] = field(default_factory=dict)  # one proof, for the chain
    deploy_gas: int = 0
    verify_gas: int = 0
    calldata_bytes: int = 0


@dataclass(frozen=True)
class Settings:
    builds: int
    proofs: int


async def request(worker: ZokratesWorker, command: str, **options: Any) -> tuple[float, Any]:
    """One worker request: (wall ms, its result)."""
    began = time.perf_counter()
    result = await worker.call(command, **options)
    return 1000 * (time.perf_counter() - began), result


async def one_shot(command: str, *options: str) -> tuple[float, Any]:
    """One ``node circuits/zokrates.mjs`` process: (wall ms, its JSON result)."""
    began = time.perf_counter()
    done = await trio.run_process(
        [NODE, str(CLI), command, *options], capture_stdout=True, cwd=REPO
    )
    return 1000 * (time.perf_counter() - began), json.loads(done.stdout)


# ---- inputs


def mlp_case(seed: int) -> tuple[QuantizedMlp, list[int]]:
    rng = np.random.default_rng(seed)
    model = QuantizedMlp(tuple(int(v) for v in rng.integers(-128, 128, WEIGHTS)))
    return model, [int(v) for v in rng.integers(-128, 128, IN)]


async def vote_args(worker: ZokratesWorker, tmp: Path) -> list[str]:
    """Consistent vote_commitment arguments: the commitment from a throwaway Poseidon circuit."""
    source, program, abi = tmp / "poseidon5.zok", tmp / "poseidon5.out", tmp / "poseidon5.json"
    source.write_text(POSEIDON5)
    await worker.call("compile", input=source, output=program, abi=abi)
    request_id, output_hash = secrets.randbits(256), secrets.randbits(256)
    request_hi, request_lo = divmod(request_id, HALF)
    output_hi, output_lo = divmod(output_hash, HALF)
    salt = secrets.randbits(248)  # below the field's modulus
    opening = [str(v) for v in (request_hi, request_lo, output_hi, output_lo, salt)]
    result = await worker.call("compute-witness", input=program, abi=abi, args=opening)
    commitment = str(result["output"])
    return [opening[0], opening[1], commitment, opening[2], opening[3], opening[4]]


def check_output(circuit: Circuit, args: list[Any], output: Any, model: QuantizedMlp) -> None:
    if circuit is MLP_INFERENCE:
        logits = [mlp.from_field(int(v)) for v in output[2:]]
        assert logits == model.infer([int(b) - 128 for b in args[1]]), (logits, output)


# ---- one circuit


async def bench_build(
    worker: ZokratesWorker, circuit: Circuit, tmp: Path, result: CircuitResult, builds: int
) -> None:
    out = tmp / "build"
    out.mkdir()
    program, abi = out / "program.out", out / "abi.json"
    proving_key, verification_key = out / "proving.key", out / "verification.key"
    for _ in range(builds):
        wall, compiled = await request(
            worker, "compile", input=circuit.source, output=program, abi=abi
        )
        result.build.add("compile", wall, compiled["ms"])
        wall, setup = await request(
            worker,
            "setup",
            input=program,
            proving_key=proving_key,
            verification_key=verification_key,
            entropy=circuit.entropy(),
        )
        result.build.add("setup", wall, setup["ms"])
        result.constraints = int(compiled["constraints"])
        result.program_bytes = int(compiled["program_bytes"])
        result.proving_key_bytes = int(setup["proving_key_bytes"])
    result.keys_as_built = (
        proving_key.read_bytes() == circuit.proving_key.read_bytes()
        and verification_key.read_bytes() == circuit.verification_key.read_bytes()
    )
    print(
        f"{circuit.name}: {result.constraints} constraints, compile "
        f"{result.build.p50_wall('compile') / 1000:.1f} s, setup "
        f"{result.build.p50_wall('setup') / 1000:.1f} s, keys as built: {result.keys_as_built}",
        flush=True,
    )


async def warm_proof(
    worker: ZokratesWorker, circuit: Circuit, args: list[Any], tmp: Path, steps: Steps | None
) -> Any:
    """The three CLI steps as worker requests, then one-step prove + verify; the output."""
    witness, proof = tmp / "warm.witness", tmp / "warm.proof.json"
    wall, computed = await request(
        worker,
        "compute-witness",
        input=circuit.program,
        abi=circuit.abi,
        output=witness,
        args=args,
    )
    parts = [(wall, computed["ms"])]
    wall, generated = await request(
        worker,
        "generate-proof",
        input=circuit.program,
        witness=witness,
        proving_key=circuit.proving_key,
        proof=proof,
    )
    parts.append((wall, generated["ms"]))
    wall, verified = await request(
        worker, "verify", verification_key=circuit.verification_key, proof=proof
    )
    assert verified["verified"], circuit.name
    parts.append((wall, verified["ms"]))
    prove_wall, proven = await request(
        worker,
        "prove",
        input=circuit.program,
        abi=circuit.abi,
        proving_key=circuit.proving_key,
        args=args,
    )
    verify_wall, verified = await request(
        worker, "verify", verification_key=circuit.verification_key, proof=proven["proof"]
    )
    assert verified["verified"], circuit.name
    if steps is not None:
        for step, (wall, wasm) in zip(CLI_STEPS, parts, strict=True):
            steps.add(step, wall, wasm)
        steps.add("prove", prove_wall, proven["ms"])
        steps.add("verify (in memory)", verify_wall, verified["ms"])
    return computed["output"]


async def cold_proof(circuit: Circuit, args: list[Any], tmp: Path, steps: Steps) -> None:
    witness, proof = tmp / "cold.witness", tmp / "cold.proof.json"
    wall, computed = await one_shot(
        "compute-witness",
        *("-i", str(circuit.program), "-s", str(circuit.abi), "-o", str(witness)),
        *("--args", json.dumps(args)),
    )
    steps.add("compute-witness", wall, computed["ms"])
    wall, generated = await one_shot(
        "generate-proof",
        *("-i", str(circuit.program), "-w", str(witness)),
        *("-p", str(circuit.proving_key), "-j", str(proof)),
    )
    steps.add("generate-proof", wall, generated["ms"])
    wall, verified = await one_shot("verify", "-v", str(circuit.verification_key), "-j", str(proof))
    assert verified["verified"], circuit.name
    steps.add("verify", wall, verified["ms"])


async def bench_circuit(circuit: Circuit, settings: Settings) -> CircuitResult:
    result = CircuitResult(circuit)
    with tempfile.TemporaryDirectory(prefix=f"joynode-bench-zk-{circuit.name}-") as name:
        tmp = Path(name)
        async with ZokratesWorker() as worker:
            await bench_build(worker, circuit, tmp, result, settings.builds)

        model, x = mlp_case(1)
        began = time.perf_counter()
        async with ZokratesWorker() as worker:
            result.worker_start_ms = 1000 * (time.perf_counter() - began)
            args: list[Any] = (
                [model.weight_bytes(), mlp.input_bytes(x)]
                if circuit is MLP_INFERENCE
                else await vote_args(worker, tmp)
            )
            wall, first = await request(
                worker,
                "prove",
                input=circuit.program,
                abi=circuit.abi,
                proving_key=circuit.proving_key,
                args=args,
            )
            result.first_prove_ms = wall
            check_output(circuit, args, first["output"], model)
            await warm_proof(worker, circuit, args, tmp, None)  # warm-up
            for _ in range(settings.proofs):
                output = await warm_proof(worker, circuit, args, tmp, result.warm)
                check_output(circuit, args, output, model)
                await cold_proof(circuit, args, tmp, result.cold)
            result.witness_bytes = int(
                (
                    await worker.call(
                        "compute-witness", input=circuit.program, abi=circuit.abi, args=args
                    )
                )["witness_bytes"]
            )
            if circuit is MLP_INFERENCE:
                proven = await mlp.prove(worker, model, x)
                assert await mlp.verify(worker, proven.proof)
                assert proven.public_inputs == [int(v, 16) for v in proven.proof["inputs"]]
                result.proof = proven.proof
            else:
                result.proof = first["proof"]
            result.public_inputs = len(result.proof["inputs"])
    warm = p50(result.warm.total(CLI_STEPS))
    cold = p50(result.cold.total(CLI_STEPS))
    print(
        f"{circuit.name}: proof (witness + prove + verify) warm {warm:.0f} ms, "
        f"cold {cold:.0f} ms ({cold / warm:.2f}x)",
        flush=True,
    )
    return result


async def bench(settings: Settings) -> list[CircuitResult]:
    return [await bench_circuit(circuit, settings) for circuit in ALL]


# ---- on chain


def verifier_args(proof: dict[str, Any]) -> tuple[Any, list[int]]:
    return solidity_proof(proof), [int(v, 16) for v in proof["inputs"]]


def bench_gas(results: Sequence[CircuitResult]) -> None:
    artifacts = load_artifacts()
    with fresh_anvil(accounts=2) as url:
        w3 = Web3(Web3.HTTPProvider(url))
        sender = TransactionSender(w3, dev_account(0), RevertDecoder(artifacts.contracts.values()))
        for result in results:
            compiled = artifacts[result.circuit.contract]
            address, receipt = sender.deploy(compiled)
            result.deploy_gas = int(receipt["gasUsed"])
            verifier = w3.eth.contract(address=Web3.to_checksum_address(address), abi=compiled.abi)
            points, inputs = verifier_args(result.proof)
            assert verifier.functions.verifyTx(points, inputs).call() is True
            tampered = [*inputs[:-1], (inputs[-1] + 1) % FIELD]
            assert verifier.functions.verifyTx(points, tampered).call() is False
            receipt = sender.transact(verifier.functions.verifyTx(points, inputs))
            result.verify_gas = int(receipt["gasUsed"])
            sent = w3.eth.get_transaction(receipt["transactionHash"])
            result.calldata_bytes = len(sent["input"])


# ---- report


def report(results: Sequence[CircuitResult], settings: Settings) -> None:
    print()
    print(
        f"build ({settings.builds}x, worker, temp folder) and sizes; compile and setup in s "
        "(wall, p50), keys as built: the temp setup's keys equal circuits/build's"
    )
    print(
        f"{'circuit':<16} {'public':>6} {'constraints':>11} {'program MB':>10} "
        f"{'pk MB':>6} {'witness KB':>10} {'compile s':>9} {'setup s':>8} {'keys as built':>13}"
    )
    for r in results:
        print(
            f"{r.circuit.name:<16} {r.public_inputs:>6} {r.constraints:>11,} "
            f"{r.program_bytes / 1e6:>10.2f} {r.proving_key_bytes / 1e6:>6.2f} "
            f"{r.witness_bytes / 1e3:>10.1f} {r.build.p50_wall('compile') / 1000:>9.2f} "
            f"{r.build.p50_wall('setup') / 1000:>8.2f} {'yes' if r.keys_as_built else 'NO':>13}"
        )

    print()
    print(
        f"proof steps, warm worker ({settings.proofs}x after a warm-up): ms p50, wall "
        "(wasm in brackets)"
    )
    steps = (*CLI_STEPS, "prove", "verify (in memory)")
    print(f"{'circuit':<16} " + " ".join(f"{s:>22}" for s in steps))
    for r in results:
        cells = [f"{r.warm.p50_wall(s):>9.1f} ({r.warm.p50_wasm(s):>9.1f})" for s in steps]
        print(f"{r.circuit.name:<16} " + " ".join(f"{c:>22}" for c in cells))

    print()
    print("cold CLI, one process per step: ms p50, wall (wasm in brackets); start = wall - wasm")
    print(f"{'circuit':<16} " + " ".join(f"{s:>22}" for s in CLI_STEPS) + f" {'start':>8}")
    for r in results:
        cells = [f"{r.cold.p50_wall(s):>9.1f} ({r.cold.p50_wasm(s):>9.1f})" for s in CLI_STEPS]
        start = p50(
            [w - m for s in CLI_STEPS for w, m in zip(r.cold.wall[s], r.cold.wasm[s], strict=True)]
        )
        print(f"{r.circuit.name:<16} " + " ".join(f"{c:>22}" for c in cells) + f" {start:>8.1f}")

    print()
    print(
        "one proof (compute-witness + generate-proof + verify), ms p50: warm worker against "
        "cold CLI; worker prove + verify; a fresh worker's start and first prove"
    )
    print(
        f"{'circuit':<16} {'warm':>8} {'cold':>8} {'cold/warm':>9} {'prove+verify':>12} "
        f"{'cold/that':>9} {'worker start':>12} {'first prove':>11}"
    )
    for r in results:
        warm = p50(r.warm.total(CLI_STEPS))
        cold = p50(r.cold.total(CLI_STEPS))
        one_step = p50(r.warm.total(("prove", "verify (in memory)")))
        print(
            f"{r.circuit.name:<16} {warm:>8.1f} {cold:>8.1f} {cold / warm:>8.2f}x "
            f"{one_step:>12.1f} {cold / one_step:>8.2f}x {r.worker_start_ms:>12.1f} "
            f"{r.first_prove_ms:>11.1f}"
        )

    print()
    print("on chain (fresh anvil): receipts' gasUsed, 21 000 intrinsic gas and calldata included")
    print(
        f"{'contract':<24} {'public':>6} {'deploy gas':>11} {'verifyTx gas':>12} {'calldata B':>10}"
    )
    for r in results:
        print(
            f"{r.circuit.contract:<24} {r.public_inputs:>6} {r.deploy_gas:>11,} "
            f"{r.verify_gas:>12,} {r.calldata_bytes:>10}"
        )


def versions() -> str:
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True)
    anvil = subprocess.run(
        [str(anvil_binary()), "--version"], capture_output=True, text=True, check=True
    )
    package = json.loads((REPO / "node_modules" / "zokrates-js" / "package.json").read_text())
    return (
        f"node {node.stdout.strip()}, zokrates-js {package['version']}, "
        f"{anvil.stdout.splitlines()[0]}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="defaults: 1 build, 2 proofs")
    parser.add_argument("--builds", type=int, help="compiles and setups per circuit (3)")
    parser.add_argument("--proofs", type=int, help="warm and cold proofs per circuit (8)")
    args = parser.parse_args(argv)
    settings = Settings(
        builds=args.builds or (1 if args.quick else 3),
        proofs=args.proofs or (2 if args.quick else 8),
    )
    missing = [c.name for c in ALL if not c.built()]
    if missing:
        raise SystemExit(f"not built: {', '.join(missing)}; run `.venv/bin/joynode circuits build`")
    print(f"{versions()}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    began = time.perf_counter()
    results = trio.run(bench, settings)
    bench_gas(results)
    report(results, settings)
    print(f"took {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
