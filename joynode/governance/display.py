"""Governance for people: amounts, times, and the ``joynode gov`` output.

Text from the chain (descriptions, vote reasons) is anyone's to write, so
control characters are shown escaped, never sent to the terminal.
"""

from __future__ import annotations

import time
from typing import Any

from joynode.chain.deploy import JOY


def joy(amount: int) -> str:
    """Wei of JOY (or of votes) for people: ``40,000,000 JOY``, ``0.5 JOY``."""
    whole, rest = divmod(amount, JOY)
    fraction = f"{rest / JOY:.6f}".rstrip("0").rstrip(".")[1:] if rest else ""
    return f"{whole:,}{fraction} JOY"


def when(timestamp: int, now: float) -> str:
    """A chain time for people: ``2026-12-06 21:40:05 UTC (in 1 min 40 s)``."""
    text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    delta = round(timestamp - now)
    if delta == 0:
        return f"{text} (now)"
    span = _duration(abs(delta))
    return f"{text} ({f'in {span}' if delta > 0 else f'{span} ago'})"


def _duration(seconds: int) -> str:
    parts = [(seconds // 86400, "d"), (seconds % 86400 // 3600, "h"), (seconds % 3600 // 60, "min")]
    shown = [f"{n} {unit}" for n, unit in parts if n][:2]
    if seconds < 3600:
        shown.append(f"{seconds % 60} s")
    return " ".join(shown)


def safe(text: str) -> str:
    """``text`` with control characters (terminal escapes among them) shown escaped."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _votes_line(entry: dict[str, Any]) -> str:
    votes = entry["votes"]
    reached = "reached" if entry["quorum_reached"] else "not reached"
    return (
        f"for {joy(int(votes['for']))}, against {joy(int(votes['against']))}, "
        f"abstain {joy(int(votes['abstain']))}; quorum {joy(int(entry['quorum']))} ({reached})"
    )


def _timing(entry: dict[str, Any], now: float) -> str:
    state = entry["state"]
    if state == "Pending":
        return f"voting opens {when(entry['voting_starts'], now)}"
    if state == "Active":
        return f"voting ends {when(entry['deadline'], now)}"
    if state == "Queued" and entry["eta"]:
        return f"executable from {when(entry['eta'], now)}"
    return f"voting ended {when(entry['deadline'], now)}"


def list_lines(proposals: list[dict[str, Any]]) -> list[str]:
    """``joynode gov list``: two lines per proposal, newest first."""
    if not proposals:
        return ["no proposals yet"]
    now = time.time()
    lines = []
    for entry in proposals:
        lines.append(f"{entry['proposal_id']}  {entry['state']:<9}  {safe(entry['title'])}")
        lines.append(f"    {_votes_line(entry)}; {_timing(entry, now)}")
    return lines


def show_lines(proposal: dict[str, Any]) -> list[str]:
    """``joynode gov show``: the proposal, its actions in words, and each vote."""
    now = float(proposal["now"])
    lines = [
        f"proposal {proposal['proposal_id']}",
        f"state     {proposal['state']}; {_timing(proposal, now)}",
        f"proposer  {proposal['proposer']} (block {proposal['block']}, tx {proposal['tx']})",
        f"votes     {_votes_line(proposal)}",
        f"voting    {when(proposal['voting_starts'], now)} to {when(proposal['deadline'], now)}",
    ]
    if proposal["eta"]:
        lines.append(f"eta       {when(proposal['eta'], now)}")
    lines.append("actions")
    lines += [f"  {i}. {safe(action)}" for i, action in enumerate(proposal["actions"], 1)]
    lines.append("description")
    lines += [f"  {line}" for line in safe(proposal["description"]).splitlines()]
    lines.append(f"voters ({len(proposal['voters'])})")
    for vote in proposal["voters"]:
        reason = f": {safe(vote['reason'])}" if vote["reason"] else ""
        lines.append(f"  {vote['voter']} {vote['support']} {joy(int(vote['weight']))}{reason}")
    return lines


def status_lines(status: dict[str, Any]) -> list[str]:
    """``joynode gov status``: the DAO's settings, then this node's votes."""
    settings, votes = status["settings"], status["votes"]
    proposals = ", ".join(f"{n} {state}" for state, n in sorted(status["proposals"].items()))
    return [
        f"governor {status['governor']}, timelock {status['timelock']} (the treasury)",
        settings_line(settings),
        f"account  {status['account']}: votes {joy(int(votes['total']))} "
        f"({joy(int(votes['joy']))} from JOY, {joy(int(votes['staked']))} from stake); "
        f"JOY delegated to {status['delegates']['joy']}",
        f"proposals: {proposals or 'none'}",
    ]


def settings_line(settings: dict[str, Any]) -> str:
    return (
        f"voting delay {settings['voting_delay_s']} s, period {settings['voting_period_s']} s, "
        f"quorum {settings['quorum_percent']} % of JOY, proposal threshold "
        f"{joy(int(settings['proposal_threshold']))}, late-quorum extension "
        f"{settings['late_quorum_extension_s']} s, timelock delay {settings['timelock_delay_s']} s"
    )


def outcome_line(method: str, result: dict[str, Any]) -> str:
    """One line for a transaction a ``joynode gov`` command sent."""
    if method == "gov.delegate":
        sent = ", ".join(result["txs"]) or "nothing to send: already delegated"
        total = joy(int(result["votes"]["total"]))
        return f"votes of {result['account']} delegated to {result['delegatee']} ({total}); {sent}"
    if method == "gov.propose":
        actions = "; ".join(safe(a) for a in result["actions"])
        return (
            f"proposed {result['proposal_id']} (tx {result['tx']}): {actions}; voting opens "
            f"{when(result['voting_starts'], time.time())}"
        )
    if method == "gov.vote":
        note = f" ({result['note']})" if "note" in result else ""
        return (
            f"voted {result['support']} on {result['proposal_id']} with "
            f"{joy(int(result['weight']))} (tx {result['tx']}){note}"
        )
    if method == "gov.queue":
        return (
            f"queued {result['proposal_id']} (tx {result['tx']}); executable from "
            f"{when(result['eta'], time.time())}"
        )
    if method == "gov.dispute":
        bond = joy(int(result["bond"])) if int(result["bond"]) else "no bond (the requester)"
        return (
            f"disputed {result['request_id']} (signers {', '.join(result['signers'])}; {bond}; "
            f"tx {result['tx']}): the DAO resolves it by a proposal calling "
            "DisputeResolver.resolve"
        )
    done = {"gov.execute": "executed", "gov.cancel": "canceled"}.get(method, method)
    return f"{done} {result['proposal_id']} (tx {result['tx']})"
