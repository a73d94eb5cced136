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
        # The same sampled mean (one function for both); the kernel's 127 / max|y| and the
        # reference's may round differently, which flips a rounding tie now and then.
        diff = (got.int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, name
    assert torch.equal(out.k_mean, ref.k_mean)
    assert torch.allclose(out.q_scale, ref.q_scale, rtol=1e-6, atol=0)
    assert torch.allclose(out.k_scale, ref.k_scale, rtol=1e-5, atol=1e-7)
    assert torch.allclose(out.lse_shift, ref.lse_shift, rtol=1e-4, atol=1e-4)  # Q . mu summed in another order
    assert not out.k[1, :, 150:].any(), "padded keys must be stored as 0"
    # The definition, independently: block scale = max|x| / 127 (Q with scale * log2(e)).
    q_bhsd = (q.transpose(1, 2) if layout == "bshd" else q).float()
    first = q_bhsd[0, 1, : block_size[0]].abs().max() / 127 * head_dim**-0.5 * math.log2(math.e)
    assert math.isclose(out.q_scale[0, 1, 0].item(), first.item(), rel_tol=1e-6)


def brute_force_sampled_mean(k_bhsd, length):
    """float64 ``[H, D]``: the mean of keys ``floor(j * L / 64)``, j < 64, of the first ``L`` rows
    (all of them when ``L < 64``, zeros when ``L == 0``), with ``L`` clamped to the sequence."""
    length = min(max(length, 0), k_bhsd.shape[1])
    if length == 0:
        return torch.zeros(k_bhsd.shape[0], k_bhsd.shape[2], dtype=torch.float64)
    rows = [math.floor(j * length / 64) for j in range(64)] if length >= 64 else list(range(length))
    assert len(set(rows)) == len(rows) and max(rows) < length
    return k_bhsd[:, rows].double().mean(1)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("seq_kv", [40, 64, 333])
def test_sampled_mean_without_key_lengths(rng, layout, seq_kv):
    # No key lengths: one gather of the same rows for every batch element (the fast path), the
    # same mean as with every length given, and the brute force's.
    from fastdit.kernels.quantized import sampled_key_mean

    shape = (2, seq_kv, 3, 16) if layout == "bshd" else (2, 3, seq_kv, 16)
    offset_shape = (3, 16) if layout == "bshd" else (3, 1, 16)
    k = make(rng, shape, torch.bfloat16, offset=5.0, offset_shape=offset_shape)
    mean = sampled_key_mean(k, layout, None)
    with_lengths = sampled_key_mean(k, layout, torch.tensor([seq_kv, seq_kv], dtype=torch.int32))
    k_bhsd = (k.transpose(1, 2) if layout == "bshd" else k).float()
    expected = torch.stack([brute_force_sampled_mean(k_bhsd[b], seq_kv) for b in range(2)])
    assert mean.shape == (2, 3, 16) and mean.dtype == torch.float32
    assert (mean.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.allclose(mean, with_lengths, rtol=1e-6, atol=1e-6)
    assert not sampled_key_mean(k, layout, None, smooth=False).any()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_stored_mean_is_the_sampled_mean(rng, layout, fp8):
    # The k_mean the quantization returns (and subtracted) against a float64 brute force
    # of the sampled mean, per batch element with ragged lengths (the full sequence, a length
    # that is not a multiple of 64, exactly 64, fewer than 64, none, more than the sequence) and
    # NaN past each length; Q's LSE shift uses that mean; every block subtracted that same mean
    # (dequantized keys + mean reconstruct the keys to within half a quantization step).
    from fastdit.kernels.triton.quantize import triton_quantize_qk

    seq_q, seq_kv, heads, head_dim = 70, 333, 2, 48
    lengths = [seq_kv, 150, 64, 40, 0, 1000]
    batch = len(lengths)
    shape = lambda s: (batch, s, heads, head_dim) if layout == "bshd" else (batch, heads, s, head_dim)  # noqa: E731
    q = make(rng, shape(seq_q), torch.float16)
    offset_shape = (heads, head_dim) if layout == "bshd" else (heads, 1, head_dim)
    k = make(rng, shape(seq_kv), torch.float16, offset=5.0, offset_shape=offset_shape)
    # A drifting key mean: the sample's mean differs from the full mean by more than rounding.
    drift = torch.linspace(-3, 3, seq_kv)[:, None, None] if layout == "bshd" else torch.linspace(-3, 3, seq_kv)[:, None]
    k = (k.float() + drift).half()
    for b, length in enumerate(lengths):
        (k[b, length:] if layout == "bshd" else k[b, :, length:]).fill_(float("nan"))
    key_lengths = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    out = triton_quantize_qk(q, k, q_block_size=64, kv_block_size=64, scale=scale, layout=layout,
                             key_lengths=key_lengths, lse_shift=True, fp8=fp8)
    k_bhsd = (k.transpose(1, 2) if layout == "bshd" else k).float()
    q_bhsd = (q.transpose(1, 2) if layout == "bshd" else q).double()
    expected = torch.stack([brute_force_sampled_mean(k_bhsd[b], n) for b, n in enumerate(lengths)])
    assert out.k_mean.dtype == torch.float32 and not out.k_mean.isnan().any()
    assert (out.k_mean.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not out.k_mean[4].any(), "no valid keys: mu = 0"
    full_mean = k_bhsd[1, :, :150].double().mean(1)
    assert (expected[1] - full_mean).abs().max() > 1e-2, "a sample, not the full mean"
    shift = scale * torch.einsum("bhsd,bhd->bhs", q_bhsd, expected)
    assert (out.lse_shift.double() - shift).abs().max() <= 1e-4 * max(1.0, shift.abs().max().item())
    blocks = torch.arange(seq_kv) // 64
    k_deq = out.k.float() * out.k_scale[:, :, blocks, None] + out.k_mean[:, :, None, :]
    for b, length in enumerate(lengths):
        n = min(length, seq_kv)
        assert not out.k[b, :, n:].float().any()
        if n:
            err = (k_deq[b, :, :n] - k_bhsd[b, :, :n]).abs() / out.k_scale[b, :, blocks[:n], None]
            # INT8: half a step; e4m3: half a step of its 3-bit mantissa at the top (32 apart).
            assert err.max() <= (0.5 if not fp8 else 16.0) + 1e-3, (b, err.max())


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
    # Each backend quantizes on its own here: a rounding tie that flips moves one int8 value by
    # one step. Over 800 seeded runs of this shape (with K's exact mean, summed in two orders)
    # that moved outputs by up to 0.016 and the LSE by up to 0.0048 (median 0.0006), so the LSE
    # bound is 1e-2. The exact comparison on shared INT8 inputs is
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


def test_int8_accuracy_with_drifting_key_mean(rng):
    # Keys whose mean is not stationary: the shared offset of 20 plus a ramp that moves the mean by
    # 4 standard deviations per channel from the first key to the last (2 * t * c, t in [-1, 1],
    # c ~ N(0, 1) per channel). Smoothing by the 64-key sample still meets issue 13's bound, and
    # costs nothing measurable against smoothing by the exact mean (over 40 seeded runs: relative
    # L1 at most 0.020, within 7% of the exact mean's; unsmoothed: about 0.13). The ramp makes
    # scores, and the LSE (up to ~100), larger: its gap reached 0.074, hence 0.15 here.
    from fastdit.kernels.reference import quantize_qk_reference

    q, k, v, plan = accuracy_case(rng, 20.0)
    seq, heads, head_dim = k.shape[1:]
    ramp = torch.linspace(-1, 1, seq)[:, None, None] * 2.0 * torch.randn(heads, head_dim, generator=rng)
    k = (k.float() + ramp).to(k.dtype)
    ref, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, quantize="int8")
    cosine, rel_l1 = cosine_and_rel_l1(out, ref)
    assert cosine >= 0.999 and rel_l1 <= 0.03, (cosine, rel_l1)
    assert lse_gap(lse, ref_lse) <= 0.15
    common = dict(q_block_size=128, kv_block_size=128, scale=head_dim**-0.5)
    sampled = quantize_qk_reference(q, k, **common)
    _, rel_l1_sampled = cosine_and_rel_l1(int8_attention_reference(sampled, v, plan)[0], ref)
    exact = quantize_qk_reference(q, k, k_mean=k.float().mean(1), **common)
    _, rel_l1_exact = cosine_and_rel_l1(int8_attention_reference(exact, v, plan)[0], ref)
    assert rel_l1_sampled <= 1.15 * rel_l1_exact, (rel_l1_sampled, rel_l1_exact)
    unsmoothed = quantize_qk_reference(q, k, smooth_k=False, **common)
    _, rel_l1_plain = cosine_and_rel_l1(int8_attention_reference(unsmoothed, v, plan)[0], ref)
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
