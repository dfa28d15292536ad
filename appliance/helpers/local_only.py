"""Routes that answer local clients only, even though the Cloudflare tunnel also connects from 127.0.0.1.

cloudflared runs on the Pi, so what it forwards arrives from a loopback address like any local client:
the peer address says nothing. What it forwards does carry the headers Cloudflare's edge adds to every
request (``Cf-Connecting-Ip``, ``Cf-Ray``, ``Cdn-Loop``, …, and ``X-Forwarded-For``); a local client
sends none. The rule, for the webhook and the appliance alike:

1. local-only routes live on a listener the tunnel is never pointed at (a separate loopback port) where
   that is possible, and
2. every local-only route refuses a request carrying any of those headers, as if it did not exist (404).

(2) can be defeated only by someone who can already send requests from the machine itself; it is what
still holds if the tunnel is pointed at the wrong port.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Headers that say a request came through a proxy, beside Cloudflare's own ``Cf-*`` ones.
PROXY_HEADERS = frozenset({b"cdn-loop", b"x-forwarded-for", b"forwarded"})


def proxy_header(name: bytes) -> bool:
    """Whether a header (an ASGI name, lower case) is one only a proxy (the tunnel) adds."""
    return name[:3] == b"cf-" or name in PROXY_HEADERS


def through_tunnel(scope: Scope) -> bool:
    """Whether an ASGI request carries a header only a proxy (the tunnel) adds."""
    return any(proxy_header(name) for name, _ in scope.get("headers", ()))


class LocalOnly:
    """ASGI middleware: what came through the tunnel gets a 404 on ``paths`` (prefixes; None: all)."""

    def __init__(self, app: ASGIApp, paths: Sequence[str] | None = None,
                 on_refused: Callable[[str], None] = lambda path: None) -> None:  # fmt: skip
        self.app = app
        self.paths = tuple(paths) if paths is not None else None
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and through_tunnel(scope):
            path: str = scope.get("path", "")
            if self.paths is None or path.startswith(self.paths):
                self.on_refused(path)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)
