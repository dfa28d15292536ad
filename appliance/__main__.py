"""``python -m appliance``: the appliance's command line (subcommands in the freqtrade manner).

Each subcommand is one handler, ``(args, settings) -> exit status``; the settings are read and checked
once, before any of them runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from appliance.helpers.cli import cli_time
from appliance.helpers.config import SettingRejected
from appliance.settings import Settings

log = logging.getLogger("appliance")
Handler = Callable[[argparse.Namespace, Settings], int]


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


def up(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.runtime import up

    run(up(settings))
    return 0


def ingest(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.coinbase.rest import CoinbaseRest
    from appliance.health import Conditions
    from appliance.ingest import Ingester
    from appliance.products import resolve_settings
    from appliance.store import Store

    async def main(store: Store) -> None:
        health = Conditions()
        async with CoinbaseRest.from_settings(
            settings, health
        ) as rest:  # made inside the loop that closes it
            await Ingester(await resolve_settings(settings, rest), store, rest, health=health).run()

    with Store(settings.db_path) as store:
        run(main(store))
    return 0


def healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    try:
        httpx.get(f"http://{host}:{settings.http_port}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


def backfill(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.coinbase.rest import CoinbaseRest
    from appliance.history import LoadResult, backfill
    from appliance.store import Store

    async def main(store: Store) -> LoadResult:
        end = args.end if args.end is not None else int(datetime.now(UTC).timestamp())
        async with CoinbaseRest.from_settings(settings) as rest:
            return await backfill(
                store, rest, args.product, args.granularity, args.start, end, progress=sys.stderr.isatty()
            )

    with Store(settings.db_path) as store:
        result = run(main(store))
    if result is not None:
        print(result)
    return 0


def import_csv(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.history import import_csv
    from appliance.store import Store

    with Store(settings.db_path) as store:
        result = import_csv(store, args.file, args.product, args.granularity, progress=sys.stderr.isatty())
    print(result)
    return 0


def replay(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.replay.cli import serve, server_from

    server = server_from(args)
    if server is None:
        return 2
    run(serve(server, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from appliance.replay.cli import add_arguments as replay_arguments

    parser = argparse.ArgumentParser(prog="python -m appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    command("up", up, "the appliance: ingest, predictions and the HTTP API (CRYPTOPI_* settings)")
    command("ingest", ingest, "ingest live Coinbase trades into the store (CRYPTOPI_* settings)")
    command("healthcheck", healthcheck, "exit 0 if the running appliance answers /health (container check)")

    p = command("backfill", backfill, "load Coinbase REST candles into the store")
    p.add_argument("--product", required=True)
    p.add_argument("--granularity", type=int, default=3600)
    p.add_argument("--start", type=cli_time, required=True, help="ISO-8601 or epoch seconds")
    p.add_argument("--end", type=cli_time, help="ISO-8601 or epoch seconds (default: now)")

    p = command("import-csv", import_csv, "load a time,open,high,low,close,volume candle CSV into the store")
    p.add_argument("file", type=Path)
    p.add_argument("--product", required=True)
    p.add_argument("--granularity", type=int, required=True)

    replay_arguments(command("replay", replay, "serve the Coinbase protocol offline from a trade tape"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from appliance.logs import setup_logging
    from appliance.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except SettingRejected as exc:
        print(f"invalid configuration:\n  {exc}", flush=True)  # where a bad value at start is said
        return 2
    except (ValueError, OSError) as exc:  # a bad file, range or store: say what, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
