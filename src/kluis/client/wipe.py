"""Erasing a profile, and the panic passphrase.

``erase_profile`` overwrites every file under the profile folder with zeros (then fsyncs)
before unlinking it, and removes sub-folders, leaving the folder itself empty. Overwriting in
place is what a file system lets a program do: on flash or copy-on-write storage old blocks may
survive, which is why the profile is encrypted at rest in the first place.

The panic passphrase: ``set_panic`` keeps, in ``DIR/unlock.bin``, a salt and the argon2id hash of
a second passphrase (with the profile's own KDF costs). Every unlock first checks the typed
passphrase against it; a match erases the profile and the unlock fails exactly as for a folder
with no profile ("no profile in DIR; register or request a device first"), so a coercer sees an
empty start. Someone who reads the disk before that can see that ``unlock.bin`` exists.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from kluis.crypto.profile_key import KdfParams, derive_key, new_params
from kluis.errors import LocalProtocolError

PANIC_FILE = "unlock.bin"
_SALT = 16


def erase_profile(path: Path) -> None:
    """Overwrite, then unlink, every file under ``path``; the folder stays, empty."""
    if not path.is_dir():
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _shred(Path(root) / name)
        for name in dirs:
            os.rmdir(Path(root) / name)


def _shred(file: Path) -> None:
    try:
        size = file.stat().st_size
        with open(file, "r+b", buffering=0) as fh:
            chunk = b"\x00" * 65536
            left = size
            while left > 0:
                left -= fh.write(chunk[: min(left, len(chunk))])
            os.fsync(fh.fileno())
    except OSError:
        pass  # unlink it all the same
    file.unlink(missing_ok=True)


def _params(salt: bytes) -> KdfParams:
    base = new_params()
    return KdfParams(
        salt=salt,
        time_cost=base.time_cost,
        memory_kib=base.memory_kib,
        parallelism=base.parallelism,
    )


def set_panic(path: Path, panic: str) -> None:
    if not panic:
        raise LocalProtocolError("a panic passphrase cannot be empty")
    salt = secrets.token_bytes(_SALT)
    tmp = path / (PANIC_FILE + ".tmp")
    tmp.write_bytes(salt + derive_key(panic, _params(salt)))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path / PANIC_FILE)


def is_panic(path: Path, passphrase: str) -> bool:
    try:
        raw = (path / PANIC_FILE).read_bytes()
    except OSError:
        return False
    salt, digest = raw[:_SALT], raw[_SALT:]
    return hmac.compare_digest(derive_key(passphrase, _params(salt)), digest)


def check_panic(path: Path, passphrase: str) -> None:
    """Erase the profile when ``passphrase`` is its panic passphrase, and fail as an empty
    folder does."""
    if is_panic(path, passphrase):
        erase_profile(path)
        raise LocalProtocolError(f"no profile in {path}; register or request a device first")
