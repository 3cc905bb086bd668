"""The decoders of the PostgreSQL seizure audit and of the storage key file, fed anything: a heap
page parser that meets a damaged or foreign file, and a key file that is not one."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from kluis.audit.postgres import PAGE, heap_tuples
from kluis.errors import StorageKeyError
from kluis.server.store.sealing import KeyRing
from tests.test_fuzz import BUDGET


def heap_page(tuples: list[tuple[int, int, bytes]]) -> bytes:
    """A heap page as PostgreSQL lays it out: header, line pointers, tuples from the end."""
    page = bytearray(PAGE)
    upper = PAGE
    pointers = []
    for xmin, xmax, data in tuples:
        header = struct.pack("<IIIHHHHHB", xmin, xmax, 0, 0, 0, 1, 2, 0, 24) + b"\0"
        item = header + data
        upper = (upper - len(item)) & ~7
        page[upper : upper + len(item)] = item
        pointers.append(upper | (1 << 15) | (len(item) << 17))
    lower = 24 + 4 * len(pointers)
    struct.pack_into("<HHHH", page, 12, lower, upper, PAGE, PAGE | 4)
    for i, lp in enumerate(pointers):
        struct.pack_into("<I", page, 24 + 4 * i, lp)
    return bytes(page)


def test_heap_tuples_reads_what_postgresql_writes() -> None:
    page = heap_page([(7, 0, b"alpha"), (9, 12, b"beta and more")])
    assert list(heap_tuples(page + bytes(PAGE))) == [
        (7, 0, False, b"alpha"),
        (9, 12, False, b"beta and more"),
    ]


@BUDGET
@given(st.binary(max_size=3 * PAGE), st.lists(st.integers(0, PAGE - 1), max_size=8))
def test_heap_tuples_never_fails_on_damaged_pages(noise: bytes, flips: list[int]) -> None:
    page = bytearray(heap_page([(1, 2, b"x" * 40)]) + noise)
    for at in flips:
        page[at] ^= 0xFF
    for xmin, xmax, _, data in heap_tuples(bytes(page)):
        assert 0 <= xmin < 2**32 and 0 <= xmax < 2**32 and len(data) < PAGE


@BUDGET
@given(st.binary(max_size=300))
def test_a_key_file_of_any_bytes_is_a_key_ring_or_a_typed_error(data: bytes) -> None:
    try:
        KeyRing.decode(data)
    except StorageKeyError as exc:
        assert exc.code == "storage_key"


@BUDGET
@given(st.binary(max_size=80), st.integers(-(2**40), 2**40))
def test_any_wrapped_value_opens_or_is_a_typed_error(wrapped: bytes, epoch: int) -> None:
    ring = KeyRing.new(1_800_000_000, 3600, lambda n: b"\x05" * n)
    try:
        ring.unwrap(wrapped, epoch, ring.version)
    except StorageKeyError as exc:
        assert exc.code == "storage_key"
    assert ring.key.hex() not in repr(ring)  # a ring in a log line shows no key
