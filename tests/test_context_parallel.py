"""accel under diffusers' context parallelism, in two CPU processes over gloo.

Each scenario builds the same tiny 4-block Wan pipeline on both ranks, enables Ulysses context
parallelism (``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=2))``) before or after
``accel.patch``, and runs two seeded calls. A hang is what a rank-dependent caching decision looks like
(one rank skips a block whose attention the other rank waits in), so every scenario runs under a timeout.

diffusers picks each rank's device as ``rank % torch.accelerator.device_count()``, which is zero on a
machine without an accelerator; the workers report one device so that CPU runs get ``cpu:0``. Ring
attention cannot run on CPU (diffusers' native backend returns no log-sum-exp), so only the refusal of
sparse attention under ring is tested.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from accel.benchmarks.context_parallel import run_on_ranks  # noqa: E402
from diffusers import ContextParallelConfig, WanTransformer3DModel  # noqa: E402
from tiny_pipelines import build_pipeline, call_kwargs  # noqa: E402

import accel  # noqa: E402

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
TIMEOUT_S = 240
CALL = {"height": 128, "width": 128, "num_frames": 9, "num_inference_steps": 6}  # 192 video tokens
SPECS = {
    "delta-dit": "delta-dit",
    "bac": "bac",
    "default": None,
    "vmoba": "vmoba:chunk_tokens=64:top_k=1:warmup=0",
    "quest": "quest:act_granularity=per_token:finetune_iters=0:keep_float_when_faster=false",
}


def _pipeline() -> Any:
    """The tiny Wan pipeline with four blocks (one block leaves caching nothing to skip)."""
    pipe = build_pipeline("wan")
    config = dict(pipe.transformer.config)
    config["num_layers"] = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel.from_config(config).eval()
    pipe.register_modules(transformer=transformer)
    return pipe


def _calls(pipe: Any) -> list[np.ndarray]:
    kwargs = {**call_kwargs("wan"), **CALL}
    return [pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).frames.numpy().copy()
            for seed in (0, 1)]


def _patch(pipe: Any, name: str) -> Any:
    spec = SPECS[name]
    return accel.patch(pipe) if spec is None else accel.patch(pipe, spec)


def _facts(patch: Any) -> dict[str, Any]:
    """Per method: compute fraction or density, and the report's text (compared between ranks)."""
    report = patch.report()
    facts = {}
    for method, section in report.methods.items():
        keys = ("compute_fraction", "density", "kept_float_for_parallelism")
        facts[method] = {k: section.get(k) for k in keys}
    facts["text"] = str(report)
    return facts


def _enable(pipe: Any, ring: bool = False) -> None:
    degree = {"ring_degree": WORLD} if ring else {"ulysses_degree": WORLD}
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree))


def _scenario(name: str, order: str) -> dict[str, Any]:
    """One method on one rank: patch and enable in ``order``, two calls, the report; errors as text."""
    pipe = _pipeline()
    try:
        if order == "enable-first":
            _enable(pipe, ring=name.endswith("-ring"))
        patch = None if name == "none" else _patch(pipe, name.removesuffix("-ring"))
        if order == "patch-first":
            _enable(pipe)
        outputs = _calls(pipe)
        return {"outputs": outputs, "facts": _facts(patch) if patch is not None else {}}
    except Exception as exc:  # noqa: BLE001 - the test asserts on the message
        return {"error": f"{type(exc).__name__}: {exc}"}


def _agreement_checks(rank: int) -> dict[str, Any]:
    """The agreement helpers themselves, with values that differ by rank."""
    from accel.parallel import check_agreement, gather_records

    group = dist.group.WORLD
    gathered = gather_records({"a": [{"x": np.full(2, float(rank))}]}, group)
    try:
        check_agreement("a test decision", {"steps": [0, rank]}, group)
        disagreement = None
    except RuntimeError as exc:
        disagreement = str(exc)
    check_agreement("an agreed decision", {"steps": [0, 2]}, group)  # must not raise
    return {"gathered": gathered["a"][0]["x"].tolist(), "disagreement": disagreement}


def _scenarios_on_rank(rank: int, scenarios: list[tuple[str, str]]) -> dict[Any, Any]:
    return {(name, order): _agreement_checks(rank) if name == "agreement" else _scenario(name, order)
            for name, order in scenarios}


def _run_ranks(scenarios: list[tuple[str, str]]) -> list[dict[Any, Any]]:
    results = run_on_ranks(_scenarios_on_rank, scenarios, WORLD, TIMEOUT_S)
    assert results is not None, f"a rank did not finish within {TIMEOUT_S} s (hung in a collective?)"
    return results


@pytest.fixture(scope="module")
def ulysses_runs() -> list[dict[Any, Any]]:
    scenarios = [(name, order) for order in ("enable-first", "patch-first")
                 for name in ("delta-dit", "bac", "default", "vmoba", "quest")]
    return _run_ranks(scenarios + [("vmoba-ring", "enable-first"), ("agreement", "-")])


@pytest.fixture(scope="module")
def one_process() -> dict[str, list[np.ndarray]]:
    """Each method's outputs in one process, and the unpatched ones."""
    results = {}
    for name in ("none", "delta-dit", "bac", "default", "vmoba"):
        pipe = _pipeline()
        patch = None if name == "none" else _patch(pipe, name)
        results[name] = _calls(pipe)
        if patch is not None:
            patch.remove()
    return results


@pytest.mark.parametrize("order", ["enable-first", "patch-first"])
@pytest.mark.parametrize("name", ["delta-dit", "bac", "default"])
def test_caching_under_ulysses_matches_one_process(ulysses_runs, one_process, name, order):
    """Caching skips the same blocks on every rank (no hang) and gives the one-process output, whichever
    of accel.patch and enable_parallelism ran first."""
    for rank, results in enumerate(ulysses_runs):
        result = results[(name, order)]
        assert "error" not in result, f"rank {rank}: {result['error']}"
        for got, want in zip(result["outputs"], one_process[name]):
            np.testing.assert_allclose(got, want, atol=1e-5)
        fractions = [f["compute_fraction"] for m, f in result["facts"].items() if m != "text"
                     and f.get("compute_fraction") is not None]
        assert fractions and min(fractions) < 1.0, f"rank {rank}: nothing skipped ({result['facts']})"
    assert ulysses_runs[0][(name, order)]["facts"]["text"] == ulysses_runs[1][(name, order)]["facts"]["text"]


@pytest.mark.parametrize("order", ["enable-first", "patch-first"])
def test_sparse_attention_composes_with_ulysses(ulysses_runs, one_process, order):
    """Ulysses gives each rank the whole sequence for half the heads: VMoBA selects as in one process."""
    sparse, dense = one_process["vmoba"], one_process["none"]
    assert max(float(np.abs(a - b).max()) for a, b in zip(sparse, dense)) > 1e-3  # it is really sparse
    for rank, results in enumerate(ulysses_runs):
        result = results[("vmoba", order)]
        assert "error" not in result, f"rank {rank}: {result['error']}"
        assert result["facts"]["vmoba"]["density"] < 1.0
        for got, want in zip(result["outputs"], sparse):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_sparse_attention_refuses_ring_attention(ulysses_runs):
    for results in ulysses_runs:
        error = results[("vmoba-ring", "enable-first")].get("error", "")
        assert "does not compose with ring attention" in error and "ulysses_degree" in error, error


def test_quest_keeps_parallel_hooked_layers_float_or_refuses_the_late_order(ulysses_runs):
    """Enabled first: the layer diffusers gathers the sequence on stays float, the rest run quantized and
    the ranks agree. Enabled after the patch: a clear error (the hooks would sit on accel's layer)."""
    first = [results[("quest", "enable-first")] for results in ulysses_runs]
    for result in first:
        assert "error" not in result, result["error"]
        assert "proj_out" in result["facts"]["quest"]["kept_float_for_parallelism"]
    np.testing.assert_array_equal(first[0]["outputs"][0], first[1]["outputs"][0])
    for results in ulysses_runs:
        error = results[("quest", "patch-first")].get("error", "")
        assert "enable_parallelism(...) before accel.patch" in error, error


def test_agreement_helpers_pool_and_catch_disagreement(ulysses_runs):
    for results in ulysses_runs:
        checks = results[("agreement", "-")]
        assert checks["gathered"] == [0.0, 0.0, 1.0, 1.0]  # rank order, same on every rank
        assert checks["disagreement"] and "disagree on a test decision" in checks["disagreement"]


def test_quest_calibration_under_context_parallelism_is_refused(monkeypatch):
    """Static ranges and finetuning need every token; under context parallelism a rank has a slice."""
    import accel.methods.quest as quest

    monkeypatch.setattr(quest, "context_parallel_group", lambda model: object())
    pipe = _pipeline()
    with pytest.raises(accel.errors.UnsupportedModelError,
                       match="cannot calibrate or finetune under context"):
        accel.patch(pipe, "quest")
    assert not accel.hooks.accel_hook_names(pipe.transformer)


def test_accel_hooks_register_inside_context_parallel_hooks():
    """accel's hook on a module diffusers splits on sits beneath the split hook; removal restores it."""
    from accel.hooks import CallbackHook, HookSet, _registry

    module = torch.nn.Linear(2, 2)
    calls = []
    split = CallbackHook(before=lambda m, a, k: calls.append("split"))
    _registry(module).register_hook(split, "cp_input---blocks.0")
    hooks = HookSet("accel.test")
    hooks.add_hook(module, CallbackHook(before=lambda m, a, k: calls.append("accel")), "unit")
    assert module._diffusers_hook._hook_order == ["accel.test.unit", "cp_input---blocks.0"]
    module(torch.zeros(1, 2))
    assert calls == ["split", "accel"]
    hooks.remove()
    assert module._diffusers_hook._hook_order == ["cp_input---blocks.0"]
    calls.clear()
    module(torch.zeros(1, 2))
    assert calls == ["split"]
