"""What a client tells its application: small frozen events, from ``KluisClient.events()``.

    async for event in client.events():
        match event:
            case MessageReceived(message):
                show(message)
            case Undecryptable(code, reason):
                warn(reason)  # the envelope is kept aside, encrypted, in the profile
            case DeviceAlarm(alarm):
                alarm_the_user(alarm)  # our own account lists a device we did not certify
            case ConnectionDown(reason):
                ...  # the stream ends here; connect() and events() again to go on
            case ReceiptReceived(conversation, status, by, ids):
                ...  # our messages ``ids`` were delivered to / read by ``by``
            case ContactChanged() | NoteChanged() | MessagesExpired():
                ...  # another of our devices changed contacts or notes; messages disappeared
            case VerificationRequested(peer):
                ...  # peer asks for SAS verification: answer with start_verification(peer)
            case VerificationChanged(flow):
                ...  # a flow moved: show flow.short_code (COMPARING), the mark (VERIFIED)

Events carry only str, ints and our own types (never crypto library objects).
"""

from __future__ import annotations

from dataclasses import dataclass

from kluis.client.records import Message
from kluis.client.verification import Verification


@dataclass(frozen=True, slots=True)
class ConnectionUp:
    """This device is logged in; its stored backlog follows."""


@dataclass(frozen=True, slots=True)
class ConnectionDown:
    """The connection ended (the stream ends with this event)."""

    reason: str
    # The WebSocket close code the server sent, if it closed the connection: 1001 (going away)
    # means the node is draining, and a client reconnects at once (``client/reconnect.py``).
    close_code: int | None = None


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message decrypted and stored in the profile (and acknowledged to the server)."""

    message: Message


@dataclass(frozen=True, slots=True)
class Undecryptable:
    """An envelope that could not be read: quarantined (kept encrypted) and acknowledged."""

    code: str  # the error's stable code (kluis.errors)
    reason: str
    # Who the sealed envelope claims sent it, when it opened that far (unproven: it did not
    # decrypt): the account and the device's key. Empty when even the seal did not open.
    sender: str = ""
    device: str = ""

    def __post_init__(self) -> None:
        if not self.code:
            raise ValueError("an Undecryptable event needs the error's code")


@dataclass(frozen=True, slots=True)
class DeviceAlarm:
    """Our own account lists a device our identity did not certify (a hostile server?)."""

    alarm: str


# ---- messaging features (issue 9) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceiptReceived:
    """``by`` reports our messages ``ids`` in ``conversation`` as ``status``."""

    conversation: str
    status: str  # "delivered" or "read"
    by: str  # the account that sent the receipt
    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if self.status not in ("delivered", "read"):
            raise ValueError(f"unknown receipt status {self.status!r}")


@dataclass(frozen=True, slots=True)
class ContactChanged:
    """Another of our devices named ``account`` (``name``)."""

    account: str
    name: str


@dataclass(frozen=True, slots=True)
class NoteChanged:
    """Another of our devices wrote or deleted note ``note``."""

    note: str
    deleted: bool


@dataclass(frozen=True, slots=True)
class MessagesExpired:
    """``count`` disappearing messages were deleted from this device."""

    count: int


@dataclass(frozen=True, slots=True)
class VerificationRequested:
    """``peer`` asks for an interactive SAS verification; ``start_verification(peer)``
    answers it (the request waits up to ten minutes)."""

    peer: str


@dataclass(frozen=True, slots=True)
class VerificationChanged:
    """A SAS verification flow of this run changed state (see ``client/verification.py``):
    COMPARING carries the short code to show; VERIFIED and CANCELLED end it."""

    verification: Verification


FeatureEvent = ReceiptReceived | ContactChanged | NoteChanged | MessagesExpired
VerificationEvent = VerificationRequested | VerificationChanged

Event = (
    ConnectionUp
    | ConnectionDown
    | MessageReceived
    | Undecryptable
    | DeviceAlarm
    | FeatureEvent
    | VerificationEvent
)
