"""The verification dialog (F7) over a fake backend: what it asks of the backend, what each
VerificationChanged event shows, and that it closes with the flow."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Button

from kluis.apps.tui.screens.verify import VerifyScreen
from kluis.client.events import VerificationChanged, VerificationRequested
from kluis.client.sas_emoji import EMOJI
from kluis.client.verification import ShortCode, State, Status, Verification
from tests.apps.test_tui_features import log_lines, main_screen, open_, settle, title_text
from tests.apps.tui_fakes import ANNA, GROUP, FakeBackend, fake_app

TXN = b"t" * 16
CODE = ShortCode(tuple(EMOJI[:7]), (1234, 5678, 9012))


def chat(app: object) -> str:
    return " ".join(line.strip() for line in log_lines(app))


def flow(state: State, reason: str = "") -> VerificationChanged:
    code = CODE if state is State.COMPARING else None
    return VerificationChanged(Verification(TXN, ANNA, "dev", state, code, reason))


async def test_f8_shows_the_code_sends_the_answer_and_the_mark_after(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, GROUP)
        await pilot.press("f7")  # a group: nobody to verify
        assert not isinstance(app.screen, VerifyScreen) and backend.verifications == []
        backend.emit(VerificationRequested(ANNA))
        await settle(pilot)
        await open_(pilot, ANNA)
        assert "asks to verify: press F7" in chat(app)
        await pilot.press("f7")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, VerifyScreen)
        assert backend.verifications == [("start", ANNA)]
        assert screen.query_one("#match", Button).disabled  # nothing to compare yet
        backend.emit(flow(State.COMPARING))
        await settle(pilot)
        picture = app.export_screenshot()
        assert "1234&#160;5678&#160;9012" in picture
        assert all(name.replace(" ", "&#160;") in picture for _, name in CODE.emoji)
        await pilot.click("#match")
        await settle(pilot)
        assert backend.verifications[-1] == ("confirm", TXN.hex())
        backend.statuses[ANNA] = (Status.VERIFIED, "")
        backend.emit(flow(State.VERIFIED))
        await settle(pilot)
        assert not isinstance(app.screen, VerifyScreen)
        assert "✓ verified" in title_text(app)
        assert "the codes matched" in chat(app)


async def test_differ_and_escape_cancel_and_no_mark_shows(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, ANNA)
        await pilot.press("f7")
        await settle(pilot)
        backend.emit(flow(State.COMPARING))
        await settle(pilot)
        await pilot.click("#differ")
        await settle(pilot)
        assert backend.verifications[-1] == ("mismatch", TXN.hex())
        assert not isinstance(app.screen, VerifyScreen)
        backend.emit(flow(State.CANCELLED, "the short codes differ"))
        await settle(pilot)
        assert "failed: the short codes differ" in chat(app)
        assert "verified" not in title_text(app)

        await pilot.press("f7")  # again, and given up with Esc before any code
        await settle(pilot)
        backend.emit(flow(State.REQUESTED))
        await settle(pilot)
        await pilot.press("escape")
        await settle(pilot)
        assert backend.verifications[-1] == ("cancel", TXN.hex())
        assert not isinstance(app.screen, VerifyScreen)
        assert main_screen(app).verify_screen is None
