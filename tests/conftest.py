from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import ServerProcess, start_inprocess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "server")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """A server application in this process: clients join it in memory, with no socket."""
    srv = await start_inprocess(tmp_path / "server")
    try:
        yield srv
    finally:
        await srv.close()
