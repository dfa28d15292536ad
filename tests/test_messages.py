"""Wire messages against the real captures: everything real parses, the wrong shapes do not."""

import json
from collections import Counter
from pathlib import Path

import pytest

from appliance.coinbase.messages import (
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
