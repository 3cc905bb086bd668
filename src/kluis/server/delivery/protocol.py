"""The delivery bus: tells a device's live connection that something happened to the device.

Theory of operation: a connection subscribes for its device once it has logged in. The mailbox
announces every envelope it has committed for a device; the account service's callers announce a
revocation, and a new subscription for a device displaces the previous one (the newest
connection wins). A signal carries no state that matters for correctness: on ``envelope`` the
connection re-reads its mailbox from the database, from its last delivered sequence number. The
body travels along as a hint, so that a connection that is in step (the announced number is the
next one it expects) can skip that read; across nodes (a Redis bus) the hint may be dropped.

Signals are fire-and-forget and never fail the sender: a device without a live connection gets
its envelopes at its next login.
"""

from __future__ import annotations

from typing import Protocol


class Subscriber(Protocol):
    """A live connection of one device (``server/connection.py``)."""

    def envelope(self, seq: int, body: bytes | None) -> None:
        """An envelope numbered ``seq`` was committed for the device; ``body`` is a hint."""
        ...

    def keys_low(self, count: int) -> None:
        """The device's stock of one-time keys fell to ``count``."""
        ...

    def displaced(self) -> None:
        """The device logged in on another connection: this one must close."""
        ...

    def revoked(self) -> None:
        """The device was revoked: this connection must close."""
        ...


class DeliveryBus(Protocol):
    def subscribe(self, device_id: str, subscriber: Subscriber) -> None:
        """Route the device's signals to ``subscriber``; any earlier one is displaced."""
        ...

    def unsubscribe(self, device_id: str, subscriber: Subscriber) -> None:
        """Stop routing to ``subscriber`` (no-op when a newer one has taken its place)."""
        ...

    def announce(self, device_id: str, seq: int, body: bytes | None = None) -> None:
        """A committed envelope for the device (after its transaction, never before)."""
        ...

    def keys_low(self, device_id: str, count: int) -> None: ...

    def revoke(self, device_id: str) -> None:
        """The device was revoked: close its connection, wherever it is."""
        ...

    def devices_changed(self, account_id: str) -> None:
        """The account's devices changed (after the commit): other nodes drop cached lists."""
        ...

    @property
    def local_devices(self) -> int:
        """Devices with a live connection on this node."""
        ...

    async def online_devices(self) -> int:
        """Devices with a live connection on any node (a dead node's lapse with their TTL)."""
        ...
