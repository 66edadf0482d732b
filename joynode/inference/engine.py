"""One vLLM ``AsyncLLM`` engine per model, driven from trio.

vLLM is asyncio code. Each engine lives on an asyncio loop in a daemon thread
of its own; trio submits work with ``asyncio.run_coroutine_threadsafe`` and
receives each ``RequestOutput`` delta through a trio memory channel
(``trio.from_thread``). Leaving the ``stream`` context early (the caller was
cancelled or stopped reading) cancels the asyncio side, which aborts the
request inside vLLM so it stops using batch slots. (``trio-asyncio`` does not
work with vLLM.)

vLLM reads its settings from the environment when it is imported, so
``configure_environment`` runs first: offline (no hub, no usage stats), bound
to 127.0.0.1, its logs through ours, OpenMP threads that sleep when idle.
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set, yet vLLM 0.32's ``AsyncLLM``
still starts its engine core as a child process (``VLLM::EngineCore``, by
fork on CPU, by spawn once CUDA is up), so whatever starts an engine needs an
``if __name__ == "__main__":`` guard. That
child must not outlive the node, which may be killed with SIGKILL: its entry
point is wrapped so that it first asks the kernel for SIGKILL when its parent
thread, the engine's asyncio thread, ends (``joynode.tether``). That thread
lives until the engine is stopped, and ends with the node's process.

``stop`` has a deadline: vLLM's shutdown gives the engine core a short grace
after SIGTERM, then kills it; if vLLM itself does not return in time, ``stop``
returns anyway (the engine core still dies with the node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

from joynode.config import Dtype
from joynode.tether import die_with_parent

log = logging.getLogger(__name__)

T = TypeVar("T")

VLLM_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CONFIGURE_LOGGING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# vLLM's grace for its engine core after SIGTERM, then SIGKILL; and our deadline for it all.
ENGINE_CORE_GRACE_S = 2.0
STOP_TIMEOUT_S = 3.0

_vllm_run_engine_core: Any = None  # vLLM's engine core entry point, once wrapped


class EngineError(Exception):
    """The engine could not start, or failed while serving."""


def configure_environment(kv_cache_gib: float, batch_invariant: bool = False) -> None:
    """Set vLLM's environment before it is first imported (idempotent).

    OpenMP threads wait passively (unless the operator chose otherwise): vLLM's
    CPU backend otherwise keeps them spinning between forward passes, and the
    engines of one machine, pinned to the same cores, starve each other; a
    prefill verifier then costs as much CPU as generation (docs/benchmarks.md).
    The setting is read when torch loads, so it must be set before that.
    """
    os.environ.update(VLLM_ENVIRONMENT)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if batch_invariant:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gib)))


@dataclass(frozen=True)
class EngineSpec:
    path: Path
    dtype: Dtype
    device: Literal["auto", "cpu", "cuda"]
    max_num_seqs: int
    max_model_len: int
    kv_cache_gib: float
    batch_invariant: bool = False


def installed_device() -> str:
    """What the installed vLLM build runs on: ``cpu`` (vllm-cpu) or ``cuda``."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def exact_build(dtype: str) -> str:
    """What two engines must share for their outputs to be bit-identical in batch-invariant
    mode: the GPU model, the vLLM and torch versions, the dtype."""
    import torch
    import vllm

    return (
        f"cuda {torch.cuda.get_device_name(0)}; vllm {vllm.__version__}; "
        f"torch {torch.__version__}; {dtype}"
    )


class VllmEngine:
    """An ``AsyncLLM`` on its own asyncio thread. Start with ``start``; stop with ``stop``."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, name=f"vllm-{spec.path.name}", daemon=True
        )
        self._engine: Any = None
        self._built: Any = None  # the AsyncLLM, kept after stop for _serve's cleanup
        self.tokenizer: Any = None
        self.build: str | None = None  # set once started batch-invariant (``exact_build``)

    def _serve(self) -> None:
        """The engine's thread: its loop. Once the loop stops, what vLLM left of itself is
        released here, on its own thread, whether ``stop`` waited for it or gave up."""
        loop = self._loop
        loop.run_forever()
        try:
            if self._built is not None:
                _release(self._built, loop)
                self._built = None
        finally:
            loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine's loop and wait for it (call from a worker thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def start(self) -> None:
        configure_environment(self.spec.kv_cache_gib, self.spec.batch_invariant)
        device = await trio.to_thread.run_sync(installed_device)
        if self.spec.device not in ("auto", device):
            self._loop.close()  # (its thread never started)
            raise EngineError(
                f"inference.device is {self.spec.device!r} but the installed vLLM runs on "
                f"{device!r} (GPU: pip install '.[gpu]'; CPU: '.[cpu]')"
            )
        if self.spec.batch_invariant and device != "cuda":
            self._loop.close()
            raise EngineError(
                f"inference.batch_invariant needs vLLM's CUDA build (its batch-invariant "
                f"kernels run on GPUs); the installed vLLM runs on {device!r}"
            )
        self._thread.start()

        async def build() -> Any:
            _tie_engine_core_to_node()
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(
                model=str(self.spec.path),
                dtype=self.spec.dtype,
                max_num_seqs=self.spec.max_num_seqs,
                max_model_len=self.spec.max_model_len,
                seed=0,
                enforce_eager=True,
                disable_log_stats=True,
                kv_cache_memory_bytes=int(self.spec.kv_cache_gib * (1 << 30)),
            )
            engine = AsyncLLM.from_engine_args(args)
            return engine, engine.get_tokenizer()

        try:
            self._engine, self.tokenizer = await trio.to_thread.run_sync(self._run, build())
            self._built = self._engine
            if self.spec.batch_invariant:
                self.build = await trio.to_thread.run_sync(exact_build, self.spec.dtype)
        except Exception as exc:
            self._stop_loop()
            await trio.to_thread.run_sync(self._thread.join, 10)
            raise EngineError(f"vLLM could not load {self.spec.path}: {exc}") from exc

    @asynccontextmanager
    async def stream(self, token_ids: list[int], sampling_params: Any) -> AsyncIterator[_Outputs]:
        """Submit one request; yield an async iterator of its ``RequestOutput`` deltas.

        Iteration ends after the finished output; an engine failure is raised
        from it as ``EngineError``.
        """
        engine = self._engine
        if engine is None:
            raise EngineError("engine is not running")
        # Unbounded on purpose: the pump runs on another thread and must never
        # block or drop; a request's outputs are bounded by its max_tokens.
        send, receive = trio.open_memory_channel[Any](math.inf)
        token = trio.lowlevel.current_trio_token()
        request_id = uuid.uuid4().hex

        def to_trio(fn: Any, *args: Any) -> None:
            # The trio side may be gone (cancelled, or the run ended): nothing to tell.
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError
            ):
                trio.from_thread.run_sync(fn, *args, trio_token=token)

        async def pump() -> None:
            from vllm.inputs import TokensPrompt

            try:
                async for output in engine.generate(
                    TokensPrompt(prompt_token_ids=token_ids), sampling_params, request_id
                ):
                    to_trio(send.send_nowait, output)
            except asyncio.CancelledError:
                pass  # generate() aborted the request inside the engine
            except Exception as exc:
                to_trio(send.send_nowait, EngineError(f"vLLM failed: {exc}"))
            finally:
                to_trio(send.close)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            async with receive:
                yield _Outputs(receive)
        finally:
            if not future.done():
                self._loop.call_soon_threadsafe(future.cancel)

    async def unfinished_requests(self) -> int:
        """Requests vLLM still holds (running or waiting); 0 when idle."""
        engine = self._engine
        if engine is None:
            return 0

        async def count() -> int:
            return int(engine.output_processor.get_num_unfinished_requests())

        return await trio.to_thread.run_sync(self._run, count())

    async def stop(self) -> None:
        """Shut vLLM down; returns within ``STOP_TIMEOUT_S`` whatever vLLM does."""
        engine, self._engine = self._engine, None
        with trio.move_on_after(STOP_TIMEOUT_S) as deadline:
            if engine is not None:

                async def shutdown() -> None:
                    engine.shutdown(timeout=ENGINE_CORE_GRACE_S)
                    # AsyncLLM.__del__ calls shutdown() again, possibly at interpreter
                    # exit when vLLM's module globals are already gone; it is done.
                    engine.shutdown = _already_shut_down

                await trio.to_thread.run_sync(self._run, shutdown(), abandon_on_cancel=True)
            self._stop_loop()
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
        if deadline.cancelled_caught:
            # Its loop stops once vLLM lets go; the thread then ends, and the engine core with it.
            self._stop_loop()
            log.warning(
                "vLLM (%s) did not stop within %.0f s; it ends when it lets go, or with the node",
                self.spec.path.name,
                STOP_TIMEOUT_S,
            )

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)


def _already_shut_down(*_: Any, **__: Any) -> None:
    return None


def _release(engine: Any, loop: asyncio.AbstractEventLoop) -> None:
    """What vLLM leaves behind once its loop has stopped: released on the engine's thread.

    vLLM 0.32 leaves its engine client's zmq context to the garbage collector
    after a clean shutdown, and the client's engine manager, tasks and sockets
    too when its shutdown hangs or is abandoned (``stop``'s deadline). A zmq
    context collected with a socket still open blocks the collecting thread
    forever in ``zmq_ctx_term``: some later, unrelated garbage collection would
    hang the node (or a test session). So: the client's own shutdown (a no-op
    after a clean one; it reaps the engine core), the loop's tasks cancelled,
    every socket closed without linger, the context terminated.
    """
    client = getattr(engine, "engine_core", None)
    shadow = getattr(client, "ctx", None)  # zmq.asyncio's view of the same context
    context = getattr(getattr(client, "resources", None), "ctx", None)
    try:
        if client is not None:
            client.shutdown(timeout=ENGINE_CORE_GRACE_S)
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
        for ctx in (shadow, context):
            for socket in list(getattr(ctx, "_sockets", None) or ()):
                if not socket.closed:
                    socket.close(linger=0)
        if context is not None and not context.closed:
            context.destroy(linger=0)
    except Exception:  # vLLM's own objects, in whatever state it left them
        log.warning("vLLM's engine client could not be released", exc_info=True)


def _tie_engine_core_to_node() -> None:
    """Make vLLM start its engine core process through ``_run_engine_core`` (idempotent).

    vLLM hands ``EngineCoreProc.run_engine_core`` to multiprocessing as the
    child's target when the engine is built; a spawned child finds the
    wrapper by its module and name, a forked one inherits it.
    """
    global _vllm_run_engine_core
    from vllm.v1.engine.core import EngineCoreProc

    if _vllm_run_engine_core is None:
        _vllm_run_engine_core = EngineCoreProc.run_engine_core
        EngineCoreProc.run_engine_core = staticmethod(_run_engine_core)


def _run_engine_core(*args: Any, **kwargs: Any) -> None:
    """The engine core process: tied to the node (SIGKILL when it goes), then vLLM's own."""
    parent = multiprocessing.parent_process()
    die_with_parent(parent=parent.pid if parent is not None else None)
    run = _vllm_run_engine_core  # inherited by a forked child
    if run is None:  # a spawned child imported this module afresh
        from vllm.v1.engine.core import EngineCoreProc

        run = EngineCoreProc.run_engine_core
    run(*args, **kwargs)


class _Outputs:
    """Async iterator over one request's outputs; re-raises a failure the pump reported."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    def __aiter__(self) -> _Outputs:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(item, EngineError):
            raise item
        return item
