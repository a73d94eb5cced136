"""Write a diffusers Wan pipeline folder with a full-size Wan2.1-1.3B transformer and random weights.

For timing ``fastdit compare`` (and ``fastdit generate``) on a GPU machine without hub access:
the transformer has Wan2.1-T2V-1.3B's architecture (30 layers, 12 heads x 128, ffn 8960) with
random bf16 weights; the text encoder, tokenizer and VAE are the embedded tiny ones (so the text
projection takes the tiny encoder's width instead of 4096, and decoding is cheap). Videos are
noise: only speed and density mean anything, quality needs real weights.

    python -m benchmarks.make_random_wan /tmp/wan13b-random
    fastdit compare --model /tmp/wan13b-random --height 480 --width 832 --num-frames 81 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from fastdit.testing.tiny import TINY_TEXT_ENCODER_CONFIG, build_tiny_wan_pipeline  # noqa: E402

WAN21_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=TINY_TEXT_ENCODER_CONFIG["d_model"], freq_dim=256, ffn_dim=8960,
    num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="output folder (diffusers save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import WanTransformer3DModel

    pipe = build_tiny_wan_pipeline(seed=args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        transformer = WanTransformer3DModel(**WAN21_13B).to(torch.bfloat16).eval()
    pipe.transformer = transformer
    pipe.register_modules(transformer=transformer)
    pipe.save_pretrained(args.path)
    print(f"wrote {args.path} (Wan2.1-1.3B architecture, random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
