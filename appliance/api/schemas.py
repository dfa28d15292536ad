"""What the API answers: pydantic models, so the OpenAPI schema documents itself."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, Field

from appliance.calibration import DAY
from appliance.candles import PRODUCT_PATTERN, CandleRow, quote_currency
from appliance.health import Problem
from appliance.predictions import Calibration, PredictionRow

MODEL_PATTERN = r"^[a-z0-9_]{1,32}$"
ProductPath = Annotated[str, Path(pattern=PRODUCT_PATTERN, examples=["BTC-USD"])]


class Interval(BaseModel):
    lower: float
    upper: float
    level: float = Field(description="Share of outcomes the interval is calibrated to contain")


class PredictQuery(BaseModel):
    product: str = Field(pattern=PRODUCT_PATTERN, examples=["BTC-USD"])
    model: str = Field("cnn", pattern=MODEL_PATTERN)
    at: str | None = Field(None, description="ISO-8601, epoch seconds or 'now' (default: latest)")
    level: float = Field(0.8, description="Interval level: 0.8 or 0.95")
    granularity: int = Field(3600, description="Horizon: 3600 (the next hour) or 900 (the next 15 minutes)")


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI query parameters from a model, for routes that validate their query themselves."""
    schema = model.model_json_schema()
    return [
        {"name": name, "in": "query", "required": name in schema.get("required", ()), "schema": field}
        | ({"description": field["description"]} if "description" in field else {})
        for name, field in schema["properties"].items()
    ]


METHODS = {
    "training": "its own models' intervals, calibrated on its training period",
    "device": "a pooled model set's, calibrated on this device from the product's own history",
    "pooled": "a pooled model set's, as calibrated on the products it was trained on",
}


class IntervalCalibration(BaseModel):
    method: Literal["training", "device", "pooled"] = Field(
        description="; ".join(f"'{k}': {v}" for k, v in METHODS.items())
    )
    calibrated_at: datetime | None = Field(None, description="When the device calibrated them ('device')")
    note: str | None = Field(None, description="Why 'pooled' (history too short, not calibrated yet)")


class PredictionResult(BaseModel):
    product: str
    model: str
    model_version: str
    pooled: bool = Field(description="Served by the pooled model set (the product has no models of its own)")
    currency: str = Field(description="What prices are in: the product's quote currency (BTC-EUR: EUR)")
    calibration: IntervalCalibration = Field(description="How the intervals were calibrated")
    granularity: int = Field(description="Candle length in seconds")
    as_of: datetime = Field(description="Close of the candle the prediction starts from")
    target_time: datetime = Field(description="Close of the predicted candle")
    predicted_close: float
    interval: Interval
    last_close: float
    realized_close: float | None = Field(None, description="Set once the predicted candle has closed")
    data_age_s: float | None = Field(description="Seconds since the newest trade the appliance holds")
    stale: str | None = Field(
        None,
        description="Why the data behind it may be out of date (a halt, Coinbase unreachable); null if fresh",
    )

    @classmethod
    def of(
        cls, row: PredictionRow, level: float, data_age_s: float | None, stale: str | None = None
    ) -> PredictionResult:
        lower, upper = (row.lower_80, row.upper_80) if level == 0.8 else (row.lower_95, row.upper_95)
        return cls(
            product=row.product, model=row.model, model_version=row.model_version,
            pooled=row.calibration != "training", currency=quote_currency(row.product),
            calibration=IntervalCalibration(method=row.calibration, calibrated_at=utc(row.calibrated_at),
                                            note=row.calibration_note),
            granularity=row.granularity, as_of=datetime.fromtimestamp(row.as_of, UTC),
            target_time=datetime.fromtimestamp(row.target_time, UTC), predicted_close=row.predicted_close,
            interval=Interval(lower=lower, upper=upper, level=level), last_close=row.last_close,
            data_age_s=data_age_s, realized_close=row.realized_close, stale=stale,
        )  # fmt: skip


def utc(epoch_s: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch_s, UTC) if epoch_s is not None else None


class CandleOut(BaseModel):
    time: datetime = Field(description="Candle open time")
    open: float
    high: float
    low: float
    close: float
    volume: float

    @classmethod
    def of(cls, r: CandleRow) -> CandleOut:
        return cls(time=datetime.fromtimestamp(r.start, UTC), open=r.open, high=r.high, low=r.low,
                   close=r.close, volume=r.volume)  # fmt: skip


class CalibrationHealth(IntervalCalibration):
    candles: int | None = Field(None, description="The product's own candles the device calibrated on")
    first: datetime | None = Field(None, description="Open time of the first and last of them")
    last: datetime | None = None
    next_after: datetime | None = Field(
        None, description="Recalibrated once the market is past this (a day after its newest candle)"
    )

    @classmethod
    def of(cls, c: Calibration) -> CalibrationHealth:
        device = c.method == "device"
        return cls(
            method=c.method, calibrated_at=utc(c.calibrated_at), note=c.reason,
            candles=c.rows if device else None, first=utc(c.first), last=utc(c.last),
            next_after=utc(c.through + DAY) if c.through is not None else None,
        )  # fmt: skip


class HorizonHealth(BaseModel):
    model_version: str | None
    pooled: bool = Field(description="Served by the pooled model set (no version of this product's own)")
    models: list[str]
    prediction: Literal["ok"] | str = Field(description="'ok', or why there is no fresh prediction")
    calibration: CalibrationHealth | None = Field(
        description="How its intervals are calibrated (None: no models)"
    )


class ProductHealth(BaseModel):
    data_age_s: float | None
    model_version: str | None = Field(description="The hourly models' version")
    models: list[str] = Field(description="The hourly models")
    prediction: Literal["ok"] | str = Field(
        description="'ok', or why there is no fresh prediction at some horizon (each named)"
    )
    horizons: dict[int, HorizonHealth] = Field(description="Per horizon (candle seconds)")


class ProblemOut(BaseModel):
    component: str = Field(description="Which part: coinbase, mqtt, storage, history, models, ...")
    subject: str | None = Field(description="A product, a file, ... (none: the component as a whole)")
    message: str
    since: datetime
    detail: dict[str, Any] = Field(description="What changes between retries: last error, next attempt")

    @classmethod
    def of(cls, p: Problem) -> ProblemOut:
        return cls(component=p.component, subject=p.subject, message=p.message,
                   since=datetime.fromtimestamp(p.since, UTC), detail=p.detail)  # fmt: skip


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    build: str = Field(description="Image build: version and commit ('dev' outside an image)")
    ingest_connected: bool
    problems: list[ProblemOut] = Field(description="Everything wrong right now, oldest first")
    incidents: list[ProblemOut] = Field(
        description="Trouble dealt with since the process started (a corrupt store replaced, ...), "
        "oldest first"
    )
    products: dict[str, ProductHealth]


class AccuracyOut(BaseModel):
    model: str
    predictions: int = Field(description="Predictions whose candle has closed, within the window")
    mae: float | None
    persistence_mae: float | None = Field(description="'Next close = last close' on the same hours")
    skill: float | None = Field(description="1 - mae / persistence_mae")
    coverage_80: float | None
    coverage_95: float | None


class ErrorOut(BaseModel):
    detail: str
