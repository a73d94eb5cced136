"""Agent attention benchmark: full-size Stable Diffusion UNets and Wan2.1-1.3B, stock against fastdit.

What it measures
----------------
Denoising-step times of full-size models built from their published configs with random weights
(fp16 UNets, bf16 Wan, on the GPU; no checkpoint download):

* ``sd15-512``: Stable Diffusion 1.5's UNet (``runwayml/stable-diffusion-v1-5``, ``unet/config.json``
  written out below), 512 x 512 px: latent ``[2, 4, 64, 64]`` (the pipeline's classifier-free
  guidance batch), text ``[2, 77, 768]``; its highest-resolution self-attention sees 4,096 tokens;
* ``sd15-1024``: the same UNet at 1024 x 1024 px: latent ``[2, 4, 128, 128]``, 16,384 tokens;
* ``sd15-2048``: the same UNet at 2048 x 2048 px: latent ``[2, 4, 256, 256]``, 65,536 tokens;
* ``sdxl-1024``: SDXL base's UNet (``stabilityai/stable-diffusion-xl-base-1.0``), 1024 x 1024 px:
  latent ``[2, 4, 128, 128]``, text ``[2, 77, 2048]`` plus the ``text_time`` conditioning; its
  highest-resolution self-attention (``down_blocks.1``/``up_blocks.1``, the first block has none)
  sees 4,096 tokens;
* ``sdxl-2048``: the same UNet at 2048 x 2048 px: latent ``[2, 4, 256, 256]``, 16,384 tokens at
  its highest-resolution self-attention (4,096 in the ten-layer ``down_blocks.2`` stage);
* ``wan13b-480p``: Wan2.1-1.3B's transformer (the config of ``benchmarks/e2e_bench.py``), 480p x 81
  frames: 21 x 30 x 52 = 32,760 tokens, one step = cond + uncond forwards.

One UNet step is one forward of the CFG batch (2 latents per image, as the Stable Diffusion
pipelines call it), with the timestep a 0-d tensor on the GPU (also as the pipelines pass it:
fastdit reads it once per forward, a host synchronisation the stock path does not have; it is
inside the timing). One Wan step is two forwards inside ``cache_context`` (the Wan pipeline's
loop), as in ``e2e_bench.py``.

The GPU bounds the UNet step (batch search)
-------------------------------------------
A UNet forward is about a thousand kernel launches from Python; at batch 2 and moderate sizes
launching takes longer than the GPU work, and the step time measures the CPU (the first version
of this benchmark: stock SD 1.5 took 47 ms per step at 512 and 42.5 ms at 1024). CUDA graphs
would remove the launches, but fastdit's UNet path reads the timestep on the host once per
forward (the Stable Diffusion pipelines set no ``cache_context``), which a graph cannot capture.
So every UNet row searches the batch instead: 1, 2, 4, ... CFG pairs (up to ``--max-pairs``),
timing the step without any hook, until one more doubling lowers the time per image by less
than ``BOUND_GAIN`` (5%): the launches are then hidden behind GPU work and the step is
GPU-bound. The row reports the time per image (step time / pairs) at that batch, the curve it
searched, and (one more timed pass at that batch, with CUDA-event hooks on the self-attention
modules) the attention share. Inputs are drawn once at the largest batch and sliced, so the
first image is the same at every batch (``rel_diff_vs_stock`` compares it). A batch that runs out
of memory ends the search at the previous one. Wan rows are GPU-bound at batch 1.

Methods:

* ``stock``: diffusers' stock processors on torch SDPA (default backend choice);
* ``dense``: ``fastdit.Dense()``, every self-attention on fastdit's kernel with a full plan (the
  kernel baseline, to separate kernel speed from the agent algorithm);
* ``agent``: ``fastdit.Agent()`` with its training-free defaults (UNets: 4 x 4-cell agents, i.e.
  ``N / 16``, in the highest-resolution self-attention only; Wan: ``(2, 8, 8)`` cells, 308
  agents, every layer), timed on an agent step;
* ``agent-allres`` (UNets only): ``fastdit.Agent(max_downsample=8)``, agents at every resolution
  where the guard allows (agents fewer than half the tokens).

Agent's published schedule runs agents in the first 40% of the steps and exact attention after,
so the 50-step estimate is ``20 * agent step + 30 * stock step`` for the agent rows and
``50 * step`` otherwise (UNet or transformer only: text encoder, VAE and scheduler excluded). Per
row: median ms per step over ``--repeat`` steps after ``--warmup``, time inside all
self-attention modules (``attn1``, projections included; CUDA events) and inside the agent layers
only, peak memory, and the output's max difference to stock relative to its max (agents change
the output by design; ``dense`` should be ~1e-3 in half precision).

Published reference point: AgentSD (agents + ToMe token merging) reports 1.70x for a whole SD 1.5
generation at 512 x 512 (50 PLMS steps, RTX 4090), part of which is ToMe's token reduction,
which fastdit does not do.

How to run
----------
    python -m benchmarks.agent_bench --models sd15-1024,sd15-2048,sdxl-2048   # ~2-3 min, H200
    python -m benchmarks.agent_bench                         # all models (~6-8 min)
    python -m benchmarks.agent_bench --models sd15-512,sdxl-1024
    python -m benchmarks.agent_bench --smoke --out /tmp/agent  # tiny models, CPU fp32, < 1 min
    python -m benchmarks.agent_bench --replot benchmarks/results/<gpu>_<date>/agent_bench_<gpu>_<date>.json

Writes ``agent_bench_<gpu-slug>_<YYYY-MM-DD>.{csv,json,png}`` into ``--out`` (default
``benchmarks/results/<gpu>_<date>``) and prints a table. ``--smoke`` runs tiny UNets (SD 1.5 and SDXL block
layouts) and a tiny Wan on the CPU in fp32 (fastdit's PyTorch reference path).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.e2e_bench import MODELS as WAN_MODELS  # noqa: E402
from benchmarks.e2e_bench import SMOKE_MODELS as WAN_SMOKE_MODELS  # noqa: E402
from benchmarks.e2e_bench import AttentionTimer, build_transformer, make_inputs  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    add_out_argument,
    choose_models,
    describe_error,
    git_commit,
    parse_list,
    pyplot,
    stem,
    synchronize,
)

import fastdit  # noqa: E402
from fastdit.cli.bench import write_outputs  # noqa: E402
from fastdit.kernels import explain_backends  # noqa: E402

NUM_STEPS = 50
AGENT_STEP_FRACTION = 0.4  # published: agents in the first 40% of the steps
ALL_METHODS = ("stock", "dense", "agent", "agent-allres")
TIMESTEP = 500.0
PUBLISHED = "AgentSD (with ToMe): 1.70x per SD 1.5 512x512 image, 50 PLMS steps, RTX 4090"

# runwayml/stable-diffusion-v1-5, unet/config.json (the fields that differ from diffusers' defaults
# are the same as the defaults here; written out in full for the record).
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json.
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
    center_input_sample=False, cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
)
SMOKE_SD15_UNET = dict(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32,
    layers_per_block=1, norm_num_groups=8,
)
SMOKE_SDXL_UNET = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 2), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, layers_per_block=1, norm_num_groups=8,
)

CSV_FIELDS = (
    "model", "kind", "tokens_top", "method", "agents_top", "status", "ms_step", "ms_step_min",
    "repeats", "attn_ms_step", "attn_share", "agent_attn_ms_step", "step_density", "peak_mem_gib",
    "out_finite", "rel_diff_vs_stock", "e2e_s", "speedup_step", "speedup_e2e", "wall_s", "error",
    # UNets: CFG pairs per forward at which the step is GPU-bound, and the searched curve
    # ("pairs:ms per image; ..."); ms_step and the attention columns are per image.
    "pairs", "gpu_bound", "batch_curve",
)
BOUND_GAIN = 0.05  # a doubling that saves less per image than this: the GPU bounds the step


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    kind: str  # "unet" or "wan"
    config: dict
    latent: tuple[int, ...]  # UNet: [B, C, H, W] (CFG batch); Wan: e2e_bench's ModelSpec.latent
    text: tuple[int, int] = (77, 768)  # UNet: (tokens, dim)
    warmup: int = 3
    repeat: int = 10
    wan: object = None  # e2e_bench.ModelSpec for kind "wan"
    methods: tuple[str, ...] = field(default=ALL_METHODS)


SPECS = {
    s.name: s
    for s in (
        Spec("sd15-512", "SD 1.5 UNet 512x512 (CFG batch 2)", "unet", SD15_UNET, (2, 4, 64, 64)),
        Spec("sd15-1024", "SD 1.5 UNet 1024x1024 (CFG batch 2)", "unet", SD15_UNET, (2, 4, 128, 128),
             warmup=2, repeat=4),
        Spec("sd15-2048", "SD 1.5 UNet 2048x2048 (CFG batch 2)", "unet", SD15_UNET, (2, 4, 256, 256),
             warmup=1, repeat=3),
        Spec("sdxl-1024", "SDXL UNet 1024x1024 (CFG batch 2)", "unet", SDXL_UNET, (2, 4, 128, 128),
             text=(77, 2048), warmup=2, repeat=4),
        Spec("sdxl-2048", "SDXL UNet 2048x2048 (CFG batch 2)", "unet", SDXL_UNET, (2, 4, 256, 256),
             text=(77, 2048), warmup=1, repeat=3),
        Spec("wan13b-480p", "Wan2.1-1.3B 480p x 81 (cond + uncond)", "wan", {}, (), warmup=2,
             repeat=3, wan=WAN_MODELS["wan13b-480p"], methods=("stock", "dense", "agent")),
    )
}
SMOKE_SPECS = {
    s.name: s
    for s in (
        # 24 x 40 latent: 960 tokens at the highest resolution, 60 agents.
        Spec("smoke-sd15", "tiny SD 1.5-style UNet", "unet", SMOKE_SD15_UNET, (2, 4, 24, 40),
             text=(7, 32), warmup=1, repeat=2),
        Spec("smoke-sdxl", "tiny SDXL-style UNet", "unet", SMOKE_SDXL_UNET, (2, 4, 32, 48),
             text=(7, 32), warmup=1, repeat=2),
        Spec("smoke-wan", "tiny Wan", "wan", {}, (), warmup=1, repeat=1,
             wan=WAN_SMOKE_MODELS["smoke-tiny"], methods=("stock", "dense", "agent")),
    )
}


# --------------------------------------------------------------------------- models and inputs


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``UNet2DConditionModel(**config)`` with random weights, built on the meta device and
    materialised in ``dtype`` on ``device``: matrices and convolutions ``N(0, 1/fan_in)``, biases
    0, norm scales 1 (the timing does not depend on the values; the output is checked finite)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = torch.nn.Module.to(unet, dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
            if "norm" in owner:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            else:
                param.zero_()
    if any(True for _ in unet.buffers()):
        raise RuntimeError("UNet2DConditionModel has buffers that to_empty left uninitialised")
    return unet.eval()


def unet_inputs(spec: Spec, unet, device, dtype, seed: int, pairs: int = 1) -> dict:
    """UNet inputs for ``pairs`` CFG pairs (``2 * pairs`` latents); :func:`slice_pairs` takes
    the first ones, so every batch starts with the same image."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    batch = spec.latent[0] * pairs
    kwargs = dict(sample=randn(batch, *spec.latent[1:]), timestep=torch.tensor(TIMESTEP, device=device),
                  encoder_hidden_states=randn(batch, *spec.text), return_dict=False)
    if unet.config.addition_embed_type == "text_time":
        text_embeds = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(batch, text_embeds),
                                           time_ids=torch.tensor([[1024.0, 1024.0, 0, 0, 1024.0, 1024.0]] * batch,
                                                                 device=device, dtype=dtype))
    return kwargs


def slice_pairs(inputs: dict, pairs: int, per_pair: int = 2) -> dict:
    """The first ``pairs`` CFG pairs of :func:`unet_inputs`'s batch."""
    count = pairs * per_pair
    sliced = dict(inputs, sample=inputs["sample"][:count],
                  encoder_hidden_states=inputs["encoder_hidden_states"][:count])
    if "added_cond_kwargs" in inputs:
        sliced["added_cond_kwargs"] = {k: v[:count] for k, v in inputs["added_cond_kwargs"].items()}
    return sliced


# --------------------------------------------------------------------------- one model


class ModelRun:
    def __init__(self, spec: Spec, args, device, dtype) -> None:
        self.spec, self.args, self.device, self.dtype = spec, args, device, dtype
        self.warmup = spec.warmup if args.warmup is None else args.warmup
        self.repeat = spec.repeat if args.repeat is None else args.repeat
        if spec.kind == "unet":
            from fastdit.pipelines import unet as adapter

            self.model = build_unet(spec.config, device, dtype, args.seed)
            self.max_pairs = args.max_pairs
            self.all_inputs = unet_inputs(spec, self.model, device, dtype, args.seed, args.max_pairs)
            self.inputs = slice_pairs(self.all_inputs, 1)
            modules = adapter.self_attention_modules(self.model)
            factors = adapter.self_attention_downsampling(self.model)
            self.attn_modules = modules
            self.top_modules = [m for m, f in zip(modules, factors) if f == 1]
            self.top_tokens = self._top_tokens()
        else:
            from fastdit.pipelines import wan as adapter

            self.model = build_transformer(spec.wan, device, dtype, args.seed)
            self.inputs = make_inputs(spec.wan, device, dtype, args.seed)
            self.attn_modules = self.top_modules = adapter.self_attention_modules(self.model)
            self.top_tokens = spec.wan.grid.num_tokens
        self.reference = None
        self.rows: list[dict] = []

    def _top_tokens(self) -> int:
        seen = []
        hook = self.top_modules[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        with torch.inference_mode():
            self.forward_step()
        hook.remove()
        return seen[0]

    def forward_step(self) -> torch.Tensor:
        if self.spec.kind == "unet":
            return self.model(**self.inputs)[0]
        timestep = torch.tensor([TIMESTEP], device=self.device)
        outputs = []
        for name, text in (("cond", self.inputs.text_cond), ("uncond", self.inputs.text_uncond)):
            with self.model.cache_context(name, step_index=0, num_inference_steps=NUM_STEPS):
                outputs.append(self.model(hidden_states=self.inputs.latent, timestep=timestep,
                                          encoder_hidden_states=text, return_dict=False)[0])
        return outputs[0]

    def method(self, name: str):
        block = 128
        if name == "dense":
            return fastdit.Dense(block_size=block)
        if name == "agent":
            return fastdit.Agent(block_size=block)
        return fastdit.Agent(block_size=block, max_downsample=8)

    def run(self, methods: list[str]) -> list[dict]:
        for name in [m for m in methods if m in self.spec.methods]:
            row = dict.fromkeys(CSV_FIELDS)
            row.update(model=self.spec.name, kind=self.spec.kind, tokens_top=self.top_tokens, method=name)
            if name.startswith("agent"):
                method = self.method(name)
                grid = (fastdit.LatentGrid(1, *self._top_grid()) if self.spec.kind == "unet"
                        else self.spec.wan.grid)
                row["agents_top"] = method.num_agents(grid)
            self.measure(row)
            self.rows.append(row)
        return self.rows

    def _top_grid(self) -> tuple[int, int]:
        # The highest-resolution self-attention's grid from the latent (2**level halvings).
        height, width = self.spec.latent[2:]
        while height * width > self.top_tokens:
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width

    def time_steps(self, repeat: int, timers=()) -> tuple[list[float], torch.Tensor]:
        """``self.warmup`` untimed steps, then ``repeat`` timed ones (ms, synchronised)."""
        steps, output = [], None
        with torch.inference_mode():
            for _ in range(self.warmup):
                self.forward_step()
            synchronize(self.device)
            for timer in timers:
                timer.collect_ms()
            for _ in range(repeat):
                synchronize(self.device)
                start = time.perf_counter()
                output = self.forward_step()
                synchronize(self.device)
                steps.append((time.perf_counter() - start) * 1e3)
        return steps, output

    def search_batch(self, row: dict) -> int:
        """UNets: the CFG pairs per forward at which the step is GPU-bound (module docstring),
        timed without hooks; fills ``pairs``, ``gpu_bound``, ``batch_curve``."""
        curve, pairs, bound = [], 1, False
        while True:
            self.inputs = slice_pairs(self.all_inputs, pairs)
            try:
                steps, _ = self.time_steps(self.repeat)
            except torch.cuda.OutOfMemoryError:
                if not curve:
                    raise
                torch.cuda.empty_cache()
                curve.append((pairs, None))
                pairs //= 2
                break
            curve.append((pairs, statistics.median(steps) / pairs))
            done = [c for c in curve if c[1] is not None]
            if len(done) > 1 and done[-1][1] > done[-2][1] * (1 - BOUND_GAIN):
                bound = True
                break
            if pairs * 2 > self.max_pairs:
                break
            pairs *= 2
        self.inputs = slice_pairs(self.all_inputs, pairs)
        row.update(pairs=pairs, gpu_bound=bound, batch_curve="; ".join(
            f"{p}:{'oom' if ms is None else format(ms, '.2f')}" for p, ms in curve))
        return pairs

    def measure(self, row: dict) -> None:
        name, wall = row["method"], time.perf_counter()
        handle = timer = top_timer = None  # the timers hook in for the attention pass only
        try:
            if name != "stock":
                reason = explain_backends(self.device, self.dtype, 128)["triton"]
                if self.device.type == "cuda" and reason:
                    raise RuntimeError(f"fastdit Triton kernel cannot run: {reason}")
                # Every step an agent step (the estimate mixes in the stock step for the rest).
                handle = fastdit.apply(self.model, self.method(name), schedule=fastdit.Schedule())
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            pairs = self.search_batch(row) if self.spec.kind == "unet" else 1
            # The step at the chosen batch, timed without hooks (the reported time).
            steps, output = self.time_steps(self.repeat)
            # The attention pass: CUDA-event hooks on the self-attention modules.
            timer = AttentionTimer(self.attn_modules, self.device)
            top_timer = AttentionTimer(self.top_modules, self.device)
            attn_steps, attn, top = [], [], []
            with torch.inference_mode():
                for _ in range(max(1, self.repeat // 2)):
                    synchronize(self.device)
                    start = time.perf_counter()
                    self.forward_step()
                    synchronize(self.device)
                    attn_steps.append((time.perf_counter() - start) * 1e3)
                    attn.append(timer.collect_ms())
                    top.append(top_timer.collect_ms())
            out = output.float()[:2]  # the first image (its CFG pair): the same at every batch
            ms = statistics.median(steps) / pairs
            attn_ms = statistics.median(attn) / pairs
            row.update(
                status="ok", ms_step=ms, ms_step_min=min(steps) / pairs, repeats=len(steps),
                attn_ms_step=attn_ms,
                attn_share=statistics.median(attn) / statistics.median(attn_steps),
                agent_attn_ms_step=statistics.median(top) / pairs if name.startswith("agent") else None,
                out_finite=bool(torch.isfinite(output).all()),
                peak_mem_gib=(torch.cuda.max_memory_allocated(self.device) / 2**30
                              if self.device.type == "cuda" else None),
            )
            if handle is not None:
                values = list(handle.state.densities.values())
                row["step_density"] = sum(values) / len(values) if values else None
            else:
                row["step_density"] = 1.0
            if name == "stock":
                self.reference = out.detach().clone()
            if self.reference is not None:
                row["rel_diff_vs_stock"] = ((out - self.reference).abs().max()
                                            / self.reference.abs().max()).item()
        except Exception as exc:  # one failing method must not end the run
            row.update(status="error", error=describe_error(exc))
        finally:
            for hooks in (timer, top_timer):
                if hooks is not None:
                    hooks.remove()
            if handle is not None:
                handle.remove()
        row["wall_s"] = round(time.perf_counter() - wall, 1)
        log(row)

    def close(self) -> None:
        del self.model, self.inputs, self.reference
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def log(row: dict) -> None:
    head = f"[{row['model']}] {row['method']:<13}"
    if row["status"] != "ok":
        print(f"{head}{row['status'].upper()}: {(row['error'] or '')[:200]}", flush=True)
        return
    agent = f"  agent-layers {row['agent_attn_ms_step']:.1f} ms" if row["agent_attn_ms_step"] is not None else ""
    diff = f"  diff {row['rel_diff_vs_stock']:.1e}" if row["rel_diff_vs_stock"] is not None else ""
    batch = ""
    if row["pairs"] is not None:
        batch = (f"  [{row['pairs']} CFG pair(s)/forward, "
                 f"{'GPU-bound' if row['gpu_bound'] else 'not shown GPU-bound'}: {row['batch_curve']}]")
    print(f"{head}{row['ms_step']:10.2f} ms/step  attn1 {row['attn_ms_step']:.1f} ms "
          f"({row['attn_share'] * 100:.0f}%){agent}  density {row['step_density']:.3f}{diff}"
          f"  ({row['wall_s']} s){batch}", flush=True)


# --------------------------------------------------------------------------- estimates, output


def add_estimates(rows: list[dict]) -> None:
    """50-step estimates and speedups over stock (per step and end to end), in place."""
    agent_steps = round(AGENT_STEP_FRACTION * NUM_STEPS)
    for model in dict.fromkeys(r["model"] for r in rows):
        stock = next((r for r in rows if r["model"] == model and r["method"] == "stock"
                      and r["status"] == "ok"), None)
        for row in (r for r in rows if r["model"] == model and r["status"] == "ok"):
            if row["method"].startswith("agent"):
                if stock is None:
                    continue
                total_ms = agent_steps * row["ms_step"] + (NUM_STEPS - agent_steps) * stock["ms_step"]
            else:
                total_ms = NUM_STEPS * row["ms_step"]
            row["e2e_s"] = total_ms / 1e3
            if stock is not None:
                row["speedup_step"] = stock["ms_step"] / row["ms_step"]
                row["speedup_e2e"] = NUM_STEPS * stock["ms_step"] / total_ms


def format_table(rows: list[dict]) -> str:
    lines = ["(UNets: ms per image at the batch where the GPU bounds the step, 'pairs' CFG pairs "
             "per forward; * = the search reached --max-pairs or memory before one more doubling "
             f"gained < {BOUND_GAIN:.0%} per image)",
             f"{'model':<13}{'method':<14}{'ms/step':>10}{'attn1 ms':>10}{'agent ms':>10}"
             f"{'density':>9}{'x step':>8}{'50-step s':>11}{'x 50-step':>10}{'diff':>9}{'pairs':>7}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<13}{r['method']:<14}{r['status']}: {(r['error'] or '')[:80]}")
            continue

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        lines.append(
            f"{r['model']:<13}{r['method']:<14}{r['ms_step']:>10.2f}{r['attn_ms_step']:>10.2f}"
            f"{fmt(r['agent_attn_ms_step'], '.2f'):>10}{fmt(r['step_density'], '.3f'):>9}"
            f"{fmt(r['speedup_step'], '.2f'):>8}{fmt(r['e2e_s'], '.2f'):>11}"
            f"{fmt(r['speedup_e2e'], '.2f'):>10}{fmt(r['rel_diff_vs_stock'], '.1e'):>9}"
            f"{fmt(r['pairs'], 'd'):>7}{'' if r['gpu_bound'] in (None, True) else '*':<1}")
    return "\n".join(lines)


def plot(rows: list[dict], metadata: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {"stock": "black", "dense": "tab:blue", "agent": "tab:orange", "agent-allres": "tab:red"}
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        x = range(len(ok))
        ax.bar(x, [r["ms_step"] for r in ok], color=[colors[r["method"]] for r in ok], alpha=0.45,
               label="step")
        ax.bar(x, [r["attn_ms_step"] for r in ok], color=[colors[r["method"]] for r in ok],
               hatch="//", edgecolor="white", alpha=0.9, label="self-attention (attn1)")
        for i, r in enumerate(ok):
            note = f"{r['ms_step']:.3g} ms"
            if r["speedup_step"] is not None and r["method"] != "stock":
                note += f"\n{r['speedup_step']:.2f}x step"
            if r["speedup_e2e"] is not None and r["method"].startswith("agent"):
                note += f"\n{r['speedup_e2e']:.2f}x {NUM_STEPS}-step"
            ax.text(i, r["ms_step"], note, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [r["method"] for r in ok], fontsize=8)
        if ok:
            ax.set_ylim(0, max(r["ms_step"] for r in ok) * 1.3)
        first = ok[0] if ok else {}
        pairs = f", {first['pairs']} CFG pairs/forward" if first.get("pairs") else ""
        ax.set_title(f"{model}\n{first.get('tokens_top')} tokens at the highest resolution{pairs}", fontsize=9)
        ax.set_ylabel("ms per denoising step per image (median; UNets at a GPU-bound batch)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"fastdit agent_bench: {metadata['device_name']}, torch {metadata['torch']}, "
                 f"diffusers {metadata['diffusers']}, {metadata['date']}  (agents in "
                 f"{round(AGENT_STEP_FRACTION * NUM_STEPS)} of {NUM_STEPS} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect_metadata(args, device: torch.device) -> dict:
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return dict(
        date=datetime.date.today().isoformat(), device_type=device.type, device_name=name,
        torch=torch.__version__, triton=triton_version, diffusers=diffusers.__version__,
        fastdit=fastdit.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        git_commit=git_commit(), smoke=args.smoke, num_steps=NUM_STEPS,
        agent_steps=round(AGENT_STEP_FRACTION * NUM_STEPS), agent=repr(fastdit.Agent()),
        published=PUBLISHED,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )


def output_stem(metadata: dict) -> str:
    return stem("agent_bench", metadata)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time full-size SD 1.5 / SDXL UNet and Wan2.1-1.3B steps: stock against "
        "fastdit Dense and Agent.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma list of {list(SPECS)} (default: all; --smoke: {list(SMOKE_SPECS)})")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        type=lambda s: parse_list(s, ALL_METHODS), help=f"comma list of {list(ALL_METHODS)}")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per row (default per model)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default per model)")
    add_out_argument(parser)
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="UNets: largest batch the GPU-bound search tries, in CFG pairs "
                        "(default: 8; --smoke: 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", type=Path, metavar="JSON", help="redraw an earlier run's plot and exit")
    args = parser.parse_args(argv)
    choose_models(parser, args, SPECS, SMOKE_SPECS)
    if "stock" not in args.methods:
        args.methods = ["stock", *args.methods]  # every speedup is relative to it
    if (args.repeat is not None and args.repeat < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    if args.max_pairs is None:
        args.max_pairs = 2 if args.smoke else 8
    if args.max_pairs < 1:
        parser.error("--max-pairs must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved["results"], saved["metadata"], args.replot.with_suffix(".png"))
        print(format_table(saved["results"]))
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        # fastdit's PyTorch reference is far faster on the CPU than the Triton interpreter.
        os.environ.pop("TRITON_INTERPRET", None)
    metadata = collect_metadata(args, device)
    print(f"device {metadata['device_name']} ({device}); models {args.models}; methods {args.methods}",
          flush=True)
    specs = [(SMOKE_SPECS if args.smoke else SPECS)[name] for name in args.models]
    rows: list[dict] = []
    start = time.perf_counter()
    for spec in specs:
        # UNets in fp16 (the SD checkpoints' usual inference dtype), Wan in bf16; fp32 on the CPU.
        dtype = torch.float32 if device.type == "cpu" else (torch.float16 if spec.kind == "unet" else torch.bfloat16)
        model_run = ModelRun(spec, args, device, dtype)
        try:
            rows += model_run.run(args.methods)
        finally:
            model_run.close()
            del model_run
        add_estimates(rows)
        metadata["elapsed_s"] = round(time.perf_counter() - start, 1)
        paths = write_outputs(rows, metadata, args.out, output_stem(metadata), fields=CSV_FIELDS, plot=plot)
    print()
    print(format_table(rows))
    print(f"\npublished: {PUBLISHED}")
    print(f"elapsed {metadata['elapsed_s']} s; wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
