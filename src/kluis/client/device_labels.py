"""Names and dates for our own account's devices, kept in this device's profile only.

Theory of operation: the key directory lists a device as its keys and its certificate, nothing
a person recognises; the server must not learn more (a device name says whose phone it is).
So each profile keeps, in the record ``devices:labels``, a :class:`Label` per device of its
account: the name the user gave it here (``kluis device name``, or ``--device-name`` when this
device was made, or ``--name`` when this device approved it) and the day this profile first
saw it. For this device and for the devices it approved, that day is the day they were made;
for the others it is the first listing this profile got. Names are the user's words, checked
like contact names (1 to :data:`MAX_DEVICE_NAME` printable characters). Pure: no I/O beyond
the store it is given.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from kluis.client.store.protocol import ClientStore
from kluis.errors import LocalProtocolError

__all__ = ["MAX_DEVICE_NAME", "DeviceLabels", "Label", "check_device_name"]

MAX_DEVICE_NAME = 64


class Label(msgspec.Struct, frozen=True):
    since: int  # unix seconds: when this profile first knew the device (made, approved, listed)
    name: str = ""


_RECORD = "devices:labels"
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict[str, Label])


def check_device_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_DEVICE_NAME:
        raise LocalProtocolError(f"a device name has 1 to {MAX_DEVICE_NAME} characters")
    if not name.isprintable():
        raise LocalProtocolError("a device name cannot hold control characters")
    return name


class DeviceLabels:
    def __init__(self, store: ClientStore) -> None:
        self._store = store

    def all(self) -> dict[str, Label]:
        raw = self._store.get(_RECORD)
        return _dec.decode(raw) if raw else {}

    def _save(self, labels: dict[str, Label]) -> None:
        self._store.put(_RECORD, _enc.encode(labels))

    def seen(self, devices: Iterable[str], now: int) -> dict[str, Label]:
        """Note ``devices`` (device IDs) as known since ``now`` unless known already; return
        every label."""
        with self._store.transaction():
            labels = self.all()
            new = {d: Label(since=now) for d in devices if d not in labels}
            if new:
                labels.update(new)
                self._save(labels)
        return labels

    def name(self, device: str, name: str, now: int) -> Label:
        """Call ``device`` ``name`` (checked) on this profile."""
        name = check_device_name(name)
        if not device:
            raise LocalProtocolError("which device? give its ID (kluis device list)")
        with self._store.transaction():
            labels = self.all()
            old = labels.get(device)
            label = Label(since=old.since if old else now, name=name)
            labels[device] = label
            self._save(labels)
        return label
