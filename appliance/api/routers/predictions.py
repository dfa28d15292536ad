"""Predictions: the newest (or the one in force at a time) per model, and all models' latest."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import ValidationError

from appliance.api.errors import ERRORS, query_time, sentence
from appliance.api.schemas import PredictionResult, PredictQuery, ProductPath, query_parameters
from appliance.api.state import AppState, State
from appliance.predictions import PredictionRow

router = APIRouter(tags=["predictions"])


@router.get(
    "/api/predict",
    response_model=PredictionResult,
    responses=ERRORS,
    openapi_extra={"parameters": query_parameters(PredictQuery)},
)
async def predict(request: Request) -> Response:
    """The newest kept prediction, or the one in force at ``at``.

    The hot path of the appliance: the query is validated in one pydantic call (FastAPI's
    per-parameter machinery costs more than everything else here) and the body is rendered once
    per prediction; only ``data_age_s`` and ``stale`` are written per request.
    """
    state: AppState = request.app.state.appliance
    try:
        query = PredictQuery.model_validate(request.query_params)
    except ValidationError as exc:
        raise HTTPException(422, sentence(exc.errors())) from None
    product, model, at, level, g = query.product, query.model, query.at, query.level, query.granularity
    state.known(product)
    state.known_horizon(g)
    if level not in (0.8, 0.95):
        raise HTTPException(422, f"level: 0.8 or 0.95, not {level}")
    when = query_time("at", at) if at is not None and at != "now" else None
    state.known_model(product, model, g)
    kept = state.latest.get((product, g, model)) if when is None else None
    rows = [kept] if kept else state.reader.predictions(product, model=model, granularity=g, at=when, limit=1)
    if not rows:
        if when is not None:
            raise HTTPException(404, f"at: no {product} {model} prediction at or before {at}")
        why = state.predictor.missing.get((product, g))
        raise HTTPException(503, f"no {product} {g}s prediction yet: {why}")
    if when is not None and when >= rows[0].target_time:
        # The newest prediction before ``at`` is for a candle that closed by then: none is in force.
        until = datetime.fromtimestamp(rows[0].target_time, UTC)
        raise HTTPException(404, f"at: no {product} {model} prediction in force at {at}; the newest "
                                 f"before it is for {until:%Y-%m-%dT%H:%M:%SZ}")  # fmt: skip
    age = state.data_age_s(product)
    stale = state.stale(product)
    tail = f'{"null" if age is None else age},"stale":{"null" if stale is None else json.dumps(stale)}}}'
    return Response(rendered(rows[0], level) + tail.encode(), media_type="application/json")


@router.get("/api/predictions/{product}", response_model=list[PredictionResult], responses=ERRORS)
async def predictions(
    product: ProductPath,
    state: State,
    granularity: Annotated[int, Query(description="Horizon: 3600 (the next hour) or 900")] = 3600,
) -> list[PredictionResult]:
    """The newest prediction of every model at one horizon."""
    state.known(product)
    state.known_horizon(granularity)
    age, stale = state.data_age_s(product), state.stale(product)
    return [PredictionResult.of(r, 0.8, age, stale) for r in state.latest_of(product, granularity)]


@lru_cache(maxsize=64)
def rendered(row: PredictionRow, level: float) -> bytes:
    """A prediction's JSON up to its last fields, ``data_age_s`` and ``stale``, which change per request."""
    body = PredictionResult.of(row, level, None).model_dump_json(exclude={"data_age_s", "stale"})
    return f'{body[:-1]},"data_age_s":'.encode()
