"""The interfaces the node is built from, in one place."""

from __future__ import annotations

from typing import Protocol

import trio


class Actor(Protocol):
    """A long-running service of the node.

    ``run`` calls ``task_status.started()`` once the actor can do its job (its
    sockets listen, its database is open) and then runs until cancelled. An
    exception out of ``run`` means the actor is broken and stops the node.
    """

    @property
    def name(self) -> str: ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...
