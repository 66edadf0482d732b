"""The node: every actor, and every channel between them, wired in one place.

Reading this module shows the whole process. Actors are started in dependency
order inside one nursery (``Supervisor``); each reports ready before the next
starts. The node stops when asked (signal, ``node.shutdown``) by stopping the
actors in reverse order, so none outlives what it uses; an actor that fails
cancels the rest at once (fail-fast).

Actor graph (arrows are memory channels, named by direction and payload)::

    state      StateStore        (SQLite; others call it, it sends nothing)
    p2p        P2PService        (libp2p host, gossip, DHT, /joynet/rpc; peer table in
                                  state; heartbeats carry inference.serving_status())
    storage    StorageService    (block store on disk, Bitswap on the p2p host, DHT
                                  provider records, pins in state; serves models by CID)
    inference  InferenceService  <--InferenceRequest-- control (infer.local)
                                 --TokenDelta/InferenceResult/InferenceFailure--> requester
                                 (models given by CID come from storage.materialize_model)
    chain      ChainService      (chain.mode local/rpc: anvil or RPC, deployment, watcher ->
                                  registry mirror in state, transaction sender; tells the
                                  supervisor it is degraded while the RPC is unreachable)
    prepaid    PrepaidService    <--ChainEvent-- chain (prepaid_events_send: Settled)
                                 (clients' balances less what they owe in SQLite; settles
                                 certified prepaid jobs in batches through chain, with the
                                 members' vouchers asked over p2p (PeerRequests), and
                                 answers theirs; balance.* / prepaid.settlements on control)
    consensus  ConsensusService  <--VerifiedGossip(JobOffer)-- p2p (offers_send)
                                 <--VerifiedGossip(VoteCommit/VoteReveal)-- p2p (votes_send)
                                 <--ChainEvent-- chain (chain_events_send: settlements, refunds)
                                 --InferenceRequest--> inference; publishes offers and votes;
                                 calls chain (SettlementChain) to pay, settle, report, refund;
                                 asks prepaid (PrepaidPayments) whether a signed request is
                                 covered, hands it certified ones; jobs and votes in state;
                                 infer.submit / prepaid.quote / job.* on control
    prover     ProverService     <--ProofRequest-- control (proof.generate), zk; via ProverClient
                                 --ProofResult/ProofFailure--> requester; proofs in state
    zk         ZkInferenceService <--VerifiedGossip(ZkJob)-- p2p (zk_jobs_send)
                                 <--ChainEvent-- chain (zk_chain_events_send: requests' changes)
                                 proves through prover, calls chain (ZkMarketChain) to pay,
                                 settle (submitZkResult) and refund; publishes ZkJob (zk.infer)
    (gov.*)    GovernanceService (not an actor: the DAO's proposals from the mirror the chain
                                  watcher keeps (GovernanceMirror), transactions through chain)
    (gov.dispute) Disputes       (not an actor: certificates' signers from the watcher's
                                  events, the dispute sent through chain)
    http       HttpServer        (reads the metrics registry and the supervisor's health)
    control    ControlServer     --ShutdownRequest--> Node
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Info

from joynode import __version__, wire
from joynode.chain.service import ChainService
from joynode.chainrpc.api import rpc_api
from joynode.chainrpc.control import rpc_methods
from joynode.chainrpc.mirror import RpcMirror
from joynode.chainrpc.plans import RpcPlans
from joynode.chainrpc.service import ChainRpcService
from joynode.config import Config
from joynode.consensus.control import consensus_methods
from joynode.consensus.service import ConsensusService
from joynode.control.methods import ControlMethod, ControlSession, MethodTable, NoParams, Reply
from joynode.control.server import ControlServer
from joynode.endpoints import Endpoints
from joynode.gateway.access import ClientCheck
from joynode.gateway.answers import Answerer
from joynode.gateway.control import apikey_methods
from joynode.gateway.forwarding import LocalForwarder
from joynode.gateway.openai_api import openai_api
from joynode.gateway.wallet_api import wallet_api
from joynode.gateway.wallets import WalletSignIn
from joynode.governance.disputes import Disputes
from joynode.governance.mirror import GovernanceMirror
from joynode.governance.service import GovernanceService
from joynode.http import HttpServer
from joynode.inference.engine import VllmEngine
from joynode.inference.service import InferenceClient, InferenceService
from joynode.keys import NodeKey
from joynode.messages import ChainEvent, InferenceRequest, ServingStatus, ShutdownRequest
from joynode.p2p.gossip import JOBS, VOTES, ZK_JOBS, VerifiedGossip
from joynode.p2p.peers import PeerRecord, PeerState
from joynode.p2p.service import P2PService
from joynode.prepaid.control import prepaid_methods
from joynode.prepaid.service import PrepaidService
from joynode.secret_files import ControlToken
from joynode.signatures import OFFCHAIN_DOMAIN, SOVEREIGN_RPC_DOMAIN_NAME, Eip712Domain
from joynode.state import StateStore
from joynode.storage.gateway import ipfs_api
from joynode.storage.service import StorageService
from joynode.supervisor import Supervisor
from joynode.zk.prover import ProofRequest, ProverClient, ProverService
from joynode.zk.service import ZkInferenceService

log = logging.getLogger(__name__)

# Operators expect a stop within 5 s; actors get most of it to finish cleanly.
STOP_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class NodeIdentity:
    address: str
    peer_id: str


class Node:
    def __init__(
        self,
        config: Config,
        key: NodeKey,
        token: ControlToken,
        *,
        engines: Mapping[str, VllmEngine] | None = None,
    ) -> None:
        """``engines``: already running engines to use by model name (tests share one)."""
        self.config = config
        self.identity = NodeIdentity(key.address, key.peer_id)
        self.supervisor = Supervisor()
        self.registry = CollectorRegistry()
        self.registry.register(self.supervisor)
        Info("joynode", "Node version and identity", registry=self.registry).info(
            {"version": __version__, **vars(self.identity)}
        )

        self._shutdown_send, self._shutdown_receive = trio.open_memory_channel[ShutdownRequest](1)

        inference_send, inference_receive = trio.open_memory_channel[InferenceRequest](64)
        offers_send, offers_receive = trio.open_memory_channel[VerifiedGossip](256)
        votes_send, votes_receive = trio.open_memory_channel[VerifiedGossip](1024)
        chain_events_send, chain_events_receive = trio.open_memory_channel[ChainEvent](256)
        zk_chain_events_send, zk_chain_events_receive = trio.open_memory_channel[ChainEvent](256)
        prepaid_events_send, prepaid_events_receive = trio.open_memory_channel[ChainEvent](256)
        zk_jobs_send, zk_jobs_receive = trio.open_memory_channel[VerifiedGossip](256)
        proofs_send, proofs_receive = trio.open_memory_channel[ProofRequest](
            config.zk.max_queued_proofs
        )

        self.state = StateStore(config.node.data_dir / "state.db", __version__)
        self.p2p = P2PService(
            config.p2p,
            key,
            self.state,
            self.registry,
            self._serving_status,
            {JOBS.name: offers_send, VOTES.name: votes_send, ZK_JOBS.name: zk_jobs_send},
        )
        self.storage = StorageService(
            config.storage, config.node.data_dir, self.state, self.p2p, self.registry
        )
        self.inference = InferenceService(
            config.inference,
            self.registry,
            inference_receive,
            engines=engines,
            materialize=self.storage.materialize_model,
        )
        self.inference_client = InferenceClient(inference_send)
        self._policy_warned: set[str] = set()  # models whose config and registration differ
        self.chain = (
            ChainService(
                config.chain,
                key,
                self.state,
                self.registry,
                config.node.data_dir,
                self.inference.serving_status,
                self.p2p.listen_addrs,
                partial(self.supervisor.degraded, "chain"),
                (chain_events_send, zk_chain_events_send, prepaid_events_send),
                mirrors=(GovernanceMirror, RpcMirror),
            )
            if config.chain.mode != "off"
            else None
        )
        self.governance = (
            GovernanceService(self.state, self.chain) if self.chain is not None else None
        )
        self.disputes = Disputes(self.state, self.chain) if self.chain is not None else None
        self.prepaid = (
            PrepaidService(
                config.prepaid,
                key,
                self.state,
                self.chain,
                self.p2p,
                self.registry,
                prepaid_events_receive,
            )
            if self.chain is not None
            else None
        )
        self.consensus = ConsensusService(
            config.consensus,
            key,
            self.state,
            self.p2p,
            self.inference_client,
            self.inference.serving_status,
            self.inference.model_id,
            self._verification_of,
            self._eip712_domain,
            self.registry,
            offers_receive,
            votes_receive,
            self.chain,
            chain_events_receive if self.chain is not None else None,
            self.prepaid,
        )
        self.prover = ProverService(config.zk, self.state, self.registry, proofs_receive)
        self.prover_client = ProverClient(proofs_send)
        self.zk = ZkInferenceService(
            config.zk,
            self.state,
            self.registry,
            self.prover_client,
            self.p2p,
            zk_jobs_receive,
            self.chain,
            zk_chain_events_receive if self.chain is not None else None,
        )
        wallets = WalletSignIn(
            config.node.data_dir / "gateway-session.key",
            key.address,
            self._wallet_chain_id,
            config.http.wallet_session_s,
        )
        clients = ClientCheck(self.state, wallets, config.http.wallet_rate_per_minute)
        answerer = Answerer(
            self.consensus,
            self.inference_client,
            key,
            self.state,
            self._eip712_domain,
            self._network_model_id,
        )
        forwarder = LocalForwarder(self.p2p, answerer, self._has_room_for, self._eip712_domain)
        forwarder.register()
        self.rpc = ChainRpcService(
            config.rpc,
            self.registry,
            self.p2p,
            key,
            self._rpc_domain,
            RpcPlans(config.rpc, self.state, self.chain),
        )
        self.http = HttpServer(
            config.http,
            self.registry,
            self._health,
            self._dashboard_endpoints,
            [
                openai_api(self.state, self._network_models, answerer, clients, forwarder),
                wallet_api(wallets, clients, self.prepaid, config.http.public_host),
                rpc_api(self.rpc, clients, config.rpc.rate_per_minute),
                ipfs_api(self.storage.store, self.storage.content_cache, clients.admit),
            ],
        )
        self.control = ControlServer(
            config.control,
            token,
            MethodTable(
                [
                    *self._control_methods(),
                    *self.p2p.control_methods(),
                    *self.storage.control_methods(),
                    *self.inference.control_methods(self.inference_client),
                    *consensus_methods(self.consensus),
                    *(self.chain.control_methods() if self.chain is not None else []),
                    *(self.governance.control_methods() if self.governance is not None else []),
                    *(self.disputes.control_methods() if self.disputes is not None else []),
                    *(prepaid_methods(self.prepaid) if self.prepaid is not None else []),
                    *apikey_methods(self.state),
                    *rpc_methods(self.rpc, self.chain),
                    *self.prover.control_methods(self.prover_client),
                    *self.zk.control_methods(),
                ]
            ),
            self.registry,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        data_dir = self.config.node.data_dir
        began = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                await self.supervisor.start(nursery, self.state)
                await self.supervisor.start(nursery, self.p2p)
                await self.supervisor.start(nursery, self.storage)
                await self.supervisor.start(nursery, self.inference)
                if self.chain is not None:
                    await self.supervisor.start(nursery, self.chain)
                if self.prepaid is not None:
                    await self.supervisor.start(nursery, self.prepaid)
                await self.supervisor.start(nursery, self.consensus)
                await self.supervisor.start(nursery, self.prover)
                await self.supervisor.start(nursery, self.zk)
                if self.config.rpc.chains:
                    await self.supervisor.start(nursery, self.rpc)
                if self.config.http.enabled:
                    await self.supervisor.start(nursery, self.http)
                await self.supervisor.start(nursery, self.control)
                assert self.control.url is not None
                Endpoints(
                    os.getpid(), self.control.url, self.http.url, self.p2p.listen_addrs()
                ).write(data_dir)
                log.info(
                    "node ready in %.2f s: address %s peer %s control %s",
                    time.monotonic() - began,
                    self.identity.address,
                    self.identity.peer_id,
                    self.control.url,
                )
                task_status.started()
                request = await self._shutdown_receive.receive()
                log.info("shutting down: %s", request.reason)
                await self.supervisor.stop_all(STOP_TIMEOUT_S)
                nursery.cancel_scope.cancel()
        finally:
            Endpoints.remove(data_dir)

    async def request_shutdown(self, reason: str) -> None:
        """Ask the node to stop; later requests while it is stopping are no-ops."""
        with contextlib.suppress(trio.WouldBlock):
            self._shutdown_send.send_nowait(ShutdownRequest(reason))
        await trio.lowlevel.checkpoint()

    async def _verification_of(self, model_id: str) -> wire.Verification:
        """How committees check a model: its on-chain registration where it has one (every
        member reads the same), else this node's config (unpaid jobs on unregistered models)."""
        configured = self.inference.verification_of(model_id)
        if self.chain is None:
            return configured
        registered = await self.chain.registered_verification(model_id)
        if registered is None:
            return configured
        if registered != configured and model_id not in self._policy_warned:
            self._policy_warned.add(model_id)
            log.warning(
                "model %s is registered with %s verification; its config says %s: "
                "the registration applies",
                model_id,
                registered.describe(),
                configured.describe(),
            )
        return registered

    def _eip712_domain(self) -> Eip712Domain:
        """The chain's ProofOfInference domain, or the off-chain one without a chain."""
        if self.chain is not None and self.chain.deployment is not None:
            return self.chain.deployment.eip712_domain()
        return OFFCHAIN_DOMAIN

    def _rpc_domain(self) -> Eip712Domain:
        """The SovereignRPC contract's domain (answers to peers are signed in it), or an
        off-chain one without a chain."""
        if self.chain is not None and self.chain.deployment is not None:
            return self.chain.deployment.rpc_domain()
        return replace(OFFCHAIN_DOMAIN, name=SOVEREIGN_RPC_DOMAIN_NAME)

    def _serving_status(self) -> ServingStatus:
        """What heartbeats say: the models served, and the chains ``/rpc`` serves."""
        return replace(self.inference.serving_status(), chains=tuple(self.rpc.chain_ids))

    def _has_room_for(self, model_id: str) -> bool:
        """This node serves ``model_id`` and its engines are not full."""
        if self.inference.model_id(model_id) is None:
            return False
        status = self.inference.serving_status()
        return status.queue_depth < status.capacity

    def _wallet_chain_id(self) -> int | None:
        """The chain wallets sign in on: none before the chain actor is connected."""
        chain_id = self._eip712_domain().chain_id
        return chain_id or None

    def _health(self) -> tuple[str, dict[str, object]]:
        return self.supervisor.health(), {"actors": self.supervisor.snapshot()}

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "address": self.identity.address,
            "peer_id": self.identity.peer_id,
            "uptime_s": round(time.time() - self.supervisor.started_at, 3),
            "boot": self.state.boot,
            "health": self.supervisor.health(),
            "actors": self.supervisor.snapshot(),
        }

    def _network_models(self) -> dict[str, str]:
        """The models this node serves (name -> id) and those its up peers serve (id -> id)."""
        models = {m: m for record in self._up_peers() for m in record.models}
        models.update({name: m.model_id for name, m in self.inference.models.items()})
        return models

    def _network_model_id(self, name_or_id: str) -> str | None:
        """The id (CID) of a model this node or an up peer serves, by its name or id."""
        served = self.inference.model_id(name_or_id)
        if served is not None:
            return served
        if any(name_or_id in record.models for record in self._up_peers()):
            return name_or_id
        return None

    def _up_peers(self) -> list[PeerRecord]:
        return [r for r in self.p2p.peers.records() if r.state == PeerState.UP]

    def _dashboard_endpoints(self) -> dict[str, object]:
        return {
            "control_url": self.control.url,
            "address": self.identity.address,
            "peer_id": self.identity.peer_id,
            "version": __version__,
        }

    def _control_methods(self) -> list[ControlMethod]:
        async def node_status(_: NoParams, __: ControlSession) -> dict[str, Any]:
            return self.status()

        async def node_shutdown(_: NoParams, __: ControlSession) -> Reply:
            return Reply({"stopping": True}, lambda: self.request_shutdown("node.shutdown"))

        return [
            ControlMethod(
                "node.status",
                NoParams,
                node_status,
                "Version, identity, uptime and per-actor state.",
            ),
            ControlMethod(
                "node.shutdown", NoParams, node_shutdown, "Stop the node cleanly after answering."
            ),
        ]
