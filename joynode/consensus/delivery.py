"""Delivering a job's messages to its followers: direct streams, in order, gossip as fallback.

Each follower (a committee member, the requester) has its own outbox: a
queue drained by one task that sends each message as a ``/joynet/rpc``
request and waits for ``Received``, so messages reach a follower in the order
they were sent (a reveal never overtakes its commit), and a follower that is
slow or gone holds up nobody else, nor the sender. A message that cannot be
delivered (no connection, refused, timed out) is published on its gossip
topic instead, once however many followers missed it; after a failure the
follower is skipped for ``BACKOFF_S`` and its messages go by gossip at once.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from collections.abc import Callable

import trio
from prometheus_client import Counter

from joynode import wire
from joynode.abc import JobTransport
from joynode.p2p.gossip import Topic
from joynode.p2p.rpc import RpcFailure

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 3.0  # one direct delivery, dial included
BACKOFF_S = 5.0  # after a failed delivery, a follower's messages go by gossip this long
IDLE_S = 30.0  # an outbox with nothing to send this long ends its task
PUBLISHED_KEPT = 4096  # fallback publishes remembered, so each goes out once
REFUSED = 402  # ErrorReply.code of a member refusing a prepaid offer (as HTTP's Payment Required)


class Delivery:
    """Outboxes per follower; ``send`` never blocks. Run ``run`` in the actor's nursery."""

    def __init__(
        self,
        network: JobTransport,
        peer_of: Callable[[str], str | None],
        sent: Counter,
    ) -> None:
        self._network = network
        self._peer_of = peer_of
        self._sent = sent
        self._outboxes: dict[str, trio.MemorySendChannel[tuple[Topic | None, wire.Message]]] = {}
        self._unreachable_until: dict[str, float] = {}
        self._published: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def send(self, followers: list[str], topic: Topic | None, message: wire.Message) -> None:
        """Queue ``message`` for each of ``followers`` (node addresses). With no ``topic``
        it goes straight or not at all (what only one follower wants: tokens)."""
        for address in followers:
            key = address.lower()
            outbox = self._outboxes.get(key)
            if outbox is None:
                outbox, inbox = trio.open_memory_channel[tuple[Topic | None, wire.Message]](
                    math.inf
                )
                self._outboxes[key] = outbox
                assert self._nursery is not None, "Delivery.run is not running"
                self._nursery.start_soon(self._drain, key, address, inbox)
            outbox.send_nowait((topic, message))

    def send_only(self, follower: str, message: wire.Message) -> None:
        """Queue ``message`` for ``follower``, straight or not at all (no gossip fallback)."""
        self.send([follower], None, message)

    async def offer_and_hear(
        self, members: list[str], topic: Topic, offer: wire.JobOffer
    ) -> dict[str, str]:
        """Send ``offer`` to each member directly and wait for each answer; the refusals
        (member -> why). For prepaid jobs, whose members refuse one the client's balance
        does not cover before running it. A member that cannot be reached gets the offer
        by gossip, and judges it the same way when it arrives."""
        refusals: dict[str, str] = {}
        unreached: list[str] = []

        async def ask(address: str) -> None:
            peer = self._peer_of(address)
            reply: wire.AnyMessage | None = None
            if peer is not None:
                try:
                    with trio.fail_after(SEND_TIMEOUT_S):
                        reply = await self._network.request(peer, offer)
                except (RpcFailure, trio.TooSlowError) as exc:
                    log.debug("offer not delivered to %s: %s", address, exc)
                except Exception as exc:  # libp2p raises many unrelated types
                    log.info("offer not delivered to %s: %r", address, exc)
            if isinstance(reply, wire.Received):
                self._sent.labels("JobOffer", "direct").inc()
            elif isinstance(reply, wire.ErrorReply) and reply.code == REFUSED:
                refusals[address] = reply.reason
            else:
                unreached.append(address)

        async with trio.open_nursery() as nursery:
            for address in members:
                nursery.start_soon(ask, address)
        if unreached:
            await self._publish(topic, offer)
        return refusals

    async def _drain(
        self,
        key: str,
        address: str,
        inbox: trio.MemoryReceiveChannel[tuple[Topic | None, wire.Message]],
    ) -> None:
        async with inbox:
            while True:
                with trio.move_on_after(IDLE_S):
                    topic, message = await inbox.receive()
                    await self._deliver(key, address, topic, message)
                    continue
                # Idle, and nothing can have been queued since the receive gave up (no
                # checkpoint in between): the next send starts a new outbox.
                del self._outboxes[key]
                return

    async def _deliver(
        self, key: str, address: str, topic: Topic | None, message: wire.Message
    ) -> None:
        kind = type(message).__name__
        peer = self._peer_of(address)
        if peer is not None and trio.current_time() >= self._unreachable_until.get(key, 0.0):
            try:
                with trio.fail_after(SEND_TIMEOUT_S):
                    reply = await self._network.request(peer, message)
                if isinstance(reply, wire.Received):
                    self._sent.labels(kind, "direct").inc()
                    return
            except (RpcFailure, trio.TooSlowError) as exc:
                log.debug("%s not delivered to %s: %s", kind, address, exc)
            except Exception as exc:  # libp2p raises many unrelated types: never the actor's end
                log.info("%s not delivered to %s: %r", kind, address, exc)
            self._unreachable_until[key] = trio.current_time() + BACKOFF_S
        if topic is None:
            self._sent.labels(kind, "dropped").inc()
            return
        await self._publish(topic, message)

    async def _publish(self, topic: Topic, message: wire.Message) -> None:
        """Gossip ``message`` once, for every follower that cannot have it directly."""
        key = hashlib.sha256(wire.encode(message)).digest()
        if key in self._published:
            return
        self._published[key] = None
        while len(self._published) > PUBLISHED_KEPT:
            self._published.popitem(last=False)
        self._sent.labels(type(message).__name__, "gossip").inc()
        try:
            await self._network.publish(topic, message)
        except Exception as exc:  # libp2p raises many unrelated types
            log.info("%s not published: %s", type(message).__name__, exc)
