"""The seizure audit (``kluis audit-storage``): what would someone who takes the server's disk
find? It reads a server's files as a seizer would and looks for plaintext, private keys and
metadata that outlive delivery (``storage``), and for envelopes paired by deposit order in the
database's pages and WAL (``pages``).

It sits beside the apps, not in ``server/``: it reads client profiles (``--profile``) for the
secrets that must never reach the server, and it asks the server's store which files it keeps
(``Store.footprint``) instead of knowing their names.
"""

from kluis.audit.storage import (
    Finding,
    Report,
    audit,
    byte_encodings,
    decode_secret,
    encodings,
    profile_secrets,
    store_footprint,
)

__all__ = [
    "Finding",
    "Report",
    "audit",
    "byte_encodings",
    "decode_secret",
    "encodings",
    "profile_secrets",
    "store_footprint",
]
