"""Wire messages against the real captures: everything real parses, the wrong shapes do not."""

import json

from appliance.coinbase.messages import (
    HeartbeatMessage,
    MatchMessage,
    Rejected,
    SubscriptionsMessage,
    parse_feed_frame,
    parse_trade_rows,
)
from tests.conftest import CAPTURE


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
    rows = [
        {"trade_id": 5, "side": "buy", "size": "0.1", "price": "100.5", "time": "2026-01-01T00:00:00.5Z"},
        {"trade_id": "6", "side": "buy", "size": "0.1", "price": "100.5", "time": "2026-01-01T00:00:01Z"},
        {"trade_id": 7, "side": "buy", "size": "-1", "price": "100.5", "time": "2026-01-01T00:00:01Z"},
        "garbage",
    ]
    trades, problems = parse_trade_rows("BTC-USD", rows)
    assert [t.trade_id for t in trades] == [5]
    assert len(problems) == 3
    assert any("trade_id" in p for p in problems)
    assert parse_trade_rows("BTC-USD", {"message": "nope"}) == ([], ["expected a JSON list, got dict"])
