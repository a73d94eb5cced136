"""Embedded, offline pipelines with random weights: Wan (the CLI's default model and the tests') and
Stable Diffusion (the UNet adapter's tests).

``build_tiny_wan_pipeline`` assembles a :class:`diffusers.WanPipeline` in-process from small
configs (no download, no file on disk). The architecture is Wan2.1's, only narrower and shallower:
the same patch size ``(1, 2, 2)``, the same 4x temporal / 8x spatial VAE compression, the same
RMS-norm-across-heads QK norm, 3-axis RoPE and UniPC flow-matching scheduler. So the latent-grid
arithmetic, the token layout and every hook point are those of the real model:

    latent grid  = ((frames - 1) // 4 + 1, height // 8, width // 8)
    video tokens = latent_frames * (height // 16) * (width // 16)

The video it produces is noise (the weights are random); it exists to exercise the plumbing.

``build_tiny_sd_pipeline`` does the same for :class:`diffusers.StableDiffusionPipeline`: a
two-level ``UNet2DConditionModel`` with SD 1.5's block types (cross-attention in the highest
resolution blocks), a two-level ``AutoencoderKL`` (2x spatial), a small ``CLIPTextModel`` and the
word-level tokenizer below, with SD 1.5's DDIM scheduler settings.
"""

from __future__ import annotations

import os

import torch

from .embedded import RANDOM_DEFAULTS, is_trained, load_trained_pipeline

__all__ = [
    "TINY_DEFAULTS",
    "TINY_MODEL_NAMES",
    "TINY_TRANSFORMER_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_TEXT_ENCODER_CONFIG",
    "TINY_UNET_CONFIG",
    "build_tiny_sd_pipeline",
    "build_tiny_wan_pipeline",
    "build_tiny_tokenizer",
    "is_tiny",
    "load_pipeline",
]

# 17 frames of 96x160 px -> latent 5x12x20 -> patchified 5x6x10 = 300 video tokens (defined with
# the other embedded model's settings in fastdit.testing.embedded).
TINY_DEFAULTS = RANDOM_DEFAULTS

# Values of --model (and load_pipeline's ``model``) that select an embedded pipeline: the trained
# one ("tiny") or this module's random-weight one ("tiny-random"); None is the default model
# (fastdit.testing.embedded.default_model).
TINY_MODEL_NAMES = (None, "tiny", "tiny-random")

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    # Wan's RoPE splits head_dim into t/h/w parts: h = w = 2 * (head_dim // 6), t = the rest;
    # 32 -> t 12, h 10, w 10, all even as get_1d_rotary_pos_embed requires.
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

TINY_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,  # == transformer in_channels
    dim_mult=[1, 2, 4, 4],  # three downsamples: 8x spatial
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # two temporal downsamples: 4x temporal
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)

TINY_TEXT_ENCODER_CONFIG = dict(
    d_model=32,  # == transformer text_dim
    d_kv=16,
    d_ff=64,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
)

# SD 1.5's block types and layout, narrow: cross-attention at the highest resolution (down_blocks.0,
# up_blocks.1) and in the mid block; 2 heads of 16 (``attention_head_dim`` is the head count here,
# diffusers' legacy naming for SD 1.x).
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)

# Word-level vocabulary of the tiny tokenizer (lower-cased; anything else maps to <unk>).
_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
_WORDS = """
a an the of in on at to with and or by from over under into through across near far
is are was were be being been it its this that these those there here very slowly quickly
cat dog bird fish horse person man woman child people car boat train plane robot dragon
sun moon sky cloud clouds rain snow wind sea ocean river lake water beach wave waves
mountain mountains forest tree trees flower flowers field grass city street road house
night day morning evening sunset sunrise light dark shadow fire smoke
red orange yellow green blue purple white black gray golden silver bright colorful
big small tall short old young happy beautiful cinematic realistic detailed video shot
walks walking runs running flies flying swims swimming jumps dancing sits sitting plays
playing looks moving camera pan zoom close up wide view aerial slow motion
. , ! ?
""".split()
TINY_VOCAB = _SPECIAL_TOKENS + list(dict.fromkeys(_WORDS))


def build_tiny_tokenizer(model_max_length: int = 512):
    """A word-level fast tokenizer: lower-cased, split on whitespace/punctuation, ``</s>`` added."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TINY_VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5/UMT5 tokenizers append </s>; the Wan pipeline asks for add_special_tokens=True.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """A :class:`diffusers.WanPipeline` with random weights, built offline and deterministically.

    Args:
        seed: seeds ``torch.manual_seed`` before any weight is created, so the same seed gives
            the same weights (the global RNG is restored afterwards).
        dtype: dtype of the transformer, VAE and text encoder.
        device: where the pipeline is moved.
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        text_config = UMT5Config(
            vocab_size=len(TINY_VOCAB),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **TINY_TEXT_ENCODER_CONFIG,
        )
        text_encoder = UMT5EncoderModel(text_config)
    # The scheduler Wan2.1's diffusers checkpoints ship (scheduler/scheduler_config.json).
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    for model in (transformer, vae, text_encoder):
        _cast_like_from_pretrained(model, dtype)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        transformer=transformer.eval(),
    )
    pipe = pipe.to(device)
    return pipe


def build_tiny_sd_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """A :class:`diffusers.StableDiffusionPipeline` with random weights, built offline and
    deterministically (same ``seed``, same weights; the global RNG is restored). No safety checker.

    Images of ``H x W`` px have a ``H/2 x W/2`` latent; the highest-resolution self-attention sees
    all of its tokens (32 x 32 px: 256 tokens).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer(model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(TINY_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.pad_token_id,
        ))
    # Stable Diffusion 1.5's scheduler settings (scheduler/scheduler_config.json).
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    for model in (unet, vae, text_encoder):
        _cast_like_from_pretrained(model, dtype)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to ``dtype`` in place, keeping the model's
    ``_keep_in_fp32_modules`` in float32 as ``from_pretrained(torch_dtype=...)`` does."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

    def target(name: str) -> torch.dtype:
        return torch.float32 if any(part in keep for part in name.split(".")) else dtype

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and tensor.dtype != target(name):
                tensor.data = tensor.data.to(target(name))


def is_tiny(model: str | None) -> bool:
    """Whether ``model`` names an embedded pipeline (``None``, ``"tiny"`` or ``"tiny-random"``)."""
    return model in TINY_MODEL_NAMES


def looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not on disk is a missing path.
    return (
        model.startswith(("/", ".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or os.path.splitdrive(model)[0] != ""
    )


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since diffusers 0.42, else ``torch_dtype``."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def load_pipeline(model: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """The embedded trained pipeline for ``"tiny"``, the random-weight one for ``"tiny-random"``
    (``None``: the default model, :func:`fastdit.testing.embedded.default_model`), else
    ``DiffusionPipeline.from_pretrained(model)`` moved to ``device``.

    Raises:
        FileNotFoundError: ``model`` looks like a local path and does not exist.
        OSError: the hub id or local directory could not be loaded (the message names ``model``
            and the underlying reason, e.g. offline mode or a missing ``model_index.json``).
    """
    if is_tiny(model):
        if is_trained(model):
            return load_trained_pipeline(dtype=dtype, device=device)
        return build_tiny_wan_pipeline(dtype=dtype, device=device)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a hub id, a local path or 'tiny', got model={model!r}")
    from diffusers import DiffusionPipeline

    expanded = os.path.expanduser(model)
    if not os.path.exists(expanded):
        if looks_like_path(model):
            raise FileNotFoundError(f"model path {model!r} does not exist")
    elif not os.path.isdir(expanded):
        raise FileNotFoundError(
            f"model path {model!r} is not a directory (expected a diffusers pipeline folder "
            "with model_index.json)"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(expanded, **{_dtype_keyword(): dtype})
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
        if offline and not os.path.exists(expanded):
            hint = " (HF_HUB_OFFLINE is set: only locally cached models can be loaded)"
        raise OSError(f"could not load model {model!r}: {reason}{hint}") from exc
    return pipe.to(device)
