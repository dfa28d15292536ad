"""Coinbase Exchange public REST: products, candles and trades, polite, fair and persistent.

Requests are spaced to stay under the public limit (documented: 10/s per IP, bursts to 15), and the
slots go round-robin over the products asking (:class:`FairLimiter`), so one product's long
back-fill never starves another's gap repair. An HTTP 429, a 5xx, a timeout or an answer that is
not JSON (a proxy's or Cloudflare's HTML error page) backs off exponentially, honouring
``Retry-After``; every request has a timeout. Rows that fail validation are skipped, counted and
logged; they never reach the store. Repeated failure is reported to :class:`~appliance.health.Conditions`
once (``coinbase-rest``), not per retry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from appliance.candles import COINBASE_GRANULARITIES, CandleRow, Trade, check_ohlcv
from appliance.coinbase.backoff import backoff_delay
from appliance.coinbase.messages import ProductRow, parse_product_rows, parse_trade_rows
from appliance.health import Conditions
from appliance.metrics import REST_REQUESTS, REST_ROWS_REJECTED

if TYPE_CHECKING:
    from appliance.settings import Settings

log = logging.getLogger(__name__)

MAX_CANDLES_PER_REQUEST = 300
MAX_TRADES_PER_REQUEST = 1000
#: Failed attempts in a row before REST counts as failing (one retry is weather, not an outage).
FAILING_AFTER = 3
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


class CoinbaseRestError(RuntimeError):
    """Coinbase answered with an error that retrying will not fix (or retries ran out)."""


class FairLimiter:
    """Grants request slots at most ``rate`` a second, round-robin over the keys (products) waiting.

    Each key waits in its own FIFO; a slot goes to the next key in turn that has a waiter, so with
    fifty products repairing gaps while one back-fills history, every product gets one slot in each
    round. One limiter serves the whole process (all its REST traffic goes through one client).
    """

    def __init__(self, rate_per_s: float) -> None:
        self._interval = 1.0 / rate_per_s
        self._next = 0.0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._turns: deque[str] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, key: str = "") -> None:
        fut = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(key)
        if queue is None:
            queue = self._waiting[key] = deque()
            self._turns.append(key)
        queue.append(fut)
        self._grant()
        await fut  # a cancelled waiter is skipped when its turn comes

    def _grant(self) -> None:
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        while self._turns:
            now = loop.time()
            if now < self._next:
                self._timer = loop.call_at(self._next, self._tick)
                return
            key = self._turns.popleft()
            queue = self._waiting[key]
            while queue and queue[0].done():
                queue.popleft()
            if queue:
                queue.popleft().set_result(None)
                self._next = max(now, self._next) + self._interval
            if queue:
                self._turns.append(key)  # its next request waits for the other keys' turns
            else:
                del self._waiting[key]

    def _tick(self) -> None:
        self._timer = None
        self._grant()


@dataclass(frozen=True, slots=True)
class TradePage:
    trades: list[Trade]  # newest first, as Coinbase sends them
    older_cursor: int | None  # the ``cb-after`` header: pass as ``after`` for the next, older page


def validate_granularity(granularity: int) -> int:
    if granularity not in COINBASE_GRANULARITIES:
        allowed = ", ".join(map(str, COINBASE_GRANULARITIES))
        raise ValueError(f"granularity {granularity} is not one Coinbase offers ({allowed})")
    return granularity


class CoinbaseRest:
    def __init__(
        self,
        base_url: str,
        *,
        rate_per_s: float = 10.0,
        timeout_s: float = 10.0,
        max_attempts: int = 8,
        max_backoff_s: float = 30.0,
        health: Conditions | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            headers={"User-Agent": "cryptopi", "Accept": "application/json"},
        )
        self.host = urlsplit(base_url).netloc
        self.limiter = FairLimiter(rate_per_s)
        self._max_attempts = max_attempts
        self._max_backoff_s = max_backoff_s
        self.health = health or Conditions()

    @classmethod
    def from_settings(cls, settings: Settings, health: Conditions | None = None) -> CoinbaseRest:
        """The client every part of the appliance uses (make it inside the loop that will close it)."""
        return cls(
            settings.coinbase_rest_url,
            rate_per_s=settings.rest_rate_per_s,
            timeout_s=settings.rest_timeout_s,
            health=health,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> CoinbaseRest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _get(
        self, endpoint: str, path: str, params: dict[str, Any], *, key: str = "", attempts: int | None = None
    ) -> tuple[Any, httpx.Headers]:
        """The JSON body and headers of a 200; retried on what retrying can fix. ``key``: whose turn."""
        attempts = attempts or self._max_attempts
        for attempt in range(1, attempts + 1):
            await self.limiter.wait(key)
            retry_after = None
            try:
                resp = await self._client.get(path, params=params)
            except httpx.TransportError as exc:  # timeouts included
                outcome, detail = "transport_error", f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if resp.status_code == 200:
                    try:
                        payload = resp.json()
                    except ValueError:  # a 200 that is not JSON: an HTML page from a proxy
                        outcome, detail = "invalid_body", f"not JSON: {resp.text[:80]!r}"
                    else:
                        REST_REQUESTS.labels(endpoint, "ok").inc()
                        self.health.ok("coinbase-rest")
                        return payload, resp.headers
                else:
                    detail = f"HTTP {resp.status_code}: {_error_message(resp)}"
                    if resp.status_code != 429 and resp.status_code < 500:
                        REST_REQUESTS.labels(endpoint, "rejected").inc()
                        raise CoinbaseRestError(f"GET {path} {params}: {detail}")
                    outcome = "rate_limited" if resp.status_code == 429 else "server_error"
                    retry_after = _retry_after(resp)
            REST_REQUESTS.labels(endpoint, outcome).inc()
            delay = max(backoff_delay(attempt, self._max_backoff_s), retry_after or 0.0)
            if outcome != "rate_limited" and attempt >= FAILING_AFTER:  # 429s are the limit at work
                self.health.problem("coinbase-rest", f"Coinbase REST failing ({self.host})",
                                    last_error=detail, path=path, attempt=attempt,
                                    next_retry_s=round(delay, 2))  # fmt: skip
            if attempt == attempts:
                raise CoinbaseRestError(f"GET {path}: gave up after {attempt} attempts: {detail}")
            log.info(
                "coinbase rest retry",
                extra={"path": path, "outcome": outcome, "attempt": attempt, "delay_s": round(delay, 2),
                       "detail": detail},
            )  # fmt: skip
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def products(self, *, attempts: int | None = None) -> list[ProductRow]:
        """Every product Coinbase lists (``GET /products``), any status."""
        payload, _ = await self._get("products", "/products", {}, attempts=attempts)
        rows, problems = parse_product_rows(payload)
        if problems:
            REST_ROWS_REJECTED.labels("products").inc(len(problems))
            log.info("coinbase product rows skipped", extra={"count": len(problems), "first": problems[0]})
        return rows

    async def candles(self, product: str, granularity: int, start: int, end: int) -> list[CandleRow]:
        """Candles with bucket start in [start, end) (epoch seconds), oldest first. One request."""
        validate_granularity(granularity)
        count = math.ceil((end - start) / granularity)
        if not 0 < count <= MAX_CANDLES_PER_REQUEST:
            raise ValueError(f"a candles request covers 1..{MAX_CANDLES_PER_REQUEST} buckets, not {count}")
        last_start = start + (count - 1) * granularity
        payload, _ = await self._get(
            "candles",
            f"/products/{product}/candles",
            {"granularity": granularity, "start": _iso(start), "end": _iso(last_start)},
            key=product,
        )
        rows, problems = parse_candle_rows(payload, granularity)
        for problem in problems:
            REST_ROWS_REJECTED.labels("candles").inc()
            log.warning("coinbase candle row skipped", extra={"product": product, "problem": problem})
        # Coinbase answers newest first and may include rows before ``start``.
        return sorted((r for r in rows if start <= r.start < end), key=lambda r: r.start)

    async def trades(self, product: str, *, after: int | None = None, limit: int = 1000) -> TradePage:
        """One page of trades older than trade id ``after`` (the newest page when None)."""
        params: dict[str, Any] = {"limit": min(limit, MAX_TRADES_PER_REQUEST)}
        if after is not None:
            params["after"] = after
        payload, headers = await self._get("trades", f"/products/{product}/trades", params, key=product)
        trades, problems = parse_trade_rows(product, payload)
        for problem in problems:
            REST_ROWS_REJECTED.labels("trades").inc()
            log.warning("coinbase trade row skipped", extra={"product": product, "problem": problem})
        cursor = headers.get("cb-after")
        return TradePage(trades, int(cursor) if cursor and cursor.isdigit() else None)

    async def trades_between(self, product: str, after_id: int, up_to_id: int) -> list[Trade]:
        """Every trade with ``after_id < trade_id <= up_to_id`` that Coinbase has, oldest first."""
        found: dict[int, Trade] = {}
        cursor: int | None = up_to_id + 1
        pages = 0
        while cursor is not None and cursor > after_id + 1:
            page = await self.trades(product, after=cursor)
            pages += 1
            for t in page.trades:
                if after_id < t.trade_id <= up_to_id:
                    found[t.trade_id] = t
            oldest = min((t.trade_id for t in page.trades), default=None)
            if oldest is None or page.older_cursor is None or page.older_cursor >= cursor:
                break
            cursor = page.older_cursor
            if pages % 20 == 0:
                log.info(
                    "repairing trade gap",
                    extra={
                        "product": product,
                        "pages": pages,
                        "trades": len(found),
                        "remaining_ids": max(0, cursor - after_id - 1),
                    },
                )
        return [found[k] for k in sorted(found)]


def parse_candle_rows(payload: Any, granularity: int) -> tuple[list[CandleRow], list[str]]:
    """Coinbase's ``[time, low, high, open, close, volume]`` rows, checked for shape and sense."""
    if not isinstance(payload, list):
        return [], [f"expected a JSON list, got {type(payload).__name__}: {str(payload)[:80]}"]
    rows, problems = [], []
    for raw in payload:
        try:
            if not isinstance(raw, list) or len(raw) != 6:
                raise ValueError("not a 6-element row")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
                raise ValueError("non-numeric field")
            t, low, high, open_, close, volume = raw
            if not math.isfinite(t):
                raise ValueError("non-finite value")
            check_ohlcv(open_, high, low, close, volume)
            if t != int(t) or int(t) % granularity:
                raise ValueError(f"time {t} is not on a {granularity}s boundary")
        except ValueError as exc:
            problems.append(f"{exc}: {str(raw)[:80]}")
            continue
        rows.append(CandleRow(int(t), float(open_), float(high), float(low), float(close), float(volume)))
    return rows, problems


def _iso(epoch_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:  # an HTML error page (Cloudflare, a proxy): its title says what happened
        title = _TITLE.search(resp.text)
        return " ".join(title.group(1).split())[:200] if title else resp.text[:200]
    return str(body.get("message", body))[:200] if isinstance(body, dict) else str(body)[:200]


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    try:
        return min(60.0, float(value))
    except ValueError:
        return None
