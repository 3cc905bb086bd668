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

Events carry only str, ints and our own types (never crypto library objects).
"""

from __future__ import annotations

from dataclasses import dataclass

from kluis.client.records import Message


@dataclass(frozen=True, slots=True)
class ConnectionUp:
    """This device is logged in; its stored backlog follows."""


@dataclass(frozen=True, slots=True)
class ConnectionDown:
    """The connection ended (the stream ends with this event)."""

    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message decrypted and stored in the profile (and acknowledged to the server)."""

    message: Message


@dataclass(frozen=True, slots=True)
class Undecryptable:
    """An envelope that could not be read: quarantined (kept encrypted) and acknowledged."""

    code: str  # the error's stable code (kluis.errors)
    reason: str

    def __post_init__(self) -> None:
        if not self.code:
            raise ValueError("an Undecryptable event needs the error's code")


@dataclass(frozen=True, slots=True)
class DeviceAlarm:
    """Our own account lists a device our identity did not certify (a hostile server?)."""

    alarm: str


Event = ConnectionUp | ConnectionDown | MessageReceived | Undecryptable | DeviceAlarm
