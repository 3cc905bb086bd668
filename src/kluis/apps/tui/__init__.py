"""``kluis chat``: the full-screen terminal messenger (Textual).

Layout: :mod:`.safe_text` (peer text made harmless), :mod:`.model` (the view-model: conversation
list with nicknames and timers, unread counts, reconnection back-off, passphrase strength; pure),
:mod:`.keys` (the remappable keys and the user's keys.toml), :mod:`.search` (search over the
local history, as command-palette providers), :mod:`.backend` (the adapter that runs a
:class:`~kluis.client.client.KluisClient` on its own thread and event loop), :mod:`.remote`
(the same over a running ``kluis daemon``'s socket), :mod:`.images`
(a peer's image decoded under limits and drawn in half blocks; the only Pillow import),
:mod:`.graphics` (kitty or sixel previews of those decoded pixels; the only textual-image import),
:mod:`.widgets`, :mod:`.screens` (main, onboarding, dialogs, contact: nickname and timer,
files) and :mod:`.app` (one or several profiles).
"""
