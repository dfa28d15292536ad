"""On-device calibration: a pooled model set's intervals fitted to the served product's own history.

A pooled version (registry product ``*``) serves products it never saw. Its point models and its
volatility model read scale-free features, so they carry over; how wide a product's intervals must
be, the multiplier q of the volatility model's sigma, does not, since each product's moves stand in
its own relation to what sigma foresees. So the appliance calibrates q here, the way training does
(split-conformal: the finite-sample-corrected quantile of |realized - predicted log return| / sigma),
on the product's newest ``CALIBRATION_DAYS`` of candles, every model through its served ONNX graph,
one row at a time as it serves.

Too little history (a product listed weeks ago) is refused with the reason, and the pooled set's own
quantiles (calibrated in training on the products it was trained on) serve meanwhile; every
prediction says which. Recalibrated once a market day, in a worker thread that pauses after every
row, never on the event loop; kept in the store, so a restart reuses it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from appliance.candles import US
from appliance.coinbase.rest import CoinbaseRest, CoinbaseRestError
from appliance.features import WINDOW, CandleSeries, feature_matrix, next_candle
from appliance.health import Conditions
from appliance.history import backfill, missing_span
from appliance.predictions import Calibration
from appliance.store import Store
from appliance.storekeeper import StoreKeeper, reported

if TYPE_CHECKING:
    from appliance.inference import Inference, ProductModels

log = logging.getLogger(__name__)

Floats = NDArray[np.float64]
LEVELS = (0.8, 0.95)
#: Days of this product's own candles a calibration uses, and needs: enough that the intervals are
#: honest across the week's cycle and more than one mood of the market (720 hourly candles; at 15
#: minutes the same 30 days, 2,880 candles, rather than the same count over a week and a half).
CALIBRATION_DAYS = 30
DAY = 86_400
YIELD_S = 0.001  # the calibration thread's pause after each row (2,880 rows: about 3 s more a calibration)


def rows_needed(granularity: int) -> int:
    """Calibration rows (candles with features and a known next candle) a calibration takes."""
    return CALIBRATION_DAYS * DAY // granularity


def candles_needed(granularity: int) -> int:
    """Closed candles a calibration reads: its rows, the window before the first, the one after the last."""
    return rows_needed(granularity) + WINDOW


def conformal_quantile(scores: Floats, level: float) -> float:
    """The split-conformal quantile: the ceil((n + 1) level)-th smallest score (the largest if n is small)."""
    z = np.sort(scores)
    n = len(z)
    return float(z[min(n - 1, math.ceil((n + 1) * level) - 1)])


def conformal_quantiles(scores: Floats) -> dict[str, float]:
    """Each level's quantile, keyed as manifests key them ("0.8", "0.95")."""
    return {str(level): conformal_quantile(scores, level) for level in LEVELS}


class NotEnoughHistory(ValueError):
    """Fewer calibration rows than an honest calibration needs."""


@dataclass(frozen=True)
class Fitted:
    """What a calibration found: per model and level the multiplier, and the rows it came from."""

    quantiles: dict[str, dict[str, float]]
    rows: int
    first: int
    last: int


Graph = Callable[[Floats], float]


def calibrate(series: CandleSeries, sigma: Graph, models: Mapping[str, Graph], rows: int) -> Fitted:
    """Split-conformal multipliers from the newest ``rows`` candles of ``series`` that have a full
    feature window and a next candle: each model's |realized - predicted log return| / sigma.

    ``sigma`` and ``models`` run one feature row (the served graphs: sigma, and each model's served log
    return, shrinkage included). NotEnoughHistory, naming what there is, when the rows fall short.
    """
    X = feature_matrix(series)
    nxt = next_candle(series)
    usable = np.flatnonzero((nxt >= 0) & np.isfinite(X).all(axis=1))
    if len(usable) < rows:
        days = len(usable) * series.granularity / DAY
        raise NotEnoughHistory(
            f"{len(usable)} candles of {series.granularity}s history to calibrate on ({days:.1f} days), "
            f"{rows} ({CALIBRATION_DAYS} days) needed"
        )
    picked = usable[-rows:]
    realized = np.log(series.close[nxt[picked]] / series.close[picked])
    scale = np.array([sigma(X[i]) for i in picked])
    quantiles = {
        name: conformal_quantiles(np.abs(realized - np.array([run(X[i]) for i in picked])) / scale)
        for name, run in models.items()
    }
    return Fitted(quantiles, rows, int(series.start[picked[0]]), int(series.start[picked[-1]]))


def yielding(graph: Graph) -> Graph:
    """``graph``, then a short sleep: the worker thread gives the interpreter (the GIL) back to the
    event loop after every row, so a close's predictions never wait behind a calibration. (Not a
    lower nice value: a thread that the kernel starves while it holds the GIL stalls the loop too.)"""

    def run(x: Floats) -> float:
        out = graph(x)
        time.sleep(YIELD_S)
        return out

    return run


class Calibrator:
    """Keeps the intervals of every product a pooled version serves calibrated from its own history.

    At start the stored calibrations are taken as they are; then each product and horizon is
    calibrated when its serving version has none, and again once a market day of candles has come
    since (checked as trades are committed, at most every ``CHECK_S``). The history it needs is
    back-filled first (only the missing candles); the computation runs in one worker thread on its
    own read connection, pausing after every row so that the event loop keeps the interpreter;
    only the result is written, by the event loop.
    """

    CHECK_S = 1.0
    RETRY_S = 300.0  # after a failure (REST, a model that will not run), wall seconds before trying again

    def __init__(
        self,
        store: Store,
        reader: Store,
        rest: CoinbaseRest,
        inference: Inference,
        health: Conditions,
        keeper: StoreKeeper | None = None,
    ) -> None:
        self.store, self.reader, self.rest, self.inference = store, reader, rest, inference
        self.health, self.keeper = health, keeper
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="calibration")
        self._not_before: dict[tuple[str, int], float] = {}
        none: list[Calibration] = []
        stored = keeper.read(store.calibrations, none) if keeper else store.calibrations()
        for c in stored:
            inference.calibrations[c.product, c.granularity] = c

    def forget(self) -> None:
        """The store was replaced: the read connection reopens on the new file when next used (the
        calibrations in memory keep serving until the next one is due)."""
        self.reader.close()

    def wake(self) -> None:
        """Trades were committed: the market clock moved."""
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.keeper is None or self.keeper.writable:  # a result could not be kept otherwise
                    with reported(self.keeper):
                        await self._check_all()
                await asyncio.sleep(self.CHECK_S)
        finally:
            self._worker.shutdown(wait=False, cancel_futures=True)

    async def _check_all(self) -> None:
        clock = self.store.last_trade_times()
        for product in self.inference.products:
            for g in self.inference.granularities:
                if product in clock:
                    await self.check(product, g, clock[product] // US // g * g)

    def due(self, product: str, g: int, open_bucket: int) -> bool:
        """Served by a pooled version whose calibration here is missing or a market day old."""
        loaded = self.inference.serving_of(product, g)
        if loaded is None or not loaded.pooled or time.monotonic() < self._not_before.get((product, g), 0):
            return False
        done = self.inference.calibrations.get((product, g))
        return (
            done is None
            or done.version != loaded.manifest.version
            or open_bucket - (done.through or 0) >= DAY
        )

    async def check(self, product: str, g: int, open_bucket: int) -> Calibration | None:
        """Calibrate ``product`` at ``g`` if due, with the candles closed before ``open_bucket``."""
        if not self.due(product, g, open_bucket):
            return None
        loaded = self.inference.serving_of(product, g)
        assert loaded is not None
        key, subject, started = (product, g), f"{product} {g}s", time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            have = await loop.run_in_executor(self._worker, self._starts, product, g)
            span = missing_span(have, open_bucket, candles_needed(g), g)
            if span is not None:
                await backfill(self.store, self.rest, product, g, *span, now=open_bucket, progress=False)
            result = await loop.run_in_executor(self._worker, self._calibrate, product, g, loaded)
        except (CoinbaseRestError, ValueError, RuntimeError, OSError) as exc:  # onnxruntime: RuntimeError
            self._not_before[key] = time.monotonic() + self.RETRY_S
            self.health.problem("calibration", "on-device calibration failing; the pooled intervals serve",
                                subject=subject, error=str(exc) or type(exc).__name__,
                                retry_in_s=self.RETRY_S)  # fmt: skip
            return None
        self.health.ok("calibration", subject=subject)
        self.store.save_calibration(result)
        self.inference.calibrations[key] = result
        extra = {"product": product, "granularity": g, "version": result.version, "rows": result.rows,
                 "s": round(time.monotonic() - started, 2)}  # fmt: skip
        if result.quantiles is not None:
            log.info("intervals calibrated", extra=extra | {
                f"q80.{name}": round(q["0.8"], 3) for name, q in result.quantiles.items()})  # fmt: skip
        else:
            log.info(
                "calibration refused; the pooled intervals serve", extra=extra | {"reason": result.reason}
            )
        return result

    def _starts(self, product: str, g: int) -> list[int]:
        if not self.reader.is_open:  # at first, or after the store was replaced
            self.reader.connect()
        return [r.start for r in self.reader.series_rows(product, g, last=candles_needed(g) + 1)]

    def _calibrate(self, product: str, g: int, loaded: ProductModels) -> Calibration:
        """In the worker thread: the newest closed candles through the served graphs."""
        # Twice what a whole history needs: a hole Coinbase cannot fill (an hour without trades) costs
        # the rows whose window holds it, and older candles stand in for them.
        series = CandleSeries.from_rows(g, self.reader.series_rows(product, g, last=2 * candles_needed(g)))
        version, now = loaded.manifest.version, time.time()
        through = int(series.start[-1]) + g if len(series) else 0
        models = {name: m.log_return for name, m in loaded.models.items()}
        try:
            fitted = calibrate(series, yielding(loaded.sigma), models, rows_needed(g))
        except NotEnoughHistory as exc:
            return Calibration(
                product, g, version, "pooled", now, through, reason=f"{exc}: the pooled set's intervals"
            )
        first, last = fitted.first, fitted.last
        return Calibration(
            product, g, version, "device", now, through, fitted.rows, first, last, fitted.quantiles
        )
