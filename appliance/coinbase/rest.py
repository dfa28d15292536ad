"""Coinbase Exchange public REST: candles and trades, polite and persistent.

Requests are spaced to stay under the public limit (10/s), an HTTP 429 or a 5xx backs off
exponentially (honouring ``Retry-After``), and every request has a timeout. Rows that fail
validation are skipped, counted and logged; they never reach the store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from appliance.candles import COINBASE_GRANULARITIES, CandleRow, Trade, check_ohlcv
from appliance.coinbase.backoff import backoff_delay
from appliance.coinbase.messages import parse_trade_rows
from appliance.metrics import REST_REQUESTS, REST_ROWS_REJECTED

if TYPE_CHECKING:
    from appliance.settings import Settings

log = logging.getLogger(__name__)

MAX_CANDLES_PER_REQUEST = 300
MAX_TRADES_PER_REQUEST = 1000


class CoinbaseRestError(RuntimeError):
    """Coinbase answered with an error that retrying will not fix (or retries ran out)."""


class RateLimiter:
    """Spaces request starts at least ``1/rate`` seconds apart, across all tasks sharing it."""

    def __init__(self, rate_per_s: float) -> None:
        self._interval = 1.0 / rate_per_s
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._interval
        if delay > 0:
            await asyncio.sleep(delay)


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
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            headers={"User-Agent": "cryptopi", "Accept": "application/json"},
        )
        self._limiter = RateLimiter(rate_per_s)
        self._max_attempts = max_attempts
        self._max_backoff_s = max_backoff_s

    @classmethod
    def from_settings(cls, settings: Settings) -> CoinbaseRest:
        """The client every part of the appliance uses (make it inside the loop that will close it)."""
        return cls(
            settings.coinbase_rest_url, rate_per_s=settings.rest_rate_per_s, timeout_s=settings.rest_timeout_s
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> CoinbaseRest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _get(self, endpoint: str, path: str, params: dict[str, Any]) -> httpx.Response:
        for attempt in range(1, self._max_attempts + 1):
            await self._limiter.wait()
            try:
                resp = await self._client.get(path, params=params)
            except httpx.TransportError as exc:
                outcome, detail, retry_after = "transport_error", f"{type(exc).__name__}: {exc}", None
            else:
                if resp.status_code == 200:
                    REST_REQUESTS.labels(endpoint, "ok").inc()
                    return resp
                detail = _error_message(resp)
                if resp.status_code != 429 and resp.status_code < 500:
                    REST_REQUESTS.labels(endpoint, "rejected").inc()
                    raise CoinbaseRestError(f"GET {path} {params}: HTTP {resp.status_code}: {detail}")
                outcome = "rate_limited" if resp.status_code == 429 else "server_error"
                retry_after = _retry_after(resp)
            REST_REQUESTS.labels(endpoint, outcome).inc()
            if attempt == self._max_attempts:
                raise CoinbaseRestError(f"GET {path}: gave up after {attempt} attempts: {detail}")
            delay = max(backoff_delay(attempt, self._max_backoff_s), retry_after or 0.0)
            log.warning(
                "coinbase rest retry",
                extra={
                    "path": path,
                    "outcome": outcome,
                    "attempt": attempt,
                    "delay_s": round(delay, 2),
                    "detail": detail,
                },
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def candles(self, product: str, granularity: int, start: int, end: int) -> list[CandleRow]:
        """Candles with bucket start in [start, end) (epoch seconds), oldest first. One request."""
        validate_granularity(granularity)
        count = math.ceil((end - start) / granularity)
        if not 0 < count <= MAX_CANDLES_PER_REQUEST:
            raise ValueError(f"a candles request covers 1..{MAX_CANDLES_PER_REQUEST} buckets, not {count}")
        last_start = start + (count - 1) * granularity
        resp = await self._get(
            "candles",
            f"/products/{product}/candles",
            {"granularity": granularity, "start": _iso(start), "end": _iso(last_start)},
        )
        rows, problems = parse_candle_rows(resp.json(), granularity)
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
        resp = await self._get("trades", f"/products/{product}/trades", params)
        trades, problems = parse_trade_rows(product, resp.json())
        for problem in problems:
            REST_ROWS_REJECTED.labels("trades").inc()
            log.warning("coinbase trade row skipped", extra={"product": product, "problem": problem})
        cursor = resp.headers.get("cb-after")
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
    except ValueError:
        return resp.text[:200]
    return str(body.get("message", body))[:200] if isinstance(body, dict) else str(body)[:200]


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    try:
        return min(60.0, float(value))
    except ValueError:
        return None
