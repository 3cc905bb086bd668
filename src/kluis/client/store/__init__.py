"""Client profile stores: the protocol the core depends on, and its implementations.

``ProfileStore`` (the encrypted SQLite profile) stays importable from here.
"""

from typing import TYPE_CHECKING

from kluis.client.store.memory import MemoryStore
from kluis.client.store.protocol import ClientStore
from kluis.client.store.sqlite import ProfileStore

__all__ = ["ClientStore", "MemoryStore", "ProfileStore"]

if TYPE_CHECKING:  # both implement the protocol (checked by mypy, free at run time)

    def _implements(p: ProfileStore, m: MemoryStore) -> tuple[ClientStore, ClientStore]:
        return p, m
