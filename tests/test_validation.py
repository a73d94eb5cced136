"""Bad input to the public kernel entry points gets an error naming the constraint and the value;
the CPU path users get without the Triton interpreter computes the right numbers."""

import math
import re

import pytest
import torch

from fastdit.kernels import (
    BlockSparsity,
    block_mass,
    block_mean_pool,
    block_sparse_attention,
    choose_backend,
    explain_backends,
)

B, S, H, D = 2, 200, 2, 64  # S = 200: two blocks of 128, the last one ragged


def make(rng, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=rng).to(dtype)


@pytest.fixture
def qkv(rng):
    return make(rng, B, S, H, D), make(rng, B, S, H, D), make(rng, B, S, H, D)


@pytest.fixture
def plan():
    return BlockSparsity.dense(S, S)


@pytest.fixture
def lse(rng):
    return make(rng, B, H, S)


# ---------------------------------------------------------------------- shared by q/k entry points
def call_attention(q, k, v, plan, lse, **kwargs):
    return block_sparse_attention(q, k, v, plan, **kwargs)


def call_mass(q, k, v, plan, lse, **kwargs):
    return block_mass(q, k, lse, plan, **kwargs)


QK_ENTRY_POINTS = pytest.mark.parametrize(
    "call", [call_attention, call_mass], ids=["attention", "mass"]
)


@QK_ENTRY_POINTS
def test_three_dim_q(call, qkv, plan, lse):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q must be 4-D.*\(2, 200, 128\)"):
        call(q.flatten(2), k, v, plan, lse)


@QK_ENTRY_POINTS
def test_int_dtype(call, qkv, plan, lse):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q dtype must be one of fp16, bf16, fp32, got .*int32"):
        call(q.to(torch.int32), k, v, plan, lse)
    with pytest.raises(TypeError, match=r"k dtype .* got torch\.float64"):
        call(q, k.double(), v, plan, lse)


@QK_ENTRY_POINTS
def test_qk_dtype_mismatch(call, qkv, plan, lse):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"share dtype.*q torch\.float16.*k torch\.float32"):
        call(q.half(), k, v, plan, lse)


@QK_ENTRY_POINTS
def test_qk_head_mismatch(call, qkv, plan, lse):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"agree on batch, heads and head_dim.*\(2, 200, 3, 64\)"):
        call(q, torch.cat([k, k[:, :, :1]], 2), v, plan, lse)


@QK_ENTRY_POINTS
def test_head_dim_too_large(call, rng, plan, lse):
    q = make(rng, B, S, H, 320)
    with pytest.raises(ValueError, match=r"head_dim must be <= 256, got 320"):
        call(q, q, q, plan, lse)


@QK_ENTRY_POINTS
def test_bad_layout(call, qkv, plan, lse):
    with pytest.raises(ValueError, match=r"layout must be one of \('bshd', 'bhsd'\), got 'bsdh'"):
        call(*qkv, plan, lse, layout="bsdh")


@QK_ENTRY_POINTS
@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_scale(call, qkv, plan, lse, scale):
    pattern = rf"scale must be a positive finite number, got scale={re.escape(str(scale))}"
    with pytest.raises(ValueError, match=pattern):
        call(*qkv, plan, lse, scale=scale)


@QK_ENTRY_POINTS
def test_key_padding_float(call, qkv, plan, lse):
    with pytest.raises(TypeError, match=r"key_padding must be an integer tensor.*torch\.float32"):
        call(*qkv, plan, lse, key_padding=torch.full((B,), float(S)))
    with pytest.raises(TypeError, match=r"key_padding.*torch\.bool"):
        call(*qkv, plan, lse, key_padding=torch.ones(B, dtype=torch.bool))


@QK_ENTRY_POINTS
def test_key_padding_wrong_shape(call, qkv, plan, lse):
    with pytest.raises(ValueError, match=r"key_padding must have shape \[B\]=\(2,\), got \(3,\)"):
        call(*qkv, plan, lse, key_padding=torch.full((B + 1,), S))


@QK_ENTRY_POINTS
def test_plan_wrong_query_blocks(call, qkv, lse):
    plan = BlockSparsity.dense(300, S)  # 3 query blocks; S = 200 needs 2
    pattern = r"plan has 3 query blocks x 2 key blocks.*ceil\(200/128\)=2 x ceil\(200/128\)=2"
    with pytest.raises(ValueError, match=pattern):
        call(*qkv, plan, lse)
    plan64 = BlockSparsity.dense(S, S, block_size=64)  # 4 x 4 blocks
    with pytest.raises(ValueError, match=r"ceil\(200/128\)=2"):
        call(*qkv, BlockSparsity(plan64.kv_counts, plan64.kv_indices, 128, 64, 4), lse)


@QK_ENTRY_POINTS
def test_plan_batch_mismatch(call, qkv, lse):
    block_map = torch.ones(3, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"plan covers batch=3, heads=1.*batch=2, heads=2"):
        call(*qkv, BlockSparsity.from_block_map(block_map), lse)
    block_map = torch.ones(1, 4, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"plan covers batch=1, heads=4"):
        call(*qkv, BlockSparsity.from_block_map(block_map), lse)


@QK_ENTRY_POINTS
def test_plan_not_a_plan(call, qkv, lse):
    with pytest.raises(TypeError, match=r"plan must be a fastdit.kernels.BlockSparsity, got dict"):
        call(*qkv, {}, lse)


@QK_ENTRY_POINTS
def test_unknown_backend(call, qkv, plan, lse):
    pattern = r"backend must be one of \['flash4', 'triton', 'reference'\], got 'cuda-magic'"
    with pytest.raises(ValueError, match=pattern):
        call(*qkv, plan, lse, backend="cuda-magic")


@QK_ENTRY_POINTS
def test_triton_forced_without_interpreter(call, qkv, plan, lse, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pattern = r"backend 'triton' cannot run: .*CPU.*TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=pattern):
        call(*qkv, plan, lse, backend="triton")


# ---------------------------------------------------------------------- per entry point
def test_attention_v_mismatch(qkv, plan):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"v must match k's shape.*\(2, 199, 2, 64\)"):
        block_sparse_attention(q, k, v[:, :-1], plan)
    with pytest.raises(ValueError, match=r"v must match.*torch\.float16"):
        block_sparse_attention(q, k, v.half(), plan)
    with pytest.raises(ValueError, match=r"v must be 4-D"):
        block_sparse_attention(q, k, v[0], plan)


def test_attention_not_a_tensor(qkv, plan):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor, got list"):
        block_sparse_attention(q.tolist(), k, v, plan)


def test_block_mass_lse_shape(qkv, plan, lse):
    q, k, _ = qkv
    pattern = r"lse must be a \[B, H, S_q\]=\(2, 2, 200\) tensor, got \(2, 200, 2\)"
    with pytest.raises(ValueError, match=pattern):
        block_mass(q, k, lse.transpose(1, 2), plan)
    with pytest.raises(ValueError, match=r"\(2, 2, 200\).*got \(2, 2, 199\)"):
        block_mass(q, k, lse[..., :-1], plan)


def test_block_mass_default_plan_block_size(qkv, lse):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=r"got 96"):
        block_mass(q, k, lse, block_size=96)


@pytest.mark.parametrize("block_size", [0, -3])
def test_block_mean_pool_block_size(rng, block_size):
    x = make(rng, B, S, H, D)
    pattern = rf"block_size must be a positive int, got {block_size}\b"
    with pytest.raises(ValueError, match=pattern):
        block_mean_pool(x, block_size)
    with pytest.raises(ValueError, match=r"block_size must be a positive int, got 64\.0"):
        block_mean_pool(x, 64.0)


def test_block_mean_pool_bad_inputs(rng, monkeypatch):
    x = make(rng, B, S, H, D)
    with pytest.raises(ValueError, match=r"layout must be one of .*got 'bsdh'"):
        block_mean_pool(x, 64, layout="bsdh")
    with pytest.raises(ValueError, match=r"x must be 4-D.*\(2, 200, 128\)"):
        block_mean_pool(x.flatten(2), 64)
    with pytest.raises(TypeError, match=r"x dtype .* got torch\.int64"):
        block_mean_pool(x.long(), 64)
    with pytest.raises(ValueError, match=r"got 'cuda-magic'"):
        block_mean_pool(x, 64, backend="cuda-magic")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run: .*TRITON_INTERPRET=1"):
        block_mean_pool(x, 64, backend="triton")


# ---------------------------------------------------------------------- backend choice on the CPU
def test_explain_backends_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = explain_backends("cpu")
    assert list(reasons) == ["flash4", "triton", "reference"]
    assert "CUDA" in reasons["flash4"]
    assert isinstance(reasons["triton"], str) and "TRITON_INTERPRET=1" in reasons["triton"]
    assert reasons["reference"] is None
    monkeypatch.setenv("TRITON_INTERPRET", "")
    assert isinstance(explain_backends("cpu")["triton"], str)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert explain_backends("cpu") == {
        "flash4": "needs a CUDA device, got cpu", "triton": None, "reference": None
    }
    assert explain_backends(torch.device("cpu"), torch.float16, 64)["triton"] is None
    assert "320" in explain_backends("cpu", head_dim=320)["triton"]
    assert "320" in explain_backends("cpu", head_dim=320)["reference"]  # no backend claims it


def brute_force(q, k, v, block_map, block_size, scale):
    """fp64 softmax over a kron-expanded token mask, (B, S, H, D) in and out."""
    q, k, v = (x.transpose(1, 2).double() for x in (q, k, v))
    ones = torch.ones(block_size, block_size, dtype=torch.int32)
    mask = torch.stack(
        [torch.stack([torch.kron(m.int(), ones) for m in per_b]) for per_b in block_map]
    )
    mask = mask[:, :, : q.shape[2], : k.shape[2]].bool()
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_without_interpreter(rng, monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    seq_q, seq_kv, heads, head_dim, block = 150, 230, 3, 32, 64
    q = make(rng, 2, seq_q, heads, head_dim, dtype=dtype)
    k, v = (make(rng, 2, seq_kv, heads, head_dim, dtype=dtype) for _ in range(2))
    num_q, num_kv = math.ceil(seq_q / block), math.ceil(seq_kv / block)
    block_map = torch.rand(2, heads, num_q, num_kv, generator=rng) < 0.5
    block_map[0, 0, 0] = False  # one query block sees nothing: zeros and -inf
    block_map[1, :, :, -1] = True  # the ragged last key block
    plan = BlockSparsity.from_block_map(block_map, block)
    scale = 0.8 / math.sqrt(head_dim)

    assert choose_backend(torch.device("cpu"), dtype, head_dim) == "reference"
    out, lse = block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True)
    ref_out, ref_lse = block_sparse_attention(
        q, k, v, plan, scale=scale, return_lse=True, backend="reference"
    )
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    brute_out, brute_lse = brute_force(q, k, v, block_map, block, scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (2, heads, seq_q)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - brute_out).abs().max() <= tol
    assert torch.equal(torch.isneginf(lse), torch.isneginf(brute_lse))
    assert torch.all(out[0, :block, 0] == 0)
    finite = torch.isfinite(brute_lse)
    assert (lse.double()[finite] - brute_lse[finite]).abs().max() <= 1e-4

    mass = block_mass(q, k, lse, plan, scale=scale)
    # Each query row that sees a key has probabilities summing to 1 over the blocks it visits.
    rows_with_keys = torch.isfinite(lse).sum(-1).float()
    assert (mass.sum((-2, -1)) - rows_with_keys).abs().max() <= 1e-3 * seq_q
    assert torch.all(mass[~block_map.expand_as(mass)] == 0)
    pooled = block_mean_pool(q, block)
    expected = torch.stack([chunk.float().mean(1) for chunk in q.split(block, dim=1)], dim=2)
    assert pooled.shape == (2, heads, num_q, head_dim)
    assert torch.allclose(pooled, expected, atol=1e-5)
