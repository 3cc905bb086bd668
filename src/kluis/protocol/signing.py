"""The exact bytes every Ed25519 signature in Kluis covers.

Each message starts with its own context string so that a signature made for one purpose can
never be replayed as another (a challenge signature is not a certificate, and so on). Fields are
joined with a 0x00 byte; none of them can contain one (base64, base32 and URL text only).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from kluis.protocol.frames import DeviceKeys

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def _join(context: bytes, *parts: str | bytes) -> bytes:
    out = [context]
    for p in parts:
        out.append(p.encode() if isinstance(p, str) else p)
    return b"\x00".join(out)


def origin(url: str) -> str:
    """``scheme://host:port`` of a server URL, the form a login signature is bound to.

    ``ws``/``wss`` count as ``http``/``https`` (the same server), the path is dropped and the
    port is always written, so each server has one spelling.
    """
    parts = urlsplit(url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a server URL: {url!r}")
    port = parts.port or _DEFAULT_PORTS[scheme]
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def device_keys_message(ed25519: str, curve25519: str, seal: str) -> bytes:
    """What a device signs to bind its Olm and sealing keys to its Ed25519 identity."""
    return _join(b"kluis-device-keys-v1", ed25519, curve25519, seal)


def challenge_message(nonce: bytes, device: str, server: str) -> bytes:
    """What a device signs to log in: the server's fresh nonce, its own identity, and the
    server's origin, so a login cannot be relayed to another server."""
    return _join(b"kluis-auth-v2", nonce, device, server)


def device_cert_message(account: str, keys: DeviceKeys) -> bytes:
    """What an account's identity key signs to make ``keys`` a device of ``account``."""
    return _join(b"kluis-device-cert-v1", account, keys.ed25519, keys.curve25519, keys.seal)


def revocation_message(account: str, device: str) -> bytes:
    """What the account's identity key (or the device itself) signs to revoke ``device``."""
    return _join(b"kluis-revoke-v1", account, device)


def one_time_key_message(device: str, key_id: str, key: str) -> bytes:
    """What a device signs over each one-time or fallback key it publishes."""
    return _join(b"kluis-otk-v1", device, key_id, key)


def group_update_message(
    group: str,
    update_id: bytes,
    action: str,
    name: str,
    members: list[str],
    version: int,
    account: str,
    device: str,
) -> bytes:
    """What a member device signs over a change to a group (a name may hold any character, so
    the fields are one msgpack array rather than joined text)."""
    fields = [group, update_id, action, name, members, version, account, device]
    return _join(b"kluis-group-update-v1", msgspec.msgpack.encode(fields))
