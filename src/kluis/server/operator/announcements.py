"""Signed announcements from the operator to every device.

The announcement is signed with the operator key (never held by the server process) and queued
as an envelope in every active device's mailbox: delivered at login or at once to a device
online, acknowledged and deleted like any envelope, expiring like one. The server keeps only the
signed blob. Clients check it (``client/operator.py``): signature by the pinned operator key,
this server's origin, an id not seen before.
"""

from __future__ import annotations

import asyncio
import secrets

from kluis.crypto.account_key import AccountKey
from kluis.errors import LocalProtocolError, QuotaExceeded
from kluis.protocol import operator as op
from kluis.server.mailbox import Mailbox
from kluis.server.store.protocol import Store

_BATCH = 256


def sign_announcement(key: AccountKey, origin: str, text: str, now: int) -> bytes:
    """The envelope body of a new announcement, signed by ``key``."""
    if not text.strip() or len(text) > op.MAX_ANNOUNCEMENT_TEXT:
        raise LocalProtocolError(f"an announcement has 1 to {op.MAX_ANNOUNCEMENT_TEXT} characters")
    body = op.encode_announcement(
        op.Announcement(id=secrets.token_hex(16), issued_at=now, server=origin, text=text)
    )
    signed = op.SignedAnnouncement(body=body, sig=key.sign(op.announcement_message(body)))
    return op.announcement_envelope(signed)


async def queue_announcement(store: Store, mailbox: Mailbox, envelope: bytes) -> int:
    """Put a signed announcement in every active device's mailbox; return how many."""
    if not op.is_announcement(envelope):
        raise LocalProtocolError("not an announcement envelope")
    devices = await store.all_active_devices()
    queued = 0
    for i in range(0, len(devices), _BATCH):
        # One deposit per device, gathered into one group commit: a full mailbox skips only
        # its own device.
        results = await asyncio.gather(
            *(mailbox.deposit([(d, envelope)]) for d in devices[i : i + _BATCH]),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, QuotaExceeded):
                continue
            if isinstance(result, BaseException):
                raise result
            queued += 1
    return queued
