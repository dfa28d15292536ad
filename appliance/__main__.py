"""``python -m appliance``: the appliance's command line (subcommands in the freqtrade manner).

Each subcommand is one handler, ``(args, settings) -> exit status``; the settings are read and checked
once, before any of them runs. Each one's --help lists its options with their defaults and the
``CRYPTOPI_*`` variables it reads, generated from the settings class.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from appliance.helpers.cli import HelpFormatter, cli_time, settings_help
from appliance.helpers.config import SettingRejected
from appliance.settings import Settings

log = logging.getLogger("appliance")
Handler = Callable[[argparse.Namespace, Settings], int]


class Interrupted(Exception):
    """A signal stopped the work (after its cleanup ran)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop (cheaper I/O than asyncio's own loop) until done; Interrupted on SIGINT or SIGTERM.

    The first signal cancels the work so its cleanup runs; later ones (a second Ctrl-C, or uvicorn
    re-raising the signal it also saw) must not cancel that cleanup half-way.
    """
    stopped_by: list[int] = []

    async def main() -> Any:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            stopped_by.append(signum)
            if not task.cancelling():
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await task
        except asyncio.CancelledError:
            if not stopped_by:  # cancelled from outside (the loop closing on an error): not a signal
                raise
            log.info("stopped by signal", extra={"signal": signal.Signals(stopped_by[0]).name})
            raise Interrupted(stopped_by[0]) from None

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def serve(coro: Coroutine[Any, Any, Any]) -> int:
    """A service stopped by a signal has done its job: exit 0."""
    with contextlib.suppress(Interrupted):
        run(coro)
    return 0


def up(args: argparse.Namespace, settings: Settings) -> int:
    """The appliance: ingest, predictions, the HTTP API and dashboard, MQTT."""
    from appliance.runtime import up

    return serve(up(settings))


def ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Ingest live Coinbase trades into the store (and nothing else)."""
    from appliance.coinbase.rest import CoinbaseRest
    from appliance.health import Conditions
    from appliance.ingest import Ingester
    from appliance.products import resolve_settings
    from appliance.store import Store
    from appliance.storekeeper import StoreKeeper

    async def main() -> None:
        health = Conditions()
        store = Store(settings.db_path, connect=False)
        keeper = StoreKeeper(store, health)
        keeper.open()  # storage trouble pauses ingest, it does not end it
        try:
            async with CoinbaseRest.from_settings(settings, health) as rest:  # inside the loop that closes it
                resolved = await resolve_settings(settings, rest)
                ingester = Ingester(resolved, store, rest, health=health, keeper=keeper)
                await asyncio.gather(ingester.run(), keeper.run())
        finally:
            store.close()

    return serve(main())


def healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 if the running appliance answers /health (the container's health check)."""
    import httpx

    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    try:
        httpx.get(f"http://{host}:{settings.http_port}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


def backfill(args: argparse.Namespace, settings: Settings) -> int:
    """Load Coinbase REST candles into the store."""
    from appliance.coinbase.rest import CoinbaseRest
    from appliance.history import LoadResult, backfill
    from appliance.store import Store

    result = LoadResult()

    async def main(store: Store) -> None:
        end = args.end if args.end is not None else int(datetime.now(UTC).timestamp())
        async with CoinbaseRest.from_settings(settings) as rest:
            await backfill(store, rest, args.product, args.granularity, args.start, end,
                           progress=sys.stderr.isatty(), result=result)  # fmt: skip

    with Store(settings.db_path) as store:
        try:
            run(main(store))
        except Interrupted as stop:
            print(f"interrupted by {stop}: {result}")
            return stop.exit_status
    print(result)
    return 0


def import_csv(args: argparse.Namespace, settings: Settings) -> int:
    """Load a time,open,high,low,close,volume candle CSV into the store."""
    from appliance.history import import_csv
    from appliance.store import Store

    with Store(settings.db_path) as store:
        result = import_csv(store, args.file, args.product, args.granularity, progress=sys.stderr.isatty())
    print(result)
    return 0


def check_config(args: argparse.Namespace, settings: Settings) -> int:
    """Check the settings (exit 2 if bad) and that the HTTP port, and any --free-port, can be listened
    on (exit 1 if not), without starting anything."""
    from appliance.helpers.net import listen

    listen(settings.http_host, settings.http_port).close()
    for port in args.free_port:
        listen("127.0.0.1", port).close()
    ports = [settings.http_port, *args.free_port]
    free = f"port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))} free"
    print(f"settings ok: {','.join(settings.products)}, store {settings.db_path}; {free}")
    return 0


def export(args: argparse.Namespace, settings: Settings) -> int:
    """Write the store's candles (the import-csv format, a file per product and granularity) and its
    predictions with their realized closes and errors, as CSV."""
    from appliance.export import export

    end = args.end if args.end is not None else int(datetime.now(UTC).timestamp()) + 1
    products = args.product or settings.products
    start = args.start if args.start is not None else 0
    for written in export(settings.db_path, args.out, products, args.granularity or [3600], start, end):
        print(written)
    return 0


def replay(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the Coinbase protocol (feed and REST) offline, from a trade tape."""
    from appliance.replay.cli import serve as serve_replay
    from appliance.replay.cli import server_from

    server = server_from(args)
    if server is None:
        return 2
    return serve(serve_replay(server, args))


#: The settings each subcommand reads (its --help lists them); ``up`` and ``check-config`` read them all.
LOGS = ("log_level", "log_format")
REST = ("coinbase_rest_url", "rest_rate_per_s", "rest_timeout_s")
FEED = ("coinbase_ws_url", "feed_watchdog_s", "reconnect_max_s")
INGEST = ("data_dir", "products", *FEED, *REST, "commit_interval_s", "minute_retention_days", *LOGS)


def build_parser() -> argparse.ArgumentParser:
    from appliance.replay.cli import add_arguments as replay_arguments

    parser = argparse.ArgumentParser(
        prog="python -m appliance", formatter_class=HelpFormatter,
        description="The cryptopi appliance: live Coinbase trades into SQLite, predictions served on the "
        "device.\nSettings come from CRYPTOPI_* variables, checked before any command runs (exit 2 if bad)."
        "\nEach command's --help lists its options and the variables it reads.",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, reads: tuple[str, ...] | None) -> argparse.ArgumentParser:
        """A subcommand, its help the handler's docstring and the settings it ``reads`` (None: all)."""
        text = " ".join((handler.__doc__ or "").split())
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter,
                           epilog=settings_help(Settings, reads))  # fmt: skip
        p.set_defaults(handler=handler)
        return p

    command("up", up, None)
    command("ingest", ingest, INGEST)
    command("healthcheck", healthcheck, ("http_host", "http_port"))
    p = command("check-config", check_config, None)
    p.add_argument("--free-port", type=int, action="append", default=[], metavar="PORT",
                   help="another port that must be free on 127.0.0.1 (repeatable)")  # fmt: skip

    p = command("backfill", backfill, ("data_dir", *REST, *LOGS))
    p.add_argument("--product", required=True, help="a Coinbase product id, e.g. BTC-USD")
    p.add_argument("--granularity", type=int, default=3600, help="candle length in seconds")
    p.add_argument("--start", type=cli_time, required=True, help="ISO-8601 or epoch seconds")
    p.add_argument("--end", type=cli_time, help="ISO-8601 or epoch seconds (default: now)")

    p = command("import-csv", import_csv, ("data_dir", *LOGS))
    p.add_argument("file", type=Path, help="the CSV file (the format of appliance/datasets)")
    p.add_argument("--product", required=True, help="a Coinbase product id, e.g. BTC-USD")
    p.add_argument("--granularity", type=int, required=True, help="candle length in seconds")

    p = command("export", export, ("data_dir", "products", *LOGS))
    p.add_argument("--out", type=Path, required=True, help="folder for the CSV files (made if missing)")
    p.add_argument("--product", action="append", help="repeatable (default: CRYPTOPI_PRODUCTS)")
    p.add_argument("--granularity", type=int, action="append",
                   help="candle length in seconds, repeatable (default: 3600)")  # fmt: skip
    p.add_argument("--start", type=cli_time, help="ISO-8601 or epoch seconds (default: the first)")
    p.add_argument("--end", type=cli_time, help="ISO-8601 or epoch seconds, exclusive (default: now)")

    replay_arguments(command("replay", replay, LOGS))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from appliance.logs import setup_logging
    from appliance.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    handler: Handler = args.handler
    import sqlite3

    from appliance.store import StoreRefused

    try:
        return handler(args, settings)
    except SettingRejected as exc:
        print(f"invalid configuration:\n  {exc}", flush=True)  # where a bad value at start is said
        return 2
    except (ValueError, OSError, sqlite3.Error, StoreRefused) as exc:  # a bad file, range or store: exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
