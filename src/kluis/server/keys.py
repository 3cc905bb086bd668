"""The key directory: signed one-time keys and fallback keys, handed out one claim at a time."""

from __future__ import annotations

from collections.abc import Callable

from kluis.crypto.olm import check_curve25519, verify_signature
from kluis.errors import MalformedFrame, QuotaExceeded, UnknownDevice
from kluis.protocol import signing
from kluis.protocol.frames import Bundle, DeviceRecord, SignedKey
from kluis.server.config import Limits
from kluis.server.store.protocol import Store


def check_signed_key(device_id: str, key: SignedKey) -> None:
    try:
        check_curve25519(key.key)
    except Exception as exc:
        raise MalformedFrame("one-time key is malformed") from exc
    verify_signature(
        device_id, signing.one_time_key_message(device_id, key.key_id, key.key), key.sig
    )


class KeyDirectory:
    def __init__(self, store: Store, limits: Limits) -> None:
        self._store = store
        self._limits = limits

    async def upload(
        self, device_id: str, keys: list[SignedKey], fallback: SignedKey | None
    ) -> int:
        """Verify every signature first, then store all or nothing; return the key count."""
        if len(keys) > self._limits.max_keys_per_upload:
            raise QuotaExceeded(f"at most {self._limits.max_keys_per_upload} keys per upload")
        for k in [*keys, *([fallback] if fallback else [])]:
            check_signed_key(device_id, k)
        if await self._store.count_one_time_keys(device_id) + len(keys) > (
            self._limits.max_stored_one_time_keys
        ):
            raise QuotaExceeded("too many unclaimed one-time keys stored for this device")
        return await self._store.add_keys(device_id, keys, fallback)

    async def count(self, device_id: str) -> int:
        return await self._store.count_one_time_keys(device_id)

    async def claim(
        self,
        account_id: str,
        device_ids: list[str],
        one_time_ok: Callable[[str], bool] = lambda _: True,
    ) -> tuple[list[Bundle], list[tuple[str, int]]]:
        """One bundle per requested active device; also the devices whose count fell low, with
        that count.

        A device for which ``one_time_ok`` says no (its claim budget is spent) gets its fallback
        key in the bundle, not one of its one-time keys.
        """
        active = {r.keys.ed25519: r for r in await self._store.active_devices(account_id)}
        bundles: list[Bundle] = []
        low: list[tuple[str, int]] = []
        for device_id in dict.fromkeys(device_ids):
            record: DeviceRecord | None = active.get(device_id)
            if record is None:
                raise UnknownDevice(f"device {device_id!r} is not an active device of the account")
            if one_time_ok(device_id):
                claimed = await self._store.claim_key(device_id)
            else:
                claimed = await self._store.fallback_key(device_id)
            if claimed is None:
                raise UnknownDevice(f"device {device_id!r} has published no keys yet")
            key, fallback = claimed
            bundles.append(Bundle(device=record, one_time_key=key, fallback=fallback))
            left = await self._store.count_one_time_keys(device_id)
            if left < self._limits.keys_low_threshold:
                low.append((device_id, left))
        return bundles, low
