"""The ``kluis`` command: run a server, hand out licences, and message from the shell.

Exit status: 0 on success, 1 on a Kluis error (printed as ``error: CODE: message`` on stderr),
2 on a usage error. The passphrase comes from KLUIS_PASSPHRASE when set, else from a prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import importlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kluis.apps.through_daemon import IN_DAEMON
from kluis.client.groups import is_group_id
from kluis.client.records import Message
from kluis.client.store import ProfileStore
from kluis.client.timers import describe as describe_timer
from kluis.client.verification import Status, Verification
from kluis.errors import (
    KeyChanged,
    KluisError,
    LocalProtocolError,
    NotSent,
    TransportError,
    VerificationBroken,
)

if TYPE_CHECKING:
    from kluis.client.client import KluisClient
    from kluis.client.transport import Transport, TransportFactory
    from kluis.server.config import ServerConfig

DEFAULT_TIMEOUT_S = 30.0  # WebSocketTransport's own default (client/transport/websocket.py)


def _unlock(
    args: argparse.Namespace, *, network: bool = False, preload: bool | None = None
) -> KluisClient:
    """Open the profile ``--profile`` (``network``: with transports within ``--timeout``).
    Its argon2id derivation, most of an unlock, runs in a thread while this one loads the
    client's code (and, with ``preload``, by default a ``network`` command's, the WebSocket
    transport): argon2 leaves the GIL, so on two cores a command is ready about a tenth of a
    second sooner. The key is checked by the profile as always."""
    from kluis.client.store.sqlite import ProfileStore
    from kluis.crypto.profile_key import derive_key

    profile, passphrase = Path(args.profile), _passphrase()
    params = ProfileStore.kdf_params(profile)  # no profile: the error, before any work
    derived: list[bytes | BaseException] = []

    def derive() -> None:
        try:
            derived.append(derive_key(passphrase, params))
        except BaseException as exc:  # raised in the caller's thread below
            derived.append(exc)

    worker = threading.Thread(target=derive, name="kluis-unlock", daemon=True)
    worker.start()
    opener = _kluis()
    if network if preload is None else preload:  # loaded now, used at connect
        importlib.import_module("kluis.client.transport.websocket")
    worker.join()
    key = derived[0]
    if isinstance(key, BaseException):
        raise key
    if not network:
        return opener.open(profile, passphrase, key=key)
    return opener.open(profile, passphrase, transport_factory=_dial(args), key=key)


def _kluis() -> type[KluisClient]:
    """The client class, imported when a command needs it: it brings the network stack, which
    `--help`, a usage error or an offline command should not pay for at start-up."""
    from kluis.client.client import KluisClient

    return KluisClient


DEFAULT_PORT = 8448


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1 to 65535)")
    return port


def _drain_seconds(text: str) -> float:
    from kluis.server.settings import DRAIN_SECONDS  # as --config and KLUIS_DRAIN_TIMEOUT read it

    try:
        return DRAIN_SECONDS(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _passphrase(confirm: bool = False) -> str:
    """From KLUIS_PASSPHRASE, else typed at the terminal; a new profile (``confirm``) refuses
    an empty one."""
    if IN_DAEMON.get() is not None:  # a command in the daemon must never ask on its terminal
        raise LocalProtocolError("this command needs the passphrase: it cannot run in the daemon")
    env = os.environ.get("KLUIS_PASSPHRASE")
    if env is None:
        if not sys.stdin.isatty():
            raise LocalProtocolError("no passphrase: set KLUIS_PASSPHRASE or run in a terminal")
        try:
            env = getpass.getpass("Passphrase: ")
            if confirm and getpass.getpass("Passphrase again: ") != env:
                raise LocalProtocolError("the passphrases differ")
        except EOFError as exc:
            raise LocalProtocolError("no passphrase was typed") from exc
    if confirm and not env:
        raise LocalProtocolError("a profile needs a passphrase; an empty one protects nothing")
    return env


def _report(err: KluisError, level: str) -> None:
    print(f"{level}: {err}", file=sys.stderr)
    if isinstance(err, KeyChanged):
        account = err.details.get("account", "ID")
        print(
            f"  compare `kluis safety-number --profile DIR {account}` with the peer's own, then:"
            f" kluis trust --profile DIR {account}",
            file=sys.stderr,
        )
    if isinstance(err, VerificationBroken):
        account = err.details.get("account", "ID")
        print(
            f"  check it with them again: both run `kluis verify --profile DIR` with the other's ID"
            f" (you: kluis verify --profile DIR {account})",
            file=sys.stderr,
        )


def _warn(client_errors: Sequence[KluisError]) -> None:
    for err in client_errors:
        _report(err, "warning")


def _alarm(client: KluisClient) -> None:
    """Loud, on every command that connects: devices our identity did not certify."""
    for alarm in client.alarms():
        print(f"ALARM: {alarm}; it gets no messages from you or your peers", file=sys.stderr)


# ---- server side ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from kluis.server import settings
    from kluis.server.app import serve
    from kluis.server.config import DAY

    # The shortcut flags are --limit overrides too (applied after them), checked the same way.
    overrides = list(args.limit)
    if args.envelope_ttl_days is not None:
        overrides.append(f"envelope_ttl_s={int(args.envelope_ttl_days * DAY)}")
    if args.mailbox_quota is not None:
        overrides.append(f"mailbox_quota={args.mailbox_quota}")
    if args.max_frame_bytes is not None:
        overrides.append(f"max_frame_bytes={args.max_frame_bytes}")
    if args.send_rate is not None:
        overrides += [f"send_rate_per_s={args.send_rate}", f"send_burst={int(args.send_rate * 10)}"]
    # Command line > environment > config file > defaults (server/settings.py).
    config_file = args.config or os.environ.get("KLUIS_CONFIG")
    document = settings.load_file(Path(config_file)) if config_file else None
    given = {s.name: getattr(args, s.name, None) for s in settings.SETTINGS}
    config = settings.resolve(
        given,
        os.environ,
        document,
        source=config_file or "config file",
        limit_overrides=overrides,
    )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(config)


def cmd_licence_create(args: argparse.Namespace) -> None:
    from kluis.server.config import ServerConfig
    from kluis.server.operator import admin
    from kluis.server.operator.subscriptions import plan_days

    plan, days = plan_days(args.plan, args.days)
    if not 1 <= args.count <= 100_000:
        raise LocalProtocolError("--count must be 1..100000 and --days 1..36500")

    if args.data is None and args.database is None:
        raise LocalProtocolError("licence create needs --data DIR or --database URL")
    if args.database and not (args.data or args.storage_key_file):
        raise LocalProtocolError(
            "licence create --database needs --storage-key-file FILE (or --data DIR)"
        )
    config = ServerConfig(
        data_dir=Path(args.data or "."),
        database_url=args.database,
        storage_key_file=Path(args.storage_key_file) if args.storage_key_file else None,
    )
    if not config.on_postgres and not args.init and not config.database_path.exists():
        # A typo in --data must not silently start a second, empty server database.
        raise LocalProtocolError(
            f"{args.data} holds no Kluis database; check --data, or add --init to create one"
        )
    if not config.on_postgres:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    licences = admin.create_licences(config, args.count, plan, days)
    if args.csv:
        admin.write_private(Path(args.csv), admin.licences_csv(licences))
    for lic in licences:
        print(lic.code)


def cmd_audit_storage(args: argparse.Namespace) -> None:
    from kluis import audit

    data = Path(args.data)
    on_postgres = bool(args.database) and args.database.startswith(("postgres://", "postgresql://"))
    if on_postgres and args.pgdata is None:
        raise LocalProtocolError(
            "auditing PostgreSQL needs --pgdata DIR, the PostgreSQL server's data directory"
        )
    if args.pgdata is not None and not on_postgres:
        raise LocalProtocolError("--pgdata goes with --database postgresql://...")
    footprint = [] if on_postgres else audit.store_footprint(data, args.database)
    secrets = [(f"secret {i + 1}", audit.decode_secret(s)) for i, s in enumerate(args.secret)]
    for profile in args.profile:
        secrets.extend(audit.profile_secrets(Path(profile), _passphrase()))
    report = audit.audit(
        data,
        footprint=footprint,
        markers=args.marker,
        raw=[(f"bytes {h[:16]}", audit.decode_secret(h)) for h in args.bytes],
        secrets=secrets,
        extra_paths=[Path(p) for p in args.also],
        expect_empty=args.expect_empty,
    )
    if on_postgres:
        from kluis.audit.postgres import audit_postgres

        audit_postgres(
            report,
            args.database,
            Path(args.pgdata),
            key_file=Path(args.storage_key_file) if args.storage_key_file else None,
            markers=args.marker,
            raw=[(f"bytes {h[:16]}", audit.decode_secret(h)) for h in args.bytes],
            secrets=secrets,
            licences=args.licence,
            expect_empty=args.expect_empty,
        )
    for note in report.notes:
        print(f"note: {note}")
    for finding in report.findings:
        print(finding.line())
    print(f"{report.files} files scanned, {len(report.findings)} findings")
    if not report.clean:
        raise SystemExit(1)


# ---- client side ---------------------------------------------------------------------------------


def _dial(args: argparse.Namespace) -> TransportFactory:
    """WebSocket transports whose every step ends within ``--timeout`` seconds; the transport
    (the websockets library) loads when the first one is made: an offline command never does."""
    timeout = args.timeout

    def dial(url: str) -> Transport:
        from kluis.client.transport.websocket import WebSocketTransport

        return WebSocketTransport(url, timeout=timeout)

    return dial


async def _register(args: argparse.Namespace) -> None:
    client = await _kluis().register(
        args.server,
        args.licence,
        Path(args.profile),
        _passphrase(confirm=True),
        transport_factory=_dial(args),
        device_name=args.device_name or "",
    )
    await client.close()
    print(client.account_id)


async def _whoami(args: argparse.Namespace) -> None:
    given = IN_DAEMON.get()
    client = given or _unlock(args, network=True, preload=False)  # connects only when new
    try:
        if not client.account_id:  # a linked device learns its account at first login
            await client.connect()
        print(client.account_id)
        end = client.subscription_end
        if end is not None:  # as the server said at this device's last login or renewal
            # stderr: stdout stays the bare ID, as scripts take it (``$(kluis whoami ...)``)
            print(f"subscription ends on {_day(end)}", file=sys.stderr)
        _notice(client)
    finally:
        if given is None:
            await client.close()


async def _device_request(args: argparse.Namespace) -> None:
    code = await _kluis().request_link(
        args.server,
        Path(args.profile),
        _passphrase(confirm=True),
        account=args.account or "",
        transport_factory=_dial(args),
        device_name=args.device_name or "",
    )
    print(code)


def _day(stamp: int) -> str:
    return datetime.fromtimestamp(stamp, UTC).date().isoformat()


def _notice(client: KluisClient) -> None:
    """From 14 days before the subscription ends, on every command: one line on stderr."""
    notice = client.renewal_notice()
    if notice:
        print(notice, file=sys.stderr)


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace) -> AsyncIterator[KluisClient]:
    """The profile's client, logged in: opened here, or the daemon's when the command runs in
    it (see apps/through_daemon.py: the daemon's connection, never closed here)."""
    given = IN_DAEMON.get()
    if given is not None:
        if not given.connected:
            raise TransportError(
                "the kluis daemon is not connected to the server now (it retries by itself)"
            )
        yield given
        return
    client = _unlock(args, network=True)
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


@contextlib.contextmanager
def _opened(args: argparse.Namespace) -> Iterator[KluisClient]:
    """The profile's client, not connected (a command that needs no server), or the daemon's."""
    given = IN_DAEMON.get()
    if given is not None:
        yield given
        return
    client = _unlock(args)
    try:
        yield client
    finally:
        client.core.store.close()


async def _with_client(
    args: argparse.Namespace, body: Callable[[KluisClient], Awaitable[None]]
) -> None:
    async with _connected(args) as client:
        _alarm(client)
        _notice(client)
        _outbox_refused(client)
        await body(client)


NOT_SENT = "not sent yet: kept in the outbox; it goes with the next command that reaches the server"


def _outbox_refused(client: KluisClient) -> None:
    """Messages of the outbox the server refused when they were sent again: dropped, said."""
    names = client.contacts()
    for pending, err in client.outbox_errors:
        when = pending.time.isoformat(timespec="milliseconds")
        to = account_label(pending.conversation, names)
        print(
            f"warning: not sent, dropped from the outbox: to {to} at {when}: {err}", file=sys.stderr
        )
    client.outbox_errors.clear()


async def _device_approve(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print(await client.approve(args.code, name=args.name or ""))

    await _with_client(args, body)


async def _device_list(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        records = await client.devices()
        labels = client.device_labels()
        for record in records:
            device = record.keys.ed25519
            this = device == client.core.device_id
            status = client.core.device_status(record)
            label = labels.get(device)
            since = _day(label.since) if label else ""
            name = label.name if label else ""
            if args.json:
                line = {
                    "device": device,
                    "status": status,
                    "this_device": this,
                    "name": name,
                    "since": since,  # the day this profile first knew it (made, approved, listed)
                }
                print(json.dumps(line))
            else:
                mark = " (this device)" if this else ""
                print(f"{device}\t{status}\t{since or '-'}\t{safe_text(name) or '-'}{mark}")

    await _with_client(args, body)


def cmd_device_name(args: argparse.Namespace) -> None:
    """Name one of our devices in this profile (offline: the name never leaves it)."""

    def body(client: KluisClient) -> None:
        client.name_device(args.device, args.name)
        print(f"named {args.device}: {safe_text(args.name.strip())}")

    _offline(args, body)


async def _device_revoke(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.revoke(args.device)

    await _with_client(args, body)


class _Transfer:
    """A rich progress bar that appears only for a transfer that takes longer than a second."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._start = time.monotonic()
        self._bar: Any = None  # a rich Progress, made (and rich imported) only when needed
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if time.monotonic() - self._start < 1.0 or not sys.stderr.isatty():
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn(self._label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=total)
        assert self._task is not None
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def safe_text(text: str) -> str:
    r"""What a peer wrote, made safe for a terminal: printable characters only. Backslash, tab
    and newline print as ``\\``, ``\t`` and ``\n``; any other control or format character
    (escape sequences, bidirectional overrides) as ``\uXXXX``. A peer never drives the
    terminal, and a line is always one line."""
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
    return "".join(out)


def account_label(account: str, names: Mapping[str, str]) -> str:
    """``ID`` or, for a contact, ``ID (NAME)``: the ID always comes first (16 characters), so a
    script takes ``cut -c1-16`` of the field; the name is sanitised (see :func:`safe_text`)."""
    name = names.get(account, "")
    return f"{account} ({safe_text(name)})" if name else account


_RECEIPT_MARK = {"delivered": "\u2713", "read": "\u2713\u2713"}


QUOTE_CHARS = 40  # how much of a quoted message a reply shows
MISSING_QUOTE = "a message you do not have"


def quote_excerpt(quote: Message | None) -> str:
    """The first words of a quoted message, sanitised (see :func:`safe_text`), or that this
    device does not hold it (expired, never received, or of another conversation)."""
    if quote is None:
        return MISSING_QUOTE
    text = quote.text or (f"[file] {quote.attachment.name}" if quote.attachment else "")
    cut = text[:QUOTE_CHARS] + ("…" if len(text) > QUOTE_CHARS else "")
    return safe_text(cut)


def message_line(
    message: Message,
    names: Mapping[str, str] | None = None,
    *,
    receipt: bool = False,
    quote: Message | None = None,
) -> str:
    """One message as ``inbox`` and ``history`` print it, tab-separated: sender (``ID`` or
    ``ID (NAME)``), ISO time, text (sanitised: one line; a timer change reads
    ``[timer] disappearing messages: 30 s``; a reply starts ``[reply to ID8: first words]``,
    ``quote`` being the message it quotes, from :meth:`KluisClient.quoted`). With ``receipt``
    (``history``), a message we sent that a recipient acknowledged gets a fourth field: ``✓``
    delivered, ``✓✓`` read."""
    text = safe_text(message.text)
    if message.kind != "text":
        text = f"[{message.kind}] {text}"
    if message.reply_to:
        text = f"[reply to {message.reply_to.hex()[:8]}: {quote_excerpt(quote)}] {text}"
    if message.attachment is not None:
        ref = message.attachment
        text = f"[file] {safe_text(ref.name)} ({ref.size} bytes)" + (f" {text}" if text else "")
    sender = account_label(message.sender, names or {})
    if is_group_id(message.conversation):
        sender = f"{message.conversation}/{sender}"  # GROUP/SENDER
    line = f"{sender}\t{message.time.isoformat(timespec='milliseconds')}\t{text}"
    if receipt and message.receipt:
        line += "\t" + _RECEIPT_MARK[message.receipt]
    return line


def message_json(message: Message, quote: Message | None = None) -> str:
    """One message as a JSON line (``--json``): every field, text exactly as sent (JSON escapes
    what a terminal would interpret), for scripts. ``id`` (hex) is what ``send --reply-to``
    takes; a reply has ``reply_to`` (hex) and ``quote``, the quoted message's sender and text
    from this device's history of the conversation, or null when it does not hold it."""
    record: dict[str, object] = {
        "id": message.id.hex(),
        "sender": message.sender,
        "conversation": message.conversation,
        "time": message.time.isoformat(timespec="milliseconds"),
        "kind": message.kind,
        "text": message.text,
    }
    if message.attachment is not None:
        record["file"] = {"name": message.attachment.name, "size": message.attachment.size}
    if message.receipt:
        record["receipt"] = message.receipt
    if message.reply_to:
        record["reply_to"] = message.reply_to.hex()
        record["quote"] = None if quote is None else {"sender": quote.sender, "text": quote.text}
    return json.dumps(record, ensure_ascii=True)


def _print_message(
    args: argparse.Namespace, message: Message, names: Mapping[str, str], client: KluisClient
) -> None:
    quote = client.quoted(message)
    if getattr(args, "json", False):
        print(message_json(message, quote), flush=True)
    else:
        receipt = args.command == "history"
        print(message_line(message, names, receipt=receipt, quote=quote), flush=True)


def _reply_id(client: KluisClient, conversation: str, given: str | None) -> bytes:
    """``--reply-to``: 8 to 32 hex digits of a message ID of ``conversation``."""
    if given is None:
        return b""
    return client.core.find_by_prefix(conversation, given).id


async def _send_alone(args: argparse.Namespace, text: str | None) -> None:
    async def body(client: KluisClient) -> None:
        if args.file is not None:
            progress = _Transfer("upload")
            try:
                await client.send_file(args.id, args.file, text or "", progress)
            finally:
                progress.close()
        else:
            await client.send(
                args.id, text or "", reply_to=_reply_id(client, args.id, args.reply_to)
            )
        print(f"sent to {account_label(args.id, client.contacts())}")

    client = _unlock(args, network=True)
    try:
        try:
            await client.connect()
        except TransportError as exc:
            if args.file is not None:
                raise  # a file is not kept: its upload needs the server
            reply_to = _reply_id(client, args.id, args.reply_to)
            client.keep(args.id, text or "", reply_to=reply_to)  # unreachable: into the outbox
            raise SystemExit(f"{NOT_SENT} ({exc.message})") from exc
        _alarm(client)
        _outbox_refused(client)
        try:
            await body(client)
        except NotSent as exc:
            raise SystemExit(f"{NOT_SENT} ({exc.message})") from exc
    finally:
        await client.close()


async def _send(args: argparse.Namespace) -> None:
    text = args.text
    if text == "-":
        text = sys.stdin.read()
    if args.file is None and text is None:
        raise LocalProtocolError("give TEXT, - to read it from standard input, or --file PATH")
    from kluis.apps import daemon

    with daemon.daemon_or_alone(Path(args.profile), args.timeout) as rpc:
        if rpc is None:
            return await _send_alone(args, text)
        params = {"to": args.id, "text": text or ""}
        if args.reply_to is not None:
            params["reply_to"] = args.reply_to
        if args.file is not None:
            params = {"to": args.id, "file": str(Path(args.file).resolve()), "caption": text or ""}
        try:
            answer = rpc.call("send", params, longer=600.0 if args.file else 0.0)
        except NotSent as exc:
            raise SystemExit(f"{NOT_SENT} ({exc.message})") from exc
        print(f"sent to {answer['to']}")


async def _inbox(args: argparse.Namespace) -> None:
    from kluis.apps import daemon

    with daemon.daemon_or_alone(Path(args.profile), args.timeout) as rpc:
        if rpc is None:
            return await _inbox_alone(args)
        deadline = time.monotonic() + args.wait
        while True:  # printed first, then acknowledged as shown (as when alone)
            wait = max(0.0, deadline - time.monotonic())
            got = rpc.call("inbox", {"wait": wait}, longer=wait)["messages"]
            for m in got:
                print(json.dumps(m["json"]) if args.json else m["line"], flush=True)
            if got:
                rpc.call("shown", {"seq": got[-1]["seq"]})
            if time.monotonic() >= deadline:
                return


def cmd_daemon(args: argparse.Namespace) -> None:
    from kluis.apps import daemon

    coro = daemon.run(
        Path(args.profile), _passphrase(), lock_after=args.lock_after, transport_factory=_dial(args)
    )
    asyncio.run(coro)


def cmd_outbox(args: argparse.Namespace) -> None:
    """``CONVERSATION<TAB>TIME<TAB>TEXT`` per message waiting to be sent, oldest first (TEXT:
    its first 40 characters, sanitised)."""

    def body(client: KluisClient) -> None:
        names = client.contacts()
        for pending in client.outbox():
            when = pending.time.isoformat(timespec="milliseconds")
            text = safe_text(pending.text[:40]) + ("…" if len(pending.text) > 40 else "")
            print(f"{account_label(pending.conversation, names)}\t{when}\t{text}")

    _offline(args, body)


async def _fetch(args: argparse.Namespace) -> None:
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)

    async def body(client: KluisClient) -> None:
        # Only files `inbox` has shown: receiving here would hide messages from the next inbox.
        progress = _Transfer("download")
        try:
            for path in await client.fetch_files(folder, progress):
                print(path)
        finally:
            progress.close()

    await _with_client(args, body)


async def _inbox_alone(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        names = client.contacts()
        read: set[str] = set()
        errors: list[KluisError] = []

        def show() -> None:
            # Printed first, then marked shown: an interrupted inbox shows it again next time
            # rather than never (the server forgot it once it was acknowledged).
            for seq, message in client.core.unshown():
                _print_message(args, message, names, client)
                client.core.shown(seq)
                read.add(message.conversation)

        show()  # what an earlier, interrupted inbox received and did not print
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.wait
        while True:
            await client.receive(wait=max(0.0, deadline - loop.time()), until=1)
            errors += client.errors
            show()
            if loop.time() >= deadline:
                break
        for conversation in sorted(read):  # printed: read (read receipts, when on, go now)
            await client.mark_read(conversation)
        if errors:
            noun = "message" if len(errors) == 1 else "messages"
            print(f"warning: {len(errors)} {noun} could not be read (kept aside)", file=sys.stderr)
            _warn(errors)

    await _with_client(args, body)


async def _safety_number(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print(await client.safety_number(args.id))

    await _with_client(args, body)


async def _verify(args: argparse.Namespace) -> None:
    if args.status:
        with _opened(args) as client:
            status, reason = client.verification_status(args.id)
        print(f"{status.value}: {reason}" if status is Status.BROKEN else status.value)
        return
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")  # a terminal without emoji still gets the names

    async def confirm(flow: Verification) -> bool:
        code = flow.short_code
        if code is None:  # not comparing: nothing to confirm
            return False
        print(f"Compare with what {flow.peer} sees (device {flow.peer_device[:8]}…):")
        print(f"  {code.emoji_line()}")
        print(f"  {code.decimal_line()}")
        print("Do they match? [y/N] ", end="", flush=True)
        answer = await asyncio.to_thread(sys.stdin.readline)
        return answer.strip().lower() in ("y", "yes")

    async def body(client: KluisClient) -> None:
        print(
            f"verifying {args.id}: they run `kluis verify --profile DIR {client.account_id}`"
            " now; waiting …",
            file=sys.stderr,
        )
        flow = await client.verify(args.id, confirm, timeout=args.verify_timeout)
        print(f"verified: {flow.peer} (identity key and device {flow.peer_device[:8]}…)")

    await _with_client(args, body)


def cmd_history(args: argparse.Namespace) -> None:
    with _opened(args) as client:
        names = client.contacts()
        for message in client.history(args.id):
            _print_message(args, message, names, client)
        # Printed: read. history works offline, so its read receipts (when on) wait in the
        # profile and go with the next command that connects (inbox, send, ...).
        client.core.features.conversations.mark_read(args.id)


async def _group_create(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print((await client.create_group(args.name, args.ids)).id)

    await _with_client(args, body)


async def _group_change(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.change_group(args.group, args.action, getattr(args, "ids", None))

    await _with_client(args, body)


def cmd_group_members(args: argparse.Namespace) -> None:
    with _opened(args) as client:
        state = client.group(args.group)
        print(f"{state.id}\t{state.name}" + ("" if state.member else "\t(you left)"))
        for account in state.members:
            print(account + ("\t(you)" if account == client.account_id else ""))


def cmd_trust(args: argparse.Namespace) -> None:
    # Devices are certified by their account's identity, and an ID names its identity: there
    # is no key change to accept any more. Kept so that scripts calling it get an answer.
    print(
        f"nothing to accept: the devices of {args.id} are used only when its identity key"
        " certifies them; compare `kluis safety-number` with the peer to check that identity",
        file=sys.stderr,
    )


# ---- contacts, conversations, timers, receipts, notes (issue 9) ----------------------------------


def _offline(args: argparse.Namespace, body: Callable[[KluisClient], None]) -> None:
    """Commands that read or change only the profile: no server needed."""
    with _opened(args) as client:
        client.sweep()
        _notice(client)
        body(client)


async def _contact_set(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.set_contact(args.id, args.name, rename=args.action == "rename")
        print(account_label(args.id, client.contacts()))

    await _with_client(args, body)


def cmd_contact_list(args: argparse.Namespace) -> None:
    """``ID<TAB>NAME`` per contact, by name."""

    def body(client: KluisClient) -> None:
        for account, name in sorted(client.contacts().items(), key=lambda c: (c[1], c[0])):
            print(f"{account}\t{safe_text(name)}")

    _offline(args, body)


def cmd_conversations(args: argparse.Namespace) -> None:
    """``ID<TAB>NAME<TAB>UNREAD<TAB>LAST-ACTIVITY`` per conversation, newest first; NAME is
    ``-`` without a contact name. Unread: messages from others stored after this device last
    showed the conversation (``history``, ``inbox``)."""

    def body(client: KluisClient) -> None:
        names = client.contacts()
        for info in client.conversations():
            when = info.last_activity.isoformat(timespec="milliseconds")
            if args.json:
                name = names.get(info.conversation, "")
                line = {"conversation": info.conversation, "name": name, "unread": info.unread}
                print(json.dumps({**line, "last_activity": when}))
                continue
            name = safe_text(names.get(info.conversation, "")) or "-"
            print(f"{info.conversation}\t{name}\t{info.unread}\t{when}")

    _offline(args, body)


async def _timer(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.set_timer(args.id, args.seconds)
        print(f"{account_label(args.id, client.contacts())}: {describe_timer(args.seconds)}")

    await _with_client(args, body)


def cmd_receipts(args: argparse.Namespace) -> None:
    def body(client: KluisClient) -> None:
        client.set_read_receipts(args.state == "on")
        print(f"read receipts {args.state} (delivered receipts are always sent)")

    _offline(args, body)


async def _notes_add(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print(await client.add_note(args.text))

    await _with_client(args, body)


async def _notes_delete(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.delete_note(args.note)

    await _with_client(args, body)


def cmd_notes_list(args: argparse.Namespace) -> None:
    """``NOTE<TAB>TIME<TAB>TEXT`` per note, oldest first (NOTE: the ID ``notes delete`` takes)."""

    def body(client: KluisClient) -> None:
        for note in client.notes():
            when = note.created.isoformat(timespec="milliseconds")
            print(f"{note.id}\t{when}\t{safe_text(note.text)}")

    _offline(args, body)


def _add_feature_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ct = sub.add_parser("contact", help="your address book (synced to your devices)")
    cts = ct.add_subparsers(dest="action", required=True)
    for action in ("add", "rename"):
        c = cts.add_parser(action, help=f"{action} a nickname for ID")
        c.add_argument("--profile", required=True, help=PROFILE_HELP)
        c.add_argument("id")
        c.add_argument("name")
        c.set_defaults(func=_async(_contact_set))
    cl = cts.add_parser("list", help="ID<TAB>NAME per contact")
    cl.add_argument("--profile", required=True, help=PROFILE_HELP)
    cl.set_defaults(func=cmd_contact_list)

    cv = sub.add_parser(
        "conversations", help="ID<TAB>NAME<TAB>UNREAD<TAB>LAST-ACTIVITY, newest first"
    )
    cv.add_argument("--profile", required=True, help=PROFILE_HELP)
    cv.add_argument("--json", action="store_true", help="JSON Lines, for scripts")
    cv.set_defaults(func=cmd_conversations)

    tm = sub.add_parser("timer", help="disappearing messages in ID: SECONDS (0: off)")
    tm.add_argument("--profile", required=True, help=PROFILE_HELP)
    tm.add_argument("id")
    tm.add_argument("seconds", type=int)
    tm.set_defaults(func=_async(_timer))

    rc = sub.add_parser("receipts", help="send read receipts or not (delivered: always)")
    rc.add_argument("--profile", required=True, help=PROFILE_HELP)
    rc.add_argument("state", choices=["on", "off"])
    rc.set_defaults(func=cmd_receipts)

    nt = sub.add_parser("notes", help="your private notebook (synced to your devices)")
    nts = nt.add_subparsers(dest="action", required=True)
    na = nts.add_parser("add", help="print the new note's ID")
    na.add_argument("--profile", required=True, help=PROFILE_HELP)
    na.add_argument("text")
    na.set_defaults(func=_async(_notes_add))
    nl = nts.add_parser("list", help="NOTE<TAB>TIME<TAB>TEXT, oldest first")
    nl.add_argument("--profile", required=True, help=PROFILE_HELP)
    nl.set_defaults(func=cmd_notes_list)
    nd = nts.add_parser("delete")
    nd.add_argument("--profile", required=True, help=PROFILE_HELP)
    nd.add_argument("note")
    nd.set_defaults(func=_async(_notes_delete))


# ---- argument parsing ----------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> None:
    from kluis.apps.tui.app import KluisApp  # Textual loads only for this command
    from kluis.apps.tui.graphics import detect
    from kluis.apps.tui.keys import keymap_paths, load_keymap

    profile, *more = [Path(p).expanduser() for p in args.profile or [DEFAULT_CHAT_PROFILE]]
    keymap = load_keymap(keymap_paths(profile))  # a bad file: one line, before the screen
    images = detect()  # KLUIS_IMAGES, or the terminal's answer: before Textual reads stdin
    app = KluisApp(
        profile, default_server=args.server, keymap=keymap, more_profiles=more, images=images
    )
    app.run()


def _async(
    fn: Callable[[argparse.Namespace], Awaitable[None]],
) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        asyncio.run(fn(args))  # type: ignore[arg-type]

    run.coroutine = fn  # type: ignore[attr-defined]  # a daemon awaits it on its own loop
    return run


DEFAULT_CHAT_PROFILE = "~/.kluis/default"
PROFILE_HELP = "profile folder: this device's keys and history, encrypted"
SERVER_HELP = "server URL, e.g. https://chat.example or http://127.0.0.1:8448"
DATA_HELP = "the server's data folder (database, attachments)"
DEVICE_NAME_HELP = "a name for this device, e.g. laptop (kept in this profile only)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kluis", description="End-to-end encrypted messaging.")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"longest wait for each network step (default {DEFAULT_TIMEOUT_S:g})",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="run a server node (embedded SQLite in --data)",
        description="Settings may also come from KLUIS_<NAME> variables (KLUIS_DATA,"
        " KLUIS_DATABASE, KLUIS_PORT, ...; limits: KLUIS_LIMIT_<NAME>) or from the --config"
        " file; the command line wins over the environment, the environment over the file"
        " (docs/kluis.example.toml).",
    )
    s.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings (default: $KLUIS_CONFIG); unknown keys are refused",
    )
    s.add_argument(
        "--data", help="data folder: SQLite database, attachments (here, in KLUIS_DATA or the file)"
    )
    s.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB: keep the store on PostgreSQL instead of SQLite",
    )
    s.add_argument(
        "--database-pool",
        type=int,
        metavar="N",
        help="PostgreSQL connections this node keeps at most, a count (default 10)",
    )
    s.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="redis://HOST:PORT/DB: route delivery signals between nodes over Redis pub/sub"
        " (default: within this process only)",
    )
    s.add_argument(
        "--redis-prefix",
        metavar="WORD",
        help="Redis channel prefix, the same on every node of one deployment (default kluis)",
    )
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, help=f"TCP port (default {DEFAULT_PORT})")
    s.add_argument(
        "--drain-timeout",
        type=_drain_seconds,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM: send clients elsewhere, finish requests in hand, exit within this"
        " (default 10)",
    )
    s.add_argument(
        "--storage-key-file",
        default=None,
        metavar="FILE",
        help="with --database: the storage key file, identical on every node, mode 0600"
        " (default DATA/storage.key; made on first start; SECURITY.md)",
    )
    s.add_argument(
        "--blob-dir",
        default=None,
        metavar="DIR",
        help="attachment folder; with --redis, one folder every node mounts (NFS, CephFS)"
        " (default DATA/blobs)",
    )
    s.add_argument(
        "--public-url",
        default=None,
        help="the URL clients use, e.g. https://chat.example behind a TLS proxy"
        " (default: http://HOST:PORT); logins are bound to it",
    )
    s.add_argument(
        "--sync",
        choices=["normal", "full"],
        help="SQLite durability: normal (default) survives a crash, full also a power cut",
    )
    s.add_argument(
        "--metrics-port",
        type=_port,
        help="serve GET /metrics (Prometheus) on this port, never on --port (default: off)",
    )
    s.add_argument(
        "--metrics-host",
        help="address of the metrics port (default 127.0.0.1; any other needs KLUIS_METRICS_TOKEN)",
    )
    s.add_argument(
        "--envelope-ttl-days",
        type=float,
        help="days an undelivered message waits on the server (default 30)",
    )
    s.add_argument(
        "--mailbox-quota",
        type=int,
        help="how many undelivered messages a device may have waiting (default 10000)",
    )
    s.add_argument(
        "--max-frame-bytes",
        type=int,
        help="largest WebSocket frame, in bytes (default 2097152: 2 MiB)",
    )
    s.add_argument(
        "--send-rate", type=float, help="sends per second per device (default 50; burst 10 s)"
    )
    s.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override any limit of server/config.py:Limits, e.g. claim_rate_per_s=5",
    )
    s.set_defaults(func=cmd_serve)

    lic = sub.add_parser("licence", help="manage licence codes").add_subparsers(
        dest="action", required=True
    )
    lc = lic.add_parser("create", help="print new licence codes, one per line")
    lc.add_argument("--data", help="the server's data folder (SQLite)")
    lc.add_argument("--database", metavar="URL", help="the server's postgresql://... database")
    lc.add_argument(
        "--storage-key-file", metavar="FILE", help="with --database: the nodes' storage key file"
    )
    lc.add_argument(
        "--days", type=int, default=None, help="subscription length per code, days (default 182)"
    )
    lc.add_argument("--plan", help="a named plan instead: month, quarter, half-year, year")
    lc.add_argument("--csv", help="also write code,plan,days to this file (mode 0600)")
    lc.add_argument("--count", type=int, default=1, help="how many codes (default 1)")
    lc.add_argument(
        "--init", action="store_true", help="create the database if the folder has none yet"
    )
    lc.set_defaults(func=cmd_licence_create)
    lr = lic.add_parser("renew", help="extend your account with CODE; prints the new end")
    lr.add_argument("--profile", required=True, help=PROFILE_HELP)
    lr.add_argument("code")
    lr.set_defaults(func=_async(_licence_renew))

    from kluis.server.admin.cli import add_commands as add_admin_commands

    # `admin`: the operator's console users, key, announcements, accounts and wipes (one group).
    adm = sub.add_parser(
        "admin", help="the operator: console users, key, announcements, accounts, wipes"
    ).add_subparsers(dest="action", required=True)
    add_admin_commands(adm)
    _add_operator_parsers(sub, adm)

    au = sub.add_parser(
        "audit-storage", help="scan a server's data as a seizer would; exit 1 on any finding"
    )
    au.add_argument("--data", required=True, help=DATA_HELP)
    au.add_argument("--database", help="sqlite:///PATH, or postgresql://... with --pgdata")
    au.add_argument(
        "--pgdata", metavar="DIR", help="the PostgreSQL server's data directory, read raw"
    )
    au.add_argument(
        "--storage-key-file",
        metavar="FILE",
        help="PostgreSQL: the nodes' key file; its keys and the live storage keys must not be"
        " in the data directory (findings that need the file say so)",
    )
    au.add_argument(
        "--licence", action="append", default=[], help="a redeemed licence code to look for"
    )
    au.add_argument("--marker", action="append", default=[], help="plaintext that must not appear")
    au.add_argument("--bytes", action="append", default=[], help="raw bytes (hex/base64)")
    au.add_argument("--secret", action="append", default=[], help="private key (hex/base64)")
    au.add_argument("--profile", action="append", default=[], help="client profile's secrets")
    au.add_argument("--also", action="append", default=[], help="more files: logs kept elsewhere")
    au.add_argument(
        "--expect-empty",
        action="store_true",
        help="every device has synced: no envelope may remain",
    )
    au.set_defaults(func=cmd_audit_storage)

    mg = sub.add_parser(
        "migrate", help="create or upgrade the store's schema; says which version it is at"
    )
    mg.add_argument("--data", help="the server's data folder (SQLite)")
    mg.add_argument("--storage-key-file", metavar="FILE", help=_STORAGE_KEY_HELP)
    mg.add_argument("--database", metavar="URL", help="the server's postgresql://... database")
    mg.add_argument("--config", metavar="FILE", help="the nodes' TOML settings (kluis serve)")
    mg.set_defaults(func=cmd_migrate)

    r = sub.add_parser("register", help="redeem a licence; prints the new ID")
    r.add_argument("--server", required=True, help=SERVER_HELP)
    r.add_argument("--licence", required=True, help="a licence code from your operator")
    r.add_argument("--profile", required=True, help=PROFILE_HELP)
    r.add_argument("--device-name", help=DEVICE_NAME_HELP)
    r.set_defaults(func=_async(_register))

    w = sub.add_parser("whoami", help="print this profile's ID")
    w.add_argument("--profile", required=True, help=PROFILE_HELP)
    w.set_defaults(func=_async(_whoami))

    dev = sub.add_parser("device", help="link, list and revoke devices").add_subparsers(
        dest="action", required=True
    )
    dr = dev.add_parser("request", help="new device: print a one-time link code")
    dr.add_argument("--server", required=True, help=SERVER_HELP)
    dr.add_argument("--profile", required=True, help=PROFILE_HELP)
    dr.add_argument(
        "--account",
        help="the ID this device is to join: any other account is refused once approved",
    )
    dr.add_argument("--device-name", help=DEVICE_NAME_HELP)
    dr.set_defaults(func=_async(_device_request))
    da = dev.add_parser("approve", help="existing device: admit the device showing CODE")
    da.add_argument("--profile", required=True, help=PROFILE_HELP)
    da.add_argument("code")
    da.add_argument("--name", help="a name for the new device, e.g. laptop (this profile only)")
    da.set_defaults(func=_async(_device_approve))
    dl = dev.add_parser(
        "list", help="DEVICE<TAB>STATUS<TAB>SINCE<TAB>NAME; SINCE: the day this profile met it"
    )
    dl.add_argument("--profile", required=True, help=PROFILE_HELP)
    dl.add_argument("--json", action="store_true", help="JSON Lines, for scripts")
    dl.set_defaults(func=_async(_device_list))
    dn = dev.add_parser("name", help="name one of your devices (kept in this profile only)")
    dn.add_argument("--profile", required=True, help=PROFILE_HELP)
    dn.add_argument("device", help="its ID, as kluis device list prints it")
    dn.add_argument("name", help="1 to 64 characters, e.g. phone")
    dn.set_defaults(func=cmd_device_name)
    dv = dev.add_parser("revoke")
    dv.add_argument("--profile", required=True, help=PROFILE_HELP)
    dv.add_argument("device")
    dv.set_defaults(func=_async(_device_revoke))

    sd = sub.add_parser("send", help="send TEXT to ID or GROUP; exits 0 once the server stored it")
    sd.add_argument("--profile", required=True, help=PROFILE_HELP)
    sd.add_argument("id", metavar="ID|GROUP")
    sd.add_argument("text", nargs="?", help="the message; - reads it from standard input")
    sd.add_argument("--file", help="send this file (encrypted, streamed); TEXT is its caption")
    sd.add_argument(
        "--reply-to",
        metavar="MESSAGE",
        help="quote this message of the conversation: 8 to 32 hex digits of its ID"
        " (the id field of history --json)",
    )
    sd.set_defaults(func=_async(_send))

    ob = sub.add_parser(
        "outbox", help="CONVERSATION<TAB>TIME<TAB>TEXT per message not sent yet, oldest first"
    )
    ob.add_argument("--profile", required=True, help=PROFILE_HELP)
    ob.set_defaults(func=cmd_outbox)

    dm = sub.add_parser(
        "daemon",
        help="keep the profile unlocked and connected; send and inbox then go through it",
    )
    dm.add_argument("--profile", required=True, help=PROFILE_HELP)
    dm.add_argument(
        "--lock-after",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="forget the key and exit after this long without a request (default 900)",
    )
    dm.set_defaults(func=cmd_daemon)

    fe = sub.add_parser("fetch", help="save every received file not saved yet; prints each path")
    fe.add_argument("--profile", required=True, help=PROFILE_HELP)
    fe.add_argument("--out", required=True, help="folder to save into (created if missing)")
    fe.set_defaults(func=_async(_fetch))

    ib = sub.add_parser("inbox", help="fetch, decrypt and print incoming messages")
    ib.add_argument("--profile", required=True, help=PROFILE_HELP)
    ib.add_argument(
        "--wait", type=float, default=0.0, help="seconds to listen for more (default 0)"
    )
    ib.add_argument("--json", action="store_true", help="JSON Lines, for scripts")
    ib.set_defaults(func=_async(_inbox))

    h = sub.add_parser("history", help="print stored conversations, oldest first")
    h.add_argument("--profile", required=True, help=PROFILE_HELP)
    h.add_argument("id", nargs="?")
    h.add_argument("--json", action="store_true", help="JSON Lines, for scripts")
    h.set_defaults(func=cmd_history)

    sn = sub.add_parser(
        "safety-number",
        help="print ID's safety number (yours without ID); compare it with your peer out of band",
    )
    sn.add_argument("--profile", required=True, help=PROFILE_HELP)
    sn.add_argument("id", nargs="?")
    sn.set_defaults(func=_async(_safety_number))

    vf = sub.add_parser(
        "verify",
        help="verify ID interactively (emoji and numbers); the peer runs it with your ID",
    )
    vf.add_argument("--profile", required=True, help=PROFILE_HELP)
    vf.add_argument("id")
    vf.add_argument(
        "--timeout",
        dest="verify_timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the peer (default 600)",
    )
    vf.add_argument(
        "--status", action="store_true", help="print verified, unverified or broken (offline)"
    )
    vf.set_defaults(func=_async(_verify))

    t = sub.add_parser("trust", help="accept the changed keys of ID")
    t.add_argument("--profile", required=True, help=PROFILE_HELP)
    t.add_argument("id")
    t.set_defaults(func=cmd_trust)

    grp = sub.add_parser(
        "group", help="groups: create, add, remove, leave, members"
    ).add_subparsers(dest="group_command", required=True)
    gc = grp.add_parser("create", help="a new group of you and the IDs; prints the group's ID")
    gc.add_argument("--profile", required=True, help=PROFILE_HELP)
    gc.add_argument("name")
    gc.add_argument("ids", nargs="*", metavar="ID")
    gc.set_defaults(func=_async(_group_create))
    for action, help_ in (("add", "add members"), ("remove", "remove members")):
        ga = grp.add_parser(action, help=f"{help_}; everyone in the group hears of it")
        ga.add_argument("--profile", required=True, help=PROFILE_HELP)
        ga.add_argument("group")
        ga.add_argument("ids", nargs="+", metavar="ID")
        ga.set_defaults(func=_async(_group_change), action=action)
    gl = grp.add_parser("leave", help="leave the group; the others hear of it")
    gl.add_argument("--profile", required=True, help=PROFILE_HELP)
    gl.add_argument("group")
    gl.set_defaults(func=_async(_group_change), action="leave")
    gm = grp.add_parser("members", help="print the group's ID and name, then one member per line")
    gm.add_argument("--profile", required=True, help=PROFILE_HELP)
    gm.add_argument("group")
    gm.set_defaults(func=cmd_group_members)
    _add_feature_parsers(sub)

    ch = sub.add_parser("chat", help="the full-screen messenger (first run: register)")
    ch.add_argument(
        "--profile",
        action="append",
        help=f"profile folder; give it again to open several accounts at once, F8 switches "
        f"(default: {DEFAULT_CHAT_PROFILE})",
    )
    ch.add_argument(
        "--server",
        default=f"http://127.0.0.1:{DEFAULT_PORT}",
        help="server URL proposed on the first run (default %(default)s)",
    )
    ch.set_defaults(func=cmd_chat)
    return p


# ---- the operator's side (issue 11): admin, renew, wipe, panic passphrase -----------------------


async def _licence_renew(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print(f"subscription ends on {_day(await client.renew(args.code))}")

    await _with_client(args, body)


def cmd_admin_init(args: argparse.Namespace) -> None:
    from kluis.protocol.signing import origin
    from kluis.server.operator import keyfile

    try:
        server_origin = origin(args.public_url)
    except ValueError as exc:
        raise LocalProtocolError(f"--public-url: {exc}") from exc
    data = Path(args.data)
    info = keyfile.init(data, server_origin)
    print(info.public_key)
    print(
        f"signing key: {data / keyfile.KEY_FILE} (mode 0600; move it offline and sign with"
        " --key FILE)",
        file=sys.stderr,
    )


def _config(args: argparse.Namespace) -> ServerConfig:
    """The store a data command works on: PostgreSQL with --database, else SQLite in --data."""
    from kluis.server.config import ServerConfig

    if args.data is None and args.database is None:
        raise LocalProtocolError("this command needs --data DIR or --database URL")
    key_file = getattr(args, "storage_key_file", None)
    return ServerConfig(
        data_dir=Path(args.data or "."),
        database_url=args.database,
        storage_key_file=Path(key_file) if key_file else None,
    )


_STORAGE_KEY_HELP = "with --database: the nodes' storage key file (default DATA/storage.key)"


def cmd_migrate(args: argparse.Namespace) -> None:
    from kluis.server import settings
    from kluis.server.operator import admin

    if args.config:  # the nodes' own file: the same store they will open
        config = settings.resolve(
            {"data": args.data, "database": args.database},
            os.environ,
            settings.load_file(Path(args.config)),
            source=args.config,
        )
    else:
        config = _config(args)
    print(admin.migrate(config))


def cmd_admin_announce(args: argparse.Namespace) -> None:
    from kluis.server.operator import admin

    count = admin.announce(_config(args), args.text, Path(args.key) if args.key else None)
    print(f"queued for {count} devices", file=sys.stderr)


def cmd_admin_account(args: argparse.Namespace) -> None:
    from kluis.server.operator import admin

    admin.set_account(_config(args), args.id, args.action)


def cmd_admin_wipe(args: argparse.Namespace) -> None:
    from kluis.server.operator import admin

    key = Path(args.key) if args.key else None
    for device in admin.wipe(_config(args), args.id, args.device, key):
        print(device)


def cmd_wipe(args: argparse.Namespace) -> None:
    from kluis.client.wipe import erase_profile

    profile = Path(args.profile)
    if not ProfileStore.exists(profile):
        raise LocalProtocolError(f"no profile in {profile}; register or request a device first")
    erase_profile(profile)


def cmd_panic_passphrase(args: argparse.Namespace) -> None:
    from kluis.client.wipe import set_panic

    passphrase = _passphrase()
    client = _kluis().open(Path(args.profile), passphrase)  # proves the passphrase
    client.core.store.close()
    panic = os.environ.get("KLUIS_PANIC_PASSPHRASE")
    if panic is None:
        if not sys.stdin.isatty():
            raise LocalProtocolError("no panic passphrase: set KLUIS_PANIC_PASSPHRASE or use a tty")
        panic = getpass.getpass("Panic passphrase: ")
        if getpass.getpass("Panic passphrase again: ") != panic:
            raise LocalProtocolError("the passphrases differ")
    if panic == passphrase:
        raise LocalProtocolError("the panic passphrase must differ from the passphrase")
    set_panic(Path(args.profile), panic)


_DATABASE_HELP = "the server's postgresql://... database; --data still holds the keys"


def _add_operator_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    ads: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """The operator's subcommands of ``kluis admin`` (``ads``), and ``wipe`` and
    ``panic-passphrase`` (``sub``)."""
    ai = ads.add_parser("init", help="make the operator signing key; prints its public key")
    ai.add_argument("--data", required=True, help=DATA_HELP)
    ai.add_argument(
        "--database",
        metavar="URL",
        help="accepted like the other admin commands: init writes only files in --data",
    )
    ai.add_argument(
        "--public-url",
        default=f"http://127.0.0.1:{DEFAULT_PORT}",
        help="the URL clients use (as kluis serve --public-url); announcements are bound to it"
        " (default %(default)s)",
    )
    ai.set_defaults(func=cmd_admin_init)
    an = ads.add_parser("announce", help="sign TEXT and queue it for every device")
    an.add_argument("--data", required=True, help=DATA_HELP)
    an.add_argument("--storage-key-file", metavar="FILE", help=_STORAGE_KEY_HELP)
    an.add_argument("--database", metavar="URL", help=_DATABASE_HELP)
    an.add_argument("--key", help="the operator key file (default DATA/operator.key)")
    an.add_argument("text")
    an.set_defaults(func=cmd_admin_announce)
    ac = ads.add_parser("account", help="suspend or reinstate an account; its wipe policy")
    ac.add_argument("action", choices=["suspend", "reinstate", "allow-wipe", "deny-wipe"])
    ac.add_argument("--data", help="the server's data folder (SQLite)")
    ac.add_argument("--storage-key-file", metavar="FILE", help=_STORAGE_KEY_HELP)
    ac.add_argument("--database", metavar="URL", help="the server's postgresql://... database")
    ac.add_argument("id")
    ac.set_defaults(func=cmd_admin_account)
    aw = ads.add_parser("wipe", help="order the account's devices (or one) to erase themselves")
    aw.add_argument("--data", required=True, help=DATA_HELP)
    aw.add_argument("--storage-key-file", metavar="FILE", help=_STORAGE_KEY_HELP)
    aw.add_argument("--database", metavar="URL", help=_DATABASE_HELP)
    aw.add_argument("--device", help="only this device (its key, from kluis device list)")
    aw.add_argument("--key", help="the operator key file (default DATA/operator.key)")
    aw.add_argument("id")
    aw.set_defaults(func=cmd_admin_wipe)
    wp = sub.add_parser("wipe", help="erase this profile (every file overwritten, then removed)")
    wp.add_argument("--profile", required=True, help=PROFILE_HELP)
    wp.set_defaults(func=cmd_wipe)
    pp = sub.add_parser(
        "panic-passphrase", help="set a second passphrase that erases the profile at unlock"
    )
    pp.add_argument("--profile", required=True, help=PROFILE_HELP)
    pp.set_defaults(func=cmd_panic_passphrase)


# Commands that take the profile's lock themselves (daemon, chat, send, inbox) or make the
# profile (register, device request); every other command with --profile goes through
# _profile_command.
_OWN_LOCK = frozenset({"daemon", "chat", "send", "inbox", "register"})


def _profile_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run a profile command alone, holding the profile's lock shared, or in the daemon that
    holds the profile (apps/through_daemon.py): never both, so one store has one writer."""
    from kluis.apps import daemon, quick

    profile = Path(args.profile)
    with daemon.daemon_or_alone(profile, args.timeout) as rpc:
        if rpc is None:
            args.func(args)
            return 0
        if args.command == "wipe":
            rpc.call("wipe", {}, longer=600.0)
            print(f"the kluis daemon erased {profile} and stopped", file=sys.stderr)
            return 0
        # the daemon parses the line again and refuses what may not run in it
        return quick.run_whole(argv, rpc, args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    # A shell starts background jobs with SIGINT ignored, and children inherit that: Ctrl-C
    # (or kill -INT) must still end a command cleanly, through asyncio's own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    try:
        if (
            isinstance(getattr(args, "profile", None), str)
            and args.command not in _OWN_LOCK
            and (args.command, getattr(args, "action", None)) != ("device", "request")
        ):
            return _profile_command(args, arguments)
        args.func(args)
    except KluisError as exc:
        _report(exc, "error")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
