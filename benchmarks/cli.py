"""`accel-bench`: the benchmark command line (grows with each method)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel-bench", description="Benchmark accel methods against baselines.")
    parser.add_argument("--model", action="append", default=None, help="embedded name, local folder or hub id")
    parser.add_argument("--methods", default="none", help="comma list of methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("accel-bench: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
