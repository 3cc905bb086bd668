"""Client CPU and SQLite statements per 1:1 send and per receive, on the encrypted profile.

Replays the calls ``KluisClient.send`` and ``KluisClient.receive`` make into the core (device
checks, session look-up, encryption, history, the sync copy for our own devices; unsealing,
decryption, replay marks, recovery bookkeeping) with no network in between, so the figures are
the client's own cost. Run: ``python -m bench.client_cost [N [ROUNDS]]``.
"""

from __future__ import annotations

import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kluis.client.core import ClientCore
from kluis.client.store import ProfileStore
from kluis.crypto.profile_key import new_params
from kluis.protocol.frames import Bundle, InEnvelope, OutEnvelope


def make(path: Path) -> ClientCore:
    store = ProfileStore.create(path, "pw", new_params(time_cost=1, memory_kib=8192))
    core = ClientCore.create(
        store, "http://unused", clock=time.time, random=secrets.token_bytes, new_account=True
    )
    core.set_account(core.new_account_id())
    return core


def counter(core: ClientCore) -> list[int]:
    box = [0]
    db: sqlite3.Connection = core.store._db  # type: ignore[attr-defined]

    def count(statement: str) -> None:
        if not statement.startswith("PRAGMA data_version"):  # a cache check, no data
            box[0] += 1

    db.set_trace_callback(count)
    return box


def send(core: ClientCore, peer: str, text: str) -> OutEnvelope:
    """As KluisClient.send: to the peer's devices and our own (none here), then history."""
    payload = core.new_text(peer, text)
    core.trusted_devices(peer)
    core.devices_without_session(peer)
    (env,) = core.encrypt(peer, payload)
    core.trusted_devices(core.account_id)
    core.devices_without_session(core.account_id)
    assert core.encrypt(core.account_id, payload) == []  # our other devices: none here
    core.record_sent(payload)
    return env


def receive(core: ClientCore, env: OutEnvelope, env_id: int) -> None:
    """As KluisClient.receive for one envelope from a known device."""
    opened = core.open_envelope(InEnvelope(id=env_id, body=env.body))
    assert opened is not None
    assert core.knows_device(opened.sealed.account, opened.sealed.device)
    assert core.decrypt(opened) is not None
    core.due_recoveries()


def main(n: int = 200, rounds: int = 5) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        alice, bob = make(Path(tmp) / "alice"), make(Path(tmp) / "bob")
        for a, b in ((alice, bob), (bob, alice)):
            a.accept_devices(b.account_id, b.identity_key, [b.own_record()], [])
            a.accept_devices(a.account_id, a.identity_key, [a.own_record()], [])
        otks, _ = bob.keys_to_upload(0)
        bob.keys_published()
        alice.add_bundles(
            bob.account_id,
            [Bundle(device=bob.own_record(), one_time_key=otks[0], fallback=False)],
        )
        receive(bob, send(alice, bob.account_id, "warm-up"), 1)  # the pre-key message
        receive(alice, send(bob, alice.account_id, "warm-up"), 1)
        sent_stmts, recv_stmts = counter(alice), counter(bob)
        send_cpu: list[float] = []
        recv_cpu: list[float] = []
        env_id = 2
        for _ in range(rounds):  # the median round: other load on the machine comes and goes
            envs = []
            t = time.process_time()
            for i in range(n):
                envs.append(send(alice, bob.account_id, f"message {i} " + "x" * 60))
            send_cpu.append((time.process_time() - t) / n)
            t = time.process_time()
            for env in envs:
                receive(bob, env, env_id)
                env_id += 1
            recv_cpu.append((time.process_time() - t) / n)
        total = n * rounds
        print(
            f"per send: {statistics.median(send_cpu) * 1e3:.3f} ms CPU, "
            f"{sent_stmts[0] / total:.1f} statements; "
            f"per receive: {statistics.median(recv_cpu) * 1e3:.3f} ms CPU, "
            f"{recv_stmts[0] / total:.1f} statements "
            f"(median of {rounds} rounds of {n}, encrypted SQLite profile, synchronous=FULL)"
        )
        alice.store.close()
        bob.store.close()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
