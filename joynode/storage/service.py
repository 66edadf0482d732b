"""The ``storage`` actor: an IPFS-compatible content store on the node's own host.

It holds blocks on disk (``Blockstore``), serves and fetches them over Bitswap
(``Bitswap``, ``FetchSession``), announces pinned roots on the DHT, and keeps
pins in the state database. Files and folders are imported exactly as kubo's
``ipfs add`` does (``unixfs.Importer``), so a CID names the same bytes here
and in kubo.

Pins: a pinned root and everything under it survive ``gc``. A fetch pins its
root before the first block arrives (``complete = 0``), so a fetch cut short
by a restart keeps its blocks and resumes from them; the actor resumes such
fetches by itself when it starts. ``gc`` never runs beside an add or a fetch:
it waits for them, and they wait for it.

Models: ``publish_model`` adds a model folder; ``materialize_model`` fetches
one by CID and writes it into ``DATA_DIR/models/<cid>`` for vLLM, and before
handing out a folder already there compares it with the model's blocks, so an
altered cache is written again rather than served under the CID.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import AfterValidator

from joynode.abc import ContentNetwork, ModelUnavailable
from joynode.config import SettingError, StorageSection
from joynode.control.jsonrpc import INVALID_PARAMS, RpcError
from joynode.control.methods import ControlMethod, ControlSession, NoParams
from joynode.state import StateStore
from joynode.storage.bitswap import Bitswap
from joynode.storage.blockstore import BlockNotFound, Blockstore, StoreFull
from joynode.storage.cid import RAW, Cid, CidError
from joynode.storage.content_cache import ContentCache
from joynode.storage.errors import QuotaReached, StorageError
from joynode.storage.fetch import FetchFailed, FetchProgress, FetchSession, ProgressCallback
from joynode.storage.unixfs import (
    Importer,
    UnixfsError,
    directory_entries,
    first_difference,
    iter_file,
    links_of,
)

log = logging.getLogger(__name__)

STORAGE_ERROR = -32030  # JSON-RPC application error: a storage operation failed
ADD_PROGRESS_INTERVAL_S = 0.25
REPROVIDE_INTERVAL_S = 12 * 3600

AddProgress = Callable[[int], Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True)
class AddResult:
    cid: Cid
    size: int  # cumulative bytes of the DAG's blocks
    bytes_read: int


@dataclass(frozen=True)
class Pin:
    cid: str
    name: str
    complete: bool
    size: int
    created_at: float

    def to_json(self) -> dict[str, object]:
        return {
            "cid": self.cid,
            "name": self.name,
            "complete": self.complete,
            "size": self.size,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class GcResult:
    removed_blocks: int
    freed_bytes: int
    kept_blocks: int
    seconds: float


class StorageService:
    name = "storage"

    def __init__(
        self,
        settings: StorageSection,
        data_dir: Path,
        state: StateStore,
        network: ContentNetwork,
        registry: CollectorRegistry,
    ) -> None:
        self._settings = settings
        self._state = state
        self._network = network
        self.store = Blockstore(data_dir / "blocks", int(settings.quota_gib * (1 << 30)))
        self.models_dir = data_dir / "models"
        self._metrics = _StorageMetrics(registry, self)
        self.bitswap = Bitswap(network, self.store, on_transfer=self._metrics.count_transfer)
        self._exclusive = trio.Condition()
        self._writers = 0
        self._collecting = False
        self._root_locks: dict[str, trio.Lock] = {}
        self._model_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.content_cache = ContentCache(
            settings.gateway_cache_mib << 20,
            partial(self.fetch, pin=False),
            self._sweep,
            lambda: (self.store.statistics().bytes, self.store.quota_bytes),
        )

    # ---- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.to_thread.run_sync(self.store.open)
        except OSError as exc:
            raise SettingError(
                "node.data_dir", f"cannot open the block store {self.store.root}: {exc}"
            ) from None
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bitswap.run)
            self._nursery = nursery
            try:
                pins = await self.pins()
                nursery.start_soon(self._reprovide_loop)
                for pin in pins:
                    if not pin.complete:
                        nursery.start_soon(self._resume, pin)
                stats = self.store.statistics()
                log.info(
                    "storage ready: %d blocks, %.1f MB, %d pins",
                    stats.blocks,
                    stats.bytes / 1e6,
                    len(pins),
                )
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _resume(self, pin: Pin) -> None:
        log.info("resuming the interrupted fetch of %s (%s)", pin.cid, pin.name or "unnamed")
        try:
            await self.fetch(Cid.parse(pin.cid), name=pin.name)
        except (StorageError, CidError) as exc:
            log.warning("resuming %s failed: %s (it stays pinned; fetch it again)", pin.cid, exc)

    async def _reprovide_loop(self) -> None:
        if not self._settings.provide:
            return
        while True:
            for pin in await self.pins():
                if pin.complete:
                    await self._announce(Cid.parse(pin.cid))
            await trio.sleep(REPROVIDE_INTERVAL_S)

    async def _announce(self, cid: Cid) -> None:
        if not self._settings.provide:
            return
        try:
            with trio.move_on_after(30):
                await self._network.provide(cid.multihash)
        except Exception as exc:  # the DHT raises many unrelated types; announcing is best effort
            log.debug("announcing %s failed: %s", cid, exc)

    def _announce_soon(self, cid: Cid) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._announce, cid)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """An add or fetch in progress: gc waits for it to end."""
        async with self._exclusive:
            while self._collecting:
                await self._exclusive.wait()
            self._writers += 1
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._exclusive:
                    self._writers -= 1
                    self._exclusive.notify_all()

    # ---- adding

    async def add(
        self,
        path: Path,
        *,
        pin: bool = True,
        name: str = "",
        cid_version: int | None = None,
        include_hidden: bool = False,
        on_progress: AddProgress | None = None,
    ) -> AddResult:
        """Import a file or a folder as kubo would; pin and announce its root."""
        version = self._settings.cid_version if cid_version is None else cid_version
        token = trio.lowlevel.current_trio_token()
        last_report = [0.0]

        def on_chunk(total: int) -> None:
            trio.from_thread.check_cancelled()
            now = time.monotonic()
            if on_progress is not None and now - last_report[0] >= ADD_PROGRESS_INTERVAL_S:
                last_report[0] = now
                trio.from_thread.run(on_progress, total, trio_token=token)

        read = [0]

        def count(total: int) -> None:
            read[0] = total
            on_chunk(total)

        importer = Importer(
            self.store.put, cid_version=version, include_hidden=include_hidden, on_chunk=count
        )
        async with self._writing():
            try:
                link = await trio.to_thread.run_sync(importer.import_path, path)
            except StoreFull as exc:
                raise QuotaReached(str(exc)) from None
            except UnixfsError as exc:
                raise StorageError(str(exc)) from None
            except OSError as exc:
                raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
            if pin:
                await self._pin(link.cid, name or path.name, complete=True, size=link.tsize)
        self._metrics.added.inc()
        if on_progress is not None:
            await on_progress(read[0])
        if pin:
            self._announce_soon(link.cid)
        return AddResult(link.cid, link.tsize, read[0])

    # ---- fetching

    async def fetch(
        self,
        root: Cid,
        *,
        pin: bool = True,
        name: str = "",
        peers: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> FetchProgress:
        """Make the whole DAG under ``root`` local (fetching what is missing); pin it."""
        lock = self._root_locks.setdefault(str(root), trio.Lock())
        async with lock, self._writing():
            if pin:
                await self._pin(root, name, complete=False, size=0)
            session = FetchSession(
                root,
                self.bitswap,
                self.store,
                self._network,
                window=self._settings.fetch_window,
                block_timeout_s=self._settings.block_timeout_s,
                stall_timeout_s=self._settings.stall_timeout_s,
                peers=peers,
                on_progress=on_progress,
            )
            try:
                progress = await session.run()
            except (FetchFailed, StoreFull) as exc:
                self._metrics.fetches.labels("failed").inc()
                raise (QuotaReached if isinstance(exc, StoreFull) else StorageError)(
                    str(exc)
                ) from None
            if pin:
                await self._pin(root, name, complete=True, size=progress.bytes)
        self._metrics.fetches.labels("ok").inc()
        if pin:
            self._announce_soon(root)
        return progress

    # ---- exporting

    async def export(self, root: Cid, out: Path) -> None:
        """Write the file or folder ``root`` (already local) to ``out``, which must not exist."""
        try:
            await trio.to_thread.run_sync(self._export, root, out)
        except (UnixfsError, BlockNotFound) as exc:
            raise StorageError(f"cannot export {root}: {_describe(exc)}") from None
        except OSError as exc:
            raise StorageError(f"cannot write {out}: {exc.strerror or exc}") from None

    def _export(self, root: Cid, out: Path) -> None:
        """Written beside ``out`` and renamed into place, so ``out`` is whole or absent."""
        if out.exists() or out.is_symlink():
            raise FileExistsError(errno.EEXIST, "already exists", str(out))
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            self._write_tree(root, staging)
            staging.rename(out)
        finally:
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            elif staging.exists():
                staging.unlink()

    def _write_tree(self, cid: Cid, out: Path) -> None:
        trio.from_thread.check_cancelled()
        block = self.store.get(cid)
        entries = directory_entries(cid, block)
        if entries is None:
            with out.open("xb") as handle:
                for data in iter_file(self.store.get, cid):
                    handle.write(data)
            return
        out.mkdir()
        for entry in entries:
            self._write_tree(entry.cid, out / entry.name)

    # ---- pins and gc

    async def _pin(self, cid: Cid, name: str, *, complete: bool, size: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO pins (cid, name, complete, size, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (cid) DO UPDATE SET complete = max(complete, excluded.complete), "
                "size = max(size, excluded.size), name = CASE WHEN excluded.name != '' "
                "THEN excluded.name ELSE name END",
                (str(cid), name, int(complete), size, time.time()),
            )

        await self._state.write(write)

    async def unpin(self, cid: Cid) -> bool:
        def write(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM pins WHERE cid = ?", (str(cid),)).rowcount

        return bool(await self._state.write(write))

    async def pins(self) -> list[Pin]:
        def read(conn: sqlite3.Connection) -> list[Pin]:
            rows = conn.execute(
                "SELECT cid, name, complete, size, created_at FROM pins ORDER BY created_at"
            ).fetchall()
            return [Pin(r[0], r[1], bool(r[2]), r[3], r[4]) for r in rows]

        return await self._state.read(read)

    async def gc(self) -> GcResult:
        """Remove every block not under a pin (the gateway's cache too); waits for adds and
        fetches in progress."""
        self.content_cache.forget()
        return await self._sweep(())

    async def _sweep(self, spare: Sequence[Cid]) -> GcResult:
        """Remove every block not under a pin or under a root of ``spare``."""
        began = time.monotonic()
        async with self._exclusive:
            while self._writers or self._collecting:
                await self._exclusive.wait()
            self._collecting = True
        try:
            roots = [Cid.parse(pin.cid) for pin in await self.pins()] + list(spare)
            removed, freed, kept = await trio.to_thread.run_sync(self._collect, roots)
        finally:
            with trio.CancelScope(shield=True):
                async with self._exclusive:
                    self._collecting = False
                    self._exclusive.notify_all()
        result = GcResult(removed, freed, kept, time.monotonic() - began)
        log.info(
            "gc removed %d blocks (%.1f MB), kept %d in %.2f s",
            removed,
            freed / 1e6,
            kept,
            result.seconds,
        )
        return result

    def _collect(self, roots: list[Cid]) -> tuple[int, int, int]:
        live: set[bytes] = set()
        stack = list(roots)
        while stack:
            cid = stack.pop()
            if cid.multihash in live:
                continue
            live.add(cid.multihash)
            if cid.codec == RAW:
                continue
            try:
                stack.extend(link.cid for link in links_of(cid, self.store.get(cid)))
            except (BlockNotFound, UnixfsError):
                continue  # an incomplete fetch: what is there is kept
        removed = freed = 0
        for multihash in list(self.store.all_multihashes()):
            if multihash in live:
                continue
            size = self.store.delete(multihash)
            if size is not None:
                removed += 1
                freed += size
        return removed, freed, self.store.statistics().blocks

    async def stat(self, root: Cid) -> dict[str, object]:
        """What of ``root`` is local: blocks and bytes present, blocks missing, its kind."""

        def walk() -> dict[str, object]:
            present = missing = size = 0
            kind = "unknown"
            stack = [root]
            while stack:
                cid = stack.pop()
                try:
                    block = self.store.get(cid)
                except BlockNotFound:
                    missing += 1
                    continue
                if cid == root:
                    kind = "directory" if directory_entries(cid, block) is not None else "file"
                present += 1
                size += len(block)
                stack.extend(link.cid for link in links_of(cid, block))
            return {
                "cid": str(root),
                "kind": kind,
                "blocks": present,
                "bytes": size,
                "missing_blocks": missing,
                "complete": missing == 0,
            }

        try:
            return await trio.to_thread.run_sync(walk)
        except UnixfsError as exc:
            raise StorageError(str(exc)) from None

    # ---- models

    async def publish_model(self, folder: Path) -> AddResult:
        if not await trio.Path(folder / "config.json").is_file():
            raise StorageError(f"{folder} is not a model folder (no config.json)")
        return await self.add(folder, name=f"model {folder.name}")

    async def materialize_model(
        self, cid_text: str, on_progress: ProgressCallback | None = None
    ) -> Path:
        """The model folder for ``cid_text`` in the model cache, checked to hold exactly its bytes.

        A folder already there is compared with the model's blocks (Proof of
        Integrity at rest: a cache altered on disk is never served under the
        CID). One that differs is written again from verified blocks; blocks
        missing or damaged in the store are fetched from peers first. Raises
        ``ModelUnavailable`` when that cannot be done.
        """
        try:
            root = Cid.parse(cid_text)
        except CidError as exc:
            raise ModelUnavailable(str(exc)) from None
        target = self.models_dir / str(root)
        async with self._model_locks.setdefault(str(root), trio.Lock()):
            try:
                if await trio.Path(target).is_dir():
                    difference = await self._model_difference(root, target)
                    if difference is None:
                        return target
                    log.warning(
                        "model cache %s does not match its CID (%s): writing it again "
                        "from verified blocks",
                        target,
                        difference,
                    )
                await self._write_model(root, target, on_progress or _log_progress())
            except QuotaReached as exc:
                raise ModelUnavailable(f"model {root}: {exc}", "storage.quota_gib") from None
            except (StorageError, OSError) as exc:
                raise ModelUnavailable(f"model {root}: {exc}") from None
        return target

    async def _model_difference(self, root: Cid, folder: Path) -> str | None:
        """Where ``folder`` differs from the DAG ``root`` (blocks missing count), or None."""

        def get(cid: Cid) -> bytes:
            trio.from_thread.check_cancelled()
            return self.store.get(cid)

        began = time.monotonic()
        try:
            difference = await trio.to_thread.run_sync(first_difference, get, root, folder)
        except BlockNotFound as exc:
            return f"{_describe(exc)} in the block store"
        except UnixfsError as exc:
            return str(exc)
        if difference is None:
            log.info("model %s matches its CID (checked in %.1f s)", root, time.monotonic() - began)
        return difference

    async def _write_model(self, root: Cid, target: Path, on_progress: ProgressCallback) -> None:
        """Make every block local (checked, or fetched), then (re)write the folder from them."""
        log.info("fetching model %s (local blocks are checked, missing ones come from peers)", root)
        await self.fetch(root, name=f"model {root}", on_progress=on_progress)
        await trio.Path(self.models_dir).mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(_remove, target)
        await self.export(root, target)
        if not await trio.Path(target / "config.json").is_file():
            await trio.to_thread.run_sync(shutil.rmtree, target, True)
            raise StorageError(f"{root} is not a model folder (no config.json)")
        log.info("model %s is in the model cache: %s", root, target)

    def statistics(self) -> dict[str, Any]:
        stats = self.store.statistics()
        return {
            "blocks": stats.blocks,
            "bytes": stats.bytes,
            "quota_bytes": stats.quota_bytes,
            "corrupt_blocks_dropped": stats.corrupt_dropped,
            "gateway_cache": asdict(self.content_cache.statistics()),
            "bitswap": vars(self.bitswap.stats).copy(),
        }

    # ---- control

    def control_methods(self) -> list[ControlMethod]:
        async def storage_add(params: AddParams, session: ControlSession) -> dict[str, object]:
            async def progress(read: int) -> None:
                await session.notify("storage.progress", {"op": "add", "bytes": read})

            result = await _answer(
                self.add(
                    Path(params.path),
                    pin=params.pin,
                    name=params.name,
                    cid_version=params.cid_version,
                    include_hidden=params.hidden,
                    on_progress=progress,
                )
            )
            return {"cid": str(result.cid), "size": result.size, "bytes": result.bytes_read}

        async def storage_get(params: GetParams, session: ControlSession) -> dict[str, object]:
            root = _parse_cid(params.cid)
            done = await _answer(
                self.fetch(
                    root,
                    pin=params.pin,
                    peers=params.peers,
                    on_progress=_notify_progress(session, "get"),
                )
            )
            result: dict[str, object] = {"cid": str(root), **done.to_json()}
            if params.out is not None:
                out = Path(params.out)
                await _answer(self.export(root, out))
                result["out"] = str(out)
            return result

        async def storage_pin(params: CidParams, session: ControlSession) -> dict[str, object]:
            root = _parse_cid(params.cid)
            done = await _answer(
                self.fetch(root, name=params.name, on_progress=_notify_progress(session, "pin"))
            )
            return {"cid": str(root), "pinned": True, "bytes": done.bytes}

        async def storage_unpin(params: CidParams, _: ControlSession) -> dict[str, object]:
            root = _parse_cid(params.cid)
            if not await self.unpin(root):
                raise RpcError(STORAGE_ERROR, f"{root} is not pinned")
            return {"cid": str(root), "pinned": False}

        async def storage_gc(_: NoParams, __: ControlSession) -> dict[str, object]:
            result = await self.gc()
            return {
                "removed_blocks": result.removed_blocks,
                "freed_bytes": result.freed_bytes,
                "kept_blocks": result.kept_blocks,
                "seconds": round(result.seconds, 3),
            }

        async def storage_stat(params: StatParams, _: ControlSession) -> dict[str, object]:
            out: dict[str, object] = {
                **self.statistics(),
                "pins": [p.to_json() for p in await self.pins()],
            }
            if params.cid is not None:
                out["root"] = await _answer(self.stat(_parse_cid(params.cid)))
            return out

        async def models_publish(params: PathParams, _: ControlSession) -> dict[str, object]:
            result = await _answer(self.publish_model(Path(params.path)))
            return {"cid": str(result.cid), "size": result.size}

        async def models_fetch(params: CidParams, session: ControlSession) -> dict[str, object]:
            root = _parse_cid(params.cid)
            try:
                path = await self.materialize_model(
                    str(root), _notify_progress(session, "models.fetch")
                )
            except ModelUnavailable as exc:
                raise RpcError(STORAGE_ERROR, str(exc)) from None
            return {"cid": str(root), "path": str(path)}

        return [
            ControlMethod(
                "storage.add",
                AddParams,
                storage_add,
                "Add a file or folder (as `ipfs add`), pin it; storage.progress notifications.",
            ),
            ControlMethod(
                "storage.get",
                GetParams,
                storage_get,
                "Fetch a CID from peers (pinning it), optionally write it to `out`.",
            ),
            ControlMethod("storage.pin", CidParams, storage_pin, "Fetch if needed and pin a CID."),
            ControlMethod(
                "storage.unpin", CidParams, storage_unpin, "Unpin a CID (gc may then remove it)."
            ),
            ControlMethod("storage.gc", NoParams, storage_gc, "Remove blocks no pin needs."),
            ControlMethod(
                "storage.stat",
                StatParams,
                storage_stat,
                "Store usage, pins, and a CID's local state.",
            ),
            ControlMethod(
                "models.publish", PathParams, models_publish, "Add a model folder; returns its CID."
            ),
            ControlMethod(
                "models.fetch",
                CidParams,
                models_fetch,
                "Fetch a model by CID into the model cache; returns its folder.",
            ),
        ]


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path (the node's working folder is not yours)")
    return value


AbsolutePath = Annotated[
    str, pydantic.Field(min_length=1, max_length=4096), AfterValidator(_absolute)
]


class AddParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    path: AbsolutePath
    pin: bool = True
    name: str = pydantic.Field("", max_length=256)
    cid_version: int | None = pydantic.Field(None, ge=0, le=1)
    hidden: bool = False


class GetParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    cid: str = pydantic.Field(min_length=1, max_length=256)
    out: AbsolutePath | None = None
    pin: bool = True
    peers: list[str] = pydantic.Field([], max_length=16)


class CidParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    cid: str = pydantic.Field(min_length=1, max_length=256)
    name: str = pydantic.Field("", max_length=256)


class StatParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    cid: str | None = pydantic.Field(None, min_length=1, max_length=256)


class PathParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    path: AbsolutePath


def _parse_cid(text: str) -> Cid:
    try:
        return Cid.parse(text)
    except CidError as exc:
        raise RpcError(INVALID_PARAMS, str(exc)) from None


async def _answer(operation: Awaitable[T]) -> T:
    try:
        return await operation
    except StorageError as exc:
        raise RpcError(STORAGE_ERROR, str(exc)) from None


def _notify_progress(session: ControlSession, op: str) -> ProgressCallback:
    async def notify(progress: FetchProgress) -> None:
        await session.notify("storage.progress", {"op": op, **progress.to_json()})

    return notify


def _log_progress(every_s: float = 5.0) -> ProgressCallback:
    """Progress for the log, at most every ``every_s`` (a model fetch at start has no caller)."""
    last = [time.monotonic()]

    async def log_it(progress: FetchProgress) -> None:
        now = time.monotonic()
        if progress.done or now - last[0] >= every_s:
            last[0] = now
            total = f" of {progress.total_bytes / 1e6:.1f}" if progress.total_bytes else ""
            log.info(
                "fetch %s: %.1f%s MB, %d blocks, from %d peers%s",
                progress.root,
                progress.bytes / 1e6,
                total,
                progress.blocks,
                progress.peers,
                " (done)" if progress.done else "",
            )

    return log_it


def _remove(path: Path) -> None:
    """Remove whatever is at ``path`` (a folder, a file, a symlink), if anything."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _describe(exc: Exception) -> str:
    return f"block {exc.args[0]} is missing" if isinstance(exc, BlockNotFound) else str(exc)


class _StorageMetrics:
    def __init__(self, registry: CollectorRegistry, service: StorageService) -> None:
        self.transferred = Counter(
            "joynode_storage_bitswap_bytes",
            "Block bytes sent and received over Bitswap",
            ["direction"],
            registry=registry,
        )
        self.added = Counter("joynode_storage_adds", "Files and folders added", registry=registry)
        self.fetches = Counter(
            "joynode_storage_fetches", "DAG fetches by outcome", ["outcome"], registry=registry
        )
        blocks = Gauge("joynode_storage_blocks", "Blocks in the store", registry=registry)
        blocks.set_function(lambda: service.store.statistics().blocks)
        used = Gauge("joynode_storage_bytes", "Bytes in the store", registry=registry)
        used.set_function(lambda: service.store.statistics().bytes)

    def count_transfer(self, direction: str, size: int) -> None:
        self.transferred.labels(direction).inc(size)
