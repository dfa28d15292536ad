"""Listening sockets, bound before anything else starts: a second instance stops at once, with one line."""

from __future__ import annotations

import errno
import socket


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket on ``host:port``; OSError with one sentence a person can act on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} is in use: is another demo or appliance running?") from None
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
