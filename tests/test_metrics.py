"""accel.metrics on known inputs: PSNR/SSIM formulas and edge cases, shape handling, judge and top-1."""

from __future__ import annotations

import math

import pytest
import torch
from accel.pipelines.data import load_digit_images, moving_digit_videos

from accel import metrics
from accel.pipelines import judges


def _images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_of_identical_images_is_inf() -> None:
    x = _images((4, 1, 16, 16))
    assert metrics.psnr(x, x.clone()) == math.inf


def test_psnr_matches_formula_for_known_noise() -> None:
    base = torch.full((2, 1, 16, 16), 0.5)
    noise = torch.where(torch.rand(base.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -0.1, 0.1)
    other = base + noise  # |error| is exactly 0.1 everywhere, so MSE = 0.01
    expected = 10 * math.log10(1.0 / 0.01)  # data range 1 -> 20 dB
    assert metrics.psnr(base, other) == pytest.approx(expected, abs=1e-4)


def test_psnr_of_random_noise_matches_mse_formula() -> None:
    base = _images((3, 1, 16, 16), seed=2)
    other = (base + 0.05 * torch.randn(base.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    mse = float(((base - other) ** 2).mean())
    assert metrics.psnr(base, other) == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    x = _images((4, 1, 16, 16))
    assert metrics.ssim(x, x.clone()) == 1.0
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    assert 0 < metrics.ssim(x, y) < 0.99


@pytest.mark.parametrize("layout", ["nhw", "nchw", "video"])
def test_layouts_agree(layout: str) -> None:
    frames = _images((6, 16, 16), seed=5)  # 6 grayscale frames
    other = (frames + 0.1).clamp(0, 1)
    reshape = {"nhw": lambda t: t, "nchw": lambda t: t.unsqueeze(1), "video": lambda t: t.reshape(2, 3, 16, 16)}
    a, b = reshape[layout](frames), reshape[layout](other)
    assert metrics.psnr(a, b) == pytest.approx(metrics.psnr(frames, other))
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(frames, other))


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2, 1, 16, 16\) and \(3, 1, 16, 16\)"):
        metrics.psnr(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="Expected images"):
        metrics.ssim(torch.zeros(16), torch.zeros(16))


@pytest.mark.quality
def test_judge_accuracy_on_real_held_out_digits() -> None:
    images, labels = load_digit_images(16, "test")
    assert judges.judge_accuracy(images, labels) >= 0.97
    wrong = (labels + 1) % 10
    assert judges.judge_accuracy(images, wrong) < 0.05


@pytest.mark.quality
def test_judge_accuracy_per_frame_on_real_moving_digits() -> None:
    digits, labels = load_digit_images(16, "test")
    videos = moving_digit_videos(digits[:40], num_frames=6, canvas=32, generator=torch.Generator().manual_seed(0))
    assert videos.shape == (40, 6, 32, 32)
    assert judges.judge_accuracy(videos, labels[:40]) >= 0.95


def test_top1_checks_lengths() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="one label per image, got 2 images and 3 labels"):
        metrics.top1(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1, 2]))


def test_weight_hungry_metrics_skip_offline() -> None:
    x = torch.zeros(1, 3, 16, 16)
    for result in (metrics.lpips(x, x), metrics.fid(x, x), metrics.clip_score(x, ["a digit"])):
        assert isinstance(result, float) or metrics.SKIPPED_OFFLINE in result


def test_lpips_from_a_given_alexnet_file(tmp_path):
    """--lpips-weights: the backbone comes from the file given (here random weights), nothing downloads."""
    import torchvision

    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.lpips(x, x, weights=path) == pytest.approx(0.0, abs=1e-6)
    assert metrics.lpips(x, 1 - x, weights=path) > 0
    assert "no file" in metrics.lpips(x, x, weights=tmp_path / "missing.pth")


def test_clip_score_from_a_local_folder(tmp_path):
    """--clip: a CLIP model folder on disk (a tiny random one, with a tokenizer built offline)."""
    from tiny_pipelines import clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size + 8, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    score = metrics.clip_score(images, ["a red fox", "a blue car"], model=tmp_path / "clip")
    assert isinstance(score, float)
    assert "not a CLIP model folder" in metrics.clip_score(images, ["a", "b"], model=tmp_path)


def test_label_consistency_counts_frames_that_keep_their_video_digit() -> None:
    from accel.pipelines.data import load_digit_images

    images, labels = load_digit_images(16, "test")
    threes = images[labels == 3][:1, 0].expand(4, -1, -1)  # one picture per digit: judged the same each time
    sevens = images[labels == 7][:1, 0].expand(4, -1, -1)
    steady = torch.stack([threes, threes])  # (2 videos, 4 frames, 16, 16): one digit each
    assert judges.label_consistency(steady) == 1.0
    flicker = torch.stack([torch.cat([threes[:2], sevens[:2]]), threes])  # first video changes digit
    assert judges.label_consistency(flicker) == pytest.approx(0.75)
    assert judges.judge_predictions(steady).shape == (2, 4)
