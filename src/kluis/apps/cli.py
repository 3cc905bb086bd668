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
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from kluis.client.client import KluisClient
from kluis.client.records import Message
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
    from kluis import audit

    data = Path(args.data)
    footprint = audit.store_footprint(data, args.database)
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


def message_line(message: Message) -> str:
    """One message as ``inbox`` and ``history`` print it: sender, time, text (tab-separated)."""
    text = message.text.replace("\n", " ").replace("\t", " ")
    return f"{message.sender}\t{message.time.isoformat(timespec='milliseconds')}\t{text}"


async def _send(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        await client.send(args.id, args.text)

    await _with_client(args, body)


async def _inbox(args: argparse.Namespace) -> None:
    async def body(client: KluisClient) -> None:
        for message in await client.receive(wait=args.wait):
            print(message_line(message), flush=True)
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
        for message in client.history(args.id):
            print(message_line(message))
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
