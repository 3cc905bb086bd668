"""Attachment transfers: encrypt a file to the server as it is read, fetch and check one as it
arrives.

Theory of operation: the ticket comes over the client's transport (``BlobUpload`` or
``BlobDownload``, answered with ``BlobTicket``); the bytes go over HTTP with aiohttp, streamed,
with ``Authorization: Bearer {ticket}``. An upload reads the file in 1 MiB pieces, encrypts
each (``crypto/attachment.py``) and hands the ciphertext to the request body as it is made. A
download decrypts what arrives, writes only authenticated plaintext to a ``.part`` file next to
the target, and renames it to the target only once the last chunk, the digest and the size have
checked out; then it tells the server the fetch is complete (``BlobFetched``), which counts
towards the blob's deletion. Whatever fails, the ``.part`` file is removed.

aiohttp's exceptions become :class:`kluis.errors.TransportError` here, and the server's JSON
refusals their typed :mod:`kluis.errors` class.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import mimetypes
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from kluis.client.transport import Transport
from kluis.crypto.attachment import Decryptor, Encryptor, ciphertext_size, new_key
from kluis.errors import (
    AttachmentCorrupt,
    BlobTooLarge,
    KluisError,
    LocalProtocolError,
    MalformedFrame,
    TransportError,
    error_for_code,
)
from kluis.protocol import frames as f
from kluis.protocol.attachment import AttachmentRef

if TYPE_CHECKING:  # loaded by the transfers only: a command that sends no file skips it
    import aiohttp

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) of the plaintext as a transfer goes on."""

_PIECE = 1024 * 1024  # file reads and writes


def _timeout() -> aiohttp.ClientTimeout:
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


def http_base(server: str) -> str:
    """The HTTP origin of a server URL (``ws://host/v1/ws`` -> ``http://host``)."""
    parts = urlsplit(server)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise LocalProtocolError(f"not an http(s) server URL: {server!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def safe_name(name: str, fallback: str) -> str:
    """A file name from a peer's ``name``: its last path part, no control characters, no
    leading dots (never a path, never hidden); ``fallback`` when nothing is left."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip().lstrip(".").strip()
    return base[:200] or fallback


def _target(out: Path, ref: AttachmentRef) -> Path:
    if not out.is_dir():
        return out
    name = safe_name(ref.name, ref.id)
    target = out / name
    stem, suffix = os.path.splitext(name)
    n = 1
    while target.exists():
        target = out / f"{stem} ({n}){suffix}"
        n += 1
    return target


async def _refusal(response: aiohttp.ClientResponse) -> KluisError:
    import aiohttp  # loaded by the transfers only (see the TYPE_CHECKING import)

    try:
        body = await response.json(content_type=None)
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return TransportError(f"the server answered HTTP {response.status}")
    return error_for_code(code, message)


async def upload(
    transport: Transport,
    server: str,
    path: Path,
    recipients: int,
    progress: Progress | None = None,
    *,
    mime: str = "",
) -> AttachmentRef:
    """Encrypt ``path`` to the server for ``recipients`` devices; return what to send them."""
    import aiohttp  # loaded by the transfers only (see the TYPE_CHECKING import)

    size = path.stat().st_size
    sealed_size = ciphertext_size(size)
    ticket = await transport.request(
        lambda rid: f.BlobUpload(rid=rid, size=sealed_size, recipients=recipients), f.BlobTicket
    )
    if ticket.size != sealed_size:
        raise MalformedFrame("the server's ticket is for another size")
    key = new_key()
    encryptor = Encryptor(key)
    failure: list[BaseException] = []

    async def body() -> AsyncIterator[bytes]:
        done = 0
        try:
            with path.open("rb", buffering=0) as source:
                while done < size:
                    data = await asyncio.to_thread(source.read, min(_PIECE, size - done))
                    if not data:
                        raise LocalProtocolError(f"{path} shrank while it was being sent")
                    done += len(data)
                    yield encryptor.update(data)
                    if progress is not None:
                        progress(done, size)
            yield encryptor.finish()
        except BaseException as exc:
            failure.append(exc)
            raise

    headers = {
        "Authorization": f"Bearer {ticket.ticket}",
        "Content-Length": str(sealed_size),
        "Content-Type": "application/octet-stream",
    }
    url = f"{http_base(server)}/v1/blobs/{ticket.id}"
    try:
        async with (
            aiohttp.ClientSession(timeout=_timeout()) as session,
            session.put(url, data=body(), headers=headers) as response,
        ):
            if response.status != 201:
                raise await _refusal(response)
    except (aiohttp.ClientError, OSError) as exc:
        if failure and isinstance(failure[0], KluisError):
            raise failure[0] from exc
        raise TransportError(f"upload failed: {exc}") from exc
    if failure:
        raise failure[0]
    guessed = mimetypes.guess_type(path.name)[0] or ""
    return AttachmentRef(
        id=ticket.id,
        key=key,
        digest=encryptor.digest,
        size=size,
        name=path.name[:255],
        mime=(mime or guessed)[:127],
    )


def _write(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = out.write(view)
        view = view[n or 0 :]


def _finish(out: BinaryIO, part: Path, target: Path) -> None:
    os.fsync(out.fileno())
    out.close()
    os.replace(part, target)


async def download(
    transport: Transport,
    server: str,
    ref: AttachmentRef,
    out: Path,
    progress: Progress | None = None,
) -> Path:
    """Fetch, decrypt and check ``ref`` into ``out`` (a file, or a folder to save it in under
    its sanitised name); return the path written. Nothing is at the target unless all checked
    out; then the server is told this device has the blob."""
    decryptor = Decryptor(ref.key, ref.digest, ref.size)
    ticket = await transport.request(lambda rid: f.BlobDownload(rid=rid, id=ref.id), f.BlobTicket)
    if ticket.size != decryptor.ciphertext_size:
        raise AttachmentCorrupt("the server holds a blob of another size than the message said")
    target = _target(out, ref)
    part = target.parent / f".{target.name}.{secrets.token_hex(4)}.part"
    sink = os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb", buffering=0)
    try:
        await _fetch(server, ticket, decryptor, sink, ref.size, progress)
        await asyncio.to_thread(_finish, sink, part, target)
    except BaseException:
        with contextlib.suppress(OSError):
            sink.close()
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    await transport.request(lambda rid: f.BlobFetched(rid=rid, id=ref.id), f.Done)
    return target


async def download_bytes(
    transport: Transport, server: str, ref: AttachmentRef, limit: int
) -> bytes:
    """Fetch, decrypt and check ``ref`` into memory (an image preview), refusing one over
    ``limit`` bytes before anything is fetched. Unlike :func:`download` the server is not told
    that this device has the blob: a preview must not let it delete a file not saved yet."""
    if ref.size > limit:
        raise BlobTooLarge(f"{ref.size} bytes, over the limit of {limit} for a preview")
    decryptor = Decryptor(ref.key, ref.digest, ref.size)
    ticket = await transport.request(lambda rid: f.BlobDownload(rid=rid, id=ref.id), f.BlobTicket)
    if ticket.size != decryptor.ciphertext_size:
        raise AttachmentCorrupt("the server holds a blob of another size than the message said")
    sink = io.BytesIO()
    await _fetch(server, ticket, decryptor, sink, ref.size, None)
    return sink.getvalue()


async def _fetch(
    server: str,
    ticket: f.BlobTicket,
    decryptor: Decryptor,
    sink: BinaryIO,
    size: int,
    progress: Progress | None,
) -> None:
    import aiohttp  # loaded by the transfers only (see the TYPE_CHECKING import)

    url = f"{http_base(server)}/v1/blobs/{ticket.id}"
    headers = {"Authorization": f"Bearer {ticket.ticket}"}
    pending = bytearray()
    done = 0
    try:
        async with (
            aiohttp.ClientSession(timeout=_timeout()) as session,
            session.get(url, headers=headers) as response,
        ):
            if response.status != 200:
                raise await _refusal(response)
            async for data in response.content.iter_any():
                pending += decryptor.update(data)  # authenticated chunks only
                if len(pending) >= _PIECE:
                    done += len(pending)
                    await asyncio.to_thread(_write, sink, bytes(pending))
                    pending = bytearray()
                    if progress is not None:
                        progress(done, size)
    except (aiohttp.ClientError, OSError) as exc:
        raise TransportError(f"download failed: {exc}") from exc
    pending += decryptor.finish()  # the last chunk, the digest and the size
    await asyncio.to_thread(_write, sink, bytes(pending))
    if progress is not None:
        progress(size, size)
