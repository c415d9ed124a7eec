"""`accel-demo`: the Gradio side-by-side demo (see issue: Gradio demo)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel-demo", description="Side-by-side speed/quality demo.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    parser.parse_args(argv)
    print("accel-demo: not implemented yet")
    return 2
