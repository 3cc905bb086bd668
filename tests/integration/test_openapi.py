"""API fuzzing: schemathesis against the server's own OpenAPI description (bounded).

The description (``GET /v1/openapi.json``) covers the HTTP side: the health check, the WebSocket
upgrade and the description itself. Schemathesis generates requests from it, valid and invalid,
and checks that the server never answers 5xx and that every answer matches the description
(status codes, content types, bodies, headers).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kluis.server.openapi import SPEC
from tests.kluis_testing import ServerProcess

EXAMPLES = int(os.environ.get("KLUIS_API_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(Path(tmp_path_factory.mktemp("api")) / "server")
    srv.start()
    yield srv
    srv.stop()


def test_the_server_serves_this_description(live: ServerProcess) -> None:
    with urllib.request.urlopen(live.url + "/v1/openapi.json", timeout=5) as r:
        assert json.loads(r.read()) == json.loads(json.dumps(SPEC))


# The same document the server serves (checked above); loaded here so pytest can collect cases.
schema = schemathesis.openapi.from_dict(SPEC)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_http_routes_match_their_description(case: Case[Any], live: ServerProcess) -> None:
    case.call_and_validate(
        base_url=live.url,
        timeout=10,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
    )
