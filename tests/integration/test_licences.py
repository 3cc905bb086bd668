"""Accounts exist only by redeeming a valid licence code, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.client.store import ProfileStore
from kluis.errors import LicenceInvalid
from tests.kluis_testing import PASSPHRASE, ServerProcess


async def test_licence_is_single_use_and_unknown_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    (code,) = server.licences(1)
    first = await KluisClient.register(server.url, code, tmp_path / "a", PASSPHRASE)
    assert len(first.account_id) == 16
    await first.close()

    with pytest.raises(LicenceInvalid):
        await KluisClient.register(server.url, code, tmp_path / "b", PASSPHRASE)
    assert not ProfileStore.exists(tmp_path / "b")  # a refused code leaves no profile behind

    with pytest.raises(LicenceInvalid):
        await KluisClient.register(
            server.url, "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF", tmp_path / "c", PASSPHRASE
        )

    # The refused attempts cost nothing: a fresh code still works in the same folder.
    (code2,) = server.licences(1)
    second = await KluisClient.register(server.url, code2.lower(), tmp_path / "b", PASSPHRASE)
    assert second.account_id != first.account_id
    await second.close()


def test_licence_codes_are_random_and_stored_hashed(server: ServerProcess) -> None:
    codes = server.licences(20, days=30)
    assert len(set(codes)) == 20
    for code in codes:
        assert len(code.replace("-", "")) == 24  # 120 bits of base32
    data = (server.data / "kluis.sqlite3").read_bytes()
    wal = server.data / "kluis.sqlite3-wal"
    data += wal.read_bytes() if wal.exists() else b""
    for code in codes:
        assert code.replace("-", "").encode() not in data
