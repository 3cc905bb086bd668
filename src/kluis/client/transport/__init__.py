"""Client transports: the :class:`Transport` protocol, over a WebSocket or in memory.

``WebSocketTransport`` loads on first use (PEP 562): it brings the ``websockets`` library,
which a command that needs no network should not pay for at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kluis.client.transport.memory import MemoryTransport, ServerEnd, ServerLink
from kluis.client.transport.protocol import Push, Transport, TransportFactory

if TYPE_CHECKING:
    from kluis.client.transport.websocket import WebSocketTransport

__all__ = [
    "MemoryTransport",
    "Push",
    "ServerEnd",
    "ServerLink",
    "Transport",
    "TransportFactory",
    "WebSocketTransport",
]


def __getattr__(name: str) -> Any:
    if name == "WebSocketTransport":
        from kluis.client.transport.websocket import WebSocketTransport

        return WebSocketTransport
    raise AttributeError(f"module 'kluis.client.transport' has no attribute {name!r}")
