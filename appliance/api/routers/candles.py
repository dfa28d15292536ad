"""Candles: what the models see, the last 48 by default."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from appliance.api.errors import ERRORS, query_time
from appliance.api.schemas import CandleOut, ProductPath
from appliance.api.state import State
from appliance.candles import TRADE_GRANULARITIES

router = APIRouter(tags=["candles"])
MAX_CANDLES = 1000


@router.get("/api/candles/{product}", response_model=list[CandleOut], responses=ERRORS)
async def candles(
    product: ProductPath,
    state: State,
    granularity: Annotated[int, Query(description=f"One of {TRADE_GRANULARITIES}")] = 3600,
    start: Annotated[str | None, Query(description="ISO-8601 or epoch seconds")] = None,
    end: Annotated[str | None, Query(description="ISO-8601 or epoch seconds")] = None,
) -> list[CandleOut]:
    state.known(product)
    if granularity not in TRADE_GRANULARITIES:
        served = " or ".join(map(str, TRADE_GRANULARITIES))
        raise HTTPException(
            422, f"granularity: {served} (the candles the appliance builds), not {granularity}"
        )
    bounds = {name: query_time(name, value) for name, value in (("start", start), ("end", end))
              if value is not None}  # fmt: skip
    if bounds.get("start", 0) >= bounds.get("end", 2**62):
        raise HTTPException(422, f"start: {start} is not before end {end}")
    rows = state.reader.series_rows(product, granularity, last=None if bounds else 48)
    lo, hi = bounds.get("start", -(2**62)), bounds.get("end", 2**62)
    picked = [r for r in rows if lo <= r.start < hi][-MAX_CANDLES:]
    return [CandleOut.of(r) for r in picked]
