"""Client profile stores: the protocol the core depends on, and its implementations.

``ProfileStore`` (the encrypted SQLite profile) stays importable from here.
"""

from kluis.client.store.memory import MemoryStore
from kluis.client.store.protocol import ClientStore
from kluis.client.store.sqlite import ProfileStore

__all__ = ["ClientStore", "MemoryStore", "ProfileStore"]
