"""An offline Coinbase: the Exchange WebSocket feed and public REST served from a trade tape.

All connections share one market clock, as on the real exchange: trades "happen" as tape time
passes (``speed`` tape seconds per wall second), and REST only knows trades that have happened. So
a client that disconnects misses real trades and must repair them over REST, exactly as against
Coinbase. ``speed=0`` replays as fast as the subscribers read (the market waits for them).

Fault injection is per connection and seeded: dropped connections, silences, omitted and
duplicated trades and hostile frames from :mod:`appliance.replay.hostile`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from appliance.candles import (
    COINBASE_GRANULARITIES,
    US,
    Trade,
    aggregate,
    format_price,
    format_time,
    parse_time,
)
from appliance.replay import hostile
from appliance.replay.tape import match_frame

log = logging.getLogger(__name__)

MAX_CANDLES = 300
#: Frames a subscriber may fall behind: in real time, before it is dropped as too slow; at full
#: speed, how far the market may run ahead of it (what a dropped connection loses to REST repair).
QUEUE_SIZE_TIMED, QUEUE_SIZE_FULL_SPEED = 4096, 256


@dataclass(frozen=True, slots=True)
class Faults:
    drop_every: int = 0  # close the connection after this many messages
    silence_every: int = 0  # after this many messages, send nothing for ``silence_s``
    silence_s: float = 0.0
    omit_rate: float = 0.0  # fraction of match messages never sent (REST still has them)
    duplicate_rate: float = 0.0  # fraction of match messages sent twice
    malformed_every: int = 0  # a hostile frame after this many messages
    seed: int = 0


@dataclass(slots=True)
class _Product:
    trades: list[Trade]
    ids: list[int]
    times: list[int]
    happened: int = 0  # trades[:happened] have happened
    sequence: int = 0

    @property
    def last(self) -> Trade | None:
        return self.trades[self.happened - 1] if self.happened else None


class _Out(NamedTuple):
    product: str
    trade: Trade | None  # set for match and last_match
    frame: str | bytes
    omittable: bool  # live matches only: a gap fault never hides last_match or a heartbeat
    text: bool | None = None  # None: text for str, binary for bytes (``True`` sends bytes as text)


@dataclass(eq=False)
class _Subscriber:
    ws: ServerConnection
    products: frozenset[str]
    queue: asyncio.Queue[_Out]
    last_seen: dict[str, Trade] = field(default_factory=dict)


class ReplayServer:
    def __init__(
        self,
        trades: Sequence[Trade],
        *,
        speed: float = 0.0,
        start_at_us: int | None = None,
        heartbeat_s: float = 1.0,
        faults: Faults = Faults(),
        rest_rate_limit: float = 10.0,
        rest_burst: float = 15.0,
    ) -> None:
        if not trades:
            raise ValueError("the tape holds no trades")
        self.speed = speed
        self.heartbeat_s = heartbeat_s
        self.faults = faults
        by_product: dict[str, list[Trade]] = {}
        for t in sorted(trades, key=lambda t: (t.product, t.trade_id)):
            by_product.setdefault(t.product, []).append(t)
        self.products = {
            p: _Product(ts, [t.trade_id for t in ts], [t.time_us for t in ts]) for p, ts in by_product.items()
        }
        self.timeline = sorted(trades, key=lambda t: (t.time_us, t.product, t.trade_id))
        self.t0_us = self.timeline[0].time_us if start_at_us is None else start_at_us
        self.position = 0
        self._advance_to(self.t0_us)
        self._subscribers: set[_Subscriber] = set()
        self._has_subscribers = asyncio.Event()
        self._wall0 = time.monotonic()
        self._tokens, self._rate, self._burst, self._token_t = rest_burst, rest_rate_limit, rest_burst, 0.0
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.rest_requests = 0
        self.injected: Counter[str] = Counter()  # faults actually injected, by kind
        self._sent = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._http,
            max_size=1 << 16,
            compression=None,
            ping_interval=None,
        )
        self._wall0 = time.monotonic()
        self._tasks = [asyncio.create_task(self._run_market()), asyncio.create_task(self._run_heartbeats())]
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    @property
    def done(self) -> bool:
        return self.position >= len(self.timeline)

    # -- market -----------------------------------------------------------------------------------

    def _clock_us(self) -> int:
        if self.speed > 0:
            return self.t0_us + int((time.monotonic() - self._wall0) * self.speed * US)
        last = self.timeline[max(0, self.position - 1)].time_us
        return max(self.t0_us, last)

    def _advance_to(self, time_us: int) -> list[Trade]:
        happened = []
        while self.position < len(self.timeline) and self.timeline[self.position].time_us <= time_us:
            t = self.timeline[self.position]
            self.products[t.product].happened += 1
            self.position += 1
            happened.append(t)
        return happened

    async def _run_market(self) -> None:
        while not self.done:
            if self.speed > 0:
                due = self.timeline[self.position].time_us
                wait_s = (due - self._clock_us()) / US / self.speed
                if wait_s > 0:
                    await asyncio.sleep(min(wait_s, 0.5))
                    continue
                batch = self._advance_to(self._clock_us())
            else:
                await self._has_subscribers.wait()
                batch = self._advance_to(self.timeline[self.position].time_us)
            for t in batch:
                p = self.products[t.product]
                p.sequence += 1
                await self._broadcast(
                    _Out(t.product, t, json.dumps(match_frame(t, "match", p.sequence)), True)
                )
        log.info("replay tape finished", extra={"trades": len(self.timeline)})

    async def _run_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = format_time(self._clock_us())
            for name, p in self.products.items():
                last = p.last
                p.sequence += 1
                frame = {
                    "type": "heartbeat",
                    "last_trade_id": last.trade_id if last else 0,
                    "product_id": name,
                    "sequence": p.sequence,
                    "time": now,
                }
                await self._broadcast(_Out(name, None, json.dumps(frame), False))

    async def _broadcast(self, out: _Out) -> None:
        for sub in list(self._subscribers):
            if out.product not in sub.products:
                continue
            if self.speed == 0:
                await sub.queue.put(out)
            else:
                try:
                    sub.queue.put_nowait(out)
                except asyncio.QueueFull:
                    log.warning("replay dropping a slow subscriber")
                    self._unsubscribe(sub)
                    await sub.ws.close(1008, "slow consumer")

    def _unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)
        if not self._subscribers:
            self._has_subscribers.clear()
        # Unblock a market waiting to put into this queue: it is nobody's any more.
        while not sub.queue.empty():
            sub.queue.get_nowait()

    def inject(self, product: str, frame: str | bytes, *, text: bool | None = None) -> int:
        """Queue a raw frame to every subscriber of ``product`` (for tests); returns how many."""
        subs = [s for s in self._subscribers if product in s.products]
        for sub in subs:
            sub.queue.put_nowait(_Out(product, None, frame, False, text))
        return len(subs)

    # -- WebSocket feed ---------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout=5)
            products = self._parse_subscribe(raw)
        except TimeoutError:
            await ws.close(1008, "no subscribe within 5 s")
            return
        except ValueError as exc:
            await ws.send(json.dumps({"type": "error", "message": "Failed to subscribe", "reason": str(exc)}))
            await ws.close(1008, "bad subscribe")
            return
        except ConnectionClosed:
            return
        size = QUEUE_SIZE_TIMED if self.speed > 0 else QUEUE_SIZE_FULL_SPEED
        sub = _Subscriber(ws, frozenset(products), asyncio.Queue(size))
        channels = [
            {"name": n, "product_ids": list(products), "account_ids": None} for n in ("matches", "heartbeat")
        ]
        await ws.send(json.dumps({"type": "subscriptions", "channels": channels}))
        # Register and queue each last_match in one step, so no trade falls between them.
        for name in products:
            last = self.products[name].last
            if last:
                sub.queue.put_nowait(_Out(name, last, json.dumps(match_frame(last, "last_match")), False))
        self._subscribers.add(sub)
        self._has_subscribers.set()
        # The sender waits on the queue, not the socket: watch the socket too, so a client that
        # leaves (or a server that closes) ends the handler at once.
        sender = asyncio.create_task(self._send_loop(sub))
        closed = asyncio.create_task(ws.wait_closed())
        try:
            await asyncio.wait({sender, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._unsubscribe(sub)
            sender.cancel()
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    def _parse_subscribe(self, raw: str | bytes) -> list[str]:
        try:
            msg = json.loads(raw)
        except ValueError:
            raise ValueError("subscribe message is not JSON") from None
        if not isinstance(msg, dict) or msg.get("type") != "subscribe":
            raise ValueError("expected a subscribe message")
        products = msg.get("product_ids") or []
        for ch in msg.get("channels") or []:
            if isinstance(ch, dict):
                products += ch.get("product_ids") or []
        if not products or not all(isinstance(p, str) for p in products):
            raise ValueError("no product_ids")
        unknown = [p for p in products if p not in self.products]
        if unknown:
            raise ValueError(f"{unknown[0]} is not a valid product")
        return list(dict.fromkeys(products))

    async def _send_loop(self, sub: _Subscriber) -> None:
        """Send queued frames, injecting faults; counts are server-wide so reconnects don't reset them."""
        f = self.faults
        rng = random.Random(f"{f.seed}:{self.injected.total()}")
        while True:
            out = await sub.queue.get()
            if out.omittable and f.omit_rate and rng.random() < f.omit_rate:
                self.injected["omitted"] += 1
                continue
            await sub.ws.send(out.frame, text=out.text)
            self._sent += 1
            if out.trade is not None:
                sub.last_seen[out.product] = out.trade
                if f.duplicate_rate and rng.random() < f.duplicate_rate:
                    self.injected["duplicated"] += 1
                    await sub.ws.send(out.frame)
            if f.malformed_every and self._sent % f.malformed_every == 0 and out.product in sub.last_seen:
                frame = hostile.nth(self.injected["hostile"], sub.last_seen[out.product])
                await sub.ws.send(frame.payload, text=frame.text)
                self.injected["hostile"] += 1
            if f.drop_every and self._sent % f.drop_every == 0:
                self.injected["dropped"] += 1
                await sub.ws.close(1011, "replay fault: connection dropped")
                return
            if f.silence_every and self._sent % f.silence_every == 0:
                self.injected["silenced"] += 1
                await asyncio.sleep(f.silence_s)

    # -- REST -------------------------------------------------------------------------------------

    def _http(self, ws: ServerConnection, request: Request) -> Response | None:
        if "upgrade" in request.headers.get("Connection", "").lower():
            return None
        url = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        if parts == ["replay", "status"]:
            return _json(200, self.status())
        self.rest_requests += 1
        if not self._take_token():
            return _json(429, {"message": "Public rate limit exceeded"}, {"Retry-After": "1"})
        if len(parts) == 3 and parts[0] == "products":
            product = self.products.get(parts[1])
            if product is None:
                return _json(404, {"message": "NotFound"})
            try:
                if parts[2] == "trades":
                    return self._trades(product, query)
                if parts[2] == "candles":
                    return self._candles(product, query)
            except ValueError as exc:
                return _json(400, {"message": str(exc)})
        return _json(404, {"message": "NotFound"})

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._token_t) * self._rate)
        self._token_t = now
        if self._rate <= 0:
            return True
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _trades(self, p: _Product, query: dict[str, str]) -> Response:
        limit = _int(query.get("limit", "100"), "limit")
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000")
        ids = p.ids[: p.happened]
        if "after" in query:  # older than the cursor
            hi = bisect.bisect_left(ids, _int(query["after"], "after"))
            page = p.trades[max(0, hi - limit) : hi]
        elif "before" in query:  # newer than the cursor
            lo = bisect.bisect_right(ids, _int(query["before"], "before"))
            page = p.trades[lo : min(lo + limit, p.happened)]
        else:
            page = p.trades[max(0, p.happened - limit) : p.happened]
        page = page[::-1]
        rows = [
            {
                "trade_id": t.trade_id,
                "side": t.side,
                "size": t.size,
                "price": format_price(t.price),
                "time": format_time(t.time_us),
            }
            for t in page
        ]
        headers = {"cb-before": str(page[0].trade_id), "cb-after": str(page[-1].trade_id)} if page else {}
        return _json(200, rows, headers)

    def _candles(self, p: _Product, query: dict[str, str]) -> Response:
        g = _int(query.get("granularity", "60"), "granularity")
        if g not in COINBASE_GRANULARITIES:
            raise ValueError("Unsupported granularity")
        now_s = self._clock_us() // US
        end = parse_time(query["end"]) if "end" in query else now_s
        start = parse_time(query["start"]) if "start" in query else end - (MAX_CANDLES - 1) * g
        if end < start:
            raise ValueError("start must be before end")
        if (end - start) // g + 1 > MAX_CANDLES:
            raise ValueError(
                "granularity too small for the requested time range. "
                "Count of aggregations requested exceeds 300"
            )
        lo = bisect.bisect_left(p.times, (start - start % g) * US, hi=p.happened)
        hi = bisect.bisect_left(p.times, (end - end % g + g) * US, hi=p.happened)
        candles = aggregate(p.trades[lo:hi], g)
        rows = [
            [s, c.low, c.high, c.open, c.close, c.volume]
            for (_, s), c in sorted(candles.items(), reverse=True)
        ]
        return _json(200, rows)

    def status(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "position": self.position,
            "trades": len(self.timeline),
            "clock": format_time(self._clock_us()),
            "subscribers": len(self._subscribers),
            "rest_requests": self.rest_requests,
            "injected": dict(self.injected),
            "products": {
                name: {
                    "happened": p.happened,
                    "total": len(p.trades),
                    "last_trade_id": p.last.trade_id if p.last else None,
                }
                for name, p in self.products.items()
            },
        }


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    h = Headers({"Content-Type": "application/json", **(headers or {})})
    payload = json.dumps(body).encode()
    h["Content-Length"] = str(len(payload))
    return Response(status, HTTPStatus(status).phrase, h, payload)


async def serve_forever(server: ReplayServer, host: str, port: int) -> None:
    bound = await server.start(host, port)
    print(f"replay listening on ws://{host}:{bound} (REST http://{host}:{bound})", flush=True)
    try:
        await asyncio.Future()
    finally:
        with contextlib.suppress(Exception):
            await server.close()
