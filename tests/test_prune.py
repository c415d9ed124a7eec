"""HierarchicalPrune: block removal on every family, the smaller model's formats, distillation, errors, unpatch."""

from __future__ import annotations

import json

import pytest
import torch

import accel
from accel.errors import ArtifactMismatchError
from accel.methods import hierarchical_prune as hp  # registers "hierarchical-prune"
from accel.prune.artifact import PruneArtifact
from accel.prune.distill import InputPool
from accel.prune.export import load_timm
from accel.prune.select import select_blocks
from accel.prune.sensitivity import SensitivityProfile, analyze_blocks
from accel.prune.structure import pinned_blocks, prunable_blocks
from tests.families import FAMILIES, run_loop
from tests.tiny import tiny_dit

Config = hp.HierarchicalPruneConfig
VIT_INIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10, in_chans=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def dit_pool(n: int = 64, seed: int = 0) -> InputPool:
    gen = torch.Generator().manual_seed(seed)
    return InputPool({"hidden_states": torch.randn(n, 1, 8, 8, generator=gen),
                      "timestep": torch.randint(0, 1000, (n,), generator=gen),
                      "class_labels": torch.randint(0, 11, (n,), generator=gen)})


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(**VIT_INIT).eval()


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str], dict, list[int]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = dict(model.config) if hasattr(model, "config") else {}
    return state, sorted(model.__dict__), config, [id(m) for m in model.modules()]


def assert_same(model: torch.nn.Module, snap: tuple) -> None:
    state, keys, config, ids = snap
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert sorted(model.__dict__) == keys
    assert (dict(model.config) if hasattr(model, "config") else {}) == config
    assert [id(m) for m in model.modules()] == ids


# -- structure ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_block_removal_keeps_every_family_runnable(name: str) -> None:
    family = FAMILIES[name]
    model = family.build()
    blocks = prunable_blocks(accel.find_adapter(model))
    pinned = pinned_blocks(model, blocks)
    victim = [b.index for b in blocks if b.index not in pinned][-1]
    reference = run_loop(model, family)
    result = hp.prune(model, Config(distill_steps=0), removed=[victim], analyze=False, progress=False)
    out = run_loop(result.model, family)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert len(prunable_blocks(accel.find_adapter(result.model))) == len(blocks) - 1
    assert torch.equal(run_loop(model, family), reference)  # the source is never modified
    key = {"single_transformer_blocks": "num_single_layers"}.get(blocks[victim].container, "num_layers")
    if hasattr(model, "config") and key in model.config and name != "unet":
        assert result.model.config[key] == model.config[key] - 1


@pytest.mark.parametrize("build", [lambda: tiny_dit(4), tiny_vit], ids=["dit", "timm_vit"])
def test_unpatch_restores_the_original_exactly(build) -> None:
    model = build()
    family = FAMILIES["dit" if hasattr(model, "config") else "timm_vit"]
    x = torch.randn(2, 1, 8, 8) if hasattr(model, "config") else torch.randn(2, 1, 16, 16)
    call = (lambda m: m(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2])).sample) \
        if hasattr(model, "config") else (lambda m: m(x))
    del family
    with torch.no_grad():
        before = call(model)
    snap = snapshot(model)
    patch = accel.patch(model, "hierarchical-prune:ratio=0.3:protect_first=0.25")
    assert len(prunable_blocks(accel.find_adapter(model))) == 2  # 4 blocks, ceil(0.3 * 4) = 2 removed
    if hasattr(model, "config"):
        assert model.config.num_layers == 2
    assert "removed_blocks" in str(patch.report())
    patch.remove()
    assert_same(model, snap)
    with torch.no_grad():
        assert torch.equal(call(model), before)


# -- the smaller model and its formats ---------------------------------------------------------------------
def test_saved_pruned_dit_reloads_without_accel(tmp_path) -> None:
    from diffusers import DiTTransformer2DModel

    model = tiny_dit(4)
    result = hp.prune(model, Config(ratio=0.25, distill_steps=3, batch_size=8), analyze=False, pool=dit_pool(),
                      progress=False)
    result.save_pretrained(tmp_path / "pruned")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_layers"] == 3
    reloaded = DiTTransformer2DModel.from_pretrained(str(tmp_path / "pruned")).eval()
    x = torch.randn(2, 1, 8, 8)
    kwargs = dict(timestep=torch.tensor([10, 900]), class_labels=torch.tensor([3, 10]))
    with torch.no_grad():
        assert torch.equal(reloaded(x, **kwargs).sample, result.model(x, **kwargs).sample)


def test_saved_pruned_timm_vit_reloads_without_accel(tmp_path) -> None:
    import timm  # noqa: F401  (the reload below is plain timm + safetensors)
    from safetensors.torch import load_file

    model = tiny_vit()
    pool = InputPool({"x": torch.rand(32, 1, 16, 16)})
    kwargs = {"class": "timm.models.vision_transformer:VisionTransformer", **VIT_INIT}
    result = hp.prune(model, Config(ratio=0.25, distill_steps=3, batch_size=8), analyze=False, pool=pool,
                      timm_kwargs=kwargs, progress=False)
    result.save_pretrained(tmp_path / "vit")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert config["kwargs"]["depth"] == 3
    from timm.models.vision_transformer import VisionTransformer

    plain = VisionTransformer(**{k: v for k, v in config["kwargs"].items() if k != "class"}).eval()
    plain.load_state_dict(load_file(str(tmp_path / "vit" / "model.safetensors")))
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), result.model(x))
        assert torch.equal(load_timm(tmp_path / "vit")(x), result.model(x))


def test_saving_refuses_a_config_that_cannot_describe_the_pruning(tmp_path) -> None:
    model = FAMILIES["unet"].build()
    blocks = prunable_blocks(accel.find_adapter(model))
    result = hp.prune(model, Config(distill_steps=0), removed=[blocks[-1].index], analyze=False, progress=False)
    with pytest.raises(ValueError, match="cannot express this pruning"):
        result.save_pretrained(tmp_path / "unet")


def test_artifact_round_trip_and_patch_equals_the_smaller_model(tmp_path) -> None:
    model = tiny_dit(4)
    snap = snapshot(model)
    result = hp.prune(model, Config(ratio=0.25, distill_steps=4, batch_size=8, protect_first=0.25), analyze=False,
                      pool=dit_pool(), save_to=tmp_path / "art", progress=False)
    loaded = PruneArtifact.load(tmp_path / "art")
    assert loaded.removed == result.removed == [3] and loaded.source == result.artifact.source
    assert all(torch.equal(loaded.weights[k], v) for k, v in result.artifact.weights.items())
    meta = json.loads((tmp_path / "art" / "hierarchical_prune.json").read_text())
    assert meta["_type"] == "accel.hierarchical-prune" and meta["_version"] == 1
    assert meta["_data"]["removed_names"] == ["transformer_blocks.3"]
    x = torch.randn(2, 1, 8, 8)
    kwargs = dict(timestep=torch.tensor([100, 700]), class_labels=torch.tensor([0, 9]))
    with accel.patch(model, Config(artifact=str(tmp_path / "art"))), torch.no_grad():
        patched = model(x, **kwargs).sample
    with torch.no_grad():
        assert torch.equal(patched, result.model(x, **kwargs).sample)
    assert_same(model, snap)


def test_artifact_refuses_another_model(tmp_path) -> None:
    hp.prune(tiny_dit(4), Config(ratio=0.25, distill_steps=0), analyze=False, save_to=tmp_path / "a", progress=False)
    with pytest.raises(ArtifactMismatchError, match="belongs to model"):
        accel.patch(tiny_dit(5), Config(artifact=str(tmp_path / "a")))
    with pytest.raises(ArtifactMismatchError, match="other weights"):
        accel.patch(tiny_dit(4, seed=1), Config(artifact=str(tmp_path / "a")))


def test_artifact_made_in_fp32_fits_the_same_weights_in_bf16(tmp_path) -> None:
    """Users load checkpoints in bf16: an artifact distilled from the fp32 weights applies to them (and its
    distilled blocks run in the model's dtype); other weights in bf16 are still refused."""
    hp.prune(tiny_dit(4), Config(ratio=0.25, distill_steps=2, batch_size=8), analyze=False, pool=dit_pool(),
             save_to=tmp_path / "a", progress=False)
    model = tiny_dit(4).to(torch.bfloat16)
    x = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    kwargs = dict(timestep=torch.tensor([100, 700]), class_labels=torch.tensor([0, 9]))
    with accel.patch(model, Config(artifact=str(tmp_path / "a"))) as patch, torch.no_grad():
        out = model(x, **kwargs).sample
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert "removed" in str(patch.report())
    with pytest.raises(ArtifactMismatchError, match="other weights"):
        accel.patch(tiny_dit(4, seed=1).to(torch.bfloat16), Config(artifact=str(tmp_path / "a")))


# -- recovery ------------------------------------------------------------------------------------------
def test_distillation_lowers_loss_and_keeps_early_blocks() -> None:
    model = tiny_dit(4)
    result = hp.prune(model, Config(ratio=0.25, distill_steps=15, batch_size=16, distill_lr=1e-3,
                                    protect_first=0.5), removed=[2], analyze=False, pool=dit_pool(), progress=False)
    d = result.distill
    assert d.steps == 15 and d.loss_after < d.loss_before
    assert d.frozen_blocks == [0, 1] and d.trained_blocks == [3]
    student = result.model
    for i in (0, 1):  # Positional Weight Preservation: bit-identical early blocks
        for (k, a), b in zip(model.transformer_blocks[i].state_dict().items(),
                             student.transformer_blocks[i].state_dict().values()):
            assert torch.equal(a, b), k
    for name in ("pos_embed", ):
        assert all(torch.equal(a, b) for a, b in zip(getattr(model, name).state_dict().values(),
                                                      getattr(student, name).state_dict().values()))
    trained = student.transformer_blocks[2]  # original block 3
    assert not torch.equal(trained.attn1.to_q.weight, model.transformer_blocks[3].attn1.to_q.weight)
    assert all(p.requires_grad for p in model.parameters())  # the teacher is untouched


# -- choosing blocks -----------------------------------------------------------------------------------
def test_selection_by_position_and_by_sensitivity() -> None:
    assert select_blocks(8, ratio=0.3) == [5, 6, 7]  # no profile: the last candidates
    score = [1, 1, 1, 0.9, 0.0, 0.1, 0.05, 1.0]  # the last block matters, 4-6 do not
    assert select_blocks(8, ratio=0.3, score=score) == [4, 5, 6]
    assert select_blocks(8, ratio=0.2, score=score, pinned={6: "test"}) == [4, 5]
    shares = [0.1] * 8  # 80% of the time in blocks
    assert select_blocks(8, latency_budget=0.75, time_fraction=shares) == [5, 6, 7]


def test_latency_budget_through_patch_reports_its_prediction() -> None:
    model = tiny_dit(4)
    with accel.patch(model, Config(latency_budget=0.8, protect_first=0.25)) as patch:
        facts = patch.report().methods["hierarchical-prune"]
        assert facts["predicted_latency"] <= 0.8 and facts["chosen_by"] == "position"


def test_analyze_blocks_profile_table_plot_and_json(tmp_path) -> None:
    model = tiny_dit(4)
    profile = analyze_blocks(model, pool=dit_pool(16), progress=False)
    assert len(profile.metrics["output_error"]) == 4 and profile.baseline["output_error"] == 0.0
    assert all(v > 0 for v in profile.metrics["output_error"]) and len(profile.time_fraction) == 4
    assert profile.pinned == [0] and "transformer_blocks.3" in profile.table()
    assert profile.plot(tmp_path / "p.png").stat().st_size > 1000
    again = SensitivityProfile.load(profile.save(tmp_path / "p.json"))
    assert again.score == profile.score
    with accel.patch(model, Config(ratio=0.25, profile=str(tmp_path / "p.json"))) as patch:
        facts = patch.report().methods["hierarchical-prune"]
        assert facts["chosen_by"] == "measured sensitivity + position"


def test_analyze_classifier_top1() -> None:
    model = tiny_vit()
    images, labels = torch.rand(20, 1, 16, 16), torch.arange(20) % 10
    profile = analyze_blocks(model, images=images, labels=labels, progress=False)
    assert list(profile.metrics) == ["top1"] and len(profile.blocks) == 4


def test_analyze_pipeline_scores_with_the_callers_metric_and_psnr() -> None:
    from accel.calls import build_call
    from tests.tiny_pipelines import build_pipeline

    pipe = build_pipeline("pixart")
    calls = [build_call(pipe, ["a cat", "a dog"], [0, 1], 2)]
    seen: list[int] = []

    def score(images: torch.Tensor, given: list) -> dict[str, float]:
        seen.append(len(images))
        assert given is calls
        return {"ink": float(images.mean())}

    profile = analyze_blocks(pipe, calls=calls, score=score, progress=False)
    blocks = len(prunable_blocks(accel.find_adapter(pipe.transformer)))
    assert list(profile.metrics) == ["ink", "psnr"] and profile.baseline["psnr"] == float("inf")
    assert seen == [2] * (blocks + 1) and all(v < float("inf") for v in profile.metrics["psnr"])
    assert profile.setting == {"evaluator": "generation", "images": 2, "steps": 2}


def test_classifier_analysis_and_distillation_need_data_from_the_caller() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"images=\.\.\., labels=\.\.\."):
        analyze_blocks(model, progress=False)
    with pytest.raises(ValueError, match=r"InputPool\(\{'x': images\}\)"):
        hp.prune(model, Config(ratio=0.25), analyze=False, progress=False)


def test_pinned_blocks_are_adapter_facts() -> None:
    from tests.tiny_pipelines import build_pipeline

    sd3 = build_pipeline("sd3").transformer
    assert list(accel.find_adapter(sd3).pinned_blocks()) == [len(sd3.transformer_blocks) - 1]
    assert pinned_blocks(tiny_dit(4), prunable_blocks(accel.find_adapter(tiny_dit(4)))) == {
        0: "its adaLN embedding also conditions DiT's output layer"}


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, match", [
    ({"ratio": -0.1}, r"ratio must be in \(0.0, 1.0\), got -0.1"),
    ({"ratio": 1.0}, r"ratio must be in \(0.0, 1.0\)"),
    ({"latency_budget": 1.5}, r"latency_budget must be in"),
    ({"ratio": 0.3, "latency_budget": 0.7}, "ratio or latency_budget, not both"),
    ({"artifact": "x", "ratio": 0.3}, "already fixes the removed blocks"),
    ({"protect_first": 1.0}, "protect_first must be in"),
])
def test_bad_settings(settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**settings)


def test_bad_targets() -> None:
    model = tiny_dit(4)
    with pytest.raises(ValueError, match="removes all 4 blocks"):
        hp.choose_blocks(model, Config(ratio=0.95, protect_first=0.0))
    with pytest.raises(ValueError, match="Removing all 4 blocks"):
        hp.prune(model, Config(distill_steps=0), removed=[0, 1, 2, 3], analyze=False)
    with pytest.raises(ValueError, match="only 2 may be removed"):
        hp.choose_blocks(model, Config(ratio=0.7, protect_first=0.5))
    with pytest.raises(ValueError, match=r"latency_budget=0.05 is below what the blocks that must stay cost"):
        hp.choose_blocks(model, Config(latency_budget=0.05))
    with pytest.raises(ValueError, match=r"Block 0 \(transformer_blocks.0\) cannot be removed"):
        hp.prune(model, Config(distill_steps=0), removed=[0], analyze=False)
    with pytest.raises(ValueError, match="do not exist"):
        hp.prune(model, Config(distill_steps=0), removed=[7], analyze=False)
    assert_unpatched = not hasattr(model, "_accel_patch")
    assert assert_unpatched


def test_cli_form_and_stage_order() -> None:
    config = accel.registry.parse_method("hierarchical-prune:ratio=0.3")
    assert isinstance(config, Config) and config.ratio == 0.3
    assert Config.from_dict(config.to_dict()) == config
    assert accel.registry.get_method("hierarchical-prune").stage == accel.Stage.PRUNE


def test_prune_then_quantize_int4_memory() -> None:
    model = tiny_dit(4)
    snap = snapshot(model)
    patch, memory = hp.prune_then_quantize(model, Config(ratio=0.25))
    assert memory["pruned_bytes"] < memory["fp32_bytes"] and memory["quantized_bytes"] < memory["pruned_bytes"]
    print(memory)  # the <= 0.25x target is for digits-dit (benchmarks/prune_bench.py); tiny models are embedding-heavy
    patch.remove()
    assert_same(model, snap)

