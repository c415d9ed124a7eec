"""Tiny, random-init, real diffusers pipelines of every supported family, built offline.

Each family's components follow the ``get_dummy_components()`` of diffusers' own pipeline tests (same
classes, dims of 8-32, one or two layers or blocks), so the unmodified pipeline classes run end to end on
CPU in a fraction of a second: accelerator code can be tested against the real ``__call__`` loops, text
encoders and VAEs, and against ``save_pretrained`` / ``from_pretrained`` round trips.

Diffusers' tests download their tokenizers from the Hugging Face hub; here each one is built in code
instead, as the real transformers class a pipeline expects (``CLIPTokenizer``, ``T5Tokenizer``,
``LlamaTokenizer``) over a small vocabulary: the special tokens of that family, single characters (and
the 256 byte tokens for Llama) so any ASCII text encodes, and whole-word tokens for common words. Using the
classes' own constructors (not a ``tokenizer_object``) matters: on loading, transformers rebuilds these
classes from the saved vocabulary with their own normalizer and pre-tokenizer, so only a tokenizer made
that way reloads identical.

HunyuanVideo's default prompt template crops the first 95 tokens (``crop_start``), the length of its
system prompt under the real Llama-3 tokenizer, which makes one token of every word, number, punctuation
run and newline pair. The tiny Llama tokenizer has whole tokens for exactly those pieces of the template,
so the default template runs unchanged and crops exactly the system prompt.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import regex
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

FAMILIES: tuple[str, ...] = ("pixart", "sd3", "flux", "wan", "cogvideox", "ltx", "hunyuan-video", "dit", "sd")

PROMPT = "a painting of a squirrel eating a burger"
T5_MAX_LENGTH = 32
# T5 / Llama tokens per prompt in call_kwargs; CogVideoX's transformer is built for exactly this length.
TEXT_LENGTH = 16
# The pipelines read CLIP's length from the tokenizer, and some hard-code 77.
CLIP_MAX_LENGTH = 77
# Names of DiT's first class ids (comma-separated synonyms, as in the hub's ImageNet id2label).
DIT_LABELS = ("squirrel", "monkey", "cat, kitty", "dog", "bird")

_WORDS = """
a an the of and or in on at to by for from with without into over under up down out off near far
is are was were be been being has have had do does did will can may not no yes this that these those it its
he she they we you i his her their our your my one two three four five six seven eight nine ten
painting photo picture image video scene portrait drawing sketch render style art artist
squirrel eating burger dance monkey cat dog bird horse fish tree flower forest river sea ocean lake
mountain sky cloud sun moon star city street house room car boat man woman child people face hand eye
red green blue yellow black white gray orange purple pink brown bright dark light color colors
big small large tiny tall short old new young beautiful cute happy sad fast slow hot cold
walking running flying swimming sitting standing playing jumping looking holding riding
very more most some many few all each every other such only own same so than too just
""".split()

_CHARS = string.ascii_letters + string.digits + string.punctuation
_SPIECE = "\u2581"  # SentencePiece's word-start mark: T5 and Llama tokens that begin a word start with it


def _chain(word: str, vocab: dict[str, int], merges: list[tuple[str, str]], last_suffix: str = "") -> None:
    """Adds the merges that build ``word`` left to right from its first symbol (prefixes become tokens)."""
    symbols = list(word)
    symbols[-1] += last_suffix
    current = symbols[0]
    for symbol in symbols[1:]:
        if current + symbol not in vocab:
            merges.append((current, symbol))
            vocab[current + symbol] = len(vocab)
        current += symbol


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE over ASCII characters (other bytes become the unknown token) and chained
    whole-word merges; CLIP lowercases all text."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase + string.digits + string.punctuation:
            vocab[char + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        if len(word) > 1:
            _chain(word, vocab, merges, last_suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """T5's Unigram model: whole words outscore their spelling, so known words stay one token."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_SPIECE, -2.0)]
    pieces += [(char, -8.0) for char in _CHARS]
    pieces += [(_SPIECE + word, -4.0) for word in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


_LLAMA_SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Llama-3's pre-tokenizer: the real HunyuanVideo tokenizer has one token for each of these pieces.
_LLAMA3_PIECES = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _template_pieces(template: str) -> list[str]:
    """The template's text between special tokens, split into Llama-3 pieces."""
    pieces = []
    for text in regex.split("|".join(regex.escape(token) for token in _LLAMA_SPECIAL), template):
        pieces += regex.findall(_LLAMA3_PIECES, text.replace("{}", ""))
    return pieces


def llama_tokenizer() -> LlamaTokenizer:
    """Llama's BPE with byte fallback, the chat tokens of HunyuanVideo's template and one token for each
    Llama-3 piece of that template, so its system prompt is as long as with the real tokenizer."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for token in ("<pad>", *_LLAMA_SPECIAL, _SPIECE, "\n", *_CHARS):
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    template_pieces = [piece.replace(" ", _SPIECE) for piece in _template_pieces(template)]
    spaced = [_SPIECE + word for word in _WORDS] + [p for p in template_pieces if p.startswith(_SPIECE)]
    # Space-led merges rank first, so inside "▁word" they win over the bare-word merges below.
    for piece in _unique(spaced + [p for p in template_pieces if not p.startswith(_SPIECE)]):
        if len(piece) > 1:
            _chain(piece, vocab, merges)
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<pad>",
        additional_special_tokens=list(_LLAMA_SPECIAL),
        add_bos_token=True,
        model_max_length=512,
    )


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _clip_config(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _t5_encoder(tokenizer: T5Tokenizer, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_cls(config)


def _tiny_vae(latent_channels: int) -> AutoencoderKL:
    """One 4-channel block: no downsampling (``vae_scale_factor`` 1), so latents are as large as images."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _pixart() -> dict[str, Any]:
    tokenizer = t5_tokenizer()
    return {
        "transformer": PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
        "vae": _tiny_vae(latent_channels=4),
        "scheduler": DPMSolverMultistepScheduler(),
        "text_encoder": _t5_encoder(tokenizer),
        "tokenizer": tokenizer,
    }


def _sd3() -> dict[str, Any]:
    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    return {
        "transformer": SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            out_channels=4,
        ),
        # The pipeline concatenates both CLIPs' states and pads them to the T5 width (really 768 + 1280 to
        # 4096); wider CLIPs would be cut off, so 16 + 16 fill the 32 exactly, pooled outputs too.
        "text_encoder": CLIPTextModelWithProjection(_clip_config(clip, hidden=16)),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(clip, hidden=16)),
        "text_encoder_3": _t5_encoder(t5),
        "tokenizer": clip,
        "tokenizer_2": clip_tokenizer(),
        "tokenizer_3": t5,
        "vae": _tiny_vae(latent_channels=4),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux() -> dict[str, Any]:
    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    return {
        "transformer": FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            axes_dims_rope=[4, 4, 8],
        ),
        "text_encoder": CLIPTextModel(_clip_config(clip, hidden=16)),
        "text_encoder_2": _t5_encoder(t5),
        "tokenizer": clip,
        "tokenizer_2": t5,
        "vae": _tiny_vae(latent_channels=1),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _wan() -> dict[str, Any]:
    tokenizer = t5_tokenizer()
    return {
        "transformer": WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
        "vae": AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        "text_encoder": _t5_encoder(tokenizer, umt5=True),
        "tokenizer": tokenizer,
        "transformer_2": None,
    }


def _cogvideox() -> dict[str, Any]:
    tokenizer = t5_tokenizer()
    return {
        "transformer": CogVideoXTransformer3DModel(
            # heads * head_dim must equal the T5 width and be divisible by 16 (3D sin-cos embedding).
            num_attention_heads=4,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=32,
            num_layers=1,
            sample_width=2,
            sample_height=2,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=TEXT_LENGTH,
        ),
        "vae": AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
        "scheduler": CogVideoXDDIMScheduler(),
        "text_encoder": _t5_encoder(tokenizer),
        "tokenizer": tokenizer,
    }


def _ltx() -> dict[str, Any]:
    tokenizer = t5_tokenizer()
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    return {
        "transformer": LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=1,
            caption_channels=32,
        ),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": _t5_encoder(tokenizer),
        "tokenizer": tokenizer,
    }


def _hunyuan_video() -> dict[str, Any]:
    llama = llama_tokenizer()
    clip = clip_tokenizer()
    llama_config = LlamaConfig(
        vocab_size=len(llama),
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        hidden_act="silu",
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
    )
    return {
        "transformer": HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4),
        ),
        "vae": AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "text_encoder": LlamaModel(llama_config),
        "tokenizer": llama,
        "text_encoder_2": CLIPTextModel(_clip_config(clip, hidden=8)),
        "tokenizer_2": clip,
    }


def _dit() -> dict[str, Any]:
    return {
        "transformer": DiTTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            # DiTPipeline's unconditional branch uses class id 1000: the table needs ImageNet's 1000 classes.
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
        ),
        "vae": _tiny_vae(latent_channels=4),
        "scheduler": DPMSolverMultistepScheduler(),
        "id2label": dict(enumerate(DIT_LABELS)),
    }


def _sd() -> dict[str, Any]:
    clip = clip_tokenizer()
    return {
        "unet": UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8,
            norm_num_groups=2,
        ),
        "vae": AutoencoderKL(
            block_out_channels=(4, 8),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=2,
        ),
        "scheduler": PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        ),
        "text_encoder": CLIPTextModel(_clip_config(clip, hidden=8)),
        "tokenizer": clip,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


_BUILDERS: dict[str, tuple[type[DiffusionPipeline], Callable[[], dict[str, Any]]]] = {
    "pixart": (PixArtAlphaPipeline, _pixart),
    "sd3": (StableDiffusion3Pipeline, _sd3),
    "flux": (FluxPipeline, _flux),
    "wan": (WanPipeline, _wan),
    "cogvideox": (CogVideoXPipeline, _cogvideox),
    "ltx": (LTXPipeline, _ltx),
    "hunyuan-video": (HunyuanVideoPipeline, _hunyuan_video),
    "dit": (DiTPipeline, _dit),
    "sd": (StableDiffusionPipeline, _sd),
}

_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "pixart": {
        "height": 8,
        "width": 8,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
        "clean_caption": False,
    },
    "sd3": {"height": 8, "width": 8, "guidance_scale": 5.0},
    "flux": {"height": 8, "width": 8, "guidance_scale": 3.5},
    "wan": {"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 5.0},
    "cogvideox": {"height": 16, "width": 16, "num_frames": 9, "guidance_scale": 6.0},
    "ltx": {"height": 32, "width": 32, "num_frames": 9, "guidance_scale": 3.0},
    "hunyuan-video": {"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 6.0},
    "dit": {"class_labels": [1], "guidance_scale": 4.0},
    "sd": {"height": 16, "width": 16, "guidance_scale": 7.5},
}


def _check(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random-init pipeline of ``family``: float32, on CPU, in eval mode, progress bar off.

    Weights depend only on ``seed``; the caller's global torch RNG state is left untouched."""
    _check(family)
    pipeline_cls, components = _BUILDERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = components()
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    pipe = pipeline_cls(**parts)
    if family == "dit":
        # DiTPipeline keeps id2label out of its config; registering it puts it in model_index.json, as on
        # the hub, so the label names survive save_pretrained / from_pretrained.
        pipe.register_to_config(id2label=parts["id2label"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Builds the tiny ``family`` pipeline and writes it with ``save_pretrained`` to ``folder``."""
    folder = Path(folder)
    build_pipeline(family, seed).save_pretrained(folder)
    return folder


def call_kwargs(family: str) -> dict[str, Any]:
    """Keyword arguments of a minimal two-step call (add ``generator=``) returning tensors.

    Images come back as ``.images`` (batch, 3, H, W), videos as ``.frames`` (batch, frames, 3, H, W);
    ``max_sequence_length`` keeps the T5 / Llama prompts at ``TEXT_LENGTH`` tokens."""
    _check(family)
    kwargs: dict[str, Any] = {"num_inference_steps": 2, "output_type": "pt", **_CALL_KWARGS[family]}
    if family != "dit":
        kwargs["prompt"] = PROMPT
    if family not in ("dit", "sd"):
        kwargs["max_sequence_length"] = TEXT_LENGTH
    return kwargs
