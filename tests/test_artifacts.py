"""The compiled contracts in the package match the Solidity sources and the pinned compiler."""

from __future__ import annotations

import json
from pathlib import Path

from joynode.chain.artifacts import CONTRACTS, load_artifacts, sources_hash

ROOT = Path(__file__).resolve().parent.parent


def test_artifacts_are_built_from_the_current_sources() -> None:
    artifacts = load_artifacts()
    assert sources_hash(ROOT / "contracts", artifacts) == artifacts.sources_hash, (
        "contracts/*.sol changed since joynode/chain/artifacts.json was built: run `make contracts`"
    )


def test_artifacts_come_from_the_pinned_compiler() -> None:
    lock = json.loads((ROOT / "package-lock.json").read_text())
    solc = lock["packages"]["node_modules/solc"]["version"]
    artifacts = load_artifacts()
    assert artifacts.compiler.startswith(solc + "+")
    assert artifacts.evm_version == "cancun"
    assert set(CONTRACTS) <= set(artifacts.contracts)
    assert all(len(artifacts[name].bytecode) > 2 for name in CONTRACTS)
