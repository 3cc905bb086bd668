"""server/settings.py: command line > environment > config file > defaults, and one clear line
for every setting that cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest

from kluis.server.config import Limits, ServerConfig
from kluis.server.settings import SETTINGS, ConfigError, config_fields, load_file, resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "kluis.example.toml"
NOTHING: dict[str, object | None] = {}


def test_every_setting_names_a_config_field_and_a_kluis_variable() -> None:
    assert {s.field for s in SETTINGS} <= config_fields()
    assert all(s.env.startswith("KLUIS_") and s.env == s.env.upper() for s in SETTINGS)


def test_the_documented_example_file_loads_with_every_value_it_shows() -> None:
    config = resolve(NOTHING, {}, load_file(EXAMPLE), source=str(EXAMPLE))
    assert config.data_dir == Path("/var/lib/kluis")
    assert config.database_url == "postgresql://kluis@127.0.0.1:5432/kluis"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 8448, 9448)
    assert config.metrics_host == "127.0.0.1"
    assert config.public_url == "https://chat.example"
    assert config.limits.send_rate_per_s == 50.0 and config.limits.mailbox_quota == 10_000
    assert config.database_pool == 10


def test_defaults_apply_when_no_source_names_a_setting() -> None:
    config = resolve({"data": "/d"}, {})
    assert config == ServerConfig(data_dir=Path("/d"))


def test_command_line_beats_environment_beats_file_beats_default() -> None:
    document = {"data": "/file", "port": 1001, "host": "10.0.0.1", "redis_prefix": "f"}
    env = {"KLUIS_PORT": "1002", "KLUIS_HOST": "10.0.0.2", "KLUIS_DATA": "/env"}
    config = resolve({"port": 1003, "data": None, "host": None}, env, document)
    assert config.port == 1003  # command line
    assert config.host == "10.0.0.2" and config.data_dir == Path("/env")  # environment
    assert config.redis_prefix == "f"  # file
    assert config.sqlite_synchronous == "normal"  # default


def test_limits_file_then_environment_then_command_line() -> None:
    document = {"data": "/d", "limits": {"mailbox_quota": 5, "send_burst": 7, "link_ttl_s": 9}}
    env = {"KLUIS_LIMIT_SEND_BURST": "70", "KLUIS_LIMIT_LINK_TTL_S": "90"}
    config = resolve(NOTHING, env, document, limit_overrides=["link_ttl_s=900"])
    assert config.limits.mailbox_quota == 5
    assert config.limits.send_burst == 70
    assert config.limits.link_ttl_s == 900
    assert config.limits.max_frame_bytes == Limits().max_frame_bytes


@pytest.mark.parametrize(
    ("document", "env", "message"),
    [
        ({"data": "/d", "prot": 1}, {}, "cfg.toml: unknown key 'prot'; known: data, database"),
        ({"data": "/d", "port": "80a"}, {}, "cfg.toml: port needs a TCP port"),
        ({"data": "/d", "port": 70000}, {}, "cfg.toml: port needs a TCP port"),
        ({"data": "/d", "port": True}, {}, "cfg.toml: port needs a TCP port"),
        ({"data": 3}, {}, "cfg.toml: data needs a string, not 3"),
        ({"data": "/d", "sync": "off"}, {}, "cfg.toml: sync needs 'normal' or 'full'"),
        ({"data": "/d", "database_pool": 0}, {}, "database_pool needs a number of connections"),
        ({"data": "/d"}, {"KLUIS_DATABASE_POOL": "x"}, "KLUIS_DATABASE_POOL needs a number"),
        ({"data": "/d", "ready_timeout_s": 0}, {}, "ready_timeout_s needs a positive number"),
        ({"data": "/d", "limits": {"nope": 1}}, {}, "cfg.toml: unknown limit 'nope'"),
        ({"data": "/d", "limits": {"send_burst": "x"}}, {}, "[limits] send_burst needs a number"),
        ({"data": "/d", "limits": {"send_burst": -1}}, {}, "limit send_burst cannot be negative"),
        ({"data": "/d", "limits": 3}, {}, "cfg.toml: limits must be a table"),
        ({"data": "/d"}, {"KLUIS_PORT": "x"}, "KLUIS_PORT needs a TCP port"),
        ({"data": "/d"}, {"KLUIS_LIMIT_NOPE": "1"}, "KLUIS_LIMIT_NOPE: unknown limit 'nope'"),
        ({"data": "/d"}, {"KLUIS_LIMIT_SEND_BURST": "many"}, "limit send_burst needs a number"),
        ({"data": "/d", "public_url": "ftp://x"}, {}, "public_url:"),
        ({}, {}, "no data folder: give --data DIR, KLUIS_DATA or data = in --config"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_source(
    document: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(NOTHING, env, document, source="cfg.toml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.code == "local_protocol"


def test_unknown_kluis_variables_are_not_settings() -> None:
    config = resolve({"data": "/d"}, {"KLUIS_PASSPHRASE": "x", "KLUIS_ADMIN_PASSWORD": "y"})
    assert config == ServerConfig(data_dir=Path("/d"))


def test_an_unreadable_or_invalid_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "/d"\nport = \n')
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*line 2") as err:
        load_file(bad)
    assert "\n" not in str(err.value)
