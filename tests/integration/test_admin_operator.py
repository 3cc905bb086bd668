"""The console's operator pages on a real server: a wipe where the account's policy allows it
(the device erases itself at its next connection), the refusal where it does not, and an
operator key kept offline: the console says so and signs nothing, and makes no key."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.client.transport import WebSocketTransport
from kluis.errors import DeviceWiped
from kluis.server.operator import keyfile
from tests.admin_testing import ConsoleSession, create_user, operator_init
from tests.kluis_testing import PASSPHRASE, ServerProcess, fast_kdf, reconnect


async def _register(server: ServerProcess, profile: Path) -> KluisClient:
    return await KluisClient.register(
        server.url,
        server.licences(1)[0],
        profile,
        PASSPHRASE,
        transport_factory=WebSocketTransport,
        kdf=fast_kdf(),
    )


async def test_wipe_follows_the_policy_and_an_offline_key_signs_nothing(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    operator_init(server)
    server.start()
    admin: ConsoleSession | None = None
    try:
        server.licences(1)
        boss = create_user(server, "boss")
        keep, lose = tmp_path / "keep", tmp_path / "lose"
        kept, lost = await _register(server, keep), await _register(server, lose)
        kept_id, lost_id = kept.account_id, lost.account_id
        await kept.close()
        await lost.close()
        subprocess.run(
            server.cli("admin", "account", "deny-wipe", "--data", str(server.data), kept_id),
            check=True,
            capture_output=True,
        )
        admin = ConsoleSession(server)
        assert (await admin.login(boss)).status == 303

        # The policy forbids it: refused, shown, audited; nothing ordered.
        page, status = await admin.post("/admin/accounts", {"account": kept_id, "action": "wipe"})
        assert status == 403 and 'data-code="wipe_refused"' in page
        assert "policy does not let the operator wipe" in page
        again = await reconnect(server, keep)  # still logs in
        await again.close()

        # Allowed: ordered, and the device erases itself when it next connects.
        page, status = await admin.post("/admin/accounts", {"account": lost_id, "action": "wipe"})
        assert status == 200 and f"Wipe ordered for 1 device(s) of account {lost_id}." in page
        with pytest.raises(DeviceWiped):
            await reconnect(server, lose)
        assert lose.is_dir() and not any(lose.rglob("*"))
        audit, _ = await admin.get("/admin/audit")
        assert "wipe refused" in audit and f"{lost_id}, 1 devices" in audit

        # The key moved offline: the page says so and has no form; a post signs nothing.
        key = server.data / keyfile.KEY_FILE
        offline = tmp_path / "usb-stick" / keyfile.KEY_FILE
        offline.parent.mkdir()
        shutil.move(key, offline)
        page, status = await admin.get("/admin/announcements")
        assert status == 200 and 'id="no-key"' in page and "kept offline?" in page
        assert 'id="announce"' not in page and 'name="text"' not in page
        page, status = await admin.post("/admin/announcements", {"text": "from nowhere"})
        assert status == 409 and 'data-code="operator_key_missing"' in page
        page, status = await admin.post("/admin/accounts", {"account": kept_id, "action": "wipe"})
        assert status == 403  # the policy still answers first for this account
        page, status = await admin.post("/admin/accounts", {"account": lost_id, "action": "wipe"})
        assert status == 409 and 'data-code="operator_key_missing"' in page
        assert not key.exists()  # the console never makes one
        survivor = await reconnect(server, keep)
        assert await survivor.receive(wait=0.5) == []
        await survivor.close()
        sent, _ = await admin.get("/admin/announcements")
        assert "from nowhere" not in sent and "None sent yet." in sent
    finally:
        if admin is not None:
            await admin.close()
        server.stop()
