"""A catalogue of malformed and hostile feed frames, each with the rejection it must cause.

The replay server injects these (``--malformed-every``) and the tests send every kind: one list, so
what is tested is what the demo and benchmarks throw at the ingester too. ``reason`` is the
``cryptopi_feed_rejected_total`` label the frame must increment (``None``: counted as an unknown
message type, which is normal and ignored).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.candles import Trade
from appliance.replay.tape import match_frame


@dataclass(frozen=True, slots=True)
class HostileFrame:
    kind: str
    payload: str | bytes
    reason: str | None
    #: True when the frame ends the connection (the client must reconnect and repair).
    closes: bool = False
    #: Send bytes as a *text* frame (invalid UTF-8); None lets the payload's type decide.
    text: bool | None = None


def _match(last: Trade, **changes: object) -> str:
    frame = match_frame(last, "match")
    frame["trade_id"] = last.trade_id + 1
    for key, value in changes.items():
        if value is _DROP:
            frame.pop(key, None)
        else:
            frame[key] = value
    return json.dumps(frame)


_DROP = object()


def _heartbeat(last: Trade, **changes: object) -> str:
    frame: dict[str, object] = {
        "type": "heartbeat",
        "last_trade_id": last.trade_id,
        "product_id": last.product,
        "sequence": 1,
        "time": "2026-01-01T00:00:00.000000Z",
    }
    frame.update(changes)
    return json.dumps({k: v for k, v in frame.items() if v is not _DROP})


_Builder = Callable[[Trade], "str | bytes"]

_CATALOGUE: list[tuple[str, str | None, _Builder]] = [
    ("not_json", "malformed", lambda t: "{not json"),
    ("empty_text", "malformed", lambda t: ""),
    ("json_array", "malformed", lambda t: "[]"),
    ("json_number", "malformed", lambda t: "42"),
    ("json_string", "malformed", lambda t: '"match"'),
    ("json_null", "malformed", lambda t: "null"),
    ("no_type", "malformed", lambda t: '{"trade_id": 1}'),
    ("type_not_string", "malformed", lambda t: '{"type": 5}'),
    ("unknown_type", None, lambda t: '{"type": "auction", "product_id": "BTC-USD"}'),
    ("match_without_trade_id", "malformed", lambda t: _match(t, trade_id=_DROP)),
    ("trade_id_as_string", "malformed", lambda t: _match(t, trade_id=str(t.trade_id + 1))),
    ("trade_id_negative", "malformed", lambda t: _match(t, trade_id=-7)),
    ("trade_id_float", "malformed", lambda t: _match(t, trade_id=t.trade_id + 1.5)),
    ("trade_id_bool", "malformed", lambda t: _match(t, trade_id=True)),
    ("price_nan", "malformed", lambda t: _match(t, price="NaN")),
    ("price_infinity", "malformed", lambda t: _match(t, price="Infinity")),
    ("price_negative", "malformed", lambda t: _match(t, price="-5.00")),
    ("price_zero", "malformed", lambda t: _match(t, price="0.00")),
    ("price_as_number", "malformed", lambda t: _match(t, price=t.price)),
    ("price_exponent", "malformed", lambda t: _match(t, price="6.3e4")),
    ("size_negative", "malformed", lambda t: _match(t, size="-0.10000000")),
    ("size_nan", "malformed", lambda t: _match(t, size="nan")),
    ("size_zero", "malformed", lambda t: _match(t, size="0.00000000")),
    ("size_too_precise", "malformed", lambda t: _match(t, size="0.000000001")),
    ("size_huge", "malformed", lambda t: _match(t, size="1" + "0" * 400)),
    ("time_garbage", "malformed", lambda t: _match(t, time="yesterday")),
    ("time_missing", "malformed", lambda t: _match(t, time=_DROP)),
    ("time_without_zone", "malformed", lambda t: _match(t, time="2026-07-07T22:58:17.164892")),
    ("side_invalid", "malformed", lambda t: _match(t, side="up")),
    ("product_null", "malformed", lambda t: _match(t, product_id=None)),
    ("product_huge", "malformed", lambda t: _match(t, product_id="X" * 10_000)),
    ("product_unknown", "unknown_product", lambda t: _match(t, product_id="DOGE-EUR")),
    (
        "duplicate_trade_altered",
        "duplicate",
        lambda t: _match(replace(t, trade_id=t.trade_id - 1), price="1.00"),
    ),
    (
        "out_of_order_old_trade",
        "duplicate",
        lambda t: _match(replace(t, trade_id=t.trade_id - 6), size="99.0"),
    ),
    ("trade_id_far_ahead", "unconfirmed", lambda t: _match(replace(t, trade_id=t.trade_id + 10**9))),
    ("heartbeat_id_far_ahead", "unconfirmed", lambda t: _heartbeat(t, last_trade_id=t.trade_id + 10**9)),
    ("heartbeat_id_string", "malformed", lambda t: _heartbeat(t, last_trade_id="x")),
    ("heartbeat_id_negative", "malformed", lambda t: _heartbeat(t, last_trade_id=-1)),
    ("heartbeat_without_product", "malformed", lambda t: _heartbeat(t, product_id=_DROP)),
    ("duplicate_keys", "malformed", lambda t: '{"type": "match", "type": "heartbeat"}'),
    ("deep_nesting", "malformed", lambda t: "[" * 100_000 + "]" * 100_000),
    ("subscriptions_garbage", "malformed", lambda t: '{"type": "subscriptions", "channels": "all"}'),
    ("server_error", "server_error", lambda t: '{"type": "error", "message": "replay says no"}'),
    ("binary_frame", "binary_frame", lambda t: b"\x00\x01binary"),
]

#: Frames that end the connection; sent last by tests that send the whole catalogue on one connection.
_CLOSING: list[tuple[str, str, _Builder]] = [
    ("invalid_utf8", "protocol_error", lambda t: b"\xff\xfe{}"),  # sent as a *text* frame
    ("huge_frame", "frame_too_large", lambda t: '{"type":"match","pad":"' + "x" * (2 << 20) + '"}'),
]


def catalogue(last: Trade) -> list[HostileFrame]:
    """Every kind, built around ``last`` (the newest trade the client has seen for its product)."""
    frames = [HostileFrame(kind, build(last), reason) for kind, reason, build in _CATALOGUE]
    frames += [
        HostileFrame(kind, build(last), reason, closes=True, text=True) for kind, reason, build in _CLOSING
    ]
    return frames


def nth(n: int, last: Trade) -> HostileFrame:
    """The n-th kind (cyclic) of the frames that leave the connection open: what fault injection sends."""
    kind, reason, build = _CATALOGUE[n % len(_CATALOGUE)]
    return HostileFrame(kind, build(last), reason)
