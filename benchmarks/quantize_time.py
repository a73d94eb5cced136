"""The quantization passes alone at Wan2.1-14B 720p (75,600 tokens x 40 heads x 128, bf16, bshd):
K's sampled mean (64 rows per head, :func:`fastdit.kernels.quantized.sampled_key_mean`) next to
the exact-mean reduction it replaced, and Q and K to INT8 and to e4m3 with the sampled mean
included (with and without key lengths). Medians of ``triton.testing.do_bench``. A quick check
that needs neither FA4 nor diffusers (``benchmarks/fp8_tune.py`` times the same passes beside
FA4 and the attention calls).

    python -m benchmarks.quantize_time          # an H200: ~20 s
"""

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("quantize_time times GPU launches: run it on a CUDA device", file=sys.stderr)
        return 2
    import triton
    import triton.testing as tt

    from fastdit.kernels.quantized import sampled_key_mean
    from fastdit.kernels.triton.quantize import triton_quantize_qk

    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    seq, heads = 75600, 40
    q, k = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([seq - 300], device="cuda", dtype=torch.int32)
    common = dict(q_block_size=128, kv_block_size=128, scale=128**-0.5, layout="bshd", lse_shift=False)
    cases = [
        ("K sampled mean (64 rows per head)", lambda: sampled_key_mean(k, "bshd", None)),
        ("K exact mean (the two-pass version's reduction)", lambda: k.sum(1, dtype=torch.float32) / seq),
        ("Q and K to INT8 (sampled mean included)",
         lambda: triton_quantize_qk(q, k, key_lengths=None, **common)),
        ("Q and K to INT8, key lengths (sampled mean included)",
         lambda: triton_quantize_qk(q, k, key_lengths=lengths, **common)),
        ("Q and K to e4m3 (sampled mean included)",
         lambda: triton_quantize_qk(q, k, key_lengths=None, fp8=True, **common)),
    ]
    for name, call in cases:
        call()
        torch.cuda.synchronize()
        print(f"{name}: {tt.do_bench(call, warmup=50, rep=300):.3f} ms (median)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
