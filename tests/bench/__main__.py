"""``make bench``: the ingest, appliance, fifty-product and live-rate benchmarks (JSON in bench-results/)."""

import argparse
from collections.abc import Callable
from pathlib import Path

from tests.bench import appliance, ingest, live, products
from tests.conftest import REPO


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    parser.add_argument(
        "--live-minutes", type=int, default=60,
        help="window of the live-rate bench (whole hours weigh the hourly work right; 0 skips it)",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=("ingest", "appliance", "products", "live"), help="run one benchmark"
    )
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    benches: dict[str, Callable[[], bool]] = {
        "ingest": lambda: ingest.run(args.out),
        "appliance": lambda: appliance.run(args.out),
        "products": lambda: products.run(args.out),
        "live": lambda: live.run(args.out, args.live_minutes) if args.live_minutes else True,
    }
    results = [bench() for name, bench in benches.items() if args.only in (None, name)]
    print("all targets met" if all(results) else "SOME TARGETS MISSED (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
