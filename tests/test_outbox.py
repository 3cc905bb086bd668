"""The outbox: a send that cannot reach the server is kept and goes, once, with the next
connection (in process: the server is "down" when the transport factory refuses)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from kluis.client.client import KluisClient
from kluis.client.outbox import Outbox
from kluis.client.store.memory import MemoryStore
from kluis.client.transport import MemoryTransport, Transport
from kluis.errors import NotSent, TransportError, UnknownAccount
from kluis.protocol import frames as f
from kluis.protocol.payload import Text
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import PASSPHRASE, register

T = TypeVar("T", bound=f.ServerFrame)


class Network:
    """The switch between a client and the in-process server."""

    def __init__(self, server: InProcessServer) -> None:
        self.server = server
        self.up = True
        self.lose_send_answers = 0  # the server stores a Send, its answer never arrives
        self.sends_left: int | None = None  # after this many Sends answered, the line drops
        self.close_code: int | None = None  # the server's close code, when the line drops

    def factory(self, url: str) -> Transport:
        if not self.up:
            return _Down(self.server, url)
        return _Flaky(self, url)


class _Down(MemoryTransport):
    async def connect(self, timeout: float | None = None) -> bytes:
        raise TransportError("cannot connect: the server is down")


class _Flaky(MemoryTransport):
    def __init__(self, net: Network, url: str) -> None:
        super().__init__(net.server, url)
        self._net = net

    async def request(self, make: Callable[[int], f.ClientFrame], expect: type[T]) -> T:
        if not self._net.up:
            if self._net.close_code is not None:
                code = self._net.close_code
                raise TransportError(f"connection closed by server ({code})", close_code=code)
            raise TransportError("connection lost")
        if isinstance(make(0), f.Send) and self._net.sends_left is not None:
            if self._net.sends_left == 0:
                self._net.up = False
                raise TransportError("connection lost")
            self._net.sends_left -= 1
        answer = await super().request(make, expect)
        if isinstance(make(0), f.Send) and self._net.lose_send_answers:
            self._net.lose_send_answers -= 1
            raise TransportError("connection lost before the answer")
        return answer


async def _texts(client: KluisClient) -> list[str]:
    await client.receive()
    return [m.text for _, m in client.core.unshown()]


async def test_send_while_down_is_kept_and_goes_once_with_the_next_connect(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    net = Network(inproc)
    await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    net.up = False
    with pytest.raises(NotSent):
        await alice.send(bob.account_id, "first, while down")
    alice.keep(bob.account_id, "second, kept offline")
    assert [p.text for p in alice.outbox()] == ["first, while down", "second, kept offline"]
    assert alice.history(bob.account_id) == []  # not sent: not in history yet
    await alice.close()

    net.up = True
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()  # sends what waits
    assert alice.outbox() == []
    assert [m.text for m in alice.history(bob.account_id)] == [
        "first, while down",
        "second, kept offline",
    ]
    assert await _texts(bob) == ["first, while down", "second, kept offline"]
    await alice.connect()
    await alice.send(bob.account_id, "third")
    assert await _texts(bob) == ["first, while down", "second, kept offline", "third"]
    await alice.close()
    await bob.close()


async def test_a_send_cut_by_a_draining_node_keeps_its_close_code(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    """NotSent carries the close code of what stopped the send: told 1001 (the node drains),
    the caller reconnects at once instead of treating it as a connection lost."""
    net = Network(inproc)
    await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    net.up, net.close_code = False, 1001
    with pytest.raises(NotSent) as refused:
        await alice.send(bob.account_id, "as the node drains")
    assert refused.value.details.get("close_code") == 1001
    assert [p.text for p in alice.outbox()] == ["as the node drains"]
    await alice.close()
    await bob.close()


async def test_a_lost_answer_is_sent_again_and_shown_once(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    net = Network(inproc)
    await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    net.lose_send_answers = 1  # stored by the server, but alice cannot know
    with pytest.raises(NotSent):
        await alice.send(bob.account_id, "maybe sent")
    await alice.close()
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    assert alice.outbox() == []
    assert await _texts(bob) == ["maybe sent"]  # the same payload ID: the copy is a duplicate
    await alice.close()
    await bob.close()


async def test_a_refused_send_is_not_kept_and_a_refused_retry_is_dropped(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    net = Network(inproc)
    await register(inproc, tmp_path / "alice")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    nobody = "a" * 16
    with pytest.raises(UnknownAccount):
        await alice.send(nobody, "refused")
    assert alice.outbox() == []
    alice.keep(nobody, "kept offline, refused later")
    await alice.close()
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    assert alice.outbox() == []
    [(pending, err)] = alice.outbox_errors
    assert pending.text == "kept offline, refused later" and isinstance(err, UnknownAccount)
    await alice.close()


def test_outbox_records_round_trip_and_replace() -> None:
    box = Outbox(MemoryStore())
    a = Text(id=b"\x01" * 16, ts=2000, text="later", to="x" * 16)
    b = Text(id=b"\x02" * 16, ts=1000, text="earlier", to="y" * 16)
    box.keep(a, 5)
    box.keep(b, 6)
    box.keep(a, 7)  # the same ID replaces
    assert [p.text for p in box.pending()] == ["later", "earlier"] and len(box) == 2
    box.done(b.id)
    assert [p.id for p in box.pending()] == [a.id]


async def test_a_send_stored_before_the_line_drops_is_not_reported_as_failed(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    """The message is stored; the read receipt sent after it is what the lost line takes: the
    send must succeed (a failure would make the user send it again), the receipt waits."""
    net = Network(inproc)
    await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE, transport_factory=net.factory)
    await alice.connect()
    await bob.send(alice.account_id, "read me")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["read me"]
    alice.core.features.conversations.mark_read(bob.account_id)  # as `kluis history` does
    assert alice.core.features.receipts.pending()  # a read receipt waits in the profile
    net.sends_left = 1  # the message goes; the line drops before the receipt
    sent = await alice.send(bob.account_id, "stored")
    assert sent.text == "stored" and alice.outbox() == []
    assert alice.core.features.receipts.pending()  # still waiting, for the next command
    assert [m.text for m in await bob.receive()] == ["stored"]
    await alice.close()
    await bob.close()
