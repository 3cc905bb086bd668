"""The operator's Ed25519 signing key, kept in a file apart from the database.

``kluis admin init --data DIR`` writes the private key to ``DIR/operator.key`` (mode 0600; the
operator may move it to offline media and point ``--key`` at it when signing) and the public
half, with the origin clients know the server by, to ``DIR/operator.json``, which the server
reads to publish the key in ``Welcome``. A thief with the database and ``operator.json`` holds
nothing that signs.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kluis.crypto.account_key import AccountKey
from kluis.errors import LocalProtocolError

KEY_FILE = "operator.key"
PUBLIC_FILE = "operator.json"


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    public_key: str
    origin: str


def init(data: Path, origin: str) -> OperatorInfo:
    """Make the operator key in ``data``; refuse to replace one (clients pinned it)."""
    key_path, pub_path = data / KEY_FILE, data / PUBLIC_FILE
    if key_path.exists() or pub_path.exists():
        raise LocalProtocolError(
            f"{data} already has an operator key; clients pinned it, so it is never replaced"
        )
    data.mkdir(parents=True, exist_ok=True)
    key = AccountKey()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(key.private_bytes()).decode() + "\n")
    info = OperatorInfo(key.public, origin)
    pub_path.write_text(json.dumps({"public_key": info.public_key, "origin": origin}) + "\n")
    return info


def public_info(data: Path) -> OperatorInfo | None:
    try:
        raw = json.loads((data / PUBLIC_FILE).read_text())
        return OperatorInfo(str(raw["public_key"]), str(raw["origin"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise LocalProtocolError(f"{data / PUBLIC_FILE} is damaged") from exc


def load_key(data: Path, key_file: Path | None = None) -> tuple[AccountKey, OperatorInfo]:
    """The signing key (from ``key_file`` or ``data/operator.key``), checked against the public
    key the server publishes."""
    info = public_info(data)
    if info is None:
        raise LocalProtocolError(f"{data} has no operator key; run kluis admin init first")
    path = key_file or data / KEY_FILE
    try:
        key = AccountKey.from_private_bytes(base64.b64decode(path.read_text().strip()))
    except FileNotFoundError as exc:
        raise LocalProtocolError(f"no operator key at {path}; use --key FILE") from exc
    except ValueError as exc:
        raise LocalProtocolError(f"{path} holds no operator key") from exc
    if key.public != info.public_key:
        raise LocalProtocolError(f"{path} is not the key {data} publishes")
    return key, info
