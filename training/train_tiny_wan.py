"""Train the tiny text-to-video model (diffusers' Wan architecture) on procedural clips, in one
command, within a fixed wall-clock budget.

    python training/train_tiny_wan.py --out OUT --device cuda     # ~16 min on one H200
    # or in two calls of a time-limited machine (~8.7 and ~8 min):
    python training/train_tiny_wan.py --out OUT --device cuda --stage vae
    python training/train_tiny_wan.py --out OUT --device cuda --stage dit --vae-from OUT/vae
    # continue training the transformer of an exported pipeline, one time-limited call at a time:
    python training/train_tiny_wan.py --out OUT2 --device cuda --stage dit \
        --resume-from fastdit/assets/tiny_wan --dit-seconds 490 --pool-seconds 40
    python training/train_tiny_wan.py --out OUT --smoke           # toy sizes, CPU, ~2 min
    python training/train_tiny_wan.py --time-cpu-generation       # random weights, CPU timing

Stages (each time-budgeted where it matters, all seeded by ``--seed``):

1. **VAE** (``AutoencoderKLWan``, 4x8x8 compression, z_dim 16) on 64x64 crops of whole 33-frame
   clips of :mod:`fastdit.quality.clips`, three in four centred on the object: L1 + MSE (frame 0,
   a chunk of its own, weighted as four frames; pixels near the object 4x) + a light KL, for
   ``--vae-seconds``. Its reconstruction is then checked on full-size clips: PSNR chunk by chunk
   (also on 81-frame clips) and the checker on the reconstructions; below ``--min-vae-psnr`` in
   any chunk or ``--min-vae-checker`` on any attribute the run stops before the transformer
   (exit 3), so a bad VAE costs minutes, not the whole budget. ``--stage vae`` stops here and
   saves it to ``OUT/vae``.
2. **Latent pool**: clips at the default size (33 x 256 x 256 -> latent 9 x 32 x 32) and a few
   long ones (81 frames -> 21 x 32 x 32, 2.3x the tokens) encoded once (posterior mean); the
   per-channel mean/std become the VAE's ``latents_mean``/``latents_std``, as in Wan's config.
3. **Transformer** (``WanTransformer3DModel``, patch 1x2x2) and the **UMT5 encoder**, jointly,
   by flow matching exactly as ``WanPipeline`` samples it: ``x_t = (1 - s) x_0 + s e``, target
   ``e - x_0``, timestep ``1000 s`` with ``s`` shifted by UniPC's ``flow_shift``; prompts encoded
   as the pipeline's ``_get_t5_prompt_embeds`` encodes them (512 positions, zero beyond the
   caption), from tokens prepared once per pool on the device; 10% empty prompts for
   classifier-free guidance; EMA weights exported. For ``--dit-seconds``. No step waits for the
   device (the per-step tokenizing and host-to-device copies of the first runs each synchronised
   it). The log shows the loss by latent frame relative to the mean (frame 0 is the first video
   frame alone); ``--profile-steps N`` logs a ``torch.profiler`` table of N steps.
4. **Export** with ``WanPipeline.save_pretrained`` (safetensors, bf16 weights) and a tar of it.
5. **Evaluation**: the stock ``WanPipeline.from_pretrained`` of the exported folder generates the
   held-out captions (combinations never trained on), a few training captions and a few long
   videos; :func:`fastdit.quality.score` reads colour, shape and motion from each.

**Resuming** (``--stage dit --resume-from PIPELINE_DIR``, a folder this script exported, such as
``fastdit/assets/tiny_wan``): the whole pipeline is loaded from the folder (transformer, text
encoder, VAE, tokenizer, scheduler), after checking that its configs match this run's sizes (same
``--size``/``--smoke`` as the run that made it, else it stops naming each differing value). The
latent pool is rebuilt with that VAE from new clips (the data seed moves on with each resume) and
normalised with the folder's ``latents_mean``/``latents_std`` (what its transformer learned
on), not re-estimated. Training restarts from the exported (EMA) weights with a fresh AdamW: a
linear warm-up over ``--dit-warmup`` steps (200: Adam's second moments, beta2 0.99, settle in
~100 steps; from zero moments the first updates would have the full step size whatever the
gradient), then the same cosine from ``--dit-lr`` to 10% over this call's ``--dit-seconds``: a
warm restart, because the first run's loss was still falling when its schedule ended, and each
call ends annealed, so every exported folder is a finished model. The EMA starts from the loaded
weights at its full decay (its ramp counts the steps of earlier runs). The pipeline folder's
``fastdit_defaults.json`` records the training under ``training``: VAE steps and seconds,
cumulative transformer steps and seconds, wall seconds of all calls, and one entry per
transformer run, accumulated across resumes.

Writes to ``--out``: ``tiny_wan/`` (the pipeline, with ``fastdit_defaults.json``: the size, steps,
guidance and demo prompt ``fastdit generate`` uses for it, and the training record),
``tiny_wan.tar``, ``loss.png``, ``metrics.json``, ``samples.png`` and ``train.log``. The
pipeline folder is written under a temporary name and renamed into place, so ``--pipeline-dir``
may be the folder the run resumed from. Copy ``tiny_wan/`` to ``fastdit/assets/tiny_wan/`` to
make it the embedded default model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastdit.files import atomic_path, atomic_write_text  # noqa: E402
from fastdit.quality import analyze, build_word_tokenizer, heldout_specs, render, sample_specs  # noqa: E402
from fastdit.quality.clips import vocabulary  # noqa: E402


@dataclass
class Sizes:
    """Architecture and data sizes. The defaults are the model that ships; ``--smoke`` shrinks
    everything so the whole script runs on a CPU in minutes."""

    # transformer: 4 layers of width 256 (4 heads of 64). At 33 x 256 x 256 (2,304 tokens) one
    # forward is ~44 GFLOP (60% of it attention), so 20 UniPC steps with CFG (40 forwards) plus
    # the VAE decode (~0.2 TFLOP) stay near 2 TFLOP: <= 90 s on a 2-core AVX2 CPU.
    dim: int = 256
    heads: int = 4
    layers: int = 4
    ffn: int = 1024
    freq_dim: int = 256
    # UMT5 text encoder: 2 layers of width 128, trained with the transformer.
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 256
    # VAE: Wan's layout ([1, 2, 4, 4], 3 spatial and 2 temporal downsamples), encoder base 16,
    # decoder base 12: decoding 33 x 256 x 256 costs ~0.2 TFLOP (base 16: 0.36).
    vae_base: int = 16
    vae_decoder_base: int = 12
    z_dim: int = 16
    # data
    frames: int = 33
    height: int = 256
    width: int = 256
    long_frames: int = 81  # 21 latent frames: 5,376 tokens, 2.3x the default
    # The VAE trains on whole 33-frame clips at 64 x 64 crops. Wan's VAE encodes and decodes
    # chunk by chunk (1 frame, then 4 at a time) with cached causal convolutions; trained on 5- or
    # 9-frame clips it reconstructed exactly the chunks it had seen and fell apart from the next
    # one on (H200 runs of 2026-12-02: 25 dB on frames 0-4, 14 dB by frame 12; 15.7 dB over 33
    # frames). Its temporal receptive field must see the clip's start as it does at run time.
    vae_frames: int = 33
    vae_crop: int = 64


SMOKE_SIZES = Sizes(dim=64, heads=2, layers=2, ffn=128, freq_dim=64, text_dim=32, text_layers=1,
                    text_heads=2, text_ffn=64, vae_base=8, vae_decoder_base=8, frames=9, height=64,
                    width=64, long_frames=17, vae_frames=5, vae_crop=32)


def build_pipeline(sizes: Sizes, device):
    """A WanPipeline with fresh random weights of ``sizes`` (fp32)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_word_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=sizes.heads,
        attention_head_dim=sizes.dim // sizes.heads, in_channels=sizes.z_dim,
        out_channels=sizes.z_dim, text_dim=sizes.text_dim, freq_dim=sizes.freq_dim,
        ffn_dim=sizes.ffn, num_layers=sizes.layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    vae = AutoencoderKLWan(
        base_dim=sizes.vae_base, decoder_base_dim=sizes.vae_decoder_base, z_dim=sizes.z_dim,
        dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.0] * sizes.z_dim,
        latents_std=[1.0] * sizes.z_dim,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(vocabulary()), d_model=sizes.text_dim, d_kv=sizes.text_dim // sizes.text_heads,
        d_ff=sizes.text_ffn, num_layers=sizes.text_layers, num_heads=sizes.text_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=64, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))
    # Wan2.1's scheduler (scheduler/scheduler_config.json of its diffusers checkpoints).
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=scheduler, transformer=transformer)
    return pipe.to(device)


class Log:
    def __init__(self, path):
        self.file = open(path, "a") if path else None
        self.start = time.time()

    def __call__(self, message):
        line = f"[{time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _lr(peak, step, warmup, fraction):
    """Linear warm-up, then cosine decay to 10% over the time budget (``fraction`` in [0, 1])."""
    return peak * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(fraction, 1)))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clips(specs, frames, height, width, generator, device, return_tracks=False):
    """Rendered clips as the VAE takes them: (B, 3, F, H, W) in [-1, 1] (and the object's tracks)."""
    video, tracks = render(specs, frames, height, width, generator=generator, device=device,
                           return_tracks=True)
    video = video.permute(0, 4, 1, 2, 3).mul(2).sub(1)
    return (video, tracks) if return_tracks else video


def _object_box(tracks, height, width, margin=1.3):
    """(B, F, H, W) bool: inside a square of ``margin`` times the object's half-size around its
    centre, in each frame (``tracks`` as :func:`fastdit.quality.render` returns them)."""
    x, y, radius = tracks
    half = radius[..., None, None] * min(height, width) * margin
    cols = torch.arange(width, device=x.device)[None, None, None, :] + 0.5
    rows = torch.arange(height, device=x.device)[None, None, :, None] + 0.5
    return (((cols - x[..., None, None] * width).abs() <= half)
            & ((rows - y[..., None, None] * height).abs() <= half))


def _vae_crops(clips, tracks, sizes, args, crop_generator):
    """``sizes.vae_crop`` squares of each clip and of its per-pixel loss weight (``--vae-object-
    weight`` near the object, 1 elsewhere): for ``--vae-object-crops`` of the clips centred on the
    object at a random frame (jittered by a quarter crop), elsewhere uniform. Random crops alone
    hold a whole object in few clips (it is 18-28% of the 256-px frame's side) and the textured
    background dominates the loss: the first 33-frame run learned backgrounds and lost the objects
    (the checker read the colour of 25% of its reconstructions right)."""
    count, _, frames, height, width = clips.shape
    crop, device = sizes.vae_crop, clips.device
    weight = 1 + (args.vae_object_weight - 1) * _object_box(tracks, height, width).float()
    # Everything on the device, no host round trip: a synchronisation per step would stall the
    # CPU's dispatch of the next one.
    x, y = tracks[0].float(), tracks[1].float()
    frame = torch.randint(0, frames, (count, 1), generator=crop_generator, device=device)
    jitter = (torch.rand(count, 2, generator=crop_generator, device=device) - 0.5) * (crop / 2)
    centred = torch.rand(count, generator=crop_generator, device=device) < args.vae_object_crops
    uniform = torch.rand(count, 2, generator=crop_generator, device=device)
    around = torch.stack([x.gather(1, frame)[:, 0] * width, y.gather(1, frame)[:, 0] * height], 1)
    corner = torch.where(centred[:, None], around + jitter - crop / 2,
                         uniform * torch.tensor([width - crop + 1, height - crop + 1], device=device))
    corner = corner.floor().long()  # (left, top)
    left = corner[:, 0].clamp(0, width - crop)
    top = corner[:, 1].clamp(0, height - crop)
    span = torch.arange(crop, device=device)
    rows = (top[:, None] + span)[:, :, None]  # (B, crop, 1)
    cols = (left[:, None] + span)[:, None, :]  # (B, 1, crop)
    batch = torch.arange(count, device=device)[:, None, None]
    # advanced indexing puts the indexed dims first: (B, crop, crop, C, F) -> (B, C, F, crop, crop)
    crops = clips.permute(0, 3, 4, 1, 2)[batch, rows, cols].permute(0, 3, 4, 1, 2).contiguous()
    weights = weight.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    return crops, weights


def train_vae(pipe, sizes, args, device, log):
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0,
                                  betas=(0.9, 0.99))
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    crop_generator = torch.Generator(device).manual_seed(args.seed + 6)
    # Frame 0 is a chunk of its own (Wan's VAE runs 1 frame, then 4 at a time): weighted as one.
    frame_weight = torch.ones(sizes.vae_frames, device=device)
    frame_weight[0] = args.vae_first_frame_weight
    losses, step, start = [], 0, time.time()
    while time.time() - start < args.vae_seconds:
        specs = sample_specs(args.vae_batch, seed=args.seed * 1_000_003 + step)
        clips, tracks = _clips(specs, sizes.vae_frames, sizes.height, sizes.width, generator,
                               device, return_tracks=True)
        clips, weight = _vae_crops(clips, tracks, sizes, args, crop_generator)
        weight = weight * frame_weight[None, :, None, None]  # (B, F, h, w)
        for group in optimizer.param_groups:
            group["lr"] = _lr(args.vae_lr, step, 100, (time.time() - start) / args.vae_seconds)
        with _autocast(device):
            posterior = vae.encode(clips).latent_dist
            recon = vae.decode(posterior.sample()).sample
        error = recon.float() - clips
        pixel = (error.abs() + error * error).mean(dim=1)  # L1 + MSE, (B, F, h, w)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1
                    - posterior.logvar.float()).mean()
        loss = (pixel * weight).sum() / weight.sum() + args.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())
        if step % args.log_every == 0:
            log(f"vae step {step} loss {losses[-1].item():.4f} kl {kl.item():.3f}")
        step += 1
    losses = torch.stack(losses).tolist()
    log(f"vae: {step} steps in {time.time() - start:.0f} s, final loss {np.mean(losses[-20:]):.4f}")
    return losses


# The training record in the pipeline folder's fastdit_defaults.json (under "training"), kept
# across resumes. Seconds: "vae_seconds" and "transformer_seconds" are the training loops alone;
# "wall_seconds" is every call that made the folder (set-up, latent pool, export and evaluation
# included), on "device". "complete" is false when a folder without a record was resumed (its
# earlier training is not counted).
RECORD_KEY = "training"
TEXT_ENCODER_SIZE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                          "relative_attention_num_buckets", "relative_attention_max_distance",
                          "feed_forward_proj")


def new_training_record(vae_steps, vae_seconds, wall_seconds, device_name, complete=True):
    return dict(vae_steps=int(vae_steps), vae_seconds=round(float(vae_seconds), 1),
                transformer_steps=0, transformer_seconds=0.0,
                wall_seconds=round(float(wall_seconds), 1), device=device_name,
                complete=bool(complete), runs=[])


def read_pipeline_defaults(folder):
    """The folder's ``fastdit_defaults.json`` ({} when it has none)."""
    path = os.path.join(folder, "fastdit_defaults.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def add_transformer_run(record, run):
    """``record`` with one more transformer run (a new dict: ``record`` is left as it was)."""
    record = copy.deepcopy(record)
    record["transformer_steps"] += int(run["steps"])
    record["transformer_seconds"] = round(record["transformer_seconds"] + run["seconds"], 1)
    record["runs"].append(dict(run))
    return record


def _json_value(value):
    return json.loads(json.dumps(value, default=str))


def size_mismatches(reference, loaded, sizes, defaults):
    """How the pipeline ``loaded`` differs from ``reference`` (this run's :func:`build_pipeline`)
    in what fixes the weights' shapes and the data: one line per differing value."""
    problems = []
    for name in ("transformer", "vae"):
        here, there = dict(getattr(reference, name).config), dict(getattr(loaded, name).config)
        for key in sorted(set(here) & set(there)):
            if key.startswith("_") or key in ("latents_mean", "latents_std"):
                continue
            if _json_value(there[key]) != _json_value(here[key]):
                problems.append(f"{name} {key}: {_json_value(there[key])} in the folder, "
                                f"{_json_value(here[key])} here")
    for key in TEXT_ENCODER_SIZE_KEYS:
        there = getattr(loaded.text_encoder.config, key, None)
        here = getattr(reference.text_encoder.config, key, None)
        if there != here:
            problems.append(f"text_encoder {key}: {there} in the folder, {here} here")
    data = (("height", sizes.height), ("width", sizes.width), ("num_frames", sizes.frames))
    for key, here in data:
        if key in defaults and defaults[key] != here:
            problems.append(f"{key} (fastdit_defaults.json): {defaults[key]} in the folder, "
                            f"{here} here")
    z_dim = reference.vae.config.z_dim
    for key in ("latents_mean", "latents_std"):
        values = loaded.vae.config.get(key) or []
        if len(values) != z_dim:
            problems.append(f"vae {key}: {len(values)} values in the folder, z_dim {z_dim} here")
    there, here = loaded.tokenizer.get_vocab(), reference.tokenizer.get_vocab()
    if there != here:
        same = " (same size, other words or order)" if len(there) == len(here) else ""
        problems.append(f"tokenizer vocabulary: {len(there)} words in the folder, {len(here)} "
                        f"here{same}")
    return problems


def load_resumed_pipeline(reference, sizes, args, device, log):
    """The pipeline of ``--resume-from`` (every component, fp32 on ``device``), its
    ``fastdit_defaults.json`` and its training record. Stops (SystemExit) when the folder is not
    an exported pipeline or was trained at other sizes than ``reference``'s, naming each
    differing value."""
    from diffusers import WanPipeline

    folder = args.resume_from
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SystemExit(f"--resume-from {folder}: not an exported pipeline folder (no "
                         f"model_index.json); it takes the tiny_wan folder of a --stage dit or "
                         f"--stage all run, e.g. fastdit/assets/tiny_wan")
    loaded = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    defaults = read_pipeline_defaults(folder)
    problems = size_mismatches(reference, loaded, sizes, defaults)
    if problems:
        raise SystemExit(f"--resume-from {folder} does not match this run's sizes: "
                         f"{'; '.join(problems)}. Resume with the --size/--smoke settings of the "
                         f"run that exported it.")
    record = defaults.get(RECORD_KEY)
    if record is None:
        log(f"WARNING: {folder} has no training record (fastdit_defaults.json, "
            f"'{RECORD_KEY}'): cumulative steps and seconds count from this run on")
        record = new_training_record(0, 0, 0, None, complete=False)
    else:
        log(f"resuming {folder}: {record['transformer_steps']} transformer steps "
            f"({record['transformer_seconds']} s) in {len(record['runs'])} earlier run(s), "
            f"{record['wall_seconds']} s of calls in all; held-out accuracy "
            f"{defaults.get('heldout_accuracy')}")
    return loaded.to(device), defaults, record


TEXT_LENGTH = 512  # WanPipeline's max_sequence_length: the transformer always sees 512 positions


@dataclass
class Pool:
    """Encoded clips of one length, and their captions' tokens prepared once on the device."""

    latents: torch.Tensor  # (N, C, T, H, W) bf16, normalised
    captions: list
    ids: torch.Tensor  # (N, L) token ids, cut to the longest caption (see _tokenize)
    mask: torch.Tensor  # (N, L) attention mask
    empty_ids: torch.Tensor  # (L,) the empty prompt (classifier-free guidance drops)
    empty_mask: torch.Tensor


def _tokenize(tokenizer, captions, device):
    """Token ids and attention masks of ``captions`` exactly as
    ``WanPipeline._get_t5_prompt_embeds`` makes them (``prompt_clean``, 512 positions, right
    padding), cut to the longest caption's length ``L``: (N, L) each, on ``device``. Positions
    beyond ``L`` are padding for every caption: :func:`_encode_tokens` gives them the zeros the
    pipeline gives them."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    inputs = tokenizer([prompt_clean(caption) for caption in captions], padding="max_length",
                       max_length=TEXT_LENGTH, truncation=True, add_special_tokens=True,
                       return_attention_mask=True, return_tensors="pt")
    length = max(1, int(inputs.attention_mask.sum(dim=1).max()))
    return inputs.input_ids[:, :length].to(device), inputs.attention_mask[:, :length].to(device)


def _bidirectional_mask(text_encoder, embeds, mask):
    """The 4-D attention mask the text encoder builds from ``mask``, built here without the
    "no padding at all?" test (``padding_mask.all()`` in transformers' SDPA path, a host
    synchronisation per call); ``mask`` itself where this transformers has no such switch."""
    import inspect

    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        return mask
    if "allow_is_bidirectional_skip" not in inspect.signature(create_bidirectional_mask).parameters:
        return mask
    return create_bidirectional_mask(config=text_encoder.config, inputs_embeds=embeds,
                                     attention_mask=mask, allow_is_bidirectional_skip=False)


def _encode_tokens(text_encoder, ids, mask):
    """What ``WanPipeline._get_t5_prompt_embeds`` returns for these tokens, (B, 512, D) in the text
    encoder's dtype: its output on each caption's tokens, zeros beyond them. Without a host
    synchronisation: the cut is a mask, not a per-caption slice, and the encoder runs on the
    ``L`` positions :func:`_tokenize` kept (a padded key is masked out of every real token's
    attention and UMT5's position bias depends on offsets only, so the real tokens' outputs do
    not depend on how much padding follows)."""
    embeds = text_encoder.get_input_embeddings()(ids)
    hidden = text_encoder(inputs_embeds=embeds,
                          attention_mask=_bidirectional_mask(text_encoder, embeds, mask)
                          ).last_hidden_state.to(text_encoder.dtype)
    hidden = torch.where(mask[..., None].bool(), hidden, torch.zeros((), dtype=hidden.dtype,
                                                                      device=hidden.device))
    return F.pad(hidden, (0, 0, 0, TEXT_LENGTH - hidden.shape[1]))


@torch.no_grad()
def build_pool(pipe, sizes, args, device, log, data_seed=None, normalisation=None):
    """Encode clips once: {frames: Pool}. Clips and captions come from ``data_seed`` (default
    ``--seed``; a resumed run passes a new one, so it trains on new clips). ``normalisation``:
    the (mean, std) per channel to normalise with (a resumed run: the folder's, what its
    transformer learned on); ``None``: estimated from the default-size pool and recorded as the
    VAE's ``latents_mean``/``latents_std``."""
    seed = args.seed if data_seed is None else data_seed
    vae = pipe.vae.eval()
    generator = torch.Generator(device).manual_seed(seed + 2)
    start = time.time()
    encoded = {}
    plan = [(sizes.frames, args.pool_clips, args.pool_seconds * (1 - args.long_share))]
    if args.long_fraction > 0:
        plan.append((sizes.long_frames, max(args.pool_clips // 8, args.pool_batch),
                     args.pool_seconds * args.long_share))
    for index, (frames, count, seconds) in enumerate(plan):
        latents, captions, t0, chunk = [], [], time.time(), 0
        batch = args.pool_batch if frames == sizes.frames else max(1, args.pool_batch // 2)
        while sum(len(x) for x in latents) < count and (chunk == 0 or time.time() - t0 < seconds):
            specs = sample_specs(batch, seed=(seed + 7 + index) * 1_000_003 + chunk)
            with _autocast(device):
                mean = vae.encode(_clips(specs, frames, sizes.height, sizes.width, generator,
                                         device)).latent_dist.mean
            latents.append(mean.to(torch.bfloat16))
            captions += [spec.caption for spec in specs]
            chunk += 1
        encoded[frames] = (torch.cat(latents), captions)
        log(f"pool: {len(captions)} clips of {frames} frames, latent "
            f"{tuple(encoded[frames][0].shape[1:])}, {time.time() - t0:.0f} s")
    default = encoded[sizes.frames][0].float()
    mean = default.mean(dim=(0, 2, 3, 4))
    std = default.std(dim=(0, 2, 3, 4)).clamp(min=1e-4)
    log(f"latent mean {[round(v, 2) for v in mean.tolist()]} std "
        f"{[round(v, 2) for v in std.tolist()]} ({time.time() - start:.0f} s)")
    del default
    if normalisation is None:
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    else:
        stored_mean, stored_std = (torch.tensor(v, dtype=torch.float32, device=device)
                                   for v in normalisation)
        log(f"normalised with the stored latents_mean/std (this pool differs by at most "
            f"{(mean - stored_mean).abs().max().item():.3f} in mean, "
            f"{(std / stored_std - 1).abs().max().item():.1%} in std)")
        mean, std = stored_mean, stored_std
    shape = (1, -1, 1, 1, 1)
    pools = {}
    for frames, (latents, captions) in encoded.items():
        ids, mask = _tokenize(pipe.tokenizer, captions + [""], device)
        pools[frames] = Pool(
            latents=((latents.float() - mean.view(shape)) / std.view(shape)).to(torch.bfloat16),
            captions=captions, ids=ids[:-1], mask=mask[:-1], empty_ids=ids[-1], empty_mask=mask[-1])
    return pools


def _chunk_psnr(error):
    """PSNR of each of Wan's VAE chunks (frame 0, then 4 frames at a time); ``error`` is the
    squared error (B, C, F, H, W) in [0, 1] units."""
    per_frame = error.mean(dim=(0, 1, 3, 4))
    chunks = [per_frame[:1]] + list(per_frame[1:].split(4))
    return [10 * math.log10(1 / max(c.mean().item(), 1e-12)) for c in chunks]


@torch.no_grad()
def vae_reconstruction_check(pipe, sizes, args, device, log):
    """PSNR (whole frames, chunk by chunk, and on the object alone) and checker score of VAE
    reconstructions at the default size, and chunk PSNR of long clips: the ceiling for generated
    videos. Wan's VAE runs frame 0, then chunks of 4 frames: one PSNR per chunk shows whether its
    cached causal convolutions carry across chunks, the long clips whether they carry beyond the
    33 frames it trained on."""
    vae = pipe.vae.eval()
    specs = sample_specs(args.eval_batch, seed=args.seed + 11)
    generator = torch.Generator(device).manual_seed(args.seed + 12)
    clips, (x, y, radius) = _clips(specs, sizes.frames, sizes.height, sizes.width, generator,
                                   device, return_tracks=True)
    with _autocast(device):
        recon = vae.decode(vae.encode(clips).latent_dist.mean).sample
    recon = recon.float().clamp(-1, 1)
    error = ((recon - clips).float() / 2) ** 2  # in [0, 1] units
    psnr = 10 * math.log10(1 / max(error.mean().item(), 1e-12))
    near = _object_box((x, y, radius), sizes.height, sizes.width)
    object_mse = error.mean(dim=1)[near].mean().item()  # (B, F, H, W) inside the object's box
    object_psnr = 10 * math.log10(1 / max(object_mse, 1e-12))
    videos = ((recon + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()
    scores = _score_all(videos, [spec.caption for spec in specs])
    result = dict(psnr=psnr, object_psnr=object_psnr, chunk_psnr=_chunk_psnr(error), **scores)
    if args.eval_long:
        long_specs = sample_specs(args.eval_long, seed=args.seed + 13)
        long_clips = _clips(long_specs, sizes.long_frames, sizes.height, sizes.width, generator,
                            device)
        with _autocast(device):
            long_recon = vae.decode(vae.encode(long_clips).latent_dist.mean).sample
        long_error = ((long_recon.float().clamp(-1, 1) - long_clips) / 2) ** 2
        result["long_chunk_psnr"] = _chunk_psnr(long_error)
    log(f"vae reconstruction: PSNR {psnr:.1f} dB (object {object_psnr:.1f} dB), per chunk "
        f"{[round(v, 1) for v in result['chunk_psnr']]}, long per chunk "
        f"{[round(v, 1) for v in result.get('long_chunk_psnr', [])]}, checker {scores['accuracy']}")
    return result


def vae_problems(reconstruction, args):
    """Why the VAE is not good enough to train the transformer on (empty: it is)."""
    problems = []
    worst = min(reconstruction["chunk_psnr"] + reconstruction.get("long_chunk_psnr", []))
    if worst < args.min_vae_psnr:
        problems.append(f"its worst chunk reconstructs at {worst:.1f} dB, below --min-vae-psnr "
                        f"{args.min_vae_psnr}")
    accuracy = reconstruction["accuracy"]
    for key in ("colour", "shape", "motion"):
        if accuracy[key] < args.min_vae_checker:
            problems.append(f"the checker reads the {key} of {accuracy[key]:.0%} of its "
                            f"reconstructions right, below --min-vae-checker {args.min_vae_checker}")
    return problems


def save_vae_stage(pipe, args, vae_losses, reconstruction, timings, log):
    """``OUT/vae/``: the trained VAE (fp32) and ``stage.json`` (its losses, check and seconds),
    what ``--stage dit --vae-from OUT/vae`` continues from."""
    folder = os.path.join(args.out, "vae")
    pipe.vae.save_pretrained(folder, safe_serialization=True)
    stage = dict(losses=vae_losses, reconstruction=reconstruction,
                 seconds={k: round(v, 1) for k, v in timings.items()},
                 wall_seconds=round(time.time() - log.start, 1), args=vars(args))
    atomic_write_text(os.path.join(folder, "stage.json"), json.dumps(stage))
    atomic_write_text(os.path.join(args.out, "metrics.json"), json.dumps(
        dict(vae_reconstruction=reconstruction, vae_losses=vae_losses, seconds=stage["seconds"],
             args=vars(args)), indent=1))
    log(f"saved the VAE stage to {folder}")


def load_vae_stage(pipe, args, device, log):
    """The VAE of an earlier ``--stage vae`` run (``--vae-from``), with its losses and check."""
    from diffusers import AutoencoderKLWan

    folder = args.vae_from
    with open(os.path.join(folder, "stage.json")) as f:
        stage = json.load(f)
    vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    if vae.config.z_dim != pipe.vae.config.z_dim:
        raise SystemExit(f"--vae-from {folder}: its z_dim is {vae.config.z_dim}, this run's "
                         f"transformer takes {pipe.vae.config.z_dim} (same --size for both stages)")
    pipe.register_modules(vae=vae)
    problems = vae_problems(stage["reconstruction"], args)
    if problems:
        log(f"WARNING: this VAE failed its check ({'; '.join(problems)}); training on it anyway")
    log(f"VAE from {folder}: {len(stage['losses'])} steps, stage {stage['wall_seconds']} s, "
        f"reconstruction PSNR {stage['reconstruction']['psnr']:.1f} dB, checker "
        f"{stage['reconstruction']['accuracy']}")
    return stage["losses"], stage["reconstruction"], stage


PROFILE_START = 20  # the first profiled step of --profile-steps (after cuDNN's autotuning)


def _profile_report(profiler, steps, seconds, device):
    """The profiled steps' time by operator (self time on the device, or on the CPU)."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = profiler.key_averages()
    busy = sum(getattr(event, key, 0) for event in averages) / 1e6
    table = averages.table(sort_by=key, row_limit=25, max_name_column_width=60)
    return (f"profile of {steps} steps: {seconds / steps * 1e3:.1f} ms per step wall, "
            f"{busy / steps * 1e3:.1f} ms per step of {key}\n{table}")


def train_transformer(pipe, pools, sizes, args, device, log, data_seed=None, previous_steps=0):
    """Flow matching for ``--dit-seconds``; returns the losses [(loss, long step)] and a summary.

    ``data_seed`` (default ``--seed``) seeds the step's draws; ``previous_steps`` (a resumed run:
    the steps already trained) continues the EMA decay's ramp. Nothing in a step waits for the
    device (indices, classifier-free drops and noise are drawn there, captions are tokens
    prepared by :func:`build_pool`), except the loss read every ``--log-every`` steps."""
    seed = args.seed if data_seed is None else data_seed
    transformer, text_encoder = pipe.transformer.train(), pipe.text_encoder.train()
    modules = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.dit_lr, weight_decay=0.01,
                                  betas=(0.9, 0.99), fused=device.type == "cuda")
    shift = pipe.scheduler.config.flow_shift
    rng = random.Random(seed + 3)
    generator = torch.Generator(device).manual_seed(seed + 4)
    index_generator = torch.Generator(device).manual_seed(seed + 5)
    long_frames = sizes.long_frames if sizes.long_frames in pools else None
    forward = transformer
    if args.compile:
        forward = torch.compile(transformer)
    losses, long_steps, step, start = [], [], 0, time.time()
    params, ema_params = list(modules.parameters()), list(ema.parameters())
    # Mean squared error by latent frame over default-size steps (latent frame 0 is the first
    # video frame alone, a chunk of its own in Wan's VAE), logged relative to the mean.
    frame_error, frame_steps, frame_loss = None, 0, None
    profiler, profile_start = None, time.time()
    while time.time() - start < args.dit_seconds:
        if args.profile_steps and step == PROFILE_START:
            _sync(device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.start()
            profile_start = time.time()
        long = long_frames is not None and rng.random() < args.long_fraction
        pool = pools[long_frames if long else sizes.frames]
        batch = max(1, args.dit_batch // 2) if long else args.dit_batch
        index = torch.randint(0, len(pool.captions), (batch,), generator=index_generator,
                              device=device)
        drop = (torch.rand(batch, generator=index_generator, device=device)
                < args.cfg_drop)[:, None]
        ids = torch.where(drop, pool.empty_ids, pool.ids[index])
        mask = torch.where(drop, pool.empty_mask, pool.mask[index])
        x0 = pool.latents[index].float()
        u = torch.rand(batch, generator=generator, device=device)
        sigma = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        for group in optimizer.param_groups:
            group["lr"] = _lr(args.dit_lr, step, args.dit_warmup,
                              (time.time() - start) / args.dit_seconds)
        with _autocast(device):
            embeds = _encode_tokens(text_encoder, ids, mask)
            prediction = forward(hidden_states=x_t, timestep=sigma * 1000,
                                 encoder_hidden_states=embeds, return_dict=False)[0]
        error = (prediction.float() - (noise - x0)).square()
        loss = error.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        total = previous_steps + step
        decay = min(args.ema, (1 + total) / (10 + total))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
            if not long:
                per_frame = error.detach().mean(dim=(0, 1, 3, 4))
                frame_error = per_frame if frame_error is None else frame_error + per_frame
                frame_steps += 1
        losses.append(loss.detach())
        long_steps.append(long)
        if profiler is not None and step == PROFILE_START + args.profile_steps - 1:
            _sync(device)
            profiler.stop()
            log(_profile_report(profiler, args.profile_steps, time.time() - profile_start,
                                device))
            profiler = None
        if step % args.log_every == 0:
            message = f"dit step {step} loss {losses[-1].item():.4f}{' (long)' if long else ''}"
            if frame_steps:
                frame = (frame_error / frame_steps).tolist()
                frame_loss = [round(float(v / np.mean(frame)), 3) for v in frame]
                message += f", by latent frame / mean {frame_loss}"
                frame_error, frame_steps = None, 0
            log(message)
        step += 1
    if profiler is not None:  # the budget ended first
        profiler.stop()
    losses = list(zip(torch.stack(losses).tolist(), long_steps))
    elapsed = time.time() - start
    default_losses = [value for value, is_long in losses if not is_long]
    final = round(float(np.mean(default_losses[-50:])), 4) if default_losses else None
    log(f"dit: {step} steps in {elapsed:.0f} s ({step / elapsed:.2f} steps/s), final loss "
        f"{final}")
    modules.load_state_dict(ema.state_dict())
    return losses, dict(steps=step, seconds=round(elapsed, 1), final_loss=final,
                        frame_loss_relative=frame_loss)


def _install_folder(partial, folder):
    """Rename the complete folder ``partial`` to ``folder``. An existing ``folder`` (the folder a
    run resumed from, say) is renamed aside first and deleted after, so ``folder`` is never a mix
    of two exports; an interruption between the two renames leaves it whole as ``folder.old``."""
    old = None
    if os.path.lexists(folder):
        old = folder + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(partial, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(pipe, out, folder, log, sizes=None, args=None, training=None):
    """``save_pretrained`` into ``folder`` (through a temporary folder beside it, with
    ``fastdit_defaults.json`` and its training record before any evaluation) and a tar of it."""
    from fastdit.testing.tiny import _cast_like_from_pretrained

    # Wan ships bf16 weights (its fp32 modules kept fp32); loading with dtype=float32 upcasts.
    for model in (pipe.transformer, pipe.text_encoder, pipe.vae):
        _cast_like_from_pretrained(model.eval(), torch.bfloat16)
    folder = os.path.normpath(folder)
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    if args is not None:
        write_defaults(partial, sizes, args, {}, training)
    _install_folder(partial, folder)
    total = sum(os.path.getsize(os.path.join(root, name))
                for root, _, names in os.walk(folder) for name in names)
    tar_path = os.path.join(out, "tiny_wan.tar")
    with atomic_path(tar_path) as temporary, tarfile.open(temporary, "w") as tar:
        tar.add(folder, arcname="tiny_wan")
    log(f"exported {folder} ({total / 2**20:.1f} MB) and {tar_path}")
    if total > 25 * 2**20:
        log(f"WARNING: the pipeline is {total / 2**20:.1f} MB, above the 25 MB limit")
    return total


def _score_all(videos, captions):
    from fastdit.quality import score

    rows = []
    for video, caption in zip(videos, captions):
        result = score(video, caption)
        rows.append(dict(caption=caption, read=analyze(video).as_dict(), **result))
    accuracy = {key: float(np.mean([row[key] for row in rows])) for key in ("colour", "shape", "motion")}
    accuracy["all"] = float(np.mean([row["colour"] and row["shape"] and row["motion"] for row in rows]))
    return dict(accuracy=accuracy, rows=rows)


@torch.no_grad()
def evaluate(folder, sizes, args, device, log):
    """Generate with the stock WanPipeline from the exported folder and score with the checker."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    sets = {
        "heldout": ([s.caption for s in heldout_specs(args.seed)], sizes.frames),
        "train": ([s.caption for s in sample_specs(args.eval_batch, seed=args.seed + 5)],
                  sizes.frames),
        "long": ([s.caption for s in heldout_specs(args.seed + 1)][: args.eval_long], sizes.long_frames),
    }
    results, samples = {}, []
    for name, (captions, frames) in sets.items():
        captions = captions[: args.eval_batch]
        if not captions:
            continue
        t0 = time.time()
        videos = []
        for first in range(0, len(captions), args.eval_batch):
            part = captions[first:first + args.eval_batch]
            output = pipe(prompt=part, negative_prompt="", height=sizes.height, width=sizes.width,
                          num_frames=frames, num_inference_steps=args.eval_steps,
                          guidance_scale=args.guidance, output_type="np",
                          generator=torch.Generator(device).manual_seed(args.seed + first))
            videos.extend(np.asarray(output.frames))
        scores = _score_all(videos, captions)
        results[name] = dict(frames=frames, seconds=time.time() - t0, **scores)
        log(f"eval {name} ({len(captions)} captions, {frames} frames, {time.time() - t0:.0f} s): "
            f"{scores['accuracy']}")
        for row in scores["rows"]:
            log(f"  {'ok ' if row['colour'] and row['shape'] and row['motion'] else 'BAD'} "
                f"{row['caption']!r} -> {row['read']}")
        samples += [(name, caption, video) for caption, video in zip(captions[:4], videos[:4])]
    return results, samples


def write_defaults(folder, sizes, args, results, training=None):
    """``fastdit_defaults.json`` in the pipeline folder: what ``fastdit generate`` runs the model
    at (the evaluation's size, steps and guidance) and its demo prompt: the first training
    caption the checker read right (a combination the model knows), else the first one; and
    ``training``, the record :func:`training_record` keeps across resumes."""
    rows = results.get("train", {}).get("rows", [])
    right = [row["caption"] for row in rows if row["colour"] and row["shape"] and row["motion"]]
    prompt = (right or [row["caption"] for row in rows] or [sample_specs(1, seed=args.seed)[0].caption])[0]
    defaults = dict(height=sizes.height, width=sizes.width, num_frames=sizes.frames,
                    num_inference_steps=args.eval_steps, guidance_scale=args.guidance,
                    prompt=prompt, smoke=bool(args.smoke),
                    heldout_accuracy=results.get("heldout", {}).get("accuracy"))
    if training is not None:
        defaults["training"] = training
    atomic_write_text(os.path.join(folder, "fastdit_defaults.json"), json.dumps(defaults, indent=1))
    return defaults


def write_samples(samples, path):
    """One row of 6 frames per sample video."""
    rows = []
    for _, _, video in samples:
        picks = np.linspace(0, len(video) - 1, 6).round().astype(int)
        rows.append(np.concatenate([video[i] for i in picks], axis=1))
    if not rows:
        return
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    image = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    import imageio.v2 as imageio

    imageio.imwrite(path, image)


def plot_losses(vae_losses, dit_losses, path, step_offset=0):
    from fastdit.cli.report import agg_pyplot

    plt = agg_pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))

    def smooth(values, width=50):
        values = np.asarray(values, dtype=np.float64)
        if len(values) < width:
            return values
        return np.convolve(values, np.ones(width) / width, mode="valid")

    if len(vae_losses):
        axes[0].plot(vae_losses, alpha=0.3, color="C0")
        axes[0].plot(smooth(vae_losses), color="C0")
        axes[0].set(title="VAE (L1 + MSE + KL)", xlabel="step", ylabel="loss", yscale="log")
    else:
        axes[0].text(0.5, 0.5, "VAE: loaded with the resumed pipeline", ha="center", va="center")
        axes[0].set(title="VAE", xticks=[], yticks=[])
    steps = np.array([i for i, (_, long) in enumerate(dit_losses) if not long]) + step_offset
    default = [loss for loss, long in dit_losses if not long]
    axes[1].plot(steps, default, alpha=0.3, color="C1")
    smoothed = smooth(default)
    axes[1].plot(steps[len(steps) - len(smoothed):], smoothed, color="C1")
    resumed = f", resumed at {step_offset}" if step_offset else ""
    axes[1].set(title=f"transformer (flow matching{resumed})", xlabel="step",
                ylabel="MSE", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def time_cpu_generation(sizes, args):
    """Random weights of ``sizes``, default generation on this CPU (what `make demo` costs)."""
    torch.manual_seed(args.seed)
    pipe = build_pipeline(sizes, "cpu")
    pipe.set_progress_bar_config(disable=True)
    timings = {}
    with torch.no_grad():
        for label, kwargs in (("text", None), ("full", {})):
            if kwargs is None:
                t0 = time.time()
                pipe.encode_prompt("a red circle moves left over a blue checkerboard", "", True,
                                   max_sequence_length=512, device="cpu")
                timings[label] = time.time() - t0
                continue
            t0 = time.time()
            latents = pipe(prompt="a red circle moves left over a blue checkerboard",
                           negative_prompt="", height=sizes.height, width=sizes.width,
                           num_frames=sizes.frames, num_inference_steps=args.eval_steps,
                           guidance_scale=args.guidance, output_type="latent").frames
            timings["denoise"] = time.time() - t0
            t0 = time.time()
            pipe.vae.decode(latents)
            timings["vae_decode"] = time.time() - t0
    timings["total"] = timings["denoise"] + timings["vae_decode"] + timings["text"]
    print(json.dumps(dict(threads=torch.get_num_threads(), steps=args.eval_steps,
                          guidance=args.guidance, sizes=asdict(sizes),
                          seconds={k: round(v, 1) for k, v in timings.items()}), indent=1))


SMOKE_DEFAULTS = dict(vae_seconds=15, pool_seconds=10, dit_seconds=25, pool_clips=64, pool_batch=8,
                      vae_batch=4, dit_batch=8, eval_steps=4, eval_batch=3, eval_long=1,
                      log_every=10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (created)")
    parser.add_argument("--pipeline-dir", help="where the pipeline folder goes (default: "
                        "OUT/tiny_wan); OUT/tiny_wan.tar holds it either way")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes and budgets (budgets given on the command line win): the "
                        "whole script on a CPU in minutes")
    parser.add_argument("--time-cpu-generation", action="store_true",
                        help="only time a default-size generation with random weights on the CPU")
    parser.add_argument("--size", action="append", default=[], metavar="FIELD=INT",
                        help="override a Sizes field, e.g. --size layers=6 --size dim=320")
    parser.add_argument("--stage", choices=("all", "vae", "dit"), default="all",
                        help="all: the whole run; vae: train and check the VAE, save it to OUT/vae "
                        "and stop; dit: the rest, from --vae-from (two calls of a time-limited "
                        "machine) or --resume-from")
    parser.add_argument("--vae-from", help="with --stage dit: the OUT/vae folder of a --stage vae run")
    parser.add_argument("--resume-from", metavar="PIPELINE_DIR",
                        help="with --stage dit: continue training the transformer of this exported "
                        "pipeline folder (e.g. fastdit/assets/tiny_wan or an earlier run's "
                        "tiny_wan): its VAE, text encoder, tokenizer and latent normalisation are "
                        "kept, its training record is carried on")
    parser.add_argument("--vae-seconds", type=float, default=500)
    parser.add_argument("--pool-seconds", type=float, default=45,
                        help="at most this long encoding the latent pool")
    parser.add_argument("--dit-seconds", type=float, default=420)
    parser.add_argument("--pool-clips", type=int, default=16384)
    parser.add_argument("--pool-batch", type=int, default=32)
    parser.add_argument("--long-fraction", type=float, default=0.1,
                        help="share of transformer steps on long clips (81 frames)")
    parser.add_argument("--long-share", type=float, default=0.2,
                        help="share of --pool-seconds spent on long clips")
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1.5e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--vae-object-crops", type=float, default=0.75,
                        help="share of VAE training crops centred on the object")
    parser.add_argument("--vae-object-weight", type=float, default=4.0,
                        help="loss weight near the object against 1 for the background")
    parser.add_argument("--vae-first-frame-weight", type=float, default=4.0,
                        help="loss weight of frame 0 (a chunk of its own) against 1 for the others")
    parser.add_argument("--dit-batch", type=int, default=48)
    parser.add_argument("--dit-lr", type=float, default=6e-4,
                        help="peak learning rate of the transformer (and of a resumed run: a warm "
                        "restart)")
    parser.add_argument("--dit-warmup", type=int, default=200,
                        help="steps of linear learning-rate warm-up (fresh AdamW moments, also "
                        "when resuming)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help=f"profile this many transformer steps from step {PROFILE_START} and "
                        "log the operators' time (torch.profiler)")
    parser.add_argument("--min-vae-psnr", type=float, default=20.0,
                        help="stop before the transformer if any reconstructed chunk is below this (dB)")
    parser.add_argument("--min-vae-checker", type=float, default=0.85,
                        help="stop before the transformer if the checker reads colour, shape or "
                        "motion right on fewer of the VAE's reconstructions than this")
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--cfg-drop", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--eval-long", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    if args.smoke:  # toy budgets, where the command line sets none
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    if not args.time_cpu_generation and not args.out:
        parser.error("--out is required (except with --time-cpu-generation)")
    sources = [name for name, value in (("--vae-from", args.vae_from),
                                         ("--resume-from", args.resume_from)) if value]
    if (args.stage == "dit") != bool(sources) or len(sources) > 1:
        parser.error(f"--stage dit takes one of --vae-from and --resume-from (and they go with "
                     f"--stage dit only), got --stage {args.stage} --vae-from {args.vae_from!r} "
                     f"--resume-from {args.resume_from!r}")
    if args.dit_warmup < 1:
        parser.error(f"--dit-warmup must be at least 1, got {args.dit_warmup}")
    return args


def main(argv=None):
    args = parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else Sizes()
    for override in args.size:
        field_name, _, value = override.partition("=")
        if field_name not in asdict(sizes) or not value.isdigit():
            raise SystemExit(f"--size must be FIELD=INT with FIELD in {list(asdict(sizes))}, "
                             f"got {override!r}")
        sizes = replace(sizes, **{field_name: int(value)})
    if args.time_cpu_generation:
        time_cpu_generation(sizes, args)
        return
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "train.log"))
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        log(f"device {torch.cuda.get_device_name(device)}")
    import diffusers

    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, args {vars(args)}")
    log(f"sizes {asdict(sizes)}")
    pipe = build_pipeline(sizes, device)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder")}
    log(f"parameters {counts}")

    device_name = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    timings = {}
    normalisation, data_seed, reconstruction = None, args.seed, None
    if args.resume_from:
        t0 = time.time()
        pipe, _, record = load_resumed_pipeline(pipe, sizes, args, device, log)
        timings["load"] = time.time() - t0
        vae_losses = []
        normalisation = (list(pipe.vae.config.latents_mean), list(pipe.vae.config.latents_std))
        # new clips and draws for each resume (the first transformer run used --seed itself)
        data_seed = args.seed + 1000 * max(1, len(record["runs"]))
    elif args.stage == "dit":
        vae_losses, reconstruction, vae_stage = load_vae_stage(pipe, args, device, log)
        timings["vae_stage"] = vae_stage["wall_seconds"]
        record = new_training_record(len(vae_losses), vae_stage["seconds"].get("vae", 0.0),
                                     vae_stage["wall_seconds"], device_name)
    else:
        t0 = time.time()
        vae_losses = train_vae(pipe, sizes, args, device, log)
        timings["vae"] = time.time() - t0
        t0 = time.time()
        reconstruction = vae_reconstruction_check(pipe, sizes, args, device, log)
        timings["vae_check"] = time.time() - t0
        problems = [] if args.smoke else vae_problems(reconstruction, args)
        if args.stage == "vae" or problems:
            save_vae_stage(pipe, args, vae_losses, reconstruction, timings, log)
        if problems:
            log(f"STOP: {'; '.join(problems)}: the transformer would learn from broken latents")
            raise SystemExit(3)
        if args.stage == "vae":
            log(f"VAE stage done in {time.time() - log.start:.0f} s; next: --stage dit "
                f"--vae-from {os.path.join(args.out, 'vae')}")
            return
        record = new_training_record(len(vae_losses), timings["vae"], 0.0, device_name)
    earlier_wall = record["wall_seconds"]  # the calls before this one
    t0 = time.time()
    pools = build_pool(pipe, sizes, args, device, log, data_seed=data_seed,
                       normalisation=normalisation)
    timings["pool"] = time.time() - t0
    pool_clips = {str(frames): len(pool.captions) for frames, pool in pools.items()}
    pipe.vae.requires_grad_(False)
    t0 = time.time()
    previous_steps = record["transformer_steps"]
    dit_losses, dit_info = train_transformer(pipe, pools, sizes, args, device, log,
                                             data_seed=data_seed, previous_steps=previous_steps)
    timings["transformer"] = time.time() - t0
    del pools
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run = dict(resumed=bool(args.resume_from), steps=dit_info["steps"],
               seconds=dit_info["seconds"], batch=args.dit_batch, lr=args.dit_lr,
               warmup=args.dit_warmup, data_seed=data_seed, pool_clips=pool_clips,
               final_loss=dit_info["final_loss"],
               frame_loss_relative=dit_info["frame_loss_relative"], device=device_name,
               wall_seconds=None, heldout_accuracy=None)
    record = add_transformer_run(record, run)

    def stamp(record):
        """``record`` with this call's wall time so far."""
        call = time.time() - log.start
        record["runs"][-1]["wall_seconds"] = round(call, 1)
        record["wall_seconds"] = round(earlier_wall + call, 1)
        record["device"] = device_name
        return record

    t0 = time.time()
    folder = args.pipeline_dir or os.path.join(args.out, "tiny_wan")
    size_bytes = export(pipe, args.out, folder, log, sizes, args, stamp(record))
    timings["export"] = time.time() - t0
    plot_losses(vae_losses, dit_losses, os.path.join(args.out, "loss.png"),
                step_offset=previous_steps)
    t0 = time.time()
    results, samples = evaluate(folder, sizes, args, device, log)
    timings["eval"] = time.time() - t0
    write_samples(samples, os.path.join(args.out, "samples.png"))
    record["runs"][-1]["heldout_accuracy"] = results.get("heldout", {}).get("accuracy")
    defaults = write_defaults(folder, sizes, args, results, stamp(record))
    with atomic_path(os.path.join(args.out, "tiny_wan.tar")) as temporary, \
            tarfile.open(temporary, "w") as tar:
        tar.add(folder, arcname="tiny_wan")
    shown = {key: value for key, value in defaults.items() if key != RECORD_KEY}
    log(f"defaults for fastdit generate: {shown}")
    log(f"training so far: {record['transformer_steps']} transformer steps "
        f"({record['transformer_seconds']} s) in {len(record['runs'])} run(s), "
        f"{record['wall_seconds']} s of calls in all"
        f"{'' if record['complete'] else ' (earlier training unrecorded)'}")
    total = time.time() - log.start + timings.get("vae_stage", 0.0)
    on_gpu = device.type == "cuda"
    metrics = dict(
        device=device_name,
        gpu_minutes=round(total / 60, 2) if on_gpu else 0.0,
        cumulative_gpu_minutes=round(record["wall_seconds"] / 60, 2) if on_gpu else 0.0,
        wall_seconds=round(total, 1), seconds={k: round(v, 1) for k, v in timings.items()},
        sizes=asdict(sizes), parameters=counts, pipeline_mb=round(size_bytes / 2**20, 2),
        args=vars(args), vae_reconstruction=reconstruction, training=record,
        losses=dict(vae=vae_losses, transformer=[loss for loss, _ in dit_losses],
                    transformer_long_step=[long for _, long in dit_losses],
                    transformer_step_offset=previous_steps),
        eval=results,
    )
    atomic_write_text(os.path.join(args.out, "metrics.json"), json.dumps(metrics, indent=1))
    log(f"done in {total:.0f} s ({total / 60:.2f} min on {metrics['device']}); "
        f"stages {metrics['seconds']}")
    for name, result in results.items():
        log(f"SCORE {name}: {result['accuracy']}")


if __name__ == "__main__":
    main()
