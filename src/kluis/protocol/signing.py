"""The exact bytes every Ed25519 signature in Kluis covers.

Each message starts with its own context string so that a signature made for one purpose can
never be replayed as another (a challenge signature is not an approval, and so on). Fields are
joined with a 0x00 byte; none of them can contain one (base64 and base32 text only).
"""

from __future__ import annotations

from kluis.protocol.frames import DeviceKeys


def _join(context: bytes, *parts: str | bytes) -> bytes:
    out = [context]
    for p in parts:
        out.append(p.encode() if isinstance(p, str) else p)
    return b"\x00".join(out)


def device_keys_message(ed25519: str, curve25519: str, seal: str) -> bytes:
    """What a device signs to bind its Olm and sealing keys to its Ed25519 identity."""
    return _join(b"kluis-device-keys-v1", ed25519, curve25519, seal)


def challenge_message(nonce: bytes, device: str) -> bytes:
    """What a device signs to log in: the server's fresh nonce and its own identity."""
    return _join(b"kluis-auth-v1", nonce, device)


def approval_message(account: str, keys: DeviceKeys) -> bytes:
    """What an existing device signs to admit a new device into the account."""
    return _join(b"kluis-approve-v1", account, keys.ed25519, keys.curve25519, keys.seal)


def one_time_key_message(device: str, key_id: str, key: str) -> bytes:
    """What a device signs over each one-time or fallback key it publishes."""
    return _join(b"kluis-otk-v1", device, key_id, key)
