"""What bounds ``quantize="int8-fp8"`` (issue 13), measured: an ablation ladder of its inner loop.

Run 6 timed the kernel at 0.96-0.98x FA4 bf16 dense at Wan2.1-14B 720p, short of the 1.25x
target. This times where the time goes: one stand-alone Triton kernel with the kernel's inner
loop (INT8 Q.K^T, FP8 P.V with V transposed, two-level accumulation; K and V^T by TMA, as the
real kernel on Hopper), dense, launched like the real one (its default launch configuration at
head_dim 128 with 128-token blocks, 64 x 128 tiles on 4 warps, 2 stages), in stages:

* ``mma``: the two MMAs and what feeds them (loads, int32 -> fp32, P's e4m3 cast) and no softmax:
  P is the scaled scores;
* ``exp2``: plus ``p = exp2(s - c)`` with a fixed ``c`` (the exponentials, no row reductions);
* ``max``: plus the running row max and ``p = exp2(s - m)`` (one row reduction);
* ``softmax``: the whole online softmax (rescaling ``acc`` and ``l`` by ``exp2(m_old - m_new)``,
  the row sum, ``e4m3(448 p)``): the arithmetic of the kernel up to run 7;
* ``softmax-folded``: the same softmax with fewer instructions per score: the int32 -> fp32
  offset, the scale, the running max and P's factor 448 fold into one FMA per score
  (``p8 = exp2(bits * scale - bias_row)``, ``bits`` the offset int32 read as fp32), and ``l``
  sums ``p8``: the kernel's arithmetic since run 7 (``triton_common.fold_scores``);
* ``softmax-prefetch``: ``softmax-folded`` with the next key tile's Q.K^T issued before this
  tile's softmax (FA3's intra-warpgroup overlap, written in the loop: whether Triton keeps that
  MMA in flight across the softmax decides if it pays);
* ``softmax`` and ``softmax-folded`` again with 168 registers per thread (three programs per SM).

Then fastdit's ``int8-fp8`` attention kernel on pre-quantized inputs and the whole
``block_sparse_attention(quantize="int8-fp8")`` call, at the ladder's length and at 75,600 tokens
(a ragged last block) and at 1.3B 480p's 32,760 tokens and 12 heads, with the kernel's register
cap (``int8_attention.FP8_MAXNREG``) and without; at 75,600 tokens also on random 25% and 12.5%
plans (``fp8_tune``'s maps: 128-token blocks, diagonal kept, seed 0). TOPS count ``4 * S^2 * D`` per (batch, head)
as bf16-equivalent work (two MMAs of ``2 * S^2 * D``); the H200's dense FP8/INT8 peak is about
1,980 TOPS.

    python -m benchmarks.fp8_bound                 # an H200, ~1 minute
    python -m benchmarks.fp8_bound --smoke         # the CPU interpreter: a tiny shape, the
                                                   # attention stages checked against attention
    python -m benchmarks.fp8_bound --kernel-only   # the real kernel's rows only, ~1 minute

Writes ``fp8_bound_<gpu>_<date>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: the interpreter decides at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import add_out_argument, collect_metadata, stem  # noqa: E402
from fastdit.files import atomic_write_text  # noqa: E402
from fastdit.kernels.triton.triton_common import (  # noqa: E402
    LOG2_P_SCALE,
    SCORE_OFFSET as MAGIC,  # int8_offset_scores' offset: 1.5 * 2**23
    e4m3_round,
    fp8_pv,
    int8_offset_scores,
)

STAGES = ("mma", "exp2", "max", "softmax", "softmax-folded", "softmax-prefetch")
FIRST_ATTENTION_STAGE = 3  # stages from here on compute attention; those below do not
SHAPE = (1, 75_520, 40, 128)  # B, S, H, D: Wan2.1-14B 720p (75,600 tokens) cut to whole 128-blocks
SMOKE_SHAPE = (1, 256, 2, 64)
RAGGED_SEQ = 75_600  # Wan2.1-14B 720p's own length: 590 whole 128-blocks and 80 tokens
# Wan2.1-1.3B 480p: tokens (255 whole blocks and 120, not a multiple of 16), heads
SMALL_RAGGED = (32_760, 12)
SPARSE_DENSITIES = (0.25, 0.125)  # random plans timed at RAGGED_SEQ too (issue 13's)
MAXNREG = 168  # 65,536 registers / (3 programs x 128 threads), rounded down to 8


@triton.jit
def _e4m3_dot(p8, v, UPCAST_OPERANDS: tl.constexpr):
    """``p8 @ v`` with ``p8`` already in e4m3's range: fp8_pv's two-level accumulation without its
    multiply by 448 (the caller adds the result to ``acc``)."""
    if UPCAST_OPERANDS:  # the interpreter (see e4m3_round)
        p8 = e4m3_round(p8)
    return tl.dot(p8.to(tl.float8e4nv), v)


@triton.jit
def _load_k(k_ptrs, k_desc, bh, seq, start, D: tl.constexpr, USE_TMA: tl.constexpr):
    """K's ``[BLOCK_N, D]`` tile at key ``start``: a TMA load (the real kernel's path on Hopper)
    or pointer loads (the interpreter)."""
    if USE_TMA:
        return k_desc.load([(bh * seq + start).to(tl.int32), 0])
    return tl.load(k_ptrs + start * D)


@triton.jit
def _load_v(v_ptrs, v_desc, bh, start, D: tl.constexpr, USE_TMA: tl.constexpr):
    """V's ``[BLOCK_N, D]`` tile at key ``start``: V^T's ``[D, BLOCK_N]`` tile, transposed."""
    if USE_TMA:
        return tl.trans(v_desc.load([(bh * D).to(tl.int32), start]))
    return tl.trans(tl.load(v_ptrs + start))


@triton.jit
def _ladder_kernel(
    Q, K, Vt, Out, k_desc, v_desc, seq, qk_scale,
    STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One (query tile, batch * head): Q, K int8 ``[BH, S, D]``, Vt e4m3 ``[BH, D, S]``, Out
    fp32 ``[BH, S, D]``; every key tile, no masks (``S`` a multiple of both tiles)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    q = tl.load(Q + bh * seq * D + rows[:, None] * D + dims[None, :])
    k_ptrs = K + bh * seq * D + cols[:, None] * D + dims[None, :]
    v_ptrs = Vt + bh * D * seq + dims[:, None] * seq + cols[None, :]
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if STAGE < 4:
        for start in range(0, seq, BLOCK_N):
            k = _load_k(k_ptrs, k_desc, bh, seq, start, D, USE_TMA)
            v = _load_v(v_ptrs, v_desc, bh, start, D, USE_TMA)
            s = (int8_offset_scores(q, k) - MAGIC) * qk_scale  # run 6's int8_scores
            if STAGE == 0:  # the MMAs alone: P = the scaled scores, cast to e4m3 inside fp8_pv
                p = s
            elif STAGE == 1:  # + the exponentials
                p = tl.math.exp2(s - 8.0)
            elif STAGE == 2:  # + the running max
                m_i = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_i[:, None])
            else:  # the whole online softmax (fastdit's fold_scores)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                m_i = m_new
            acc = fp8_pv(acc, p * 448.0, v, 0, UPCAST_OPERANDS)
        if STAGE == 3:
            acc = acc / (l_i[:, None] * 448.0)
    else:
        offset = MAGIC * qk_scale
        bits = int8_offset_scores(q, _load_k(k_ptrs, k_desc, bh, seq, 0, D, USE_TMA))
        for start in range(0, seq, BLOCK_N):
            if STAGE == 5:  # the next tile's Q.K^T first (the last one wraps to tile 0, unused)
                nxt = (start + BLOCK_N) % seq
                bits_next = int8_offset_scores(q, _load_k(k_ptrs, k_desc, bh, seq, nxt, D, USE_TMA))
            else:
                bits = int8_offset_scores(q, _load_k(k_ptrs, k_desc, bh, seq, start, D, USE_TMA))
            v = _load_v(v_ptrs, v_desc, bh, start, D, USE_TMA)
            m_new = tl.maximum(m_i, tl.max(bits, 1) * qk_scale - offset)
            bias = m_new + offset - LOG2_P_SCALE
            p8 = tl.math.exp2(bits * qk_scale - bias[:, None])  # 448 * exp2(s * scale - m), one FMA
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p8, 1)
            acc = acc * alpha[:, None] + _e4m3_dot(p8, v, UPCAST_OPERANDS)
            m_i = m_new
            if STAGE == 5:
                bits = bits_next
        acc = acc / l_i[:, None]
    tl.store(Out + bh * seq * D + rows[:, None] * D + dims[None, :], acc)


def ladder(q8, k8, vt8, stage: int, qk_scale: float, config, interpret: bool,
           maxnreg: int | None = None) -> torch.Tensor:
    """Run stage ``stage`` under ``config`` (BLOCK_M, BLOCK_N, warps, stages). On a GPU K and V^T
    come in by TMA, as in the real kernel on Hopper; ``maxnreg`` caps the registers per thread
    (Triton's launch option: 168 lets three 4-warp programs share an SM's 64K registers)."""
    bh, seq, head_dim = q8.shape
    block_m, block_n, num_warps, num_stages = config
    out = torch.empty((bh, seq, head_dim), dtype=torch.float32, device=q8.device)
    use_tma = not interpret
    k_desc, v_desc = k8, vt8  # unused on the interpreter
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(k8.view(bh * seq, head_dim), [block_n, head_dim])
        v_desc = TensorDescriptor.from_tensor(vt8.view(bh * head_dim, seq), [head_dim, block_n])
    options = {} if maxnreg is None else dict(maxnreg=maxnreg)
    _ladder_kernel[(seq // block_m, bh)](
        q8, k8, vt8, out, k_desc, v_desc, seq, qk_scale, STAGE=stage, BLOCK_M=block_m,
        BLOCK_N=block_n, D=head_dim, UPCAST_OPERANDS=interpret, USE_TMA=use_tma,
        num_warps=num_warps, num_stages=num_stages, **options,
    )
    return out


def inputs(shape, device, seed: int = 0):
    """bf16 Q, K, V ``(B, S, H, D)`` and the ladder's int8 Q, K and transposed e4m3 V (per-tensor
    scales: the ladder times arithmetic, not quantization)."""
    generator = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(shape, device=device, generator=generator, dtype=torch.bfloat16)
               for _ in range(3))
    batch, seq, heads, head_dim = shape
    to_bhsd = lambda x: x.transpose(1, 2).reshape(batch * heads, seq, head_dim).float()  # noqa: E731
    qf, kf, vf = to_bhsd(q), to_bhsd(k), to_bhsd(v)
    q_s, k_s, v_s = (x.abs().amax() / m for x, m in ((qf, 127), (kf, 127), (vf, 448)))
    q8 = (qf / q_s).round().clamp(-127, 127).to(torch.int8).contiguous()
    k8 = (kf / k_s).round().clamp(-127, 127).to(torch.int8).contiguous()
    vt8 = (vf / v_s).clamp(-448, 448).to(torch.float8_e4m3fn).transpose(1, 2).contiguous()
    return (q, k, v), (q8, k8, vt8), (q_s.item(), k_s.item(), v_s.item())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU interpreter")
    parser.add_argument("--kernel-only", action="store_true",
                        help="skip the ladder: only the real kernel's rows (a GPU)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    from fastdit.kernels.triton.int8_attention import FP8_LAUNCH_CONFIG, _int8_launch_config

    interpret = args.smoke
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("fp8_bound times GPU kernels; on a CPU run --smoke", file=sys.stderr)
        return 2
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    batch, seq, heads, head_dim = shape
    config = (64, 64, 4, 1) if args.smoke else (
        FP8_LAUNCH_CONFIG or _int8_launch_config(head_dim, 128, 128, interpret=False))
    (q, k, v), (q8, k8, vt8), (q_s, k_s, v_s) = inputs(shape, device)
    qk_scale = q_s * k_s * head_dim**-0.5 * math.log2(math.e)
    flop = 4.0 * batch * heads * seq * seq * head_dim
    rows = []

    def bench(call):
        if args.smoke:
            return None
        import triton.testing

        call()
        torch.cuda.synchronize()
        return triton.testing.do_bench(call, warmup=25, rep=200)

    def record(name, ms, note="", scale=1.0):
        tops = None if ms is None else flop * scale / ms / 1e9
        rows.append(dict(name=name, ms=ms, tops=tops, note=note))
        print(f"{name:<44}" + ("      - ms" if ms is None else f"{ms:9.3f} ms {tops:7.1f} TOPS")
              + (f"  {note}" if note else ""), flush=True)

    print(f"shape B={batch} S={seq} H={heads} D={head_dim}, launch {config} "
          f"(BLOCK_M, BLOCK_N, warps, stages)", flush=True)
    # The attention stages are checked on a slice (the whole shape's scores would not fit).
    rows_checked = min(seq, 512)
    qf = q8[:1, :rows_checked].float() * q_s
    kf = k8[:1].float() * k_s
    vf = vt8[:1].float().transpose(1, 2) * v_s
    reference = torch.softmax(qf @ kf.transpose(1, 2) * head_dim**-0.5, dim=-1) @ vf
    del qf, kf, vf
    runs = [] if args.kernel_only else [(stage, name, None) for stage, name in enumerate(STAGES)]
    if not args.smoke and not args.kernel_only:  # three programs per SM instead of two (the
        # ladder takes ~250 registers)
        runs += [(STAGES.index(name), name, MAXNREG) for name in ("softmax", "softmax-folded")]
    for stage, name, maxnreg in runs:
        label = f"ladder: {name}" + ("" if maxnreg is None else f", maxnreg {maxnreg}")
        out = ladder(q8, k8, vt8, stage, qk_scale, config, interpret, maxnreg)
        record(label, bench(
            lambda: ladder(q8, k8, vt8, stage, qk_scale, config, interpret, maxnreg)))
        if stage >= FIRST_ATTENTION_STAGE:  # attention: check it against PyTorch's
            got = out[:1, :rows_checked] * v_s
            error = ((got - reference).abs().sum() / reference.abs().sum()).item()
            print(f"{label} vs PyTorch attention on the same int8/e4m3 inputs ({rows_checked} "
                  f"queries): relative L1 {error:.4f}", flush=True)
            rows[-1]["rel_l1_vs_attention"] = error
            if error > 0.05:
                raise SystemExit(
                    f"the ladder's {name} stage is not attention (relative L1 {error:.3f})")
    if not args.smoke:
        from fastdit.cli.bench import random_block_map
        from fastdit.kernels import BlockSparsity, block_sparse_attention, quantize_qk_int8
        from fastdit.kernels.triton import int8_attention
        from fastdit.kernels.triton.int8_attention import triton_int8_block_sparse_attention
        from fastdit.kernels.triton.quantize import triton_quantize_v_fp8

        default_cap = int8_attention.FP8_MAXNREG
        # The real kernel at the ladder's length (whole blocks), at Wan2.1-14B 720p's own 75,600
        # tokens (a ragged last block: the kernel's masked tail is compiled in) and at 1.3B
        # 480p's 32,760 (ragged, and not a multiple of 16), with its register cap and without.
        for length, length_heads in ((seq, heads), (RAGGED_SEQ, heads), SMALL_RAGGED):
            if length != seq:
                del q, k, v
                torch.cuda.empty_cache()
                generator = torch.Generator(device).manual_seed(1)
                q, k, v = (torch.randn((batch, length, length_heads, head_dim), device=device,
                                       generator=generator, dtype=torch.bfloat16) for _ in range(3))
            plans = {1.0: BlockSparsity.dense(length, length, 128, device=device)}
            if length == RAGGED_SEQ:
                generator = torch.Generator(device).manual_seed(0)
                for density in SPARSE_DENSITIES:
                    block_map = random_block_map(
                        length_heads, math.ceil(length / 128), density, generator, device)
                    plans[density] = BlockSparsity.from_block_map(block_map, 128)
            quantized = quantize_qk_int8(q, k, block_size=128)
            v_q = triton_quantize_v_fp8(v, layout="bshd", key_lengths=None, transposed=True)
            for (density, plan), cap in itertools.product(plans.items(), (default_cap, None)):
                int8_attention.FP8_MAXNREG = cap
                try:
                    suffix = f"S={length} H={length_heads}, FP8_MAXNREG {cap}"
                    scale = (length / seq) ** 2 * length_heads / heads
                    if density != 1.0:  # TOPS on the computed blocks
                        suffix = f"{suffix}, random {density:g} plan"
                        scale *= plan.computed_pairs(length, length) / (
                            length**2 * plan.kv_counts.shape[1])  # summed over the plan's heads
                    record(f"fastdit int8-fp8 kernel (pre-quantized), {suffix}", bench(
                        lambda: triton_int8_block_sparse_attention(
                            quantized, v, plan, layout="bshd", return_lse=False, key_lengths=None,
                            interpret=False, quantized_v=v_q)), scale=scale)
                    if cap == default_cap:
                        record(f"fastdit int8-fp8 call (quantization included), {suffix}", bench(
                            lambda: block_sparse_attention(q, k, v, plan, quantize="int8-fp8")),
                            scale=scale)
                finally:
                    int8_attention.FP8_MAXNREG = default_cap
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = collect_metadata(args, torch.device(device), torch.bfloat16)
    path = out_dir / f"{stem('fp8_bound', metadata)}.json"
    atomic_write_text(path, json.dumps(dict(metadata=metadata, shape=shape, config=config,
                                            rows=rows), indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
