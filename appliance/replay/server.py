"""An offline Coinbase: the Exchange WebSocket feed and public REST served from a trade tape.

All connections share one market clock, as on the real exchange: trades "happen" as tape time
passes (``speed`` tape seconds per wall second), and REST only knows trades that have happened. So
a client that disconnects misses real trades and must repair them over REST, exactly as against
Coinbase. ``speed=0`` replays as fast as the subscribers read (the market waits for them).

It imitates what the real exchange does beyond the happy path, each behaviour a fault option
(random ones seeded by ``Faults.seed``):

* the feed: dropped connections, silences, omitted and duplicated trades, hostile frames from
  :mod:`appliance.replay.hostile`; a subscribe naming a product it does not serve answered with
  Coinbase's ``error`` ("Failed to subscribe") and the whole subscribe ignored, the socket then
  kept open or closed (``subscribe_error``: which one Coinbase does is not documented); a
  subscriber whose socket stays backed up disconnected with ``ErrSlowConsume`` (documented);
  permessage-deflate when asked (documented as supported);
* ``GET /products`` (and ``/products/{id}``) with each product's status; extra listed products
  (``listed``: e.g. a delisted one); halts (``halts``): no trades for a while, heartbeats going on,
  the product listed as ``trading_disabled`` and ``cancel_only`` meanwhile;
* REST that is not perfect: a trade reaches REST ``rest_lag_s`` after the feed; 5xx answers and
  Cloudflare HTML error pages; answers that stall past a client's timeout; HTTP 429 over the
  documented public rate (10/s, bursts of 15).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, NamedTuple
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
from appliance.replay.tape import Halt, apply_halts, match_frame

log = logging.getLogger(__name__)

MAX_CANDLES = 300
#: Frames a subscriber may fall behind: in real time, before it is dropped as too slow; at full
#: speed, how far the market may run ahead of it (what a dropped connection loses to REST repair).
QUEUE_SIZE_TIMED, QUEUE_SIZE_FULL_SPEED = 4096, 256
#: What Cloudflare in front of Coinbase answers when the origin fails (the shape; text abridged).
CLOUDFLARE_PAGE = (
    "<!DOCTYPE html><html><head><title>api.exchange.coinbase.com | 520: Web server is returning an "
    "unknown error</title></head><body><h1>Web server is returning an unknown error</h1>"
    "<p>Error code 520</p><p>Cloudflare Ray ID: 8a1b2c3d4e5f6a7b</p></body></html>"
)


@dataclass(frozen=True, slots=True)
class Faults:
    drop_every: int = 0  # close the connection after this many messages
    silence_every: int = 0  # after this many messages, send nothing for ``silence_s``
    silence_s: float = 0.0
    omit_rate: float = 0.0  # fraction of match messages never sent (REST still has them)
    duplicate_rate: float = 0.0  # fraction of match messages sent twice
    malformed_every: int = 0  # a hostile frame after this many messages
    seed: int = 0
    #: After refusing a subscribe that names a product it does not serve: keep the socket or close it.
    subscribe_error: Literal["keep_open", "close"] = "keep_open"
    refusal_names_product: bool = True  # False: the reason names none (" is not a valid product", seen)
    rest_lag_s: float = 0.0  # REST learns of a trade this many wall seconds after the feed sent it
    rest_error_rate: float = 0.0  # REST answers: a 503, or a Cloudflare 520 HTML page (in turn)
    rest_stall_rate: float = 0.0  # REST answers only after ``rest_stall_s`` (past a client's timeout)
    rest_stall_s: float = 5.0
    slow_consumer_s: float = 0.0  # a socket backed up this long is dropped (ErrSlowConsume); 0: never
    deflate: bool = False  # negotiate permessage-deflate with clients that offer it


@dataclass(slots=True)
class _Product:
    trades: list[Trade]
    ids: list[int]
    times: list[int]
    happened: int = 0  # trades[:happened] have happened
    sequence: int = 0
    happened_at: list[float] = field(default_factory=list)  # monotonic time each trade happened

    @property
    def last(self) -> Trade | None:
        return self.trades[self.happened - 1] if self.happened else None

    def known_to_rest(self, lag_s: float) -> int:
        """How many of its trades REST knows: those that happened at least ``lag_s`` ago."""
        if not lag_s:
            return self.happened
        return bisect.bisect_right(self.happened_at, time.monotonic() - lag_s)


class _Out(NamedTuple):
    product: str
    trade: Trade | None  # set for match and last_match
    frame: str | bytes
    omittable: bool  # live matches only: a gap fault never hides last_match or a heartbeat
    text: bool | None = None  # None: text for str, binary for bytes (``True`` sends bytes as text)


class _Outbox:
    """A subscriber's frames in order. Bounded for the market (which waits or drops the subscriber);
    replies to the client's own messages always fit, so they keep their place in the stream."""

    def __init__(self, size: int) -> None:
        self.items: deque[_Out] = deque()
        self.size = size
        self._ready, self._room = asyncio.Event(), asyncio.Event()
        self._room.set()

    def full(self) -> bool:
        return len(self.items) >= self.size

    def push(self, out: _Out) -> None:
        self.items.append(out)
        self._ready.set()
        if self.full():
            self._room.clear()

    async def wait_room(self) -> None:
        while self.full():
            await self._room.wait()

    async def pop(self) -> _Out:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        out = self.items.popleft()
        if not self.full():
            self._room.set()
        return out

    def clear(self) -> None:
        self.items.clear()
        self._room.set()  # unblock a market waiting to put here: it is nobody's any more


@dataclass(eq=False)
class _Subscriber:
    ws: ServerConnection
    outbox: _Outbox
    products: set[str] = field(default_factory=set)
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
        listed: Mapping[str, str] | None = None,
        halts: Sequence[Halt] = (),
    ) -> None:
        if not trades:
            raise ValueError("the tape holds no trades")
        self.speed = speed
        self.heartbeat_s = heartbeat_s
        self.faults = faults
        self.halts = tuple(halts)
        trades = apply_halts(trades, self.halts)
        by_product: dict[str, list[Trade]] = {}
        for t in trades:  # apply_halts returns them by product and trade id
            by_product.setdefault(t.product, []).append(t)
        self.products = {
            p: _Product(ts, [t.trade_id for t in ts], [t.time_us for t in ts]) for p, ts in by_product.items()
        }
        #: Products GET /products lists beside the tape's (all online): their status, e.g. delisted.
        self.listed = dict(listed or {})
        self.timeline = sorted(trades, key=lambda t: (t.time_us, t.product, t.trade_id))
        self.t0_us = self.timeline[0].time_us if start_at_us is None else start_at_us
        self.position = 0
        self._advance_to(self.t0_us, at=float("-inf"))  # history before the start: REST knows it all
        self._subscribers: set[_Subscriber] = set()
        self._has_subscribers = asyncio.Event()
        self._wall0 = time.monotonic()
        self._tokens, self._rate, self._burst, self._token_t = rest_burst, rest_rate_limit, rest_burst, 0.0
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.rest_requests = 0
        self.rest_by_path: Counter[str] = Counter()  # "ETH-USD/trades", "products", ...
        self.injected: Counter[str] = Counter()  # faults actually injected, by kind
        self.deflated = 0  # connections that negotiated permessage-deflate
        self.requests: Counter[str] = Counter()  # the clients' subscribe / unsubscribe messages
        self._rest_rng = random.Random(f"{faults.seed}:rest")
        self._sent = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._http,
            max_size=1 << 16,
            compression="deflate" if self.faults.deflate else None,
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

    def _advance_to(self, time_us: int, at: float | None = None) -> list[Trade]:
        happened = []
        now = time.monotonic() if at is None else at
        while self.position < len(self.timeline) and self.timeline[self.position].time_us <= time_us:
            t = self.timeline[self.position]
            p = self.products[t.product]
            p.happened += 1
            p.happened_at.append(now)
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
            # Never later than a trade not yet sent: a heartbeat's time says all before it happened
            # (at high speed the clock can run ahead of the market task between its steps).
            due = self.timeline[self.position].time_us - 1 if not self.done else self._clock_us()
            now = format_time(min(self._clock_us(), due))
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
                await sub.outbox.wait_room()
            elif sub.outbox.full():
                await self._drop_slow(sub)
                continue
            sub.outbox.push(out)

    def _unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)
        if not self._subscribers:
            self._has_subscribers.clear()
        sub.outbox.clear()

    async def _drop_slow(self, sub: _Subscriber) -> None:
        """Coinbase's answer to a client that reads too slowly: an error, then the connection closed."""
        if sub not in self._subscribers:
            return
        self.injected["slow_consumer"] += 1
        log.warning("replay dropping a slow subscriber")
        self._unsubscribe(sub)
        error = json.dumps(
            {"type": "error", "message": "ErrSlowConsume", "reason": "too many backed up messages"}
        )
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            await asyncio.wait_for(sub.ws.send(error), 0.5)
        try:
            await asyncio.wait_for(sub.ws.close(1008, "slow consumer"), 1)
        except TimeoutError:  # it reads nothing, not even the close: cut it off
            sub.ws.transport.abort()

    def inject(self, product: str, frame: str | bytes, *, text: bool | None = None) -> int:
        """Queue a raw frame to every subscriber of ``product`` (for tests); returns how many."""
        subs = [s for s in self._subscribers if product in s.products]
        for sub in subs:
            sub.outbox.push(_Out(product, None, frame, False, text))
        return len(subs)

    # -- WebSocket feed ---------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), timeout=5)
        except TimeoutError:
            await ws.close(1008, "no subscribe within 5 s")
            return
        except ConnectionClosed:
            return
        if ws.response is not None and "permessage-deflate" in ws.response.headers.get(
            "Sec-WebSocket-Extensions", ""
        ):
            self.deflated += 1
        size = QUEUE_SIZE_TIMED if self.speed > 0 else QUEUE_SIZE_FULL_SPEED
        sub = _Subscriber(ws, _Outbox(size))
        self._subscribers.add(sub)
        # The sender waits on the outbox, the receiver on the socket: whichever ends first (a client
        # that leaves, a fault that closes) ends the handler.
        tasks = {
            asyncio.create_task(self._send_loop(sub)),
            asyncio.create_task(self._receive_loop(sub, first)),
        }
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._unsubscribe(sub)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    async def _receive_loop(self, sub: _Subscriber, first: str | bytes) -> None:
        """The client's subscribes and unsubscribes, answered in order with the stream."""
        message = first
        while True:
            try:
                kind, products = self._parse_request(message)
            except ValueError as exc:
                if await self._refuse(sub, str(exc)):
                    return
            else:
                self.requests[kind] += 1
                unknown = [p for p in products if p not in self.products]
                if unknown:  # Coinbase ignores the whole subscribe
                    named = unknown[0] if self.faults.refusal_names_product else ""
                    if await self._refuse(sub, f"{named} is not a valid product"):
                        return
                elif kind == "subscribe":
                    self._subscribe(sub, products)
                else:
                    sub.products -= set(products)
                    self._acknowledge(sub)
            message = await sub.ws.recv()

    async def _refuse(self, sub: _Subscriber, reason: str) -> bool:
        """Coinbase's "Failed to subscribe"; True if the connection is to close (``subscribe_error``)."""
        self.injected["refused"] += 1
        error = json.dumps({"type": "error", "message": "Failed to subscribe", "reason": reason})
        if self.faults.subscribe_error == "close":
            await sub.ws.send(error)
            await sub.ws.close(1008, "bad subscribe")
            return True
        sub.outbox.push(_Out("", None, error, False))
        return False

    def _subscribe(self, sub: _Subscriber, products: list[str]) -> None:
        # Add the products and queue each one's last_match in one step, so no trade falls between.
        new = [p for p in products if p not in sub.products]
        sub.products |= set(new)
        self._acknowledge(sub)
        for name in new:
            last = self.products[name].last
            if last:
                sub.outbox.push(_Out(name, last, json.dumps(match_frame(last, "last_match")), False))
        if sub.products:
            self._has_subscribers.set()

    def _acknowledge(self, sub: _Subscriber) -> None:
        ids = sorted(sub.products)
        channels = [{"name": n, "product_ids": ids, "account_ids": None} for n in ("matches", "heartbeat")]
        sub.outbox.push(_Out("", None, json.dumps({"type": "subscriptions", "channels": channels}), False))

    def _parse_request(self, raw: str | bytes) -> tuple[Literal["subscribe", "unsubscribe"], list[str]]:
        try:
            msg = json.loads(raw)
        except ValueError:
            raise ValueError("subscribe message is not JSON") from None
        if not isinstance(msg, dict) or msg.get("type") not in ("subscribe", "unsubscribe"):
            raise ValueError("expected a subscribe message")
        products = list(msg.get("product_ids") or [])
        for ch in msg.get("channels") or []:
            if isinstance(ch, dict):
                products += ch.get("product_ids") or []
        if not products or not all(isinstance(p, str) for p in products):
            raise ValueError("no product_ids")
        kind: Literal["subscribe", "unsubscribe"] = msg["type"]
        return kind, list(dict.fromkeys(products))

    async def _send_loop(self, sub: _Subscriber) -> None:
        """Send queued frames, injecting faults; counts are server-wide so reconnects don't reset them."""
        f = self.faults
        rng = random.Random(f"{f.seed}:{self.injected.total()}")
        while True:
            out = await sub.outbox.pop()
            if out.omittable and f.omit_rate and rng.random() < f.omit_rate:
                self.injected["omitted"] += 1
                continue
            if not await self._send(sub, out.frame, out.text):
                return
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

    async def _send(self, sub: _Subscriber, frame: str | bytes, text: bool | None) -> bool:
        """Send one frame; False if the client, not reading, got dropped as a slow consumer."""
        if not self.faults.slow_consumer_s:
            await sub.ws.send(frame, text=text)
            return True
        try:
            await asyncio.wait_for(sub.ws.send(frame, text=text), self.faults.slow_consumer_s)
        except TimeoutError:
            await self._drop_slow(sub)
            return False
        return True

    # -- REST -------------------------------------------------------------------------------------

    async def _http(self, ws: ServerConnection, request: Request) -> Response | None:
        if "upgrade" in request.headers.get("Connection", "").lower():
            return None
        url = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        if parts == ["replay", "status"]:
            return _json(200, self.status())
        self.rest_requests += 1
        self.rest_by_path["/".join(parts[1:]) or parts[0]] += 1
        if not self._take_token():
            return _json(429, {"message": "Public rate limit exceeded"}, {"Retry-After": "1"})
        f, rng = self.faults, self._rest_rng
        if f.rest_stall_rate and rng.random() < f.rest_stall_rate:
            self.injected["rest_stalled"] += 1
            await asyncio.sleep(f.rest_stall_s)
        if f.rest_error_rate and rng.random() < f.rest_error_rate:
            kind = "rest_html" if self.injected["rest_5xx"] > self.injected["rest_html"] else "rest_5xx"
            self.injected[kind] += 1
            if kind == "rest_html":
                return _response(520, CLOUDFLARE_PAGE.encode(), "text/html; charset=UTF-8")
            return _json(503, {"message": "service unavailable"})
        if parts == ["products"]:
            return _json(200, [self._listing(p) for p in [*self.products, *self.listed]])
        if len(parts) in (2, 3) and parts[0] == "products":
            if parts[1] not in self.products and (len(parts) == 3 or parts[1] not in self.listed):
                return _json(404, {"message": "NotFound"})
            if len(parts) == 2:
                return _json(200, self._listing(parts[1]))
            product = self.products[parts[1]]
            try:
                if parts[2] == "trades":
                    return self._trades(product, query)
                if parts[2] == "candles":
                    return self._candles(product, query)
            except ValueError as exc:
                return _json(400, {"message": str(exc)})
        return _json(404, {"message": "NotFound"})

    def _listing(self, product: str) -> dict[str, Any]:
        """A ``GET /products`` row, as Coinbase writes one."""
        halted = any(h.product == product and h.start_us <= self._clock_us() < h.end_us for h in self.halts)
        base, quote = product.split("-")
        return {
            "id": product, "base_currency": base, "quote_currency": quote, "quote_increment": "0.01",
            "base_increment": "0.00000001", "display_name": f"{base}/{quote}", "min_market_funds": "1",
            "margin_enabled": False, "post_only": False, "limit_only": False, "cancel_only": halted,
            "status": self.listed.get(product, "online"),
            "status_message": "trading halted (replay)" if halted else "", "trading_disabled": halted,
            "fx_stablecoin": False, "max_slippage_percentage": "0.02000000", "auction_mode": False,
            "high_bid_limit_percentage": "",
        }  # fmt: skip

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
        known = p.known_to_rest(self.faults.rest_lag_s)
        ids = p.ids[:known]
        if "after" in query:  # older than the cursor
            hi = bisect.bisect_left(ids, _int(query["after"], "after"))
            page = p.trades[max(0, hi - limit) : hi]
        elif "before" in query:  # newer than the cursor
            lo = bisect.bisect_right(ids, _int(query["before"], "before"))
            page = p.trades[lo : min(lo + limit, known)]
        else:
            page = p.trades[max(0, known - limit) : known]
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
        known = p.known_to_rest(self.faults.rest_lag_s)
        lo = bisect.bisect_left(p.times, (start - start % g) * US, hi=known)
        hi = bisect.bisect_left(p.times, (end - end % g + g) * US, hi=known)
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
            "rest_by_path": dict(self.rest_by_path),
            "deflated_connections": self.deflated,
            "requests": dict(self.requests),
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


def _response(
    status: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None
) -> Response:
    h = Headers({"Content-Type": content_type, **(headers or {})})
    h["Content-Length"] = str(len(payload))
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # Cloudflare's own 52x codes
        phrase = "Unknown Error"
    return Response(status, phrase, h, payload)


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return _response(status, json.dumps(body).encode(), "application/json", headers)


async def serve_forever(server: ReplayServer, host: str, port: int) -> None:
    bound = await server.start(host, port)
    print(f"replay listening on ws://{host}:{bound} (REST http://{host}:{bound})", flush=True)
    try:
        await asyncio.Future()
    finally:
        with contextlib.suppress(Exception):
            await server.close()
