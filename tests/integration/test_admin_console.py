"""The admin console in a real browser (Debian's chromium, headless, driven by Playwright)
against a real server on loopback: log in with password and TOTP, create licences, see the
account a client redeems, send an announcement the client receives from ``operator``, read
the audit log; a screenshot of each page goes to
docs/screenshots/admin-*.png. Then the seizure audit finds no console secret in clear."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.client.transport import WebSocketTransport
from tests.admin_testing import create_user, operator_init
from tests.kluis_testing import PASSPHRASE, ServerProcess, fast_kdf

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)


async def test_console_in_a_browser_then_the_seizure_audit(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    assert CHROMIUM is not None
    server = ServerProcess(tmp_path / "data")
    operator_init(server)  # the operator key the console signs announcements with
    server.start()
    client: KluisClient | None = None
    try:
        server.licences(1)
        boss = create_user(server, "boss")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            context = await browser.new_context(viewport={"width": 1100, "height": 720})
            page = await context.new_page()
            scripts: list[str] = []
            page.on("console", lambda msg: scripts.append(msg.text))

            await page.goto(server.url + "/admin/accounts")  # anonymous: sent to the login
            assert page.url.endswith("/admin/login")
            await page.screenshot(path=str(SHOTS / "admin-login.png"))
            await page.fill("input[name=name]", boss.name)
            await page.fill("input[name=password]", boss.password)
            await page.fill("input[name=code]", boss.code())
            await page.click("button[type=submit]")
            assert page.url.endswith("/admin/licences")

            await page.fill("input[name=count]", "3")
            await page.fill("input[name=days]", "182")
            await page.click("button[value=show]")
            codes = await page.locator("#new-codes li").all_inner_texts()
            assert len(codes) == 3
            await page.screenshot(path=str(SHOTS / "admin-licences.png"), full_page=True)

            await page.fill("input[name=count]", "3")
            async with page.expect_download() as download_info:
                await page.click("button[value=csv]")
            download = await download_info.value
            csv_path = tmp_path / "codes.csv"
            await download.save_as(csv_path)
            assert csv_path.read_text().splitlines()[0] == "code,days"
            assert len(csv_path.read_text().splitlines()) == 1 + 3

            client = await KluisClient.register(
                server.url,
                codes[0],
                tmp_path / "profile",
                PASSPHRASE,
                transport_factory=WebSocketTransport,
                kdf=fast_kdf(),
            )
            await page.click("text=Accounts")
            assert page.url.endswith("/admin/accounts")
            row = page.locator("#accounts tbody tr", has_text=client.account_id)
            assert await row.count() == 1
            cells = await row.locator("td").all_inner_texts()
            assert cells[2] == "1" and cells[3] != "-"  # one device, seen today
            await page.screenshot(path=str(SHOTS / "admin-accounts.png"), full_page=True)

            await page.click("text=Resellers")
            await page.fill("input[name=name]", "shop-a")
            await page.fill("input[name=quota]", "100")
            await page.click("form[action='/admin/resellers'] button")
            assert await page.locator("#resellers", has_text="shop-a").count() == 1
            await page.screenshot(path=str(SHOTS / "admin-resellers.png"), full_page=True)

            await page.click("text=Announcements")
            assert page.url.endswith("/admin/announcements")
            text = "Maintenance tonight from 23:00 UTC: the server is down for about ten minutes."
            await page.fill("textarea[name=text]", text)
            await page.click("form#announce button")
            assert "queued for 1 device(s)" in await page.locator("#announce-sent").inner_text()
            sent = await page.locator("#announcements tbody tr").all_inner_texts()
            assert len(sent) == 1 and text[:80] in sent[0] and "boss" in sent[0]
            (notice,) = await client.receive(wait=2, until=1)
            assert (notice.sender, notice.conversation, notice.text) == (
                "operator",
                "operator",
                text,
            )
            await page.screenshot(path=str(SHOTS / "admin-announcements.png"), full_page=True)

            await page.click("text=Audit log")
            audit = await page.locator("#audit tbody").inner_text()
            for action in ("log in", "create licences", "create user", "announce"):
                assert action in audit
            assert "3 codes of 182 days" in audit and "reseller shop-a, quota 100" in audit
            for code in codes:
                assert code not in audit
            await page.screenshot(path=str(SHOTS / "admin-audit.png"), full_page=True)

            cookies = {c["name"]: c["value"] for c in await context.cookies()}
            token = cookies["kluis_admin"]
            # No CSP violation (nothing inline, nothing from elsewhere); the only miss is the
            # favicon the browser asks for on its own.
            assert not [m for m in scripts if "Content Security Policy" in m or "Refused" in m]
            await browser.close()

        # What a disk thief finds: no password, TOTP secret or session token in clear.
        server.stop()
        raw_secret = base64.b32decode(boss.totp_secret)
        audit_run = subprocess.run(
            server.cli(
                "audit-storage",
                "--data",
                str(server.data),
                "--marker",
                boss.password,
                "--marker",
                boss.totp_secret,
                "--marker",
                token,
                "--bytes",
                raw_secret.hex(),
            ),
            capture_output=True,
            text=True,
        )
        assert audit_run.returncode == 0, audit_run.stdout + audit_run.stderr
    finally:
        if client is not None:
            await client.close()
        server.stop()
