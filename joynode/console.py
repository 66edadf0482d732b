"""What joynode shows on a terminal: progress of long steps, and a verified inference.

The CLI and ``joynode devnet`` share these so that every long step (model
preparation, publishing, proving keys, deployment, a job's consensus) looks
the same: a rich progress line on stderr while it runs, one line when it ends.
Results meant for scripts stay on stdout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from joynode.control.client import ControlClient

stderr = Console(stderr=True, highlight=False)


class Step:
    """One long step on screen: a spinner (or a bar once ``total`` is known) and a note."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self._progress = progress
        self._task = task

    def note(self, text: str) -> None:
        self._progress.update(self._task, note=text)

    def advance_to(self, done: float, total: float | None = None) -> None:
        self._progress.update(self._task, completed=done, total=total)


@contextmanager
def step(description: str) -> Iterator[Step]:
    """Show ``description`` with a spinner and the elapsed time while the block runs."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}", style="dim"),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,  # logs and pipes get the one line at the end
    )
    began = time.monotonic()
    with progress:
        task = progress.add_task(description, total=None, note="")
        yield Step(progress, task)
    stderr.print(f"[green]✓[/green] {description} [dim]({time.monotonic() - began:.1f} s)[/dim]")


def describe_job(progress: dict[str, Any]) -> str:
    """One line for a ``job.progress`` notification: the phase the job is in."""
    committee, commits, reveals = (progress.get(k) for k in ("committee", "commits", "reveals"))
    status, payment = progress.get("status"), progress.get("payment")
    phase = f"committee of {committee}: {commits} committed, {reveals} revealed"
    if status not in (None, "pending"):
        phase += f"; {status}"
    if payment:
        phase += f"; payment {payment}"
    return phase


Payment = Literal["paid", "prepaid", "unpaid"]


async def verified_inference(
    url: str, token: str, prompt: str, model: str | None, max_tokens: int, payment: Payment
) -> dict[str, Any]:
    """Submit ``prompt`` as a verified job, show its progress, and return it once final.

    ``model`` defaults to the node's first; an instruct model (one with a chat
    template) is asked through it, as people talk to it. ``payment`` applies when
    the node is on a chain: ``paid`` escrows it in the marketplace, ``prepaid``
    signs a request against the node account's prepaid balance.
    """
    with step("verified inference") as shown:

        def on_notification(notification: dict[str, Any]) -> None:
            if notification.get("method") == "job.progress":
                shown.note(describe_job(notification.get("params") or {}))

        async with ControlClient.connect(url, token, on_notification=on_notification) as client:
            served = [m for m in await client.call("models.list") if m["state"] == "serving"]
            actors = (await client.call("node.status"))["actors"]
            if model is None and not served:
                raise ValueError("this node serves no model: give one")
            name = model or served[0]["name"]
            chat = any(m["name"] == name and m.get("chat") for m in served)
            turn = {"role": "user", "content": prompt}
            params = {
                "model": name,
                **({"messages": [turn]} if chat else {"prompt": prompt}),
                "max_tokens": max_tokens,
            }
            if "chain" in actors and payment != "unpaid":
                params[payment] = True
            submitted = await client.call("infer.submit", params)
            request_id = submitted["request_id"]
            shown.note(f"job {request_id[:14]} offered")
            job: dict[str, Any] = await client.call("job.wait", {"request_id": request_id})
    return job


def print_job(job: dict[str, Any]) -> None:
    """A finished job for people: output, certificate, settlement."""
    out = Console(highlight=False, soft_wrap=True)
    if job.get("status") != "certified":
        out.print(f"[red]job {job['request_id']} {job.get('status')}[/red]: {job.get('reason')}")
        return
    output, certificate = job.get("output") or {}, job.get("certificate") or {}
    out.print("[bold]output[/bold]      ", (output.get("text") or "(known by its hash)").strip())
    out.print("[bold]request[/bold]     ", job["request_id"])
    out.print("[bold]output hash[/bold] ", output.get("output_hash"))
    signers = certificate.get("signers") or []
    out.print(
        "[bold]certificate[/bold] ",
        f"{len(signers)} of {len(job.get('committee') or [])} signed:",
        ", ".join(str(s) for s in signers),
    )
    payment, prepaid = job.get("payment"), job.get("prepaid")
    if payment:
        out.print("[bold]settlement[/bold]  ", f"{payment.get('status')}, tx {payment.get('tx')}")
    elif prepaid:
        out.print(
            "[bold]settlement[/bold]  ",
            f"prepaid by {prepaid['client']} (nonce {prepaid['nonce']}): no transaction of its "
            "own; its committee's first-ranked member settles it in a batch",
        )
