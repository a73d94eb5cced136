"""Which calls Hopper warp specialization gets wrong: the bf16 Triton kernel with
``WARP_SPECIALIZE`` on against the same call with it off, one line per case.

``gpu_check --warp-specialize`` failed on an H200 with Triton 3.6 (2026-12-02): every check that
ran warp-specialized gave wrong outputs, while ``fp8_tune`` had found "on" equal to "off" on a
dense and a random 25% plan at 75,600 tokens. This separates the cases: sequence lengths that are
multiples of the 128-token block or ragged, dense or sparse plans, plans with an empty query-block
row or without, plans that differ per head or are shared, batch 1 or 2, head_dim 64 or 128.
Triton versions listed in ``triton_common.WARP_SPECIALIZE_WRONG_TRITON`` are let through here
(the library refuses them); nothing else changes.

    python -m benchmarks.ws_diagnose                # an H200, ~1 minute (one compile per shape)

Prints ``ok``/``WRONG`` with the largest difference and the LSE difference; writes
``ws_diagnose_<gpu>_<date>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import add_out_argument, collect_metadata, stem  # noqa: E402
from fastdit.files import atomic_write_text  # noqa: E402
from fastdit.kernels import BlockSparsity, block_sparse_attention, explain_backends  # noqa: E402
from fastdit.kernels.triton import triton_common  # noqa: E402

CASES = [  # name, batch, seq_q, seq_kv, heads, head_dim, plan kind
    ("even dense", 1, 1024, 1024, 3, 128, "dense"),
    ("even sparse per head", 1, 1024, 1024, 3, 128, "sparse"),
    ("even sparse shared", 1, 1024, 1024, 3, 128, "shared"),
    ("even sparse empty row", 1, 1024, 1024, 3, 128, "empty"),
    ("ragged dense", 1, 1000, 1337, 3, 128, "dense"),
    ("ragged sparse per head", 1, 1000, 1337, 3, 128, "sparse"),
    ("ragged sparse empty row", 2, 1000, 1337, 3, 128, "empty"),
    ("even dense batch 2", 2, 1024, 1024, 3, 128, "dense"),
    ("even dense D=64", 1, 1024, 1024, 3, 64, "dense"),
    ("large even dense", 1, 8192, 8192, 8, 128, "dense"),
    ("large ragged sparse", 1, 8000, 8000, 8, 128, "sparse"),
]


def plan_for(kind: str, batch: int, heads: int, seq_q: int, seq_kv: int, generator) -> BlockSparsity:
    num_q, num_kv = -(-seq_q // 128), -(-seq_kv // 128)
    if kind == "dense":
        return BlockSparsity.dense(seq_q, seq_kv, 128, device="cuda")
    rows = 1 if kind == "shared" else heads
    block_map = torch.rand(batch, rows, num_q, num_kv, device="cuda", generator=generator) < 0.4
    block_map[..., 0] = True  # no empty row unless asked for
    if kind == "empty":
        block_map[0, 0, 2] = False
    return BlockSparsity.from_block_map(block_map, 128)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ws_diagnose needs a Hopper GPU", file=sys.stderr)
        return 2
    triton_common.WARP_SPECIALIZE_WRONG_TRITON = {}
    triton_common._wrong_on_this_triton.cache_clear()
    generator = torch.Generator("cuda").manual_seed(0)
    results = []
    for name, batch, seq_q, seq_kv, heads, head_dim, kind in CASES:
        q = torch.randn(batch, seq_q, heads, head_dim, device="cuda", generator=generator, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, seq_kv, heads, head_dim, device="cuda", generator=generator,
                            dtype=torch.bfloat16) for _ in range(2))
        plan = plan_for(kind, batch, heads, seq_q, seq_kv, generator)
        outputs = {}
        try:
            for switch in (False, True):
                triton_common.WARP_SPECIALIZE = switch
                outputs[switch] = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
            torch.cuda.synchronize()
            reason = explain_backends("cuda", torch.bfloat16, head_dim).warp_specialization
            (off, lse_off), (on, lse_on) = outputs[False], outputs[True]
            finite = torch.isfinite(lse_off)
            error = (on.float() - off.float()).abs().nan_to_num(float("inf")).max().item()
            lse_error = (lse_on[finite] - lse_off[finite]).abs().nan_to_num(float("inf")).max().item()
            same_empty = torch.equal(torch.isneginf(lse_on), ~finite)
            status = "ok" if error <= 2e-2 and lse_error <= 1e-3 and same_empty else "WRONG"
            row = dict(case=name, status=status, max_abs=error, lse_max_abs=lse_error,
                       same_empty_rows=same_empty, specialized=reason is None, reason=reason)
        except Exception as exc:  # a compile failure is a finding too
            row = dict(case=name, status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            triton_common.WARP_SPECIALIZE = False
        results.append(row)
        print(f"{row['status']:<6}{name:<28}" + (f"max |on-off| {row['max_abs']:.3e}  lse "
              f"{row['lse_max_abs']:.3e}  empty rows same: {row['same_empty_rows']}"
              if "max_abs" in row else row["error"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.smoke = False  # collect_metadata records it
    metadata = collect_metadata(args, torch.device("cuda"), torch.bfloat16)
    path = out / f"{stem('ws_diagnose', metadata)}.json"
    atomic_write_text(path, json.dumps(dict(metadata=metadata, cases=results), indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
