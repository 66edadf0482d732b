"""The ``inference`` actor: serves the configured models with one vLLM engine each.

Requests arrive on a channel (``InferenceRequest``) and are admitted or refused
at once: unknown model, bad parameters, a prompt too long for the model, or a
full queue (``busy``) are answered with an ``InferenceFailure`` and nothing is
queued. Admitted requests run concurrently; vLLM batches them (continuous
batching). Each streams ``TokenDelta``s back and ends with an
``InferenceResult`` (all token ids, text, finish reason, timings). A requester
that closes its reply channel cancels its request inside vLLM.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from joynode import wire
from joynode.abc import ModelFetcher, ModelUnavailable
from joynode.config import InferenceSection, ModelEntry, SettingError
from joynode.control import jsonrpc
from joynode.control.jsonrpc import RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams
from joynode.inference.engine import EngineError, EngineSpec, VllmEngine
from joynode.inference.models import ModelError, model_id
from joynode.messages import (
    ChatMessage,
    ClaimScores,
    FailureCode,
    InferenceEvent,
    InferenceFailed,
    InferenceFailure,
    InferenceRequest,
    InferenceResult,
    SamplingSpec,
    ServingStatus,
    TokenDelta,
)

log = logging.getLogger(__name__)

REPLY_BUFFER = 64
EngineStarter = Callable[[EngineSpec], Awaitable[VllmEngine]]


async def start_engine(spec: EngineSpec) -> VllmEngine:
    engine = VllmEngine(spec)
    await engine.start()
    return engine


@dataclass
class LoadedModel:
    name: str
    model_id: str
    engine: VllmEngine
    owned: bool
    verification: wire.Verification = wire.REPLICATE
    inflight: int = 0

    def to_json(self) -> dict[str, object]:
        spec = self.engine.spec
        return {
            "name": self.name,
            "id": self.model_id,
            "path": str(spec.path),
            "dtype": spec.dtype,
            "max_model_len": spec.max_model_len,
            "max_num_seqs": spec.max_num_seqs,
            "inflight": self.inflight,
            "chat": bool(getattr(self.engine.tokenizer, "chat_template", None)),
            "verification": self.verification.mode,
            "state": "serving",
        }


@dataclass(frozen=True)
class RefusedModel:
    """A configured model this node does not serve, and why (``models.list`` shows it)."""

    name: str
    model_id: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "id": self.model_id, "state": "refused", "reason": self.reason}


class InferenceService:
    name = "inference"

    def __init__(
        self,
        settings: InferenceSection,
        registry: CollectorRegistry,
        requests_receive: trio.MemoryReceiveChannel[InferenceRequest],
        *,
        engines: Mapping[str, VllmEngine] | None = None,
        start: EngineStarter = start_engine,
        materialize: ModelFetcher | None = None,
    ) -> None:
        """``materialize(cid)``: the local folder of a model given by CID (the storage actor)."""
        self._settings = settings
        self._requests = requests_receive
        self._borrowed = dict(engines or {})
        self._start = start
        self._materialize = materialize
        self.models: dict[str, LoadedModel] = {}
        self.refused: dict[str, RefusedModel] = {}
        self._metrics = _InferenceMetrics(registry)

    def spec(self, path: Path) -> EngineSpec:
        s = self._settings
        return EngineSpec(
            path,
            s.dtype,
            s.device,
            s.max_num_seqs,
            s.max_model_len,
            s.kv_cache_gib,
            s.batch_invariant,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            for index, entry in enumerate(self._settings.models):
                await self._load(f"inference.models[{index}]", entry)
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for request in self._requests:
                    self._admit(request, nursery)
        finally:
            with trio.CancelScope(shield=True):
                for model in self.models.values():
                    if model.owned:
                        await model.engine.stop()

    async def _load(self, key: str, entry: ModelEntry) -> None:
        """Start serving ``entry`` (config key ``key``).

        The operator's mistakes (a folder that is not a model, one vLLM cannot
        load with these settings) stop the node with a ``SettingError``; a model
        by CID that cannot be had intact (no peer has it) is refused and the
        node serves the rest.
        """
        began = trio.current_time()
        if entry.cid is not None:
            if self._materialize is None:
                raise ModelError(f"model {entry.name} is given by CID but there is no store")
            try:
                path = await self._materialize(entry.cid)
            except ModelUnavailable as exc:
                if exc.setting is not None:
                    raise SettingError(exc.setting, f"{exc} ({key}, model {entry.name})") from None
                self.refused[entry.name] = RefusedModel(entry.name, entry.cid, str(exc))
                log.error("model %s is not served: %s", entry.name, exc)
                return
            identity = entry.cid  # the store checked the folder against it
        else:
            assert entry.path is not None  # the config allows exactly one of the two
            path = entry.path
            try:
                identity = await trio.to_thread.run_sync(model_id, path)
            except ModelError as exc:
                raise SettingError(f"{key}.path", str(exc)) from None
        borrowed = self._borrowed.get(entry.name)
        try:
            engine = borrowed or await self._start(self.spec(path))
        except EngineError as exc:
            raise SettingError(key, str(exc)) from None
        policy = wire.Verification.of(
            entry.verification, entry.margin_nats, entry.max_outside, entry.max_outside_sampled
        )
        self.models[entry.name] = LoadedModel(
            entry.name, identity, engine, borrowed is None, policy
        )
        self._metrics.capacity.labels(entry.name).set(self._settings.max_num_seqs)
        log.info("model %s ready in %.1f s: %s", entry.name, trio.current_time() - began, identity)

    def serving_status(self) -> ServingStatus:
        builds = {m.engine.build for m in self.models.values()}
        return ServingStatus(
            models=tuple(m.model_id for m in self.models.values()),
            queue_depth=sum(m.inflight for m in self.models.values()),
            capacity=self._settings.max_num_seqs * len(self.models),
            build=builds.pop() if len(builds) == 1 else None,
        )

    def model_id(self, name_or_id: str) -> str | None:
        """The id (CID) of a model this node serves, given its name or id."""
        found = self._find(name_or_id)
        return found.model_id if found is not None else None

    def verification_of(self, name_or_id: str) -> wire.Verification:
        """How committees check a model's outputs (replicate for a model not served here)."""
        found = self._find(name_or_id)
        return found.verification if found is not None else wire.REPLICATE

    def _find(self, name_or_id: str) -> LoadedModel | None:
        found = self.models.get(name_or_id)
        if found is None:
            found = next((m for m in self.models.values() if m.model_id == name_or_id), None)
        return found

    def _admit(self, request: InferenceRequest, nursery: trio.Nursery) -> None:
        model = self._find(request.model)
        if model is None:
            served = ", ".join(self.models) or "none"
            self._refuse(
                request,
                FailureCode.UNKNOWN_MODEL,
                f"unknown model {request.model!r} (serving: {served})",
            )
        elif (request.prompt is None) == (request.messages is None):
            self._refuse(request, FailureCode.INVALID_REQUEST, "give either prompt or messages")
        elif request.sampling.max_tokens > self._settings.max_tokens_limit:
            self._refuse(
                request,
                FailureCode.INVALID_REQUEST,
                f"max_tokens {request.sampling.max_tokens} is over the limit of "
                f"{self._settings.max_tokens_limit}",
            )
        elif model.inflight >= self._settings.max_queue:
            self._refuse(
                request,
                FailureCode.BUSY,
                f"{model.name} has {model.inflight} requests queued (limit "
                f"{self._settings.max_queue}); try again later",
            )
        else:
            model.inflight += 1
            self._metrics.inflight.labels(model.name).inc()
            nursery.start_soon(self._serve, request, model, trio.current_time())

    def _refuse(self, request: InferenceRequest, code: FailureCode, message: str) -> None:
        self._metrics.requests.labels(
            request.model if self._find(request.model) else "unknown", code.value
        ).inc()
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            request.reply.send_nowait(InferenceFailure(code, message))
        request.reply.close()

    async def _serve(self, request: InferenceRequest, model: LoadedModel, admitted: float) -> None:
        outcome = "cancelled"
        try:
            async with request.reply:
                try:
                    if request.teacher_forced is None:
                        outcome = await self._generate(request, model, admitted)
                    else:
                        outcome = await self._score(request, request.teacher_forced, model)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise  # the requester stopped listening
                except Exception as exc:
                    # An engine failure or a bug: the requester hears of it, the node goes on.
                    outcome = FailureCode.ENGINE_ERROR.value
                    if not isinstance(exc, EngineError):
                        log.exception("request on model %s failed", model.name)
                    else:
                        log.error("model %s failed a request: %s", model.name, exc)
                    failure = InferenceFailure(
                        FailureCode.ENGINE_ERROR, str(exc) or type(exc).__name__
                    )
                    with contextlib.suppress(trio.WouldBlock):
                        request.reply.send_nowait(failure)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            outcome = "cancelled"
        finally:
            model.inflight -= 1
            self._metrics.inflight.labels(model.name).dec()
            self._metrics.requests.labels(model.name, outcome).inc()

    async def _prompt_ids(
        self, request: InferenceRequest, model: LoadedModel, output_tokens: int
    ) -> list[int] | FailureCode:
        """The request's prompt as token ids, or the failure the requester was just told (it
        does not tokenize, is empty, or with ``output_tokens`` does not fit the model)."""
        try:
            token_ids = await trio.to_thread.run_sync(
                tokenize_request, model.engine.tokenizer, request
            )
        except Exception as exc:  # tokenizers and jinja chat templates raise many types
            reason = (
                f"{model.name} has no chat template; send a plain prompt"
                if "chat_template" in str(exc)
                else f"cannot tokenize the request: {exc}"
            )
            await request.reply.send(InferenceFailure(FailureCode.INVALID_REQUEST, reason))
            return FailureCode.INVALID_REQUEST
        limit = self._settings.max_model_len
        if not token_ids:
            await request.reply.send(InferenceFailure(FailureCode.INVALID_REQUEST, "empty prompt"))
            return FailureCode.INVALID_REQUEST
        if len(token_ids) + output_tokens > limit:
            await request.reply.send(
                InferenceFailure(
                    FailureCode.PROMPT_TOO_LONG,
                    f"prompt of {len(token_ids)} tokens plus {output_tokens} output tokens "
                    f"exceeds {model.name}'s {limit}",
                )
            )
            return FailureCode.PROMPT_TOO_LONG
        return token_ids

    async def _generate(
        self, request: InferenceRequest, model: LoadedModel, admitted: float
    ) -> str:
        token_ids = await self._prompt_ids(request, model, request.sampling.max_tokens)
        if isinstance(token_ids, FailureCode):
            return token_ids.value
        output_ids: list[int] = []
        text: list[str] = []
        first: float | None = None
        finish_reason = "unknown"
        async with model.engine.stream(token_ids, _sampling_params(request.sampling)) as outputs:
            async for output in outputs:
                completion = output.outputs[0]
                if first is None:
                    first = trio.current_time()
                delta = TokenDelta(completion.text, tuple(completion.token_ids))
                output_ids.extend(delta.token_ids)
                text.append(delta.text)
                await request.reply.send(delta)
                if output.finished:
                    finish_reason = str(completion.finish_reason)
                    break
            else:
                raise EngineError("vLLM ended the stream before the request finished")
        done = trio.current_time()
        self._metrics.tokens.labels(model.name).inc(len(output_ids))
        self._metrics.first_token.observe((first or done) - admitted)
        self._metrics.duration.observe(done - admitted)
        await request.reply.send(
            InferenceResult(
                model=model.name,
                model_id=model.model_id,
                token_ids=tuple(output_ids),
                text="".join(text),
                finish_reason=finish_reason,
                prompt_tokens=len(token_ids),
                first_token_s=round((first or done) - admitted, 6),
                total_s=round(done - admitted, 6),
            )
        )
        return "ok"

    async def _score(
        self, request: InferenceRequest, claimed: tuple[int, ...], model: LoadedModel
    ) -> str:
        """Teacher-force ``claimed`` after the prompt: one prefill pass with prompt logprobs.

        vLLM returns, for every prompt position, the logprob of the token that
        is there and of its own top-1, so one pass scores the whole claimed
        output (``ClaimScores``) with no decoding.
        """
        began = trio.current_time()
        token_ids = await self._prompt_ids(request, model, len(claimed))
        if isinstance(token_ids, FailureCode):
            return token_ids.value
        vocab = len(model.engine.tokenizer)
        if any(t >= vocab for t in claimed):
            await request.reply.send(
                InferenceFailure(FailureCode.INVALID_REQUEST, "a claimed token is not in the vocab")
            )
            return FailureCode.INVALID_REQUEST.value
        prompt_logprobs = None
        async with model.engine.stream([*token_ids, *claimed], _scoring_params()) as outputs:
            async for output in outputs:
                if output.finished:
                    prompt_logprobs = output.prompt_logprobs
                    break
        if prompt_logprobs is None:
            raise EngineError("vLLM returned no prompt logprobs")
        token_logprobs, top_logprobs, ranks = [], [], []
        for token, position in zip(claimed, prompt_logprobs[len(token_ids) :], strict=True):
            mine = position[token]
            top = next(p for p in position.values() if p.rank == 1)
            token_logprobs.append(float(mine.logprob))
            top_logprobs.append(float(top.logprob))
            ranks.append(int(mine.rank))
        stops = request.sampling.stop
        stop_index = (
            await trio.to_thread.run_sync(first_stop, model.engine.tokenizer, claimed, stops)
            if stops
            else None
        )
        await request.reply.send(
            ClaimScores(
                model=model.name,
                token_logprobs=tuple(token_logprobs),
                top_logprobs=tuple(top_logprobs),
                ranks=tuple(ranks),
                eos_token_ids=_eos_ids(model.engine.tokenizer),
                prompt_tokens=len(token_ids),
                total_s=round(trio.current_time() - began, 6),
                stop_index=stop_index,
            )
        )
        return "scored"

    def control_methods(self, client: InferenceClient) -> list[ControlMethod]:
        async def models_list(_: NoParams, __: ControlSession) -> list[dict[str, object]]:
            served = [m.to_json() for m in self.models.values()]
            return served + [m.to_json() for m in self.refused.values()]

        async def infer_local(params: InferLocalParams, session: ControlSession) -> dict[str, Any]:
            messages = tuple(params.messages) if params.messages is not None else None
            sampling = SamplingSpec(**params.model_dump(include=set(SamplingSpec.model_fields)))
            async with client.stream(params.model, params.prompt, messages, sampling) as events:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        if params.stream:
                            await session.notify(
                                "infer.delta", {"text": event.text, "token_ids": event.token_ids}
                            )
                    elif isinstance(event, InferenceFailure):
                        raise _rpc_error(event)
                    elif isinstance(event, InferenceResult):
                        return result_json(event)
            raise RpcError(jsonrpc.INTERNAL_ERROR, "inference ended without a result")

        return [
            ControlMethod(
                "models.list",
                NoParams,
                models_list,
                "Models this node serves, then those it refused (with the reason).",
            ),
            ControlMethod(
                "infer.local",
                InferLocalParams,
                infer_local,
                "Run a prompt on this node only (no consensus); stream: true "
                "sends infer.delta notifications.",
            ),
        ]


def tokenize_request(tokenizer: Any, request: InferenceRequest) -> list[int]:
    if request.messages is not None:
        ids = tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, Mapping):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(request.prompt)]


def _sampling_params(spec: SamplingSpec) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        seed=spec.seed,
        ignore_eos=spec.ignore_eos,
        stop=list(spec.stop) or None,
        output_kind=RequestOutputKind.DELTA,
    )


def _scoring_params() -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=1,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def first_stop(tokenizer: Any, token_ids: Sequence[int], stops: Sequence[str]) -> int | None:
    """The first token whose text completes one of ``stops`` (None: none does).

    Whether a prefix's text contains a stop sequence only grows with the
    prefix, so a binary search decodes about log2(n) prefixes, not n.
    """

    def stopped(n: int) -> bool:
        text = tokenizer.decode(list(token_ids[:n]), skip_special_tokens=True)
        return any(stop in text for stop in stops)

    if not token_ids or not stopped(len(token_ids)):
        return None
    low, high = 1, len(token_ids)  # stopped(high); the answer is the least such n
    while low < high:
        middle = (low + high) // 2
        if stopped(middle):
            high = middle
        else:
            low = middle + 1
    return low - 1


def _eos_ids(tokenizer: Any) -> frozenset[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(int(i) for i in ids if i is not None)


def result_json(result: InferenceResult) -> dict[str, Any]:
    generated = len(result.token_ids)
    return {
        "model": result.model,
        "model_id": result.model_id,
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "output_hash": "0x" + result.output_hash.hex(),
        "first_token_s": result.first_token_s,
        "total_s": result.total_s,
        "tokens_per_s": round(generated / result.total_s, 2) if result.total_s else None,
    }


def _rpc_error(failure: InferenceFailure) -> RpcError:
    code = {
        FailureCode.BUSY: jsonrpc.BUSY,
        FailureCode.ENGINE_ERROR: jsonrpc.INTERNAL_ERROR,
    }.get(failure.code, jsonrpc.INVALID_PARAMS)
    return RpcError(code, failure.message, {"reason": failure.code.value})


class InferLocalParams(SamplingSpec):
    model: str = pydantic.Field(min_length=1, max_length=128)
    prompt: str | None = pydantic.Field(None, max_length=1 << 20)
    messages: list[ChatMessage] | None = pydantic.Field(None, max_length=256)
    stream: bool = False


class InferenceClient:
    """How other actors and the control socket ask the inference actor for work."""

    def __init__(self, requests_send: trio.MemorySendChannel[InferenceRequest]) -> None:
        self._requests = requests_send

    @asynccontextmanager
    async def stream(
        self,
        model: str,
        prompt: str | None,
        messages: Sequence[ChatMessage] | None,
        sampling: SamplingSpec,
    ) -> AsyncIterator[trio.MemoryReceiveChannel[InferenceEvent]]:
        """Submit a request; yield its event channel. Leaving early cancels the request."""
        send, receive = trio.open_memory_channel[InferenceEvent](REPLY_BUFFER)
        request = InferenceRequest(
            model, prompt, tuple(messages) if messages is not None else None, sampling, send
        )
        async with receive:
            await self._requests.send(request)
            yield receive

    async def score(
        self,
        model: str,
        prompt: str | None,
        messages: Sequence[ChatMessage] | None,
        claimed: Sequence[int],
        stop: Sequence[str] = (),
    ) -> ClaimScores:
        """Score a claimed output with this node's model (and find where it meets a stop
        sequence); raise ``InferenceFailed`` if refused."""
        send, receive = trio.open_memory_channel[InferenceEvent](REPLY_BUFFER)
        request = InferenceRequest(
            model,
            prompt,
            tuple(messages) if messages is not None else None,
            SamplingSpec(max_tokens=max(1, len(claimed)), stop=tuple(stop)),
            send,
            teacher_forced=tuple(claimed),
        )
        async with receive:
            await self._requests.send(request)
            async for event in receive:
                if isinstance(event, ClaimScores):
                    return event
                if isinstance(event, InferenceFailure):
                    raise InferenceFailed(event)
        raise InferenceFailed(
            InferenceFailure(FailureCode.ENGINE_ERROR, "scoring ended without a result")
        )

    async def complete(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        sampling: SamplingSpec | None = None,
        on_tokens: Callable[[TokenDelta], None] | None = None,
    ) -> InferenceResult:
        """Run a request to the end (passing each ``TokenDelta`` to ``on_tokens`` as it
        comes); raise ``InferenceFailed`` if it is refused or fails."""
        async with self.stream(model, prompt, messages, sampling or SamplingSpec()) as events:
            async for event in events:
                if isinstance(event, TokenDelta) and on_tokens is not None:
                    on_tokens(event)
                elif isinstance(event, InferenceResult):
                    return event
                if isinstance(event, InferenceFailure):
                    raise InferenceFailed(event)
        raise InferenceFailed(InferenceFailure(FailureCode.ENGINE_ERROR, "no result"))


class _InferenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "joynode_inference_requests_total",
            "Inference requests",
            ["model", "outcome"],
            registry=registry,
        )
        self.tokens = Counter(
            "joynode_inference_tokens_total", "Tokens generated", ["model"], registry=registry
        )
        self.inflight = Gauge(
            "joynode_inference_inflight",
            "Requests running or waiting",
            ["model"],
            registry=registry,
        )
        self.capacity = Gauge(
            "joynode_inference_capacity",
            "Requests the engine runs at once (inference.max_num_seqs), by model",
            ["model"],
            registry=registry,
        )
        self.first_token = Histogram(
            "joynode_inference_first_token_seconds", "Admission to first token", registry=registry
        )
        self.duration = Histogram(
            "joynode_inference_request_seconds", "Admission to last token", registry=registry
        )
