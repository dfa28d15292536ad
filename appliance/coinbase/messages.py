"""Coinbase Exchange wire messages, validated at the edge.

Everything from the network goes through :func:`parse_feed_frame` or :func:`parse_trade_rows`, which
turn bytes into typed values or a :class:`Rejected` that names the reason: the ingester never sees
an unchecked field. Prices and sizes must be plain positive decimal strings (Coinbase's format);
feed ids must be JSON integers (REST trade ids may also be numeric strings, as some public clients
see them); times must carry a zone. A frame of Coinbase's *Advanced Trade* protocol (``channel`` and
``events``, no ``type``) is told apart, so a feed URL pointing there can be refused with a reason.
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
R = TypeVar("R", bound=BaseModel)

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


def _integer_or_numeric_string(value: object) -> object:
    """REST's ``trade_id``: a JSON integer, or a string of digits (seen in public client code)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        return int(value)
    return value


RestTradeId = Annotated[TradeId, BeforeValidator(_integer_or_numeric_string)]


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

    reason: Literal["malformed", "unknown_type", "binary_frame", "advanced_trade"]
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
        doc = first["input"]
        tag = doc.get("type") if isinstance(doc, dict) else None
        if first["type"] == "union_tag_invalid" and isinstance(tag, str):
            return Rejected("unknown_type", tag[:40])
        if first["type"] == "union_tag_not_found" and _is_advanced_trade(doc):
            return Rejected("advanced_trade", f"channel {str(doc['channel'])[:40]}")
        return Rejected("malformed", _summarise(exc))


def _is_advanced_trade(doc: object) -> bool:
    """The Advanced Trade envelope: ``{"channel": …, "timestamp": …, "sequence_num": …, "events": […]}``."""
    if not isinstance(doc, dict):
        return False
    return isinstance(doc.get("channel"), str) and isinstance(doc.get("events"), list)


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "frame"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class TradeRow(_Message):
    """One row of ``GET /products/{id}/trades``."""

    trade_id: RestTradeId
    price: Price
    size: SizeE8
    side: Literal["buy", "sell"]
    time: AwareDatetime


_TRADE_ROW = TypeAdapter(TradeRow)


def _parse_rows(adapter: TypeAdapter[R], rows: Any) -> tuple[list[R], list[str]]:
    """Each valid row of a REST list, and one message per row that was not."""
    if not isinstance(rows, list):
        return [], [f"expected a JSON list, got {type(rows).__name__}"]
    valid, problems = [], []
    for row in rows:
        try:
            valid.append(adapter.validate_python(row))
        except ValidationError as exc:
            problems.append(_summarise(exc))
    return valid, problems


def parse_trade_rows(product: str, rows: Any) -> tuple[list[Trade], list[str]]:
    """Valid trades of a REST page and one message per row that was not."""
    valid, problems = _parse_rows(_TRADE_ROW, rows)
    return [Trade(product, r.trade_id, r.price, r.size, to_time_us(r.time), r.side) for r in valid], problems


class ProductRow(_Message):
    """One row of ``GET /products`` (or the answer of ``GET /products/{id}``), the fields ingest reads.

    Documented (Exchange REST, "Get all known trading pairs"): ``status`` is one of online, offline,
    internal, delisted; ``trading_disabled`` restricts new orders and cancels; ``cancel_only`` accepts
    only cancels; ``auction_mode`` is set while a product re-opens by auction. All of them mean no
    matches for now. Missing flags read as false (older rows lack ``auction_mode``).
    """

    id: ProductId
    status: str
    status_message: str = ""
    trading_disabled: bool = False
    cancel_only: bool = False
    auction_mode: bool = False

    @property
    def halted_by(self) -> tuple[str, ...]:
        """What in Coinbase's own status says no trades happen now (empty: it trades)."""
        flags = [f for f in ("trading_disabled", "cancel_only", "auction_mode") if getattr(self, f)]
        return (*(() if self.status == "online" else (f"status {self.status}",)), *flags)


_PRODUCT_ROW = TypeAdapter(ProductRow)


def parse_product_rows(rows: Any) -> tuple[list[ProductRow], list[str]]:
    """Valid rows of ``GET /products`` and one message per row that was not."""
    return _parse_rows(_PRODUCT_ROW, rows)
