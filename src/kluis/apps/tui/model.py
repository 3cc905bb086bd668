"""The view-model between :class:`~kluis.client.client.KluisClient` and the widgets (pure).

Theory of operation: the conversation list is computed from what the client already keeps,
the stored history and the groups, so it needs no new client API; unread counts are what
arrived, from others, in a conversation that was not open, since the app started. Features
that add their own data extend :class:`Conversation` and :meth:`ConversationBook.title`:
nicknames (the user's own address book, synced between their devices) replace a peer's ID as
its title and as the sender of its messages; each row carries its disappearing-message timer
and, for a peer, its verification mark. Operator announcements live in the conversation
:data:`OPERATOR`, which the widgets draw as notices, never as a person.

Also here, because they are rules rather than screens: the reconnection back-off with jitter
and the passphrase strength heuristic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from kluis.client import backoff as _backoff
from kluis.client.groups import GroupState, is_group_id
from kluis.client.operator import OPERATOR
from kluis.client.records import Message
from kluis.identity.chain import ACCOUNT_ID_CHARS

_ACCOUNT_ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")
UNREADABLE = "!unreadable"  # the pseudo-conversation of placeholders for unreadable envelopes
OPERATOR_TITLE = "Operator notices"
SPECIAL = (UNREADABLE, OPERATOR)  # conversations with no person behind them: not verified


def is_person(conversation: str) -> bool:
    """A 1:1 conversation with another account (not a group, not a pseudo-conversation)."""
    return not is_group_id(conversation) and conversation not in SPECIAL


def short_timer(seconds: int) -> str:
    """A disappearing-message timer in a few columns: ``30s``, ``5m``, ``2h``, ``3d``, ``4w``."""
    if seconds <= 0:
        return ""
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def is_account_id(text: str) -> bool:
    return len(text) == ACCOUNT_ID_CHARS and set(text) <= _ACCOUNT_ALPHABET


def parse_ids(text: str) -> list[str]:
    """Account IDs separated by spaces or commas; ValueError names the first bad one."""
    ids = [part for part in text.replace(",", " ").split() if part]
    for part in ids:
        if not is_account_id(part.lower()):
            raise ValueError(f"not an account ID: {part!r}")
    return list(dict.fromkeys(p.lower() for p in ids))


@dataclass(frozen=True, slots=True)
class Conversation:
    """One row of the conversation list."""

    id: str
    title: str  # peer-supplied for groups: render with safe_text
    is_group: bool
    preview: str = ""  # the last message, peer-supplied
    last: datetime | None = None
    unread: int = 0
    members: tuple[str, ...] = ()
    verification: str = ""  # "verified" | "broken" | "" (not verified), for a peer
    timer: int = 0  # the disappearing-message timer in seconds (0: off)


@dataclass(frozen=True, slots=True)
class ProfileTab:
    """One open profile (account), as the sidebar's heading shows it when several are open."""

    name: str  # the profile folder's name (the user's choice)
    unread: int
    current: bool
    locked: bool


@dataclass(frozen=True, slots=True)
class KeyWarning:
    """A send refused because a contact's keys changed: shown until the user acknowledges it."""

    conversation: str
    account: str  # the contact whose keys changed (a member, for a group)
    kind: str  # "broken" (a verified contact's keys changed) | "untrusted" (uncertified device)
    detail: str  # what changed, as the client said it


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user must see that is not a message: an unreadable envelope, an alarm."""

    time: datetime
    kind: str  # "unreadable" | "alarm" | "operator" (expiry, announcements) | "info"
    text: str
    conversation: str = ""  # the chat it belongs to, drawn there with its messages ("": none)


@dataclass
class ConversationBook:
    """Conversations as the list shows them, kept current as messages arrive."""

    me: str
    _rows: dict[str, Conversation] = field(default_factory=dict)
    open_id: str | None = None
    notices: list[Notice] = field(default_factory=list)
    nicknames: dict[str, str] = field(default_factory=dict)

    def load(
        self,
        history: Iterable[Message],
        groups: Iterable[GroupState],
        nicknames: dict[str, str] | None = None,
        timers: dict[str, int] | None = None,
    ) -> None:
        self.nicknames.update(nicknames or {})
        for group in groups:
            self.update_group(group)
        for message in history:
            self._note(message, count=False)
        for conversation, seconds in (timers or {}).items():
            self.set_timer(conversation, seconds)

    # ---- nicknames ------------------------------------------------------------------------------

    def set_nickname(self, account: str, name: str) -> None:
        """``account`` is now called ``name`` ("": by its ID again)."""
        if name:
            self.nicknames[account] = name
        else:
            self.nicknames.pop(account, None)
        row = self._rows.get(account)
        if row is not None and is_person(account):
            self._rows[account] = replace(row, title=name or account)

    def name(self, account: str) -> str:
        """How a message's sender is shown: "you", the nickname, or the start of the ID."""
        if account == self.me:
            return "you"
        if account == OPERATOR:
            return "operator"
        return self.nicknames.get(account) or account[:8]

    # ---- timers ---------------------------------------------------------------------------------

    def set_timer(self, conversation: str, seconds: int) -> bool:
        """Record ``conversation``'s disappearing-message timer; True if it changed."""
        row = self.ensure(conversation)
        if row.timer == seconds:
            return False
        self._rows[conversation] = replace(row, timer=seconds)
        return True

    def update_group(self, group: GroupState) -> None:
        row = self._rows.get(group.id) or Conversation(group.id, group.name, True)
        self._rows[group.id] = replace(row, title=group.name, members=tuple(group.members))

    def ensure(self, conversation: str) -> Conversation:
        """The row of ``conversation``, made empty if new (a new chat by ID)."""
        if conversation not in self._rows:
            self._rows[conversation] = Conversation(
                conversation, self.title(conversation), is_group_id(conversation)
            )
        return self._rows[conversation]

    def title(self, conversation: str) -> str:
        row = self._rows.get(conversation)
        if row is not None:
            return row.title
        if conversation == OPERATOR:
            return OPERATOR_TITLE
        if is_group_id(conversation):
            return "(group)"
        return self.nicknames.get(conversation) or conversation

    def add(self, message: Message, *, seen: bool = True) -> None:
        """A message sent or received while the app runs; ``seen``: the profile is shown, so
        a message of its open conversation is read (else it counts as unread there too)."""
        self._note(message, count=True, seen=seen)

    def _note(self, message: Message, *, count: bool, seen: bool = True) -> None:
        row = self.ensure(message.conversation)
        unread = row.unread
        hidden = message.conversation != self.open_id or not seen
        if count and message.sender != self.me and hidden:
            unread += 1
        if row.last is None or message.time >= row.last:
            preview = message.text or ("[file]" if message.attachment else "")
            row = replace(row, preview=preview, last=message.time)
        self._rows[message.conversation] = replace(row, unread=unread)

    def open(self, conversation: str) -> None:
        self.ensure(conversation)
        self.open_id = conversation
        self._rows[conversation] = replace(self._rows[conversation], unread=0)

    def notice(self, notice: Notice) -> None:
        self.notices.append(notice)
        if notice.kind == "unreadable":
            seen = self._rows.get(UNREADABLE)
            unread = 0 if self.open_id == UNREADABLE else (seen.unread if seen else 0) + 1
            self._rows[UNREADABLE] = Conversation(
                UNREADABLE,
                "Unreadable messages",
                False,
                preview=notice.text,
                last=notice.time,
                unread=unread,
            )

    def set_verification(self, conversation: str, verification: str) -> bool:
        """Record a peer's verification state; True if it changed."""
        row = self._rows.get(conversation)
        if row is None or row.is_group or row.verification == verification:
            return False
        self._rows[conversation] = replace(row, verification=verification)
        return True

    def unread(self) -> int:
        """Unread messages over all conversations."""
        return sum(row.unread for row in self._rows.values())

    def get(self, conversation: str) -> Conversation | None:
        return self._rows.get(conversation)

    def rows(self) -> list[Conversation]:
        """Most recent first; conversations without messages last, by title."""
        return sorted(
            self._rows.values(),
            key=lambda c: (c.last is None, -(c.last.timestamp() if c.last else 0), c.title),
        )


def human_size(size: int) -> str:
    """``999 B``, ``1.5 KiB``, ``12.0 MiB``, ``3.2 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---- reconnection -------------------------------------------------------------------------------

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


def backoff(
    attempt: int,
    random: Callable[[], float],
    *,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_CAP_S,
) -> float:
    """Seconds to wait before reconnection ``attempt`` (0 first): exponential, capped, with
    "equal jitter" (half fixed, half random) so that clients a restart cut off at once do not
    all come back in the same instant. The one formula of ``client/backoff.py``: the app
    keeps equal jitter so that its status line never says "reconnecting in 0.0s"."""
    return _backoff.delay(attempt, random, base, cap, "equal")


# ---- passphrases --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Strength:
    bits: int
    label: str  # "empty" | "weak" | "fair" | "strong"
    hint: str

    @property
    def acceptable(self) -> bool:
        return self.label != "empty"


def strength(passphrase: str) -> Strength:
    """A simple estimate: length times the log of the character classes used."""
    if not passphrase:
        return Strength(0, "empty", "a passphrase is required")
    pool = 0
    if any(c.islower() for c in passphrase):
        pool += 26
    if any(c.isupper() for c in passphrase):
        pool += 26
    if any(c.isdigit() for c in passphrase):
        pool += 10
    if any(not c.isalnum() for c in passphrase):
        pool += 33
    distinct = len(set(passphrase))
    bits = int(min(len(passphrase), distinct * 2) * math.log2(max(pool, 2)))
    if bits < 40:
        return Strength(bits, "weak", "weak: use a longer passphrase, several words")
    if bits < 70:
        return Strength(bits, "fair", "fair: a few more words make it strong")
    return Strength(bits, "strong", "strong")
