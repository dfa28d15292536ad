"""``make bench``: the ingest, appliance and fifty-product benchmarks, in one run (JSON in bench-results/)."""

import argparse
from pathlib import Path

from tests.bench import appliance, ingest, products
from tests.conftest import REPO


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    results = [ingest.run(args.out), appliance.run(args.out), products.run(args.out)]
    print("all targets met" if all(results) else "SOME TARGETS MISSED (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
