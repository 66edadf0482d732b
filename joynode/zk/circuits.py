"""JoyNet's ZoKrates circuits and their build: compile, Groth16 setup, Solidity verifier.

Each circuit ``circuits/<name>.zok`` builds into ``circuits/build/<name>/``
(program, ABI, proving and verification keys) and exports its verifier to
``contracts/verifiers/<Contract>.sol``, which ``contracts/build.mjs`` compiles
with the other contracts. A build is skipped when the stamp (a hash of the
sources, the zokrates-js version, ``circuits/zokrates.mjs`` and the setup
entropy) is unchanged. The exported verifiers are committed; a build from
the same sources writes them byte for byte again (the setup is deterministic
for a given entropy), and ``tests/test_artifacts.py`` fails if they and the
compiled contracts drift apart.

**Trust.** The Groth16 setup here is single-party: whoever knows its
entropy (the "toxic waste") can forge proofs for that circuit. The default
entropy is derived from the circuit's source so that the keys, and the
committed verifiers, are reproducible from the sources: fine for a local
devnet and tests, and forgeable by anyone. A real deployment sets
``JOYNODE_ZK_ENTROPY`` (a secret, then destroyed) when it builds the keys it
deploys verifiers for, or replaces this step with a multi-party ceremony.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from joynode.zk.zokrates import CLI, REPO, ZokratesWorker

CIRCUITS = REPO / "circuits"
VERIFIERS = REPO / "contracts" / "verifiers"
ENTROPY_ENV = "JOYNODE_ZK_ENTROPY"


@dataclass(frozen=True)
class Circuit:
    name: str  # file stem: circuits/<name>.zok
    contract: str  # its exported verifier's contract name

    @property
    def source(self) -> Path:
        return CIRCUITS / f"{self.name}.zok"

    @property
    def build_dir(self) -> Path:
        return CIRCUITS / "build" / self.name

    @property
    def program(self) -> Path:
        return self.build_dir / "program.out"

    @property
    def abi(self) -> Path:
        return self.build_dir / "abi.json"

    @property
    def proving_key(self) -> Path:
        return self.build_dir / "proving.key"

    @property
    def verification_key(self) -> Path:
        return self.build_dir / "verification.key"

    @property
    def verifier(self) -> Path:
        return VERIFIERS / f"{self.contract}.sol"

    def entropy(self) -> str:
        """The setup's entropy (hex): the secret one if set, else one derived from the source."""
        secret = os.environ.get(ENTROPY_ENV)
        if secret:
            return hashlib.sha256(f"{secret}:{self.name}".encode()).hexdigest()
        return hashlib.sha256(b"joynode dev setup:" + self.source.read_bytes()).hexdigest()

    def stamp(self) -> str:
        digest = hashlib.sha256()
        digest.update(_zokrates_js_version().encode())
        digest.update(CLI.read_bytes())  # how keys and verifiers are written
        digest.update(self.entropy().encode())
        for path in sorted(CIRCUITS.glob("*.zok")):  # a circuit may import another
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()

    def built(self) -> bool:
        stamp = self.build_dir / "stamp"
        return stamp.is_file() and stamp.read_text() == self.stamp()


MLP_INFERENCE = Circuit("mlp_inference", "MlpInferenceVerifier")
VOTE_COMMITMENT = Circuit("vote_commitment", "VoteCommitmentVerifier")
ALL = (MLP_INFERENCE, VOTE_COMMITMENT)


async def build(circuit: Circuit, worker: ZokratesWorker) -> bool:
    """Compile, set up and export ``circuit`` unless already built; whether it was built."""
    if circuit.built():
        return False
    circuit.build_dir.mkdir(parents=True, exist_ok=True)
    await worker.call("compile", input=circuit.source, output=circuit.program, abi=circuit.abi)
    await worker.call(
        "setup",
        input=circuit.program,
        proving_key=circuit.proving_key,
        verification_key=circuit.verification_key,
        entropy=circuit.entropy(),
    )
    VERIFIERS.mkdir(parents=True, exist_ok=True)
    await worker.call(
        "export-verifier",
        verification_key=circuit.verification_key,
        output=circuit.verifier,
        name=circuit.contract,
    )
    (circuit.build_dir / "stamp").write_text(circuit.stamp())
    return True


def _zokrates_js_version() -> str:
    package = REPO / "node_modules" / "zokrates-js" / "package.json"
    return str(json.loads(package.read_text())["version"]) if package.is_file() else "missing"
