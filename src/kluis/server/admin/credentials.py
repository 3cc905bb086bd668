"""Console credentials: password hashes, TOTP secrets at rest, session and CSRF tokens.

Theory of operation:
- a password is kept only as an argon2id hash (argon2-cffi's defaults, RFC 9106 low-memory);
- a TOTP secret must be readable by the server (it computes the expected code), so it cannot be
  hashed: it is encrypted (ChaCha20-Poly1305, bound to the user's name) under a 256-bit key kept
  in ``admin.key`` beside the database, mode 0600. A copy of the database alone holds no usable
  TOTP secret; a thief with both files can compute codes, and still needs the password, which
  only the argon2id hash stands for;
- a session token is 256 random bits in the cookie; the server keeps only its SHA-256 (a
  stolen database lists no live token), with an absolute expiry;
- the CSRF token of a session is HMAC-SHA256(session token, "csrf"): nothing more to store, it
  dies with the session, and a page that does not know the cookie cannot compute it. Before
  login, the login form is tied the same way to a random pre-session cookie.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from kluis.crypto.aead import RecordCipher
from kluis.errors import DecryptionError

KEY_FILE = "admin.key"
TOTP_ISSUER = "Kluis"
_hasher = PasswordHasher()  # argon2id


@functools.cache
def _decoy_hash() -> str:
    """Checked when the name is unknown, so that a wrong name costs as long as a wrong password.
    Made at the first login, not at import: every `kluis` command imports this module, and one
    argon2id hash takes 64 MiB and a good part of a second."""
    return _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    """Constant work whether or not the user exists (``stored`` None checks a decoy)."""
    try:
        ok = _hasher.verify(stored or _decoy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False
    return ok and stored is not None


def new_token() -> str:
    """A 256-bit random token, URL-safe."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def token_hash(token: str) -> bytes:
    return hashlib.sha256(b"kluis-admin-session\0" + token.encode()).digest()


def csrf_for(token: str) -> str:
    mac = hmac.new(token.encode(), b"kluis-admin-csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def csrf_ok(token: str, submitted: str) -> bool:
    return hmac.compare_digest(csrf_for(token).encode(), submitted.encode())


def new_totp_secret() -> str:
    return pyotp.random_base32(32)  # 160 bits


def provisioning_uri(name: str, secret: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=TOTP_ISSUER)


def totp_step(secret: str, code: str, now: float) -> int | None:
    """The time step ``code`` is valid for (this one or the one before or after), or None."""
    code = code.strip().replace(" ", "")
    totp = pyotp.TOTP(secret)
    step = int(now) // totp.interval
    for candidate in (step, step - 1, step + 1):
        if hmac.compare_digest(totp.at(candidate * totp.interval), code):
            return candidate
    return None


class SecretBox:
    """Encrypts TOTP secrets under the key in ``admin.key`` (created 0600 on first use)."""

    def __init__(self, key: bytes) -> None:
        self._cipher = RecordCipher(key)

    @classmethod
    def open(cls, data_dir: Path) -> SecretBox:
        path = data_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != 32:
                raise ValueError(f"{path} is damaged: expected a 32-byte key") from None
            return cls(key)
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return cls(key)

    def seal(self, name: str, secret: str) -> bytes:
        return self._cipher.encrypt(secret.encode(), b"kluis-admin-totp\0" + name.encode())

    def open_secret(self, name: str, blob: bytes) -> str | None:
        try:
            return self._cipher.decrypt(blob, b"kluis-admin-totp\0" + name.encode()).decode()
        except DecryptionError:
            return None
