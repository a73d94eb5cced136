"""Model-family benchmark: full-size transformers of every family fastdit adapts, stock against fastdit.

What it measures
----------------
For each family a full-size transformer is built in-process from its published config with random
weights (bf16 on the GPU, no checkpoint download) at the family's standard resolution:

==================  ======================================  ===========================================
name                model (config)                          input -> tokens
==================  ======================================  ===========================================
hunyuanvideo15-480p HunyuanVideo 1.5 T2V (8.3B, 54 blocks)  121 x 480 x 848: 31 x 30 x 53 = 49,290
                                                            + 1,985 other (729 image, 256 byT5, 1000 text)
wan-vace-720p       Wan2.1-VACE-14B (40 + 8 control blocks) 81 x 720 x 1280: 21 x 45 x 80 = 75,600
skyreels-df-540p    SkyReels-V2-DF-14B, causal blocks of 5  97 x 544 x 960: 25 x 34 x 60 = 51,000
skyreels-540p       the same, no causal mask (every method) 51,000
wan22-ti2v-720p     Wan2.2-TI2V-5B, per-token timesteps     121 x 704 x 1280 (VAE 4x16x16): 31 x 22 x 40 = 27,280
ltx-video-704p      LTX-Video 2B (28 blocks)                121 x 704 x 1216: 16 x 22 x 38 = 13,376
cogvideox-5b        CogVideoX-5B (42 blocks)                49 x 480 x 720: 13 x 30 x 45 = 17,550 + 226 text
mochi-480p          Mochi 1 (10B, 48 blocks)                163 x 480 x 848: 28 x 30 x 53 = 44,520 + 256 text
flux-1mp / -4mp     Flux.1-dev (19 dual + 38 single)        1024^2: 4,096 / 2048^2: 16,384, + 512 text
qwenimage-1mp / -4m QwenImage (20B, 60 blocks)              1024^2: 4,096 / 2048^2: 16,384, + 256 text
==================  ======================================  ===========================================

One step is what the family's pipeline runs per denoising step: two forwards for classifier-free
guidance (cond and uncond, inside ``cache_context(name, step_index=i, num_inference_steps=50)``),
one forward with batch 2 for the pipelines that batch CFG (CogVideoX, Mochi), one forward for
Flux.1-dev (guidance-distilled). Methods, each on the fastest backend fastdit picks:

* ``stock``: diffusers' stock processors, SDPA restricted to cuDNN first
  (``sdpa_kernel([CUDNN, EFFICIENT, FLASH, MATH])``: cuDNN whenever it takes the call; SkyReels'
  causal mask may send it to another);
* ``dense``: ``fastdit.Dense()`` (fastdit's kernel, full plan);
* ``radial``: the published preset where one exists (``wan2.1-14b`` for the Wan derivatives,
  ``hunyuanvideo`` for HunyuanVideo 1.5), else decay 0.2 with Wan's schedule (12 of 50 steps and
  the first layer dense; marked "no published setting"); timed on a sparse step;
* ``vmoba``: ``fastdit.VMoBA()`` defaults (13 of 50 steps dense), timed on step 13;
* ``adaspa``: ``fastdit.AdaSpa()`` defaults: search step 10 (dense attention with LSE, block mass,
  selection), sparse step 11, cached search step 30; the late sparse steps are taken as step 11's;
* images (Flux, QwenImage): ``agent`` (``fastdit.Agent()``: 4 x 4-cell agents, first 40% of the
  steps) and ``gna`` (a 2-D window over a quarter of the image area, stride 16: 32 x 32 at 1 MP,
  64 x 64 at 4 MP; block density 0.31 / 0.28; every step). Radial's rule is
  over frame distance and an image is one frame: fastdit refuses it there.

Layers. ``--layers N`` (default 2) builds each block stack with ``N`` blocks only and scales: the
time inside each stack's blocks is measured per block (CUDA events around every block, no host
sync), and the full-depth step is ``step - blocks + sum over stacks (block time per block x full
depth)``. Dense layers of a schedule (Radial's first layer) are counted at the stock block time.
``--layers 0`` runs the full depth (slow: 14B models take ~6-12 s per forward).

50-step estimate (transformer only; text encoders, VAE and scheduler excluded):
``50 x stock``, ``50 x dense``, ``ds x stock + (50 - ds) x sparse`` (Radial, VMoBA; ``ds`` their
dense steps), ``10 x stock + search + 19 x sparse + cached search + 19 x sparse`` (AdaSpa),
``20 x agent + 30 x stock`` (Agent), ``50 x gna`` (GNA), with speedups over stock.

How to run
----------
    python -m benchmarks.families_bench                       # every family, ~5 min on one H200 (not yet run)
    python -m benchmarks.families_bench --families flux-1mp,flux-4mp --layers 4
    python -m benchmarks.families_bench --smoke --out smoke-results  # tiny configs, CPU fp32, ~1 min

Runtime (an estimate, not yet measured): with ``--layers 2`` a 14B-class family at 50-75k tokens
runs ~1 s per forward and ~40 forwards (stock, Dense, Radial, VMoBA: a warm-up and two timed steps
each; AdaSpa three such phases), the smaller ones less, plus Triton's first compilations. If a run
would pass a 10-minute call, split it: ``--families hunyuanvideo15-480p,wan-vace-720p,skyreels-df-540p,
skyreels-540p`` and then the rest.

Writes ``families_bench_<gpu-slug>_<YYYY-MM-DD>.{csv,json,png}`` into ``--out`` (default
``benchmarks/results/<gpu>_<date>``) and prints a table per family. ``--smoke`` builds 2-layer, 2-head versions of
every family at small sizes on the CPU (fastdit's PyTorch reference path, no cuDNN): it checks
that every row runs, not how fast.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import (  # noqa: E402
    add_out_argument,
    describe_error,
    git_commit,
    parse_list,
    synchronize,
    write_outputs,
)

import fastdit  # noqa: E402
from fastdit import GNA, AdaSpa, Agent, Dense, Radial, Schedule, VMoBA  # noqa: E402
from fastdit.testing.tiny import _cast_like_from_pretrained  # noqa: E402
from fastdit.cli.report import agg_pyplot  # noqa: E402

NUM_STEPS = 50
FIELDS = (
    "family", "label", "grid", "tokens", "other_tokens", "layers_run", "layers_full", "method",
    "phase", "step_index", "config", "status", "step_ms", "step_ms_full", "blocks_ms",
    "density", "peak_mem_gib", "out_finite", "e2e_s", "speedup_vs_stock", "wall_s", "error",
)

WAN14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
)


# --------------------------------------------------------------------------- family specs


@dataclass(frozen=True)
class Family:
    """One family at one resolution: how to build it, feed it, and which methods run on it."""

    name: str
    label: str
    model_class: str
    config: dict
    inputs: Callable  # (family, device, dtype, generator) -> list of forward kwargs (one per CFG pass)
    stacks: tuple[tuple[str, str], ...]  # (module attribute, config key of its depth)
    methods: tuple[str, ...]
    radial: Radial | None = None
    radial_note: str = ""
    gna: GNA | None = None
    grid: tuple[int, int, int] = (1, 1, 1)
    other_tokens: int = 0
    smoke: bool = False
    extra: dict = field(default_factory=dict)

    def truncated(self, layers: int) -> dict:
        """The config with ``layers`` blocks per stack (0: full depth)."""
        config = dict(self.config)
        if not layers:
            return config
        for _, key in self.stacks:
            if key == "vace_layers":
                config[key] = [v for v in config[key] if v < config["num_layers"]] or [0]
            else:
                config[key] = min(layers, config[key])
        return config

    def depth(self, config: dict, key: str) -> int:
        return len(config[key]) if key == "vace_layers" else config[key]


def _randn(generator, device, dtype, *shape):
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


def _mask(valid: int, length: int, device) -> torch.Tensor:
    return (torch.arange(length, device=device) < valid).long()[None]


def hv15_inputs(fam: Family, device, dtype, g) -> list[dict]:
    t, h, w = fam.grid
    x = _randn(g, device, dtype, 1, fam.config["in_channels"], t, h, w)
    text, byt5, image = fam.extra["text"], fam.extra["byt5"], fam.extra["image"]
    passes = []
    for valid_text, valid_byt5 in ((fam.extra["valid"], 8), (fam.extra["valid"] // 4, 1)):
        passes.append(dict(
            hidden_states=x, timestep=torch.tensor([500.0], device=device, dtype=dtype),  # as the pipeline passes it
            encoder_hidden_states=_randn(g, device, dtype, 1, text, fam.config["text_embed_dim"]),
            encoder_attention_mask=_mask(valid_text, text, device),
            encoder_hidden_states_2=_randn(g, device, dtype, 1, byt5, fam.config["text_embed_2_dim"]),
            encoder_attention_mask_2=_mask(valid_byt5, byt5, device),
            image_embeds=torch.zeros(1, image, fam.config["image_embed_dim"], device=device, dtype=dtype),
        ))
    return passes


def wan_inputs(fam: Family, device, dtype, g) -> list[dict]:
    t, h, w = fam.grid
    patch = fam.config["patch_size"]
    x = _randn(g, device, dtype, 1, fam.config["in_channels"], t * patch[0], h * patch[1], w * patch[2])
    common = dict(hidden_states=x, timestep=torch.tensor([500.0], device=device))
    if fam.extra.get("per_token"):  # Wan2.2 TI2V: first-frame (conditioning) tokens at 0
        timestep = torch.full((1, t * h * w), 500.0, device=device)
        timestep[:, : h * w] = 0.0
        common["timestep"] = timestep
    if fam.extra.get("control"):
        common["control_hidden_states"] = _randn(g, device, dtype, *x.shape[:1], fam.config["vace_in_channels"], *x.shape[2:])
    if fam.extra.get("forcing"):
        common["timestep"] = torch.linspace(100.0, 900.0, t, device=device)[None]
        common["enable_diffusion_forcing"] = True
    text = fam.extra["text"]
    return [common | dict(encoder_hidden_states=_randn(g, device, dtype, 1, text, fam.config["text_dim"]))
            for _ in range(2)]


def ltx_inputs(fam: Family, device, dtype, g) -> list[dict]:
    t, h, w = fam.grid
    text = fam.extra["text"]
    x = _randn(g, device, dtype, 1, t * h * w, fam.config["in_channels"])
    common = dict(hidden_states=x, timestep=torch.tensor([500.0], device=device), num_frames=t, height=h,
                  width=w, rope_interpolation_scale=(8 / 25, 32, 32))
    return [common | dict(encoder_hidden_states=_randn(g, device, dtype, 1, text, fam.config["caption_channels"]),
                          encoder_attention_mask=_mask(valid, text, device))
            for valid in (fam.extra["valid"], 4)]


def cogvideox_inputs(fam: Family, device, dtype, g) -> list[dict]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    t, h, w = fam.grid
    patch, text = fam.config["patch_size"], fam.other_tokens
    rotary = get_3d_rotary_pos_embed(
        embed_dim=fam.config["attention_head_dim"], crops_coords=((0, 0), (h, w)), grid_size=(h, w),
        temporal_size=t, device=device,
    )
    return [dict(  # the pipeline batches cond and uncond: one forward of batch 2
        hidden_states=_randn(g, device, dtype, 2, t, fam.config["in_channels"], h * patch, w * patch),
        encoder_hidden_states=_randn(g, device, dtype, 2, text, fam.config["text_embed_dim"]),
        timestep=torch.tensor([500, 500], device=device), image_rotary_emb=rotary,
    )]


def mochi_inputs(fam: Family, device, dtype, g) -> list[dict]:
    t, h, w = fam.grid
    patch, text = fam.config["patch_size"], fam.other_tokens
    mask = torch.cat([_mask(fam.extra["valid"] // 8, text, device), _mask(fam.extra["valid"], text, device)])
    return [dict(  # batched CFG, per-sample text
        hidden_states=_randn(g, device, dtype, 2, fam.config["in_channels"], t, h * patch, w * patch),
        encoder_hidden_states=_randn(g, device, dtype, 2, text, fam.config["text_embed_dim"]),
        encoder_attention_mask=mask, timestep=torch.tensor([500, 500], device=device),
    )]


def flux_inputs(fam: Family, device, dtype, g) -> list[dict]:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    _, h, w = fam.grid
    text = fam.other_tokens
    inputs = dict(
        hidden_states=_randn(g, device, dtype, 1, h * w, fam.config["in_channels"]),
        encoder_hidden_states=_randn(g, device, dtype, 1, text, fam.config["joint_attention_dim"]),
        pooled_projections=_randn(g, device, dtype, 1, fam.config["pooled_projection_dim"]),
        timestep=torch.tensor([0.5], device=device),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
    )
    if fam.config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5], device=device)
    return [inputs]  # guidance-distilled: one forward per step


def qwenimage_inputs(fam: Family, device, dtype, g) -> list[dict]:
    _, h, w = fam.grid
    text = fam.other_tokens
    x = _randn(g, device, dtype, 1, h * w, fam.config["in_channels"])
    return [dict(hidden_states=x, timestep=torch.tensor([0.5], device=device), img_shapes=[[fam.grid]],
                 encoder_hidden_states=_randn(g, device, dtype, 1, text, fam.config["joint_attention_dim"]),
                 encoder_hidden_states_mask=_mask(valid, text, device))
            for valid in (fam.extra["valid"], 12)]  # true CFG: 2 forwards, the negative prompt short


VIDEO = ("stock", "dense", "radial", "vmoba", "adaspa")
IMAGE = ("stock", "dense", "agent", "gna")
NO_PRESET = "no published Radial setting for this model: decay 0.2, Wan's schedule"


def _video_radial(preset: str | None) -> tuple[Radial, str]:
    if preset is None:
        return Radial(decay=0.2, dense_steps=12, dense_layers=1, sink=True), NO_PRESET
    return Radial.preset(preset), f"preset {preset}"


def families(smoke: bool) -> dict[str, Family]:
    """Full-size families, or (smoke) 2-layer, 2-head versions at small sizes."""
    if not smoke:
        hv15 = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                    num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, text_embed_dim=3584,
                    text_embed_2_dim=1472, image_embed_dim=1152, rope_axes_dim=(16, 56, 56), target_size=640)
        vace = dict(WAN14B, vace_layers=[0, 5, 10, 15, 20, 25, 30, 35], vace_in_channels=96)
        ti2v = dict(WAN14B, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)
        ltx = dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64,
                   cross_attention_dim=2048, num_layers=28, caption_channels=4096)
        cog = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                   text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49,
                   patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True, norm_eps=1e-5)
        mochi = dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48,
                     pooled_projection_dim=1536, in_channels=12, text_embed_dim=4096, time_embed_dim=256)
        flux = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        qwen = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
        grids = dict(hv15=(31, 30, 53), vace=(21, 45, 80), sky=(25, 34, 60), ti2v=(31, 22, 40), ltx=(16, 22, 38),
                     cog=(13, 30, 45), mochi=(28, 30, 53), img1=(1, 64, 64), img4=(1, 128, 128))
        text = dict(hv=(1000, 256, 729, 120), wan=512, ltx=(128, 40), cog=226, mochi=(256, 60), flux=512, qwen=(256, 120))
        # Sliding-tile-like 2-D windows over a quarter of the image (block density 0.31 / 0.28).
        gna1, gna4 = GNA(window=(1, 32, 32), stride=(1, 16, 16)), GNA(window=(1, 64, 64), stride=(1, 16, 16))
    else:
        hv15 = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                    num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=12, text_embed_2_dim=10, image_embed_dim=8,
                    rope_axes_dim=(4, 6, 6), target_size=64)
        wan = dict(WAN14B, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=32,
                   freq_dim=32)
        vace = dict(wan, vace_layers=[0, 1], vace_in_channels=96)
        ti2v = dict(wan, in_channels=48, out_channels=48)
        ltx = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
                   num_layers=2, caption_channels=16)
        cog = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                   text_embed_dim=16, num_layers=2, sample_width=20, sample_height=12, sample_frames=17, patch_size=2,
                   max_text_seq_length=7, use_rotary_positional_embeddings=True)
        mochi = dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=8,
                     in_channels=4, text_embed_dim=16, time_embed_dim=16)
        flux = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
        qwen = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
        grids = dict(hv15=(5, 6, 10), vace=(5, 6, 10), sky=(6, 6, 10), ti2v=(5, 6, 10), ltx=(5, 6, 10),
                     cog=(5, 6, 10), mochi=(5, 6, 10), img1=(1, 16, 24), img4=(1, 24, 32))
        text = dict(hv=(7, 4, 3, 5), wan=7, ltx=(6, 4), cog=7, mochi=(6, 4), flux=6, qwen=(6, 4))
        gna1, gna4 = GNA(window=(1, 5, 7), block_size=64), GNA(window=(1, 9, 9), block_size=64)
    wan14b = WAN14B if not smoke else wan
    sky_radial, sky_note = _video_radial("wan2.1-14b")
    specs = [
        Family("hunyuanvideo15-480p", "HunyuanVideo 1.5 T2V 480p x 121", "HunyuanVideo15Transformer3DModel", hv15,
               hv15_inputs, (("transformer_blocks", "num_layers"),), VIDEO, *_video_radial("hunyuanvideo"),
               grid=grids["hv15"], other_tokens=sum(text["hv"][:3]),
               extra=dict(text=text["hv"][0], byt5=text["hv"][1], image=text["hv"][2], valid=text["hv"][3])),
        Family("wan-vace-720p", "Wan2.1-VACE-14B 720p x 81", "WanVACETransformer3DModel", vace, wan_inputs,
               (("blocks", "num_layers"), ("vace_blocks", "vace_layers")), VIDEO, *_video_radial("wan2.1-14b"),
               grid=grids["vace"], extra=dict(text=text["wan"], control=True)),
        Family("skyreels-df-540p", "SkyReels-V2-DF-14B 540p x 97, causal blocks of 5 frames",
               "SkyReelsV2Transformer3DModel", wan14b, wan_inputs, (("blocks", "num_layers"),),
               ("stock", "dense", "radial"), sky_radial, sky_note, grid=grids["sky"],
               extra=dict(text=text["wan"], forcing=True, frames_per_block=5 if not smoke else 2)),
        Family("skyreels-540p", "SkyReels-V2-DF-14B 540p x 97, no causal mask", "SkyReelsV2Transformer3DModel",
               wan14b, wan_inputs, (("blocks", "num_layers"),), VIDEO, sky_radial, sky_note, grid=grids["sky"],
               extra=dict(text=text["wan"], forcing=True)),
        Family("wan22-ti2v-720p", "Wan2.2-TI2V-5B 720p x 121 (per-token timesteps)", "WanTransformer3DModel", ti2v,
               wan_inputs, (("blocks", "num_layers"),), VIDEO, *_video_radial(None), grid=grids["ti2v"],
               extra=dict(text=text["wan"], per_token=True)),
        Family("ltx-video-704p", "LTX-Video 2B 704 x 1216 x 121", "LTXVideoTransformer3DModel", ltx, ltx_inputs,
               (("transformer_blocks", "num_layers"),), VIDEO, *_video_radial(None), grid=grids["ltx"],
               extra=dict(text=text["ltx"][0], valid=text["ltx"][1])),
        Family("cogvideox-5b", "CogVideoX-5B 480 x 720 x 49", "CogVideoXTransformer3DModel", cog, cogvideox_inputs,
               (("transformer_blocks", "num_layers"),), VIDEO, *_video_radial(None), grid=grids["cog"],
               other_tokens=text["cog"]),
        Family("mochi-480p", "Mochi 1 480 x 848 x 163", "MochiTransformer3DModel", mochi, mochi_inputs,
               (("transformer_blocks", "num_layers"),), VIDEO, *_video_radial(None), grid=grids["mochi"],
               other_tokens=text["mochi"][0], extra=dict(valid=text["mochi"][1])),
    ]
    for size, grid, gna in (("1mp", grids["img1"], gna1), ("4mp", grids["img4"], gna4)):
        specs += [
            Family(f"flux-{size}", f"Flux.1-dev {grid[1] * 16}^2 px", "FluxTransformer2DModel", flux, flux_inputs,
                   (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")),
                   IMAGE, gna=gna, grid=grid, other_tokens=text["flux"]),
            Family(f"qwenimage-{size}", f"QwenImage {grid[1] * 16}^2 px", "QwenImageTransformer2DModel", qwen,
                   qwenimage_inputs, (("transformer_blocks", "num_layers"),), IMAGE, gna=gna, grid=grid,
                   other_tokens=text["qwen"][0], extra=dict(valid=text["qwen"][1])),
        ]
    return {spec.name: spec for spec in specs}


# --------------------------------------------------------------------------- build and time


def build(fam: Family, layers: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The family's transformer with random weights (diffusers' default init), in ``dtype`` with
    the modules ``from_pretrained`` keeps in fp32 (``_keep_in_fp32_modules``) in fp32."""
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, fam.model_class)(**fam.truncated(layers))
    _cast_like_from_pretrained(model, dtype)
    if fam.extra.get("frames_per_block"):
        model._set_ar_attention(fam.extra["frames_per_block"])
    return model.eval()


class BlockTimer:
    """Milliseconds inside each stack's blocks per step (CUDA events around every block)."""

    def __init__(self, model, stacks, device) -> None:
        self.device, self.handles, self.marks = device, [], {}
        self.pending: dict[str, list] = {}
        for attribute, _ in stacks:
            self.pending[attribute] = []
            for block in getattr(model, attribute):
                self.handles.append(block.register_forward_pre_hook(self._start))
                self.handles.append(block.register_forward_hook(self._stopper(attribute)))

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module, args):
        self.marks[id(module)] = self._mark()

    def _stopper(self, attribute):
        def stop(module, args, output):
            self.pending[attribute].append((self.marks.pop(id(module)), self._mark()))
        return stop

    def collect(self) -> dict[str, float]:
        out = {}
        for attribute, pairs in self.pending.items():
            if self.device.type == "cuda":
                out[attribute] = sum(a.elapsed_time(b) for a, b in pairs)
            else:
                out[attribute] = sum((b - a) * 1e3 for a, b in pairs)
            pairs.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def stock_sdpa(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority
        return sdpa_kernel(order)


def time_step(model, fam: Family, passes: list[dict], device, step_index: int, warmup: int, repeat: int):
    """Warm up, then time ``repeat`` steps (every CFG pass) at ``step_index``: (median step ms,
    median per-stack block ms, last output)."""
    names = ("cond", "uncond")[: len(passes)] if len(passes) > 1 else ("cond_uncond",)

    def step():
        out = None
        for name, kwargs in zip(names, passes):
            with model.cache_context(name, step_index=step_index, num_inference_steps=NUM_STEPS):
                result = model(**kwargs, return_dict=False)[0]
                out = result if out is None else out
        return out

    timer = BlockTimer(model, fam.stacks, device)
    steps, blocks, output = [], [], None
    try:
        with torch.inference_mode(), stock_sdpa(device):
            for _ in range(warmup):
                step()
            synchronize(device)
            timer.collect()
            for _ in range(repeat):
                synchronize(device)
                start = time.perf_counter()
                output = step()
                synchronize(device)
                steps.append((time.perf_counter() - start) * 1e3)
                blocks.append(timer.collect())
    finally:
        timer.remove()
    median_blocks = {a: statistics.median(b[a] for b in blocks) for a in blocks[0]}
    return statistics.median(steps), median_blocks, output


def full_depth_ms(step_ms: float, blocks: dict, run_config: dict, fam: Family,
                  stock_blocks: dict | None = None, dense_layers: int = 0) -> float:
    """Scale a step of the truncated model to the full depth (see the module docstring)."""
    total = step_ms - sum(blocks.values())
    for index, (attribute, key) in enumerate(fam.stacks):
        ran, full = fam.depth(run_config, key), fam.depth(fam.config, key)
        per_block = blocks[attribute] / ran
        dense = dense_layers if index == 0 and stock_blocks is not None else 0
        stock_per_block = stock_blocks[attribute] / ran if dense else 0.0
        total += (full - dense) * per_block + dense * stock_per_block
    return total


# --------------------------------------------------------------------------- one family


def method_phases(fam: Family, name: str):
    """(method object or None for stock, schedule, [(phase, step index)], note)."""
    if name == "stock":
        return None, None, [("step", 0)], "diffusers' processors, SDPA cuDNN first"
    if name == "dense":
        return Dense(), None, [("step", 0)], "fastdit kernel, full plan"
    if name == "radial":
        radial = fam.radial
        # All layers sparse on the timed step; the dense layer is added at stock cost in the estimate.
        return radial, Schedule(dense_steps=radial.dense_steps), [("sparse-step", radial.dense_steps)], fam.radial_note
    if name == "vmoba":
        method = VMoBA()
        dense = Schedule.from_method(method)
        return method, None, [("sparse-step", _dense_steps(dense))], "defaults (tau 0.25, mean tiles)"
    if name == "adaspa":
        return AdaSpa(), None, [("search-step", 10), ("sparse-step", 11), ("cached-search-step", 30)], "defaults"
    if name == "agent":
        return Agent(), Schedule(), [("agent-step", 0)], "defaults (4x4 cells), agents in the first 40% of steps"
    if name == "gna":
        return fam.gna, None, [("step", 0)], f"window {fam.gna.window}, every step"
    raise ValueError(f"unknown method {name!r}")


def _dense_steps(schedule: Schedule) -> int:
    return sum(schedule.is_dense(step, NUM_STEPS, 1, 2) for step in range(NUM_STEPS))


VMOBA_DENSE = _dense_steps(Schedule.from_method(VMoBA()))  # 13 of 50


def run_family(fam: Family, args, device, dtype) -> list[dict]:
    rows = []
    run_config = fam.truncated(args.layers)
    grid = fastdit.LatentGrid(*fam.grid)
    base = dict(family=fam.name, label=fam.label, grid="x".join(map(str, fam.grid)), tokens=grid.num_tokens,
                other_tokens=fam.other_tokens,
                layers_run="+".join(str(fam.depth(run_config, k)) for _, k in fam.stacks),
                layers_full="+".join(str(fam.depth(fam.config, k)) for _, k in fam.stacks))
    start = time.perf_counter()
    try:
        model = build(fam, args.layers, device, dtype, args.seed)
        passes = fam.inputs(fam, device, dtype, torch.Generator(device=device).manual_seed(args.seed + 1))
    except Exception as exc:  # noqa: BLE001 - a family that cannot be built is a row, not a crash
        return [base | dict(method="-", phase="build", status="error", error=describe_error(exc))]
    stock_blocks = None
    methods = [m for m in fam.methods if not args.methods or m in args.methods]
    for name in methods:
        method, schedule, phases, note = method_phases(fam, name)
        handle = None
        try:
            if method is not None:
                handle = fastdit.apply(model, method, schedule=schedule)
            for phase, step_index in phases:
                wall = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                step_ms, blocks, out = time_step(model, fam, passes, device, step_index, args.warmup, args.repeat)
                if name == "stock":
                    stock_blocks = blocks
                dense_layers = fam.radial.dense_layers if name == "radial" else 0
                full = full_depth_ms(step_ms, blocks, run_config, fam, stock_blocks, dense_layers)
                densities = handle.state.densities if handle is not None else {}
                at_step = [d for (_, step), d in densities.items() if step == step_index]
                rows.append(base | dict(
                    method=name, phase=phase, step_index=step_index, config=note, status="ok",
                    step_ms=round(step_ms, 3), step_ms_full=round(full, 3),
                    blocks_ms=round(sum(blocks.values()), 3),
                    density=round(statistics.mean(at_step), 4) if at_step else (1.0 if name in ("stock", "dense") else None),
                    peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
                    out_finite=bool(torch.isfinite(out).all()), wall_s=round(time.perf_counter() - wall, 1),
                ))
        except Exception as exc:  # noqa: BLE001 - one failing method is a row, the others still run
            rows.append(base | dict(method=name, phase="-", config=note, status="error", error=describe_error(exc)))
        finally:
            if handle is not None:
                handle.remove()
    print(f"{fam.name}: {time.perf_counter() - start:.0f} s", flush=True)
    del model, passes
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- estimates, report


def _find(rows, family, method, phase):
    return next((r for r in rows if r["family"] == family and r["method"] == method and r["phase"] == phase
                 and r["status"] == "ok"), None)


def estimates(rows: list[dict], specs: dict[str, Family]) -> list[dict]:
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        stock = _find(rows, family, "stock", "step")
        s = stock["step_ms_full"] / 1e3 if stock else None

        def ms(method, phase):
            row = _find(rows, family, method, phase)
            return row["step_ms_full"] / 1e3 if row else None

        formulas = {
            "stock": lambda: NUM_STEPS * s,
            "dense": lambda: NUM_STEPS * ms("dense", "step"),
            "gna": lambda: NUM_STEPS * ms("gna", "step"),
            "agent": lambda: 20 * ms("agent", "agent-step") + 30 * s,
            "vmoba": lambda: VMOBA_DENSE * s + (NUM_STEPS - VMOBA_DENSE) * ms("vmoba", "sparse-step"),
            "adaspa": lambda: 10 * s + ms("adaspa", "search-step") + 19 * ms("adaspa", "sparse-step")
            + ms("adaspa", "cached-search-step") + 19 * ms("adaspa", "sparse-step"),
        }
        spec = specs.get(family)
        if spec is not None and spec.radial is not None:
            ds = spec.radial.dense_steps
            formulas["radial"] = lambda: ds * s + (NUM_STEPS - ds) * ms("radial", "sparse-step")
        for method in dict.fromkeys(r["method"] for r in rows if r["family"] == family):
            if method not in formulas:
                continue
            try:
                total = formulas[method]()
            except TypeError:  # a phase (or the stock row) is missing
                continue
            first = next(r for r in rows if r["family"] == family)
            out.append({k: first.get(k) for k in ("family", "label", "grid", "tokens", "other_tokens")} | dict(
                method=method, phase=f"{NUM_STEPS}-step estimate", status="ok", e2e_s=round(total, 2),
                speedup_vs_stock=round(NUM_STEPS * s / total, 3) if s else None,
            ))
    return out


def report(rows: list[dict], ests: list[dict]) -> None:
    for family in dict.fromkeys(r["family"] for r in rows):
        first = next(r for r in rows if r["family"] == family)
        print(f"\n{first.get('label', family)}: grid {first.get('grid')} ({first.get('tokens')} video/image tokens "
              f"+ {first.get('other_tokens')} other), layers run {first.get('layers_run')} of {first.get('layers_full')}")
        print(f"  {'method':<8} {'phase':<20} {'ms (run)':>10} {'ms (full depth)':>16} {'density':>8}  config")
        for r in (r for r in rows if r["family"] == family):
            if r["status"] != "ok":
                print(f"  {r['method']:<8} {r['phase']:<20} ERROR {r.get('error')}")
                continue
            density = "" if r["density"] is None else f"{r['density']:.3f}"
            print(f"  {r['method']:<8} {r['phase']:<20} {r['step_ms']:>10.1f} {r['step_ms_full']:>16.1f} "
                  f"{density:>8}  {r['config']}")
        for e in (e for e in ests if e["family"] == family):
            speed = "" if e["speedup_vs_stock"] is None else f"{e['speedup_vs_stock']:.2f}x stock"
            print(f"  {e['method']:<8} {e['phase']:<20} {e['e2e_s']:>10.1f} s  {speed}")


def plot(rows: list[dict], metadata: dict, path: Path) -> None:
    """50-step speedup over stock per family and method."""
    plt = agg_pyplot()
    ests = [r for r in rows if str(r.get("phase", "")).endswith("estimate") and r.get("speedup_vs_stock")]
    if plt is None or not ests:
        return
    families_ = list(dict.fromkeys(e["family"] for e in ests))
    methods = list(dict.fromkeys(e["method"] for e in ests))
    fig, axis = plt.subplots(figsize=(max(8, 1.2 * len(families_)), 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [f + i * width for f, family in enumerate(families_)]
        values = [next((e["speedup_vs_stock"] for e in ests if e["family"] == fam and e["method"] == method), 0)
                  for fam in families_]
        axis.bar(xs, values, width, label=method)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([f + 0.4 - width / 2 for f in range(len(families_))], families_, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(f"{NUM_STEPS}-step speedup over stock (transformer)")
    axis.set_title(f"fastdit families_bench: {metadata['device_name']}, {metadata['dtype']}, {metadata['date']}")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def collect_metadata(args, device: torch.device, dtype: torch.dtype, chosen: list[Family]) -> dict:
    import diffusers

    from fastdit.kernels import explain_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        date=datetime.date.today().isoformat(),
        device_type=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).removeprefix("torch."), torch=torch.__version__, triton=triton_version,
        diffusers=diffusers.__version__, fastdit=fastdit.__version__, cuda=torch.version.cuda,
        fastdit_backends=explain_backends(device, dtype), git_commit=git_commit(), num_steps=NUM_STEPS,
        layers=args.layers, smoke=args.smoke, families=[f.name for f in chosen],
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Full-size transformers of every fastdit family, stock vs fastdit.")
    parser.add_argument("--families", type=parse_list, default=None, help="comma list (default: all)")
    parser.add_argument("--methods", type=parse_list, default=None,
                        help="comma list among stock,dense,radial,vmoba,adaspa,agent,gna (default: each family's)")
    parser.add_argument("--layers", type=int, default=2,
                        help="blocks per stack actually built, scaled to the full depth (0: full depth; default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per phase (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="timed steps per phase, median (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU in fp32 (checks every row runs)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.layers < 0:
        parser.error(f"--layers must be >= 0, got {args.layers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: OpenMP's spinning threads only slow them down
    specs = families(args.smoke)
    unknown = [f for f in args.families or () if f not in specs]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {', '.join(specs)}")
    chosen = [specs[name] for name in (args.families or specs)]
    rows = []
    for fam in chosen:
        rows += run_family(fam, args, device, dtype)
    ests = estimates(rows, specs)
    report(rows, ests)
    metadata = collect_metadata(args, device, dtype, chosen)
    slug = re.sub(r"[^a-z0-9]+", "-", metadata["device_name"].lower()).strip("-") if device.type == "cuda" else "cpu"
    stem = f"families_bench_{slug}{'-smoke' if args.smoke else ''}_{datetime.date.today().isoformat()}"
    paths = write_outputs(rows + ests, metadata, args.out, stem, fields=FIELDS, plot=plot)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    errors = [r for r in rows if r["status"] != "ok"]
    if errors:
        print(f"{len(errors)} row(s) failed: " + "; ".join(f"{r['family']}/{r['method']}: {r.get('error')}" for r in errors))
    return 1 if errors and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
