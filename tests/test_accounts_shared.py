"""Device lists across nodes without the bus signal: the version in Redis alone keeps a node
from accepting a revoked device (server/accounts.py, server/redis_state.py).

Three in-process nodes share one SQLite file: two with their Redis state started but their
buses not (so no ``dev`` signal ever crosses), and one with no Redis at all, the control that
shows the stale cache the versions guard against. Clients join in memory; the sends on the
nodes are raw frames, as a client with an old device list would send them."""

from __future__ import annotations

from pathlib import Path

from kluis.protocol import frames as f
from kluis.server.config import ServerConfig
from kluis.server.inprocess import InProcessEnd, InProcessServer, open_inprocess_server
from tests.kluis_testing import link_device, register
from tests.redis_testing import prefix
from tests.test_delivery_redis import REDIS_URL


async def login(node: InProcessServer, client: object) -> InProcessEnd:
    end = node.connect(lambda: None)
    core = client.core  # type: ignore[attr-defined]
    sig = core.sign_challenge(end.nonce, end.origin)
    welcome = f.decode_server_frame(
        await end.handle(f.encode(f.Auth(rid=0, device=core.device_id, sig=sig)))
    )
    assert isinstance(welcome, f.Welcome), welcome
    return end


async def send(end: InProcessEnd, rid: int, account: str, devices: list[str]) -> str:
    envelopes = [f.OutEnvelope(device=d, body=b"opaque") for d in devices]
    answer = f.decode_server_frame(await end.handle(f.encode(f.Send.one(rid, account, envelopes))))
    return "done" if isinstance(answer, f.Done) else getattr(answer, "code", repr(answer))


async def test_a_revocation_moves_the_version_and_no_node_uses_its_stale_list(
    tmp_path: Path, prefix: str
) -> None:
    data = tmp_path / "server"
    data.mkdir()
    shared = ServerConfig(data_dir=data, redis_url=REDIS_URL, redis_prefix=prefix)
    one, two = await open_inprocess_server(shared), await open_inprocess_server(shared)
    control = await open_inprocess_server(ServerConfig(data_dir=data))  # one node's rules
    states = [n.server.services.redis_state for n in (one, two)]
    ends: list[InProcessEnd] = []
    try:
        for state in states:
            assert state is not None
            await state.start()
        alice = await register(one, tmp_path / "alice")
        laptop = await link_device(alice, one, tmp_path / "laptop")
        bob = await register(two, tmp_path / "bob")
        devices = [alice.core.device_id, laptop.core.device_id]
        ends = [await login(two, bob), await login(control, bob)]
        # Both nodes read, and cache, Alice's two devices.
        assert [await send(end, 1, alice.account_id, devices) for end in ends] == ["done"] * 2
        await alice.revoke(laptop.core.device_id)  # on node one; no signal reaches the others
        on_two, on_control = [await send(end, 2, alice.account_id, devices) for end in ends]
        assert on_two == "mismatched_devices"  # the version moved: node two reads again
        assert on_control == "done"  # what a node without shared versions would accept
        assert await send(ends[0], 3, alice.account_id, devices[:1]) == "done"
        for client in (alice, laptop, bob):
            await client.close()
    finally:
        for end in ends:
            end.closed()
        for node in (one, two, control):
            await node.close()
        for state in states:
            if state is not None:
                await state.close()


__all__ = ["prefix"]  # the shared fixture, imported for its name
