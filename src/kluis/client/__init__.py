"""The Kluis client library: ``KluisClient`` is the entry point."""

from kluis.client.client import KluisClient
from kluis.client.core import Message

__all__ = ["KluisClient", "Message"]
