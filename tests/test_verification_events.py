"""SAS verification driven through ``KluisClient.events()`` (as the app does it), between two
clients of an in-process server: no second reader of the connection, and each step reported
as an event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from kluis.client.client import KluisClient
from kluis.client.events import (
    Event,
    MessageReceived,
    VerificationChanged,
    VerificationRequested,
)
from kluis.client.verification import State, Status
from kluis.errors import UntrustedDevice
from kluis.protocol.payload import Payload
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import register

Queue = asyncio.Queue[Event]


async def follow(client: KluisClient, into: asyncio.Queue[Event]) -> None:
    async for event in client.events():
        await into.put(event)


@contextlib.asynccontextmanager
async def following(
    inproc: InProcessServer, tmp_path: Path
) -> AsyncIterator[tuple[KluisClient, KluisClient, Queue, Queue, list[asyncio.Task[None]]]]:
    """Alice and Bob, each with ``events()`` followed into a queue (qa, qb) by a task."""
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    qa: Queue = asyncio.Queue()
    qb: Queue = asyncio.Queue()
    tasks = [asyncio.create_task(follow(alice, qa)), asyncio.create_task(follow(bob, qb))]
    try:
        yield alice, bob, qa, qb, tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in (alice, bob):
            await c.close()


async def next_of(queue: asyncio.Queue[Event], kind: type, state: State | None = None) -> Event:
    async with asyncio.timeout(10):
        while True:
            event = await queue.get()
            if not isinstance(event, kind):
                continue
            if state is None or (
                isinstance(event, VerificationChanged) and event.verification.state is state
            ):
                return event


async def test_verification_through_events_when_both_confirm(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    async with following(inproc, tmp_path) as (alice, bob, qa, qb, _tasks):
        asked = await alice.start_verification(bob.account_id)
        assert asked.state is State.REQUESTED
        told = await next_of(qb, VerificationRequested)
        assert told == VerificationRequested(alice.account_id)
        await bob.start_verification(alice.account_id)
        seen = []
        for queue in (qa, qb):
            event = await next_of(queue, VerificationChanged, State.COMPARING)
            assert isinstance(event, VerificationChanged)
            seen.append(event.verification)
        assert seen[0].short_code is not None and seen[0].short_code == seen[1].short_code
        await alice.confirm_verification(seen[0].txn, True)
        await bob.confirm_verification(seen[1].txn, True)
        for queue in (qa, qb):
            await next_of(queue, VerificationChanged, State.VERIFIED)
        assert alice.verification_status(bob.account_id)[0] is Status.VERIFIED
        assert bob.verification_status(alice.account_id)[0] is Status.VERIFIED


async def test_a_declined_first_verification_leaves_both_unverified(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    async with following(inproc, tmp_path) as (alice, bob, qa, qb, _tasks):
        await alice.start_verification(bob.account_id)
        await next_of(qb, VerificationRequested)
        await bob.start_verification(alice.account_id)
        event = await next_of(qb, VerificationChanged, State.COMPARING)
        assert isinstance(event, VerificationChanged)
        await bob.cancel_verification(event.verification.txn)
        cancelled = await next_of(qa, VerificationChanged, State.CANCELLED)
        assert isinstance(cancelled, VerificationChanged)
        assert "cancelled" in cancelled.verification.reason
        assert alice.verification_status(bob.account_id)[0] is Status.UNVERIFIED
        assert bob.verification_status(alice.account_id)[0] is Status.UNVERIFIED


async def test_an_answer_that_cannot_be_sent_cancels_the_flow_and_the_stream_goes_on(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    async with following(inproc, tmp_path) as (alice, bob, _qa, qb, tasks):
        await alice.start_verification(bob.account_id)
        await next_of(qb, VerificationRequested)
        await bob.start_verification(alice.account_id)  # its accept goes out

        async def refuse(payloads: dict[str, Payload]) -> None:
            raise UntrustedDevice("no device to send to")

        bob._send_payloads = refuse  # type: ignore[method-assign]
        cancelled = await next_of(qb, VerificationChanged, State.CANCELLED)
        assert isinstance(cancelled, VerificationChanged)
        assert cancelled.verification.reason == "could not send (untrusted_device)"
        assert not tasks[1].done()  # the stream goes on
        await alice.send(bob.account_id, "still here")
        got = await next_of(qb, MessageReceived)
        assert isinstance(got, MessageReceived) and got.message.text == "still here"
