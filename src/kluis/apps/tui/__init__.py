"""``kluis chat``: the full-screen terminal messenger (Textual).

Layout: :mod:`.safe_text` (peer text made harmless), :mod:`.model` (the view-model: conversation
list, unread counts, reconnection back-off, passphrase strength; pure), :mod:`.backend` (the
adapter that runs a :class:`~kluis.client.client.KluisClient` on its own thread and event loop),
:mod:`.widgets`, :mod:`.screens` and :mod:`.app`.
"""
