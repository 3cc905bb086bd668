"""The ``kluis`` command: run a server, hand out licences, and message from the shell.

Exit status: 0 on success, 1 on a Kluis error (printed as ``error: CODE: message`` on stderr),
2 on a usage error. The passphrase comes from KLUIS_PASSPHRASE when set, else from a prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from kluis.client.client import KluisClient
from kluis.client.records import Message
from kluis.client.timers import describe as describe_timer
from kluis.errors import KeyChanged, KluisError, LocalProtocolError

DEFAULT_PORT = 8448


def _passphrase(confirm: bool = False) -> str:
    env = os.environ.get("KLUIS_PASSPHRASE")
    if env is not None:
        return env
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Passphrase again: ") != first:
        raise LocalProtocolError("the passphrases differ")
    return first


def _report(err: KluisError, level: str) -> None:
    print(f"{level}: {err}", file=sys.stderr)
    if isinstance(err, KeyChanged):
        account = err.details.get("account", "ID")
        print(
            f"  compare `kluis safety-number --profile DIR {account}` with the peer's own, then:"
            f" kluis trust --profile DIR {account}",
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
    from kluis.server.app import serve
    from kluis.server.config import DAY, Limits, ServerConfig, limits_with_overrides

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
    try:
        limits = limits_with_overrides(Limits(), overrides)
    except ValueError as exc:
        raise LocalProtocolError(str(exc)) from exc
    config = ServerConfig(
        data_dir=Path(args.data),
        host=args.host,
        port=args.port,
        limits=limits,
        sqlite_synchronous=args.sync,
        public_url=args.public_url,
    )
    try:
        config.origin  # noqa: B018 - checks --public-url before anything starts
    except ValueError as exc:
        raise LocalProtocolError(f"--public-url: {exc}") from exc
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(config)


def cmd_licence_create(args: argparse.Namespace) -> None:
    if not 1 <= args.count <= 100_000 or not 1 <= args.days <= 36_500:
        raise LocalProtocolError("--count must be 1..100000 and --days 1..36500")
    from kluis.server.app import create_licences
    from kluis.server.config import ServerConfig

    codes = create_licences(ServerConfig(data_dir=Path(args.data)), args.count, args.days)
    for code in codes:
        print(code)


def cmd_audit_storage(args: argparse.Namespace) -> None:
    from kluis.server import audit

    database = audit.parse_database_url(args.database) if args.database else None
    secrets = [(f"secret {i + 1}", audit.decode_secret(s)) for i, s in enumerate(args.secret)]
    for profile in args.profile:
        secrets.extend(audit.profile_secrets(Path(profile), _passphrase()))
    report = audit.audit(
        Path(args.data),
        database=database,
        markers=args.marker,
        raw=[(f"bytes {h[:16]}", audit.decode_secret(h)) for h in args.bytes],
        secrets=secrets,
        extra_paths=[Path(p) for p in args.also],
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


async def _register(args: argparse.Namespace) -> None:
    client = await KluisClient.register(
        args.server, args.licence, Path(args.profile), _passphrase(confirm=True)
    )
    await client.close()
    print(client.account_id)


async def _whoami(args: argparse.Namespace) -> None:
    client = KluisClient.open(Path(args.profile), _passphrase())
    try:
        if not client.account_id:  # a linked device learns its account at first login
            await client.connect()
        print(client.account_id)
    finally:
        await client.close()


async def _device_request(args: argparse.Namespace) -> None:
    code = await KluisClient.request_link(
        args.server, Path(args.profile), _passphrase(confirm=True), account=args.account or ""
    )
    print(code)


async def _with_client(
    args: argparse.Namespace, body: Callable[[KluisClient], Awaitable[None]]
) -> None:
    client = KluisClient.open(Path(args.profile), _passphrase())
    try:
        await client.connect()
        _alarm(client)
        await body(client)
    finally:
        await client.close()


async def _device_approve(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print(await client.approve(args.code))

    await _with_client(args, body)


async def _device_list(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        for record in await client.devices():
            mark = " (this device)" if record.keys.ed25519 == client.core.device_id else ""
            print(f"{record.keys.ed25519}\t{client.core.device_status(record)}{mark}")

    await _with_client(args, body)


async def _device_revoke(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.revoke(args.device)

    await _with_client(args, body)


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


def message_line(
    message: Message, names: Mapping[str, str] | None = None, *, receipt: bool = False
) -> str:
    """One message as ``inbox`` and ``history`` print it, tab-separated: sender (``ID`` or
    ``ID (NAME)``), ISO time, text (sanitised: one line; a timer change reads
    ``[timer] disappearing messages: 30 s``). With ``receipt`` (``history``), a message we
    sent that a recipient acknowledged gets a fourth field: ``✓`` delivered, ``✓✓`` read."""
    text = safe_text(message.text)
    if message.kind != "text":
        text = f"[{message.kind}] {text}"
    sender = account_label(message.sender, names or {})
    line = f"{sender}\t{message.time.isoformat(timespec='milliseconds')}\t{text}"
    if receipt and message.receipt:
        line += "\t" + _RECEIPT_MARK[message.receipt]
    return line


async def _send(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.send(args.id, args.text)
        print(f"sent to {account_label(args.id, client.contacts())}")

    await _with_client(args, body)


async def _inbox(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        names = client.contacts()
        shown: set[str] = set()
        for message in await client.receive(wait=args.wait):
            print(message_line(message, names), flush=True)
            shown.add(message.conversation)
        for conversation in sorted(shown):  # printed: read (read receipts, when on, go now)
            await client.mark_read(conversation)
        unread = len(client.errors)
        if unread:
            noun = "message" if unread == 1 else "messages"
            print(f"warning: {unread} {noun} could not be read (kept aside)", file=sys.stderr)
            _warn(client.errors)

    await _with_client(args, body)


async def _safety_number(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        print(await client.safety_number(args.id))

    await _with_client(args, body)


def cmd_history(args: argparse.Namespace) -> None:
    client = KluisClient.open(Path(args.profile), _passphrase())
    try:
        names = client.contacts()
        for message in client.history(args.id):
            print(message_line(message, names, receipt=True))
        # Printed: read. history works offline, so its read receipts (when on) wait in the
        # profile and go with the next command that connects (inbox, send, ...).
        client.core.features.conversations.mark_read(args.id)
    finally:
        client.core.store.close()


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
    client = KluisClient.open(Path(args.profile), _passphrase())
    try:
        client.sweep()
        body(client)
    finally:
        client.core.store.close()


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
            name = safe_text(names.get(info.conversation, "")) or "-"
            when = info.last_activity.isoformat(timespec="milliseconds")
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
        c.add_argument("--profile", required=True)
        c.add_argument("id")
        c.add_argument("name")
        c.set_defaults(func=_async(_contact_set))
    cl = cts.add_parser("list", help="ID<TAB>NAME per contact")
    cl.add_argument("--profile", required=True)
    cl.set_defaults(func=cmd_contact_list)

    cv = sub.add_parser(
        "conversations", help="ID<TAB>NAME<TAB>UNREAD<TAB>LAST-ACTIVITY, newest first"
    )
    cv.add_argument("--profile", required=True)
    cv.set_defaults(func=cmd_conversations)

    tm = sub.add_parser("timer", help="disappearing messages in ID: SECONDS (0: off)")
    tm.add_argument("--profile", required=True)
    tm.add_argument("id")
    tm.add_argument("seconds", type=int)
    tm.set_defaults(func=_async(_timer))

    rc = sub.add_parser("receipts", help="send read receipts or not (delivered: always)")
    rc.add_argument("--profile", required=True)
    rc.add_argument("state", choices=["on", "off"])
    rc.set_defaults(func=cmd_receipts)

    nt = sub.add_parser("notes", help="your private notebook (synced to your devices)")
    nts = nt.add_subparsers(dest="action", required=True)
    na = nts.add_parser("add", help="print the new note's ID")
    na.add_argument("--profile", required=True)
    na.add_argument("text")
    na.set_defaults(func=_async(_notes_add))
    nl = nts.add_parser("list", help="NOTE<TAB>TIME<TAB>TEXT, oldest first")
    nl.add_argument("--profile", required=True)
    nl.set_defaults(func=cmd_notes_list)
    nd = nts.add_parser("delete")
    nd.add_argument("--profile", required=True)
    nd.add_argument("note")
    nd.set_defaults(func=_async(_notes_delete))


# ---- argument parsing ----------------------------------------------------------------------------


def _async(
    fn: Callable[[argparse.Namespace], Awaitable[None]],
) -> Callable[[argparse.Namespace], None]:
    return lambda args: asyncio.run(fn(args))  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kluis", description="End-to-end encrypted messaging.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a server node (embedded SQLite in --data)")
    s.add_argument("--data", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument(
        "--public-url",
        default=None,
        help="the URL clients use, e.g. https://chat.example behind a TLS proxy"
        " (default: http://HOST:PORT); logins are bound to it",
    )
    s.add_argument(
        "--sync",
        choices=["normal", "full"],
        default="normal",
        help="SQLite durability: normal survives a crash, full also a power cut",
    )
    s.add_argument("--envelope-ttl-days", type=float)
    s.add_argument("--mailbox-quota", type=int)
    s.add_argument("--max-frame-bytes", type=int)
    s.add_argument("--send-rate", type=float, help="sends per second per device")
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
    lc.add_argument("--data", required=True)
    lc.add_argument("--days", type=int, default=182)
    lc.add_argument("--count", type=int, default=1)
    lc.set_defaults(func=cmd_licence_create)

    au = sub.add_parser(
        "audit-storage", help="scan a server's data as a seizer would; exit 1 on any finding"
    )
    au.add_argument("--data", required=True)
    au.add_argument("--database", help="sqlite:///PATH (PostgreSQL: not supported yet)")
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

    r = sub.add_parser("register", help="redeem a licence; prints the new ID")
    r.add_argument("--server", required=True)
    r.add_argument("--licence", required=True)
    r.add_argument("--profile", required=True)
    r.set_defaults(func=_async(_register))

    w = sub.add_parser("whoami", help="print this profile's ID")
    w.add_argument("--profile", required=True)
    w.set_defaults(func=_async(_whoami))

    dev = sub.add_parser("device", help="link, list and revoke devices").add_subparsers(
        dest="action", required=True
    )
    dr = dev.add_parser("request", help="new device: print a one-time link code")
    dr.add_argument("--server", required=True)
    dr.add_argument("--profile", required=True)
    dr.add_argument(
        "--account",
        help="the ID this device is to join: any other account is refused once approved",
    )
    dr.set_defaults(func=_async(_device_request))
    da = dev.add_parser("approve", help="existing device: admit the device showing CODE")
    da.add_argument("--profile", required=True)
    da.add_argument("code")
    da.set_defaults(func=_async(_device_approve))
    dl = dev.add_parser("list")
    dl.add_argument("--profile", required=True)
    dl.set_defaults(func=_async(_device_list))
    dv = dev.add_parser("revoke")
    dv.add_argument("--profile", required=True)
    dv.add_argument("device")
    dv.set_defaults(func=_async(_device_revoke))

    sd = sub.add_parser("send", help="send TEXT to ID; exits 0 once the server stored it")
    sd.add_argument("--profile", required=True)
    sd.add_argument("id")
    sd.add_argument("text")
    sd.set_defaults(func=_async(_send))

    ib = sub.add_parser("inbox", help="fetch, decrypt and print incoming messages")
    ib.add_argument("--profile", required=True)
    ib.add_argument("--wait", type=float, default=0.0)
    ib.set_defaults(func=_async(_inbox))

    h = sub.add_parser("history", help="print stored conversations, oldest first")
    h.add_argument("--profile", required=True)
    h.add_argument("id", nargs="?")
    h.set_defaults(func=cmd_history)

    sn = sub.add_parser(
        "safety-number",
        help="print ID's safety number (yours without ID); compare it with your peer out of band",
    )
    sn.add_argument("--profile", required=True)
    sn.add_argument("id", nargs="?")
    sn.set_defaults(func=_async(_safety_number))

    t = sub.add_parser("trust", help="accept the changed keys of ID")
    t.add_argument("--profile", required=True)
    t.add_argument("id")
    t.set_defaults(func=cmd_trust)
    _add_feature_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KluisError as exc:
        _report(exc, "error")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
