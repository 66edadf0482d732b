"""Typed messages that actors exchange over in-process memory channels.

Messages that cross the network live in ``joynode.wire``; these never leave the
process, so they may carry trio objects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShutdownRequest:
    """Ask the node to stop cleanly (sent by the control socket's ``node.shutdown``)."""

    reason: str


@dataclass(frozen=True)
class ServingStatus:
    """What this node serves and how busy it is, as its heartbeat tells peers."""

    models: tuple[str, ...]
    queue_depth: int
    capacity: int
