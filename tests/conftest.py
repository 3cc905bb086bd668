from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kluis_testing import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "server")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
