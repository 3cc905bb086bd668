"""Derive the profile key from the user's passphrase with argon2id and a stored random salt."""

from __future__ import annotations

import os

import msgspec
from argon2.low_level import Type, hash_secret_raw


class KdfParams(msgspec.Struct, frozen=True):
    salt: bytes
    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 1


def new_params(*, time_cost: int = 3, memory_kib: int = 64 * 1024) -> KdfParams:
    return KdfParams(salt=os.urandom(16), time_cost=time_cost, memory_kib=memory_kib)


def derive_key(passphrase: str, params: KdfParams) -> bytes:
    """32 bytes for AEAD and vodozemac pickles; vodozemac itself does no stretching."""
    return hash_secret_raw(
        secret=passphrase.encode(),
        salt=params.salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        type=Type.ID,
    )
