"""Keep client addresses and request bytes out of every log line, whichever library writes it.

aiohttp logs ``Error handling request from <address>`` with a traceback that echoes the bytes a
client sent, for anyone who sends malformed HTTP; asyncio names peers in transport errors. A
filter on those loggers and on the root handlers rewrites each record: addresses are masked, the
traceback is reduced to the exception's type name. Kluis's own lines never hold either.
"""

from __future__ import annotations

import logging
import re

# IPv4, and IPv6 in its usual spellings (with or without brackets and a port).
_ADDRESS = re.compile(
    r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[?(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}\]?"
)
LIBRARY_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
    "asyncio",
)


def scrub(text: str) -> str:
    return _ADDRESS.sub("[address]", text)


class ScrubFilter(logging.Filter):
    """Masks addresses; replaces a traceback with the exception's type name."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_kluis_scrubbed", False) or record.name.startswith("kluis"):
            return True  # ours name no client and quote no request (test_log_privacy.py)
        message = scrub(record.getMessage())
        if record.exc_info and record.exc_info[0] is not None:
            message += f" ({record.exc_info[0].__name__})"
        record.msg, record.args = message, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record._kluis_scrubbed = True
        return True


def install() -> None:
    """Filter the libraries' loggers and every handler of the root logger (idempotent)."""
    targets: list[logging.Filterer] = [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    targets.extend(logging.getLogger().handlers)
    for target in targets:
        if not any(isinstance(flt, ScrubFilter) for flt in target.filters):
            target.addFilter(ScrubFilter())
