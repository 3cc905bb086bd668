"""Server configuration: every limit is explicit, named and overridable."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kluis.protocol.signing import origin

DAY = 86_400


@dataclass(frozen=True, slots=True)
class Limits:
    # A group message to 1,000 members is one Send of about 560 bytes per member device.
    max_frame_bytes: int = 2 * 1024 * 1024
    max_envelope_bytes: int = 96 * 1024
    max_envelopes_per_send: int = 2048
    max_keys_per_upload: int = 100
    max_stored_one_time_keys: int = 200
    keys_low_threshold: int = 10
    send_rate_per_s: float = 50.0  # sends per device, sustained (one per 64 envelopes started)
    send_burst: int = 500
    claim_rate_per_s: float = 5.0  # key claims per device, sustained
    # A new group of 1,000 members claims a key of each member device at once.
    claim_burst: int = 1_100
    # One-time keys handed out per TARGET device, whoever claims: past this, claims get the
    # fallback key. Below the 25 keys a client keeps published, so no burst drains a device.
    claim_target_rate_per_s: float = 0.05
    claim_target_burst: int = 10
    mailbox_quota: int = 10_000  # stored envelopes per recipient device
    mailbox_quota_bytes: int = 256 * 1024 * 1024  # stored envelope bytes per recipient device
    max_devices_per_account: int = 10  # active devices; a link beyond it is refused
    envelope_ttl_s: int = 30 * DAY  # rounded up to a whole hour (no deposit is dated)
    link_ttl_s: int = 600
    # Link requests need no account: without a cap, anyone could grow the database at will.
    max_pending_links: int = 1_000
    auth_timeout_s: float = 10.0  # from the upgrade to a valid signature, however busy the peer
    # Bytes a client may send before it has logged in (its one login frame): an unauthenticated
    # connection holds at most this much of an unfinished frame.
    max_prelogin_bytes: int = 32 * 1024  # a LinkRequest with 100 signed keys is about 17 KiB
    # From TCP accept to a complete HTTP request (aiohttp's keep-alive timer): a client dribbling
    # header bytes (slowloris) is cut after this. Also the idle time between HTTP requests.
    handshake_timeout_s: float = 10.0
    push_batch: int = 256  # envelopes per Deliver frame, and per backlog page read
    # Bytes per Deliver frame (an envelope larger than this goes alone), and per backlog page
    # read from the database: a backlog is delivered page by page as the client reads it.
    max_deliver_bytes: int = 1024 * 1024
    # Attachments (server/blobs.py): opaque ciphertext blobs, uploaded and fetched over HTTP
    # with a ticket from the WebSocket.
    max_blob_bytes: int = 200 * 1024 * 1024  # ciphertext bytes; refused at the ticket request
    blob_quota_bytes: int = 1024 * 1024 * 1024  # live blobs per uploading device (memory/Redis)
    blob_store_bytes: int = 64 * 1024 * 1024 * 1024  # all blobs in the blob folder (deployment)
    blob_ttl_s: int = 30 * DAY  # rounded up to a whole hour, like envelopes
    max_blob_recipients: int = 10_000  # devices an uploader may say will fetch a blob
    blob_ticket_ttl_s: int = 300  # a transfer must start this soon after its ticket
    max_blob_tickets: int = 16  # unused tickets per device
    blob_ticket_rate_per_s: float = 1.0
    blob_ticket_burst: int = 30
    # A transfer that sends no byte for this long is cut (slowloris), and one slower than this
    # rate on average (after the idle allowance) is cut too.
    blob_idle_timeout_s: float = 30.0
    blob_min_bytes_per_s: int = 32 * 1024
    # The admin console (server/admin/): login attempts per client address and for the whole
    # server (brute force), and how long a console session lasts.
    admin_login_rate_per_s: float = 0.1  # one attempt per 10 s per client, sustained
    admin_login_burst: int = 5
    admin_login_global_rate_per_s: float = 1.0
    admin_login_global_burst: int = 30
    admin_session_ttl_s: int = 8 * 3600
    # Several nodes (``--redis``, server/redis_state.py and server/delivery/redis.py).
    # Presence: a device's key names its node; refreshed this often, it lives this long, so the
    # devices of a node that died are offline within presence_ttl_s.
    presence_ttl_s: float = 60.0
    presence_refresh_s: float = 20.0
    # While Redis does not answer, a cached device list older than this is read again.
    device_cache_fallback_s: float = 5.0
    # Several nodes: a cached device list is read again after this long in any case (a version
    # bump lost to a Redis failure on the node that made the change).
    device_cache_max_age_s: float = 60.0
    # A mailbox found full by an exact count is refused without counting again for this long.
    mailbox_full_recheck_s: float = 1.0
    # One Redis round trip (rate limits, counters, versions) may take this long; past it, or on
    # any Redis error, the node uses its own state for a back-off that doubles up to the max.
    redis_timeout_s: float = 1.0
    redis_max_backoff_s: float = 30.0


def limits_with_overrides(base: Limits, overrides: list[str]) -> Limits:
    """Apply ``NAME=VALUE`` overrides (the ``--limit`` option); unknown names are refused."""
    types = {f.name: f.type for f in fields(Limits)}
    changes: dict[str, Any] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise ValueError(f"unknown limit {name!r}; known: {', '.join(sorted(types))}")
        try:
            changes[name] = float(value) if types[name] in (float, "float") else int(value)
        except ValueError as exc:
            raise ValueError(f"limit {name} needs a number, not {value!r}") from exc
        if changes[name] < 0:
            raise ValueError(f"limit {name} cannot be negative")
    return replace(base, **changes)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8448
    limits: Limits = field(default_factory=Limits)
    # "normal": a commit survives a killed process (WAL); "full": it also survives power loss.
    sqlite_synchronous: str = "normal"
    sweep_interval_s: float = 60.0
    # Deleted envelopes leave their old copies in the WAL until a checkpoint: fold it this often
    # after deletions, so a disk taken at any moment holds delivered ciphertexts at most this long.
    checkpoint_interval_s: float = 1.0
    # The URL clients use (behind a TLS proxy: https://chat.example); logins are bound to it.
    public_url: str | None = None
    # postgresql://user@host:port/database: the store is on PostgreSQL (server/store/postgres.py)
    # instead of SQLite in data_dir; attachments stay in blob_dir.
    database_url: str | None = None
    # redis://host:port/db: the delivery bus runs over Redis pub/sub (server/delivery/redis.py),
    # so several nodes on one PostgreSQL store route signals to each other's connections. All
    # nodes of one deployment share redis_prefix; deployments sharing a Redis differ in it.
    redis_url: str | None = None
    redis_prefix: str = "kluis"
    # Connections each node keeps to PostgreSQL at most (its pool); the database's
    # max_connections must cover every node's pool (docs/deploy.md).
    database_pool: int = 10
    # Prometheus metrics (server/metrics.py) on a port of their own, never the public one: how
    # many devices are online is nobody's business (SECURITY.md, finding 15). None: not served.
    # A host other than loopback needs metrics_token (Authorization: Bearer TOKEN).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_token: str | None = None
    # /readyz (server/health.py): each check must answer within this; a result is reused this long.
    ready_timeout_s: float = 2.0
    ready_cache_s: float = 1.0
    # On PostgreSQL: the file of key-encryption keys (server/store/sealing.py), the same on
    # every node of a deployment; by default storage.key in data_dir.
    storage_key_file: Path | None = None
    # The attachment folder (server/blob_files.py); by default blobs in data_dir. With several
    # nodes (redis_url set) it must be one folder every node mounts (NFS, CephFS: docs/deploy.md).
    blob_dir: Path | None = None
    # On SIGTERM or SIGINT the node stops accepting, closes every WebSocket with 1001 (going
    # away: clients reconnect elsewhere at once) once its request in hand is answered, and exits
    # when they are all gone or after this many seconds (server/drain.py).
    drain_timeout_s: float = 10.0

    @property
    def origin(self) -> str:
        return origin(self.public_url or f"http://{self.host}:{self.port}")

    @property
    def on_postgres(self) -> bool:
        return self.database_url is not None

    @property
    def database_path(self) -> Path:
        return self.data_dir / "kluis.sqlite3"

    @property
    def blob_path(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def storage_key_path(self) -> Path:
        return self.storage_key_file or self.data_dir / "storage.key"
