"""Crash safety, Jepsen-style: kill -9 at random points, then check what survived.

- The server is killed at random moments of a live message stream (sender and receiver both
  busy), restarted, and the stream goes on; at the end, every message whose send the server
  acknowledged has been shown to the recipient exactly once, and nothing was shown twice.
- A process writing to a client profile is killed at random moments; the profile still opens with
  its passphrase, every record decrypts, and every transaction reported committed is there.

Bounded: ``KLUIS_CRASH_ROUNDS`` rounds each (default 6); ``KLUIS_CRASH_SEED`` picks the moments.
A longer soak: ``KLUIS_CRASH_ROUNDS=100 pytest tests/integration/test_crash_safety.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kluis.client.client import KluisClient
from kluis.client.store import ProfileStore
from kluis.errors import KluisError
from tests.kluis_testing import PASSPHRASE, ServerProcess, register

ROUNDS = int(os.environ.get("KLUIS_CRASH_ROUNDS", "6"))
SEED = int(os.environ.get("KLUIS_CRASH_SEED", "7"))


async def reopen(profile: Path) -> KluisClient:
    client = KluisClient.open(profile, PASSPHRASE)
    await client.connect()
    return client


async def test_kill_at_random_points_of_a_stream(server: ServerProcess, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice_id, bob_id = alice.account_id, bob.account_id
    acked: list[str] = []  # sends the server acknowledged
    shown: list[str] = []  # what the recipient's client showed
    counter = 0

    async def sender(client: KluisClient, round_no: int) -> None:
        nonlocal counter
        while True:
            text = f"r{round_no}-m{counter}"
            counter += 1
            try:
                await client.send(bob_id, text)
            except KluisError:
                return  # the server died: this one may or may not have been stored
            acked.append(text)

    async def receiver(client: KluisClient) -> None:
        while True:
            try:
                got = await client.receive(wait=0.1)
            except KluisError:
                return
            shown.extend(m.text for m in got)

    for round_no in range(ROUNDS):
        tasks = [
            asyncio.create_task(sender(alice, round_no)),
            asyncio.create_task(receiver(bob)),
        ]
        await asyncio.sleep(rng.uniform(0.05, 0.8))
        server.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await alice.close()
        await bob.close()
        server.start()
        alice = await reopen(tmp_path / "alice")
        bob = await reopen(tmp_path / "bob")

    shown.extend(m.text for m in await bob.receive(wait=1))
    counts = Counter(shown)
    assert len(acked) >= ROUNDS, "the stream hardly ran"
    lost = [t for t in acked if counts[t] != 1]
    assert not lost, "an acknowledged message was lost"
    assert max(counts.values()) == 1, "a message was shown twice"
    sent = {f"r{r}-m{i}" for r in range(ROUNDS) for i in range(counter)}
    assert set(shown) <= sent
    history = Counter(m.text for m in bob.history(alice_id))
    assert history == counts  # the profile holds exactly what was shown
    assert bob.errors == [] and alice.errors == []
    await alice.close()
    await bob.close()


WRITER = """
import sys
from pathlib import Path
from kluis.client.store import ProfileStore
from kluis.crypto.profile_key import new_params
print("ready", flush=True)  # imports done: the test's clock starts here
path = Path(sys.argv[1])
if ProfileStore.exists(path):
    store = ProfileStore.open(path, "pw")
else:
    store = ProfileStore.create(path, "pw", new_params(time_cost=1, memory_kib=8192))
start = len(store.messages())
for i in range(start, start + 1_000_000):
    with store.transaction():
        store.put(f"slot{i % 20}", str(i).encode() * 100)
        store.add_message("peer", f"m{i}".encode())
    print(i, flush=True)
"""


def test_profile_store_survives_kill_during_writes(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    profile = tmp_path / "profile"
    committed = -1
    for _ in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(profile)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        # Timed from the end of the imports, which under load alone can outlast any fixed sleep.
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))  # sometimes during create or open, mostly mid-write
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
        lines = out.split()
        if lines:
            committed = int(lines[-1])
        if not ProfileStore.exists(profile):
            assert committed == -1  # killed before the profile existed: nothing half-made
            continue
        store = ProfileStore.open(profile, "pw")  # the passphrase still opens it
        try:
            messages = store.messages()  # every record decrypts (or this raises)
            want = [f"m{i}".encode() for i in range(len(messages))]
            assert messages == want  # in order, none twice, no gap
            assert len(messages) >= committed + 1  # everything reported committed is there
            for slot in store.names("slot"):
                value = store.get(slot)
                assert value is not None and len(value) % 100 == 0
        finally:
            store.close()
    assert committed > 0, "the writer never got going"
