"""The compiled contracts (ABI and bytecode) that ship inside the package.

``contracts/build.mjs`` writes ``artifacts.json`` next to this module with a
hash of the Solidity sources and compiler settings; ``sources_hash`` recomputes
it so a test fails when someone edits a contract and forgets to rebuild.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARTIFACTS = Path(__file__).with_name("artifacts.json")
CONTRACTS = (
    "JoyToken",
    "StakedJoy",
    "JoyTimelock",
    "JoyGovernor",
    "NodeCoordinator",
    "ProofOfUse",
    "ModelMarketplace",
    "ProofOfInference",
    "DisputeResolver",
    "PrepaidInference",
    "EnhancedSovereignRPC",
)


@dataclass(frozen=True)
class Compiled:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str


@dataclass(frozen=True)
class Artifacts:
    compiler: str
    evm_version: str
    optimizer_runs: int
    sources_hash: str
    contracts: dict[str, Compiled]

    def __getitem__(self, name: str) -> Compiled:
        return self.contracts[name]


@functools.cache
def load_artifacts(path: Path = ARTIFACTS) -> Artifacts:
    data = json.loads(path.read_text(encoding="utf-8"))
    return Artifacts(
        compiler=data["compiler"],
        evm_version=data["evmVersion"],
        optimizer_runs=data["optimizerRuns"],
        sources_hash=data["sourcesHash"],
        contracts={
            name: Compiled(name, entry["abi"], entry["bytecode"])
            for name, entry in data["contracts"].items()
        },
    )


def sources_hash(contracts_dir: Path, artifacts: Artifacts) -> str:
    """The hash build.mjs records, recomputed from the sources on disk."""
    digest = hashlib.sha256()
    files = [*contracts_dir.glob("*.sol"), *contracts_dir.glob("verifiers/*.sol")]
    for name, path in sorted((p.relative_to(contracts_dir).as_posix(), p) for p in files):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(
        f"solc={artifacts.compiler};evm={artifacts.evm_version};"
        f"runs={artifacts.optimizer_runs}".encode()
    )
    return digest.hexdigest()
