"""``python -m tests.bench.granian_up``: the appliance with Granian as its HTTP server, for make bench.

Everything but the server is the appliance's own (``runtime.up`` on uvloop, the same app and edge
middleware); Granian's embedded server runs the app on that event loop, its HTTP/1 in a Rust thread.
The appliance itself runs uvicorn: Granian has no WebSocket message cap, no connection cap and no
idle timeout (README, "HTTP server"), so it is only measured here.
"""

from __future__ import annotations

from granian.constants import HTTPModes, Interfaces
from granian.server.embed import Server
from starlette.types import ASGIApp

import appliance.runtime
from appliance.__main__ import main
from appliance.settings import Settings


class GranianServer:
    """What ``runtime.up`` needs of a server: ``serve()``, and ``should_exit`` to stop it."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self._server = Server(
            app, address=settings.http_host, port=settings.http_port, interface=Interfaces.ASGINL,
            http=HTTPModes.http1, websockets=True, backlog=2048, runtime_threads=1, log_enabled=False,
        )  # fmt: skip
        self._exit = False

    async def serve(self) -> None:
        await self._server.serve()

    @property
    def should_exit(self) -> bool:
        return self._exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value and not self._exit:
            self._exit = True
            self._server.stop()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    appliance.runtime.http_server = GranianServer  # type: ignore[attr-defined,assignment]
    raise SystemExit(main(["up"]))
