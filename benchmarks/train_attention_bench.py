"""Training through block-sparse attention: forward + backward of the sparse op vs dense SDPA's, in one run.

    python -m accel.benchmarks.train_attention_bench                # S in {4K, 16K}, density {0.1, 0.2, 0.4}
    python -m accel.benchmarks.train_attention_bench --quick        # a small smoke run (seconds)

For each (S, density): B=1, H=2, D=64 fp32 random Q/K/V needing gradients; the mask is AdaSpa's selection at
that density (as ``attention_bench``). One timed call is ``out = attention(q, k, v); out.backward(g)``: the
sparse side is ``torch.ops.accel.block_sparse_attention`` (C++ kernel forward and backward), the
dense side SDPA with autograd. Dense and sparse alternate in every repeat; "speedup" is the median of the
per-repeat ratios, "of ideal" that over 1/density. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accel.attention.trainable import block_sparse_attention_trainable
from accel.benchmarks.attention_bench import mask_at_density, paired_times


def train_step(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> Any:
    """One timed call: ``fn(q, k, v).backward(grad)`` with the inputs' gradients cleared first."""

    def run() -> None:
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)

    return run


def bench_case(seq: int, density: float, block: int, repeats: int, heads: int = 2, dim: int = 64) -> dict:
    gen = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(1, heads, seq, dim, generator=gen)
    with torch.no_grad():
        mask = mask_at_density(q, k, density, block)
    dense = train_step(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), q, k, v, grad)
    sparse = train_step(lambda a, b, c: block_sparse_attention_trainable(a, b, c, mask), q, k, v, grad)
    dense()
    sparse()  # warm-up (the C++ kernel builds on first use)
    dense_times, (sparse_times,) = paired_times(dense, [sparse], repeats)
    ratios = [d / s for d, s in zip(dense_times, sparse_times)]
    kept = mask.density()
    return {
        "tokens": seq, "target_density": density, "density": round(kept, 4),
        "dense_s": round(statistics.median(dense_times), 4), "sparse_s": round(statistics.median(sparse_times), 4),
        "speedup": round(statistics.median(ratios), 3), "ideal": round(1 / kept, 3),
        "of_ideal": round(statistics.median(ratios) * kept, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="S=512, one density, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.densities, args.repeats = [512], [0.25], 1
    rows = []
    print("| tokens | density | dense fwd+bwd s | sparse fwd+bwd s | speedup | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|")
    for seq in args.tokens:
        for density in args.densities:
            row = bench_case(seq, density, args.block, args.repeats)
            rows.append(row)
            print(f"| {row['tokens']:,} | {row['density']:.3f} | {row['dense_s']:.3f} | {row['sparse_s']:.3f} | "
                  f"{row['speedup']:.2f}x | {row['ideal']:.2f}x | {row['of_ideal']:.2f} |", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
