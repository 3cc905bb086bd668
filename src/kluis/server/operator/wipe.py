"""Remote wipe: signed orders that make a device erase its profile, then end it.

Theory of operation: an order names one device of one account on this server (its origin) and is
signed by the operator key (only where the account's policy, ``operator_wipe``, allows it;
allowed by default, as the cryptophone services did) or by the account's identity key (the
owner, from the account's first device, like a revocation). The server keeps the order
(``wipes`` table) and closes the device's connection; from then on the device's login is
answered by ``Wipe`` carrying the order instead of ``Welcome``, and the connection accepts only
``WipeDone``: the device checks the signature against the operator key it pinned or its
account's identity, erases its profile, and sends a revocation signed by itself, which the
server records like any other (its keys and mailbox go, it never authenticates again). A device
that ignores the order still gets nothing but the order: no messages, no sends.

A hostile server cannot forge an order; replaying one only wipes the device it names.
"""

from __future__ import annotations

from kluis.crypto.account_key import AccountKey
from kluis.crypto.olm import verify_signature
from kluis.errors import BadSignature, LocalProtocolError, UnknownDevice
from kluis.protocol import operator as op
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.store.protocol import Store


def sign_order(key: AccountKey, order: op.WipeOrder) -> op.WipeOrder:
    return op.WipeOrder(
        account=order.account,
        device=order.device,
        server=order.server,
        issued_at=order.issued_at,
        by=order.by,
        sig=key.sign(op.wipe_message(order)),
    )


def operator_orders(
    key: AccountKey, origin: str, account_id: str, devices: list[str], now: int
) -> list[bytes]:
    """Encoded wipe orders for ``devices`` of ``account_id``, signed by the operator ``key``
    (``kluis admin wipe`` and the console's wipe action)."""
    return [
        op.encode_wipe(
            sign_order(
                key,
                op.WipeOrder(
                    account=account_id, device=d, server=origin, issued_at=now, by="operator"
                ),
            )
        )
        for d in devices
    ]


class Wipes:
    def __init__(self, store: Store, origin: str, operator_key: str = "") -> None:
        self._store = store
        self._origin = origin
        self._operator_key = operator_key  # public; "" when the operator made none

    async def order(self, data: bytes, account_id: str = "", bus: DeliveryBus | None = None) -> str:
        """Check and keep a signed order; ``account_id``: the owner's session that sent it
        (then only ``by="owner"`` for its own devices). Return the device it names."""
        order = op.decode_wipe(data)
        if order.server != self._origin:
            raise BadSignature("the wipe order is for another server")
        if account_id and (order.account != account_id or order.by != "owner"):
            raise BadSignature("an owner orders wipes of its own account's devices only")
        stored = await self._store.device(order.device)
        if stored is None or stored.revoked or stored.account_id != order.account:
            raise UnknownDevice("no such device in this account")
        account = await self._store.account(order.account)
        assert account is not None  # the device row references it
        key = account.identity if order.by == "owner" else self._operator_key
        if not key:
            raise BadSignature("no key to check the wipe order against")
        verify_signature(key, op.wipe_message(order), order.sig)
        if order.by == "operator" and not account.operator_wipe:
            raise LocalProtocolError("this account's policy does not let the operator wipe")
        await self._store.put_wipe(order.device, op.encode_wipe(order))
        if bus is not None:
            bus.revoke(order.device)  # closes its connection: the next login gets the order
        return order.device

    async def pending(self, device_id: str) -> bytes | None:
        return await self._store.wipe_order(device_id)
