"""``python -m appliance replay``: its arguments, and the tape and server they describe."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from appliance.candle_csv import CandleCsvError
from appliance.candles import US
from appliance.helpers.cli import cli_time
from appliance.replay.server import Faults, ReplayServer, serve_forever
from appliance.replay.tape import Halt, load_tape, shift_tape


def _candles_spec(value: str) -> tuple[str, Path]:
    product, sep, path = value.partition("=")
    if not sep or not product or not path:
        raise argparse.ArgumentTypeError(f"expected PRODUCT=FILE.csv, got {value!r}")
    return product, Path(path)


def _listed(value: str) -> tuple[str, str]:
    product, sep, status = value.partition("=")
    if not sep or not product or status not in ("online", "offline", "internal", "delisted"):
        raise argparse.ArgumentTypeError(f"expected PRODUCT=online|offline|internal|delisted, got {value!r}")
    return product, status


def _halt(value: str) -> Halt:
    product, sep, span = value.partition("=")
    start, comma, end = span.partition(",")
    if not sep or not product or not comma:
        raise argparse.ArgumentTypeError(f"expected PRODUCT=FROM,TO, got {value!r}")
    lo, hi = cli_time(start), cli_time(end)
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"{value!r}: the halt ends before it starts")
    return Halt(product, lo * US, hi * US)


def _range(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition(",")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {value!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError("need 1 <= MIN <= MAX")
    return a, b


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture", type=Path, action="append", default=[], help="raw feed capture (.jsonl)")
    p.add_argument(
        "--candles",
        type=_candles_spec,
        action="append",
        default=[],
        metavar="PRODUCT=FILE.csv",
        help="real candles, replayed as trades that rebuild them exactly",
    )
    p.add_argument("--from", dest="start", type=cli_time, help="first tape time used")
    p.add_argument("--to", dest="end", type=cli_time, help="tape time where the tape stops")
    p.add_argument("--start-at", type=cli_time, help="market clock at start: earlier trades have happened")
    p.add_argument(
        "--at-now",
        action="store_true",
        help="move the tape (by whole hours) so that the market clock starts at the present",
    )
    p.add_argument("--trades-per-candle", type=_range, default=(4, 10), metavar="MIN,MAX",
                   help="trades generated per candle of a --candles tape")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8765, help="port of the feed and REST")
    p.add_argument("--speed", type=float, default=0.0, help="tape seconds per second; 0 = as fast as read")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="seconds between per-product heartbeats")
    p.add_argument("--rest-rate-limit", type=float, default=10.0, help="requests/s before HTTP 429; 0 = off")
    p.add_argument("--drop-every", type=int, default=0, help="drop a connection every N messages")
    p.add_argument("--silence-every", type=int, default=0, help="go silent every N messages ...")
    p.add_argument("--silence-s", type=float, default=0.0, help="... for this many seconds")
    p.add_argument("--omit-rate", type=float, default=0.0, help="fraction of trades not sent (gaps)")
    p.add_argument("--duplicate-rate", type=float, default=0.0, help="fraction of trades sent twice")
    p.add_argument("--malformed-every", type=int, default=0, help="a hostile frame every N messages")
    p.add_argument("--seed", type=int, default=0, help="seed of the trades generated from candles")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault injection")
    p.add_argument(
        "--subscribe-error",
        choices=("keep-open", "close"),
        default="keep-open",
        help="after refusing a subscribe naming an unknown product: keep the socket or close it",
    )
    p.add_argument("--refusal-without-product", action="store_true",
                   help="the refusal names no product (Coinbase has been seen doing so)")  # fmt: skip
    p.add_argument("--list", dest="listed", type=_listed, action="append", default=[],
                   metavar="PRODUCT=STATUS", help="listed by GET /products, not on the tape")  # fmt: skip
    p.add_argument("--halt", type=_halt, action="append", default=[], metavar="PRODUCT=FROM,TO",
                   help="no trades in this tape time span (heartbeats go on)")  # fmt: skip
    p.add_argument(
        "--rest-lag-s", type=float, default=0.0, help="REST learns of a trade this long after the feed"
    )
    p.add_argument(
        "--rest-error-rate", type=float, default=0.0, help="fraction of REST answers: 503 or HTML 520"
    )
    p.add_argument(
        "--rest-stall-rate", type=float, default=0.0, help="fraction of REST answers that stall ..."
    )
    p.add_argument("--rest-stall-s", type=float, default=5.0, help="... this long (past a client's timeout)")
    p.add_argument("--slow-consumer-s", type=float, default=0.0,
                   help="drop (ErrSlowConsume) a client backed up this long; 0 = never")  # fmt: skip
    p.add_argument(
        "--deflate", action="store_true", help="negotiate permessage-deflate when a client offers it"
    )


def server_from(args: argparse.Namespace) -> ReplayServer | None:
    """The server the arguments describe, or None (and a message on stderr) if they describe none."""
    if not args.capture and not args.candles:
        print("replay needs at least one --capture or --candles source", file=sys.stderr)
        return None
    try:
        trades = load_tape(
            captures=args.capture,
            candles=args.candles,
            start=args.start,
            end=args.end,
            trades_per_candle=args.trades_per_candle,
            seed=args.seed,
        )
    except (OSError, CandleCsvError, ValueError) as exc:
        print(f"cannot build the tape: {exc}", file=sys.stderr)
        return None
    start_at, halts = args.start_at, args.halt
    if args.at_now:  # a demo that reads like a live appliance: fresh data, real prices
        anchor = start_at if start_at is not None else min(t.time_us for t in trades) // US
        offset = (int(time.time()) - anchor) // 3600 * 3600
        trades = shift_tape(trades, offset)
        start_at = anchor + offset
        halts = [Halt(h.product, h.start_us + offset * US, h.end_us + offset * US) for h in halts]
    faults = Faults(
        args.drop_every,
        args.silence_every,
        args.silence_s,
        args.omit_rate,
        args.duplicate_rate,
        args.malformed_every,
        args.fault_seed,
        subscribe_error="close" if args.subscribe_error == "close" else "keep_open",
        refusal_names_product=not args.refusal_without_product,
        rest_lag_s=args.rest_lag_s,
        rest_error_rate=args.rest_error_rate,
        rest_stall_rate=args.rest_stall_rate,
        rest_stall_s=args.rest_stall_s,
        slow_consumer_s=args.slow_consumer_s,
        deflate=args.deflate,
    )
    return ReplayServer(
        trades,
        speed=args.speed,
        start_at_us=start_at * US if start_at else None,
        heartbeat_s=args.heartbeat_s,
        faults=faults,
        rest_rate_limit=args.rest_rate_limit,
        listed=dict(args.listed),
        halts=halts,
    )


async def serve(server: ReplayServer, args: argparse.Namespace) -> None:
    await serve_forever(server, args.host, args.port)
