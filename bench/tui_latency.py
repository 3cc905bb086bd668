"""Enter-to-peer latency of the Textual app: two app instances on a loopback server.

Run: ``python -m bench.tui_latency [N] [--daemon]`` (N messages, 50 by default, at most 500;
``--daemon``: each app attached to a ``kluis daemon`` process holding its profile, so a message
also crosses the daemon's socket on each side). Starts a
server process on a free loopback port, registers two profiles (cheap KDF), opens both in
:class:`~kluis.apps.tui.app.KluisApp` under Textual's pilot (headless, 80x24, one process, one
UI event loop and one client thread per app), opens the conversation on both sides, then for
each message: put the text in Alice's compose box, take the time, press Enter in Alice's app
and wait until the text is in a line of Bob's chat view (polled every millisecond; 10 s bound).
Messages go one at a time: after each, the process is let go idle (``pilot.pause()``) before the
next, untimed, so a message does not queue behind the receipts of the one before.

The Enter key goes to Alice's app the way ``pilot.press`` delivers it (an ``events.Key`` through
the app's driver) but without ``press``'s own wait until the whole process is idle: that wait
(``wait_for_idle``: 20 ms slices until one uses under 1 ms of CPU) ran until the receipts that
follow each message were done, and was timed with it, so figures taken before this change
(p50 125 to 200 ms) measured that, not Enter to the peer.

Prints p50, p90, p99 and max in milliseconds, and the CPU time the process (both apps and both
clients; the server is another process) spent per message, as JSON; it writes no result file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.kluis_testing import PASSPHRASE, ServerProcess, register
from textual import events
from textual.widgets import Input

from bench.common import latency_fields, machine
from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.widgets import ChatLog, ComposeArea
from kluis.crypto.profile_key import new_params

MAX_MESSAGES = 500
WAIT_S = 10.0


def _app(profile: Path, server: ServerProcess) -> KluisApp:
    return KluisApp(
        profile,
        cursor_blink=False,
        kdf=new_params(time_cost=1, memory_kib=8 * 1024),
        default_server=server.url,
    )


def _main(app: KluisApp) -> MainScreen | None:
    screen = app.screen
    return screen if isinstance(screen, MainScreen) else None


async def _wait(check: Any, timeout: float = WAIT_S, step: float = 0.001) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError("the app did not get there in time")
        await asyncio.sleep(step)


def _shows(log: ChatLog, marker: str) -> bool:
    return any(marker in "".join(s.text for s in strip) for strip in log.lines[-6:])


def _daemon(profile: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KLUIS_PASSPHRASE": PASSPHRASE}
    command = [sys.executable, "-m", "kluis.apps.cli", "daemon", "--profile", str(profile)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(count: int, tmp: Path, *, via_daemon: bool = False) -> dict[str, Any]:
    server = ServerProcess(tmp / "server")
    server.start()
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        ids = []
        for name in ("alice", "bob"):
            client = await register(server, tmp / name)
            ids.append(client.account_id)
            await client.close()
        alice_id, bob_id = ids
        if via_daemon:
            daemons = [_daemon(tmp / name) for name in ("alice", "bob")]
            await _wait(lambda: all((tmp / n / "daemon.sock").exists() for n in ("alice", "bob")))
        alice, bob = _app(tmp / "alice", server), _app(tmp / "bob", server)
        async with alice.run_test(size=(80, 24)) as a, bob.run_test(size=(80, 24)) as b:
            for app, pilot in ((alice, a), (bob, b)):
                await pilot.pause()
                if not via_daemon:  # attached to a daemon, the app asks for no passphrase
                    app.screen.query_one("#passphrase", Input).value = PASSPHRASE
                    await pilot.press("enter")
            for app in (alice, bob):
                await _wait(lambda app=app: (s := _main(app)) is not None and s.online is True)
            sender, receiver = _main(alice), _main(bob)
            assert sender is not None and receiver is not None
            sender.open_conversation(bob_id)
            receiver.open_conversation(alice_id)
            compose = sender.query_one(ComposeArea)
            compose.focus()
            log = receiver.query_one(ChatLog)
            await a.pause(0.2)
            await b.pause(0.2)
            driver = alice._driver
            assert driver is not None
            latencies, cpu = [], 0.0
            for k in range(count):
                marker = f"m{k:04d}-{time.monotonic_ns() % 10**6:06d}"
                compose.text = marker
                await a.pause()  # idle: the message before and its receipts are done
                cpu_started, started = time.process_time(), time.perf_counter()
                driver.send_message(events.Key("enter", "\r"))
                await _wait(lambda marker=marker: _shows(log, marker))
                latencies.append(time.perf_counter() - started)
                await a.pause()  # the sender's own view and the receipts: counted in the CPU
                cpu += time.process_time() - cpu_started
        fields = {k: round(v, 2) for k, v in latency_fields(latencies).items()}
        # the app's process only: a daemon's own CPU is not in it
        cpu_ms = round(cpu * 1000 / count, 1)
        return {
            "messages": count,
            "via_daemon": via_daemon,
            **fields,
            "cpu_ms_per_message": cpu_ms,
            "machine": machine(),
        }
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(10)
        server.stop()


def main(count: int = 50, *, via_daemon: bool = False) -> None:
    count = max(1, min(count, MAX_MESSAGES))
    with tempfile.TemporaryDirectory(prefix="kluis-tui-latency-") as tmp:
        result = asyncio.run(measure(count, Path(tmp), via_daemon=via_daemon))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    numbers = [a for a in sys.argv[1:] if a != "--daemon"]
    main(int(numbers[0]) if numbers else 50, via_daemon="--daemon" in sys.argv[1:])
