"""Sparse attention on a diffusers pipeline you already have: ``fastdit.apply`` and ``remove``.

fastdit installs attention processors and diffusers hooks on the pipeline's transformer(s) or UNet,
for every model class a registered adapter takes (``fastdit.supported_models()``), with any
registered method (``fastdit.methods.available()``); ``handle.remove()`` restores the pipeline.

    python examples/apply_to_pipeline.py                  # the embedded tiny Wan, offline
    python examples/apply_to_pipeline.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --steps 50
"""

import argparse

import torch

import fastdit
from fastdit.testing.tiny import TINY_DEFAULTS, load_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="hub id or local folder (default: the tiny model)")
parser.add_argument("--steps", type=int, default=2)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = load_pipeline(args.model, dtype=dtype, device=device)
print("supported models:", ", ".join(fastdit.supported_models()))
print("methods:", ", ".join(fastdit.methods.available()))
call = dict(prompt="a red fox runs through the snow", num_inference_steps=args.steps, output_type="np")
if args.model is None:  # the tiny model's size: 5 x 6 x 10 latent tokens
    call.update({key: TINY_DEFAULTS[key] for key in ("height", "width", "num_frames")})

# 1. A method object (fastdit.Radial.preset("wan2.1-14b") is the published Wan2.1-14B setting,
#    dense schedule included), or a registered method's name with its options.
handle = fastdit.apply(pipe, fastdit.Radial(decay=0.2, block_size=64))
frames = pipe(**call).frames[0]
print(handle.summary())
handle.remove()  # the stock processors and no hook left

with fastdit.apply(pipe, "gna", window=(1, 3, 3)) as handle:  # removed when the block ends
    frames = pipe(**call).frames[0]
    print(handle.summary())

# 2. The diffusers way: set the processor yourself, then attach the hooks it needs.
from fastdit.pipelines.wan import WanSparseAttnProcessor  # noqa: E402

if type(pipe.transformer).__name__ == "WanTransformer3DModel":
    stock = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(WanSparseAttnProcessor("radial"))
    handle = fastdit.attach(pipe)
    frames = pipe(**call).frames[0]
    print(handle.summary())
    handle.remove()
    pipe.transformer.set_attn_processor(stock)
print("frames:", frames.shape)
