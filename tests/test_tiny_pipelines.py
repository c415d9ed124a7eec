"""The tiny pipelines are real diffusers pipelines: they save, reload as the same class and run
deterministically to finite outputs of the requested shape."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tiny_pipelines import FAMILIES, PROMPT, build_pipeline, call_kwargs, llama_tokenizer, save_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_SHAPES = {
    "pixart": (1, 3, 8, 8),
    "sd3": (1, 3, 8, 8),
    "flux": (1, 3, 8, 8),
    "wan": (1, 5, 3, 16, 16),
    "cogvideox": (1, 9, 3, 16, 16),
    "ltx": (1, 9, 3, 32, 32),
    "hunyuan-video": (1, 5, 3, 16, 16),
    "dit": (1, 3, 8, 8),
    "sd": (1, 3, 16, 16),
}


def _output(pipe: DiffusionPipeline, family: str) -> torch.Tensor:
    result = pipe(**call_kwargs(family), generator=torch.Generator().manual_seed(0))
    return result.frames if hasattr(result, "frames") else result.images


def test_families_have_shapes() -> None:
    assert set(EXPECTED_SHAPES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_run(family: str, tmp_path) -> None:
    start = time.perf_counter()
    built = build_pipeline(family)
    folder = save_pipeline(family, tmp_path)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    assert type(pipe).__name__ == type(built).__name__

    first = _output(pipe, family)
    called = time.perf_counter()
    second = _output(pipe, family)

    assert isinstance(first, torch.Tensor)
    assert tuple(first.shape) == EXPECTED_SHAPES[family]
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    # Not bit-exact: the reloaded weights sit at other addresses, which changes float rounding in matmuls.
    torch.testing.assert_close(first, _output(built, family))
    print(f"{family}: build+save+load {loaded - start:.2f} s, 2-step call {called - loaded:.2f} s")


def test_dit_labels_survive_reload(tmp_path) -> None:
    pipe = DiffusionPipeline.from_pretrained(save_pipeline("dit", tmp_path))
    assert pipe.get_label_ids(["squirrel", "kitty"]) == [0, 2]


def test_hunyuan_default_template_crops_system_prompt() -> None:
    """The default template's crop_start (95) cuts exactly its system prompt, as with the real tokenizer."""
    tokenizer = llama_tokenizer()
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    system = tokenizer(template.split("{}")[0]).input_ids
    full = tokenizer(template.format(PROMPT)).input_ids
    assert len(system) == crop
    assert tokenizer.decode(full[crop:], skip_special_tokens=True) == PROMPT


def test_build_is_seeded_and_keeps_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b, c = (build_pipeline("flux", seed).transformer.state_dict() for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
