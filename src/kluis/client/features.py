"""Issue 9's messaging features, held together for the core: contacts, notes, timers,
receipts and the conversation list (one module each), and the events they raise.

The core owns one :class:`Features` (``core.features``); its ``_apply`` hands each feature
payload to the module here, inside the envelope's transaction, and files texts through
:meth:`Features.text_stored` and :meth:`Features.text_sent`. Events wait in :attr:`events`
until the client drains them (``KluisClient.events()``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kluis.client.contacts import Contacts, Notes
from kluis.client.conversations import Conversations
from kluis.client.events import FeatureEvent
from kluis.client.receipts import Receipts
from kluis.client.records import Message, StoredMessage
from kluis.client.timers import Timers

if TYPE_CHECKING:
    from kluis.client.core import ClientCore

__all__ = ["Features"]


class Features:
    def __init__(self, core: ClientCore) -> None:
        self._core = core
        self.events: list[FeatureEvent] = []
        self.contacts = Contacts(core, self.events)
        self.notes = Notes(core, self.events)
        self.timers = Timers(core, self.events)
        self.receipts = Receipts(core, self.events)
        self.conversations = Conversations(core, self.receipts)

    def text_stored(self, m: StoredMessage) -> None:
        """A text from another account or our own device was stored: a text from another
        account earns a delivered receipt (sent with the rest of its receive batch)."""
        if m.sender == self._core.account_id:
            self.receipts.track(m.id, m.conversation)
        elif m.id:
            self.receipts.queue("delivered", m.sender, m.conversation, [m.id])

    def text_sent(self, m: StoredMessage) -> None:
        self.receipts.track(m.id, m.conversation)

    def shown(self, m: StoredMessage) -> Message | None:
        """How history shows a stored message: None once it expired (even before a sweep),
        with its receipt state when we sent it."""
        if m.expires and m.expires <= self._core._now_ms():
            return None
        message = Message.from_stored(m)
        if m.sender == self._core.account_id and m.kind == "" and m.id:
            state = self.receipts.state(m.id)
            if state:
                message = replace(message, receipt=state)
        return message

    def drain(self) -> list[FeatureEvent]:
        out = list(self.events)
        self.events.clear()
        return out
