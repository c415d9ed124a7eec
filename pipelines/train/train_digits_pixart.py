"""Trains ``digits-pixart``: diffusers' own PixArt-α pipeline (AutoencoderKL, T5 encoder, PixArt
transformer) on captioned 32x32 digit pictures, plus the canvas judge that scores it.

    .venv/bin/python -m accel.pipelines.train.train_digits_pixart --stage judge
    .venv/bin/python -m accel.pipelines.train.train_digits_pixart --stage vae
    .venv/bin/python -m accel.pipelines.train.train_digits_pixart --stage pixart [--steps N] [--init FOLDER]

Stages run in that order: the VAE's latents are what PixArt learns to denoise. Each stage writes its
weights and ``train_info.json``; ``pixart`` writes the whole pipeline folder ``pipelines/weights/digits-pixart``
(loadable with plain ``diffusers.PixArtAlphaPipeline.from_pretrained``). Pictures, captions and the
attribute rules are in ``accel.pipelines.captions``.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from accel.pipelines import captions
from accel.pipelines.classifiers import DigitJudge, augment, predict, save_classifier
from accel.pipelines.data import _raw_digits, split_indices
from accel.pipelines.train.common import EMA, WEIGHTS, Progress, cosine_lr, seed_everything, write_train_info
from accel.pipelines.train.common import optimizer_step, set_lr
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

JUDGE_KWARGS = dict(image_size=captions.CANVAS, width=32, num_classes=10)
PIPELINE = WEIGHTS / "digits-pixart"
JUDGE = WEIGHTS / "digits-pixart-judge"


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 source digits of a split as ((N, 1, 8, 8) in [0, 1], labels (N,))."""
    images, labels = _raw_digits()
    idx = split_indices(split)
    return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])


def batch(source: tuple[torch.Tensor, torch.Tensor], size: int, gen: torch.Generator
          ) -> tuple[torch.Tensor, list[captions.Attributes]]:
    """``size`` freshly rendered pictures (N, 1, 32, 32) with random attributes."""
    images, labels = source
    idx = torch.randint(0, len(images), (size,), generator=gen)
    attrs = captions.sample_attributes(labels[idx], gen)
    return captions.render(images[idx], attrs), attrs


# ---- judge -----------------------------------------------------------------------------------------------

def train_judge(steps: int, batch_size: int, lr: float, seed: int) -> None:
    gen = seed_everything(seed)
    source = digits("train")
    model = DigitJudge(**JUDGE_KWARGS).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    progress = Progress(steps, every=100)
    for step in range(steps):
        pics, attrs = batch(source, batch_size, gen)
        # Mild jitter on top of the rendering, so generated pictures a little off the grid still read.
        pics = augment(pics, gen, max_shift=0.03, max_rotate=0.1, scale_range=(0.92, 1.08))
        labels = torch.tensor([a.digit for a in attrs])
        set_lr(opt, cosine_lr(step, steps, lr, warmup=100))
        loss = F.cross_entropy(model(pics), labels, label_smoothing=0.05)
        optimizer_step(opt, loss, model, step, clip=None)
        progress.log(step, loss.item())
    model.eval()
    accuracy = held_out_judge_accuracy(model, seed)
    print(f"canvas judge held-out accuracy {accuracy:.4f}", flush=True)
    save_classifier(model, JUDGE, {"arch": "DigitJudge", "kwargs": JUDGE_KWARGS,
                                   "input": "(N, 1, 32, 32) in [0, 1]: digits-pixart pictures"})
    write_train_info(JUDGE, {"stage": "judge", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                             "held_out_accuracy": round(accuracy, 4),
                             "train_seconds": round(progress.elapsed(), 1)})


def held_out_judge_accuracy(model: torch.nn.Module, seed: int, repeats: int = 4) -> float:
    """Accuracy on test-split digits rendered with random attributes (``repeats`` renders each)."""
    gen = torch.Generator().manual_seed(seed + 1)
    images, labels = digits("test")
    images, labels = images.repeat(repeats, 1, 1, 1), labels.repeat(repeats)
    pics = captions.render(images, captions.sample_attributes(labels, gen))
    return (predict(model, pics) == labels).float().mean().item()


# ---- VAE -------------------------------------------------------------------------------------------------

VAE_CONFIG = dict(
    in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=captions.CANVAS, mid_block_add_attention=False,
)  # 32x32 pictures <-> 4x16x16 latents (vae_scale_factor 2)
KL_WEIGHT = 1e-5


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def train_vae(steps: int, batch_size: int, lr: float, seed: int) -> None:
    gen = seed_everything(seed)
    source = digits("train")
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress(steps, every=100)
    for step in range(steps):
        pics, _ = batch(source, batch_size, gen)
        x = pics * 2 - 1  # diffusers' image processors hand the VAE [-1, 1]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + KL_WEIGHT * kl
        set_lr(opt, cosine_lr(step, steps, lr, warmup=100))
        optimizer_step(opt, loss, vae, step)
        progress.log(step, loss.item(), kl=kl.item())
    vae.eval()
    scale, psnr = latent_scale_and_psnr(vae, seed)
    vae.register_to_config(scaling_factor=scale, shift_factor=None)
    folder = PIPELINE / "vae"
    vae.save_pretrained(folder)
    info = {"stage": "vae", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "kl_weight": KL_WEIGHT, "held_out_reconstruction_psnr_db": round(psnr, 2),
            "scaling_factor": round(scale, 4), "train_seconds": round(progress.elapsed(), 1)}
    write_json(PIPELINE / "vae_train_info.json", info)
    print(f"VAE held-out reconstruction PSNR {psnr:.2f} dB, latent scale {scale:.4f}", flush=True)


@torch.no_grad()
def latent_scale_and_psnr(vae: AutoencoderKL, seed: int) -> tuple[float, float]:
    """1 / std of the latents (so the diffusion model sees unit variance, as SD's scaling factor does) and
    the reconstruction PSNR of the posterior means, both on held-out test-split pictures."""
    gen = torch.Generator().manual_seed(seed + 2)
    images, labels = digits("test")
    pics = captions.render(images, captions.sample_attributes(labels, gen))
    z = vae.encode(pics * 2 - 1).latent_dist.mean
    recon = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    from accel.metrics import psnr

    return 1.0 / z.std().item(), psnr(pics, recon)


def write_json(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# ---- PixArt ----------------------------------------------------------------------------------------------

TEXT_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                   dropout_rate=0.0)
TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=12, num_attention_heads=4,
    attention_head_dim=32, cross_attention_dim=128, caption_channels=TEXT_CONFIG["d_model"],
    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)  # 12 blocks, width 128, 16x16 latents in 2x2 patches: 64 image tokens
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
#: Tokens per caption in training; the pipeline pads to 120 with a mask, which gives the same outputs.
TRAIN_TEXT_LENGTH = 24
CAPTION_DROPOUT = 0.1  # empty caption, the unconditional branch of classifier-free guidance
ATTRIBUTE_KEEP = 0.85  # each attribute is said with this probability, so short prompts work too
RENDERS_PER_DIGIT = 16


def build_tokenizer() -> T5Tokenizer:
    """T5's Unigram tokenizer built offline: one token per caption word, single characters for the rest."""
    spiece = "\u2581"  # SentencePiece's word-start mark
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (spiece, -2.0)]
    pieces += [(char, -8.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(spiece + word, -4.0) for word in dict.fromkeys(captions.VOCABULARY)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=120)


def build_text_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))


def make_sampler() -> DPMSolverMultistepScheduler:
    """The shipped sampler: DPM-Solver++ (2M), trailing spacing (the first step starts from pure noise)."""
    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, timestep_spacing="trailing")


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[captions.Attributes]]:
    """Every train-split digit rendered ``RENDERS_PER_DIGIT`` times with random attributes, encoded once:
    latent means and stds (scaled), so each step only samples the posterior."""
    gen = torch.Generator().manual_seed(seed + 3)
    images, labels = digits("train")
    images, labels = images.repeat(RENDERS_PER_DIGIT, 1, 1, 1), labels.repeat(RENDERS_PER_DIGIT)
    attrs = captions.sample_attributes(labels, gen)
    means, stds = [], []
    scale = vae.config.scaling_factor
    for i in range(0, len(images), 256):
        dist = vae.encode(captions.render(images[i:i + 256], attrs[i:i + 256]) * 2 - 1).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return torch.cat(means), torch.cat(stds), attrs


def train_pixart(steps: int, batch_size: int, lr: float, seed: int, init: Path | None, save_every: int) -> None:
    gen = seed_everything(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL.from_pretrained(PIPELINE / "vae").eval().requires_grad_(False)
    if init is not None:
        tokenizer = T5Tokenizer.from_pretrained(init / "tokenizer")
        text_encoder = T5EncoderModel.from_pretrained(init / "text_encoder")
        transformer = PixArtTransformer2DModel.from_pretrained(init / "transformer")
    else:
        tokenizer = build_tokenizer()
        text_encoder = build_text_encoder(tokenizer)
        transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    means, stds, attrs = encode_dataset(vae, seed)
    print(f"encoded {len(means)} pictures", flush=True)
    models = torch.nn.ModuleDict({"text_encoder": text_encoder, "transformer": transformer}).train()
    ema = EMA(models, decay=0.999, warm_up=init is None)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    opt = torch.optim.AdamW(models.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress(steps, every=50)
    for step in range(steps):
        idx = torch.randint(0, len(means), (batch_size,), generator=gen)
        z0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        texts = ["" if rng.random() < CAPTION_DROPOUT else attrs[i].caption(rng, keep=ATTRIBUTE_KEEP)
                 for i in idx.tolist()]
        tokens = tokenizer(texts, padding="max_length", max_length=TRAIN_TEXT_LENGTH, truncation=True,
                           return_tensors="pt")
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (batch_size,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        target = noise_sched.get_velocity(z0, noise, t)
        set_lr(opt, cosine_lr(step, steps, lr, warmup=100))
        text = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        pred = transformer(zt, encoder_hidden_states=text, encoder_attention_mask=tokens.attention_mask,
                           timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(pred, target)
        optimizer_step(opt, loss, models, step, ema)
        progress.log(step, loss.item())
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_pipeline(ema.model, tokenizer, vae, PIPELINE.parent / "digits-pixart-snapshots" / f"step-{step + 1}")
    save_pipeline(ema.model, tokenizer, vae, PIPELINE)
    info = {"stage": "pixart", "task": "digit-captions", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "init": str(init) if init else None, "caption_dropout": CAPTION_DROPOUT,
            "attribute_keep": ATTRIBUTE_KEEP, "renders_per_digit": RENDERS_PER_DIGIT,
            "noise_schedule": NOISE_SCHEDULE, "transformer": TRANSFORMER_CONFIG, "text_encoder": TEXT_CONFIG,
            "vae": json.loads((PIPELINE / "vae_train_info.json").read_text()),
            "sampler": "DPMSolverMultistepScheduler(dpmsolver++, trailing)",
            "train_seconds": round(progress.elapsed(), 1)}
    write_train_info(PIPELINE, info)


def save_pipeline(models: torch.nn.ModuleDict, tokenizer: T5Tokenizer, vae: AutoencoderKL, folder: Path) -> None:
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=models["text_encoder"].eval(), vae=vae,
                               transformer=models["transformer"].eval(), scheduler=make_sampler())
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "prompts.txt").write_text("\n".join(DEFAULT_PROMPTS) + "\n")
    print(f"saved {folder}", flush=True)


#: The model's own prompts (``prompts.txt`` in its folder): every digit, each attribute value at least once.
DEFAULT_PROMPTS = (
    "a thick handwritten 0, upright, large",
    "a thin handwritten 1, slanted right, small, top left",
    "a thick handwritten 2, slanted left, small, bottom right",
    "a thin handwritten 3, upright, large",
    "a thick handwritten 4, slanted right, large",
    "a thin handwritten 5, slanted left, small, center",
    "a thick handwritten 6, upright, small, top right",
    "a thin handwritten 7, slanted right, large",
    "a thick handwritten 8, slanted left, large",
    "a thin handwritten 9, upright, small, bottom left",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("judge", "vae", "pixart"), required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue from this pipeline folder's weights")
    parser.add_argument("--save-every", type=int, default=0, help="write EMA snapshots every N steps")
    args = parser.parse_args()
    if args.stage == "judge":
        train_judge(args.steps or 2500, args.batch_size or 128, args.lr or 2e-3, args.seed)
    elif args.stage == "vae":
        train_vae(args.steps or 1200, args.batch_size or 32, args.lr or 1e-3, args.seed)
    else:
        train_pixart(args.steps or 3000, args.batch_size or 64, args.lr or 3e-4, args.seed, args.init,
                     args.save_every)


if __name__ == "__main__":
    main()
