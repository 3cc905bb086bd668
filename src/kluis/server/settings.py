"""A node's configuration from its four sources: command line > environment > file > defaults.

Theory of operation: every setting of ``kluis serve`` has one name in the TOML file (``--config
FILE``, a top-level key), one environment variable (``KLUIS_`` and the name in capitals) and one
command-line option (``--`` and the name with dashes); :data:`SETTINGS` is that table. Limits
(``config.Limits``) sit in the file's ``[limits]`` table, in ``KLUIS_LIMIT_<NAME>`` variables and
in ``--limit NAME=VALUE`` options, applied in that order through ``limits_with_overrides``, so a
later source wins and every source refuses an unknown name or a negative value alike.

Parsing is pure: :func:`resolve` takes the file's text, the environment as a mapping and the
options given, and returns a ``ServerConfig`` or raises :class:`ConfigError` with one line
naming the source (the file, or the variable) and what is wrong. Unknown keys in the file are
refused (a typo must not silently fall back to a default); unknown ``KLUIS_`` variables are not,
since the client's own (``KLUIS_PASSPHRASE``...) share the prefix. A documented example:
``docs/kluis.example.toml``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kluis.errors import LocalProtocolError
from kluis.server.config import Limits, ServerConfig, limits_with_overrides


class ConfigError(LocalProtocolError):
    """A setting that cannot be used, named with its source; one line."""


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"needs a string, not {value!r}")
    return value


def _port(value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"needs a TCP port (1 to 65535), not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"needs a TCP port (1 to 65535), not {value!r}")
    return value


def _number(
    what: str, low: float, high: float | None = None, *, whole: bool = False, above: bool = False
) -> Callable[[object], float]:
    """A converter to a number in [low, high] (``above``: more than ``low``; ``whole``: an
    int), from TOML's numbers or an environment variable's text; ``what`` names it in errors."""

    def convert(value: object) -> float:
        given = value
        if isinstance(value, str):
            try:
                value = int(value) if whole else float(value)
            except ValueError:
                raise ValueError(f"needs {what}, not {given!r}") from None
        kinds = int if whole else int | float
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"needs {what}, not {given!r}")
        fits = value > low if above else value >= low
        if not fits or (high is not None and value > high):
            raise ValueError(f"needs {what}, not {given!r}")
        return value if whole else float(value)

    return convert


_seconds = _number("a positive number of seconds", 0, above=True)
_pool = _number("a number of connections (1 to 1000)", 1, 1000, whole=True)
DRAIN_SECONDS = _number("a number of seconds (0 to 3600)", 0, 3600)


def _path(value: object) -> Path:
    return Path(_text(value))


def _sync(value: object) -> str:
    if value not in ("normal", "full"):
        raise ValueError(f"needs 'normal' or 'full', not {value!r}")
    return str(value)


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # in the file; KLUIS_<NAME> in the environment; --<name-with-dashes> on the line
    field: str  # of ServerConfig
    parse: Callable[[object], Any]  # a file value (typed) or an environment value (text)
    help: str

    @property
    def env(self) -> str:
        return "KLUIS_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("data", "data_dir", _text, "data folder: SQLite database, attachments, keys"),
    Setting("database", "database_url", _text, "postgresql://... : the store on PostgreSQL"),
    Setting("database_pool", "database_pool", _pool, "PostgreSQL connections per node, at most"),
    Setting(
        "storage_key_file",
        "storage_key_file",
        _path,
        "PostgreSQL: the storage key file, the same on every node (default DATA/storage.key)",
    ),
    Setting(
        "blob_dir",
        "blob_dir",
        _path,
        "attachment folder, one shared by every node (default DATA/blobs)",
    ),
    Setting("redis", "redis_url", _text, "redis://HOST:PORT/DB: the delivery bus across nodes"),
    Setting("redis_prefix", "redis_prefix", _text, "Redis channel prefix of the deployment"),
    Setting("host", "host", _text, "address to listen on"),
    Setting("port", "port", _port, "TCP port"),
    Setting("public_url", "public_url", _text, "the URL clients use (logins are bound to it)"),
    Setting("sync", "sqlite_synchronous", _sync, "SQLite durability: normal or full"),
    Setting("metrics_host", "metrics_host", _text, "address of the metrics port"),
    Setting("metrics_port", "metrics_port", _port, "port of GET /metrics (none: off)"),
    Setting("metrics_token", "metrics_token", _text, "bearer token /metrics requires"),
    Setting(
        "drain_timeout",
        "drain_timeout_s",
        DRAIN_SECONDS,
        "on SIGTERM: exit within this many seconds",
    ),
    Setting("ready_timeout_s", "ready_timeout_s", _seconds, "each /readyz check's deadline"),
    Setting("ready_cache_s", "ready_cache_s", _seconds, "how long a /readyz result is reused"),
)
_BY_NAME = {s.name: s for s in SETTINGS}
LIMIT_ENV_PREFIX = "KLUIS_LIMIT_"


def load_file(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; a missing file or bad TOML is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _file_limits(source: str, table: object) -> list[str]:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: limits must be a table ([limits])")
    overrides = []
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: [limits] {name} needs a number, not {value!r}")
        overrides.append(f"{name}={value}")
    return overrides


def resolve(
    given: Mapping[str, object | None],
    env: Mapping[str, str],
    document: Mapping[str, Any] | None = None,
    *,
    source: str = "config file",
    limit_overrides: list[str] | None = None,
) -> ServerConfig:
    """The configuration from ``given`` (command-line values by setting name, None: not given),
    ``env``, the parsed config file ``document`` (``source`` names it in errors), and
    ``limit_overrides`` (``NAME=VALUE`` from the command line, applied last)."""
    values: dict[str, Any] = {}
    file_limits: list[str] = []
    for key, value in (document or {}).items():
        if key == "limits":
            file_limits = _file_limits(source, value)
            continue
        setting = _BY_NAME.get(key)
        if setting is None:
            known = ", ".join([*_BY_NAME, "[limits]"])
            raise ConfigError(f"{source}: unknown key {key!r}; known: {known}")
        values[setting.field] = _parsed(setting, value, f"{source}: {key}")
    for setting in SETTINGS:
        if setting.env in env:
            values[setting.field] = _parsed(setting, env[setting.env], setting.env)
    for name, value in given.items():
        if value is not None:
            setting = _BY_NAME[name]
            values[setting.field] = _parsed(setting, value, f"--{name.replace('_', '-')}")

    limits = _limits(Limits(), file_limits, source)
    for var, value in sorted(env.items()):
        if var.startswith(LIMIT_ENV_PREFIX):
            limits = _limits(limits, [f"{var[len(LIMIT_ENV_PREFIX) :].lower()}={value}"], var)
    limits = _limits(limits, limit_overrides or [], "--limit")

    data = values.pop("data_dir", None)
    if data is None:
        raise ConfigError("no data folder: give --data DIR, KLUIS_DATA or data = in --config")
    config = ServerConfig(data_dir=Path(data), limits=limits)
    config = replace(config, **values)
    try:
        config.origin  # noqa: B018 - checks public_url before anything starts
    except ValueError as exc:
        raise ConfigError(f"public_url: {exc}") from exc
    return config


def _parsed(setting: Setting, value: object, where: str) -> Any:
    try:
        return setting.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}") from exc


def _limits(base: Limits, overrides: list[str], source: str) -> Limits:
    try:
        return limits_with_overrides(base, overrides)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def config_fields() -> set[str]:
    """ServerConfig's fields (a test checks that every setting names one)."""
    return {f.name for f in fields(ServerConfig)}
