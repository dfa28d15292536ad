"""Candles: what the models see, the last 48 by default."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from appliance.api.errors import ERRORS
from appliance.api.schemas import CandleOut, ProductPath
from appliance.api.state import State
from appliance.candles import COINBASE_GRANULARITIES, parse_time

router = APIRouter(tags=["candles"])
MAX_CANDLES = 1000


@router.get("/api/candles/{product}", response_model=list[CandleOut], responses=ERRORS)
async def candles(
    product: ProductPath,
    state: State,
    granularity: Annotated[int, Query(description=f"One of {COINBASE_GRANULARITIES}")] = 3600,
    start: Annotated[str | None, Query(description="ISO-8601 or epoch seconds")] = None,
    end: Annotated[str | None, Query(description="ISO-8601 or epoch seconds")] = None,
) -> list[CandleOut]:
    state.known(product)
    if granularity not in COINBASE_GRANULARITIES:
        raise HTTPException(422, f"granularity must be one of {COINBASE_GRANULARITIES}, not {granularity}")
    bounds = {}
    for name, value in (("start", start), ("end", end)):
        if value is not None:
            try:
                bounds[name] = parse_time(value)
            except ValueError as exc:
                raise HTTPException(422, f"{name}: {exc}") from None
    rows = state.reader.series_rows(product, granularity, last=None if bounds else 48)
    lo, hi = bounds.get("start", -(2**62)), bounds.get("end", 2**62)
    picked = [r for r in rows if lo <= r.start < hi][-MAX_CANDLES:]
    return [CandleOut.of(r) for r in picked]
