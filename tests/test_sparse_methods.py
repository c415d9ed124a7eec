"""AdaSpa and VMoBA: selection rules on hand-made scores, configs, every family patched, exact removal."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

ORIGINAL_SDPA = F.scaled_dot_product_attention

from families import FAMILIES, run_loop

import accel
from accel.attention.backends import cpu_kernel_available
from accel.hooks import accel_hook_names
from accel.methods import adaspa, vmoba  # noqa: F401  (registers the methods)
from accel.methods.adaspa import AdaSpaConfig, head_sparsities, recall_at, select_blocks
from accel.methods.vmoba import Selection, VMoBAConfig, select_chunks

# Sizes that give self-attention sequences of several 64-token blocks.
SIZES = {"dit": 24, "pixart": 24, "sd3": 24, "flux": 12, "wan": 16, "hunyuan_video": 8, "cogvideox": 16,
         "cogvideox15": 16, "ltx": 8, "unet": 16, "timm_vit": 96, "timm_deit": 96, "timm_swin": 64}
FAST = {"wan", "flux", "hunyuan_video", "timm_vit"}
STEPS = 3


def _planned(backend: str) -> bool:
    """A record of a call the method planned: run sparse, or dense because the plan listed every block."""
    return not backend.startswith("dense") or backend == "dense (the plan lists every block)"


def _only_handle(patch: accel.Patch) -> object:
    """The handle of the patch's one method."""
    (name,) = patch.report().methods
    return patch.handle(name)


def snapshot(model):
    return {name: sorted(m.__dict__) for name, m in model.named_modules()}, {
        k: v.clone() for k, v in model.state_dict().items()}


def configs():
    return [AdaSpaConfig(sparsity=0.6, warmup=0.0, search_steps=(0.0, 0.5)),
            VMoBAConfig(chunk_tokens=32, top_k=1, warmup=0.0)]


def run(model, family):
    return run_loop(model, family, steps=STEPS, size=SIZES[family.name], frames=family.frames[1])


# -- selection on hand-made scores ---------------------------------------------------------------------

def test_select_blocks_per_head_top_k():
    sums = torch.tensor([[[[9.0, 1, 0, 0], [0, 8, 7, 0], [0, 0, 1, 6], [5, 0, 0, 4]]]])  # (1, 1, 4, 4)
    table = select_blocks(sums, torch.tensor([0.5]))  # keep 8 of 16
    assert int(table.sum()) == 8
    assert torch.all(table[sums >= 4])  # the six largest, plus two of the 1s
    row = select_blocks(sums, torch.tensor([0.75]), row_wise=True)  # one block per row
    assert row.sum(-1).tolist() == [[[1, 1, 1, 1]]]
    assert row[0, 0].nonzero()[:, 1].tolist() == [0, 1, 3, 0]


def test_select_blocks_keeps_every_row_and_counts_forced_inside_budget():
    sums = torch.zeros(1, 1, 3, 3)
    sums[0, 0, 0, 0] = 10.0
    sums[0, 0, 1, 2] = 1.0  # row 2 has no positive score at all
    table = select_blocks(sums, torch.tensor([0.9]))  # budget: max(Qb, 1) = 3 blocks
    assert bool(table.any(-1).all())
    forced = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    forced[..., 1] = True  # a sink column counted inside the budget
    with_sink = select_blocks(sums, torch.tensor([2 / 3]), forced)  # 3 blocks: all the sink column
    assert torch.all(with_sink[..., 1]) and int(with_sink.sum()) == 3 + int((~forced & with_sink).sum())


def test_head_adaptive_rule_keeps_the_average():
    # Head 0 concentrated (high recall), head 1 uniform (low), heads 2 and 3 in between.
    sums = torch.ones(1, 4, 4, 4)
    sums[0, 0] = 0.001
    sums[0, 0, :, 0] = 1.0
    sums[0, 2, :, :2] = 3.0
    sums[0, 3, :, :1] = 6.0
    recall = recall_at(sums, 0.75)  # the top 4 of 16 blocks
    assert recall[0, 0] > 0.99 and recall[0, 1] == pytest.approx(0.25)
    assert recall[0, 2] == pytest.approx(12 / 32) and recall[0, 3] == pytest.approx(24 / 36)
    # Base 0.5: only head 0 reaches recall 0.8 at (1+s)/2 = 0.75; the worst head (1) gets (3s-1)/2 = 0.25.
    s = head_sparsities(sums, 0.5, threshold=0.8)
    assert s.tolist() == pytest.approx([0.75, 0.25, 0.5, 0.5])
    assert s.mean().item() == pytest.approx(0.5)
    assert torch.equal(head_sparsities(torch.ones(1, 4, 4, 4), 0.5, 0.8), torch.full((4,), 0.5))  # none qualify


def test_vmoba_selection_modes_on_hand_made_scores():
    scores = torch.tensor([[[[5.0, 1, 4, 0], [0, 5, 3, 2]]]])  # (1, 1, Qb=2, C=4)
    own = torch.tensor([[True, False, False, False], [False, True, False, False]])
    topk = select_chunks(scores, own, Selection.TOPK, top_k=1, tau=0.25)
    assert topk[0, 0].tolist() == [[True, False, True, False], [False, True, True, False]]
    glob = select_chunks(scores, own, Selection.GLOBAL, top_k=1, tau=0.25)  # 2 pairs across the head
    assert glob[0, 0].tolist() == [[True, False, True, False], [False, True, True, False]]
    # Threshold: min-max normalised pairs 1, 1, .8, .6, .4, .2, 0, 0 (total 4). tau 0.25 needs 1: the two
    # own pairs reach it, nothing more. tau 0.6 needs 2.4: the 0.8 pair (block 0, chunk 2) too.
    thr = select_chunks(scores, own, Selection.THRESHOLD, top_k=0, tau=0.25)
    assert torch.equal(thr[0, 0], own)
    thr = select_chunks(scores, own, Selection.THRESHOLD, top_k=0, tau=0.6)
    assert int((thr & ~own).sum()) == 1 and bool(thr[0, 0, 0, 2])
    none = select_chunks(scores, own, Selection.TOPK, top_k=0, tau=0.25)
    assert torch.equal(none[0, 0], own)


# -- configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: AdaSpaConfig(sparsity=1.0), r"AdaSpaConfig.sparsity must be in \[0.0, 1.0\), got 1.0"),
    (lambda: AdaSpaConfig(sparsity=-0.1), "AdaSpaConfig.sparsity"),
    (lambda: AdaSpaConfig(block_size=48), r"AdaSpaConfig.block_size must be 64 or 128 .*got 48"),
    (lambda: AdaSpaConfig(search_steps=(0.6, 0.2)), "search_steps must be increasing"),
    (lambda: AdaSpaConfig(search_steps=()), "at least one search step"),
    (lambda: AdaSpaConfig(backend="cuda"), "AdaSpaConfig.backend must be one of"),
    (lambda: VMoBAConfig(block_size=48), r"VMoBAConfig.block_size must be 64 or 128 .*got 48"),
    (lambda: VMoBAConfig(selection="best"), "VMoBAConfig.selection must be one of 'topk', 'global', 'threshold'"),
    (lambda: VMoBAConfig(tau=0.0), r"VMoBAConfig.tau must be in \(0.0, 1.0\]"),
    (lambda: VMoBAConfig(warmup=1.0), "VMoBAConfig.warmup"),
])
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_from_strings_and_round_trip():
    config = accel.registry.parse_method("adaspa:sparsity=0.9:block_size=128:search_steps=0.2/0.5")
    assert config == AdaSpaConfig(sparsity=0.9, block_size=128, search_steps=(0.2, 0.5))
    vm = accel.registry.parse_method("vmoba:selection=threshold:tau=0.3")
    assert vm.selection is Selection.THRESHOLD
    for cfg in (config, vm, AdaSpaConfig(), VMoBAConfig()):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Separate list items with '/'"):
        accel.registry.parse_method("adaspa:search_steps=0.2,0.6")


# -- every family ---------------------------------------------------------------------------------------

def _family_params():
    for name in FAMILIES:
        for cfg in configs():
            marks = () if name in FAST else (pytest.mark.slow,)
            yield pytest.param(name, cfg, id=f"{name}-{type(cfg).__name__}", marks=marks)


@pytest.mark.parametrize("name,config", list(_family_params()))
def test_family_patched_is_finite_and_removal_exact(name, config):
    family = FAMILIES[name]
    model = family.build()
    keys, state = snapshot(model)
    reference = run(model, family)
    patch = accel.patch(model, config)
    if family.is_denoiser:
        patch.reset(num_steps=STEPS)
    out = run(model, family)
    runtime = _only_handle(patch)
    report = next(iter(patch.report().methods.values()))
    patch.remove()
    assert torch.isfinite(out).all()
    assert report["backend"] and "per_step" in report
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA  # the scoped override left nothing behind
    assert accel_hook_names(model) == []
    after_keys, after_state = snapshot(model)
    assert after_keys == keys
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert torch.equal(run(model, family), reference)
    if name not in ("timm_swin",):  # Swin windows are one block: always dense
        # The method planned (at these tiny sizes a plan may list every block, which runs as SDPA)
        assert any(_planned(r.backend) for r in runtime.records()), report


@pytest.mark.parametrize("config", [AdaSpaConfig(sparsity=0.6, warmup=0.0, search_steps=(0.0,)), configs()[1]],
                         ids=["adaspa", "vmoba"])
def test_reported_density_matches_the_mask(config):
    family = FAMILIES["wan"]
    model = family.build()
    patch = accel.patch(model, config)
    patch.reset(num_steps=STEPS)
    run(model, family)
    runtime = _only_handle(patch)
    report = next(iter(patch.report().methods.values()))
    last_step = max(r.step for r in runtime.records())
    sparse = [r for r in runtime.records() if r.step == last_step]
    assert sparse and all(not r.backend.startswith("dense") for r in sparse)
    for rec in sparse:
        mask = runtime.last_masks[(rec.layer, 0)]
        assert rec.density == pytest.approx(mask.density())
        assert report["per_layer"][rec.layer] == pytest.approx(round(mask.density(), 4))
        assert mask.density() < 1.0
    assert 0 < report["density"] < 1
    patch.remove()


def test_joint_text_is_always_attended():
    family = FAMILIES["flux"]  # text is a 5-token prefix: block 0 holds it
    model = family.build()
    patch = accel.patch(model, AdaSpaConfig(sparsity=0.9, warmup=0.0, search_steps=(0.0,), head_adaptive=False))
    patch.reset(num_steps=STEPS)
    run(model, family)
    runtime = _only_handle(patch)
    assert runtime.last_masks
    for mask in runtime.last_masks.values():
        table = mask.to_dense()
        assert torch.all(table[..., :, 0]) and torch.all(table[..., 0, :])
    patch.remove()


def test_cross_attention_is_not_hooked():
    family = FAMILIES["pixart"]
    model = family.build()
    patch = accel.patch(model, VMoBAConfig())
    names = accel_hook_names(model)
    assert sorted(n for n in names if n.startswith("accel.vmoba")) == [
        "accel.vmoba.attn.transformer_blocks.0", "accel.vmoba.attn.transformer_blocks.1"]
    hooked = {id(m) for m in model.modules() if "_diffusers_hook" in m.__dict__}
    assert all(id(block.attn2) not in hooked for block in model.transformer_blocks)
    assert all(id(block.attn1) in hooked for block in model.transformer_blocks)
    patch.remove()


@pytest.mark.parametrize("backend", ["gather", "auto"])
def test_adaspa_schedule_dense_search_reuse(backend):
    fused = backend == "auto" and cpu_kernel_available()  # CPU: the search rides the C++ kernel's pass
    family = FAMILIES["wan"]
    model = family.build()
    patch = accel.patch(model, AdaSpaConfig(sparsity=0.5, warmup=0.2, search_steps=(0.2, 0.6), backend=backend))
    patch.reset(num_steps=5)
    run_loop(model, family, steps=5, size=16, frames=3)
    runtime = _only_handle(patch)
    kinds = {}
    for rec in runtime.records():
        kinds.setdefault(rec.step, set()).add(rec.backend)
    # 5 steps: step 0 warm-up, 1 search (two-pass), 2 reuse, 3 search (one-pass, cached LSE), 4 reuse.
    assert kinds[0] == {"dense (warm-up)"} and kinds[1] == {"dense (search)"} and kinds[3] == {"dense (search)"}
    assert "dense" not in " ".join(kinds[2] | kinds[4])
    layers = len(runtime.layers)
    if fused:
        assert runtime.searches == {"two_pass": 0, "one_pass": 0, "fused": 2 * layers}
    else:
        assert runtime.searches == {"two_pass": layers, "one_pass": layers, "fused": 0}
    patch.remove()


def test_reused_pattern_keeps_its_index_lists(monkeypatch):
    """AdaSpa's reuse steps hand the searched table again: the runtime builds its index lists once per
    search and layer, and the outputs equal a run that rebuilds them every call."""
    from accel.attention import runtime as rt

    family = FAMILIES["wan"]
    config = AdaSpaConfig(sparsity=0.5, warmup=0.2, search_steps=(0.2, 0.6), backend="gather")
    built = []
    original = rt.BlockSparseMask.from_dense
    monkeypatch.setattr(rt.BlockSparseMask, "from_dense",
                        classmethod(lambda cls, *a, **k: built.append(1) or original(*a, **k)))
    model = family.build()
    with accel.patch(model, config) as patch:
        patch.reset(num_steps=5)
        out = run_loop(model, family, steps=5, size=16, frames=3)
        layers = len(_only_handle(patch).layers)
    assert len(built) == 2 * layers  # steps 2 and 4 reuse the searches of steps 1 and 3
    monkeypatch.setattr(rt._BuiltMask, "matches", lambda self, plan, call: False)
    built.clear()
    with accel.patch(model, config) as patch:
        patch.reset(num_steps=5)
        assert torch.equal(run_loop(model, family, steps=5, size=16, frames=3), out)
    assert len(built) == 2 * layers


def test_vmoba_dense_warmup_fraction():
    family = FAMILIES["wan"]
    model = family.build()
    patch = accel.patch(model, VMoBAConfig(chunk_tokens=32))
    patch.reset(num_steps=4)
    run_loop(model, family, steps=4, size=16, frames=3)
    steps = {r.step: r.backend for r in _only_handle(patch).records()}
    assert steps[0] == "dense (warm-up)" and _planned(steps[1])
    patch.remove()


@pytest.mark.parametrize("config", [AdaSpaConfig(), VMoBAConfig(chunk_tokens=32, warmup=0.2)],
                         ids=["adaspa", "vmoba"])
def test_bare_loop_places_warmup_and_searches_by_timestep(config):
    """A hand-written loop that never calls patch.reset(num_steps=N): the dense warm-up and AdaSpa's
    searches are placed by noise level, which on this 5-step schedule (progress 0, .22, .44, .67, .89)
    picks the same steps as the count (warm-up step 0, searches at steps 1 and 3)."""
    family = FAMILIES["wan"]
    model = family.build()
    name = "adaspa" if isinstance(config, AdaSpaConfig) else "vmoba"
    with accel.patch(model, config) as p:
        p.reset(num_steps=5)
        by_count = run_loop(model, family, steps=5, size=16, frames=3)
        counted = p.report().methods[name]
    with accel.patch(model, config) as p:
        by_timestep = run_loop(model, family, steps=5, size=16, frames=3)
        facts = p.report().methods[name]
        steps = {r.step: r.backend for r in _only_handle(p).records()}
    assert counted["steps_by"] == "step count"
    assert facts["steps_by"].startswith("timestep (the step count is unknown")
    assert steps[0] == "dense (warm-up)" and _planned(steps[4])
    if name == "adaspa":
        assert facts["searches"] == counted["searches"] and sum(facts["searches"].values()) > 0
        assert facts["density"] < 1.0
    torch.testing.assert_close(by_timestep, by_count, rtol=0, atol=0)
    assert accel_hook_names(model) == []


def test_attention_that_bypasses_sdpa_is_reported_not_silently_dense():
    from diffusers.models.attention_processor import AttnProcessor

    family = FAMILIES["pixart"]
    model = family.build()
    model.set_attn_processor(AttnProcessor())  # the pre-2.0 processor: bmm + softmax, no SDPA call
    patch = accel.patch(model, VMoBAConfig(warmup=0.0))
    patch.reset(num_steps=STEPS)
    with pytest.warns(UserWarning, match=r"ran without calling torch.nn.functional.scaled_dot_product_attention"):
        run(model, family)
    report = patch.report().methods["vmoba"]
    assert report["not_intercepted"] == {"transformer_blocks.0": STEPS, "transformer_blocks.1": STEPS}
    patch.remove()


@pytest.mark.parametrize("select", ["set_attention_backend", "attention_backend"])
def test_diffusers_accel_backend_runs_the_sparse_path_without_the_sdpa_override(select, monkeypatch):
    """A dispatcher model (Wan) on diffusers' 'accel' backend: same sparse outputs as the SDPA interception,
    reached without swapping F.scaled_dot_product_attention, and the report says which path ran."""
    import accel.attention.intercept as intercept
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

    # set_attention_backend also sets diffusers' process-wide active backend: restore it after the test
    active = _AttentionBackendRegistry._active_backend
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", active)
    family = FAMILIES["wan"]
    model = family.build()
    config = AdaSpaConfig(warmup=0.0, sparsity=0.5, search_steps=(0.0,))
    with accel.patch(model, config) as patch:
        patch.reset(num_steps=STEPS)
        reference = run(model, family)
        assert patch.report().methods["adaspa"]["attention_path"] == {"sdpa-intercept": 2 * STEPS}
    installs = []
    real_override = intercept._sdpa_override

    def counting_override():
        installs.append(1)
        return real_override()

    monkeypatch.setattr(intercept, "_sdpa_override", counting_override)
    with accel.patch(model, config) as patch:
        patch.reset(num_steps=STEPS)
        if select == "set_attention_backend":
            model.set_attention_backend("accel")
            out = run(model, family)
            model.reset_attention_backend()
        else:
            with attention_backend("accel"):
                out = run(model, family)
        report = patch.report().methods["adaspa"]
    assert report["attention_path"] == {"diffusers-dispatcher": 2 * STEPS} and report["density"] < 1.0
    assert installs == []  # no process-wide SDPA swap on the dispatcher path
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    with attention_backend("accel"):  # without a patch the backend is plain SDPA
        dense = run(model, family)
    torch.testing.assert_close(dense, run(model, family), rtol=1e-5, atol=1e-6)


def test_accel_backend_registration_is_idempotent_and_refuses_context_parallel():
    from accel.attention.dispatcher import _accel_attention, register_diffusers_backend
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    assert register_diffusers_backend() == register_diffusers_backend() == "accel"
    member = AttentionBackendName("accel")
    assert list(_AttentionBackendRegistry.list_backends()).count(member) == 1
    assert "accel" in {m.value for m in AttentionBackendName.__members__.values()}
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="does not support context parallelism"):
        _accel_attention(q, q, q, _parallel_config=object())
    torch.testing.assert_close(_accel_attention(q, q, q), F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2))


def test_a_plan_listing_every_block_runs_dense_attention():
    """When a selection lists every block, e.g. VMoBA's top_k covering all of a 1D layer's frame chunks, the
    call runs dense SDPA (the same attention, faster than a block-sparse kernel walking full lists). The
    record says why; the output is the unpatched model's."""
    family = FAMILIES["wan"]
    model = family.build()
    reference = run(model, family)
    with accel.patch(model, VMoBAConfig(chunk_tokens=32, top_k=64, warmup=0.0)) as patch:
        patch.reset(num_steps=STEPS)
        out = run(model, family)
        records = _only_handle(patch).records()
    assert records and all(r.backend == "dense (the plan lists every block)" for r in records), records[:3]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_vmoba_modes_profile_runs_at_a_tiny_grid(tmp_path):
    from accel.benchmarks import vmoba_modes

    out = tmp_path / "modes.json"
    vmoba_modes.main(["--grid", "3x8x8", "--heads", "2", "--head-dim", "16", "--top-k", "1", "--chunk-tokens",
                      "32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["1d", "2d", "3d"]
    assert all(0 < r["block_density"] <= 1 and r["seconds"]["kernel"] >= 0 for r in rows)


def test_vmoba_density_sets_top_k_per_layer_from_its_chunk_count():
    """``density`` attends about the same share of chunks in 1D layers (few whole-frame chunks) as in 2D/3D
    layers (many small ones); ``top_k`` alone would not."""
    assert vmoba.chunks_to_add(11, 3, None) == 3
    assert vmoba.chunks_to_add(11, 3, 0.2) == 1  # 2 of 11 with the own chunk
    assert vmoba.chunks_to_add(80, 3, 0.2) == 15  # 16 of 80
    assert vmoba.chunks_to_add(4, 3, 0.1) == 0  # at least the own chunk
    assert vmoba.chunks_to_add(10, 0, 1.0) == 9
    with pytest.raises(ValueError, match="VMoBAConfig.density"):
        VMoBAConfig(density=0.0)
    assert accel.registry.parse_method("vmoba:density=0.25").density == 0.25
