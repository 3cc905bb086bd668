"""The attachment ledger of a deployment of several nodes, in Redis: tickets, reservations,
blob records, who fetched what, and the bytes each device and the deployment hold.

Theory of operation: every rule that must hold across nodes is one Lua script, so it is atomic
however many nodes ask at once (keys under ``<prefix>:blob:``; the scripts build them from the
prefix, so the ledger needs one Redis, not a Redis Cluster):

- ``t:<sha256 of ticket>``: a ticket, ``"<id> u|d <size> <recipients> <device>"``, with a Redis
  expiry of ``blob_ticket_ttl_s``; taking it deletes it (single use, whichever node takes it).
  ``n:<device>``: the device's unused tickets (a sorted set by expiry), for ``max_blob_tickets``.
- ``u:<device>`` and ``total``: the bytes of live and reserved blobs of one uploading device and
  of the deployment. An upload ticket reserves its size in both at once, under the quota, or
  is refused; ``res`` (a sorted set by deadline) and ``resv`` hold the reservations. A ticket
  taken moves its deadline to the end of the longest transfer its size allows; a reservation
  past its deadline (a ticket never used, a node that died mid-upload) is released by the
  sweep. A committed upload turns its reservation into a record.
- ``r:<id>``: the record (size, expiry, fetches remaining, uploader); ``f:<id>`` and ``c:<id>``:
  the devices that completed a download and those that confirmed it. Confirming is one
  script: each device counts once and only after a completed download; the confirmation that
  reaches zero drops the record and gives the bytes back, and the caller then deletes the file.
  ``x:<id>``: a tombstone for a day, so a record is never restored from a file being deleted.
- The sweep sets ``total`` again to the bytes of the blob files plus the reservations: an upload
  committed while the folder was being read is missed until the next sweep (a short under-count,
  never a lasting drift).

Redis restarted (empty): the tickets in flight are lost (the clients ask again); the records are
restored from the blob files' headers as they are asked for (size, expiry, fetches remaining,
but no uploader: those blobs count against the deployment, not against a device's quota, as
after a single node's restart); which devices fetched but did not confirm is lost (they fetch
again); the deployment total is counted again from the folder by the next sweep. Redis
unavailable: attachments are refused with ``ServerError`` (no per-node fallback: one node
alone cannot know the others' tickets). Nothing here holds a key, a name or content.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kluis.errors import ServerError

_LIB = """
local p = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function less(key, size)
  if redis.call('EXISTS', key) == 1 and redis.call('DECRBY', key, size) <= 0 then
    redis.call('DEL', key)
  end
end
local function unreserve(id)
  if redis.call('ZREM', p .. ':res', id) == 0 then return 0 end
  local v = redis.call('HGET', p .. ':resv', id)
  redis.call('HDEL', p .. ':resv', id)
  if v then
    local size, device = string.match(v, '^(%S+) (.+)$')
    less(p .. ':u:' .. device, size)
    less(p .. ':total', size)
  end
  return 1
end
local function drop(id)
  local r = p .. ':r:' .. id
  local rec = redis.call('HMGET', r, 's', 'u')
  if redis.call('DEL', r) == 0 then return 0 end
  redis.call('DEL', p .. ':f:' .. id, p .. ':c:' .. id)
  redis.call('SET', p .. ':x:' .. id, '1', 'PX', 86400000)
  if rec[2] and rec[2] ~= '' then less(p .. ':u:' .. rec[2], rec[1]) end
  less(p .. ':total', rec[1])
  return 1
end
"""

# ARGV: prefix, digest, ticket, device, ttl_ms, max_tickets, then for an upload: blob id, size,
# device quota, deployment room, usage key lifetime (ms). Answers ok, quota, room or tickets.
_ISSUE = """
local device, ttl = ARGV[4], tonumber(ARGV[5])
local now = now_ms()
local nkey = p .. ':n:' .. device
redis.call('ZREMRANGEBYSCORE', nkey, '-inf', now)
local upload = ARGV[7] ~= nil
if upload then
  local size = tonumber(ARGV[8])
  local ukey = p .. ':u:' .. device
  if (tonumber(redis.call('GET', ukey)) or 0) + size > tonumber(ARGV[9]) then return 'quota' end
  if (tonumber(redis.call('GET', p .. ':total')) or 0) + size > tonumber(ARGV[10]) then
    return 'room'
  end
end
if redis.call('ZCARD', nkey) >= tonumber(ARGV[6]) then return 'tickets' end
if upload then
  local ukey = p .. ':u:' .. device
  redis.call('INCRBY', ukey, ARGV[8])
  redis.call('PEXPIRE', ukey, ARGV[11])
  redis.call('INCRBY', p .. ':total', ARGV[8])
  redis.call('ZADD', p .. ':res', now + ttl, ARGV[7])
  redis.call('HSET', p .. ':resv', ARGV[7], ARGV[8] .. ' ' .. device)
end
redis.call('SET', p .. ':t:' .. ARGV[2], ARGV[3], 'PX', ttl)
redis.call('ZADD', nkey, now + ttl, ARGV[2])
redis.call('PEXPIRE', nkey, ttl)
return 'ok'
"""

# ARGV: prefix, digest, blob id, u|d, transfer base (ms), minimum rate (bytes/s). Answers the
# ticket, used up, or '' (none, expired, or for another blob or direction: then left alone).
_TAKE = """
local key = p .. ':t:' .. ARGV[2]
local v = redis.call('GET', key)
if not v then return '' end
local id, dir, size, _, device = string.match(v, '^(%S+) (%S+) (%S+) (%S+) (.+)$')
if id ~= ARGV[3] or dir ~= ARGV[4] then return '' end
redis.call('DEL', key)
redis.call('ZREM', p .. ':n:' .. device, ARGV[2])
if dir == 'u' then
  local hold = tonumber(ARGV[5]) + math.ceil(tonumber(size) * 1000 / tonumber(ARGV[6]))
  redis.call('ZADD', p .. ':res', 'XX', now_ms() + hold, id)
end
return v
"""

_RELEASE = "return unreserve(ARGV[2])"  # ARGV: prefix, blob id

_LAPSE = """
local ids = redis.call('ZRANGEBYSCORE', p .. ':res', '-inf', now_ms(), 'LIMIT', 0, 1000)
for _, id in ipairs(ids) do unreserve(id) end
return #ids
"""

# ARGV: prefix, id, size, expires_at, remaining, device, usage key lifetime (ms), record end (ms)
_COMMIT = """
local id, device = ARGV[2], ARGV[6]
if redis.call('ZREM', p .. ':res', id) == 0 then  -- its reservation lapsed: count it again
  redis.call('INCRBY', p .. ':u:' .. device, ARGV[3])
  redis.call('INCRBY', p .. ':total', ARGV[3])
end
redis.call('HDEL', p .. ':resv', id)
redis.call('PEXPIRE', p .. ':u:' .. device, ARGV[7])
local r = p .. ':r:' .. id
redis.call('HSET', r, 's', ARGV[3], 'e', ARGV[4], 'r', ARGV[5], 'u', device)
redis.call('PEXPIREAT', r, ARGV[8])
return 1
"""

# ARGV: prefix, id, size, expires_at, remaining, record end (ms): a record lost with Redis,
# from the file's header; never over a live record or a tombstone.
_RESTORE = """
local r = p .. ':r:' .. ARGV[2]
if redis.call('EXISTS', r) == 1 or redis.call('EXISTS', p .. ':x:' .. ARGV[2]) == 1 then
  return 0
end
redis.call('HSET', r, 's', ARGV[3], 'e', ARGV[4], 'r', ARGV[5], 'u', '')
redis.call('PEXPIREAT', r, ARGV[6])
return 1
"""

# ARGV: prefix, id, device. Answers unknown, again (confirmed before), unfetched, or the number
# of fetches still expected ('0': the record is dropped, delete the file).
_CONFIRM = """
local id, device = ARGV[2], ARGV[3]
local r = p .. ':r:' .. id
if redis.call('EXISTS', r) == 0 then return 'unknown' end
local c = p .. ':c:' .. id
if redis.call('SISMEMBER', c, device) == 1 then return 'again' end
if redis.call('SREM', p .. ':f:' .. id, device) == 0 then return 'unfetched' end
local left = redis.call('HINCRBY', r, 'r', -1)
if left <= 0 then
  drop(id)
  return '0'
end
redis.call('SADD', c, device)
redis.call('PEXPIREAT', c, (tonumber(redis.call('HGET', r, 'e')) + 3600) * 1000)
return tostring(left)
"""

# ARGV: prefix, id, device: a completed download.
_FETCHED = """
local r = p .. ':r:' .. ARGV[2]
if redis.call('EXISTS', r) == 0 then return 0 end
local f = p .. ':f:' .. ARGV[2]
redis.call('SADD', f, ARGV[3])
redis.call('PEXPIREAT', f, (tonumber(redis.call('HGET', r, 'e')) + 3600) * 1000)
return 1
"""

_DROP = "return drop(ARGV[2])"  # ARGV: prefix, id. 1: this call dropped it.

# ARGV: prefix, bytes of the blobs in the folder: the total, counted again with the reservations.
_RECOUNT = """
local total = tonumber(ARGV[2])
for _, v in ipairs(redis.call('HVALS', p .. ':resv')) do
  total = total + tonumber(string.match(v, '^(%S+)'))
end
if total > 0 then redis.call('SET', p .. ':total', string.format('%d', total))
else redis.call('DEL', p .. ':total') end
return 1
"""


class BlobLedger:
    """The scripts above over one Redis connection pool; :meth:`start` before use."""

    def __init__(self, url: str, prefix: str, *, op_timeout_s: float = 1.0) -> None:
        self.url, self.prefix = url, f"{prefix}:blob"
        self._op_timeout_s = op_timeout_s
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    async def start(self) -> None:
        """Connect (idempotent); ServerError when Redis does not answer."""
        if self._redis is not None:
            return
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self._op_timeout_s * 5,
            socket_timeout=self._op_timeout_s,
            decode_responses=True,
            client_name="kluis-blobs",
        )
        try:
            await asyncio.wait_for(client.ping(), self._op_timeout_s * 5)
        except (RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise ServerError(f"Redis does not answer: {type(exc).__name__}") from exc
        self._redis = client
        for name, body in (
            ("issue", _ISSUE),
            ("take", _TAKE),
            ("release", _RELEASE),
            ("lapse", _LAPSE),
            ("commit", _COMMIT),
            ("restore", _RESTORE),
            ("confirm", _CONFIRM),
            ("fetched", _FETCHED),
            ("drop", _DROP),
            ("recount", _RECOUNT),
        ):
            self._scripts[name] = client.register_script(_LIB + body)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _run(self, name: str, *args: object) -> Any:
        if self._redis is None:
            await self.start()
        try:
            script = self._scripts[name]
            return await asyncio.wait_for(
                script(keys=[], args=[self.prefix, *args]), self._op_timeout_s
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise ServerError(
                f"attachments are unavailable for a moment ({type(exc).__name__}); try again"
            ) from exc

    # ---- the operations ---------------------------------------------------------------------

    async def issue(
        self,
        digest: str,
        ticket: str,
        device: str,
        ttl_ms: int,
        max_tickets: int,
        reserve: tuple[str, int, int, int, int] | None = None,
    ) -> str:
        """Store a ticket; with ``reserve`` (blob id, size, device quota, deployment room,
        usage lifetime in ms) reserve its room too. Answers ok, quota, room or tickets."""
        extra = list(reserve) if reserve is not None else []
        return str(await self._run("issue", digest, ticket, device, ttl_ms, max_tickets, *extra))

    async def take(
        self, digest: str, blob_id: str, upload: bool, base_ms: int, min_rate: int
    ) -> str | None:
        answer = await self._run("take", digest, blob_id, "u" if upload else "d", base_ms, min_rate)
        return str(answer) or None

    async def release(self, blob_id: str) -> None:
        await self._run("release", blob_id)

    async def lapse(self) -> int:
        return int(await self._run("lapse"))

    async def commit(
        self,
        blob_id: str,
        size: int,
        expires_at: int,
        remaining: int,
        device: str,
        usage_ttl_ms: int,
    ) -> None:
        end_ms = (expires_at + 3600) * 1000
        await self._run(
            "commit", blob_id, size, expires_at, remaining, device, usage_ttl_ms, end_ms
        )

    async def restore(self, blob_id: str, size: int, expires_at: int, remaining: int) -> None:
        end_ms = (expires_at + 3600) * 1000
        await self._run("restore", blob_id, size, expires_at, remaining, end_ms)

    async def record(self, blob_id: str) -> tuple[int, int] | None:
        """The size and expiry of a live blob; None when it has no record."""
        if self._redis is None:
            await self.start()
        assert self._redis is not None
        try:
            command = self._redis.hmget(f"{self.prefix}:r:{blob_id}", ["s", "e"])
            size, expires = await asyncio.wait_for(command, self._op_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise ServerError(
                f"attachments are unavailable for a moment ({type(exc).__name__}); try again"
            ) from exc
        if size is None or expires is None:
            return None
        return int(size), int(expires)

    async def confirm(self, blob_id: str, device: str) -> str:
        return str(await self._run("confirm", blob_id, device))

    async def fetched(self, blob_id: str, device: str) -> None:
        await self._run("fetched", blob_id, device)

    async def drop(self, blob_id: str) -> bool:
        return bool(await self._run("drop", blob_id))

    async def recount(self, folder_bytes: int) -> None:
        await self._run("recount", folder_bytes)

    async def sweep_turn(self, period_ms: int) -> bool:
        """Whether this node sweeps now: one node per period, whichever asks first."""
        if self._redis is None:
            await self.start()
        assert self._redis is not None
        try:
            command = self._redis.set(f"{self.prefix}:sweep", "1", nx=True, px=period_ms)
            return bool(await asyncio.wait_for(command, self._op_timeout_s))
        except (RedisError, OSError, TimeoutError) as exc:
            raise ServerError(f"Redis does not answer: {type(exc).__name__}") from exc
