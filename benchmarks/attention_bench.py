"""Block-sparse attention op on CPU vs dense SDPA, in one run.

    python -m accel.benchmarks.attention_bench            # S in {4K, 16K, 32K}, density in {0.1, 0.2, 0.4}
    python -m accel.benchmarks.attention_bench --quick    # a small smoke run (seconds)

For each (S, density): B=1, H=8, D=64 random Q/K/V in ``--dtype`` (fp32 by default; dense SDPA runs in the
same dtype); the mask is AdaSpa's selection at that density (exact block sums, per-head top-k), so the
output cosine vs dense means something. Times are medians of
``--repeats`` after a warm-up (compile excluded); dense SDPA is timed right before the sparse paths in
every repeat. Reported: speedup (the median of the per-repeat ratios dense / sparse), the ideal 1/density
(token-pair density of the mask) and the fraction of the ideal reached; FLOP/s of the sparse path =
4 * B * H * S^2 * D * density / time; and the attention cost of an AdaSpa search step (CPU: dense attention
and the exact block scores, fused in the C++ kernel's pass when it is built) as a multiple of one dense call.
The same is done on Q/K/V captured from the embedded ``digits-video-dit`` when it loads (skipped with a
message otherwise).
Run on a quiet machine: timings taken while other jobs run are fiction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from accel.attention.backends import dense_attention_flops, sparse_attention
from accel.attention.format import BlockSparseMask
from accel.attention.search import attention_and_block_sums, block_sums
from accel.methods.adaspa import select_blocks


def paired_times(dense_fn: Any, sparse_fns: list[Any], repeats: int) -> tuple[list[float], list[list[float]]]:
    """Dense and every sparse callable timed back to back in each repeat, so a slow spell of the shared host
    hits both sides of a ratio instead of one. The caller has run each once already (warm-up, compile)."""
    dense: list[float] = []
    sparse: list[list[float]] = [[] for _ in sparse_fns]
    for _ in range(repeats):
        for fn, samples in ((dense_fn, dense), *zip(sparse_fns, sparse)):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return dense, sparse


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def mask_at_density(q: torch.Tensor, k: torch.Tensor, density: float, block: int) -> BlockSparseMask:
    """AdaSpa's per-head top-k of exact block scores, keeping ``density`` of the blocks."""
    sums, _ = block_sums(q, k, block, q.shape[-1] ** -0.5)
    table = select_blocks(sums, torch.full((q.shape[1],), 1.0 - density))
    return BlockSparseMask.from_dense(table, block, q.shape[2], k.shape[2])


def bench_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, density: float, block: int,
               backends: list[str], repeats: int) -> list[dict[str, Any]]:
    B, H, S, D = q.shape
    mask = mask_at_density(q.float(), k.float(), density, block)
    actual = mask.density()
    # These first calls are also the warm-up paired_times relies on (flex compiles here).
    dense_out = F.scaled_dot_product_attention(q, k, v)
    outs = [sparse_attention(q, k, v, mask, backend=b) for b in backends]
    def search() -> None:  # an AdaSpa search step's attention: fused on the C++ kernel, else dense + scores
        if attention_and_block_sums(q, k, v, block, D ** -0.5, None, "auto") is None:
            F.scaled_dot_product_attention(q, k, v)
            block_sums(q, k, block, D ** -0.5)

    search()
    dense_times, timed = paired_times(
        lambda: F.scaled_dot_product_attention(q, k, v),
        [*(lambda b=b: sparse_attention(q, k, v, mask, backend=b) for b in backends), search], repeats)
    *sparse_times, search_times = timed
    search_vs_dense = statistics.median(s / d for d, s in zip(dense_times, search_times))
    rows = []
    for (out, used), samples in zip(outs, sparse_times):
        speedup = statistics.median(d / s for d, s in zip(dense_times, samples))
        median = statistics.median(samples)
        rows.append({
            "S": S, "target_density": density, "density": round(actual, 4), "backend": used, "block": block,
            "dense_s": round(statistics.median(dense_times), 5), "sparse_s": round(median, 5),
            "spread_s": round(max(samples) - min(samples), 5), "repeats": repeats,
            "speedup": round(speedup, 3), "ideal": round(1 / actual, 3),
            "fraction_of_ideal": round(speedup * actual, 3),
            "sparse_gflops": round(dense_attention_flops(B, H, S, S, D) * actual / median / 1e9, 2),
            "cosine_vs_dense": round(cosine(out.float(), dense_out.float()), 5), "dtype": str(q.dtype)[6:],
            "search_step_vs_dense": round(search_vs_dense, 3),
        })
    return rows


def captured_qkv(seq_hint: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """Q/K/V of one self-attention call of ``digits-video-dit`` mid-sampling, or why not."""
    try:
        from accel.pipelines import load

        from accel.attention.intercept import SparseAttentionHook, original_sdpa
        from accel.hooks import HookSet

        pipe = load("digits-video-dit")
    except Exception as exc:  # noqa: BLE001 - absent or unloadable: skip with the reason
        return f"digits-video-dit unavailable ({type(exc).__name__}: {exc})"
    captured: dict[str, torch.Tensor] = {}

    def handler(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if q.shape[2] == k.shape[2]:  # self-attention: keep the latest (last step's) call
            captured.update(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone())
        return original_sdpa()(q, k, v, **kwargs)

    hooks = HookSet("accel.bench")
    try:
        blocks = pipe.transformer.blocks
        hooks.add_hook(blocks[len(blocks) // 2].attn1, SparseAttentionHook(handler), "capture")
        with torch.no_grad():
            pipe([3], num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    except Exception as exc:  # noqa: BLE001
        return f"digits-video-dit capture failed ({type(exc).__name__}: {exc})"
    finally:
        hooks.remove()
    if "q" not in captured:
        return "digits-video-dit: no self-attention call captured"
    return captured["q"], captured["k"], captured["v"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run: S in {1024, 2048}, 2 repeats")
    parser.add_argument("--seq", type=int, nargs="*", help="sequence lengths (default 4096 16384 32768)")
    parser.add_argument("--density", type=float, nargs="*", help="densities (default 0.1 0.2 0.4)")
    parser.add_argument("--block", type=int, default=64, choices=(64, 128))
    parser.add_argument("--backends", nargs="*", default=["cpp", "gather", "flex"], help="CPU paths to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_bench.json"))
    parser.add_argument("--no-capture", action="store_true", help="skip the digits-video-dit Q/K/V case")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="Q/K/V dtype for both dense SDPA and the sparse paths")
    args = parser.parse_args(argv)
    seqs = args.seq or ([1024, 2048] if args.quick else [4096, 16384, 32768])
    densities = args.density or [0.1, 0.2, 0.4]
    repeats = 2 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, D = 1, 8, 64
    dtype = getattr(torch, args.dtype)
    rows: list[dict[str, Any]] = []
    for S in seqs:
        gen = torch.Generator().manual_seed(S)
        q, k, v = (torch.randn(B, H, S, D, generator=gen).to(dtype) for _ in range(3))
        for density in densities:
            for row in bench_case(q, k, v, density, args.block, args.backends, repeats):
                row["inputs"] = "random"
                rows.append(row)
                _print_row(row)
    notes = []
    if not args.no_capture:
        got = captured_qkv(min(seqs))
        if isinstance(got, str):
            notes.append(got)
            print(f"skipped captured Q/K/V: {got}")
        else:
            q, k, v = (t.to(dtype) for t in got)
            for density in densities:
                for row in bench_case(q, k, v, density, args.block, args.backends, repeats):
                    row["inputs"] = "digits-video-dit"
                    rows.append(row)
                    _print_row(row)
    payload = {"command": " ".join(["python -m accel.benchmarks.attention_bench", *(argv or sys.argv[1:])]),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "B": B, "H": H, "D": D,
               "dtype": args.dtype,
               "rows": rows, "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


def _print_row(row: dict[str, Any]) -> None:
    if not getattr(_print_row, "header", False):
        print(f"{'inputs':>16} {'S':>6} {'dens':>6} {'backend':>8} {'dense ms':>9} {'sparse ms':>9} "
              f"{'speedup':>8} {'ideal':>6} {'of ideal':>8} {'cosine':>8} {'search step':>12}")
        _print_row.header = True  # type: ignore[attr-defined]
    print(f"{row['inputs']:>16} {row['S']:>6} {row['density']:>6.3f} {row['backend']:>8} "
          f"{row['dense_s'] * 1e3:>9.1f} {row['sparse_s'] * 1e3:>9.1f} {row['speedup']:>8.2f} "
          f"{row['ideal']:>6.2f} {row['fraction_of_ideal']:>8.2f} {row['cosine_vs_dense']:>8.4f} "
          f"{row['search_step_vs_dense']:>12.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
