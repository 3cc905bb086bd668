"""The HTTP side of attachments: ``PUT`` and ``GET /v1/blobs/{id}`` with a ticket.

Thin handlers over ``server/blobs.py``: check the ticket (``Authorization: Bearer …``), stream
the body to or from disk in pieces, map refusals to a status and a JSON body ``{code,
message}`` with the codes of ``kluis.errors``. Neither side ever holds a whole blob: an upload
is read as it arrives and written in 1 MiB pieces (aiohttp stops reading the socket while a
piece is being written), a download is read in 1 MiB pieces and each is written once the
socket has taken the previous one.

An upload longer than its ticket's size is cut (413) at the first byte too many, one that sends
nothing for ``blob_idle_timeout_s`` or averages under ``blob_min_bytes_per_s`` is cut (408),
and one that ends early is dropped (400); in each case the connection is closed, not drained.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from kluis.errors import (
    BlobTooLarge,
    KluisError,
    MalformedFrame,
    ServerError,
    TicketInvalid,
    TransportError,
    UnknownBlob,
)
from kluis.server.blobs import TRANSFER_GRACE_S, BlobService, Download, Upload

log = logging.getLogger("kluis.server")

BLOBS = web.AppKey("blobs", BlobService)
_STATUS: dict[type[KluisError], int] = {
    TicketInvalid: 401,
    UnknownBlob: 404,
    BlobTooLarge: 413,
    MalformedFrame: 400,
    TransportError: 408,
    ServerError: 503,  # across nodes: Redis does not answer (server/blob_shared.py)
}


async def _refuse(
    request: web.Request, exc: KluisError, *, close: bool = False
) -> web.StreamResponse:
    response = web.json_response(
        {"code": exc.code, "message": exc.message}, status=_STATUS.get(type(exc), 400)
    )
    if close:  # answer, then close: do not read (linger over) the rest of a refused body
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


def _ticket(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _deadline(service: BlobService, size: int) -> float:
    limits = service.limits
    rate = max(1, limits.blob_min_bytes_per_s)
    return (
        asyncio.get_running_loop().time()
        + limits.blob_idle_timeout_s
        + TRANSFER_GRACE_S
        + size / rate
    )


async def put_blob(request: web.Request) -> web.StreamResponse:
    service = request.app[BLOBS]
    try:
        ticket = await service.claim(_ticket(request), request.match_info["id"], upload=True)
    except KluisError as exc:  # TicketInvalid; across nodes also ServerError (Redis)
        return await _refuse(request, exc, close=True)
    length = request.content_length
    if length is not None and length != ticket.size:
        await service.cancel(ticket)
        err = (BlobTooLarge if length > ticket.size else MalformedFrame)(
            f"the body has {length} bytes; the ticket is for {ticket.size}"
        )
        return await _refuse(request, err, close=True)
    upload = await service.start_upload(ticket)
    try:
        await _receive(service, request, upload)
    except KluisError as exc:
        await upload.abort()
        return await _refuse(request, exc, close=True)
    except BaseException:
        await upload.abort()
        raise
    return web.json_response({"id": ticket.blob_id, "size": ticket.size}, status=201)


async def _receive(service: BlobService, request: web.Request, upload: Upload) -> None:
    idle = service.limits.blob_idle_timeout_s
    try:
        async with asyncio.timeout_at(_deadline(service, upload.ticket.size)):
            while True:
                data = await asyncio.wait_for(request.content.readany(), idle)
                if not data:
                    break
                await upload.write(data)
    except TimeoutError as exc:
        raise TransportError("the upload was too slow") from exc
    await upload.commit()


async def get_blob(request: web.Request) -> web.StreamResponse:
    service = request.app[BLOBS]
    try:
        ticket = await service.claim(_ticket(request), request.match_info["id"], upload=False)
        download = await service.start_download(ticket)
    except KluisError as exc:
        return await _refuse(request, exc)
    try:
        return await _send(service, request, download)
    finally:
        await download.close()


async def _send(
    service: BlobService, request: web.Request, download: Download
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"},
    )
    response.content_length = download.ticket.size
    await response.prepare(request)
    try:
        async with asyncio.timeout_at(_deadline(service, download.ticket.size)):
            while data := await download.read():
                await response.write(data)
            await response.write_eof()
    except TimeoutError:
        request.protocol.force_close()  # a reader too slow: cut, the body stays incomplete
        return response
    await service.completed(download)
    return response


def add_routes(app: web.Application, service: BlobService) -> None:
    """``PUT`` and ``GET /v1/blobs/{id}`` (also in ``server/openapi.py``)."""
    app[BLOBS] = service
    app.router.add_put("/v1/blobs/{id}", put_blob)
    app.router.add_get("/v1/blobs/{id}", get_blob, allow_head=False)
