"""Backends behind one interface: the registry and its reasons, the plan-to-FA4 conversion against
a pure-PyTorch model of FA4's block-sparse contract, and the custom ops under torch.compile."""

import math

import pytest
import torch

import fastdit.kernels as kernels
from fastdit.kernels import (
    Backend,
    BlockSparsity,
    block_mass,
    block_mean_pool,
    block_sparse_attention,
    explain_backends,
    quantize_qk_int8,
    register_backend,
    segment_mean_pool,
)
from fastdit.kernels.backend import Request, backends, explain_calls, unregister_backend
from fastdit.kernels.flash4 import flash4_block_sparse_tensors
from fastdit.kernels.reference import attention_reference


# --------------------------------------------------------------------------- FA4's contract
def flash4_contract(q, k, v, tensors, block_size, scale, seqused_k=None):
    """What FA4's block-sparse forward computes, as read in flash_attn/cute (sm90): per (batch,
    head, query block) it visits the listed mask blocks and full blocks (first ``cnt`` entries of
    each list, ascending), and bounds-masks keys at or past the batch element's length ONLY in
    the first block it visits: the last listed one. Other listed blocks are computed whole. A row
    with no block gives zeros and LSE -inf. Layout (B, S, H, D), fp64."""
    q_block, kv_block = block_size
    batch, seq_q, heads, _ = q.shape
    seq_kv = k.shape[1]
    lengths = seqused_k.tolist() if seqused_k is not None else [seq_kv] * batch

    def row(t, b, h, m):
        return t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0, m]

    out = torch.zeros(batch, seq_q, heads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, heads, seq_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for m in range(math.ceil(seq_q / q_block)):
                listed = []
                for kind in ("mask", "full"):
                    count = int(row(tensors[f"{kind}_block_cnt"], b, h, m))
                    listed += [int(j) for j in row(tensors[f"{kind}_block_idx"], b, h, m)[:count]]
                if not listed:
                    continue
                assert listed == sorted(set(listed)), "FA4 needs ascending, unique lists"
                masked_block = listed[-1]
                keys = []
                for j in listed:
                    span = range(j * kv_block, min((j + 1) * kv_block, seq_kv))
                    keys += [t for t in span if j != masked_block or t < lengths[b]]
                rows = slice(m * q_block, min((m + 1) * q_block, seq_q))
                qs, ks, vs = q[b, rows, h].double(), k[b, keys, h].double(), v[b, keys, h].double()
                scores = qs @ ks.T * scale
                lse[b, h, rows] = torch.logsumexp(scores, -1)
                out[b, rows, h] = torch.softmax(scores, -1) @ vs
    return out, lse


@pytest.mark.parametrize("broadcast", [False, True])
def test_flash4_conversion_matches_the_reference(rng, broadcast):
    batch, heads, seq_q, seq_kv, head_dim, block = 2, 3, 300, 333, 16, 128
    q = torch.randn(batch, seq_q, heads, head_dim, generator=rng)
    k, v = (torch.randn(batch, seq_kv, heads, head_dim, generator=rng) for _ in range(2))
    num_q, num_kv = math.ceil(seq_q / block), math.ceil(seq_kv / block)
    map_shape = (1, 1) if broadcast else (batch, heads)
    block_map = torch.rand(*map_shape, num_q, num_kv, generator=rng) < 0.6
    block_map[..., 0, -1] = True  # the ragged last key block
    block_map[0, 0, 1] = False  # a query block that sees nothing
    plan = BlockSparsity.from_block_map(block_map, block)
    # Valid key lengths: one inside the ragged block, one that cuts a full block in two.
    key_lengths = torch.tensor([seq_kv - 20, int(torch.randint(1, 2 * block, (1,), generator=rng))],
                               dtype=torch.int32)
    scale = 0.7 / math.sqrt(head_dim)
    for lengths in (None, key_lengths):
        tensors = flash4_block_sparse_tensors(plan, batch, lengths)
        got, got_lse = flash4_contract(q, k, v, tensors, (block, block), scale, lengths)
        ref, ref_lse = attention_reference(
            q, k, v, plan, scale=scale, return_lse=True, key_lengths=lengths
        )
        torch.testing.assert_close(got.float(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse.float(), ref_lse, atol=1e-5, rtol=1e-5)


def test_flash4_conversion_passes_the_plan_through(rng):
    block_map = torch.rand(1, 2, 3, 4, generator=rng) < 0.5
    plan = BlockSparsity.from_block_map(block_map, 128)
    tensors = flash4_block_sparse_tensors(plan, batch=2)
    assert tensors["full_block_cnt"] is plan.kv_counts and tensors["full_block_idx"] is plan.kv_indices
    assert not tensors["mask_block_cnt"].any() and tensors["mask_block_idx"].shape == (1, 2, 3, 1)
    assert all(t.dtype == torch.int32 for t in tensors.values())


# --------------------------------------------------------------------------- registry
def test_reasons_name_the_constraint():
    cpu = torch.device("cpu")
    calls = explain_calls(cpu)
    assert all(list(r) == ["flash4", "triton", "reference"] for r in calls.values())
    assert "does not implement block_mass" in calls["block mass"]["flash4"]
    flash4 = kernels.backend.get_backend("flash4")
    if not torch.cuda.is_available():
        assert flash4.cannot_run(Request("attention", cpu, torch.bfloat16, 128)) == (
            "needs a CUDA device, got cpu"
        )
    reasons = explain_backends("cpu", torch.float32, 300)
    assert all("head_dim must be in [1, 256], got 300" == r for r in reasons.values())


class CountingBackend(Backend):
    """A third-party backend in a few lines: the reference's math, counting its calls."""

    name = "counting"
    priority = 5
    operations = ("attention",)

    def __init__(self):
        self.calls = 0

    def why_not(self, request):
        return None if request.device.type == "cpu" else "CPU only"

    def attention(self, q, k, v, plan, **kwargs):
        self.calls += 1
        kwargs.pop("dense"), kwargs.pop("quantize")
        return attention_reference(q, k, v, plan, **kwargs)


def test_a_registered_backend_runs_first_and_can_be_removed(rng):
    counting = register_backend(CountingBackend())
    try:
        assert [b.name for b in backends()][:2] == ["counting", "flash4"]
        q, k, v = (torch.randn(1, 70, 2, 16, generator=rng) for _ in range(3))
        plan = BlockSparsity.dense(70, 70, 64)
        out = block_sparse_attention(q, k, v, plan)
        assert counting.calls == 1
        ref = block_sparse_attention(q, k, v, plan, backend="reference")
        torch.testing.assert_close(out, ref)
        with pytest.raises(RuntimeError, match="backend 'counting' cannot run: .*does not implement block_mass"):
            block_mass(q, k, torch.zeros(1, 2, 70), plan, block_size=64, backend="counting")
    finally:
        unregister_backend("counting")
    assert [b.name for b in backends()] == ["flash4", "triton", "reference"]


# --------------------------------------------------------------------------- torch.compile
def test_custom_ops_compile_fullgraph_and_match_eager(rng):
    batch, seq, heads, head_dim = 1, 150, 2, 32
    q, k, v = (torch.randn(batch, seq, heads, head_dim, generator=rng) for _ in range(3))
    block_map = torch.rand(1, heads, 3, 3, generator=rng) < 0.7
    block_map[..., 0] = True
    plan = BlockSparsity.from_block_map(block_map, 64)
    offsets = torch.tensor([0, 40, 100, seq])
    padding = torch.tensor([seq - 30])

    def step(q, k, v):
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, key_padding=padding)
        mass = block_mass(q, k, lse, plan, block_size=64)
        pooled = block_mean_pool(out, 64) + segment_mean_pool(q, offsets)[:, :, :1]
        quantized = quantize_qk_int8(q.half(), k.half(), block_size=64, lse_shift=True)
        return out, lse, mass, pooled, quantized.q_scale, quantized.lse_shift

    # aot_eager: Dynamo and AOTAutograd with the fake implementations, without Inductor's C++
    # code generation (minutes on a 2-core CPU); the Inductor test below covers that path.
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v), step(q, k, v)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_inductor_keeps_the_attention_op_opaque(rng):
    q, k, v = (torch.randn(1, 100, 2, 32, generator=rng) for _ in range(3))
    plan = BlockSparsity.from_block_map(torch.rand(1, 2, 2, 2, generator=rng) < 0.8, 64)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, plan, return_lse=True)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)
    for got, want in zip(compiled(q, k, v), attend(q, k, v)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# AdaSpa exercises the most ops per step (dense attention with LSE, block mass, selection, sparse
# attention, a runtime cache); the other methods run under --compile on the GPU (gpu_session).
@pytest.mark.parametrize("method", ["adaspa"])
def test_compiled_transformer_with_fastdit_matches_eager(rng, method):
    """``transformer.compile()`` over fastdit's processors and hooks (AOT, no C++ code generation
    on the CPU): the same output as eager, on the kernel path (TRITON_INTERPRET=1)."""
    import fastdit
    from tests.pipelines.test_wan_integration import inputs, tiny_transformer

    methods = {
        "radial": fastdit.Radial(block_size=64),
        "vmoba": fastdit.VMoBA(block_size=64),
        "adaspa": fastdit.AdaSpa(search_steps=(0,)),
    }
    model = tiny_transformer()
    kwargs = inputs(rng)
    handle = fastdit.apply(model, methods[method], schedule=fastdit.Schedule())  # all sparse

    def step(index):
        with torch.no_grad(), model.cache_context("cond", step_index=index, num_inference_steps=4):
            return model(**kwargs)[0]

    try:
        eager = [step(i) for i in range(2)]
        torch._dynamo.reset()
        model.compile(backend="aot_eager")
        compiled = [step(i) for i in range(2)]
    finally:
        handle.remove()
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_fa4_failure_is_remembered_and_the_call_runs_on_the_next_backend(rng, monkeypatch, caplog):
    flash4 = kernels.backend.get_backend("flash4")
    calls = []

    def failing_attention(*args, **kwargs):
        calls.append(1)
        raise ValueError("unsupported tile for this call\nsecond line")

    # FA4 "can run" on the CPU here, until it has failed once for this kind of call.
    monkeypatch.setattr(flash4, "_runtime_failures", {})
    monkeypatch.setattr(flash4, "why_not", lambda request: (
        None if flash4._signature(request) not in flash4._runtime_failures else "failed earlier"))
    monkeypatch.setattr(flash4, "attention", failing_attention)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=rng) for _ in range(3))
    plan = BlockSparsity.dense(70, 70, 64)
    want = block_sparse_attention(q, k, v, plan, backend="reference")
    with caplog.at_level("WARNING", logger="fastdit"):
        for _ in range(2):
            torch.testing.assert_close(block_sparse_attention(q, k, v, plan), want)
    assert len(calls) == 1  # the second call does not try FA4 again
    assert "FA4 failed (ValueError: unsupported tile for this call)" in caplog.text
    assert list(flash4._runtime_failures.values()) == ["ValueError: unsupported tile for this call"]
