"""The executor's tokens, passed to a requester that streams them to its client.

A job offered with ``stream`` set has its committee's first member (the one
that generates in ``prefill`` mode, and one of those that do in ``replicate``
mode) send its tokens to the requester as it makes them: ``JobTokens``
messages, straight and in order, each holding what came in ``FLUSH_S``, so
a fast engine costs a few messages a second, not one per token. The
requester keeps them on the job (``Job.streamed``) for whoever streams it; they
are not verified, and the certificate that follows is what counts.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from joynode import wire
from joynode.consensus.job import Job
from joynode.messages import TokenDelta

FLUSH_S = 0.02  # at most this long between a token and the message that carries it
TokenSink = Callable[[TokenDelta], None]


def token_sink(
    job: Job, address: str, send_only: Callable[[str, wire.Message], None]
) -> TokenRelay | TokenSink | None:
    """Where the tokens of member ``address`` go: to the requester if it asked for them
    and this member is the committee's first (the one that streams), else nowhere."""
    if not job.offer.stream or job.tally.committee[0] != address:
        return None
    if job.role != "member":  # this node asked: keep them on the job itself

        def keep(delta: TokenDelta) -> None:
            job.streamed.append((delta.token_ids, delta.text))
            job.touch()

        return keep
    requester = job.offer.requester
    return TokenRelay(job.request_id, lambda tokens: send_only(requester, tokens))


def take_tokens(job: Job, message: wire.JobTokens, sender: str) -> bool:
    """Keep the executor's tokens on a job this node streams, in order. False for stray
    ones: not from the committee's first member, or out of order."""
    if not job.offer.stream or job.status != "pending":
        return True  # (late, or never asked for: nothing to keep)
    if sender.lower() != job.tally.committee[0].lower() or message.seq != len(job.streamed):
        return False
    job.streamed.append((tuple(message.token_ids), message.text))
    job.touch()
    return True


class TokenRelay:
    """A ``TokenSink`` that sends a job's tokens to its requester in ``JobTokens``.
    Call ``flush`` once generation ends, for what came since the last message."""

    def __init__(
        self,
        request_id: bytes,
        send: Callable[[wire.JobTokens], None],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._request_id = request_id
        self._send = send
        self._clock = clock
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._seq = 0
        self._sent_at = clock()

    def __call__(self, delta: TokenDelta) -> None:
        self._token_ids.extend(delta.token_ids)
        self._text.append(delta.text)
        if self._clock() - self._sent_at >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self._token_ids and not any(self._text):
            return
        self._send(
            wire.JobTokens(self._request_id, self._seq, self._token_ids, "".join(self._text))
        )
        self._seq += 1
        self._token_ids, self._text = [], []
        self._sent_at = self._clock()
