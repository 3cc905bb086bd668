"""The server process is killed (SIGKILL) between send and receive: nothing lost, nothing twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.protocol import frames as f
from tests.kluis_testing import PASSPHRASE, ServerProcess, register


async def reopen(profile: Path) -> KluisClient:
    client = KluisClient.open(profile, PASSPHRASE)
    await client.connect()
    return client


async def test_kill_between_send_and_receive(server: ServerProcess, tmp_path: Path) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    bob_id = bob.account_id
    await bob.close()
    sent = [f"durable {i}" for i in range(10)]
    for text in sent:
        await alice.send(bob_id, text)  # returns once the server has committed it
    await alice.close()

    server.kill()
    server.start()

    bob = await reopen(tmp_path / "bob")
    got = await bob.receive()
    assert [m.text for m in got] == sent
    await bob.close()
    server.kill()
    server.start()
    bob = await reopen(tmp_path / "bob")
    assert await bob.receive() == []  # acknowledged before the kill: gone for good
    assert [m.text for m in bob.history(alice.account_id)] == sent
    await bob.close()


async def test_kill_after_decrypt_before_ack_shows_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, "decrypted but never acknowledged")

    # Bob decrypts and stores the message, but the acknowledgement never reaches the server.
    original = bob.transport.request

    async def drop_acks(make, expect):  # type: ignore[no-untyped-def]
        frame = make(0)
        if isinstance(frame, f.Ack):
            server.kill()
            raise ConnectionError("server died")
        return await original(make, expect)

    bob.transport.request = drop_acks  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await bob.receive(wait=5, until=1)
    await bob.close()
    await alice.close()
    offline = KluisClient.open(tmp_path / "bob", PASSPHRASE)
    assert [m.text for m in offline.history()] == ["decrypted but never acknowledged"]
    await offline.close()

    server.start()
    bob = await reopen(tmp_path / "bob")
    assert await bob.receive() == []  # redelivered, recognised, acknowledged, not shown again
    assert [m.text for m in bob.history()] == ["decrypted but never acknowledged"]
    await bob.close()
    bob = await reopen(tmp_path / "bob")
    assert await bob.receive() == []
    await bob.close()
