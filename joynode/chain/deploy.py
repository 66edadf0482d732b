"""Deploying JoyNet's contracts and recording where they are.

``deploy_all`` deploys the five contracts and the zk models' verifier
(``MlpInferenceVerifier``), wires their roles, and returns a
``Deployment`` (chain id, addresses, start block) that ``joynode deploy``
writes to a JSON file and nodes read. Deploying again to a chain that already
has the recorded contracts (code at every address) is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from web3 import Web3
from web3.contract import Contract

from joynode.chain.anvil import dev_account
from joynode.chain.artifacts import CONTRACTS, load_artifacts
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.signatures import Eip712Domain

log = logging.getLogger(__name__)

JOY = 10**18


@dataclass(frozen=True)
class DeployParams:
    treasury: str
    token_supply: int = 1_000_000_000 * JOY
    min_stake: int = 100 * JOY
    unbonding_delay_s: int = 7 * 24 * 3600


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    start_block: int
    deployer: str
    treasury: str
    addresses: dict[str, str]

    def eip712_domain(self) -> Eip712Domain:
        """The domain votes and certificates for this deployment are signed in."""
        return Eip712Domain(self.chain_id, self.addresses["ProofOfInference"])

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Deployment:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            chain_id=int(data["chain_id"]),
            start_block=int(data["start_block"]),
            deployer=str(data["deployer"]),
            treasury=str(data["treasury"]),
            addresses={k: str(v) for k, v in data["addresses"].items()},
        )

    def is_live_on(self, w3: Web3) -> bool:
        if int(w3.eth.chain_id) != self.chain_id:
            return False
        return all(
            len(w3.eth.get_code(Web3.to_checksum_address(self.addresses[name]))) > 0
            for name in CONTRACTS
        )

    def contract(self, w3: Web3, name: str) -> Contract:
        return w3.eth.contract(
            address=Web3.to_checksum_address(self.addresses[name]), abi=load_artifacts()[name].abi
        )


def deploy_all(sender: TransactionSender, params: DeployParams) -> Deployment:
    """Deploy and wire everything from ``sender``'s account (the admin)."""
    artifacts = load_artifacts()
    w3 = sender.w3
    admin = sender.address
    start_block = int(w3.eth.block_number)
    token, _ = sender.deploy(artifacts["JoyToken"], admin, params.token_supply)
    coordinator, _ = sender.deploy(
        artifacts["NodeCoordinator"],
        token,
        admin,
        params.treasury,
        params.min_stake,
        params.unbonding_delay_s,
    )
    proof_of_use, _ = sender.deploy(artifacts["ProofOfUse"], admin)
    marketplace, _ = sender.deploy(
        artifacts["ModelMarketplace"], token, coordinator, proof_of_use, admin, params.treasury
    )
    proof_of_inference, _ = sender.deploy(
        artifacts["ProofOfInference"], coordinator, marketplace, admin
    )
    mlp_verifier, _ = sender.deploy(artifacts["MlpInferenceVerifier"])
    deployment = Deployment(
        chain_id=int(w3.eth.chain_id),
        start_block=start_block,
        deployer=admin,
        treasury=params.treasury,
        addresses={
            "JoyToken": token,
            "NodeCoordinator": coordinator,
            "ProofOfUse": proof_of_use,
            "ModelMarketplace": marketplace,
            "ProofOfInference": proof_of_inference,
            "MlpInferenceVerifier": mlp_verifier,
        },
    )
    _grant_roles(sender, deployment)
    return deployment


def _grant_roles(sender: TransactionSender, deployment: Deployment) -> None:
    w3 = sender.w3
    coordinator = deployment.contract(w3, "NodeCoordinator")
    marketplace = deployment.contract(w3, "ModelMarketplace")
    proof_of_use = deployment.contract(w3, "ProofOfUse")
    poi = deployment.addresses["ProofOfInference"]
    grants: list[tuple[Contract, str, str]] = [
        (coordinator, "REPUTATION_ROLE", poi),
        (coordinator, "SLASHER_ROLE", poi),
        (coordinator, "DISTRIBUTOR_ROLE", deployment.addresses["ModelMarketplace"]),
        (marketplace, "SETTLER_ROLE", poi),
        (proof_of_use, "RECORDER_ROLE", deployment.addresses["ModelMarketplace"]),
    ]
    for contract, role, grantee in grants:
        role_id: Any = getattr(contract.functions, role)().call()
        sender.transact(contract.functions.grantRole(role_id, grantee))


def local_deployment(w3: Web3, path: Path) -> Deployment:
    """A local chain's deployment: the one recorded at ``path`` while it is live on ``w3``,
    else a new one by anvil's dev account 0 (treasury: dev account 1), recorded there."""
    if path.is_file():
        deployment = Deployment.read(path)
        if deployment.is_live_on(w3):
            return deployment
    log.info("deploying JoyNet contracts to the local chain")
    sender = TransactionSender(
        w3, dev_account(0), RevertDecoder(load_artifacts().contracts.values())
    )
    deployment = deploy_all(sender, DeployParams(treasury=dev_account(1).address))
    path.parent.mkdir(parents=True, exist_ok=True)
    deployment.write(path)
    return deployment
