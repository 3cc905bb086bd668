"""Contacts and notes: records of our own account, synced to our own devices end to end.

Theory of operation: the address book (a nickname per account ID) and the notebook are named
records of the encrypted profile. A change is made on one device, written to its profile, and
sent as a payload (:class:`ContactSync`, :class:`NoteSync`) to our own account only, so each of
our other devices applies it. The last writer wins per contact and per note, by the payload's
clock and then its ID, so devices converge whatever order the changes arrive in; a deleted note
stays as a tombstone without its text, so a late copy of it cannot bring it back. Only our own
devices may send these payloads: from anyone else they are refused (the envelope is
quarantined) and change nothing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from kluis.client.events import ContactChanged, FeatureEvent, NoteChanged
from kluis.errors import LocalProtocolError, UntrustedDevice
from kluis.identity.chain import ACCOUNT_ID_CHARS
from kluis.protocol.payload import ContactSync, NoteSync

if TYPE_CHECKING:
    from kluis.client.core import ClientCore
    from kluis.client.records import Sealed

__all__ = ["MAX_NAME", "Contacts", "Note", "Notes", "check_account_id"]

MAX_NAME = 64
MAX_NOTE = 16_000
_ACCOUNT_RE = re.compile(rf"[a-z2-7]{{{ACCOUNT_ID_CHARS}}}")


def check_account_id(account: str) -> str:
    if not _ACCOUNT_RE.fullmatch(account):
        raise LocalProtocolError(f"not an account ID: {account!r}")
    return account


def _check_text(text: str, limit: int, what: str, *, lines: bool = False) -> str:
    text = text.strip()
    if not text or len(text) > limit:
        raise LocalProtocolError(f"a {what} has 1 to {limit} characters")
    if any(not c.isprintable() and not (lines and c in "\n\t") for c in text):
        raise LocalProtocolError(f"a {what} cannot hold control characters")
    return text


class _Versioned(msgspec.Struct, frozen=True):
    ts: int  # the writer's clock (ms)
    id: bytes  # the payload's ID: breaks ties

    def newer_than(self, other: _Versioned | None) -> bool:
        return other is None or (self.ts, self.id) > (other.ts, other.id)


class _Contact(_Versioned, frozen=True):
    name: str


class _NoteRecord(_Versioned, frozen=True):
    created: int
    text: str
    deleted: bool = False


_contacts_dec = msgspec.msgpack.Decoder(dict[str, _Contact])
_notes_dec = msgspec.msgpack.Decoder(dict[str, _NoteRecord])
_enc = msgspec.msgpack.Encoder()


def _own_only(core: ClientCore, s: Sealed) -> None:
    if s.account != core.account_id:
        raise UntrustedDevice("only our own devices may change our contacts or notes")


class Contacts:
    """The address book: ``account ID -> nickname``, in the profile record ``contacts``."""

    RECORD = "contacts"

    def __init__(self, core: ClientCore, events: list[FeatureEvent]) -> None:
        self._core, self._events = core, events

    def _load(self) -> dict[str, _Contact]:
        raw = self._core.store.get(self.RECORD)
        return _contacts_dec.decode(raw) if raw else {}

    def all(self) -> dict[str, str]:
        """Every named contact, by account ID."""
        return {a: c.name for a, c in sorted(self._load().items()) if c.name}

    def name(self, account: str) -> str:
        """The nickname of ``account``, or ""."""
        contact = self._load().get(account)
        return contact.name if contact else ""

    def set(self, account: str, name: str, *, rename: bool | None = None) -> ContactSync:
        """Name ``account`` here; returns the payload for our own other devices.

        ``rename`` True requires a contact, False requires none (``add``), None takes either."""
        check_account_id(account)
        name = _check_text(name, MAX_NAME, "contact name")
        known = bool(self.name(account))
        if rename is True and not known:
            raise LocalProtocolError(f"{account} is not a contact yet: add it first")
        if rename is False and known:
            raise LocalProtocolError(f"{account} is a contact already: rename it")
        payload = ContactSync(
            id=self._core._random(16),
            ts=self._core._now_ms(),
            to=self._core.account_id,
            account=account,
            name=name,
        )
        self._store(payload)
        return payload

    def _store(self, payload: ContactSync) -> bool:
        with self._core.store.transaction():
            contacts = self._load()
            entry = _Contact(ts=payload.ts, id=payload.id, name=payload.name)
            if not entry.newer_than(contacts.get(payload.account)):
                return False
            contacts[payload.account] = entry
            self._core.store.put(self.RECORD, _enc.encode(contacts))
        return True

    def apply(self, s: Sealed, payload: ContactSync) -> None:
        _own_only(self._core, s)
        if not _ACCOUNT_RE.fullmatch(payload.account):
            raise UntrustedDevice("contact sync names no account")
        if self._store(payload):
            self._events.append(ContactChanged(payload.account, payload.name))


class Note(msgspec.Struct, frozen=True):
    """A note as the user sees it."""

    id: str  # short: 8 hex characters
    created: datetime
    text: str


class Notes:
    """The notebook: ``note ID -> text``, in the profile record ``notes``."""

    RECORD = "notes"

    def __init__(self, core: ClientCore, events: list[FeatureEvent]) -> None:
        self._core, self._events = core, events

    def _load(self) -> dict[str, _NoteRecord]:
        raw = self._core.store.get(self.RECORD)
        return _notes_dec.decode(raw) if raw else {}

    def list(self) -> list[Note]:
        """The notes not deleted, oldest first."""
        notes = [
            Note(n, datetime.fromtimestamp(r.created / 1000, UTC), r.text)
            for n, r in self._load().items()
            if not r.deleted
        ]
        return sorted(notes, key=lambda n: (n.created, n.id))

    def add(self, text: str) -> NoteSync:
        text = _check_text(text, MAX_NOTE, "note", lines=True)
        existing = self._load()
        note = self._core._random(4).hex()
        while note in existing:
            note = self._core._random(4).hex()
        return self._write(note, text, deleted=False)

    def delete(self, note: str) -> NoteSync:
        record = self._load().get(note.strip().lower())
        if record is None or record.deleted:
            raise LocalProtocolError(f"no note {note!r}")
        return self._write(note.strip().lower(), "", deleted=True)

    def _write(self, note: str, text: str, *, deleted: bool) -> NoteSync:
        payload = NoteSync(
            id=self._core._random(16),
            ts=self._core._now_ms(),
            to=self._core.account_id,
            note=note,
            text=text,
            deleted=deleted,
        )
        self._store(payload)
        return payload

    def _store(self, payload: NoteSync) -> bool:
        with self._core.store.transaction():
            notes = self._load()
            old = notes.get(payload.note)
            entry = _NoteRecord(
                ts=payload.ts,
                id=payload.id,
                created=old.created if old else payload.ts,
                text="" if payload.deleted else payload.text,  # a tombstone keeps no text
                deleted=payload.deleted,
            )
            if (old is not None and old.deleted) or not entry.newer_than(old):
                return False  # a deleted note never comes back
            notes[payload.note] = entry
            self._core.store.put(self.RECORD, _enc.encode(notes))
        return True

    def apply(self, s: Sealed, payload: NoteSync) -> None:
        _own_only(self._core, s)
        if not re.fullmatch(r"[0-9a-f]{8}", payload.note):
            raise UntrustedDevice("note sync names no note")
        if self._store(payload):
            self._events.append(NoteChanged(payload.note, payload.deleted))
