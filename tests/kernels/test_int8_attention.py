"""INT8 attention (CPU interpreter): quantization and kernel against their PyTorch references, and
accuracy against the bf16 kernel (PARO's target: cosine >= 0.999, relative L1 <= 2%)."""

import math

import pytest
import torch

from fastdit.kernels import BlockSparsity, block_sparse_attention, quantize_qk_int8
from fastdit.kernels.triton.int8_attention import triton_int8_block_sparse_attention
from fastdit.kernels.reference import attention_reference, int8_attention_reference


def make(rng, shape, dtype, offset=0.0, offset_shape=None):
    x = torch.randn(shape, generator=rng)
    if offset:
        x = x + offset * torch.randn(offset_shape, generator=rng)
    return x.to(dtype)


def cosine_and_rel_l1(out, ref):
    a, b = out.double().flatten(), ref.double().flatten()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cosine, ((a - b).abs().sum() / b.abs().sum()).item()


def lse_gap(lse, ref_lse):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    return (lse[finite] - ref_lse[finite]).abs().max().item()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("block_size", [(128, 128), (64, 128)])
def test_quantization_matches_reference(rng, layout, block_size):
    # Ragged lengths, a large shared key offset, key padding with NaN past the valid length.
    batch, seq_q, seq_kv, heads, head_dim = 2, 200, 333, 2, 64
    shape = lambda s: (batch, s, heads, head_dim) if layout == "bshd" else (batch, heads, s, head_dim)  # noqa: E731
    offset_shape = (heads, head_dim) if layout == "bshd" else (heads, 1, head_dim)
    q = make(rng, shape(seq_q), torch.bfloat16)
    k = make(rng, shape(seq_kv), torch.bfloat16, offset=6.0, offset_shape=offset_shape)
    lengths = torch.tensor([seq_kv, 150], dtype=torch.int32)
    if layout == "bshd":
        k[1, 150:] = float("nan")
    else:
        k[1, :, 150:] = float("nan")
    kwargs = dict(block_size=block_size, layout=layout, key_padding=lengths, lse_shift=True)
    out = quantize_qk_int8(q, k, backend="triton", **kwargs)
    ref = quantize_qk_int8(q, k, backend="reference", **kwargs)
    for name in ("q", "k"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.int8 and got.shape == want.shape and got.is_contiguous()
        # Identical up to a rounding tie flipped by summation order in K's mean.
        diff = (got.int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, name
    assert torch.allclose(out.k_mean, ref.k_mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.q_scale, ref.q_scale, rtol=1e-6, atol=0)
    assert torch.allclose(out.k_scale, ref.k_scale, rtol=1e-5, atol=1e-7)
    assert torch.allclose(out.lse_shift, ref.lse_shift, rtol=1e-4, atol=1e-4)
    assert not out.k[1, :, 150:].any(), "padded keys must be stored as 0"
    # The definition, independently: block scale = max|x| / 127 (Q with scale * log2(e)).
    q_bhsd = (q.transpose(1, 2) if layout == "bshd" else q).float()
    first = q_bhsd[0, 1, : block_size[0]].abs().max() / 127 * head_dim**-0.5 * math.log2(math.e)
    assert math.isclose(out.q_scale[0, 1, 0].item(), first.item(), rel_tol=1e-6)
    valid_k = (k.transpose(1, 2) if layout == "bshd" else k).float()[1, 0, :150]
    assert torch.allclose(out.k_mean[1, 0], valid_k.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_int8_kernel_matches_reference(rng, dtype, head_dim):
    # Same quantized inputs to both: the kernel (MMA, online softmax, P in 16 bits) against the
    # fp32 reference. Ragged cross attention, batch 2 with per-batch-and-head random plans,
    # key padding, and query blocks that visit no key block.
    batch, seq_q, seq_kv, heads = 2, 300, 200, 2
    q = make(rng, (batch, seq_q, heads, head_dim), dtype)
    k = make(rng, (batch, seq_kv, heads, head_dim), dtype, offset=3.0, offset_shape=(head_dim,))
    v = make(rng, (batch, seq_kv, heads, head_dim), dtype)
    block_map = torch.rand(batch, heads, 3, 2, generator=rng) < 0.6
    block_map[0, 0, 1] = False  # an empty row: output 0, LSE -inf
    plan = BlockSparsity.from_block_map(block_map)
    lengths = torch.tensor([seq_kv, 77], dtype=torch.int32)
    quantized = quantize_qk_int8(
        q, k, key_padding=lengths, lse_shift=True, backend="reference"
    )
    out, lse = triton_int8_block_sparse_attention(
        quantized, v, plan, layout="bshd", return_lse=True, key_lengths=lengths, interpret=True
    )
    ref, ref_lse = int8_attention_reference(
        quantized, v, plan, layout="bshd", return_lse=True, key_lengths=lengths
    )
    assert out.dtype == dtype and out.shape == q.shape and not out.isnan().any()
    assert (out.double() - ref.double()).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 5e-3)
    assert lse_gap(lse, ref_lse) <= 1e-4 * max(1.0, ref_lse[torch.isfinite(ref_lse)].abs().max())
    assert torch.equal(out[0, 128:256, 0], torch.zeros_like(out[0, 128:256, 0]))


def test_int8_scores_exact_at_the_int32_bound(rng):
    # The kernel turns int32 scores into fp32 by a magic-number add, exact for |s| < 2**22. At
    # head_dim 256 the int8 dot reaches 127 * 127 * 256 = 4,129,024 (just below 2**22): keys of all
    # +127, all -127 and random int8 rows, queries of all +127 (or -127); the LSE, with a scale
    # that keeps scores moderate, must match the exact float64 computation.
    from fastdit.kernels.quantized import QuantizedQK

    seq, head_dim = 64, 256
    k = torch.randint(-127, 128, (1, 1, seq, head_dim), generator=rng, dtype=torch.int8)
    k[0, 0, 0], k[0, 0, 1] = 127, -127
    q = torch.full((1, 1, seq, head_dim), 127, dtype=torch.int8)
    q[0, 0, seq // 2 :] = -127
    q_scale = torch.full((1, 1, 1), 3e-6, dtype=torch.float32)  # log2 units
    k_scale = torch.ones((1, 1, 1), dtype=torch.float32)
    quantized = QuantizedQK(q, q_scale, k, k_scale, torch.zeros(1, 1, head_dim), torch.zeros(1, 1, seq),
                            seq, seq, 1.0)
    v = make(rng, (1, seq, 1, head_dim), torch.float16)
    plan = BlockSparsity.dense(seq, seq, block_size=seq)
    _, lse = triton_int8_block_sparse_attention(
        quantized, v, plan, layout="bshd", return_lse=True, key_lengths=None, interpret=True
    )
    scores = q[0, 0].double() @ k[0, 0].double().T  # exact integers
    assert scores.abs().max() == 127 * 127 * 256
    expected = torch.logsumexp(scores * 3e-6 * math.log(2), dim=-1)
    assert torch.allclose(lse[0, 0].double(), expected, rtol=0, atol=1e-4), (lse[0, 0] - expected).abs().max()


def test_int8_bhsd_layout_and_block_64(rng):
    batch, seq, heads, head_dim = 1, 190, 2, 64
    q, k, v = (make(rng, (batch, heads, seq, head_dim), torch.bfloat16) for _ in range(3))
    plan = BlockSparsity.from_block_map(torch.rand(1, heads, 3, 3, generator=rng) < 0.7, 64)
    out, lse = block_sparse_attention(q, k, v, plan, layout="bhsd", quantize="int8", return_lse=True)
    ref, ref_lse = block_sparse_attention(
        q, k, v, plan, layout="bhsd", quantize="int8", return_lse=True, backend="reference"
    )
    # Each backend quantizes on its own here: a rounding tie that flips (K's mean summed in
    # another order) moves one int8 value by one step. Over 800 seeded runs of this shape that
    # moved outputs by up to 0.016 and the LSE by up to 0.0048 (median 0.0006), so the LSE bound
    # is 1e-2, not the 5e-3 it was. The exact comparison on shared INT8 inputs is
    # test_int8_kernel_matches_reference.
    assert (out.double() - ref.double()).abs().max() <= 3e-2
    assert lse_gap(lse, ref_lse) <= 1e-2


def accuracy_case(rng, offset):
    """The quantized kernels' accuracy inputs: unit-variance bf16 Q, K, V (B=1, S=384, H=2, D=128),
    K with a per-head offset of ``offset``, a random 3x3 block plan with its diagonal kept."""
    batch, seq, heads, head_dim = 1, 384, 2, 128
    q = make(rng, (batch, seq, heads, head_dim), torch.bfloat16)
    k = make(rng, (batch, seq, heads, head_dim), torch.bfloat16, offset, (heads, head_dim))
    v = make(rng, (batch, seq, heads, head_dim), torch.bfloat16)
    plan = BlockSparsity.from_block_map(torch.rand(1, heads, 3, 3, generator=rng) < 0.75)
    plan = BlockSparsity.from_block_map(plan.to_block_map() | torch.eye(3, dtype=torch.bool))
    return q, k, v, plan


@pytest.mark.parametrize("offset", [0.0, 20.0], ids=["unit", "offset20"])
def test_int8_accuracy_against_bf16_kernel(rng, offset):
    # PARO's acceptance: cosine >= 0.999 and relative L1 <= 2% to the bf16 kernel at the same
    # plan, on unit-variance inputs and on keys sharing a large per-head offset, where smoothing
    # is what keeps the INT8 range for the part of K that matters.
    q, k, v, plan = accuracy_case(rng, offset)
    ref, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, quantize="int8")
    cosine, rel_l1 = cosine_and_rel_l1(out, ref)
    assert cosine >= 0.999 and rel_l1 <= 0.02, (cosine, rel_l1)
    # LSE corrected for the smoothing: without lse_shift it would be off by scale * q . mean.
    assert lse_gap(lse, ref_lse) <= 0.05
    if offset:
        unsmoothed = quantize_qk_int8(q, k, smooth_k=False, backend="reference")
        plain, _ = int8_attention_reference(unsmoothed, v, plan)
        _, rel_l1_plain = cosine_and_rel_l1(plain, ref)
        assert rel_l1_plain > 3 * rel_l1, (rel_l1_plain, rel_l1)


def test_int8_reference_backend_is_the_cpu_fallback(rng):
    q, k, v = (make(rng, (1, 130, 2, 32), torch.float16) for _ in range(3))
    plan = BlockSparsity.dense(130, 130)
    out = block_sparse_attention(q, k, v, plan, quantize="int8", backend="reference")
    exact, _ = attention_reference(q, k, v, plan, scale=32**-0.5)
    cosine, rel_l1 = cosine_and_rel_l1(out, exact)
    assert cosine >= 0.999 and rel_l1 <= 0.02


def test_int8_validation(rng):
    q = make(rng, (1, 64, 1, 32), torch.float32)
    plan = BlockSparsity.dense(64, 64)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        block_sparse_attention(q, q, q, plan, quantize="int8")
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        block_sparse_attention(q.half(), q.half(), q.half(), plan, quantize="int4")
    with pytest.raises(TypeError, match="fp16 or bf16"):
        quantize_qk_int8(q, q)
