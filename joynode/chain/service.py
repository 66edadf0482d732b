"""The ``chain`` actor: this node's link to JoyNet's contracts.

In ``local`` mode it runs anvil with its state in the data dir, deploys the
contracts once (the deployment file in the data dir says where), funds the
node's own account and stakes and registers it, so the embedded default has a
working chain with no setup. In ``rpc`` mode it uses ``chain.rpc_url`` and the
deployment file that ``joynode deploy`` wrote. Either way it runs the watcher
(events out on each of ``events_sends``, the registry mirrored in SQLite) and the
transaction sender behind the control methods.

In ``rpc`` mode the actor is ready once it has read the deployment file, before
the RPC answers: the rest of the node runs (unpaid jobs, storage, p2p) while
the RPC is unreachable, at start or later. Meanwhile the watcher retries with
backoff (from ``chain.poll_interval_s``, doubling up to ``chain.retry_max_s``,
jittered), calls to the chain fail at once with ``ChainUnreachable`` (paid jobs
are refused with that reason; settlements and refunds in flight retry), and the
actor shows as degraded (``node.status``, ``/healthz``, ``joynode_chain_reachable``).
Each time the RPC answers again the actor first checks that it is still the
chain it followed: the deployment's chain id, the chain id the state database
recorded, and the contracts' code. A mismatch stops the node with one line
(``SettingError``, exit 2): following another chain with this database would mix
two chains' events and jobs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, cast

import pydantic
import trio
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from prometheus_client import CollectorRegistry, Counter, Gauge
from web3 import Web3
from web3.exceptions import Web3Exception
from web3.logs import DISCARD

from joynode import wire
from joynode.chain.anvil import dev_account, running_anvil
from joynode.chain.artifacts import CONTRACTS, load_artifacts
from joynode.chain.committee import SEED_EPOCH_BLOCKS, Candidate, is_recent_boundary
from joynode.chain.deploy import JOY, Deployment, local_deployment
from joynode.chain.rpc import Backoff, ChainUnreachable, RpcLink
from joynode.chain.sender import RevertDecoder, TransactionFailed, TransactionSender
from joynode.chain.watcher import ChainWatcher, MirrorFactory, RegistryMirror
from joynode.config import ChainSection, SettingError
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams
from joynode.keys import NodeKey
from joynode.messages import (
    ChainEvent,
    OnchainRequest,
    RequestStatus,
    ServingStatus,
    ZkModelInfo,
    ZkSettlement,
    model_key,
)
from joynode.state import StateStore
from joynode.storage.cid import Cid, CidError
from joynode.zk.mlp import from_field
from joynode.zk.zokrates import solidity_proof

if TYPE_CHECKING:
    from joynode.consensus.tally import Certificate, Equivocation
    from joynode.zk.mlp import MlpProof

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCAL_FUNDING_ETH = 100
LOCAL_FUNDING_JOY = 100_000
REFUND_GAS = 150_000  # ModelMarketplace.refund uses about 40k
LOCAL_START_S = 20.0  # the anvil this node runs answers within this, or is broken
STATUS_READ_S = 3.0  # chain.status waits this long for live values, then gives the last known


class ChainError(Exception):
    """The chain cannot be used as configured (no deployment, wrong chain id...)."""


MAX_JOY = 10**12  # more than the whole supply: anything above is a typo


def _address(value: str) -> str:
    if not Web3.is_address(value):
        raise ValueError(f"not an Ethereum address: {value!r}")
    return str(Web3.to_checksum_address(value))


class AmountParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    amount_joy: int = pydantic.Field(gt=0, le=MAX_JOY)


ZK_MODEL_NAME = r"^[A-Za-z0-9._-]{1,64}$"
MODEL_KINDS = {"llm": 0, "zk": 1}  # ModelMarketplace.Kind
VERIFICATION_MODES = {"replicate": 0, "prefill": 1}  # ModelMarketplace.Verification


class ModelRegistration(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    model: str = pydantic.Field(
        max_length=256, description="model id: an LLM's CID, or a zk model's name"
    )
    kind: Literal["llm", "zk"] = "llm"
    price_joy: int = pydantic.Field(ge=0, le=MAX_JOY)
    committee_size: int = pydantic.Field(3, ge=1, le=16)
    weights_commitment: str | None = pydantic.Field(
        None, pattern=r"^0x[0-9a-fA-F]{64}$", description="zk: the weights file's commitment"
    )
    verifier: Annotated[str, pydantic.AfterValidator(_address)] | None = pydantic.Field(
        None, description="zk: the verifier contract (default: the deployment's)"
    )
    royalty_recipients: list[Annotated[str, pydantic.AfterValidator(_address)]] = pydantic.Field(
        default_factory=list, max_length=8
    )
    royalty_bps: list[Annotated[int, pydantic.Field(ge=0, le=10_000)]] = pydantic.Field(
        default_factory=list, max_length=8
    )
    verification: Literal["replicate", "prefill"] = pydantic.Field(
        "replicate", description="llm: how committees check its outputs"
    )
    margin_nats: float = pydantic.Field(1.0, ge=0, le=10, description="prefill (verify calibrate)")
    max_outside: float = pydantic.Field(0.02, ge=0, le=0.2, description="prefill, greedy jobs")
    max_outside_sampled: float = pydantic.Field(0.5, ge=0, le=0.7, description="prefill, sampled")

    @pydantic.model_validator(mode="after")
    def _royalties_pair_up(self) -> ModelRegistration:
        if len(self.royalty_recipients) != len(self.royalty_bps):
            raise ValueError("royalty_recipients and royalty_bps must have the same length")
        if sum(self.royalty_bps) > 10_000:
            raise ValueError("royalty_bps add up to more than 10000 (100 %)")
        if self.kind == "llm":
            try:
                Cid.parse(self.model)
            except CidError as exc:
                raise ValueError(f"model: an LLM is registered by its CID: {exc}") from None
            if self.weights_commitment is not None or self.verifier is not None:
                raise ValueError("weights_commitment and verifier are for zk models")
        elif self.verification != "replicate":
            raise ValueError("verification is for LLMs (zk models are checked by their proof)")
        else:
            if not re.match(ZK_MODEL_NAME, self.model):
                raise ValueError("model: a zk model's name is 1-64 of A-Z a-z 0-9 . _ -")
            if self.weights_commitment is None:
                raise ValueError("a zk model needs its weights_commitment")
        return self


class ChainService:
    name = "chain"

    def __init__(
        self,
        settings: ChainSection,
        key: NodeKey,
        state: StateStore,
        registry: CollectorRegistry,
        data_dir: Path,
        serving_status: Callable[[], ServingStatus],
        listen_addrs: Callable[[], list[str]],
        degraded: Callable[[str | None], None] = lambda _: None,
        events_sends: Sequence[trio.MemorySendChannel[ChainEvent]] = (),
        mirrors: Sequence[MirrorFactory] = (),
    ) -> None:
        """``degraded``: told why the chain is unreachable, and None when it answers again.
        ``mirrors``: kept by the watcher besides the registry (the DAO's proposals)."""
        self._settings = settings
        self._key = key
        self._account: LocalAccount = Account.from_key(key.secret)
        self._state = state
        self._data_dir = data_dir
        self._serving_status = serving_status
        self._listen_addrs = listen_addrs
        self._events_sends = events_sends
        self._mirrors = mirrors
        self._limiter = trio.CapacityLimiter(1)  # one transaction at a time: ordered nonces
        self._link = RpcLink(registry, degraded)
        self.deployment: Deployment | None = None
        self._sender: TransactionSender | None = None
        self._watcher: ChainWatcher | None = None
        self._min_stake: int | None = None
        self._boundaries: dict[int, bytes] = {}  # recent epoch blocks read from the RPC
        # By boundary block hash: the mirror's addresses asked about, and the registry then.
        self._candidates_at: dict[bytes, tuple[frozenset[str], dict[str, Candidate]]] = {}
        self._contracts: dict[str, Any] = {}
        self._contracts_for: tuple[Web3, Deployment] | None = None
        self._known: dict[str, Any] = {}  # chain.status's last live values, for outages
        self._paying = trio.Lock()
        self._m_events = Counter(
            "joynode_chain_events_total",
            "Contract events applied",
            ["contract", "event", "removed"],
            registry=registry,
        )
        self._m_block = Gauge(
            "joynode_chain_processed_block", "Last block the watcher finished", registry=registry
        )
        self._m_head = Gauge(
            "joynode_chain_head_block",
            "The chain's head at the watcher's last poll (it processes up to head less "
            "chain.confirmations)",
            registry=registry,
        )
        self._m_tx = Counter(
            "joynode_chain_transactions_total", "Transactions sent", ["outcome"], registry=registry
        )

    @property
    def deployment_path(self) -> Path:
        if self._settings.mode == "local":
            return self._data_dir / "deployment.json"
        return self._settings.deployment_file

    @property
    def w3(self) -> Web3:
        return self._link.w3

    @property
    def address(self) -> str:
        """This node's account on the chain."""
        return str(self._account.address)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._chain() as url:
            self._link.open(url)
            if self._settings.mode == "local":
                await self._start_local()
            else:
                self._attach(self._read_deployment())
            task_status.started()
            await self._follow()

    @asynccontextmanager
    async def _chain(self) -> AsyncIterator[str]:
        if self._settings.mode == "local":
            async with running_anvil(state_file=self._data_dir / "anvil-state.json") as anvil:
                yield anvil.url
        else:
            yield self._settings.rpc_url

    async def _start_local(self) -> None:
        """Local mode: the anvil this node runs, its contracts, this node staked on it."""
        with trio.move_on_after(LOCAL_START_S):
            while self._link.reachable is not True:
                with contextlib.suppress(ChainUnreachable):
                    await self._link.probe()
                    break
                await trio.sleep(0.1)
        if self._link.reachable is not True:
            raise ChainError(f"the local anvil did not answer in {LOCAL_START_S:g} s")
        self._attach(await self.call(local_deployment, self.w3, self.deployment_path))
        await self._check_chain()
        await self._join_local_network()

    def _read_deployment(self) -> Deployment:
        """Mode rpc: the deployment file, read before the RPC answers (it names the domain
        votes are signed in, so the node can start without the chain)."""
        path = self.deployment_path
        if not path.is_file():
            raise SettingError(
                "chain.deployment_file", f"no file at {path}: run `joynode deploy --config ...`"
            )
        try:
            deployment = Deployment.read(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SettingError(
                "chain.deployment_file", f"{path} is not a deployment file ({exc})"
            ) from None
        wrong = [
            name
            for name in CONTRACTS
            if not Web3.is_address(deployment.addresses.get(name, "missing"))
        ]
        if wrong:
            raise SettingError(
                "chain.deployment_file", f"{path} has no valid address for {', '.join(wrong)}"
            )
        return deployment

    def _attach(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._sender = TransactionSender(
            self.w3, self._account, RevertDecoder(load_artifacts().contracts.values())
        )
        self._watcher = ChainWatcher(
            self._link,
            deployment,
            self._state,
            confirmations=self._settings.confirmations,
            block_range=self._settings.block_range,
            mirrors=[
                RegistryMirror(self._link, deployment),
                *(mirror(self._link, deployment) for mirror in self._mirrors),
            ],
        )

    async def _check_chain(self) -> None:
        """That the RPC serves the chain of the deployment file and of the state database, with
        the contracts on it; ``SettingError`` if not (the operator must choose which is right)."""
        w3, deployment = self._connected()
        path, url = self.deployment_path, self._link.url
        chain_id = await self.call(lambda: int(w3.eth.chain_id))
        if chain_id != deployment.chain_id:
            raise SettingError(
                "chain.rpc_url",
                f"{url} serves chain {chain_id}, but chain.deployment_file "
                f"{path} is for chain {deployment.chain_id}",
            )
        followed = await self._state.read(
            lambda c: c.execute("SELECT chain_id FROM chain_cursor WHERE id = 1").fetchone()
        )
        if followed is not None and int(followed[0]) != chain_id:
            raise SettingError(
                "chain.rpc_url",
                f"the state database {self._state.path} follows chain {followed[0]}, but "
                f"chain.rpc_url {url} serves chain {chain_id}: point chain.rpc_url back at "
                f"chain {followed[0]}, or give chain {chain_id} its own node.data_dir",
            )
        if not await self.call(deployment.is_live_on, w3):
            raise SettingError(
                "chain.deployment_file",
                f"the contracts of {path} are not on chain {chain_id} at "
                f"{url} (was the chain reset? `joynode deploy` deploys them again)",
            )
        coordinator = deployment.contract(w3, "NodeCoordinator")
        self._min_stake = int(await self.call(coordinator.functions.minStake().call))

    async def _follow(self) -> None:
        """Watch the chain for as long as the node runs: through outages, from the cursor.

        The RPC's identity is checked at the first contact and again after each
        outage; while it is unreachable, attempts back off up to ``chain.retry_max_s``.
        """
        assert self._watcher is not None
        assert self._sender is not None
        sender = self._sender
        backoff = Backoff(self._settings.poll_interval_s, self._settings.retry_max_s)
        checked = self._link.reachable is True  # (local mode checked it at start)
        announced = False
        while True:
            try:
                if not checked:
                    await self._link.probe()
                    await self._check_chain()
                    checked = True
                    sender.resync_nonce()  # the chain may have moved on, or gone back
                if not announced:
                    log.info(
                        "chain %d at %s: contracts of %s, events from block %d",
                        self._connected()[1].chain_id,
                        self._link.url,
                        self.deployment_path,
                        (await self._watcher.cursor()).block + 1,
                    )
                    announced = True
                events = await self._watcher.poll()
            except ChainUnreachable:
                checked = False
                await trio.sleep(backoff.next_delay())
                continue
            except (ValueError, Web3Exception) as exc:  # it answers, but with errors
                self._link.lost(f"it answers with errors: {str(exc)[:200]}")
                checked = False
                await trio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if any(event.removed for event in events):
                sender.resync_nonce()  # the transactions of the lost blocks are gone too
            for event in events:
                self._m_events.labels(event.contract, event.name, str(event.removed).lower()).inc()
                if (event.contract, event.name) == ("NodeCoordinator", "ParametersChanged"):
                    self._min_stake = None  # read again when next needed
                for events_send in self._events_sends:
                    await events_send.send(event)
            self._m_block.set((await self._watcher.cursor()).block)
            self._m_head.set(self._watcher.head)
            if not events:
                await trio.sleep(self._settings.poll_interval_s)

    async def _join_local_network(self) -> None:
        """Local mode: fund this node's account, stake, and register what it serves."""
        w3, deployment = self._connected()
        me = self._account.address
        if await self.call(w3.eth.get_balance, me) < JOY:
            await self.call(
                w3.provider.make_request,
                "anvil_setBalance",
                [me, hex(LOCAL_FUNDING_ETH * JOY)],
            )
        token = deployment.contract(w3, "JoyToken")
        coordinator = deployment.contract(w3, "NodeCoordinator")
        stake = self._settings.local_stake_joy * JOY
        if await self.call(token.functions.balanceOf(me).call) < stake:
            faucet = TransactionSender(w3, dev_account(0), RevertDecoder([]))
            await self.call(faucet.transact, token.functions.transfer(me, LOCAL_FUNDING_JOY * JOY))
        current = (await self.call(coordinator.functions.nodeInfo(me).call))[0]
        if current < stake:
            await self.transact(token.functions.approve(coordinator.address, stake - current))
            await self.transact(coordinator.functions.stake(stake - current))
        await self.register()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking web3 call, through the link (``ChainUnreachable`` while the RPC is down)."""
        return await self._link.call(fn, *args)

    async def transact(self, call: Any, gas: int | None = None) -> Any:
        assert self._sender is not None
        try:
            receipt = await self._link.call(
                partial(self._sender.transact, call, gas=gas), limiter=self._limiter
            )
        except TransactionFailed:
            self._m_tx.labels("failed").inc()
            raise
        self._m_tx.labels("ok").inc()
        return receipt

    async def register(self) -> dict[str, Any]:
        """Register (or update) this node: peer id, addresses, served models, capacity."""
        w3, deployment = self._connected()
        coordinator = deployment.contract(w3, "NodeCoordinator")
        status = self._serving_status()
        models = [model_key(m) for m in status.models]
        receipt = await self.transact(
            coordinator.functions.register(
                self._key.peer_id, self._listen_addrs()[:8], models, status.capacity
            )
        )
        return {"tx": receipt["transactionHash"].to_0x_hex(), "models": list(status.models)}

    # ---- paid inference (called by the consensus actor)

    async def request_info(self, request_id: bytes) -> OnchainRequest | None:
        """The marketplace's record of a paid request; None if there is none."""
        w3 = self._connected()[0]
        market = self.contract("ModelMarketplace")

        def read() -> OnchainRequest | None:
            model, requester, input_hash, price, deadline, status, committee = (
                market.functions.requestInfo(request_id).call()
            )
            if status == RequestStatus.NONE:
                return None
            now = max(float(w3.eth.get_block("latest")["timestamp"]), time.time())
            return OnchainRequest(
                request_id,
                bytes(model),
                str(requester),
                bytes(input_hash),
                int(price),
                int(deadline),
                RequestStatus(status),
                tuple(str(a) for a in committee),
                int(deadline) - now,
            )

        return await self.call(read)

    async def mirrored_request(self, request_id: bytes) -> OnchainRequest | None:
        """A paid request as the watcher last mirrored it (SQLite, no RPC); None if unseen.

        ``seconds_left`` is by this machine's clock: the mirror keeps no block time.
        """

        def read(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                "SELECT model, requester, input_hash, price, deadline, status, committee "
                "FROM chain_requests WHERE request_id = ?",
                ("0x" + request_id.hex(),),
            ).fetchone()
            return row

        row = await self._state.read(read)
        if row is None:
            return None
        model, requester, input_hash, price, deadline, status, committee = row
        return OnchainRequest(
            request_id,
            bytes.fromhex(str(model)[2:]),
            str(requester),
            bytes.fromhex(str(input_hash)[2:]),
            int(price),
            int(deadline),
            RequestStatus(int(status)),
            tuple(str(a) for a in json.loads(committee)),
            int(deadline) - time.time(),
        )

    async def request_inference(
        self, model_id: str, input_hash: bytes, max_price: int | None, seconds: float
    ) -> OnchainRequest:
        """Pay for an inference of ``model_id`` (escrowed by the marketplace) from this account.

        The deadline is ``seconds`` from now by the chain's clock; ``max_price``
        defaults to the model's current price. Raises ``TransactionFailed``
        with the contract's reason (unknown model, no committee, price...).
        """
        w3 = self._connected()[0]
        market = self.contract("ModelMarketplace")
        token = self.contract("JoyToken")
        key = model_key(model_id)

        def quote() -> tuple[int, int, int, bool]:
            info = market.functions.modelInfo(key).call()
            allowance = int(token.functions.allowance(self._account.address, market.address).call())
            now = max(int(w3.eth.get_block("latest")["timestamp"]), int(time.time()))
            return int(info[1]), allowance, now, info[3] == MODEL_KINDS["llm"]

        async with self._paying:  # one approve-then-request at a time: the allowance is shared
            price, allowance, now, llm = await self.call(quote)
            limit = price if max_price is None else max_price
            if allowance < limit:
                await self.transact(token.functions.approve(market.address, limit))
            receipt = await self.transact(
                market.functions.requestInference(key, input_hash, limit, now + int(seconds))
            )
        events = market.events.InferenceRequested().process_receipt(receipt, errors=DISCARD)
        request_id = bytes(events[0]["args"]["requestId"])
        if llm:
            await self.draw_committee(request_id)
        info = await self.request_info(request_id)
        assert info is not None  # it was just created
        return info

    async def draw_committee(self, request_id: bytes) -> str:
        """Draw a paid LLM request's committee (a later block than the request's); the tx.

        Raises ``TransactionFailed`` with the contract's reason (already drawn,
        not pending, too early or too late)."""
        market = self.contract("ModelMarketplace")
        receipt = await self.transact(market.functions.drawCommittee(request_id))
        return str(receipt["transactionHash"].to_0x_hex())

    async def submit_certificate(self, certificate: Certificate) -> str:
        """Hand a certificate to ``ProofOfInference``; the transaction hash."""
        proof = self.contract("ProofOfInference")
        receipt = await self.transact(
            proof.functions.submitCertificate(
                certificate.request_id,
                certificate.output_hash,
                list(certificate.signers),
                list(certificate.signatures),
            )
        )
        return str(receipt["transactionHash"].to_0x_hex())

    async def landed_signatures(self, tx_hash: str) -> dict[str, bytes] | None:
        """The signatures a ``submitCertificate`` transaction carried, by signer: how a node
        that missed the reveals still learns the certificate that landed. None if the
        transaction is not a ``submitCertificate`` call."""
        w3 = self._connected()[0]
        proof = self.contract("ProofOfInference")

        def read() -> dict[str, bytes] | None:
            tx = w3.eth.get_transaction(HexStr(tx_hash))
            if tx.get("to") != proof.address:
                return None
            try:
                function, args = proof.decode_function_input(tx["input"])
            except ValueError:
                return None
            if function.fn_name != "submitCertificate":
                return None
            return {
                Web3.to_checksum_address(signer): bytes(signature)
                for signer, signature in zip(args["signers"], args["signatures"], strict=True)
            }

        return await self.call(read)

    async def submit_zk_result(self, request_id: bytes, proven: MlpProof) -> str:
        """Settle a zk model's request with a proof of its outputs; the transaction hash."""
        proof_of_inference = self.contract("ProofOfInference")
        proof = solidity_proof(proven.proof)
        outputs = proven.public_inputs[2:]
        receipt = await self.transact(
            proof_of_inference.functions.submitZkResult(request_id, proof, outputs)
        )
        return str(receipt["transactionHash"].to_0x_hex())

    async def zk_model(self, model_id: str) -> ZkModelInfo | None:
        """A zk model's registration; None if ``model_id`` is not a registered zk model."""
        market = self.contract("ModelMarketplace")
        info = await self.call(market.functions.modelInfo(model_key(model_id)).call)
        owner, _, _, kind, active, _, commitment, verifier = info
        if int(owner, 16) == 0 or kind != MODEL_KINDS["zk"]:
            return None
        return ZkModelInfo(int.from_bytes(commitment, "big"), str(verifier), bool(active))

    async def zk_settlement(self, request_id: bytes) -> ZkSettlement | None:
        """How a zk request was settled (its ``ZkInferenceVerified`` event); None if it was not."""
        deployment = self._connected()[1]
        event = self.contract("ProofOfInference").events.ZkInferenceVerified()

        def read() -> ZkSettlement | None:
            logs = event.get_logs(
                argument_filters={"requestId": request_id}, from_block=deployment.start_block
            )
            if not logs:
                return None
            args = logs[0]["args"]
            return ZkSettlement(
                str(args["prover"]),
                tuple(from_field(int(v)) for v in args["outputs"]),
                logs[0]["transactionHash"].to_0x_hex(),
            )

        return await self.call(read)

    async def report_equivocation(self, evidence: Equivocation) -> str | None:
        """Submit two signed commits of one member as slashing evidence.

        None, sending nothing, if the member has nothing at stake (no reporter
        share, only gas: a throwaway key in a forged committee) or it was
        already reported.
        """
        proof = self.contract("ProofOfInference")
        coordinator = self.contract("NodeCoordinator")

        def worth_reporting() -> bool:
            reported = proof.functions.equivocationReported(
                evidence.member, evidence.request_id
            ).call()
            stake, unbonding = coordinator.functions.nodeInfo(evidence.member).call()[:2]
            return not reported and int(stake) + int(unbonding) > 0

        if not await self.call(worth_reporting):
            return None
        receipt = await self.transact(
            proof.functions.reportEquivocation(
                evidence.member,
                evidence.request_id,
                evidence.commitment_a,
                evidence.signature_a,
                evidence.commitment_b,
                evidence.signature_b,
            )
        )
        return str(receipt["transactionHash"].to_0x_hex())

    async def refund(self, request_id: bytes) -> str:
        """Return an unsettled request's escrow to its requester (after its deadline)."""
        market = self.contract("ModelMarketplace")
        try:
            receipt = await self.transact(market.functions.refund(request_id))
        except TransactionFailed as exc:
            if "DeadlineNotReached" not in str(exc) or time.time() <= await self._deadline_of(
                request_id
            ):
                raise
            # Estimated against a latest block older than the deadline (a chain that
            # mines on demand): the transaction itself lands in a block of now.
            receipt = await self.transact(market.functions.refund(request_id), gas=REFUND_GAS)
        return str(receipt["transactionHash"].to_0x_hex())

    async def _deadline_of(self, request_id: bytes) -> int:
        market = self.contract("ModelMarketplace")
        return int((await self.call(market.functions.requestInfo(request_id).call))[4])

    async def registered_verification(self, model_id: str) -> wire.Verification | None:
        """How the model's registration says to check its outputs (from the mirror);
        None for a model that is not registered."""
        key = "0x" + model_key(model_id).hex()

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT verification FROM registry_models WHERE model = ?", (key,)
            ).fetchone()
            return str(row[0]) if row is not None else None

        stored = await self._state.read(read)
        if stored is None:
            return None
        mode, margin, outside, sampled = json.loads(stored)
        if mode == VERIFICATION_MODES["replicate"]:
            return wire.REPLICATE
        return wire.Verification("prefill", margin, outside, sampled)

    async def seed_block(self) -> wire.BlockRef | None:
        """The latest epoch boundary block the mirror holds, while it is recent: what the
        unpaid jobs this node offers draw their committees from (None: not synced yet)."""
        assert self._watcher is not None
        cursor = (await self._watcher.cursor()).block
        row = await self._state.read(
            lambda c: c.execute(
                "SELECT number, hash FROM chain_blocks WHERE number % ? = 0 "
                "ORDER BY number DESC LIMIT 1",
                (SEED_EPOCH_BLOCKS,),
            ).fetchone()
        )
        if row is None or not is_recent_boundary(int(row[0]), cursor):
            return None
        return wire.BlockRef(int(row[0]), bytes.fromhex(str(row[1])[2:]))

    async def recent_block_hash(self, number: int) -> bytes | None:
        """The hash of block ``number`` if it may seed an unpaid committee now
        (``is_recent_boundary``): from the mirror, else read once from the RPC and kept
        (a few boundaries at most, so offers cannot make this node call the RPC
        often); None if it may not, or cannot be read."""
        assert self._watcher is not None
        if not is_recent_boundary(number, (await self._watcher.cursor()).block):
            return None
        if number in self._boundaries:
            return self._boundaries[number]
        row = await self._state.read(
            lambda c: c.execute(
                "SELECT hash FROM chain_blocks WHERE number = ?", (number,)
            ).fetchone()
        )
        if row is not None:
            return bytes.fromhex(str(row[0])[2:])
        w3, _ = self._connected()
        try:
            block = await self.call(w3.eth.get_block, number)
        except (ChainUnreachable, Web3Exception):
            return None
        for old in sorted(self._boundaries)[: max(0, len(self._boundaries) - 3)]:
            del self._boundaries[old]
        self._boundaries[number] = bytes(block["hash"])
        return self._boundaries[number]

    async def committee_candidates(self, block: wire.BlockRef) -> dict[str, Candidate]:
        """The registered nodes the unpaid and prepaid committees drawn from ``block`` (an
        epoch boundary) rank: those registered then, weighted as they were then, read from
        the chain at that block (once per boundary), so that every node ranks them alike
        whatever its mirror has applied since (reputations move with every settlement);
        and those registered since, as the mirror has them. While the RPC cannot answer
        (or has pruned that state), the mirror's rows alone."""
        current = await self.registry_candidates()
        known = await self._state.read(
            lambda c: frozenset(str(a) for (a,) in c.execute("SELECT address FROM registry_nodes"))
        )
        asked, _ = self._candidates_at.get(block.hash, (frozenset(), {}))
        if block.hash not in self._candidates_at or not known <= asked:  # the mirror grew
            try:
                at_block = await self._registry_at(block.number, sorted(known))
            except (ChainUnreachable, Web3Exception) as exc:
                log.debug("registry at block %d not readable (%s)", block.number, exc)
                return current
            for old in list(self._candidates_at)[: max(0, len(self._candidates_at) - 3)]:
                del self._candidates_at[old]
            self._candidates_at[block.hash] = (known, at_block)
        _, registered_then = self._candidates_at[block.hash]
        newcomers = {a: c for a, c in current.items() if a not in registered_then}
        return {a: c for a, c in registered_then.items() if c.stake * c.reputation > 0} | newcomers

    async def _registry_at(self, number: int, addresses: list[str]) -> dict[str, Candidate]:
        """Those of ``addresses`` registered at block ``number``, as then (stake below the
        minimum then: weight 0)."""
        coordinator = self.contract("NodeCoordinator")

        def read() -> dict[str, Candidate]:
            at = {"block_identifier": number}
            with self._link.w3.batch_requests() as batch:  # one round trip
                batch.add(coordinator.functions.minStake().call(**at))
                for address in addresses:
                    batch.add(coordinator.functions.nodeInfo(address).call(**at))
                min_stake, *infos = cast(list[Any], batch.execute())
            return {
                address: Candidate(
                    address, int(info[0]) if int(info[0]) >= int(min_stake) else 0, int(info[3])
                )
                for address, info in zip(addresses, infos, strict=True)
                if info[5]
            }

        return await self.call(read)

    async def registry_candidates(self) -> dict[str, Candidate]:
        """Registered nodes by address, weighted as the contract weighs them (from the mirror).

        Nodes below the minimum stake are left out, as ``selectCommittee`` leaves them out.
        While the RPC is down and the minimum is not known yet, any stake will do: the
        mirror still serves unpaid jobs' committees.
        """
        if self._min_stake is None:
            coordinator = self.contract("NodeCoordinator")
            with contextlib.suppress(ChainUnreachable):
                self._min_stake = int(await self.call(coordinator.functions.minStake().call))
        min_stake = 1 if self._min_stake is None else self._min_stake

        def read(conn: sqlite3.Connection) -> dict[str, Candidate]:
            rows = conn.execute(
                "SELECT address, stake, reputation FROM registry_nodes WHERE registered = 1"
            ).fetchall()
            return {
                str(address): Candidate(str(address), int(stake), int(reputation))
                for address, stake, reputation in rows
                if int(stake) >= min_stake
            }

        return await self._state.read(read)

    # ---- control

    async def status(self) -> dict[str, Any]:
        """This node on the chain. The balances, stake and head are live while the RPC answers
        (within ``STATUS_READ_S``), else the last ones read (``as_of`` says when); never
        an error, so a dashboard shows what is known through an outage."""
        w3, deployment = self._connected()
        assert self._watcher is not None
        me = self._account.address
        token = deployment.contract(w3, "JoyToken")
        coordinator = deployment.contract(w3, "NodeCoordinator")

        def read() -> dict[str, Any]:
            info = coordinator.functions.nodeInfo(me).call()
            return {
                "head": int(w3.eth.block_number),
                "eth_balance": str(w3.eth.get_balance(me)),
                "joy_balance": str(token.functions.balanceOf(me).call()),
                "stake": str(info[0]),
                "unbonding": str(info[1]),
                "unbonding_release_at": int(info[2]),
                "reputation": int(info[3]),
                "registered": bool(info[5]),
                "rewards": str(coordinator.functions.earned(me).call()),
            }

        with trio.move_on_after(STATUS_READ_S), contextlib.suppress(ChainUnreachable):
            self._known = {**await self.call(read), "as_of": time.time()}
        link = self._link
        return {
            "chain_id": deployment.chain_id,
            "rpc_url": link.url,
            "reachable": link.reachable is True,
            "reachable_changed_at": link.changed_at,
            "last_error": link.last_error,
            "address": me,
            "head": None,
            "as_of": None,
            **self._known,
            "contracts": deployment.addresses,
            "last_processed_block": (await self._watcher.cursor()).block,
            "events_applied": self._watcher.applied,
            "registered_nodes": len(await self.registry_candidates()),  # staked, from the mirror
        }

    def control_methods(self) -> list[ControlMethod]:
        async def chain_status(_: NoParams, __: ControlSession) -> dict[str, Any]:
            return await self.status()

        async def node_register(_: NoParams, __: ControlSession) -> Any:
            return await self._guarded(self.register())

        async def node_unstake(params: AmountParams, _: ControlSession) -> dict[str, Any]:
            coordinator = self.contract("NodeCoordinator")
            receipt = await self._guarded(
                self.transact(coordinator.functions.unstake(params.amount_joy * JOY))
            )
            return {"tx": receipt["transactionHash"].to_0x_hex()}

        async def models_register(params: ModelRegistration, _: ControlSession) -> dict[str, Any]:
            market = self.contract("ModelMarketplace")
            zk = params.kind == "zk"
            verifier = params.verifier or "0x" + "00" * 20
            if zk and params.verifier is None:
                addresses = self._connected()[1].addresses
                if "MlpInferenceVerifier" not in addresses:
                    raise RpcError(
                        INVALID_PARAMS, "this deployment has no MlpInferenceVerifier: give verifier"
                    )
                verifier = addresses["MlpInferenceVerifier"]
            commitment = b"\0" * 32
            if params.weights_commitment is not None:
                commitment = bytes.fromhex(params.weights_commitment[2:])
            receipt = await self._guarded(
                self.transact(
                    market.functions.registerModel(
                        params.model,
                        params.price_joy * JOY,
                        0 if zk else params.committee_size,
                        MODEL_KINDS[params.kind],
                        params.royalty_recipients,
                        params.royalty_bps,
                        commitment,
                        verifier,
                    )
                )
            )
            result = {
                "tx": receipt["transactionHash"].to_0x_hex(),
                "model": "0x" + model_key(params.model).hex(),
            }
            if params.verification != "replicate":
                policy = wire.Verification.of(
                    params.verification,
                    params.margin_nats,
                    params.max_outside,
                    params.max_outside_sampled,
                )
                receipt = await self._guarded(
                    self.transact(
                        market.functions.setVerification(
                            model_key(params.model),
                            (
                                VERIFICATION_MODES[policy.mode],
                                policy.margin_milli,
                                policy.outside_bps,
                                policy.sampled_outside_bps,
                            ),
                        )
                    )
                )
                result["verification_tx"] = receipt["transactionHash"].to_0x_hex()
            return result

        async def rewards_claim(_: NoParams, __: ControlSession) -> dict[str, Any]:
            coordinator = self.contract("NodeCoordinator")
            before = await self.call(coordinator.functions.earned(self._account.address).call)
            receipt = await self._guarded(self.transact(coordinator.functions.claimRewards()))
            return {"tx": receipt["transactionHash"].to_0x_hex(), "claimed": str(before)}

        return [
            ControlMethod(
                "chain.status",
                NoParams,
                chain_status,
                "Chain id, head, last processed block, balances, stake, reputation.",
            ),
            ControlMethod(
                "node.register", NoParams, node_register, "Register or update this node on-chain."
            ),
            ControlMethod(
                "node.unstake", AmountParams, node_unstake, "Start unbonding amount_joy of stake."
            ),
            ControlMethod(
                "models.register",
                ModelRegistration,
                models_register,
                "Register a model (by id) in the marketplace, owned by this node.",
            ),
            ControlMethod(
                "rewards.claim", NoParams, rewards_claim, "Claim signer and staking rewards."
            ),
        ]

    def _connected(self) -> tuple[Web3, Deployment]:
        if self.deployment is None:
            raise ChainError("the chain is not connected yet")
        return self.w3, self.deployment

    def contract(self, name: str) -> Any:
        w3, deployment = self._connected()
        if self._contracts_for != (w3, deployment):  # a new connection or deployment
            self._contracts_for, self._contracts = (w3, deployment), {}
        if name not in self._contracts:  # building one from its ABI costs milliseconds
            self._contracts[name] = deployment.contract(w3, name)
        return self._contracts[name]

    async def _guarded(self, action: Any) -> Any:
        try:
            return await action
        except TransactionFailed as exc:
            raise RpcError(INVALID_PARAMS, f"transaction failed: {exc}") from None
        except ChainError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
