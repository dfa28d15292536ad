"""``python -m appliance``: the appliance's command line (subcommands in the freqtrade manner)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from appliance.candles import US
from appliance.helpers.cli import cli_time

log = logging.getLogger("appliance")


def _candles_spec(value: str) -> tuple[str, Path]:
    product, sep, path = value.partition("=")
    if not sep or not product or not path:
        raise argparse.ArgumentTypeError(f"expected PRODUCT=FILE.csv, got {value!r}")
    return product, Path(path)


def _range(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition(",")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {value!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError("need 1 <= MIN <= MAX")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="the appliance: ingest, predictions and the HTTP API (CRYPTOPI_* settings)")
    sub.add_parser("ingest", help="ingest live Coinbase trades into the store (CRYPTOPI_* settings)")
    sub.add_parser("healthcheck", help="exit 0 if the running appliance answers /health (container check)")

    p = sub.add_parser("backfill", help="load Coinbase REST candles into the store")
    p.add_argument("--product", required=True)
    p.add_argument("--granularity", type=int, default=3600)
    p.add_argument("--start", type=cli_time, required=True, help="ISO-8601 or epoch seconds")
    p.add_argument("--end", type=cli_time, help="ISO-8601 or epoch seconds (default: now)")

    p = sub.add_parser("import-csv", help="load a time,open,high,low,close,volume candle CSV into the store")
    p.add_argument("file", type=Path)
    p.add_argument("--product", required=True)
    p.add_argument("--granularity", type=int, required=True)

    p = sub.add_parser("replay", help="serve the Coinbase protocol offline from a trade tape")
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
    p.add_argument("--trades-per-candle", type=_range, default=(4, 10), metavar="MIN,MAX")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--speed", type=float, default=0.0, help="tape seconds per second; 0 = as fast as read")
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--rest-rate-limit", type=float, default=10.0, help="requests/s before HTTP 429; 0 = off")
    p.add_argument("--drop-every", type=int, default=0, help="drop a connection every N messages")
    p.add_argument("--silence-every", type=int, default=0, help="go silent every N messages ...")
    p.add_argument("--silence-s", type=float, default=0.0, help="... for this many seconds")
    p.add_argument("--omit-rate", type=float, default=0.0, help="fraction of trades not sent (gaps)")
    p.add_argument("--duplicate-rate", type=float, default=0.0, help="fraction of trades sent twice")
    p.add_argument("--malformed-every", type=int, default=0, help="a hostile frame every N messages")
    p.add_argument("--seed", type=int, default=0, help="seed of the trades generated from candles")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault injection")
    return parser


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop (cheaper I/O than asyncio's own loop) until done, SIGINT or SIGTERM.

    The first signal cancels the work so its cleanup runs; later ones (a second Ctrl-C, or uvicorn
    re-raising the signal it also saw) must not cancel that cleanup half-way.
    """

    async def main() -> Any:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if not task.cancelling():
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            return await task
        except asyncio.CancelledError:
            log.info("stopped by signal")
            return None

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from appliance.logs import setup_logging
    from appliance.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)

    if args.command == "healthcheck":
        import httpx

        host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
        try:
            httpx.get(f"http://{host}:{settings.http_port}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.command == "up":
        from appliance.runtime import up

        run(up(settings))
        return 0

    if args.command == "replay":
        from appliance.coinbase.replay import Faults, ReplayServer, serve_forever
        from appliance.coinbase.tape import CandleCsvError, load_tape, shift_tape

        if not args.capture and not args.candles:
            print("replay needs at least one --capture or --candles source", file=sys.stderr)
            return 2
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
            return 2
        start_at = args.start_at
        if args.at_now:  # a demo that reads like a live appliance: fresh data, real prices
            anchor = start_at if start_at is not None else min(t.time_us for t in trades) // US
            offset = (int(time.time()) - anchor) // 3600 * 3600
            trades = shift_tape(trades, offset)
            start_at = anchor + offset
        faults = Faults(
            args.drop_every,
            args.silence_every,
            args.silence_s,
            args.omit_rate,
            args.duplicate_rate,
            args.malformed_every,
            args.seed,
        )

        async def replay() -> None:
            server = ReplayServer(
                trades,
                speed=args.speed,
                start_at_us=start_at * US if start_at else None,
                heartbeat_s=args.heartbeat_s,
                faults=faults,
                rest_rate_limit=args.rest_rate_limit,
            )
            await serve_forever(server, args.host, args.port)

        run(replay())
        return 0

    from appliance.backfill import LoadResult, backfill, import_csv
    from appliance.coinbase.rest import CoinbaseRest
    from appliance.ingest import Ingester
    from appliance.store import Store

    def rest_client() -> CoinbaseRest:  # made inside the running loop, closed by ``async with``
        return CoinbaseRest(
            settings.coinbase_rest_url, rate_per_s=settings.rest_rate_per_s, timeout_s=settings.rest_timeout_s
        )

    async def ingest(store: Store) -> None:
        async with rest_client() as rest:
            await Ingester(settings, store, rest).run()

    async def fill(store: Store) -> LoadResult:
        end = args.end if args.end is not None else int(datetime.now(UTC).timestamp())
        async with rest_client() as rest:
            return await backfill(
                store, rest, args.product, args.granularity, args.start, end, progress=sys.stderr.isatty()
            )

    result: LoadResult | None = None
    try:
        with Store(settings.db_path) as store:
            if args.command == "ingest":
                run(ingest(store))
            elif args.command == "backfill":
                result = run(fill(store))
            elif args.command == "import-csv":
                result = import_csv(
                    store, args.file, args.product, args.granularity, progress=sys.stderr.isatty()
                )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        via = f" from {result.requests} requests" if result.requests else ""
        print(
            f"{result.rows} candles{via}: {result.inserted} new, {result.changed} changed, "
            f"{result.unchanged} unchanged"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
