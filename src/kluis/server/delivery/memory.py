"""The delivery bus within one server process: a dictionary of live connections."""

from __future__ import annotations

from kluis.server.delivery.protocol import Subscriber


class InProcessBus:
    """Signals go straight to the subscriber's methods, on the caller's event loop."""

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: dict[str, Subscriber] = {}

    def subscribe(self, device_id: str, subscriber: Subscriber) -> None:
        old = self._subscribers.get(device_id)
        self._subscribers[device_id] = subscriber
        if old is not None and old is not subscriber:
            old.displaced()

    def unsubscribe(self, device_id: str, subscriber: Subscriber) -> None:
        if self._subscribers.get(device_id) is subscriber:
            del self._subscribers[device_id]

    def announce(self, device_id: str, seq: int, body: bytes | None = None) -> None:
        subscriber = self._subscribers.get(device_id)
        if subscriber is not None:
            subscriber.envelope(seq, body)

    def keys_low(self, device_id: str, count: int) -> None:
        subscriber = self._subscribers.get(device_id)
        if subscriber is not None:
            subscriber.keys_low(count)

    def revoke(self, device_id: str) -> None:
        subscriber = self._subscribers.get(device_id)
        if subscriber is not None:
            subscriber.revoked()

    def devices_changed(self, account_id: str) -> None:
        """One process, one cache: nothing to tell."""

    @property
    def local_devices(self) -> int:
        return len(self._subscribers)

    async def online_devices(self) -> int:
        return len(self._subscribers)
