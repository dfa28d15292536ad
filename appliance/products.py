"""Which configured products Coinbase lists, checked against ``GET /products`` at start and daily.

Coinbase ignores a whole subscribe that names one product it does not offer, so ingest asks first:
a product that is not listed, or listed as ``delisted`` or ``internal``, is named in /health (one
WARNING per product) and left out of the feed, and the others ingest. A product listed but not
trading now (status ``offline``, ``trading_disabled``, ``cancel_only``, ``auction_mode``: the
documented fields of "Get all known trading pairs") stays subscribed, so the first trade after a
halt is not missed; ingest shows the halt. That the feed refuses delisted and internal products
and serves offline ones is assumed, not documented; a refusal is handled by the feed anyway.

Patterns (``CRYPTOPI_PRODUCTS=*-USD``) are resolved against the same list once, at start, to the
products that are ``online``, in id order: what an appliance serves is fixed for its run.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from appliance.coinbase.backoff import backoff_delay
from appliance.coinbase.messages import ProductRow
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.health import Conditions
from appliance.settings import MAX_PRODUCTS, Settings

log = logging.getLogger(__name__)

#: Statuses whose products the feed serves (assumed: it refuses delisted and internal ones).
SUBSCRIBABLE = frozenset({"online", "offline"})
CHECK_EVERY_S = 86_400.0
RETRY_S = 300.0  # after a check that could not reach Coinbase


@dataclass(frozen=True, slots=True)
class Verdict:
    product: str
    left_out: str | None  # why it is not subscribed (None: it is)
    row: ProductRow | None  # what Coinbase lists for it


def judge(products: Sequence[str], listing: Iterable[ProductRow]) -> list[Verdict]:
    """Each configured product against Coinbase's list."""
    rows = {r.id: r for r in listing}
    verdicts = []
    for p in products:
        row = rows.get(p)
        if row is None:
            why: str | None = "not a Coinbase product (GET /products does not list it): left out of the feed"
        elif row.status not in SUBSCRIBABLE:
            why = f"Coinbase lists it as {row.status}: left out of the feed"
        else:
            why = None
        verdicts.append(Verdict(p, why, row))
    return verdicts


def resolve(
    entries: Sequence[str], listing: Iterable[ProductRow], limit: int = MAX_PRODUCTS
) -> tuple[str, ...]:
    """Ids as given, each pattern replaced by the online products it matches (id order), no repeats.

    ValueError when a pattern matches nothing or the whole comes to more than ``limit`` products.
    """
    online = sorted(r.id for r in listing if r.status == "online")
    out: dict[str, None] = {}
    for entry in entries:
        if "*" in entry or "?" in entry:
            matched = [p for p in online if fnmatch.fnmatchcase(p, entry)]
            if not matched:
                raise ValueError(f"CRYPTOPI_PRODUCTS: {entry} matches no product Coinbase trades")
            out.update(dict.fromkeys(matched))
        else:
            out[entry] = None
    if len(out) > limit:
        raise ValueError(
            f"CRYPTOPI_PRODUCTS: {', '.join(entries)} comes to {len(out)} products; at most {limit}"
        )
    return tuple(out)


async def resolve_settings(settings: Settings, rest: CoinbaseRest) -> Settings:
    """``settings`` with its product patterns resolved; waits (retrying) until Coinbase answers."""
    if not settings.product_patterns:
        return settings
    failures = 0
    while True:
        try:
            listing = await rest.products(attempts=1)
        except CoinbaseRestError as exc:  # reported by the client (coinbase-rest); say what waits on it
            failures += 1
            delay = backoff_delay(failures, settings.reconnect_max_s)
            waiting = {"patterns": ",".join(settings.product_patterns), "retry_in_s": round(delay, 2)}
            log.info("product patterns wait for Coinbase", extra={**waiting, "error": str(exc)})
            await asyncio.sleep(delay)
            continue
        products = resolve(settings.products, listing)
        log.info("products resolved", extra={"count": len(products),
                                             "products": ",".join(products)})  # fmt: skip
        return settings.model_copy(update={"products": products})


class ProductWatch:
    """Checks the configured products against Coinbase's list; tells the feed which to follow."""

    def __init__(
        self,
        rest: CoinbaseRest,
        products: Sequence[str],
        follow: Callable[[list[str]], None],
        health: Conditions | None = None,
    ) -> None:
        self.rest, self.products, self.follow = rest, tuple(products), follow
        self.health = health or Conditions()
        self.rows: dict[str, ProductRow] = {}  # the latest listing of our products
        self.checked = False

    def halted_by(self, product: str) -> tuple[str, ...]:
        """What Coinbase's listing (as of the last check) says keeps the product from trading."""
        row = self.rows.get(product)
        return row.halted_by if row else ()

    async def check(self, *, attempts: int | None = None) -> bool:
        """One look at ``GET /products``; False if Coinbase could not be asked (nothing changes)."""
        try:
            listing = await self.rest.products(attempts=attempts)
        except CoinbaseRestError as exc:
            log.info("product check failed; the configured products are followed as they are",
                     extra={"error": str(exc), "retry_in_s": RETRY_S})  # fmt: skip
            return False
        verdicts = judge(self.products, listing)
        self.rows = {v.product: v.row for v in verdicts if v.row is not None}
        for v in verdicts:
            if v.left_out:
                status = {"status": v.row.status, "status_message": v.row.status_message} if v.row else {}
                self.health.problem("product", v.left_out, subject=v.product, **status)
            else:
                self.health.ok("product", subject=v.product)
        following = [v.product for v in verdicts if v.left_out is None]
        left_out = ",".join(v.product for v in verdicts if v.left_out)
        log.info("products checked", extra={"following": len(following), "left_out": left_out})
        self.checked = True
        self.follow(following)
        return True

    async def run(self) -> None:
        """Check again every day (a listing changes), sooner after a check that failed."""
        ok = self.checked
        while True:
            await asyncio.sleep(CHECK_EVERY_S if ok else RETRY_S)
            ok = await self.check()
