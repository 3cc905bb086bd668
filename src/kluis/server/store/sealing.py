"""Storage keys: what makes a copy of PostgreSQL's files read nothing (SECURITY.md, "On PostgreSQL").

Theory of operation. PostgreSQL keeps dead row versions and WAL records for an unbounded time,
so nothing written to it can be erased; what can be erased is a key kept outside it. Three
layers:

1. **Envelope bodies** are sealed (ChaCha20-Poly1305, random 96-bit nonce) under a random
   **epoch key**, one per epoch: the hour an envelope expires in (the TTL is whole hours, so
   this is also the hour it was deposited in). The additional data binds the body to its
   device, wire id and epoch, so rows cannot be swapped. The store only ever sees ciphertext.
2. **Epoch keys** live in PostgreSQL wrapped under a **key-encryption key** (KEK) of a numbered
   version. The store deletes an epoch key once no envelope of its epoch is left (all
   delivered or expired), so at the latest when the epoch's envelopes expire.
3. **KEKs** never touch PostgreSQL: they live in a key file on each node (``DATA/storage.key``,
   mode 0600), identical on every node of a deployment. Versions follow wall-clock time
   (``version = floor(t / period)``) and form a one-way chain, ``K[v+1] = HMAC(K[v], "next")``:
   any node derives later versions from the file on its own, nobody derives earlier ones. The
   file holds the previous version (a grace version for nodes whose clocks lag); advancing it
   overwrites the old key in place. Nodes re-wrap the live epoch keys under the current
   version, so the wrapped copies left in dead tuples and old WAL segments become useless once
   the file moved past their version: after at most two periods.

The file is text of a fixed length (so that advancing overwrites the same bytes)::

    kluis-storage-key v1
    period 00000000000000003600
    version 00000000000000489000
    index <64 hex digits>         a static key: licence rows are found by HMAC(it, code hash),
                                  envelopes and counters by HMAC(it, device ID)
    key <64 hex digits>           K[version]

The **index key** keeps what PostgreSQL needs to look rows up from naming a code or a device:
a redeemed licence's dead row holds a tag nobody can match to a code without the file, and the
rows one commit writes (envelopes and counters of the recipient's and the sender's devices,
which share a transaction id) name no device. It does not ratchet: re-tagging every pending
row at each rotation would rewrite the mailbox. Whoever holds the file can compute the tags.

Pure apart from :class:`KeyFile`, which reads and writes the file; time and randomness are
passed in. Errors are ``kluis.errors.StorageKeyError`` (``storage_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from kluis.errors import StorageKeyError

KEY_BYTES = 32
NONCE_BYTES = 12
EPOCH_S = 3600
DEFAULT_PERIOD_S = 3600
_HEADER = "kluis-storage-key v1"
_FORMAT = re.compile(
    _HEADER + r"\nperiod (\d{20})\nversion (\d{20})\nindex ([0-9a-f]{64})\nkey ([0-9a-f]{64})\n"
)


def _mac(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The KEK chain from ``version`` on (earlier versions are gone), and the index key."""

    period_s: int
    version: int
    key: bytes = field(repr=False)  # K[version]; never in a repr, hence never in a log
    index_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.period_s < 1 or self.version < 0:
            raise StorageKeyError("storage key: period and version must be positive")
        if len(self.key) != KEY_BYTES or len(self.index_key) != KEY_BYTES:
            raise StorageKeyError("storage key: keys must be 32 bytes")

    @classmethod
    def new(cls, now: float, period_s: int, random: Callable[[int], bytes]) -> KeyRing:
        return cls(period_s, max(0, int(now // period_s) - 1), random(32), random(32))

    def version_at(self, now: float) -> int:
        return int(now // self.period_s)

    def kek(self, version: int) -> bytes:
        """K[version], derived forward; an earlier version than the ring's is gone."""
        if version < self.version:
            raise StorageKeyError(
                f"storage key version {version} is gone (the key file is at {self.version})"
            )
        if version - self.version > 1_000_000:
            raise StorageKeyError(f"storage key version {version} is implausibly far ahead")
        key = self.key
        for _ in range(version - self.version):
            key = _mac(key, b"kluis-kek-next")
        return key

    def advanced(self, version: int) -> KeyRing:
        """The ring from ``version`` on (itself when it is there already)."""
        if version <= self.version:
            return self
        return KeyRing(self.period_s, version, self.kek(version), self.index_key)

    def licence_tag(self, code_hash: bytes) -> bytes:
        """What the store keeps of a licence: a code's hash is not findable without this file."""
        return hmac.new(self.index_key, b"kluis-licence\x00" + code_hash, "sha256").digest()

    def mailbox(self, device_id: str) -> str:
        """The name a device's envelopes and counter are kept under (128 bits, hex)."""
        mac = hmac.new(self.index_key, b"kluis-mailbox\x00" + device_id.encode(), "sha256")
        return mac.hexdigest()[:32]

    # ---- epoch keys wrapped under a KEK -----------------------------------------------------

    def wrap(self, data_key: bytes, epoch: int, version: int, nonce: bytes) -> bytes:
        aead = ChaCha20Poly1305(_mac(self.kek(version), b"kluis-kek-wrap"))
        return nonce + aead.encrypt(nonce, data_key, _wrap_ad(epoch, version))

    def unwrap(self, wrapped: bytes, epoch: int, version: int) -> bytes:
        aead = ChaCha20Poly1305(_mac(self.kek(version), b"kluis-kek-wrap"))
        try:
            key = aead.decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_ad(epoch, version)
            )
        except (InvalidTag, ValueError) as exc:  # ValueError: too short to hold a nonce
            raise StorageKeyError(
                f"the storage key of epoch {epoch} does not open under this key file"
            ) from exc
        return key

    # ---- the file -------------------------------------------------------------------------------

    def encode(self) -> bytes:
        return (
            f"{_HEADER}\nperiod {self.period_s:020d}\nversion {self.version:020d}\n"
            f"index {self.index_key.hex()}\nkey {self.key.hex()}\n"
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> KeyRing:
        m = _FORMAT.fullmatch(data.decode("ascii", "replace"))
        if m is None:
            raise StorageKeyError("the storage key file is not in the kluis-storage-key v1 format")
        return cls(int(m[1]), int(m[2]), bytes.fromhex(m[4]), bytes.fromhex(m[3]))


def _wrap_ad(epoch: int, version: int) -> bytes:
    return b"kluis-epoch-key\x00" + struct.pack(">qq", epoch, version)


def _body_ad(device_id: str, seq: int, epoch: int) -> bytes:
    return b"kluis-envelope\x00" + struct.pack(">qq", seq, epoch) + device_id.encode()


def epoch_of(expires_at: int) -> int:
    """The epoch (hour) an envelope expiring at ``expires_at`` belongs to."""
    return expires_at // EPOCH_S


def seal_body(
    data_key: bytes, device_id: str, seq: int, epoch: int, body: bytes, nonce: bytes
) -> bytes:
    return nonce + ChaCha20Poly1305(data_key).encrypt(nonce, body, _body_ad(device_id, seq, epoch))


def open_body(data_key: bytes, device_id: str, seq: int, epoch: int, sealed: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(data_key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _body_ad(device_id, seq, epoch)
        )
    except (InvalidTag, ValueError) as exc:
        raise StorageKeyError(f"an envelope of epoch {epoch} does not open") from exc


CHECK_PLAINTEXT = b"kluis storage key check"


def check_value(ring: KeyRing, version: int, nonce: bytes) -> bytes:
    """A value the database keeps so that a node with another key file refuses to start."""
    return ring.wrap(CHECK_PLAINTEXT.ljust(KEY_BYTES, b"\0"), -1, version, nonce)


def matches(ring: KeyRing, check: bytes, version: int) -> bool:
    try:
        return ring.unwrap(check, -1, version) == CHECK_PLAINTEXT.ljust(KEY_BYTES, b"\0")
    except StorageKeyError:
        return False


class KeyFile:
    """The key file at ``path``: created once (exclusively, mode 0600), advanced in place."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> KeyRing:
        try:
            st = self.path.stat()
            if st.st_mode & 0o077:
                raise StorageKeyError(
                    f"{self.path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it"
                )
            return KeyRing.decode(self.path.read_bytes())
        except FileNotFoundError as exc:
            raise StorageKeyError(f"no storage key file at {self.path}") from exc
        except OSError as exc:
            raise StorageKeyError(f"cannot read {self.path}: {exc.strerror}") from exc

    def create(self, ring: KeyRing) -> KeyRing:
        """Write ``ring`` unless a file is there already (another node was first): the file's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self.load()
        except OSError as exc:
            raise StorageKeyError(f"cannot create {self.path}: {exc.strerror}") from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(ring.encode())
            fh.flush()
            os.fsync(fh.fileno())
        return ring

    def advance(self, version: int) -> KeyRing:
        """Move the file to ``version``, overwriting the older key in place (a rename would
        leave the old bytes in a free block); a file already past it is kept."""
        ring = self.load()
        if ring.version >= version:
            return ring
        new = ring.advanced(version)
        with self.path.open("r+b") as fh:
            fh.write(new.encode())
            fh.flush()
            os.fsync(fh.fileno())
        return new
