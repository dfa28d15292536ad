"""Coinbase Exchange wire messages, validated at the edge.

Everything from the network goes through :func:`parse_feed_frame` or :func:`parse_trade_rows`, which
turn bytes into typed values or a :class:`Rejected` that names the reason: the ingester never sees
an unchecked field. Prices and sizes must be plain positive decimal strings (Coinbase's format);
ids must be JSON integers; times must carry a zone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from appliance.candles import PRODUCT_PATTERN, Trade, parse_price, parse_size_e8, to_time_us

T = TypeVar("T")

ProductId = Annotated[str, StringConstraints(pattern=PRODUCT_PATTERN)]


def _decimal_string(parse: Callable[[str], T]) -> Callable[[object], T]:
    def validate(value: object) -> T:
        if not isinstance(value, str):
            raise ValueError("must be a decimal string")  # Coinbase never sends JSON numbers here
        return parse(value)

    return validate


Price = Annotated[float, BeforeValidator(_decimal_string(parse_price))]
SizeE8 = Annotated[int, BeforeValidator(_decimal_string(parse_size_e8))]
TradeId = Annotated[StrictInt, Field(gt=0)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class MatchMessage(_Message):
    type: Literal["match", "last_match"]
    trade_id: TradeId
    product_id: ProductId
    price: Price
    size: SizeE8
    side: Literal["buy", "sell"]
    time: AwareDatetime

    def trade(self) -> Trade:
        return Trade(self.product_id, self.trade_id, self.price, self.size, to_time_us(self.time), self.side)


class HeartbeatMessage(_Message):
    type: Literal["heartbeat"]
    product_id: ProductId
    #: 0 means "unknown" (clients have seen it), never "no trades".
    last_trade_id: Annotated[StrictInt, Field(ge=0)]
    time: AwareDatetime


class Channel(_Message):
    name: str
    product_ids: list[str]


class SubscriptionsMessage(_Message):
    type: Literal["subscriptions"]
    channels: list[Channel]


class ErrorMessage(_Message):
    type: Literal["error"]
    message: str
    reason: str = ""


FeedMessage = Annotated[
    MatchMessage | HeartbeatMessage | SubscriptionsMessage | ErrorMessage, Field(discriminator="type")
]
_FEED = TypeAdapter[FeedMessage](FeedMessage)


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a frame or row was skipped: ``reason`` is a metric label, ``detail`` a log line."""

    reason: Literal["malformed", "unknown_type", "binary_frame"]
    detail: str


def parse_feed_frame(
    frame: str | bytes,
) -> MatchMessage | HeartbeatMessage | SubscriptionsMessage | ErrorMessage | Rejected:
    if isinstance(frame, bytes):
        return Rejected("binary_frame", f"binary frame of {len(frame)} bytes")
    try:
        return _FEED.validate_json(frame)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        tag = first["input"].get("type") if isinstance(first["input"], dict) else None
        if first["type"] == "union_tag_invalid" and isinstance(tag, str):
            return Rejected("unknown_type", tag[:40])
        return Rejected("malformed", _summarise(exc))


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "frame"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class TradeRow(_Message):
    """One row of ``GET /products/{id}/trades``."""

    trade_id: TradeId
    price: Price
    size: SizeE8
    side: Literal["buy", "sell"]
    time: AwareDatetime


_TRADE_ROW = TypeAdapter(TradeRow)


def parse_trade_rows(product: str, rows: Any) -> tuple[list[Trade], list[str]]:
    """Valid trades of a REST page and one message per row that was not."""
    if not isinstance(rows, list):
        return [], [f"expected a JSON list, got {type(rows).__name__}"]
    trades, problems = [], []
    for row in rows:
        try:
            r = _TRADE_ROW.validate_python(row)
        except ValidationError as exc:
            problems.append(_summarise(exc))
            continue
        trades.append(Trade(product, r.trade_id, r.price, r.size, to_time_us(r.time), r.side))
    return trades, problems
