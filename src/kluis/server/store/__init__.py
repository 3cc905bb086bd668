"""Server persistence: the ``Store`` protocol and its implementations."""

from kluis.server.store.protocol import Account, Store, StoredDevice
from kluis.server.store.sqlite import SqliteStore

__all__ = ["Account", "SqliteStore", "Store", "StoredDevice"]
