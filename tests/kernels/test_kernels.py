"""Triton kernels (CPU interpreter) against the PyTorch reference and against brute force."""

import math

import pytest
import torch

from fastdit.kernels import BlockSparsity, block_mass, block_mean_pool, block_sparse_attention
from fastdit.kernels.reference import (
    attention_reference,
    block_mass_reference,
    block_mean_pool_reference,
)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Two units in the last place of the 16-bit output (bf16: 2 * 2**-8, fp16: 2 * 2**-11).
RELATIVE_TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def random_qkv(rng, batch, seq_q, seq_kv, heads, head_dim, dtype, layout="bshd"):
    def make(seq):
        shape = (batch, seq, heads, head_dim) if layout == "bshd" else (batch, heads, seq, head_dim)
        return torch.randn(shape, generator=rng).to(dtype)

    return make(seq_q), make(seq_kv), make(seq_kv)


def random_block_map(rng, batch, heads, num_q, num_kv, density):
    return torch.rand(batch, heads, num_q, num_kv, generator=rng) < density


def brute_force_attention(q, k, v, block_map, block_size, scale, layout="bshd", key_lengths=None):
    """Independent of fastdit's reference: a token mask from kron-expanded blocks, fp64 softmax."""
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.double() for x in (q, k, v))
    seq_q, seq_kv = q.shape[2], k.shape[2]
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    ones = torch.ones(q_block, kv_block, dtype=torch.bool)
    token_mask = torch.stack(
        [torch.stack([torch.kron(bm_h.int(), ones.int()).bool() for bm_h in bm_b]) for bm_b in block_map]
    )[:, :, :seq_q, :seq_kv]
    if key_lengths is not None:
        token_mask = token_mask & (torch.arange(seq_kv)[None, :] < key_lengths[:, None])[:, None, None]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = probs @ v
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse


def assert_close(out, ref, dtype, what="output"):
    assert not out.isnan().any(), f"{what} has NaN"
    err = (out.double() - ref.double()).abs().max().item()
    if dtype == torch.float32:
        rel = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
        assert rel <= 1e-4, f"{what}: fp32 relative error {rel:.2e} > 1e-4 (max abs {err:.2e})"
    else:
        # 16-bit outputs and P are rounded relative to their size: |err| <= atol + rtol * |ref|.
        bound = TOLERANCE[dtype] + RELATIVE_TOLERANCE[dtype] * ref.double().abs()
        excess = ((out.double() - ref.double()).abs() - bound).max().item()
        assert excess <= 0, f"{what}: max abs error {err:.3e} exceeds {TOLERANCE[dtype]} + {RELATIVE_TOLERANCE[dtype]} * |ref| for {dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_attention_matches_reference_ragged_cross(rng, dtype, head_dim):
    # S = 1000 with block 128 (ragged last block), S_q != S_kv, batch 2, random density.
    seq_q, seq_kv, heads = 1000, 700, 2
    q, k, v = random_qkv(rng, 2, seq_q, seq_kv, heads, head_dim, dtype)
    density = float(torch.empty(1).uniform_(0.2, 0.9, generator=rng))
    block_map = random_block_map(rng, 2, heads, 8, 6, density)
    plan = BlockSparsity.from_block_map(block_map)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
    ref, ref_lse = attention_reference(q, k, v, plan, scale=head_dim**-0.5, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 1e-4 * max(1.0, ref_lse[finite].abs().max())


@pytest.mark.parametrize("density", [0.125, 0.25, 0.5, 1.0])
def test_attention_and_lse_match_brute_force(rng, density):
    seq, heads, head_dim = 520, 3, 64
    q, k, v = random_qkv(rng, 1, seq, seq, heads, head_dim, torch.float32)
    block_map = random_block_map(rng, 1, heads, 5, 5, density)
    block_map[..., 0] = True  # keep every row non-empty so LSE is finite everywhere
    plan = BlockSparsity.from_block_map(block_map)
    scale = 0.7 / math.sqrt(head_dim)
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True, backend="triton")
    ref, ref_lse = brute_force_attention(q, k, v, block_map, 128, scale)
    assert_close(out, ref, torch.float32)
    # LSE against torch.logsumexp of the masked scores.
    assert (lse.double() - ref_lse).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("block_size", [64, (128, 64), (64, 128)])
def test_layouts_and_block_sizes(rng, layout, block_size):
    seq_q, seq_kv, heads, head_dim = 300, 450, 2, 64
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    num_q, num_kv = math.ceil(seq_q / q_block), math.ceil(seq_kv / kv_block)
    q, k, v = random_qkv(rng, 2, seq_q, seq_kv, heads, head_dim, torch.float32, layout)
    block_map = random_block_map(rng, 1, heads, num_q, num_kv, 0.5)
    plan = BlockSparsity.from_block_map(block_map, block_size)
    out, lse = block_sparse_attention(q, k, v, plan, layout=layout, return_lse=True, backend="triton")
    ref, ref_lse = brute_force_attention(
        q, k, v, block_map.expand(2, -1, -1, -1), block_size, head_dim**-0.5, layout
    )
    assert out.shape == q.shape
    assert_close(out, ref, torch.float32)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= 1e-4


def test_rows_without_blocks_give_zeros_and_neg_inf_lse(rng):
    q, k, v = random_qkv(rng, 1, 256, 256, 2, 64, torch.bfloat16)
    block_map = random_block_map(rng, 1, 2, 2, 2, 0.7)
    block_map[0, 0, 1] = False  # head 0, query block 1 visits nothing
    block_map[0, 1, :, 0] = True  # every row of head 1 visits key block 0
    plan = BlockSparsity.from_block_map(block_map)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(out[0, 128:, 0] == 0)
    assert torch.all(torch.isneginf(lse[0, 0, 128:]))
    assert torch.isfinite(lse[0, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_padding(rng, dtype):
    # Batch element 0 keeps 700 of 700 keys; 1 keeps 333 (a key block straddles it, later blocks
    # are wholly padded); 2 keeps none (zeros and -inf).
    seq_q, seq_kv, heads, head_dim = 384, 700, 2, 64
    q, k, v = random_qkv(rng, 3, seq_q, seq_kv, heads, head_dim, dtype)
    key_lengths = torch.tensor([700, 333, 0])
    block_map = random_block_map(rng, 3, 1, 3, 6, 0.6)
    block_map[..., 0] = True
    plan = BlockSparsity.from_block_map(block_map)
    out, lse = block_sparse_attention(
        q, k, v, plan, return_lse=True, key_padding=key_lengths, backend="triton"
    )
    ref, ref_lse = brute_force_attention(
        q, k, v, block_map.expand(-1, heads, -1, -1), 128, head_dim**-0.5, key_lengths=key_lengths
    )
    assert_close(out, ref, dtype)
    assert torch.all(out[2] == 0) and torch.isneginf(lse[2]).all()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= 1e-3


@pytest.mark.parametrize("plan_batch,plan_heads", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_plan_broadcasting(rng, plan_batch, plan_heads):
    q, k, v = random_qkv(rng, 2, 256, 256, 3, 64, torch.float32)
    block_map = random_block_map(rng, plan_batch, plan_heads, 2, 2, 0.5)
    plan = BlockSparsity.from_block_map(block_map)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    ref, _ = brute_force_attention(q, k, v, block_map.expand(2, 3, -1, -1), 128, 64**-0.5)
    assert_close(out, ref, torch.float32)


def test_dense_plan_matches_sdpa(rng):
    q, k, v = random_qkv(rng, 2, 333, 333, 2, 128, torch.float32)
    plan = BlockSparsity.dense(333, 333)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v))
    ).transpose(1, 2)
    assert_close(out, ref, torch.float32)


def test_head_dim_256_and_non_power_of_two(rng):
    for head_dim in (48, 256):
        q, k, v = random_qkv(rng, 1, 200, 150, 1, head_dim, torch.float16)
        plan = BlockSparsity.dense(200, 150, block_size=64)
        out = block_sparse_attention(q, k, v, plan, backend="triton")
        ref, _ = attention_reference(q, k, v, plan, scale=head_dim**-0.5)
        assert_close(out, ref, torch.float16, f"head_dim={head_dim}")


def test_non_contiguous_inputs(rng):
    # q/k/v as views of one fused projection, as diffusers' fused QKV produces.
    qkv = torch.randn(1, 300, 3, 2, 64, generator=rng)
    q, k, v = qkv.unbind(2)
    block_map = random_block_map(rng, 1, 2, 3, 3, 0.6)
    plan = BlockSparsity.from_block_map(block_map)
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    ref, _ = brute_force_attention(q, k, v, block_map, 128, 64**-0.5)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_mass_matches_brute_force(rng, dtype):
    seq_q, seq_kv, heads, head_dim = 300, 260, 2, 64
    q, k, _ = random_qkv(rng, 2, seq_q, seq_kv, heads, head_dim, dtype)
    scale = head_dim**-0.5
    key_lengths = torch.tensor([260, 150])
    # LSE of the dense attention with the same key padding; mass rows then sum to 1.
    dense = BlockSparsity.dense(seq_q, seq_kv)
    _, lse = block_sparse_attention(q, k, k, dense, return_lse=True, key_padding=key_lengths, backend="reference")
    mass = block_mass(q, k, lse, key_padding=key_lengths, backend="triton")
    # Brute force: materialised probabilities summed per block.
    qf, kf = q.double().transpose(1, 2), k.double().transpose(1, 2)
    probs = torch.exp((qf @ kf.transpose(-1, -2)) * scale - lse.double()[..., None])
    probs = probs * (torch.arange(seq_kv)[None, :] < key_lengths[:, None])[:, None, None]
    pad_q, pad_kv = 3 * 128 - seq_q, 3 * 128 - seq_kv
    brute = torch.nn.functional.pad(probs, (0, pad_kv, 0, pad_q)).reshape(2, heads, 3, 128, 3, 128).sum((3, 5))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (mass.double() - brute).abs().max() <= tol * max(1.0, brute.abs().max().item())
    row_sums = mass.sum(-1).sum(-1)
    assert torch.allclose(row_sums.double(), torch.full_like(row_sums, seq_q).double(), rtol=1e-3)

    # With a sparse plan: visited blocks equal the dense mass, others are 0.
    block_map = random_block_map(rng, 1, heads, 3, 3, 0.5)
    plan = BlockSparsity.from_block_map(block_map)
    sparse_mass = block_mass(q, k, lse, plan, key_padding=key_lengths, backend="triton")
    expected = torch.where(block_map, brute, 0.0)
    assert (sparse_mass.double() - expected).abs().max() <= tol * max(1.0, brute.abs().max().item())
    reference = block_mass_reference(q, k, lse, plan, scale=scale, key_lengths=key_lengths)
    assert (reference.double() - expected).abs().max() <= 1e-4 * max(1.0, brute.abs().max().item())


def test_block_mass_cached_lse_rows_without_keys(rng):
    q, k, _ = random_qkv(rng, 1, 128, 128, 1, 64, torch.float32)
    lse = torch.randn(1, 1, 128, generator=rng) + 5.0  # a stale LSE from another step
    lse[0, 0, :10] = float("-inf")
    mass = block_mass(q, k, lse, backend="triton")
    probs = torch.exp((q[0, :, 0] @ k[0, :, 0].T) * 64**-0.5 - lse[0, 0, :, None])
    assert torch.isfinite(mass).all()
    assert torch.allclose(mass[0, 0, 0, 0], probs[10:].sum(), rtol=1e-4)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("block_size", [64, 100, 128])
def test_block_mean_pool(rng, layout, block_size):
    shape = (2, 333, 3, 96) if layout == "bshd" else (2, 3, 333, 96)
    x = torch.randn(shape, generator=rng).to(torch.bfloat16)
    pooled = block_mean_pool(x, block_size, layout=layout, backend="triton")
    xs = x.float() if layout == "bhsd" else x.float().transpose(1, 2)
    expected = torch.stack([chunk.mean(2) for chunk in xs.split(block_size, dim=2)], dim=2)
    assert pooled.dtype == torch.float32 and pooled.shape == expected.shape
    assert (pooled - expected).abs().max() <= 1e-5
    assert torch.allclose(block_mean_pool_reference(x, block_size, layout=layout), expected, atol=1e-5)


def brute_force_window(query_start, key_coords, window, dilation):
    """The WindowMask rule by explicit loops over token pairs (independent of fastdit's code)."""
    seq_q, seq_kv = query_start.shape[0], key_coords.shape[0]
    out = torch.zeros(seq_q, seq_kv, dtype=torch.bool)
    for i in range(seq_q):
        for j in range(seq_kv):
            if query_start[i, 0] < 0 or key_coords[j, 0] < 0:
                out[i, j] = True
                continue
            ok = True
            for d in range(3):
                delta = int(key_coords[j, d] - query_start[i, d])
                ok &= 0 <= delta < window[d] * dilation[d] and delta % dilation[d] == 0
            out[i, j] = ok
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dilated", [False, True], ids=["dilation-1", "dilated"])
def test_window_mask_partial_blocks_match_brute_force(rng, dtype, layout, dilated):
    # Without dilation the kernel skips the remainder test (WINDOW_DILATED=False): both paths.
    from fastdit.kernels import WindowMask

    seq_q, seq_kv, heads, block = 200, 150, 2, 64
    q, k, v = random_qkv(rng, 2, seq_q, seq_kv, heads, 64, dtype, layout)
    full = random_block_map(rng, 1, heads, 4, 3, 0.3)
    partial = random_block_map(rng, 1, heads, 4, 3, 0.6) & ~full
    window = tuple(int(x) for x in torch.randint(1, 4, (3,), generator=rng))
    dilation = (1, 1, 1)
    if dilated:  # 1 or 2 per dimension, at least one 2
        dilation = tuple(int(x) for x in torch.randint(1, 3, (3,), generator=rng))
        dilation = dilation if max(dilation) > 1 else (1, 2, 1)
    query_start = torch.randint(-1, 5, (seq_q, 3), generator=rng, dtype=torch.int32)
    key_coords = torch.randint(-1, 8, (seq_kv, 3), generator=rng, dtype=torch.int32)
    key_coords[:, 0] = torch.where(torch.rand(seq_kv, generator=rng) < 0.05, -1, key_coords[:, 0].clamp_min(0))
    query_start[:, 0] = torch.where(torch.rand(seq_q, generator=rng) < 0.05, -1, query_start[:, 0].clamp_min(0))
    mask = WindowMask(BlockSparsity.from_block_map(partial, block), query_start, key_coords, window, dilation)
    key_lengths = torch.tensor([150, 111], dtype=torch.int32)
    out, lse = block_sparse_attention(
        q, k, v, BlockSparsity.from_block_map(full, block), layout=layout, return_lse=True,
        key_padding=key_lengths, window_mask=mask, backend="triton",
    )
    # Brute force: per-token mask = full blocks | (partial blocks & rule), fp64 softmax.
    ones = torch.ones(block, block, dtype=torch.int32)
    expand = lambda m: torch.stack([torch.kron(m[0, h].int(), ones).bool()[:seq_q, :seq_kv] for h in range(heads)])
    rule = brute_force_window(query_start, key_coords, window, dilation)
    token_mask = expand(full) | (expand(partial) & rule)
    token_mask = token_mask[None] & (torch.arange(seq_kv)[None, :] < key_lengths[:, None])[:, None, None]
    qd, kd, vd = ((x.transpose(1, 2) if layout == "bshd" else x).double() for x in (q, k, v))
    scores = ((qd @ kd.transpose(-1, -2)) * 64**-0.5).masked_fill(~token_mask, float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ vd
    ref = ref.transpose(1, 2) if layout == "bshd" else ref
    assert_close(out, ref, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 2e-2
    # The reference path takes the same mask.
    ref_out = block_sparse_attention(
        q, k, v, BlockSparsity.from_block_map(full, block), layout=layout, key_padding=key_lengths,
        window_mask=mask, backend="reference",
    )
    assert_close(ref_out, ref, dtype)


def test_window_mask_takes_strided_coordinates_and_refuses_overlapping_blocks(rng):
    from fastdit.kernels import WindowMask

    seq, block = 130, 64
    q, k, v = random_qkv(rng, 1, seq, seq, 2, 32, torch.float32)
    starts = torch.randint(0, 3, (3, seq), generator=rng, dtype=torch.int32).t()  # a transposed view
    coords = torch.randint(0, 5, (3, seq), generator=rng, dtype=torch.int32).t()
    partial = BlockSparsity.from_block_map(torch.ones(1, 1, 3, 3, dtype=torch.bool), block)
    mask = WindowMask(partial, starts, coords, (2, 2, 3), (1, 1, 1))
    empty = BlockSparsity.from_block_map(torch.zeros(1, 1, 3, 3, dtype=torch.bool), block)
    out = block_sparse_attention(q, k, v, empty, window_mask=mask, backend="triton")
    ref = block_sparse_attention(q, k, v, empty, window_mask=mask, backend="reference")
    assert_close(out, ref, torch.float32)
    full = BlockSparsity.dense(seq, seq, block)
    with pytest.raises(ValueError, match="must not repeat a block of the plan"):
        block_sparse_attention(q, k, v, full, window_mask=mask)
