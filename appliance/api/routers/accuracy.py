"""Realized accuracy of the predictions that came due, beside persistence on the same candles."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from appliance.api.errors import ERRORS
from appliance.api.schemas import MODEL_PATTERN, AccuracyOut, ProductPath
from appliance.api.state import State
from appliance.predictor import scores

router = APIRouter(tags=["accuracy"])
HORIZON = "Horizon: 3600 (the next hour) or 900 (the next 15 minutes)"


@router.get("/api/accuracy/{product}", response_model=list[AccuracyOut], responses=ERRORS)
async def accuracy(
    product: ProductPath,
    state: State,
    model: Annotated[str | None, Query(pattern=MODEL_PATTERN)] = None,
    window: Annotated[int, Query(ge=1, le=10_000, description="Newest predictions scored")] = 168,
    granularity: Annotated[int, Query(description=HORIZON)] = 3600,
) -> list[AccuracyOut]:
    state.known(product)
    state.known_horizon(granularity)
    if model is not None:
        state.known_model(product, model, granularity)
    models = [model] if model is not None else state.inference.models_of(product, granularity)
    return [AccuracyOut(**vars(a)) for a in scores(state.reader, product, models, window, granularity)]
