"""Derive the profile key from the user's passphrase with argon2id and a stored random salt."""

from __future__ import annotations

import secrets
from typing import Annotated

import msgspec
from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw

from kluis.errors import LocalProtocolError


class KdfParams(msgspec.Struct, frozen=True):
    # Bounded: the parameters are read back from profile.json, and a damaged file must give an
    # error, not an argon2 crash or a run of days (time_cost) or terabytes (memory_kib).
    salt: Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
    time_cost: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    memory_kib: Annotated[int, msgspec.Meta(ge=8 * 1024, le=4 * 1024 * 1024)] = 64 * 1024
    parallelism: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1


def new_params(*, time_cost: int = 3, memory_kib: int = 64 * 1024) -> KdfParams:
    return KdfParams(salt=secrets.token_bytes(16), time_cost=time_cost, memory_kib=memory_kib)


def derive_key(passphrase: str, params: KdfParams) -> bytes:
    """32 bytes for AEAD and vodozemac pickles; vodozemac itself does no stretching."""
    try:
        return hash_secret_raw(
            secret=passphrase.encode(),
            salt=params.salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=32,
            type=Type.ID,
        )
    except (HashingError, OverflowError, MemoryError) as exc:
        raise LocalProtocolError(f"argon2id refused the profile's parameters: {exc}") from exc
