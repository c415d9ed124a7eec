"""VMoBA's three partitions at a video's token grid: chunks, the density each selects and where one attention
call's time goes (permutation, chunk scores, selection, mask build, the block-sparse kernel), against dense
SDPA on the same random q, k, v.

    python -m accel.benchmarks.vmoba_modes --grid 11x30x52 --top-k 1,12 --density 0.2

``--grid FxHxW`` is the latent token grid (Wan-1.3B at 11 latent frames: 11x30x52 = 17,160 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from accel.attention.backends import sparse_attention
from accel.attention.format import BlockSparseMask
from accel.attention.tokens import SequenceGeometry, inverse_permutation, partition_permutation
from accel.methods.vmoba import (
    Partition,
    Selection,
    chunk_membership,
    chunk_scores,
    chunk_shape,
    chunks_to_add,
    select_chunks,
)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def profile_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: SequenceGeometry, mode: Partition,
                 top_k: int, chunk_tokens: int, block_size: int, density: float | None = None) -> dict[str, Any]:
    """One VMoBA attention call in ``mode``, stage by stage (the runtime's order); ``density`` replaces
    ``top_k`` as in ``VMoBAConfig``."""
    seconds: dict[str, float] = {}
    ids_mode, shape = chunk_shape(geometry, mode, chunk_tokens)
    (perm, chunk_of), seconds["partition"] = _timed(lambda: partition_permutation(geometry, ids_mode, shape))
    member = chunk_membership(chunk_of, block_size)
    top_k = chunks_to_add(member.shape[0], top_k, density)
    (qp, kp, vp), seconds["permute"] = _timed(lambda: tuple(t.index_select(2, perm) for t in (q, k, v)))
    scores, seconds["scores"] = _timed(lambda: chunk_scores(qp, kp, chunk_of, block_size))
    chosen, seconds["select"] = _timed(lambda: select_chunks(scores, member.T, Selection.TOPK, top_k, 0.25))
    table = (chosen.float() @ member.float()) > 0
    mask, seconds["mask"] = _timed(lambda: BlockSparseMask.from_dense(table, block_size, q.shape[2], k.shape[2]))
    (out, backend), seconds["kernel"] = _timed(lambda: sparse_attention(qp, kp, vp, mask, backend="auto"))
    _, seconds["unpermute"] = _timed(lambda: out.index_select(2, inverse_permutation(perm)))
    return {"mode": mode.value, "top_k": top_k, "density": density, "chunks": int(member.shape[0]), "chunk_shape": list(shape),
            "chunk_density": round(float(chosen.float().mean()), 3), "block_density": round(mask.density(), 3),
            "backend": backend, "seconds": {name: round(s, 3) for name, s in seconds.items()},
            "total_s": round(sum(seconds.values()), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="11x30x52", help="latent token grid FxHxW")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--top-k", default="1,12", help="comma-separated top_k values")
    parser.add_argument("--density", default="", help="comma-separated density settings (after the top_k ones)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    frames, height, width = (int(x) for x in args.grid.lower().split("x"))
    tokens = frames * height * width
    geometry = SequenceGeometry(tokens, frames, height, width, 0, ())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, tokens, args.head_dim, generator=gen) for _ in range(3))
    _, dense_s = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    rows = []
    print(f"{tokens:,} tokens ({args.grid}), {args.heads} heads x {args.head_dim}: dense SDPA {dense_s:.2f} s")
    settings = [(int(x), None) for x in args.top_k.split(",") if x] + [
        (0, float(x)) for x in args.density.split(",") if x]
    for top_k, density in settings:
        for mode in Partition:
            row = profile_mode(q, k, v, geometry, mode, top_k, args.chunk_tokens, args.block_size, density)
            row["kernel_vs_dense"] = round(row["seconds"]["kernel"] / dense_s, 3)
            row["of_ideal"] = round(row["block_density"] / max(row["kernel_vs_dense"], 1e-9), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": tokens, "grid": args.grid, "dense_s": round(dense_s, 3), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
