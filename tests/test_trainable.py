"""Block-sparse attention with a backward pass, and VMoBA in training mode."""

from __future__ import annotations

import math

import pytest
import torch

import accel
from accel.attention.backends import cpu_kernel_available
from accel.attention.format import BlockSparseMask
from accel.attention.trainable import backward_blocks, block_sparse_attention_trainable, forward_blocks
from accel.kernels.reference import block_sparse_attention_reference, random_block_case
from accel.methods.vmoba import VMoBAConfig


def _case(seq: int, block: int, density: float, dtype: torch.dtype, seed: int = 0, heads: int = 2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, 8, generator=gen, dtype=dtype) for _ in range(3))
    nb = math.ceil(seq / block)
    table = torch.rand(1, heads, nb, nb, generator=gen) < density
    table[..., 0, :] = False  # one query block attends nothing: its output and gradients are 0
    return q, k, v, BlockSparseMask.from_dense(table, block, seq, seq)


@pytest.mark.parametrize("seq", [64, 70])  # whole blocks and a tail block
def test_gradcheck_float64(seq: int) -> None:
    q, k, v, mask = _case(seq, 16, 0.5, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: block_sparse_attention_trainable(a, b, c, mask), inputs, eps=1e-6, atol=1e-6
    )


@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ CPU kernel does not build here")
def test_gradcheck_through_the_cpu_kernels() -> None:
    """The C++ forward and backward (fp32 kernels) under gradcheck: float64 inputs cast to fp32 around the
    operator, so the finite differences use a step fp32 resolves and fp32-sized tolerances."""
    q, k, v, mask = _case(150, 64, 0.6, torch.float64, seed=2)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def attention(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention_trainable(a.float(), b.float(), c.float(), mask).double()

    assert torch.autograd.gradcheck(attention, inputs, eps=1e-3, atol=5e-4, rtol=5e-3, fast_mode=True)


def test_forward_and_gradients_equal_dense_attention_when_every_block_is_listed() -> None:
    q, k, v, _ = _case(70, 16, 1.0, torch.float64)
    full = BlockSparseMask.from_dense(torch.ones(1, 2, 5, 5, dtype=torch.bool), 16, 70, 70)
    grads = []
    for fn in (
        lambda a, b, c: block_sparse_attention_trainable(a, b, c, full),
        lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c),
    ):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(a, b, c)
        out.pow(2).sum().backward()
        grads.append((out.detach(), a.grad, b.grad, c.grad))
    for mine, dense in zip(*grads):
        torch.testing.assert_close(mine, dense, rtol=1e-9, atol=1e-9)


def test_nan_in_unlisted_blocks_never_reaches_a_gradient() -> None:
    q, k, v, _ = _case(64, 16, 1.0, torch.float32)
    table = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    table[..., 3] = False  # nobody attends key block 3
    mask = BlockSparseMask.from_dense(table, 16, 64, 64)
    k, v = k.clone(), v.clone()
    k[:, :, 48:] = float("nan")
    v[:, :, 48:] = float("nan")
    a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
    block_sparse_attention_trainable(a, b, c, mask).sum().backward()
    assert all(torch.isfinite(g[:, :, :48]).all() for g in (a.grad, b.grad, c.grad))
    assert torch.isfinite(a.grad).all() and (b.grad[:, :, 48:] == 0).all() and (c.grad[:, :, 48:] == 0).all()


@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ CPU kernel does not build here")
def test_cpu_kernel_forward_feeds_the_backward() -> None:
    """On CPU the operator's forward is the C++ kernel: its out and log-sum-exp must be what the backward
    recomputes from (the PyTorch walk), and the gradients the same as with the walk's own forward."""
    from accel.kernels.cpu_block_sparse import block_sparse_attention_cpu

    q, k, v, mask = _case(200, 64, 0.5, torch.float32, seed=3)
    out, lse = block_sparse_attention_cpu(q, k, v, mask.kv_counts, mask.kv_indices, 64, 8**-0.5, None)
    walk_out, walk_lse = forward_blocks(q, k, v, mask.kv_counts, mask.kv_indices, 64, 8**-0.5)
    torch.testing.assert_close(out, walk_out, rtol=1e-4, atol=1e-5)
    listed = mask.kv_counts.repeat_interleave(64, -1)[..., :200] > 0
    torch.testing.assert_close(lse[listed], walk_lse[listed], rtol=1e-4, atol=1e-4)
    a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
    block_sparse_attention_trainable(a, b, c, mask).pow(2).sum().backward()
    grad_out = 2 * walk_out
    expected = backward_blocks(
        grad_out, q, k, v, walk_out, walk_lse, mask.kv_counts, mask.kv_indices, 64, 8**-0.5
    )
    for got, want in zip((a.grad, b.grad, c.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ CPU kernel does not build here")
@pytest.mark.parametrize("heads, threads", [(1, 2), (3, 1), (3, 2), (8, 2)])  # per-worker copies and per-head
def test_cpu_kernel_backward_matches_the_walk(heads: int, threads: int) -> None:
    from accel.kernels.cpu_block_sparse import block_sparse_attention_backward_cpu, block_sparse_attention_cpu

    q, k, v, counts, indices = random_block_case(300, 32, 64, seed=heads, batch=2, heads=heads)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, lse = block_sparse_attention_cpu(q, k, v, counts, indices, 64, 32**-0.5, None)
    expected = backward_blocks(grad, q, k, v, out, lse, counts, indices, 64, 32**-0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = block_sparse_attention_backward_cpu(grad, q, k, v, out, lse, counts, indices, 64, 32**-0.5)
    finally:
        torch.set_num_threads(before)
    for mine, want in zip(got, expected):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ CPU kernel does not build here")
def test_cpu_kernel_backward_in_bf16_and_never_reads_unlisted_blocks() -> None:
    q, k, v, _ = _case(256, 64, 1.0, torch.float32, seed=4)
    table = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    table[..., 3] = False
    mask = BlockSparseMask.from_dense(table, 64, 256, 256)
    k, v = k.clone(), v.clone()
    k[:, :, 192:], v[:, :, 192:] = float("nan"), float("nan")
    a, b, c = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    block_sparse_attention_trainable(a, b, c, mask).float().pow(2).sum().backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()
    assert (b.grad[:, :, 192:] == 0).all() and (c.grad[:, :, 192:] == 0).all()
    ref = [t.to(torch.bfloat16).double().nan_to_num(0.0).requires_grad_() for t in (q, k, v)]
    block_sparse_attention_trainable(*ref, mask).pow(2).sum().backward()
    for mine, want in zip((a.grad, b.grad, c.grad), (t.grad for t in ref)):
        torch.testing.assert_close(mine.double()[:, :, :192], want[:, :, :192], rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ CPU kernel does not build here")
def test_cpu_kernel_backward_refuses_mismatched_inputs() -> None:
    from accel.kernels.cpu_block_sparse import block_sparse_attention_backward_cpu, block_sparse_attention_cpu

    q, k, v, counts, indices = random_block_case(130, 16, 64)
    out, lse = block_sparse_attention_cpu(q, k, v, counts, indices, 64, 0.25, None)
    with pytest.raises(ValueError, match=r"grad_out and out must have q's shape \(1, 2, 130, 16\)"):
        block_sparse_attention_backward_cpu(q[:, :, :64], q, k, v, out, lse, counts, indices, 64, 0.25)
    with pytest.raises(ValueError, match=r"lse must be \(B, H, Sq\) = \(1, 2, 130\), got \(1, 2, 64\)"):
        block_sparse_attention_backward_cpu(out, q, k, v, out, lse[..., :64], counts, indices, 64, 0.25)


def test_walk_matches_the_reference_on_random_cases() -> None:
    q, k, v, counts, indices = random_block_case(300, 32, 64, seed=5, batch=2, heads=3)
    ref, _ = block_sparse_attention_reference(q, k, v, counts, indices, 64, None)
    out, _ = forward_blocks(q, k, v, counts, indices, 64, 32**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_operator_traces_under_torch_compile() -> None:
    q, k, v, mask = _case(64, 16, 0.5, torch.float32)

    def loss(a, b, c):
        return block_sparse_attention_trainable(a, b, c, mask).square().sum()

    a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
    loss(a, b, c).backward()
    eager = (a.grad.clone(), b.grad.clone(), c.grad.clone())
    a.grad = b.grad = c.grad = None
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    compiled(a, b, c).backward()
    for got, want in zip((a.grad, b.grad, c.grad), eager):
        torch.testing.assert_close(got, want)


def test_vmoba_training_step_updates_weights_and_removal_restores_the_model() -> None:
    from families import FAMILIES, forward_kwargs

    family = FAMILIES["wan"]
    model = family.build().train()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = forward_kwargs(family, batch=2, size=16, frames=3)
    with torch.no_grad():
        dense_out = model(**kwargs)[0]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    patch = accel.patch(model, VMoBAConfig(training=True, chunk_tokens=32, selection="threshold", tau=0.3))
    out = model(**kwargs)[0]
    out.square().mean().backward()
    report = patch.report().methods["vmoba"]
    assert report["backend"].get("trainable", 0) > 0 and report["density"] < 1.0
    attn = model.blocks[0].attn1
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0
    opt.step()
    patch.remove()
    assert any(not torch.equal(v, reference[k]) for k, v in model.state_dict().items())  # trained
    for k, v in model.state_dict().items():  # patch removal keeps the trained weights, adds nothing
        assert v.shape == reference[k].shape
    with torch.no_grad():
        assert not torch.equal(model(**kwargs)[0], dense_out)
    assert accel.active_patch(model) is None


def test_adaspa_training_searches_every_n_forwards_and_trains_through_the_sparse_op() -> None:
    from accel.methods.adaspa import AdaSpaConfig
    from families import FAMILIES, forward_kwargs

    family = FAMILIES["wan"]
    model = family.build().train()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = forward_kwargs(family, batch=2, size=16, frames=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    patch = accel.patch(model, AdaSpaConfig(training=True, sparsity=0.5, search_every=2, head_adaptive=False))
    runtime = patch.handle("adaspa")
    layers = len(runtime.layers)
    for forward in range(3):
        opt.zero_grad()
        model(**kwargs)[0].square().mean().backward()
        opt.step()
        assert runtime.searches["two_pass"] == layers * (1 if forward < 2 else 2)  # forwards 1 and 3 search
    report = patch.report().methods["adaspa"]
    assert report["backend"].get("trainable", 0) == 3 * layers and report["density"] < 1.0
    assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    patch.remove()
    assert any(not torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert accel.active_patch(model) is None
    with pytest.raises(ValueError, match="search_every must be an int >= 1, got 0"):
        AdaSpaConfig(training=True, search_every=0)


@pytest.mark.parametrize("spec", ["vmoba:selection=threshold:tau=0.25", "adaspa:sparsity=0.5:search_every=2"])
def test_train_video_dit_runs_with_sparse_attention(tmp_path, spec: str) -> None:
    import json

    from accel.pipelines.train import train_video_dit as tv

    log = tmp_path / "logs" / "log.jsonl"  # a folder that does not exist yet
    tv.train(
        steps=2,
        image_batch=2,
        clip_batch=1,
        clip_frames=4,
        lr=1e-4,
        label_dropout=0.1,
        seed=0,
        folder=tmp_path / "out",
        save_every=0,
        attention=spec,
        log=log,
    )
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    info = json.loads((tmp_path / "out" / "train_info.json").read_text())
    assert info["attention"] == spec
    with pytest.raises(SystemExit, match="takes 'dense', a vmoba spec"):
        tv.sparse_attention_patch(tv.VideoModel(), "delta-dit")


def test_train_compare_writes_a_table_and_loss_curves(tmp_path) -> None:
    import json

    from accel.benchmarks.train_compare import main

    for name, seconds, loss in (("dense", 2.0, 0.5), ("vmoba", 1.0, 0.51)):
        rows = [{"step": i, "loss": loss + 0.01 * (i % 2), "seconds": seconds} for i in range(30)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main([str(tmp_path / "dense.jsonl"), str(tmp_path / "vmoba.jsonl"), "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c.md").read_text()
    assert "| vmoba | 30 | 1.00 | 2.00x |" in table and "+2.0%" in table
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_ema_warms_up_from_a_random_init_and_not_from_saved_weights() -> None:
    from accel.pipelines.train.common import EMA

    start, live = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for warm_up, kept in ((True, 0.1), (False, 0.9)):  # step 0 warmed up: decay min(0.9, 1/10)
        ema = EMA(start, decay=0.9, warm_up=warm_up)
        ema.update(live, step=0)
        expected = kept * start.weight + (1 - kept) * live.weight
        torch.testing.assert_close(ema.model.weight, expected.detach())


def test_train_loss_gap_compares_settings_on_the_same_batches(monkeypatch) -> None:
    from accel.benchmarks import train_loss_gap
    from accel.pipelines.train import train_video_dit as tv

    monkeypatch.setattr(tv, "load_weights", lambda model, folder: None)  # random init: only the plumbing
    specs = ["vmoba:selection=threshold:tau=1.0", "vmoba:selection=threshold:tau=0.25"]
    rows = train_loss_gap.measure(specs, tv.WEIGHTS / "unused", batches=2, clip_frames=4, clip_batch=1,
                                  image_batch=2, seed=0)
    assert [r["spec"] for r in rows] == ["dense", "vmoba:selection=threshold:tau=1.0",
                                         "vmoba:selection=threshold:tau=0.25"]
    assert abs(rows[1]["excess"]) < 1e-3 and rows[1]["density"] > 0.95  # (nearly) every pair kept: dense
    assert rows[2]["density"] < 0.9 and rows[2]["excess"] != 0.0
