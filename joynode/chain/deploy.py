"""Deploying JoyNet's contracts and recording where they are.

``deploy_all`` deploys JoyNet's contracts (the token, stJOY, the DAO's governor
and timelock, the contracts with state behind UUPS proxies, the zk models'
verifier), wires their roles, hands every admin role to the timelock and
renounces the deployer's, and returns a ``Deployment`` (chain id, addresses,
start block) that ``joynode deploy`` writes to a JSON file and nodes read.
Deploying again to a chain that already has the recorded contracts (code at
every address) is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract

from joynode.chain.anvil import dev_account
from joynode.chain.artifacts import CONTRACTS, load_artifacts
from joynode.chain.sender import RevertDecoder, TransactionSender
from joynode.signatures import SOVEREIGN_RPC_DOMAIN_NAME, Eip712Domain

log = logging.getLogger(__name__)

JOY = 10**18
ZERO_ADDRESS = "0x" + "00" * 20
# Every contract with an admin role: after deployment the timelock is the only admin.
ADMINISTERED = (
    "StakedJoy",
    "JoyTimelock",
    "NodeCoordinator",
    "ProofOfUse",
    "ModelMarketplace",
    "ProofOfInference",
    "DisputeResolver",
    "PrepaidInference",
    "EnhancedSovereignRPC",
)
# Contracts behind an ERC-1967 proxy (UUPS): their recorded address is the proxy's.
UPGRADEABLE = (
    "NodeCoordinator",
    "ProofOfUse",
    "ModelMarketplace",
    "ProofOfInference",
    "DisputeResolver",
    "PrepaidInference",
    "EnhancedSovereignRPC",
)
# ERC-1967's implementation slot: keccak256("eip1967.proxy.implementation") - 1.
IMPLEMENTATION_SLOT = int("360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc", 16)


DAY = 24 * 3600
DEVNET_CHAIN_ID = 31337


@dataclass(frozen=True)
class GovernanceParams:
    """The DAO's settings (JoyGovernor and JoyTimelock); every one has bounds in the contracts."""

    voting_delay_s: int
    voting_period_s: int
    proposal_threshold: int  # votes (wei of JOY) a proposer needs
    quorum_percent: int  # of JOY's total supply
    late_quorum_extension_s: int
    timelock_delay_s: int
    guardian: str = ZERO_ADDRESS  # the security council that may cancel queued proposals

    @classmethod
    def production(cls) -> GovernanceParams:
        """Compound's and Uniswap's settings, by time (docs/operator.md explains each)."""
        return cls(2 * DAY, 7 * DAY, 1_000_000 * JOY, 4, 2 * DAY, 2 * DAY)

    @classmethod
    def devnet(cls) -> GovernanceParams:
        """Short enough to watch a proposal through on a laptop."""
        return cls(1, 120, 0, 4, 30, 10)


@dataclass(frozen=True)
class DeployParams:
    token_supply: int = 1_000_000_000 * JOY
    min_stake: int = 100 * JOY
    unbonding_delay_s: int = 7 * DAY
    dispute_window_s: int = 2 * DAY
    dispute_bond: int = 100 * JOY
    dispute_resolution_s: int = 30 * DAY  # then an unresolved dispute expires
    withdrawal_delay_s: int = DAY  # a prepaid balance's, so nodes settle what it signed first
    # EnhancedSovereignRPC (SovereignRPC's providers, plans and relay accounting)
    rpc_min_deposit: int = 100 * JOY  # per provider and served chain
    rpc_unbonding_delay_s: int = 7 * DAY  # as the coordinator's
    rpc_credit_withdrawal_delay_s: int = DAY  # so providers report the calls served before
    rpc_price_per_day: int = JOY  # a subscription's
    rpc_price_per_call: int = JOY // 1000  # what pay-per-call credit is debited
    rpc_call_reward: int = JOY // 2000  # what a subscription call earns from the reward pool
    rpc_max_calls_per_report: int = 100_000
    rpc_fee_bps: int = 250  # the platform fee, as the marketplace's
    rpc_slash_bps: int = 1000  # of the deposit, for a proven wrong block claim
    rpc_bounty_bps: int = 5000  # of that slash, to whoever proved it
    governance: GovernanceParams = field(default_factory=GovernanceParams.production)

    @classmethod
    def for_chain(cls, chain_id: int) -> DeployParams:
        """Production values, or the devnet's on its chain id (where the bounds allow them)."""
        if chain_id != DEVNET_CHAIN_ID:
            return cls()
        return cls(
            unbonding_delay_s=3600,
            dispute_window_s=3600,
            withdrawal_delay_s=10,
            rpc_unbonding_delay_s=3600,
            rpc_credit_withdrawal_delay_s=10,
            governance=GovernanceParams.devnet(),
        )

    def rpc_parameters(self, treasury: str) -> tuple[Any, ...]:
        """``EnhancedSovereignRPC.Parameters``, in its field order."""
        return (
            self.rpc_min_deposit,
            self.rpc_unbonding_delay_s,
            self.rpc_credit_withdrawal_delay_s,
            self.rpc_price_per_day,
            self.rpc_price_per_call,
            self.rpc_call_reward,
            self.rpc_max_calls_per_report,
            self.rpc_fee_bps,
            self.rpc_slash_bps,
            self.rpc_bounty_bps,
            treasury,
        )


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

    def rpc_domain(self) -> Eip712Domain:
        """The domain chain RPC providers sign answers in (the SovereignRPC contract's)."""
        return Eip712Domain(
            self.chain_id,
            self.addresses["EnhancedSovereignRPC"],
            name=SOVEREIGN_RPC_DOMAIN_NAME,
        )

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
        """Whether every contract of this deployment is on ``w3``'s chain (a deployment file
        written before a contract was added is not: the devnet deploys afresh)."""
        if any(name not in self.addresses for name in CONTRACTS):
            return False
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
    """Deploy and wire everything from ``sender``'s account, then hand every power to the
    DAO: the timelock becomes the only admin of every contract and the treasury, and
    ``sender`` renounces every role it held (``admin_holders`` shows who holds what)."""
    artifacts = load_artifacts()
    w3 = sender.w3
    deployer = sender.address
    start_block = int(w3.eth.block_number)
    gov = params.governance
    token, _ = sender.deploy(artifacts["JoyToken"], deployer, params.token_supply)
    staked_joy, _ = sender.deploy(artifacts["StakedJoy"], deployer)
    timelock, _ = sender.deploy(artifacts["JoyTimelock"], gov.timelock_delay_s, [], [], deployer)
    governor, _ = sender.deploy(
        artifacts["JoyGovernor"],
        token,
        staked_joy,
        timelock,
        (
            gov.voting_delay_s,
            gov.voting_period_s,
            gov.proposal_threshold,
            gov.quorum_percent,
            gov.late_quorum_extension_s,
            gov.guardian,
        ),
    )
    coordinator = _deploy_proxy(
        sender,
        "NodeCoordinator",
        token,
        staked_joy,
        deployer,
        timelock,
        params.min_stake,
        params.unbonding_delay_s,
    )
    proof_of_use = _deploy_proxy(sender, "ProofOfUse", deployer)
    marketplace = _deploy_proxy(
        sender, "ModelMarketplace", token, coordinator, proof_of_use, deployer, timelock
    )
    proof_of_inference = _deploy_proxy(
        sender, "ProofOfInference", coordinator, marketplace, deployer
    )
    disputes = _deploy_proxy(
        sender,
        "DisputeResolver",
        token,
        proof_of_inference,
        deployer,
        params.dispute_window_s,
        params.dispute_bond,
        params.dispute_resolution_s,
    )
    prepaid = _deploy_proxy(
        sender,
        "PrepaidInference",
        token,
        coordinator,
        marketplace,
        proof_of_inference,
        proof_of_use,
        deployer,
        params.withdrawal_delay_s,
    )
    sovereign_rpc = _deploy_proxy(
        sender,
        "EnhancedSovereignRPC",
        token,
        proof_of_use,
        deployer,
        params.rpc_parameters(timelock),
    )
    mlp_verifier, _ = sender.deploy(artifacts["MlpInferenceVerifier"])
    deployment = Deployment(
        chain_id=int(w3.eth.chain_id),
        start_block=start_block,
        deployer=deployer,
        treasury=timelock,
        addresses={
            "JoyToken": token,
            "StakedJoy": staked_joy,
            "JoyTimelock": timelock,
            "JoyGovernor": governor,
            "NodeCoordinator": coordinator,
            "ProofOfUse": proof_of_use,
            "ModelMarketplace": marketplace,
            "ProofOfInference": proof_of_inference,
            "DisputeResolver": disputes,
            "PrepaidInference": prepaid,
            "EnhancedSovereignRPC": sovereign_rpc,
            "MlpInferenceVerifier": mlp_verifier,
        },
    )
    _grant_roles(sender, deployment)
    _hand_over(sender, deployment)
    return deployment


def implementation_of(w3: Web3, proxy: str) -> ChecksumAddress:
    """The implementation an upgradeable contract's proxy delegates to."""
    slot = w3.eth.get_storage_at(Web3.to_checksum_address(proxy), IMPLEMENTATION_SLOT)
    return Web3.to_checksum_address(slot[-20:])


def _deploy_proxy(sender: TransactionSender, name: str, *init_args: Any) -> str:
    """An implementation of ``name`` and an ERC-1967 proxy to it, initialized with ``init_args``."""
    artifacts = load_artifacts()
    implementation, _ = sender.deploy(artifacts[name])
    init = sender.w3.eth.contract(abi=artifacts[name].abi).encode_abi("initialize", args=init_args)
    proxy, _ = sender.deploy(artifacts["ERC1967Proxy"], implementation, init)
    return proxy


def _grant_roles(sender: TransactionSender, deployment: Deployment) -> None:
    """The roles contracts hold in each other: who settles, slashes, records, mints."""
    w3 = sender.w3
    at = deployment.addresses
    grants: list[tuple[str, str, str]] = [
        ("NodeCoordinator", "REPUTATION_ROLE", at["ProofOfInference"]),
        ("NodeCoordinator", "SLASHER_ROLE", at["ProofOfInference"]),
        ("NodeCoordinator", "SLASHER_ROLE", at["DisputeResolver"]),
        ("NodeCoordinator", "DISTRIBUTOR_ROLE", at["ModelMarketplace"]),
        ("NodeCoordinator", "REPUTATION_ROLE", at["PrepaidInference"]),
        ("NodeCoordinator", "DISTRIBUTOR_ROLE", at["PrepaidInference"]),
        ("ProofOfUse", "RECORDER_ROLE", at["PrepaidInference"]),
        ("ProofOfUse", "RECORDER_ROLE", at["EnhancedSovereignRPC"]),
        ("ModelMarketplace", "SETTLER_ROLE", at["ProofOfInference"]),
        ("ProofOfUse", "RECORDER_ROLE", at["ModelMarketplace"]),
        ("StakedJoy", "MINTER_ROLE", at["NodeCoordinator"]),
        ("JoyTimelock", "PROPOSER_ROLE", at["JoyGovernor"]),
        ("JoyTimelock", "CANCELLER_ROLE", at["JoyGovernor"]),
        # Only through the governor (whose execute anyone may call), so every execution
        # is a ProposalExecuted event the nodes' mirrors see.
        ("JoyTimelock", "EXECUTOR_ROLE", at["JoyGovernor"]),
    ]
    for name, role, grantee in grants:
        contract = deployment.contract(w3, name)
        role_id: Any = getattr(contract.functions, role)().call()
        sender.transact(contract.functions.grantRole(role_id, grantee))


def _hand_over(sender: TransactionSender, deployment: Deployment) -> None:
    """The timelock becomes every contract's admin; the deployer renounces its roles."""
    w3 = sender.w3
    timelock = deployment.addresses["JoyTimelock"]
    for name in ADMINISTERED:
        contract = deployment.contract(w3, name)
        admin_role: Any = contract.functions.DEFAULT_ADMIN_ROLE().call()
        if name != "JoyTimelock":  # the timelock administers itself from its constructor
            sender.transact(contract.functions.grantRole(admin_role, timelock))
        sender.transact(contract.functions.renounceRole(admin_role, sender.address))


def local_deployment(w3: Web3, path: Path) -> Deployment:
    """A local chain's deployment: the one recorded at ``path`` while it is live on ``w3``,
    else a new one by anvil's dev account 0, recorded there."""
    if path.is_file():
        deployment = Deployment.read(path)
        if deployment.is_live_on(w3):
            return deployment
    log.info("deploying JoyNet contracts to the local chain")
    sender = TransactionSender(
        w3, dev_account(0), RevertDecoder(load_artifacts().contracts.values())
    )
    deployment = deploy_all(sender, DeployParams.for_chain(int(w3.eth.chain_id)))
    path.parent.mkdir(parents=True, exist_ok=True)
    deployment.write(path)
    return deployment
