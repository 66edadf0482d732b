"""Starting actors in order, recording their state, and failing fast.

The supervisor is what turns "a set of actors" into a node: each actor is
started in the node's nursery and must report readiness before the next one
starts; its state is visible to ``node.status``, ``/healthz`` and ``/metrics``;
an actor that raises is logged with its name and takes the whole node down.
A ``ConfigError`` (a ``SettingError`` from an actor that cannot use its
setting) also stops the node, but as the operator's mistake: it is passed on
as it is, without a traceback, for ``joynode run`` to print and exit 2.

An actor that keeps running without doing all of its job (the chain actor
while its RPC is unreachable) says so through ``degraded`` (wired into it by
the node): it shows as ``degraded`` with the reason, one log line marks each
change, and ``/healthz`` still answers 200, with ``"status": "degraded"``.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import trio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from joynode.abc import Actor
from joynode.config import ConfigError

log = logging.getLogger(__name__)


class ActorState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"  # running, but not doing all of its job (``error`` says why)
    STOPPED = "stopped"
    FAILED = "failed"


class ActorFailed(Exception):
    """An actor raised; the node stops. ``__cause__`` is the actor's exception."""

    def __init__(self, actor: str) -> None:
        super().__init__(f"actor {actor} failed")
        self.actor = actor


def config_error_in(exc: BaseException) -> ConfigError | None:
    """``exc`` if it is a ConfigError, or the first of an exception group made only of them.

    An actor may raise a ``SettingError`` from inside its own nursery, which
    wraps it in a group; it is still the operator's mistake, not a failure.
    """
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        settings, rest = exc.split(ConfigError)
        if settings is not None and rest is None:
            return config_error_in(settings.exceptions[0])
    return None


@dataclass
class ActorRecord:
    state: ActorState
    since: float
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"state": self.state.value, "since": self.since, "error": self.error}


@dataclass
class _Running:
    name: str
    scope: trio.CancelScope
    done: trio.Event


class Supervisor(Collector):
    def __init__(self) -> None:
        self._records: dict[str, ActorRecord] = {}
        self._problems: dict[str, str] = {}  # why each degraded actor is degraded
        self._running: list[_Running] = []
        self.started_at = time.time()

    def _set(self, name: str, state: ActorState, error: str | None = None) -> None:
        if state is ActorState.READY and name in self._problems:
            state, error = ActorState.DEGRADED, self._problems[name]
        self._records[name] = ActorRecord(state, time.time(), error)

    def degraded(self, name: str, problem: str | None) -> None:
        """Actor ``name`` runs without doing all of its job because of ``problem``; or, with
        None, does all of it again. One log line for each change."""
        before = self._problems.get(name)
        if problem is None:
            self._problems.pop(name, None)
        else:
            self._problems[name] = problem
        record = self._records.get(name)
        if record is not None and record.state in (ActorState.READY, ActorState.DEGRADED):
            self._set(name, ActorState.READY)
        if before is None and problem is not None:
            log.warning("actor %s degraded: %s", name, problem)
        elif before is not None and problem is None:
            log.info("actor %s recovered (was: %s)", name, before)

    async def start(self, nursery: trio.Nursery, actor: Actor) -> None:
        """Start ``actor`` in ``nursery`` and return once it reports ready."""
        self._set(actor.name, ActorState.STARTING)
        began = trio.current_time()
        running = _Running(actor.name, trio.CancelScope(), trio.Event())
        self._running.append(running)
        await nursery.start(self._supervise, actor, running)
        self._set(actor.name, ActorState.READY)
        log.info("actor %s ready in %.0f ms", actor.name, (trio.current_time() - began) * 1000)

    async def stop_all(self, grace_s: float) -> None:
        """Stop actors one by one, last started first, so none outlives what it uses."""
        with trio.move_on_after(grace_s) as deadline:
            for running in reversed(self._running):
                running.scope.cancel()
                await running.done.wait()
        if deadline.cancelled_caught:
            log.warning("actors did not stop within %.1f s; cancelling the rest", grace_s)

    async def _supervise(
        self,
        actor: Actor,
        running: _Running,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with running.scope:
                await actor.run(task_status=task_status)
            if not running.scope.cancelled_caught:
                # Actors run until cancelled; returning early is a bug we must not hide.
                self._set(actor.name, ActorState.FAILED, "returned unexpectedly")
                raise ActorFailed(actor.name) from RuntimeError("actor returned unexpectedly")
            self._set(actor.name, ActorState.STOPPED)
        except trio.Cancelled:
            self._set(actor.name, ActorState.STOPPED)
            raise
        except ActorFailed:
            raise
        except Exception as exc:
            if (setting := config_error_in(exc)) is not None:
                # The operator's to fix, not a bug: no traceback; the command line says it.
                self._set(actor.name, ActorState.FAILED, str(setting))
                raise setting from None
            self._set(actor.name, ActorState.FAILED, f"{type(exc).__name__}: {exc}")
            log.error("actor %s failed", actor.name, exc_info=exc)
            raise ActorFailed(actor.name) from exc
        finally:
            running.done.set()

    def health(self) -> Literal["ok", "degraded", "unavailable"]:
        """ok: every actor ready; degraded: all running, some degraded; else unavailable."""
        states = {r.state for r in self._records.values()}
        if not states or not states <= {ActorState.READY, ActorState.DEGRADED}:
            return "unavailable"
        return "degraded" if ActorState.DEGRADED in states else "ok"

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {name: record.to_json() for name, record in self._records.items()}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "joynode_actor_ready",
            "1 if the actor is running (ready or degraded), else 0",
            labels=["actor"],
        )
        degraded = GaugeMetricFamily(
            "joynode_actor_degraded",
            "1 if the actor runs but cannot do all of its job (see node.status), else 0",
            labels=["actor"],
        )
        for name, record in self._records.items():
            running = record.state in (ActorState.READY, ActorState.DEGRADED)
            ready.add_metric([name], 1.0 if running else 0.0)
            degraded.add_metric([name], 1.0 if record.state is ActorState.DEGRADED else 0.0)
        yield ready
        yield degraded
        yield GaugeMetricFamily(
            "joynode_uptime_seconds",
            "Seconds since the node started",
            value=time.time() - self.started_at,
        )
