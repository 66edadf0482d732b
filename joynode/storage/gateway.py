"""``/ipfs/{cid}[/path]`` on the http actor: an IPFS trustless gateway over this node's
block store.

As the IPFS trustless gateway specification defines it: ``?format=raw`` (or
``Accept: application/vnd.ipld.raw``) answers the one block, ``?format=car`` (or
``Accept: application/vnd.ipld.car``) the DAG under it as a CARv1 stream (blocks in
depth-first order, the root first), so a client checks every block against its CID
itself. Otherwise a UnixFS file is answered as its bytes, and a directory as its
``index.html`` or an HTML listing. A DAG this node lacks is fetched from peers first
(Bitswap; each block checked against its CID as it arrives, a peer that sends a wrong
one dropped), kept unpinned in the gateway's LRU cache (``storage.gateway_cache_mib``,
``content_cache.py``). Clients authenticate as on
the other routes (a bearer token, or ``?token=`` for a browser).
"""

from __future__ import annotations

import html
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import trio
from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from joynode.storage.blockstore import BlockNotFound, Blockstore
from joynode.storage.cid import RAW, Cid, CidError
from joynode.storage.content_cache import ContentCache
from joynode.storage.protobuf import encode_varint
from joynode.storage.unixfs import UnixfsError, directory_entries, iter_file, links_of

RAW_TYPE = "application/vnd.ipld.raw"
CAR_TYPE = "application/vnd.ipld.car"
IMMUTABLE = "public, max-age=29030400, immutable"
FETCH_TIMEOUT_S = 120.0

GetBlock = Callable[[Cid], bytes]
Admit = Callable[[str], Awaitable[Any]]


class GatewayError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def car_header(root: Cid) -> bytes:
    """The CARv1 header: dag-cbor ``{"roots": [root], "version": 1}``, length-prefixed."""
    cid = b"\x00" + root.to_v1().to_bytes()  # a CID in CBOR: tag 42, bytes with a 0 prefix
    cbor = (
        b"\xa2"  # a map of 2, keys in dag-cbor order (shorter first)
        + b"\x65roots"
        + b"\x81"  # an array of 1
        + b"\xd8\x2a"  # tag 42
        + _cbor_bytes_head(len(cid))
        + cid
        + b"\x67version"
        + b"\x01"
    )
    return encode_varint(len(cbor)) + cbor


def _cbor_bytes_head(length: int) -> bytes:
    if length < 24:
        return bytes([0x40 + length])
    if length < 256:
        return bytes([0x58, length])
    return bytes([0x59]) + length.to_bytes(2, "big")


def dag_blocks(
    store: Blockstore, root: Cid, *, leaves: bool = True
) -> Iterator[tuple[Cid, bytes | None]]:
    """Each block under ``root`` once, depth first, root first, with its bytes. Without
    ``leaves`` a raw leaf is only looked up (``BlockNotFound`` if absent), its bytes None:
    enough to know a stream that starts will not stop for a missing block."""
    stack, seen = [root], set()
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        seen.add(cid)
        if cid.codec == RAW and not leaves:
            if not store.has(cid):
                raise BlockNotFound(str(cid))
            yield cid, None
            continue
        data = store.get(cid)
        yield cid, data
        stack.extend(reversed([link.cid for link in links_of(cid, data)]))


def car_sections(store: Blockstore, root: Cid) -> Iterator[bytes]:
    """Each block of the DAG under ``root`` as a CAR section, depth first, root first."""
    for cid, data in dag_blocks(store, root):
        assert data is not None
        raw = cid.to_bytes()
        yield encode_varint(len(raw) + len(data)) + raw + data


def require_local(store: Blockstore, root: Cid) -> None:
    """``BlockNotFound`` unless every block under ``root`` is here."""
    for _ in dag_blocks(store, root, leaves=False):
        pass


def resolve(get: GetBlock, root: Cid, path: str) -> Cid:
    """The CID ``path`` names under the directory ``root``."""
    cid = root
    for name in [part for part in path.split("/") if part]:
        entries = directory_entries(cid, get(cid))
        if entries is None:
            raise GatewayError(404, f"{cid} is a file: it has no {name!r}")
        found = next((e.cid for e in entries if e.name == name), None)
        if found is None:
            raise GatewayError(404, f"no {name!r} in {cid}")
        cid = found
    return cid


def ipfs_api(store: Blockstore, cache: ContentCache, admit: Admit) -> APIRouter:
    """Content from ``store``; what it lacks fetched from peers into ``cache``; ``admit``
    checks an ``Authorization`` value (raises to refuse)."""
    router = APIRouter(tags=["IPFS"])
    get = store.get

    async def local(fn: Callable[[], Any], root: Cid) -> Any:
        """``fn()`` over local blocks; on a missing one, the DAG fetched, then again."""
        try:
            return await trio.to_thread.run_sync(fn)
        except BlockNotFound:
            pass
        with trio.move_on_after(FETCH_TIMEOUT_S):
            try:
                await cache.fetch(root)
            except Exception as exc:  # the storage actor's errors, said to the client
                raise GatewayError(504, f"{root} could not be fetched: {exc}") from None
            return await trio.to_thread.run_sync(fn)
        raise GatewayError(504, f"{root} could not be fetched within {FETCH_TIMEOUT_S:.0f} s")

    @router.get("/ipfs/{cid}", summary="Content by CID (trustless: raw block or CAR)")
    async def root(cid: str, request: Request) -> Response:
        return await answer(cid, "", request)

    @router.get("/ipfs/{cid}/{path:path}", summary="Content under a directory CID")
    async def under(cid: str, path: str, request: Request) -> Response:
        return await answer(cid, path, request)

    async def answer(text: str, path: str, request: Request) -> Response:
        token = request.query_params.get("token")
        await admit(request.headers.get("authorization") or f"Bearer {token or ''}")
        try:
            root_cid = Cid.parse(text)
        except CidError as exc:
            return _error(400, f"not a CID: {exc}")
        cache.touch(root_cid)
        try:
            target = await local(lambda: resolve(get, root_cid, path), root_cid)
            wanted = _format(request)
            headers = {
                "Etag": f'"{target}"',
                "Cache-Control": IMMUTABLE,
                "X-Ipfs-Path": f"/ipfs/{text}" + (f"/{path}" if path else ""),
                "X-Content-Type-Options": "nosniff",
            }
            if wanted == "raw":
                block = await local(lambda: get(target), root_cid)
                return Response(block, media_type=RAW_TYPE, headers=headers)
            if wanted == "car":
                await local(lambda: require_local(store, target), root_cid)
                return StreamingResponse(
                    _car_stream(store, target), media_type=CAR_TYPE, headers=headers
                )
            return await _unixfs(store, target, path, text, headers, local, root_cid)
        except GatewayError as exc:
            return _error(exc.status, str(exc))
        except UnixfsError as exc:
            return _error(422, f"not a UnixFS file or directory: {exc}")

    return router


async def _unixfs(
    store: Blockstore,
    target: Cid,
    path: str,
    text: str,
    headers: dict[str, str],
    local: Callable[[Callable[[], Any], Cid], Awaitable[Any]],
    root: Cid,
) -> Response:
    get = store.get
    entries = await local(lambda: directory_entries(target, get(target)), root)
    if entries is None:
        await local(lambda: require_local(store, target), root)
        kind = mimetypes.guess_type(path.rsplit("/", 1)[-1])[0] or "application/octet-stream"
        return StreamingResponse(_file_stream(get, target), media_type=kind, headers=headers)
    index = next((e.cid for e in entries if e.name == "index.html"), None)
    if index is not None:
        body = await local(lambda: b"".join(iter_file(get, index)), root)
        return HTMLResponse(body, headers=headers)
    base = f"/ipfs/{text}" + (f"/{path.strip('/')}" if path.strip("/") else "")
    rows = "".join(
        f'<li><a href="{html.escape(base)}/{html.escape(e.name)}">{html.escape(e.name)}</a> '
        f"({e.tsize} bytes)</li>"
        for e in entries
    )
    page = f"<!doctype html><title>{html.escape(base)}</title><h1>{html.escape(base)}</h1>"
    return HTMLResponse(page + f"<ul>{rows}</ul>", headers=headers)


async def _file_stream(get: GetBlock, cid: Cid) -> AsyncIterator[bytes]:
    chunks = iter_file(get, cid)
    while (chunk := await trio.to_thread.run_sync(next, chunks, None)) is not None:
        yield chunk


async def _car_stream(store: Blockstore, root: Cid) -> AsyncIterator[bytes]:
    yield car_header(root)
    sections = car_sections(store, root)
    while (section := await trio.to_thread.run_sync(next, sections, None)) is not None:
        yield section


def _format(request: Request) -> str | None:
    asked = request.query_params.get("format")
    if asked in ("raw", "car"):
        return asked
    accept = request.headers.get("accept", "")
    if RAW_TYPE in accept:
        return "raw"
    if CAR_TYPE in accept:
        return "car"
    return None


def _error(status: int, message: str) -> Response:
    return Response(message + "\n", status_code=status, media_type="text/plain")
