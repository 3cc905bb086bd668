"""The Kluis client library: ``KluisClient`` is the entry point.

Loaded on first use (PEP 562): importing a light module of this package (records, groups,
timers) does not pull in the network stack, so a command that needs no network starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kluis.client.client import KluisClient
    from kluis.client.core import Message

__all__ = ["KluisClient", "Message"]


def __getattr__(name: str) -> Any:
    if name == "KluisClient":
        from kluis.client.client import KluisClient

        return KluisClient
    if name == "Message":
        from kluis.client.core import Message

        return Message
    raise AttributeError(f"module 'kluis.client' has no attribute {name!r}")
