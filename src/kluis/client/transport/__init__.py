"""Client transports: the :class:`Transport` protocol, over a WebSocket or in memory."""

from kluis.client.transport.memory import MemoryTransport, ServerEnd, ServerLink
from kluis.client.transport.protocol import Push, Transport, TransportFactory
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
