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
from joynode.messages import TokenDelta

FLUSH_S = 0.02  # at most this long between a token and the message that carries it


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
