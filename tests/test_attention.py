"""The block format, the CPU backends, token geometry and partitions, and the scoped SDPA override."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from accel.kernels import block_sparse_attention_reference, block_sums_reference

from accel.adapters.base import TokenLayout
from accel.attention import (
    BlockSparseMask,
    SequenceGeometry,
    SparseAttentionHook,
    inverse_permutation,
    override_installed,
    partition_permutation,
    sparse_attention,
)
from accel.attention.backends import choose_backend, flex_available
from accel.attention.runtime import _key_padding
from accel.attention.search import block_sums
from accel.attention.tokens import chunk_ids
from accel.hooks import HookSet


def random_mask(B, H, S, block, seed=0, p=0.4):
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(S / block)
    table = torch.rand(B, H, nb, nb, generator=gen) < p
    table[0, 0, 0] = False  # a row that attends nothing
    if nb > 1:
        table[0, 0, 1] = False
        table[0, 0, 1, -1] = True  # a row with exactly the tail block
    return BlockSparseMask.from_dense(table, block, S, S), table


def test_from_dense_lists_selected_blocks_first_in_order():
    table = torch.tensor([[[[False, True, False, True], [True, True, True, True], [False] * 4]]])
    mask = BlockSparseMask.from_dense(table, 64, 150, 250)  # 3 query blocks, 4 KV blocks
    assert mask.kv_counts.tolist() == [[[2, 4, 0]]]
    assert mask.kv_indices[0, 0, 0, :2].tolist() == [1, 3]
    assert mask.kv_indices[0, 0, 1].tolist() == [0, 1, 2, 3]
    assert mask.kv_counts.dtype == mask.kv_indices.dtype == torch.int32
    assert torch.equal(mask.to_dense(), table)


def test_from_dense_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"must be \(B, H, 2, 2\)"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), 64, 100, 100)


def test_density_weighs_tail_blocks():
    # 100 tokens in blocks of 64: blocks of 64 and 36 tokens. Keep only (tail, tail).
    table = torch.tensor([[[[False, False], [False, True]]]])
    mask = BlockSparseMask.from_dense(table, 64, 100, 100)
    assert mask.density() == pytest.approx(36 * 36 / (100 * 100))
    assert mask.block_density() == pytest.approx(0.25)
    assert BlockSparseMask.full(2, 3, 64, 100, 100).density() == 1.0


@pytest.mark.parametrize("S,block", [(97, 64), (200, 64), (130, 128), (300, 128)])
@pytest.mark.parametrize("backend", ["gather", "reference"])
def test_cpu_backends_match_reference(S, block, backend):
    gen = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(2, 2, S, 72, generator=gen) for _ in range(3))
    mask, _ = random_mask(2, 2, S, block)
    key_mask = torch.ones(2, S, dtype=torch.bool)
    key_mask[1, -7:] = False
    for km in (None, key_mask):
        out, used = sparse_attention(q, k, v, mask, key_mask=km, backend=backend)
        ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, block, key_mask=km)
        assert used == backend
        torch.testing.assert_close(out, ref, atol=5e-6, rtol=0)
        assert torch.all(out[0, 0, :block] == 0)  # the empty row


@pytest.mark.parametrize("S", [128, 320])
def test_gather_whole_block_path_matches_reference_with_uneven_rows(S):
    # whole blocks, rows listing 0..all blocks: grouped by count, unmasked SDPA per group
    gen = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(2, 2, S, 64, generator=gen) for _ in range(3))
    mask, _ = random_mask(2, 2, S, 64)
    assert len(mask.kv_counts.unique()) > 1
    out, _ = sparse_attention(q, k, v, mask, backend="gather")
    ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    torch.testing.assert_close(out, ref, atol=5e-6, rtol=0)


def test_gather_cache_sized_chunks_reuse_buffers_exactly(monkeypatch):
    # chunks of one query block each: every count group spans several calls sharing one pair of buffers,
    # and a later, shorter gather must not read a longer one's leftovers
    from accel.attention import backends

    monkeypatch.setattr(backends, "_GATHER_CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 3, 512, 32, generator=gen) for _ in range(3))
    mask, _ = random_mask(1, 3, 512, 64)
    assert len(mask.kv_counts.unique()) > 2
    out, _ = sparse_attention(q, k, v, mask, backend="gather")
    ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    torch.testing.assert_close(out, ref, atol=5e-6, rtol=0)


@pytest.mark.parametrize("B,H,blocks,keep", [(1, 2, 8, 3), (2, 3, 5, 1), (1, 1, 4, 4)])
def test_gather_uniform_topk_path_matches_reference(B, H, blocks, keep):
    # every row lists `keep` blocks and nothing is padded
    gen = torch.Generator().manual_seed(blocks)
    S = 64 * blocks
    q, k, v = (torch.randn(B, H, S, 64, generator=gen) for _ in range(3))
    scores = torch.rand(B, H, blocks, blocks, generator=gen)
    table = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
    mask = BlockSparseMask.from_dense(table, 64, S, S)
    assert bool((mask.kv_counts == keep).all())
    out, _ = sparse_attention(q, k, v, mask, backend="gather")
    ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, 64)
    torch.testing.assert_close(out, ref, atol=5e-6, rtol=0)


def test_gather_matches_dense_sdpa_when_full():
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    out, _ = sparse_attention(q, k, v, BlockSparseMask.full(1, 2, 64, 150, 150), backend="gather")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=5e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("S,block", [(200, 64), (300, 128)])
def test_compiled_flex_matches_reference(S, block):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 64, generator=gen) for _ in range(3))
    mask, _ = random_mask(1, 2, S, block)
    out, used = sparse_attention(q, k, v, mask, backend="flex")
    ref, _ = block_sparse_attention_reference(q, k, v, mask.kv_counts, mask.kv_indices, block)
    assert used == "flex"
    torch.testing.assert_close(out, ref, atol=5e-6, rtol=0)


def test_flex_block_mask_carries_the_same_lists():
    pytest.importorskip("torch.nn.attention.flex_attention")
    mask, table = random_mask(1, 2, 200, 64)
    block_mask = mask.to_flex()
    assert torch.equal(block_mask.kv_num_blocks, mask.kv_counts)
    assert torch.equal(block_mask.kv_indices, mask.kv_indices)
    # The mask_mod reads the same table, tail keys masked.
    b, h, qi, ki = (torch.tensor(x) for x in (0, 1, 70, 199))
    assert bool(block_mask.mask_mod(b, h, qi, ki)) == bool(table[0, 1, 1, 3])
    assert not bool(block_mask.mask_mod(b, h, qi, torch.tensor(250)))


def test_backend_choice_without_the_cpu_kernel(monkeypatch):
    monkeypatch.setattr("accel.attention.backends.cpu_kernel_available", lambda: False)  # no compiler
    assert choose_backend("auto", torch.device("cpu"), 100) == "gather"
    assert choose_backend("auto", torch.device("cpu"), 4096, whole_blocks=True) == "gather"
    assert choose_backend("auto", torch.device("cpu"), 32768, whole_blocks=True) == "gather"
    if flex_available():  # tail blocks or padded keys: the masked gather is slow, flex repays its compile
        assert choose_backend("auto", torch.device("cpu"), 32768 - 5) == "flex"
    assert choose_backend("auto", torch.device("cuda"), 100) == "triton"
    with pytest.raises(ValueError, match="attention backend must be one of"):
        choose_backend("cuda", torch.device("cpu"), 100)


@pytest.mark.parametrize("S,block,chunk", [(200, 64, None), (130, 128, None), (256, 64, None), (320, 64, 2 ** 15)])
def test_search_block_sums_match_reference(S, block, chunk, monkeypatch):
    if chunk is not None:  # several query chunks
        monkeypatch.setattr("accel.attention.search._CHUNK_ELEMENTS", chunk)
    q, k = torch.randn(1, 2, S, 64), torch.randn(1, 2, S, 64)
    sums, lse = block_sums(q, k, block, 1 / 8)
    ref, ref_lse = block_sums_reference(q, k, block)
    torch.testing.assert_close(sums, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    again, _ = block_sums(q, k, block, 1 / 8, lse=ref_lse)  # one pass
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=1e-5)


def test_search_block_sums_with_key_mask():
    q, k = torch.randn(2, 2, 150, 32), torch.randn(2, 2, 150, 32)
    key_mask = torch.ones(2, 150, dtype=torch.bool)
    key_mask[1, 100:] = False
    sums, lse = block_sums(q, k, 64, 0.2, key_mask=key_mask)
    scores = (q @ k.transpose(-1, -2) * 0.2).masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = F.pad(scores.softmax(-1), (0, 42, 0, 42)).reshape(2, 2, 3, 64, 3, 64).sum((3, 5))
    torch.testing.assert_close(sums, probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=0)
    assert float(sums[1, :, :, 2].sum()) == 0.0  # the third key block of sample 1 is all padding


# -- token geometry and partitions -----------------------------------------------------------------------

def test_geometry_special_ranges():
    suffix = SequenceGeometry.from_layout(TokenLayout(2, 3, 4, text_tokens=5, text_position="suffix"), 29)
    assert suffix.visual_start == 0 and suffix.special == ((24, 29),)
    prefix = SequenceGeometry.from_layout(TokenLayout(1, 4, 4, text_tokens=5, text_position="prefix"), 21)
    assert prefix.visual_start == 5 and prefix.special == ((0, 5),)
    vit = SequenceGeometry.from_layout(TokenLayout(1, 4, 4, prefix_tokens=1), 17)
    assert vit.visual_start == 1 and vit.special == ((0, 1),)
    cross = SequenceGeometry.from_layout(TokenLayout(1, 4, 4, text_tokens=7, text_position="none"), 16)
    assert cross.special == ()
    level = SequenceGeometry.from_layout(TokenLayout(1, 8, 8), 16)  # a UNet level downsampled by 2
    assert (level.height, level.width) == (4, 4)
    unknown = SequenceGeometry.from_layout(TokenLayout(1, 8, 8), 50)
    assert (unknown.frames, unknown.height, unknown.width, unknown.special) == (1, 1, 50, ())


@pytest.mark.parametrize("mode,chunk", [("1d", (1, 3, 4)), ("2d", (1, 2, 2)), ("3d", (2, 2, 2)),
                                        ("2d", (1, 3, 3)), ("3d", (2, 3, 5))])
@pytest.mark.parametrize("text", ["none", "prefix", "suffix"])
def test_partition_permutations_invert_exactly(mode, chunk, text):
    layout = TokenLayout(3, 5, 7, text_tokens=4 if text != "none" else 0, text_position=text)
    geometry = SequenceGeometry.from_layout(layout, layout.self_attention_tokens)
    perm, chunk_of = partition_permutation(geometry, mode, chunk)
    x = torch.randn(2, 2, geometry.length, 8)
    assert sorted(perm.tolist()) == list(range(geometry.length))
    assert torch.equal(x.index_select(2, perm).index_select(2, inverse_permutation(perm)), x)
    # Every chunk is one contiguous run, special tokens stay in place.
    ids = [c for c in chunk_of.tolist() if c >= 0]
    runs = [c for i, c in enumerate(ids) if i == 0 or ids[i - 1] != c]
    assert len(runs) == len(set(runs))
    special = geometry.special_mask()
    assert torch.equal(perm[special], torch.arange(geometry.length)[special])


def test_2d_permutation_is_the_papers_reshape_when_divisible():
    T, H, W, ch, cw = 2, 4, 6, 2, 3
    geometry = SequenceGeometry.from_layout(TokenLayout(T, H, W), T * H * W)
    perm, _ = partition_permutation(geometry, "2d", (1, ch, cw))
    tokens = torch.arange(T * H * W).reshape(T, H // ch, ch, W // cw, cw)
    expected = tokens.permute(1, 3, 0, 2, 4).reshape(-1)  # (t, nh, ch, nw, cw) -> (nh, nw, t, ch, cw)
    assert torch.equal(perm, expected)


def test_chunk_ids_edge_chunks_are_smaller():
    ids = chunk_ids(1, 5, 5, "2d", (1, 2, 2))  # 3x3 tiles, edge tiles smaller: no padding tokens
    counts = torch.bincount(ids).tolist()
    assert counts == [4, 4, 2, 4, 4, 2, 2, 2, 1]
    with pytest.raises(ValueError, match="partition mode"):
        chunk_ids(1, 2, 2, "4d", (1, 1, 1))


# -- the scoped SDPA override ----------------------------------------------------------------------------

class _Attn(torch.nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_override_is_scoped_to_the_hooked_forward():
    original = F.scaled_dot_product_attention
    seen = []

    def handler(q, k, v, **kwargs):
        seen.append((tuple(q.shape), override_installed()))
        return torch.zeros_like(q)

    hooked, plain = _Attn(), _Attn()
    keys = sorted(hooked.__dict__)
    hooks = HookSet("accel.test")
    hooks.add_hook(hooked, SparseAttentionHook(handler), "attn")
    x = torch.randn(1, 2, 8, 4)
    assert torch.equal(hooked(x), torch.zeros_like(x))
    assert seen == [((1, 2, 8, 4), True)]
    assert torch.equal(plain(x), original(x, x, x))  # other modules: plain SDPA
    assert F.scaled_dot_product_attention is original and not override_installed()
    # Another thread calling SDPA while a hooked forward runs sees plain SDPA.
    results = {}

    def slow_handler(q, k, v, **kwargs):
        thread = threading.Thread(target=lambda: results.setdefault("other", F.scaled_dot_product_attention(q, k, v)))
        thread.start()
        thread.join()
        return torch.zeros_like(q)

    hooks.remove()
    hooks = HookSet("accel.test")
    hooks.add_hook(hooked, SparseAttentionHook(slow_handler), "attn")
    hooked(x)
    torch.testing.assert_close(results["other"], original(x, x, x))
    hooks.remove()
    assert sorted(hooked.__dict__) == keys and F.scaled_dot_product_attention is original


def test_override_restored_after_an_error():
    original = F.scaled_dot_product_attention

    def handler(q, k, v, **kwargs):
        raise RuntimeError("boom")

    module = _Attn()
    hooks = HookSet("accel.test")
    hooks.add_hook(module, SparseAttentionHook(handler), "attn")
    with pytest.raises(RuntimeError, match="boom"):
        module(torch.randn(1, 1, 4, 4))
    assert F.scaled_dot_product_attention is original
    hooks.remove()


def test_key_padding_masks():
    assert _key_padding(None, 2, 5) == (True, None)
    ok, km = _key_padding(torch.ones(2, 5, dtype=torch.bool), 2, 5)
    assert ok and km is None
    mask = torch.zeros(2, 1, 1, 5)
    mask[1, ..., -2:] = float("-inf")
    ok, km = _key_padding(mask, 2, 5)
    assert ok and km.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert _key_padding(torch.ones(2, 1, 5, 5, dtype=torch.bool), 2, 5)[0] is False  # full masks: dense
    assert _key_padding(torch.full((2, 5), 0.5), 2, 5)[0] is False  # soft biases: dense
