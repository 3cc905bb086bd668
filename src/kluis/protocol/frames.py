"""Wire frames: every message between a Kluis client and server, as typed msgspec structs.

Theory of operation: one WebSocket carries binary msgpack frames. The server speaks first with a
``Challenge``; the client answers with ``Register``, ``Auth`` or ``LinkRequest``, each signed over
the challenge with the device's Ed25519 key. Requests carry ``rid`` (request id); the server
answers each with exactly one response of the same ``rid`` or an ``Error``. The server pushes
``Deliver`` (stored envelopes) and ``KeysLow`` without a ``rid``; the client acknowledges
delivered envelopes with ``Ack``, after which the server deletes them.

Frames are decoded exactly once, here, at the edge: a frame that does not match its schema raises
:class:`kluis.errors.MalformedFrame` and nothing deeper ever sees a raw dict.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from kluis.errors import MalformedFrame

# Field bounds shared by both sides; the server's configurable limits sit below these.
KeyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
IdStr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
SigStr = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Rid = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
# Every integer and list on the wire has a bound in the schema, so nothing deeper (SQLite's
# 64-bit integers, a loop per item) ever sees one out of range.
WireId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # an envelope's id for its device
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
Stamp = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # unix seconds
MAX_ACK_IDS = 1024  # a client acknowledges at most this many envelopes per Ack
MAX_LIST = 256  # devices, envelopes or keys in one frame; configured limits sit below
MAX_ACCOUNTS = 1024  # accounts one Send addresses: a group of 1,000 members, and our own


class _Frame(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    pass


# ---- shared value objects ---------------------------------------------------------------------


class DeviceKeys(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device's public identity: Olm keys, the sealing key, and its self-signature."""

    ed25519: KeyStr
    curve25519: KeyStr
    seal: KeyStr
    sig: SigStr  # by ed25519 over signing.device_keys_message(...)


class DeviceRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device as listed in the key directory, certified by its account's identity key."""

    keys: DeviceKeys
    cert: SigStr  # by the account identity over signing.device_cert_message(account, keys)


class Revocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed end of a device: by the account identity, or by the device itself."""

    device: KeyStr
    sig: SigStr  # over signing.revocation_message(account, device)
    by_self: bool = False


class SignedKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key_id: KeyStr
    key: KeyStr
    sig: SigStr  # by the device's ed25519 over signing.one_time_key_message(...)


class Bundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: DeviceRecord
    one_time_key: SignedKey
    fallback: bool


class OutEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: IdStr
    body: bytes


class Addressed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One account's part of a send: an envelope for each of its current devices."""

    account: IdStr
    envelopes: Annotated[list[OutEnvelope], msgspec.Meta(max_length=MAX_LIST)]


class Mismatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why a send was refused for one account: devices it lacks, and devices it should not name."""

    account: str
    missing: Annotated[list[str], msgspec.Meta(max_length=MAX_LIST)] = []
    extra: Annotated[list[str], msgspec.Meta(max_length=MAX_LIST)] = []


class InEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: WireId
    body: bytes


# ---- client -> server -------------------------------------------------------------------------


class Register(_Frame, frozen=True, tag="register"):
    rid: Rid
    licence: Annotated[str, msgspec.Meta(max_length=64)]
    identity: KeyStr  # the new account's identity key; the account ID is derived from it
    device: DeviceRecord  # the first device, certified by ``identity``
    sig: SigStr  # over signing.challenge_message(nonce, device, server)


class Auth(_Frame, frozen=True, tag="auth"):
    rid: Rid
    device: IdStr
    sig: SigStr


class LinkRequest(_Frame, frozen=True, tag="link_request"):
    """A new device asks to join an account; its keys are published once it is approved."""

    rid: Rid
    device: DeviceKeys
    sig: SigStr
    one_time_keys: Annotated[list[SignedKey], msgspec.Meta(max_length=MAX_LIST)] = []
    fallback_key: SignedKey | None = None


class PendingLink(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the server keeps for a link request until it is approved or expires."""

    device: DeviceKeys
    one_time_keys: list[SignedKey] = []
    fallback_key: SignedKey | None = None


class LinkFetch(_Frame, frozen=True, tag="link_fetch"):
    rid: Rid
    token: Annotated[str, msgspec.Meta(max_length=32)]


class LinkApprove(_Frame, frozen=True, tag="link_approve"):
    rid: Rid
    token: Annotated[str, msgspec.Meta(max_length=32)]
    device: DeviceRecord


class UploadKeys(_Frame, frozen=True, tag="upload_keys"):
    rid: Rid
    one_time_keys: Annotated[list[SignedKey], msgspec.Meta(max_length=MAX_LIST)]
    fallback_key: SignedKey | None = None


class ListDevices(_Frame, frozen=True, tag="list_devices"):
    rid: Rid
    account: IdStr


class ClaimKeys(_Frame, frozen=True, tag="claim_keys"):
    rid: Rid
    account: IdStr
    devices: Annotated[list[IdStr], msgspec.Meta(max_length=MAX_LIST)]


class Send(_Frame, frozen=True, tag="send"):
    """One message to a conversation: every recipient account (and our own other devices) in
    one request, stored all or nothing."""

    rid: Rid
    to: Annotated[list[Addressed], msgspec.Meta(min_length=1, max_length=MAX_ACCOUNTS)]

    @classmethod
    def one(cls, rid: int, account: str, envelopes: list[OutEnvelope]) -> Send:
        """A send to one account only."""
        return cls(rid=rid, to=[Addressed(account=account, envelopes=envelopes)])


class Renew(_Frame, frozen=True, tag="renew"):
    """Redeem a licence code to extend this device's own account (answered by ``Renewed``)."""

    rid: Rid
    licence: Annotated[str, msgspec.Meta(max_length=64)]


MAX_WIPE_ORDER = 1024  # bytes of an encoded protocol.operator.WipeOrder


class WipeDevice(_Frame, frozen=True, tag="wipe_device"):
    """The owner orders a device of its account wiped (a WipeOrder signed by the identity)."""

    rid: Rid
    order: Annotated[bytes, msgspec.Meta(max_length=MAX_WIPE_ORDER)]


class WipeDone(_Frame, frozen=True, tag="wipe_done"):
    """A device ordered wiped has erased its profile; it ends itself with ``revocation``."""

    rid: Rid
    revocation: Revocation


class Ack(_Frame, frozen=True, tag="ack"):
    rid: Rid
    ids: Annotated[list[WireId], msgspec.Meta(max_length=MAX_ACK_IDS)]


class Revoke(_Frame, frozen=True, tag="revoke"):
    rid: Rid
    revocation: Revocation


# ---- attachments (blobs): a ticket over the WebSocket, the bytes over HTTP (server/blobs.py) --

BlobId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]  # 128 random bits, hex
BlobSize = Annotated[int, msgspec.Meta(ge=0, le=2**53)]  # ciphertext bytes


class BlobUpload(_Frame, frozen=True, tag="blob_upload"):
    """Ask to upload ``size`` ciphertext bytes that ``recipients`` devices will fetch; refused
    (``blob_too_large``, ``quota_exceeded``) before any byte is sent."""

    rid: Rid
    size: BlobSize
    recipients: Annotated[int, msgspec.Meta(ge=1, le=2**31)]


class BlobDownload(_Frame, frozen=True, tag="blob_download"):
    rid: Rid
    id: BlobId


class BlobFetched(_Frame, frozen=True, tag="blob_fetched"):
    """This device has fetched blob ``id`` in full and checked it; counted once per device."""

    rid: Rid
    id: BlobId


ClientFrame = (
    Register
    | Auth
    | LinkRequest
    | LinkFetch
    | LinkApprove
    | UploadKeys
    | ListDevices
    | ClaimKeys
    | Send
    | Ack
    | Revoke
    | BlobUpload
    | BlobDownload
    | BlobFetched
    | Renew
    | WipeDevice
    | WipeDone
)


# ---- server -> client -------------------------------------------------------------------------


class Challenge(_Frame, frozen=True, tag="challenge"):
    nonce: bytes
    server: str  # the server's origin (signing.origin); the login signature covers it


class Welcome(_Frame, frozen=True, tag="welcome"):
    rid: Rid
    account: str
    device: str
    otk_count: Count
    expires_at: Stamp  # account's subscription end
    operator: Annotated[str, msgspec.Meta(max_length=64)] = ""  # the operator's public key


class Renewed(_Frame, frozen=True, tag="renewed"):
    rid: Rid
    expires_at: Stamp  # the account's new subscription end


class Wipe(_Frame, frozen=True, tag="wipe"):
    """The answer to ``Auth`` of a device ordered wiped: erase, then send ``WipeDone``."""

    rid: Rid
    order: Annotated[bytes, msgspec.Meta(max_length=MAX_WIPE_ORDER)]


class LinkPending(_Frame, frozen=True, tag="link_pending"):
    rid: Rid
    token: str
    expires_at: Stamp


class LinkInfo(_Frame, frozen=True, tag="link_info"):
    rid: Rid
    device: DeviceKeys


class KeyCount(_Frame, frozen=True, tag="key_count"):
    rid: Rid
    otk_count: Count


class Devices(_Frame, frozen=True, tag="devices"):
    rid: Rid
    account: str
    identity: str  # the account's identity key; clients check it derives the account ID
    devices: Annotated[list[DeviceRecord], msgspec.Meta(max_length=MAX_LIST)]
    revoked: Annotated[list[Revocation], msgspec.Meta(max_length=MAX_LIST)] = []


class Bundles(_Frame, frozen=True, tag="bundles"):
    rid: Rid
    bundles: Annotated[list[Bundle], msgspec.Meta(max_length=MAX_LIST)]


class Done(_Frame, frozen=True, tag="done"):
    rid: Rid


class Error(_Frame, frozen=True, tag="error"):
    rid: Rid | None
    code: str
    message: str
    # mismatched_devices: per account of the refused Send, what it lacked or named too much
    mismatched: Annotated[list[Mismatch], msgspec.Meta(max_length=MAX_ACCOUNTS)] = []


class Deliver(_Frame, frozen=True, tag="deliver"):
    # At most what one Ack can acknowledge; the server also caps a Deliver in bytes.
    envelopes: Annotated[list[InEnvelope], msgspec.Meta(max_length=MAX_ACK_IDS)]


class KeysLow(_Frame, frozen=True, tag="keys_low"):
    otk_count: Count


class Synced(_Frame, frozen=True, tag="synced"):
    """Pushed once after login, right after the stored backlog: the mailbox is drained."""


class BlobTicket(_Frame, frozen=True, tag="blob_ticket"):
    """The answer to BlobUpload or BlobDownload: one HTTP PUT or GET of ``/v1/blobs/{id}`` with
    ``Authorization: Bearer {ticket}``, started before ``expires_at``."""

    rid: Rid
    id: BlobId
    ticket: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    size: BlobSize
    expires_at: Stamp


ServerFrame = (
    Challenge
    | Welcome
    | LinkPending
    | LinkInfo
    | KeyCount
    | Devices
    | Bundles
    | Done
    | Error
    | Deliver
    | KeysLow
    | Synced
    | BlobTicket
    | Renewed
    | Wipe
)

# msgspec raises UnicodeDecodeError (not DecodeError) for a string that is not UTF-8: the
# decoders below translate it too.
_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientFrame)
_server_decoder = msgspec.msgpack.Decoder(ServerFrame)


def encode(frame: msgspec.Struct) -> bytes:
    return _encoder.encode(frame)


def decode_client_frame(data: bytes) -> ClientFrame:
    """Decode a frame sent by a client; raise MalformedFrame on anything else."""
    try:
        frame: ClientFrame = _client_decoder.decode(data)
        return frame
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"undecodable client frame: {exc}") from exc


def decode_server_frame(data: bytes) -> ServerFrame:
    """Decode a frame sent by a server; raise MalformedFrame on anything else."""
    try:
        frame: ServerFrame = _server_decoder.decode(data)
        return frame
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"undecodable server frame: {exc}") from exc
