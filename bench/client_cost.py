"""Client CPU and SQLite statements per 1:1 send and per receive, on the encrypted profile.

Replays the calls ``KluisClient.send`` and ``KluisClient.receive`` make into the core (device
checks, session look-up, encryption, history, the sync copy for our own devices; unsealing,
decryption, replay marks, recovery bookkeeping) with no network in between, so the figures are
the client's own cost. A receive handles a ``Deliver`` push as ``_handle_deliver`` does: one
transaction per push (``ClientCore.batch``), so its cost depends on how many envelopes a push
carries: BATCH of them (a backlog comes in pushes of up to 256; a live conversation often
brings one at a time, also measured). Run: ``python -m bench.client_cost [N [ROUNDS [BATCH]]]``.
"""

from __future__ import annotations

import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
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


def receive(core: ClientCore, envs: list[OutEnvelope], first_id: int) -> None:
    """As KluisClient.receive for one push of envelopes from a known device."""
    with core.batch() if len(envs) > 1 else nullcontext():
        for i, env in enumerate(envs):
            opened = core.open_envelope(InEnvelope(id=first_id + i, body=env.body))
            assert opened is not None
            assert core.knows_device(opened.sealed.account, opened.sealed.device)
            assert core.decrypt(opened) is not None
    core.due_recoveries()


def main(n: int = 200, rounds: int = 5, batch: int = 50) -> None:
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
        receive(bob, [send(alice, bob.account_id, "warm-up")], 1)  # the pre-key message
        receive(alice, [send(bob, alice.account_id, "warm-up")], 1)
        sent_stmts, recv_stmts = counter(alice), counter(bob)
        send_cpu: list[float] = []
        recv_cpu: dict[int, list[float]] = {batch: [], 1: []}
        recv_count = dict.fromkeys(recv_cpu, 0)
        env_id = 2
        for _ in range(rounds):  # the median round: other load on the machine comes and goes
            for size in recv_cpu:
                envs = []
                t = time.process_time()
                for i in range(n):
                    envs.append(send(alice, bob.account_id, f"message {i} " + "x" * 60))
                send_cpu.append((time.process_time() - t) / n)
                before = recv_stmts[0]
                t = time.process_time()
                for start in range(0, n, size):
                    receive(bob, envs[start : start + size], env_id)
                    env_id += size
                recv_cpu[size].append((time.process_time() - t) / n)
                recv_count[size] += recv_stmts[0] - before
        total = n * rounds
        print(
            f"per send: {statistics.median(send_cpu) * 1e3:.3f} ms CPU, "
            f"{sent_stmts[0] / (total * len(recv_cpu)):.1f} statements; "
            + "; ".join(
                f"per receive in pushes of {size}: {statistics.median(cpu) * 1e3:.3f} ms CPU, "
                f"{recv_count[size] / total:.1f} statements"
                for size, cpu in recv_cpu.items()
            )
            + f" (median of {rounds} rounds of {n}, encrypted SQLite profile, synchronous=FULL)"
        )
        alice.store.close()
        bob.store.close()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
