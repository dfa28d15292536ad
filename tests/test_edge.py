"""Hostile clients against the real ``python -m appliance up`` (fed by the replay server).

Each attack of issue #10, as an attacker would send it: memory stays bounded (peak RSS growth read
from /proc, never a timing), the attacker gets a 4xx/503 or a closed connection, and /api/predict
answers during and after. One appliance for the module, with a 1,024 open-file limit (a common
default), a 2 s header timeout and a cap of 100 connections, so that each attack takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.api.edge import MAX_CLIENTS, TokenBuckets
from appliance.settings import load_settings
from tests.conftest import Broker, chromium, running_up

HEADER_TIMEOUT_S = 2
MAX_CONNECTIONS = 100
GROWTH_MB = 50  # issue #10: what one attack may cost in RSS
PREDICT = "/api/predict?product=BTC-USD"
TUNNEL = {"cf-connecting-ip": "203.0.113.7", "cf-ray": "8f1e2d3c4b5a6978-AMS"}  # as cloudflared forwards


def test_token_buckets_allow_a_burst_then_the_rate_and_say_how_long_to_wait() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=10, burst=60, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(60)] == [0.0] * 60
    assert buckets.take("a") == pytest.approx(0.1)  # one token comes back every 0.1 s
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.25
    assert [buckets.take("a") == 0.0 for _ in range(3)] == [True, True, False]
    now[0] += 1000
    assert [buckets.take("a") for _ in range(61)][-2:] == [
        0.0,
        pytest.approx(0.1),
    ]  # refills to the burst only


def test_token_buckets_remember_a_bounded_number_of_clients() -> None:
    buckets = TokenBuckets(rate=1, burst=1, clock=lambda: 0.0)
    buckets.take("first")
    for i in range(MAX_CLIENTS):
        buckets.take(str(i))
    assert len(buckets._buckets) == MAX_CLIENTS
    assert "first" not in buckets._buckets  # the least recently seen went first


def test_bad_edge_settings_exit_2_naming_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(http_local_networks="127.0.0.0/8,192.168.1.0/33", ws_max_message_bytes=10)
    assert exc.value.code == 2
    out = capsys.readouterr().out
    assert (
        "CRYPTOPI_HTTP_LOCAL_NETWORKS: Value error, '192.168.1.0/33' is not a network like 192.168.1.0/24"
        in out
    )
    assert "CRYPTOPI_WS_MAX_MESSAGE_BYTES" in out


@dataclass
class Appliance:
    url: str
    proc: subprocess.Popen[bytes]
    data: Path

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def vm_mb(self, key: str) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1)) / 1024  # type: ignore[union-attr]

    @contextlib.contextmanager
    def peak_growth(self) -> Iterator[list[float]]:
        """Yields a list that holds, afterwards, the peak RSS growth in MB over the block."""
        base = self.vm_mb("VmRSS")
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
        growth: list[float] = []
        yield growth
        growth.append(self.vm_mb("VmHWM") - base)

    def answers(self) -> None:
        """/api/predict answers 200 from a fresh local client (generous deadline: not a timing)."""
        response = httpx.get(f"{self.url}{PREDICT}", timeout=20)
        assert response.status_code == 200, response.text
        assert self.proc.poll() is None

    def log(self) -> str:
        return (self.data / "up.log").read_text()

    def tracebacks(self) -> list[str]:
        return [line[-1500:] for line in self.log().splitlines() if "Traceback" in line]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    data = tmp_path_factory.mktemp("edge")
    broker = Broker(data)
    broker.start()
    try:
        with running_up(
            data, broker, wrapper=["prlimit", "--nofile=1024:1024"],
            http_header_timeout_s=str(HEADER_TIMEOUT_S), http_max_connections=str(MAX_CONNECTIONS),
            http_local_networks="127.0.0.1/32",  # 127.0.0.2 ..: LAN clients (rate-limited, no /metrics)
        ) as (url, proc):  # fmt: skip
            yield Appliance(url, proc, data)
    finally:
        broker.stop()


def connect(app: Appliance, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", app.port), timeout=10, source_address=(source, 0))
    return sock


def response_or_close(sock: socket.socket, timeout: float = 10) -> bytes:
    """What the server sent before closing (b'' for a bare close or a reset)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return b"".join(chunks)


def status_of(raw: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    return int(match.group(1)) if match else None


def send_for(sock: socket.socket, blob: bytes, total: int, seconds: float) -> tuple[int, bool]:
    """Send ``blob`` until ``total`` bytes or ``seconds``: (bytes the kernel took, closed by the server)."""
    sock.settimeout(0.2)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(blob)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return sent, True
    return sent, False


def test_pipelined_requests_never_read_are_read_only_as_fast_as_answers_go(edge: Appliance) -> None:
    request = f"GET {PREDICT} HTTP/1.1\r\nHost: pi\r\n\r\n".encode()
    blob = request * (65536 // len(request))
    with edge.peak_growth() as growth:
        sock = connect(edge)
        sent, _ = send_for(sock, blob, 20_000_000, 5)
        edge.answers()  # during
        sock.close()
    edge.answers()  # after
    assert sent < 20_000_000, "the server kept reading a client that never reads its answers"
    assert growth[0] <= GROWTH_MB, f"RSS grew {growth[0]:.0f} MB"


def big_frame(edge: Appliance, payload: bytes) -> tuple[bool, bytes]:
    """Open the stream, send one binary frame of ``payload`` (masked with a zero key): whether the
    appliance cut it short, and all it sent. Raw, so the client's own masking never slows the attack."""
    sock = connect(edge)
    sock.sendall(b"GET /api/stream HTTP/1.1\r\nHost: pi\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    sock.settimeout(30)
    try:
        sock.sendall(b"\x82\xff" + len(payload).to_bytes(8, "big") + b"\0\0\0\0")
        sock.sendall(payload)
        cut_short = False
    except (ConnectionResetError, BrokenPipeError):  # the appliance closed mid-frame
        cut_short = True
    received = response_or_close(sock, timeout=30)
    sock.close()
    return cut_short, received


def test_huge_websocket_frames_are_refused_at_their_header(edge: Appliance) -> None:
    payload = bytes(15 << 20)
    with edge.peak_growth() as growth, ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: big_frame(edge, payload), range(30)))
        edge.answers()
    edge.answers()  # after
    assert all(received.startswith(b"HTTP/1.1 101 ") for _, received in answers)
    # 15 MiB is more than the kernel buffers between the two hold: each frame was cut short, closed
    # by the appliance at its header (its close frame, 1009 "message too big", is often lost to the
    # reset the rest of the frame causes).
    assert all(cut_short for cut_short, _ in answers)
    assert growth[0] <= GROWTH_MB, f"RSS grew {growth[0]:.0f} MB"


def test_huge_and_endless_headers_get_431(edge: Appliance) -> None:
    with edge.peak_growth() as growth:
        socks = [connect(edge) for _ in range(10)]
        head = f"GET {PREDICT} HTTP/1.1\r\nHost: pi\r\nX-Big: ".encode()
        took = []
        for sock in socks:
            sock.sendall(head)
            took.append(send_for(sock, b"a" * 65536, 20_000_000, 2)[0])
        edge.answers()
        answers = [response_or_close(sock) for sock in socks]
    many = connect(edge)
    many.sendall(f"GET {PREDICT} HTTP/1.1\r\nHost: pi\r\n".encode() + b"".join(
        f"X-H{i}: {i}\r\n".encode() for i in range(100)) + b"\r\n")  # fmt: skip
    assert status_of(response_or_close(many)) == 431
    for sock in [*socks, many]:
        sock.close()
    assert all(t < 20_000_000 for t in took)
    # 431, or a reset: the appliance stops reading and closes, and the rest of the flood may reset
    # the connection before the client reads the 431 (as with any server that stops reading).
    assert all(status_of(a) in (431, None) for a in answers), answers
    assert growth[0] <= GROWTH_MB, f"RSS grew {growth[0]:.0f} MB"
    edge.answers()


def test_idle_connections_beyond_the_cap_give_way_and_health_still_answers(edge: Appliance) -> None:
    """1,100 idle connections under a 1,024 open-file limit: the oldest idle ones close, /health answers."""
    socks: list[socket.socket] = []
    with edge.peak_growth() as growth:
        for _ in range(1100):
            socks.append(connect(edge))
        health = httpx.get(f"{edge.url}/health", timeout=20)  # while all 1,100 are open
        edge.answers()
        oldest = response_or_close(socks[0])
    for sock in socks:
        sock.close()
    assert health.status_code == 200
    assert oldest == b""  # closed by the appliance (it had sent nothing: nothing was lost)
    assert 'cryptopi_http_refused_total{reason="idle_evicted"}' in httpx.get(f"{edge.url}/metrics").text
    assert growth[0] <= GROWTH_MB
    edge.answers()


def test_busy_connections_at_the_cap_get_a_clear_503(edge: Appliance) -> None:
    """The cap filled with stream clients (busy, not idle): one more connection is answered 503 at once."""

    async def full() -> bytes:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(MAX_CONNECTIONS):
                ws = await stack.enter_async_context(
                    websockets.connect(f"ws://127.0.0.1:{edge.port}/api/stream")
                )
                await asyncio.wait_for(ws.recv(), 20)
            return await asyncio.to_thread(lambda: response_or_close(connect(edge)))

    refused = asyncio.run(full())
    assert status_of(refused) == 503, refused[:300]
    assert f"limit of {MAX_CONNECTIONS} connections".encode() in refused
    edge.answers()  # after


def test_slowloris_connections_are_closed_at_the_header_timeout(edge: Appliance) -> None:
    socks = [connect(edge) for _ in range(200)]
    for sock in socks:
        sock.sendall(f"GET {PREDICT} HTTP/1.1\r\n".encode())
    closed: set[int] = set()
    deadline = time.monotonic() + HEADER_TIMEOUT_S * 10
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for i, sock in enumerate(socks):  # one header byte each, as slowloris does
            if i not in closed:
                try:
                    sock.send(b"X")
                except OSError:
                    closed.add(i)
        edge.answers()
        time.sleep(0.3)
    for sock in socks:
        sock.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow heads still open"
    assert 'cryptopi_http_refused_total{reason="header_timeout"}' in httpx.get(f"{edge.url}/metrics").text


def test_tunnel_clients_are_rate_limited_with_429_and_retry_after(edge: Appliance) -> None:
    with httpx.Client(base_url=edge.url, timeout=20) as client:
        statuses = [client.get(PREDICT, headers=TUNNEL).status_code for _ in range(100)]
        limited = client.get(PREDICT, headers=TUNNEL)
        other = client.get(PREDICT, headers=TUNNEL | {"cf-connecting-ip": "198.51.100.9"})
        local = [client.get(PREDICT).status_code for _ in range(300)]
    assert statuses[:60] == [200] * 60  # a burst of 60, then 10 a second
    assert 429 in statuses
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "203.0.113.7" in limited.json()["detail"]
    assert other.status_code == 200  # another visitor, through the same cloudflared
    assert set(local) == {200}  # the Pi itself (the bench, the health check) is never limited


def test_a_lan_client_is_limited_by_its_address_whatever_cf_header_it_claims(edge: Appliance) -> None:
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=edge.url, transport=transport, timeout=20) as lan:
        statuses = [lan.get(PREDICT).status_code for _ in range(80)]
        assert 429 in statuses
        # From a peer other than loopback the header would be ignored; 127.0.0.2 is loopback, so
        # here it is trusted as cloudflared's: a fresh visitor.
        assert lan.get(PREDICT, headers=TUNNEL | {"cf-connecting-ip": "192.0.2.1"}).status_code == 200
        assert lan.get("/metrics").status_code == 403  # not a local client


def test_the_dashboard_through_the_tunnel_is_never_throttled(edge: Appliance) -> None:
    """A page load (page, styles, scripts), its WebSocket and a minute of its polls."""
    visitor = TUNNEL | {"cf-connecting-ip": "198.51.100.77"}
    page = ["/", "/static/dashboard.css", "/static/dashboard.js", "/static/vendor/uPlot.iife.min.js",
            "/static/vendor/uPlot.min.css"]  # fmt: skip
    polls = ["/health", "/api/accuracy/BTC-USD", "/api/accuracy/ETH-USD"] * 12  # every 5 s for a minute
    with httpx.Client(base_url=edge.url, headers=visitor, timeout=20) as client:
        statuses = [client.get(path).status_code for path in page + polls]

    async def stream() -> str:
        async with websockets.connect(f"ws://127.0.0.1:{edge.port}/api/stream",
                                      additional_headers=visitor) as ws:  # fmt: skip
            return str(await asyncio.wait_for(ws.recv(), 20))

    assert set(statuses) == {200}
    assert '"snapshot"' in asyncio.run(stream())


def test_one_visitor_holds_at_most_8_streams(edge: Appliance) -> None:
    """Behind the tunnel every connection is cloudflared's: one visitor must not fill the connection cap."""
    visitor = TUNNEL | {"cf-connecting-ip": "198.51.100.80"}
    url = f"ws://127.0.0.1:{edge.port}/api/stream"

    async def snapshot(ws: websockets.ClientConnection) -> str:
        return str(await asyncio.wait_for(ws.recv(), 20))

    async def streams() -> tuple[int, str]:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(8):
                await snapshot(
                    await stack.enter_async_context(websockets.connect(url, additional_headers=visitor))
                )
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(url, additional_headers=visitor)
            other = TUNNEL | {"cf-connecting-ip": "198.51.100.81"}
            async with websockets.connect(url, additional_headers=other) as ws:
                return refused.value.response.status_code, await snapshot(ws)

    async def again() -> str:  # the eight closed: the visitor may stream again
        async with websockets.connect(url, additional_headers=visitor) as ws:
            return await snapshot(ws)

    status, other_snapshot = asyncio.run(streams())
    assert status == 403
    assert '"snapshot"' in other_snapshot  # another visitor still gets the stream
    assert '"snapshot"' in asyncio.run(again())


@pytest.mark.parametrize(
    "path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"]
)
def test_metrics_and_docs_answer_local_clients_only(edge: Appliance, path: str) -> None:
    tunneled = httpx.get(f"{edge.url}{path}", headers=TUNNEL, timeout=20)
    assert tunneled.status_code == 403
    assert tunneled.json() == {"detail": f"{path} is served to clients on the appliance's own network only"}
    assert httpx.get(f"{edge.url}{path}", headers={"cf-ray": "8f1e2d3c4b5a6978-AMS"}).status_code == 403
    assert httpx.get(f"{edge.url}{path}", timeout=20).status_code == 200  # on the Pi itself


def test_public_surface_through_the_tunnel(edge: Appliance) -> None:
    visitor = TUNNEL | {"cf-connecting-ip": "198.51.100.78"}
    for path in ["/", PREDICT, "/api/predictions/BTC-USD", "/api/candles/BTC-USD", "/health"]:
        assert httpx.get(f"{edge.url}{path}", headers=visitor, timeout=20).status_code == 200, path


@pytest.mark.parametrize(
    "at", ["9223372036854775808", "99999999999999999999", "-1", "1" * 5000, "٣", "10000-01-01"]
)
def test_out_of_range_times_are_422_not_500(edge: Appliance, at: str) -> None:
    response = httpx.get(f"{edge.url}/api/predict", params={"product": "BTC-USD", "at": at}, timeout=20)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("at: ")
    assert edge.tracebacks() == []  # nor did any attack before


def test_what_held_up_still_holds(edge: Appliance) -> None:
    """Path traversal on the static files, request smuggling (CL + TE) and 6,500 query parameters."""
    for path in ["/static/../settings.py", "/static/%2e%2e/%2e%2e/settings.py", "/static/..%2fapp.py",
                 "/static/%252e%252e/app.py", "/static/....//app.py",
                 "/static/%c0%ae%c0%ae/app.py"]:  # fmt: skip
        sock = connect(edge)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: pi\r\nConnection: close\r\n\r\n".encode())
        raw = response_or_close(sock)
        sock.close()
        assert status_of(raw) in (400, 404), (path, raw[:200])
        assert b"create_app" not in raw
        assert b"BaseSettings" not in raw
    sock = connect(edge)
    sock.sendall(b"POST /livez HTTP/1.1\r\nHost: pi\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: pi\r\n\r\n")  # fmt: skip
    assert status_of(response_or_close(sock)) == 400
    sock.close()
    query = "&".join(f"p{i}={i}" for i in range(6500))  # 70 KB of request line: over the 16 KiB limit
    sock = connect(edge)
    sock.sendall(f"GET {PREDICT}&{query} HTTP/1.1\r\nHost: pi\r\n\r\n".encode())
    raw = response_or_close(sock)
    sock.close()
    assert status_of(raw) == 431
    assert b"request line and headers over 16384 bytes" in raw
    assert httpx.get(f"{edge.url}{PREDICT}&{query[:12_000]}", timeout=20).status_code == 200


def is_error_shape(response: httpx.Response) -> bool:
    body = response.json()
    return list(body) == ["detail"] and isinstance(body["detail"], str) and len(body["detail"]) < 300


@pytest.mark.parametrize(
    ("path", "params", "status", "starts"),
    [
        ("/api/predictions/btc-usd", {}, 422, "product: 'btc-usd' is not a Coinbase product id like BTC-USD"),
        ("/api/accuracy/BTC-USD", {"window": "abc"}, 422, "window: "),
        ("/api/accuracy/BTC-USD", {"window": "0"}, 422, "window: "),
        ("/api/accuracy/BTC-USD", {"model": "CNN!"}, 422, "model: 'CNN!' is not a model name"),
        ("/api/candles/BTC-USD", {"granularity": "300"}, 422, "granularity: 60 or 900 or 3600"),
        ("/api/predict", {"product": "BTC-USD", "granularity": "300"}, 422, "granularity: 3600 or 900"),
        ("/api/predictions/BTC-USD", {"granularity": "60"}, 422, "granularity: 3600 or 900"),
        ("/api/accuracy/BTC-USD", {"granularity": "86400"}, 422, "granularity: 3600 or 900"),
        ("/api/candles/BTC-USD", {"start": "2026-04-21", "end": "2026-04-20"}, 422, "start: "),
        ("/api/candles/BTC-USD", {"end": "99999999999999999999"}, 422, "end: "),
        (
            "/api/predict",
            {"product": "BTC-USD", "at": "2030-01-01"},
            404,
            "at: no BTC-USD cnn prediction in force",
        ),
        ("/api/predict", {"product": "BTC-USD", "level": "nan"}, 422, "level: 0.8 or 0.95"),
        ("/api/predict", {}, 422, "product: required"),
        ("/api/nothing", {}, 404, "Not Found"),
    ],
)
def test_one_error_shape_everywhere(edge: Appliance, path: str, params: dict[str, str], status: int,
                                    starts: str) -> None:  # fmt: skip
    response = httpx.get(f"{edge.url}{path}", params=params, timeout=20)
    assert response.status_code == status, response.text
    assert is_error_shape(response), response.text
    assert response.json()["detail"].startswith(starts), response.text


def edges(bits: int) -> st.SearchStrategy[str]:
    """Integers at the edges of a ``bits``-bit type (and beyond), as a client would type them."""
    limits = [0, 1, -1, 2**bits - 1, 2**bits, 2 ** (bits - 1), -(2 ** (bits - 1)) - 1]
    return st.sampled_from(limits).flatmap(lambda n: st.integers(n - 2, n + 2)).map(str)


NUMBERS = st.one_of(
    edges(8), edges(16), edges(32), edges(53), edges(64), edges(128),
    st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "٣", "²", " 1", "1 ", "",
                     "1" * 5000, "253402300799", "253402300800", "9999-12-31T23:59:59Z", "0001-01-01"]),
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from([
        ("/api/predict", ("at", "level")),
        ("/api/candles/BTC-USD", ("start", "end", "granularity")),
        ("/api/accuracy/BTC-USD", ("window",)),
    ]),
    data=st.data(),
)  # fmt: skip
def test_numeric_edges_of_every_parameter_get_a_4xx_or_an_answer(
    edge: Appliance, route: tuple[str, tuple[str, ...]], data: st.DataObject
) -> None:
    path, names = route
    params = {
        name: data.draw(NUMBERS, label=name)
        for name in data.draw(st.sets(st.sampled_from(names), min_size=1))
    }
    if path == "/api/predict":
        params["product"] = "BTC-USD"
    response = httpx.get(f"{edge.url}{path}", params=params, timeout=20)
    assert response.status_code < 500, (params, response.text)
    if response.status_code >= 400:
        assert is_error_shape(response), (params, response.text)


def test_docs_are_served_by_the_appliance_with_the_internet_blocked(edge: Appliance, tmp_path: Path) -> None:
    """Real Chromium with every non-loopback request blocked: /docs lists the operations, /redoc renders."""
    from playwright.sync_api import Route, sync_playwright

    blocked: list[str] = []

    def loopback_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = chromium(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.route("**/*", loopback_only)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{edge.url}/docs")
        page.locator(".opblock").first.wait_for(timeout=20_000)
        operations = page.locator(".opblock-summary-path").all_inner_texts()
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        docs_blocked = list(blocked)
        page.goto(f"{edge.url}/redoc")
        page.get_by_text("Next-candle BTC-USD / ETH-USD predictions").first.wait_for(timeout=20_000)
        browser.close()
    assert {"/api/predict", "/api/predictions/{product}", "/api/candles/{product}", "/api/accuracy/{product}",
            "/health"} <= {op.replace("\u200b", "") for op in operations}, operations  # fmt: skip
    assert errors == []
    assert docs_blocked == [], docs_blocked  # /docs asked for nothing outside the appliance
    # ReDoc's bundle links its "API docs by Redocly" badge from its CDN: decorative, and blocked here.
    assert set(blocked) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, blocked
    assert (tmp_path / "docs.png").stat().st_size > 10_000


def test_sigterm_under_attack_stops_cleanly(edge: Appliance) -> None:
    """Last in the module: slow heads, idle sockets and stream clients open while SIGTERM arrives."""

    async def clients() -> int:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(30):
                ws = await stack.enter_async_context(
                    websockets.connect(f"ws://127.0.0.1:{edge.port}/api/stream")
                )
                await asyncio.wait_for(ws.recv(), 20)
            socks = [connect(edge) for _ in range(100)]
            for sock in socks[:50]:
                sock.sendall(b"GET /api/predict HTTP/1.1\r\n")
            edge.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(edge.proc.wait, 30)
            for sock in socks:
                sock.close()
            return code

    assert asyncio.run(clients()) == 0
    assert "appliance stopped" in edge.log()
