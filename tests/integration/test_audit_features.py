"""`kluis audit-storage` after a workload with groups, files, a disappearing-message timer and
receipts: a seized disk still shows nothing worth taking — no group ID, name, member list or message, no file name or content, no
blob once every member device fetched it, no delivered envelope."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_audit_storage import audit_args, record_bodies, run_audit
from tests.kluis_testing import ServerProcess, register

GROUP_NAME = "Kluis-groep-Oranje-42"
GROUP_TEXT = "MARKER-group-dahlia-5501"
FILE_NAME = "plan-MARKER-iris-3.txt"
FILE_TEXT = "MARKER-file-content-lotus-9090"


async def test_seized_disk_after_groups_files_timers_and_receipts_is_clean(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    carol = await register(server, tmp_path / "carol")
    bodies: list[bytes] = []
    for c in (alice, bob, carol):
        record_bodies(c, bodies)

    group = (await alice.create_group(GROUP_NAME, [bob.account_id, carol.account_id])).id
    await alice.send(group, f"{GROUP_TEXT} from alice")
    await bob.receive(wait=5, until=3)  # the group, alice's session key, her message
    await bob.send(group, f"{GROUP_TEXT} from bob")
    source = tmp_path / FILE_NAME
    source.write_text((FILE_TEXT + "\n") * 2000)
    await alice.send_file(group, source, "the plan")
    for member, n in ((bob, 1), (carol, 5), (alice, 2)):
        await member.receive(wait=5, until=n)
    for member in (bob, carol):
        (saved,) = await member.fetch_files(tmp_path / f"{member.account_id}-files")
        assert saved.read_text() == source.read_text()
    await alice.set_timer(group, 3600)  # disappearing messages, set inside the group
    await bob.mark_read(group)  # read receipts to alice, through the server
    await carol.mark_read(group)
    await alice.receive(wait=2)
    await alice.change_group(group, "remove", [carol.account_id])
    await bob.receive(wait=5, until=2)  # the timer line and the removal
    await carol.receive(wait=5, until=2)
    for c in (alice, bob, carol):
        assert c.errors == []
        await c.close()
    server.stop()

    profiles = [tmp_path / n for n in ("alice", "bob", "carol")]
    args = audit_args(server, profiles, bodies)
    for marker in (group, GROUP_NAME, GROUP_TEXT, FILE_NAME, FILE_TEXT):
        args += ["--marker", marker]
    out = run_audit(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ", 0 findings" in out.stdout
    blobs = server.data / "blobs"
    assert not blobs.exists() or not any(blobs.iterdir())  # every member device fetched it
