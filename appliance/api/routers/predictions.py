"""Predictions: the newest (or the one in force at a time) per model, and all models' latest."""

from __future__ import annotations

import json
from functools import lru_cache

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import ValidationError

from appliance.api.errors import ERRORS, validation_message
from appliance.api.schemas import PredictionResult, PredictQuery, ProductPath, query_parameters
from appliance.api.state import AppState, State
from appliance.candles import parse_time
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
        raise HTTPException(422, validation_message(exc)) from None
    product, model, at, level = query.product, query.model, query.at, query.level
    state.known(product)
    if level not in (0.8, 0.95):
        raise HTTPException(422, f"level must be 0.8 or 0.95, not {level}")
    when = None
    if at is not None and at != "now":
        try:
            when = parse_time(at)
        except ValueError as exc:
            raise HTTPException(422, f"at: {exc}") from None
    state.known_model(product, model)
    kept = state.latest.get((product, model)) if when is None else None
    rows = [kept] if kept else state.reader.predictions(product, model=model, at=when, limit=1)
    if not rows:
        if when is not None:
            raise HTTPException(404, f"no {product} {model} prediction at or before {at}")
        raise HTTPException(503, f"no {product} prediction yet: {state.predictor.missing.get(product)}")
    age = state.data_age_s(product)
    stale = state.stale(product)
    tail = f'{"null" if age is None else age},"stale":{"null" if stale is None else json.dumps(stale)}}}'
    return Response(rendered(rows[0], level) + tail.encode(), media_type="application/json")


@router.get("/api/predictions/{product}", response_model=list[PredictionResult], responses=ERRORS)
async def predictions(product: ProductPath, state: State) -> list[PredictionResult]:
    state.known(product)
    age, stale = state.data_age_s(product), state.stale(product)
    return [PredictionResult.of(r, 0.8, age, stale) for r in state.reader.latest_predictions(product)]


@lru_cache(maxsize=64)
def rendered(row: PredictionRow, level: float) -> bytes:
    """A prediction's JSON up to its last fields, ``data_age_s`` and ``stale``, which change per request."""
    body = PredictionResult.of(row, level, None).model_dump_json(exclude={"data_age_s", "stale"})
    return f'{body[:-1]},"data_age_s":'.encode()
