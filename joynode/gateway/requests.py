"""The OpenAI request bodies the gateway takes, checked, and turned into one ``Ask``.

Parameters are OpenAI's (``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``n``, ``stream``,
``stream_options``, ``user``), plus JoyNet's own under ``joynet``
(``verification``: ``committee`` or ``local``; ``committee_size``). A
parameter JoyNet cannot honour (``n`` other than 1, penalties, logprobs,
tools...) is refused with a 400 naming it, never silently ignored; fields no
one knows are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from joynode import wire
from joynode.messages import MAX_STOPS, ChatMessage, SamplingSpec

# OpenAI's defaults: 16 tokens for legacy completions; chat has none (this node's cap).
DEFAULT_MAX_TOKENS = {"chat": 256, "text": 16}
# Accepted only at their neutral value: what they ask for is not implemented.
UNSUPPORTED = (
    "best_of",
    "echo",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "presence_penalty",
    "response_format",
    "suffix",
    "tool_choice",
    "tools",
    "top_logprobs",
)
NEUTRAL: tuple[Any, ...] = (None, False, 0, 0.0, "", [], {}, "auto", "none", {"type": "text"})


class BadRequest(Exception):
    """A request the gateway refuses with a 400: ``param`` names the culprit."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class JoynetOptions(pydantic.BaseModel):
    """JoyNet's extension of a request (``extra_body={"joynet": {...}}`` in OpenAI's client)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    verification: Literal["committee", "local"] = "committee"
    committee_size: int | None = pydantic.Field(None, ge=1, le=wire.MAX_COMMITTEE)


class StreamOptions(pydantic.BaseModel):
    include_usage: bool = False


class _Common(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    model: str = pydantic.Field(min_length=1, max_length=128)
    max_tokens: int | None = pydantic.Field(None, ge=1, le=wire.MAX_OUTPUT_TOKENS)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1, le=wire.MAX_OUTPUT_TOKENS)
    temperature: float | None = pydantic.Field(None, ge=0.0, le=2.0)
    top_p: float | None = pydantic.Field(None, gt=0.0, le=1.0)
    seed: int | None = pydantic.Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = pydantic.Field(None, max_length=256)
    joynet: JoynetOptions = pydantic.Field(default_factory=JoynetOptions)


class ContentPart(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatTurn(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatTurn] = pydantic.Field(min_length=1, max_length=64)


class CompletionRequest(_Common):
    prompt: str | list[str]


@dataclass(frozen=True)
class Ask:
    """One request, whichever endpoint it came by, as the gateway runs it."""

    chat: bool
    model: str  # as the client named it
    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    sampling: SamplingSpec
    verification: Literal["committee", "local"]
    committee_size: int | None
    stream: bool
    include_usage: bool


def ask_of(body: ChatCompletionRequest | CompletionRequest) -> Ask:
    """The request as the gateway runs it; ``BadRequest`` for what it cannot honour."""
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        if name in extra and extra[name] not in NEUTRAL:
            raise BadRequest(f"'{name}' is not supported by JoyNet", name, "unsupported_parameter")
    if body.n not in (None, 1):
        raise BadRequest("only n = 1 is supported: send one request per answer", "n")
    chat = isinstance(body, ChatCompletionRequest)
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    if isinstance(body, ChatCompletionRequest):
        messages = tuple(_message(turn) for turn in body.messages)
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise BadRequest("send exactly one prompt per request", "prompt")
        prompt = prompts[0]
        if not prompt or len(prompt) > wire.MAX_PROMPT_CHARS:
            raise BadRequest(
                f"the prompt must have 1 to {wire.MAX_PROMPT_CHARS} characters", "prompt"
            )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or not all(0 < len(s) <= 64 for s in stops):
        raise BadRequest(f"at most {MAX_STOPS} stop sequences of 1 to 64 characters", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    seed = body.seed
    if temperature > 0 and seed is None:
        # Committees agree on a sampled output only under one seed: draw it here, and say
        # which in the answer, so that the client can repeat the request exactly.
        seed = secrets.randbits(63)
    sampling = SamplingSpec(
        max_tokens=body.max_completion_tokens
        or body.max_tokens
        or DEFAULT_MAX_TOKENS["chat" if chat else "text"],
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=seed,
        stop=tuple(stops),
    )
    return Ask(
        chat=chat,
        model=body.model,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        verification=body.joynet.verification,
        committee_size=body.joynet.committee_size,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def _message(turn: ChatTurn) -> ChatMessage:
    content = (
        turn.content
        if isinstance(turn.content, str)
        else "".join(part.text for part in turn.content)
    )
    if len(content) > wire.MAX_PROMPT_CHARS:
        raise BadRequest(f"a message is longer than {wire.MAX_PROMPT_CHARS} characters", "messages")
    role = "system" if turn.role == "developer" else turn.role
    return ChatMessage.model_validate({"role": role, "content": content})
