"""accel.pipelines: the embedded models load and run, loading errors are clear, generation is seeded."""

from __future__ import annotations

import accel.pipelines as P
import pytest
import torch
from accel.pipelines.data import load_digit_images

from accel import metrics


@pytest.fixture(scope="module")
def dit() -> P.DigitsDiTPipeline:
    return P.load("digits-dit")


@pytest.fixture(scope="module")
def video() -> P.DigitsVideoPipeline:
    return P.load("digits-video-dit")


def test_embedded_names() -> None:
    assert set(P.EMBEDDED) == {"digits-pixart", "digits-dit", "digits-video-dit", "digits-vit", "digits-judge",
                               "digits-pixart-judge"}
    assert all((P.WEIGHTS_DIR / name).is_dir() for name in P.EMBEDDED)


def test_dit_pipeline_shapes_ranges_and_seeding(dit: P.DigitsDiTPipeline) -> None:
    assert isinstance(dit, P.DigitsDiTPipeline)
    assert dit.transformer.config.num_layers >= 6
    out = dit(class_labels=[0, 7], num_inference_steps=3, guidance_scale=4.0,
              generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    again = dit(class_labels=[0, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt").images
    assert torch.equal(out, again)
    as_np = dit(class_labels=[3], num_inference_steps=2, output_type="np").images
    assert as_np.shape == (1, 16, 16, 1)
    pil = dit(class_labels=[3], num_inference_steps=2, output_type="pil").images
    assert pil[0].size == (16, 16) and pil[0].mode == "L"


def test_dit_one_batched_forward_per_step(dit: P.DigitsDiTPipeline) -> None:
    batches: list[int] = []
    handle = dit.transformer.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        dit(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=3.0, output_type="pt")
    finally:
        handle.remove()
    assert batches == [6] * 4  # cond + uncond in one forward, once per step
    assert len(dit.scheduler.timesteps) == 4


def test_dit_rejects_bad_arguments(dit: P.DigitsDiTPipeline) -> None:
    with pytest.raises(ValueError, match=r"class_labels must be digits in \[0, 9\], got \[10\]"):
        dit(class_labels=[10], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type must be one of"):
        dit(class_labels=[1], num_inference_steps=1, output_type="latent")


def test_video_pipeline_shapes_and_cfg_order(video: P.DigitsVideoPipeline) -> None:
    assert isinstance(video, P.DigitsVideoPipeline)
    assert video.num_tokens(16, 32, 32) >= 4096
    contexts: list[torch.Tensor] = []
    handle = video.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: contexts.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        frames = video(class_labels=[4, 5], num_inference_steps=2, guidance_scale=4.0, num_frames=3,
                       generator=torch.Generator().manual_seed(0), output_type="pt").frames
    finally:
        handle.remove()
    assert frames.shape == (2, 3, 32, 32)
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    assert len(contexts) == 4  # two separate forwards per step
    cond = video.label_embedder(torch.tensor([4, 5]))
    assert torch.equal(contexts[0], cond) and not torch.equal(contexts[1], cond)  # cond first


def test_generate_helper(dit: P.DigitsDiTPipeline, video: P.DigitsVideoPipeline) -> None:
    images = P.generate(dit, [1, 2], seeds=[0, 1], steps=2)
    assert images.shape == (2, 1, 16, 16)
    # Per-sample seeds: a sample does not depend on what else is in the batch.
    alone = P.generate(dit, [2], seeds=[1], steps=2)
    assert torch.allclose(images[1:], alone, atol=1e-5)
    kw = P.default_generation_kwargs("digits-video-dit") | {"steps": 1, "num_frames": 2}
    frames = P.generate(video, [3], seeds=[0], **kw)
    assert frames.shape == (1, 2, 1, 32, 32)  # videos (N, F, C, H, W)
    with pytest.raises(ValueError, match="one seed per sample, got 2 conditions and 1 seeds"):
        P.generate(dit, [1, 2], seeds=[0])
    with pytest.raises(ValueError,
                       match=r"conditioned on class_labels: pass class labels \(int\), got 'a fox'"):
        P.generate(dit, ["a fox"], seeds=[0])
    with pytest.raises(ValueError, match="No generation defaults for 'digits-vit'"):
        P.default_generation_kwargs("digits-vit")


@pytest.mark.quality
@pytest.mark.parametrize(("name", "target"), [("digits-judge", 0.97), ("digits-vit", 0.95)])
def test_classifiers_on_held_out_digits(name: str, target: float) -> None:
    model = P.load(name)
    images, labels = load_digit_images(16, "test")
    logits = model(images[:4])
    assert logits.shape == (4, 10)
    assert metrics.top1(model, images, labels) >= target


def test_vit_is_a_timm_vit() -> None:
    import timm

    model = P.load("digits-vit")
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)


def test_local_folders_load_with_their_class(tmp_path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    assert isinstance(P.load(P.WEIGHTS_DIR / "digits-dit"), P.DigitsDiTPipeline)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    assert type(P.load(tmp_path / "ddpm")).__name__ == "DDPMPipeline"


def test_timm_names_load_without_downloading() -> None:
    model = P.load("timm:vit_tiny_patch16_224")
    assert type(model).__name__ == "VisionTransformer" and not model.training
    with pytest.raises(ValueError, match="Unknown timm model 'not_a_model'"):
        P.load("timm:not_a_model")


def test_loading_errors_name_the_input_and_what_is_accepted(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No such model folder: './missing/model'.*Accepted: an embedded"):
        P.load("./missing/model")
    with pytest.raises(ValueError, match=r"Unknown model 'digits-gan'.*digits-dit"):
        P.load("digits-gan")
    with pytest.raises(ValueError, match="is not a model folder"):
        P.load(tmp_path)


def test_hub_id_offline_is_a_clear_fast_error(monkeypatch) -> None:
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(P.HubUnreachableError, match=r"Could not reach the model hub.*Pass a local diffusers folder"):
        P.load("someone/some-pipeline-that-is-not-cached")
    assert time.perf_counter() - start < 10


def test_classification_set() -> None:
    images, labels = P.classification_set("digits-vit")
    assert images.shape == (len(labels), 1, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    with pytest.raises(ValueError, match="No offline evaluation set for 'timm:vit_tiny_patch16_224'"):
        P.classification_set("timm:vit_tiny_patch16_224")


def test_broken_folders_and_artifacts_name_the_file(tmp_path):
    """A truncated model_index.json, an unknown pipeline class and a non-JSON schedule each get one clear
    error naming the file, not a JSONDecodeError or a traceback from diffusers."""
    from accel.errors import ArtifactMismatchError
    from accel.methods.bac_schedule import BACSchedule

    def folder(name: str, index: str):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(index)
        return tmp_path / name

    not_json = r"truncated/model_index.json is not a diffusers model index: invalid JSON"
    with pytest.raises(ValueError, match=not_json):
        P.load(folder("truncated", '{"_class_name": "PixArtAlpha'))
    unknown_class = r"names the pipeline class 'NoSuchPipeline', which diffusers .* does not"
    with pytest.raises(ValueError, match=unknown_class):
        P.load(folder("unknown", '{"_class_name": "NoSuchPipeline"}'))
    garbage = tmp_path / "schedule.json"
    garbage.write_text("garbage")
    with pytest.raises(ArtifactMismatchError, match=r"schedule.json is not a BAC schedule: invalid JSON"):
        BACSchedule.load(garbage)
