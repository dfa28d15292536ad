"""Wire messages against the real captures: everything real parses, the wrong shapes do not."""

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.coinbase.messages import (
    ErrorMessage,
    HeartbeatMessage,
    MatchMessage,
    Rejected,
    SubscriptionsMessage,
    parse_feed_frame,
    parse_product_rows,
    parse_trade_rows,
)
from tests.conftest import ADVANCED_TRADE_CAPTURE, CAPTURE, RAW_CAPTURE_2021, RAW_CAPTURE_2026


@pytest.mark.parametrize(
    ("capture", "expected"),
    [
        (RAW_CAPTURE_2026, {"subscriptions": 1, "snapshot": 2, "l2update": 1898, "match": 435,
                            "last_match": 2, "heartbeat": 118}),
        (RAW_CAPTURE_2021, {"subscriptions": 3, "snapshot": 10, "l2update": 9719, "ticker": 107,
                            "match": 97, "last_match": 10}),
    ],
)  # fmt: skip
def test_every_frame_of_the_raw_exchange_captures_is_taken(capture: Path, expected: dict[str, int]) -> None:
    """Every real frame: ours parsed to values, other channels known as other types, none malformed."""
    kinds: Counter[str] = Counter()
    for line in capture.read_text().splitlines():
        msg = parse_feed_frame(line)
        if isinstance(msg, Rejected):
            assert msg.reason == "unknown_type", (msg, line[:120])
            kinds[msg.detail] += 1
        else:
            kinds[msg.type] += 1
            if isinstance(msg, MatchMessage):  # values exact: the decimal text survives the round trip
                raw = json.loads(line)
                t = msg.trade()
                assert (t.trade_id, t.price, t.size) == (
                    raw["trade_id"],
                    float(raw["price"]),
                    f"{float(raw['size']):.8f}",
                )
    assert kinds == expected


def test_advanced_trade_frames_are_told_apart_not_malformed() -> None:
    """Coinbase's other protocol, from a real capture: every frame is recognised as that protocol."""
    lines = ADVANCED_TRADE_CAPTURE.read_text().splitlines()
    got = [parse_feed_frame(line) for line in lines]
    assert len(got) == 255
    assert {r.reason for r in got if isinstance(r, Rejected)} == {"advanced_trade"}
    assert all(isinstance(r, Rejected) for r in got)


MATCH = {"type": "match", "trade_id": 1052119289, "product_id": "BTC-USD", "price": "63514.6",
         "size": "0.001", "side": "sell", "time": "2026-07-07T22:58:17.164892Z"}  # fmt: skip
ROW = {"trade_id": 5, "side": "sell", "size": "0.1", "price": "100.5", "time": "2026-01-01T00:00:00.5Z"}


def frame(**fields: Any) -> str:
    return json.dumps(MATCH | fields)


def test_every_frame_of_the_real_capture_parses() -> None:
    kinds: dict[str, int] = {}
    for line in CAPTURE.read_text().splitlines():
        msg = parse_feed_frame(line)
        assert not isinstance(msg, Rejected), (msg, line[:120])
        kinds[msg.type] = kinds.get(msg.type, 0) + 1
    assert kinds == {"subscriptions": 1, "last_match": 2, "match": 435, "heartbeat": 118}


def test_trade_ids_step_by_one_per_product_in_the_capture() -> None:
    """The protocol fact gap detection rests on (PROTOCOLS.md), checked on real data."""
    ids: dict[str, list[int]] = {}
    for line in CAPTURE.read_text().splitlines():
        msg = parse_feed_frame(line)
        if isinstance(msg, MatchMessage):
            ids.setdefault(msg.product_id, []).append(msg.trade_id)
    for seq in ids.values():
        assert seq == list(range(seq[0], seq[0] + len(seq)))


def test_match_becomes_an_exact_trade() -> None:
    line = next(x for x in CAPTURE.read_text().splitlines() if '"type":"match"' in x)
    msg = parse_feed_frame(line)
    assert isinstance(msg, MatchMessage)
    t = msg.trade()
    raw = json.loads(line)
    assert (t.trade_id, t.price, t.product) == (raw["trade_id"], float(raw["price"]), raw["product_id"])
    assert t.size == f"{float(raw['size']):.8f}"


def test_heartbeat_and_subscriptions() -> None:
    lines = CAPTURE.read_text().splitlines()
    assert isinstance(parse_feed_frame(lines[0]), SubscriptionsMessage)
    hb = parse_feed_frame(next(x for x in lines if '"heartbeat"' in x and "last_trade_id" in x))
    assert isinstance(hb, HeartbeatMessage)
    assert hb.last_trade_id > 0


def test_unknown_types_are_unknown_not_malformed() -> None:
    """Other channels (ticker, l2update) appear in real captures: ignored, never an error."""
    ticker = (
        '{"type":"ticker","sequence":1,"product_id":"BTC-USD","price":"63519.29","open_24h":"1",'
        '"time":"2026-07-07T22:58:16.833065Z"}'
    )
    got = parse_feed_frame(ticker)
    assert isinstance(got, Rejected)
    assert got.reason == "unknown_type"


def test_rest_trade_rows_skip_bad_rows_with_a_reason() -> None:
    """REST trade ids may be integers or numeric strings (both seen); anything else is a bad row."""
    row = {"side": "buy", "size": "0.1", "price": "100.5", "time": "2026-01-01T00:00:01Z"}
    rows = [
        {"trade_id": 5, "side": "buy", "size": "0.1", "price": "100.5", "time": "2026-01-01T00:00:00.5Z"},
        {**row, "trade_id": "6"},
        {**row, "trade_id": 7, "size": "-1"},
        {**row, "trade_id": "-8"},
        {**row, "trade_id": "9.0"},
        {**row, "trade_id": True},
        {**row, "trade_id": "\uff11\uff10"},  # full-width digits: digits to str.isdigit, not to Coinbase
        "garbage",
    ]
    trades, problems = parse_trade_rows("BTC-USD", rows)
    assert [t.trade_id for t in trades] == [5, 6]
    assert len(problems) == 6
    assert sum("trade_id" in p for p in problems) == 4
    assert parse_trade_rows("BTC-USD", {"message": "nope"}) == ([], ["expected a JSON list, got dict"])


@pytest.mark.parametrize("side", ["buy", "sell"])
def test_both_sides_parse_from_the_feed_and_from_rest(side: str) -> None:
    msg = parse_feed_frame(frame(side=side))
    assert isinstance(msg, MatchMessage)
    assert msg.trade().side == side
    trades, problems = parse_trade_rows("BTC-USD", [ROW | {"side": side}])
    assert (problems, [t.side for t in trades]) == ([], [side])


def test_trade_ids_start_at_one() -> None:
    """Coinbase numbers each product's trades 1, 2, 3...: 1 is a trade, 0 and below are not."""
    first = parse_feed_frame(frame(trade_id=1))
    assert isinstance(first, MatchMessage)
    assert first.trade_id == 1
    for bad in (0, -1):
        got = parse_feed_frame(frame(trade_id=bad))
        assert got == Rejected("malformed", "match.trade_id: Input should be greater than 0")
    trades, problems = parse_trade_rows("BTC-USD", [ROW | {"trade_id": 1}, ROW | {"trade_id": 0}])
    assert [t.trade_id for t in trades] == [1]
    assert problems == ["trade_id: Input should be greater than 0"]


def test_a_heartbeat_may_know_of_no_trade_yet() -> None:
    beat = {"type": "heartbeat", "product_id": "BTC-USD", "sequence": 1, "time": "2026-07-07T22:58:17Z"}
    zero = parse_feed_frame(json.dumps(beat | {"last_trade_id": 0}))
    assert isinstance(zero, HeartbeatMessage)
    assert zero.last_trade_id == 0
    negative = parse_feed_frame(json.dumps(beat | {"last_trade_id": -1}))
    assert negative == Rejected(
        "malformed", "heartbeat.last_trade_id: Input should be greater than or equal to 0"
    )


def test_error_messages_parse_with_or_without_a_reason() -> None:
    with_reason = parse_feed_frame(
        '{"type":"error","message":"Failed to subscribe","reason":"BTC-XYZ is not a valid product"}'
    )
    assert with_reason == ErrorMessage(
        type="error", message="Failed to subscribe", reason="BTC-XYZ is not a valid product"
    )
    without = parse_feed_frame('{"type":"error","message":"Failed to subscribe"}')
    assert isinstance(without, ErrorMessage)
    assert without.reason == ""


@pytest.mark.parametrize(
    ("raw", "rejected"),
    [
        (b'{"type":"match"}', Rejected("binary_frame", "binary frame of 16 bytes")),
        ("not json", Rejected("malformed", "frame: Invalid JSON: expected ident at line 1 column 2")),
        ("[1]", Rejected("malformed", "frame: Input should be an object")),
        (frame(price=63514.6), Rejected("malformed", "match.price: Value error, must be a decimal string")),
        (frame(size=1), Rejected("malformed", "match.size: Value error, must be a decimal string")),
        (frame(side="up"), Rejected("malformed", "match.side: Input should be 'buy' or 'sell'")),
        (json.dumps({k: v for k, v in MATCH.items() if k != "price"}),
         Rejected("malformed", "match.price: Field required")),
        ('{"type":"subscriptions","channels":[{"name":"matches"}]}',
         Rejected("malformed", "subscriptions.channels.0.product_ids: Field required")),
        ('{"type":"' + "t" * 100 + '"}', Rejected("unknown_type", "t" * 40)),
        ('{"type":"ticker"}', Rejected("unknown_type", "ticker")),
    ],
    ids=["binary", "not JSON", "not an object", "price a number", "size a number", "side", "price missing",
         "nested field",
         "long unknown type", "unknown type"],
)  # fmt: skip
def test_rejections_name_the_reason_and_the_field(raw: str | bytes, rejected: Rejected) -> None:
    assert parse_feed_frame(raw) == rejected


def test_a_frame_wrong_everywhere_is_summarised_by_its_first_three_errors() -> None:
    got = parse_feed_frame(frame(trade_id="x", product_id="bad", price=1, size=1, side="up", time="x"))
    assert isinstance(got, Rejected)
    assert got.reason == "malformed"
    assert [part.split(":")[0] for part in got.detail.split("; ")] == [
        "match.trade_id",
        "match.product_id",
        "match.price",
    ]


def test_parsed_messages_are_immutable() -> None:
    msg = parse_feed_frame(frame())
    assert isinstance(msg, MatchMessage)
    with pytest.raises(ValidationError, match="frozen"):
        msg.trade_id = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Rejected("malformed", "x").detail = "y"  # type: ignore[misc]


def test_product_rows_read_status_and_the_halt_flags() -> None:
    """The shape of a real ``GET /products`` row (public client code), and what each flag means here."""
    row = {"id": "BTC-USD", "base_currency": "BTC", "quote_currency": "USD", "quote_increment": "0.01",
           "base_increment": "0.00000001", "display_name": "BTC-USD", "min_market_funds": "1",
           "margin_enabled": False, "post_only": False, "limit_only": False, "cancel_only": False,
           "status": "online", "status_message": "", "trading_disabled": False, "fx_stablecoin": False,
           "max_slippage_percentage": "0.02000000", "auction_mode": False,
           "high_bid_limit_percentage": ""}  # fmt: skip
    rows, problems = parse_product_rows(
        [row, {**row, "id": "ETH-USD", "trading_disabled": True, "cancel_only": True},
         {**row, "id": "LUNA-USD", "status": "delisted"}, {"id": "no status"}]
    )  # fmt: skip
    assert len(problems) == 1
    assert len(rows) == 3
    assert [r.halted_by for r in rows] == [(), ("trading_disabled", "cancel_only"), ("status delisted",)]
