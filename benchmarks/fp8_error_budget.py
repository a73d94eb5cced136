"""Where the error of ``quantize="int8-fp8"`` comes from: a CPU model, source by source (issue 13).

The issue's accuracy criterion compares the quantized kernel with the bf16 kernel on unit-variance
Q, K, V (and on keys sharing a per-head offset of 20): cosine >= 0.999 and relative L1 <= 3%.
On an H200 ``int8-fp8`` measured cosine 0.9992 and relative L1 0.039-0.040. This script models
the kernels in PyTorch on the CPU (no GPU, no interpreter), turning on one quantization at a time:

* the bf16 kernel (the baseline every row is measured against): exact scores, online softmax in
  fp32 over 128-key tiles, P cast to bf16 for ``P @ V``, output rounded to bf16;
* ``INT8 Q.K`` alone: fastdit's per-block INT8 Q and K with K smoothing
  (:func:`fastdit.kernels.reference.quantize_qk_reference`), P and V as the bf16 kernel;
* ``e4m3 P`` alone: ``e4m3(448 p)`` in ``P @ V`` (p against the running max, as the kernel);
* ``e4m3 V`` alone: V in e4m3 with one scale per channel (``max |v_d| -> 448``);
* P and V in e4m3; all three together (``int8-fp8`` as shipped; checked against fastdit's own
  tile-by-tile reference, :func:`fastdit.kernels.reference.int8_fp8_attention_reference`).

Last, the FP8 Q.K^T variant (``quantize="fp8"``): e4m3 Q and K with the same per-block scales and
K smoothing, alone and with FP8 P.V.

Then cheap variants of the shipped mode, none of which adds MMA work: P scaled to 240 or 256
instead of 448 (e4m3's relative precision does not depend on scale, so this should not matter),
the softmax denominator summed from the rounded P (``l = sum e4m3(p)``: the rounding errors of P
then act as perturbed weights of a normalized average), V with one scale per (key block, channel)
or one per head, and V smoothed by its per-channel mean (``v - mean`` in e4m3, the mean added
back to the output, exactly, after the loop).

Cases: ``unit`` (Q, K, V ~ N(0, 1) in bf16), ``offset20`` (K plus a per-head offset of 20 per
channel), ``v-offset`` (V plus a per-head offset of 2 per channel, a case outside the issue's
criterion: there the output is mostly the offset, so relative errors are small). Each cell is
the mean over ``--seeds`` draws of the relative L1 to the bf16 kernel (with the max over seeds,
and the cosine).

    python -m benchmarks.fp8_error_budget                   # S=4096, 4 heads, 3 seeds: ~2.5 min CPU
    python -m benchmarks.fp8_error_budget --seq 2048 --seeds 5
    python -m benchmarks.fp8_error_budget --smoke           # S=512, 2 heads, 1 seed: seconds

Writes ``fp8_error_budget_<device>_<date>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import add_out_argument, device_slug  # noqa: E402
from fastdit.files import atomic_write_text  # noqa: E402
from fastdit.kernels import BlockSparsity  # noqa: E402
from fastdit.kernels.quantized import FP8_E4M3_MAX  # noqa: E402
from fastdit.kernels.reference import (  # noqa: E402
    int8_fp8_attention_reference,
    quantize_qk_reference,
    quantize_v_fp8_reference,
)

LOG2E = 1.4426950408889634
TILE = 128  # the kernels' key tile (and the plan's blocks)
CASES = {"unit": (0.0, 0.0), "offset20": (20.0, 0.0), "v-offset": (0.0, 2.0)}  # (K offset, V offset)


@dataclass(frozen=True)
class Model:
    """One configuration of the modelled kernel.

    qk: "exact" (fp32 scores of the bf16 inputs), "int8" (fastdit's per-block INT8, K smoothed)
        or "fp8" (the same in e4m3: ``quantize="fp8"``).
    p: "bf16" (P cast to bf16 for P.V) or "e4m3" (``e4m3(p_scale * p)``).
    l_rounded: the softmax denominator sums the rounded P (else the fp32 P, as the kernels do).
    v: "bf16" (V as given) or "e4m3" with ``v_scale`` "channel" (per head and channel),
        "block" (per key block and channel) or "head" (one per head); ``v_smooth`` subtracts the
        per-channel mean before quantizing and adds it to the output.
    """

    qk: str = "exact"
    p: str = "bf16"
    p_scale: float = FP8_E4M3_MAX
    l_rounded: bool = False
    v: str = "bf16"
    v_scale: str = "channel"
    v_smooth: bool = False


SHIPPED = Model(qk="int8", p="e4m3", v="e4m3")
SOURCES = {
    "INT8 Q.K alone": Model(qk="int8"),
    "e4m3 P alone": Model(p="e4m3"),
    "e4m3 V alone (per channel)": Model(v="e4m3"),
    "e4m3 P and V": Model(p="e4m3", v="e4m3"),
    "all (int8-fp8 as shipped)": SHIPPED,
}
VARIANTS = {
    "shipped, P scaled to 256": replace(SHIPPED, p_scale=256.0),
    "shipped, P scaled to 240": replace(SHIPPED, p_scale=240.0),
    "shipped, l from rounded P": replace(SHIPPED, l_rounded=True),
    "shipped, V scale per block": replace(SHIPPED, v_scale="block"),
    "shipped, V scale per head": replace(SHIPPED, v_scale="head"),
    "shipped, V mean-smoothed": replace(SHIPPED, v_smooth=True),
    "shipped, V smoothed + l rounded": replace(SHIPPED, v_smooth=True, l_rounded=True),
    "e4m3 Q.K alone (quantize=fp8's)": Model(qk="fp8"),
    "quantize=fp8 (e4m3 Q.K, P, V)": replace(SHIPPED, qk="fp8"),
}


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to e4m3 (nearest even, what the GPU's conversion does), back to fp32."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def quantize_v(v: torch.Tensor, model: Model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 values, their scale broadcastable to ``v``, the smoothing mean) of fp32 ``[H, S, D]``."""
    mean = v.mean(dim=1, keepdim=True) if model.v_smooth else torch.zeros_like(v[:, :1])
    x = v - mean
    heads, seq, dim = x.shape
    if model.v_scale == "channel":
        absmax = x.abs().amax(dim=1, keepdim=True)
    elif model.v_scale == "head":
        absmax = x.abs().amax(dim=(1, 2), keepdim=True)
    elif model.v_scale == "block":
        blocks = x.view(heads, seq // TILE, TILE, dim).abs().amax(dim=2, keepdim=True)
        absmax = blocks.expand(-1, -1, TILE, -1).reshape(heads, seq, dim)
    else:
        raise ValueError(f"v_scale must be channel, block or head, got {model.v_scale!r}")
    scale = torch.where(absmax > 0, absmax, 1.0) / FP8_E4M3_MAX
    return e4m3(x / scale), scale, mean


def scores_log2(q: torch.Tensor, k: torch.Tensor, model: Model) -> torch.Tensor:
    """fp32 ``[H, S_q, S_kv]`` scores in log2 units (``scale * log2(e)`` folded in)."""
    head_dim = q.shape[-1]
    if model.qk == "exact":
        return (q.double() @ k.double().transpose(1, 2) * (head_dim**-0.5 * LOG2E)).float()
    quantized = quantize_qk_reference(q[None], k[None], q_block_size=TILE, kv_block_size=TILE,
                                      scale=head_dim**-0.5, layout="bhsd", fp8=model.qk == "fp8")
    rows = torch.arange(q.shape[1]) // TILE
    q_deq = quantized.q[0].float() * quantized.q_scale[0][:, rows, None]
    k_deq = quantized.k[0].float() * quantized.k_scale[0][:, rows, None]
    return q_deq @ k_deq.transpose(1, 2)  # exact integer products times fp32 scales


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: Model) -> torch.Tensor:
    """The modelled kernel's output, bf16 values in fp32 ``[H, S, D]``: the online softmax over
    ``TILE``-key tiles in fp32 (running max ``m``, sum ``l``, ``acc``), as the Triton kernels."""
    s = scores_log2(q, k, model)
    if model.v == "e4m3":
        v_values, v_scale, v_mean = quantize_v(v, model)
    else:
        v_values, v_scale, v_mean = v, torch.ones(()), torch.zeros(())
    heads, seq_q, _ = s.shape
    m = torch.full((heads, seq_q), float("-inf"))
    l = torch.zeros((heads, seq_q))
    acc = torch.zeros((heads, seq_q, v.shape[-1]))
    for start in range(0, s.shape[2], TILE):
        tile = s[:, :, start : start + TILE]
        m_new = torch.maximum(m, tile.amax(-1))
        p = torch.exp2(tile - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        if model.p == "e4m3":
            p_used = e4m3(p * model.p_scale)
        else:
            p_used = p.to(torch.bfloat16).float()
        if model.l_rounded:  # the weights P.V really used, back in [0, 1]
            l = l * alpha + (p_used / model.p_scale if model.p == "e4m3" else p_used).sum(-1)
        else:
            l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p_used @ v_values[:, start : start + TILE]
        m = m_new
    out = acc / l[..., None]
    if model.p == "e4m3":
        out = out / model.p_scale
    out = out * v_scale + v_mean  # V's scale per channel (or head), and its mean if smoothed
    return out.to(torch.bfloat16).float()


def run_model(q, k, v, model: Model) -> torch.Tensor:
    if model.v == "e4m3" and model.v_scale == "block":
        # One scale per (key block, channel) does not factor out of the sum over keys: a kernel
        # would rescale each tile's product before adding it. Modelled by dequantizing V first
        # (e4m3 values times fp32 scales, exact in fp32), then P.V on those values.
        values, scale, mean = quantize_v(v, model)
        return attend(q, k, values * scale + mean, replace(model, v="bf16"))
    return attend(q, k, v, model)


def metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a, b = out.double().flatten(), ref.double().flatten()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return ((a - b).abs().sum() / b.abs().sum()).item(), cosine


def make_inputs(seed: int, seq: int, heads: int, head_dim: int, k_offset: float, v_offset: float):
    generator = torch.Generator().manual_seed(seed)

    def draw(offset: float) -> torch.Tensor:
        x = torch.randn(heads, seq, head_dim, generator=generator)
        if offset:
            x = x + offset * torch.randn(heads, 1, head_dim, generator=generator)
        return x.to(torch.bfloat16).float()

    q = draw(0.0)
    return q, draw(k_offset), draw(v_offset)


def check_against_fastdit_reference(q, k, v, ours: torch.Tensor) -> float:
    """Relative L1 between this model of the shipped mode and fastdit's own tile-by-tile reference
    (the kernel tests compare the Triton kernel with that one): the model is the kernel."""
    qb, kb, vb = (x.to(torch.bfloat16)[None] for x in (q, k, v))
    quantized = quantize_qk_reference(qb, kb, q_block_size=TILE, kv_block_size=TILE,
                                      scale=q.shape[-1] ** -0.5, layout="bhsd")
    quantized_v = quantize_v_fp8_reference(vb, layout="bhsd")
    plan = BlockSparsity.dense(q.shape[1], k.shape[1], TILE)
    reference, _ = int8_fp8_attention_reference(quantized, quantized_v, plan, dtype=torch.bfloat16,
                                                layout="bhsd")
    return metrics(ours, reference[0].float())[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096, help="tokens (a multiple of 128)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="S=512, 2 heads, 1 seed")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq, args.heads, args.seeds = 512, 2, 1
    if args.seq % TILE or args.seq <= 0:
        parser.error(f"--seq must be a positive multiple of {TILE}, got {args.seq}")
    if args.heads < 1 or args.seeds < 1 or args.head_dim < 16:
        parser.error(f"--heads and --seeds must be >= 1, --head-dim >= 16, got {args.heads}, "
                     f"{args.seeds}, {args.head_dim}")
    start = time.perf_counter()
    models = {"bf16 kernel vs exact fp64": None, **SOURCES, **VARIANTS}
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    fastdit_check = []
    for case, (k_offset, v_offset) in CASES.items():
        for seed in range(args.seeds):
            q, k, v = make_inputs(seed, args.seq, args.heads, args.head_dim, k_offset, v_offset)
            baseline = attend(q, k, v, Model())
            for name, model in models.items():
                if model is None:  # the baseline's own error against exact attention
                    logits = q.double() @ k.double().transpose(1, 2) * args.head_dim**-0.5
                    exact = torch.softmax(logits, -1) @ v.double()
                    cells.setdefault((name, case), []).append(metrics(baseline, exact))
                    continue
                out = run_model(q, k, v, model)
                cells.setdefault((name, case), []).append(metrics(out, baseline))
                if model == SHIPPED and seed == 0:
                    fastdit_check.append(check_against_fastdit_reference(q, k, v, out))
    rows = []
    header = (f"{'source':<34}" + "".join(f"{case + ' rel L1 (max)':>26}" for case in CASES)
              + f"{'unit cosine':>13}")
    lines = [f"int8-fp8 error budget: S={args.seq}, {args.heads} heads x {args.head_dim}, "
             f"{args.seeds} seed(s); relative L1 to the bf16 kernel model (mean over seeds)", header]
    for name, model in models.items():
        row = dict(source=name, model=asdict(model) if model else None)
        text = f"{name:<34}"
        for case in CASES:
            values = cells[(name, case)]
            l1 = [v[0] for v in values]
            row[case] = dict(rel_l1=sum(l1) / len(l1), rel_l1_max=max(l1),
                             cosine=sum(v[1] for v in values) / len(values))
            text += f"{row[case]['rel_l1']:>17.4f} ({row[case]['rel_l1_max']:.4f})"
        text += f"{row['unit']['cosine']:>13.6f}"
        rows.append(row)
        lines.append(text)
        if name == "all (int8-fp8 as shipped)" or name == "bf16 kernel vs exact fp64":
            lines.append("-" * len(header))
    check = max(fastdit_check)
    lines.append(f"model of the shipped mode vs fastdit's int8_fp8_attention_reference: rel L1 "
                 f"{check:.2e} (bf16 output rounding and fp32 summation order)")
    # sqrt of the sum of squares of the three sources alone, against all together: how
    # independent the sources are.
    for case in CASES:
        parts = [rows[i][case]["rel_l1"] for i in (1, 2, 3)]
        lines.append(f"{case}: sqrt(INT8^2 + P^2 + V^2) = {math.sqrt(sum(x * x for x in parts)):.4f},"
                     f" measured together {rows[5][case]['rel_l1']:.4f}")
    elapsed = round(time.perf_counter() - start, 1)
    print("\n".join(lines))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{device_slug(None)}{'-smoke' if args.smoke else ''}_{datetime.date.today().isoformat()}"
    path = out_dir / f"fp8_error_budget_{name}.json"
    cases = {case: dict(k_offset=k_off, v_offset=v_off) for case, (k_off, v_off) in CASES.items()}
    atomic_write_text(path, json.dumps(dict(seq=args.seq, heads=args.heads, head_dim=args.head_dim,
                                    seeds=args.seeds, cases=cases, rows=rows,
                                    fastdit_reference_check=check, elapsed_s=elapsed, table=lines),
                               indent=1))
    print(f"elapsed {elapsed} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
