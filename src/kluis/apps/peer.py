"""Whether the process behind the daemon's socket is this user's own.

Whoever can answer on a profile's ``daemon.sock`` is handed everything typed for that profile,
in the clear: messages to send, files to upload. The daemon makes its socket 0600 in a folder
it requires to be 0700, but a CLI command or the app that finds a socket there must not take
that on trust (a folder made open later, a socket planted by another user on a shared machine).
So before anything is sent: the socket file must belong to this user, and, where the kernel
says who is at the other end (Linux's ``SO_PEERCRED``), that process must run as this user.
Standard library only: ``kluis.apps.quick`` uses it before loading anything else.
"""

from __future__ import annotations

import os
import socket
import struct

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int | None:
    """The user ID of the process at the other end of Unix socket ``sock`` (None where the
    kernel does not tell)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    except OSError:
        return None
    return int(_UCRED.unpack(raw)[1])


def foreign(sock: socket.socket, path: str) -> str | None:
    """Why the daemon socket ``sock``, connected at ``path``, is not this user's own; None
    when it is."""
    me = os.getuid()
    try:
        owner = os.stat(path).st_uid
    except OSError as exc:
        return f"cannot check who owns {path}: {exc.strerror or exc}"
    if owner != me:
        return f"{path} belongs to another user (uid {owner})"
    uid = peer_uid(sock)
    if uid is not None and uid != me:
        return f"{path} is served by a process of another user (uid {uid})"
    return None
