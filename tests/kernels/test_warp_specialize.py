"""``triton_common.WARP_SPECIALIZE`` on the CPU interpreter.

The warp-specialized kernels restructure a plan row (one tensor-descriptor loop over all its key
blocks, the ragged last block masked inside the loop and read whole, Q by a device-built
descriptor); Triton's warp specialization itself is a GPU compile pass that the interpreter
ignores (``benchmarks/fp8_tune.py`` checks and times it on a GPU). So here: the restructured
kernels give the plain kernels' output and LSE exactly, and the plain kernels run where the
switch does not apply.
"""

import types

import pytest
import torch
import triton
from triton.runtime import _allocation

from fastdit.kernels import BlockSparsity, block_sparse_attention, explain_backends
from fastdit.kernels.triton import allocation, attention, int8_attention, triton_common
from fastdit.kernels.triton.allocation import TorchAllocator
from tests.kernels.test_int8_attention import make


@pytest.fixture(autouse=True)
def no_environment_override(monkeypatch):
    """These tests set ``triton_common.WARP_SPECIALIZE``; a ``FASTDIT_WARP_SPECIALIZE`` of the
    calling shell would take precedence."""
    monkeypatch.delenv("FASTDIT_WARP_SPECIALIZE", raising=False)


class _LaunchSpy:
    """Stands in for a kernel: records ``(USE_TMA, WARP_SPECIALIZE)`` of each launch, checks
    that Triton's allocator is fastdit's on the inputs' device for (and only for) a
    warp-specialized launch, then launches the kernel."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs["USE_TMA"], kwargs["WARP_SPECIALIZE"]))
            allocator = _allocation._allocator.get()
            if kwargs["WARP_SPECIALIZE"]:
                assert isinstance(allocator, TorchAllocator) and allocator.device == args[0].device
            else:
                assert isinstance(allocator, _allocation.NullAllocator)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch) -> list:
    """The launches' ``(USE_TMA, WARP_SPECIALIZE)``; Triton's allocator is its null one before
    the test and must be again after it (nothing left behind)."""
    token = _allocation._allocator.set(_allocation.NullAllocator())
    recorded = []
    for module, name in ((attention, "_block_sparse_attn_fwd"),
                         (int8_attention, "_int8_block_sparse_attn_fwd")):
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), recorded))
    yield recorded
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    _allocation._allocator.reset(token)


def run_both(monkeypatch, q, k, v, plan, **kwargs):
    """``block_sparse_attention`` with the switch off, then on: ``{False: (out, lse), True: ...}``."""
    results = {}
    for switch in (False, True):
        monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", switch)
        results[switch] = block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True,
                                                 **kwargs)
    return results


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("quantize", [None, "int8-fp8"], ids=["bf16", "int8-fp8"])
def test_warp_specialized_kernels_match_plain(rng, monkeypatch, launches, quantize, layout):
    # Batch 2, S_q != S_kv, both ragged: the last key block (72 keys) is read whole, so its tile
    # holds the next batch's or head's keys (or zeros past the end) and only the mask in the
    # loop keeps them out. Per batch-and-head random plans, an empty row (output 0, LSE -inf).
    batch, seq_q, seq_kv, heads, head_dim = 2, 300, 200, 2, 64
    shape = lambda s: (batch, s, heads, head_dim) if layout == "bshd" else (batch, heads, s, head_dim)  # noqa: E731
    q = make(rng, shape(seq_q), torch.bfloat16)
    k = make(rng, shape(seq_kv), torch.bfloat16, offset=3.0, offset_shape=(head_dim,))
    v = make(rng, shape(seq_kv), torch.bfloat16)
    block_map = torch.rand(batch, heads, 3, 2, generator=rng) < 0.6
    block_map[:, :, :, 1] |= torch.rand(batch, heads, 3, generator=rng) < 0.5
    block_map[0, 0, 1] = False
    block_map[1, 1, 2, 1] = True
    plan = BlockSparsity.from_block_map(block_map)
    results = run_both(monkeypatch, q, k, v, plan, layout=layout, quantize=quantize)
    assert launches == [(False, False), (True, True)]
    (plain, plain_lse), (specialized, specialized_lse) = results[False], results[True]
    assert not plain.isnan().any() and plain.abs().max() > 0
    assert torch.equal(specialized, plain)
    assert torch.equal(specialized_lse, plain_lse)
    rows = slice(128, 256)
    empty = plain[0, rows, 0] if layout == "bshd" else plain[0, 0, rows]
    assert not empty.any() and torch.isneginf(plain_lse[0, 0, rows]).all()


@pytest.mark.parametrize("case", ["key_padding", "block_64", "head_dim_80"])
def test_plain_kernels_where_it_does_not_apply(rng, monkeypatch, launches, case):
    # Key lengths (the last block is read whole), 64-token blocks (Triton 3.6 repeats 64-row
    # tiles in both consumer groups), no tensor-descriptor view (head_dim 80): the plain kernel.
    seq, heads = 200, 2
    head_dim = 80 if case == "head_dim_80" else 64
    q, k, v = (make(rng, (1, seq, heads, head_dim), torch.bfloat16) for _ in range(3))
    block = 64 if case == "block_64" else 128
    plan = BlockSparsity.dense(seq, seq, block)
    kwargs = dict(key_padding=torch.tensor([150])) if case == "key_padding" else {}
    results = run_both(monkeypatch, q, k, v, plan, **kwargs)
    assert launches == [(False, False), (False, False)]
    assert torch.equal(results[True][0], results[False][0])


def test_setting_must_be_a_bool(rng, monkeypatch):
    q = make(rng, (1, 128, 1, 64), torch.bfloat16)
    monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", 1)
    with pytest.raises(ValueError, match="WARP_SPECIALIZE must be True or False, got 1"):
        block_sparse_attention(q, q, q, BlockSparsity.dense(128, 128), backend="triton")


# ---------------------------------------------------------------------- the switch and its reasons
@pytest.mark.parametrize(("constant", "env", "expected"), [
    (False, None, False), (True, None, True), (True, "", True), (False, "1", True),
    (True, "0", False), (False, " 1 ", True),
])
def test_environment_overrides_the_constant(monkeypatch, constant, env, expected):
    monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", constant)
    if env is None:
        monkeypatch.delenv("FASTDIT_WARP_SPECIALIZE", raising=False)
    else:
        monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", env)
    assert triton_common.warp_specialize_setting() is expected


@pytest.mark.parametrize("value", ["yes", "true", "2", "on", "01"])
def test_bad_environment_values_name_the_variable(rng, monkeypatch, value):
    monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", value)
    message = f"FASTDIT_WARP_SPECIALIZE must be 0 or 1, got '{value}'"
    with pytest.raises(ValueError, match=message):
        triton_common.warp_specialize_setting()
    q = make(rng, (1, 128, 1, 64), torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, q, q, BlockSparsity.dense(128, 128), backend="triton")
    with pytest.raises(ValueError, match=message):
        explain_backends("cpu")


@pytest.mark.parametrize(("constant", "env", "specialized"), [(False, "1", True), (True, "0", False)])
def test_environment_picks_the_kernel(rng, monkeypatch, launches, constant, env, specialized):
    monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", constant)
    monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", env)
    q, k, v = (make(rng, (1, 200, 2, 64), torch.bfloat16) for _ in range(3))
    plan = BlockSparsity.dense(200, 200)
    block_sparse_attention(q, k, v, plan, backend="triton")
    assert launches == [(specialized, specialized)]
    assert explain_backends("cpu", head_dim=64).warp_specialization == (
        None if specialized else "turned off (FASTDIT_WARP_SPECIALIZE=0)")


@pytest.fixture
def switched_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTDIT_WARP_SPECIALIZE", raising=False)
    monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", True)


def reason(device="cpu", dtype=torch.bfloat16, head_dim=128, **call):
    reasons = explain_backends(device, dtype, head_dim, **call)
    assert list(reasons) == ["flash4", "triton", "reference"]  # still the backends' reasons
    return reasons.warp_specialization


def test_explain_backends_says_where_it_runs(switched_on):
    assert reason() is None
    assert reason(head_dim=64, dense=True, return_lse=True) is None
    assert reason(dtype=torch.float16, q_block_size=256, kv_block_size=128) is None
    for quantize in ("int8", "int8-fp8", "fp8"):
        assert reason(quantize=quantize) is None


@pytest.mark.parametrize(("call", "expected"), [
    (dict(q_block_size=64, kv_block_size=64), "needs 128-token query and key blocks (64-row "
     "tiles repeat work in Triton's consumer groups), got 64 and 64"),
    (dict(q_block_size=128, kv_block_size=64), "got 128 and 64"),
    (dict(key_padding=True), "key padding: the loop reads each row's last key block whole"),
    (dict(window_mask=True), "window-mask partial blocks need the plain kernel's masked loop"),
    (dict(head_dim=80), "needs head_dim 64 or 128 (tensor-descriptor loads), got 80"),
    (dict(head_dim=256, quantize="int8-fp8"), "needs head_dim 64 or 128"),
    (dict(dtype=torch.float32), "needs fp16 or bf16 inputs (tensor-descriptor loads), got torch.float32"),
    (dict(operation="block_mass"), "block_mass has no warp-specialized kernel (attention has)"),
])
def test_explain_backends_says_why_not(switched_on, call, expected):
    assert expected in reason(**call)


def test_explain_backends_turned_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTDIT_WARP_SPECIALIZE", raising=False)
    monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", False)
    assert reason() == "turned off (triton_common.WARP_SPECIALIZE is False)"
    monkeypatch.setattr(triton_common, "WARP_SPECIALIZE", True)
    monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", "0")
    assert reason() == "turned off (FASTDIT_WARP_SPECIALIZE=0)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", "1")
    assert reason() == ("the triton backend cannot run this call: tensors are on the CPU and "
                        "TRITON_INTERPRET=1 is not set")


@pytest.mark.parametrize(("capability", "expected"), [
    ((9, 0), None),
    ((8, 0), "needs a Hopper GPU (compute capability 9.x), got 8.0"),
    ((8, 9), "needs a Hopper GPU (compute capability 9.x), got 8.9"),
    ((10, 0), "needs a Hopper GPU (compute capability 9.x), got 10.0"),
])
def test_explain_backends_on_a_faked_gpu(switched_on, monkeypatch, request, capability, expected):
    # On a Triton release that is not refused (this machine's may be: see the next test)
    monkeypatch.setattr(triton_common.triton, "__version__", "3.7.0")
    triton_common._wrong_on_this_triton.cache_clear()
    request.addfinalizer(triton_common._wrong_on_this_triton.cache_clear)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert reason("cuda") == expected
    if capability == (9, 0):  # the GPU is fine; the call's own reasons still apply
        assert "got 64 and 64" in reason("cuda", q_block_size=64, kv_block_size=64)


@pytest.mark.parametrize(("version", "refused"), [("3.6.0", "2026-12-02"), ("3.6.1", "2026-12-02"),
                                                  ("3.9.0", "2026-12-03"), ("3.5.1", None),
                                                  ("3.7.0", None)])
def test_a_triton_that_gave_wrong_outputs_is_refused(switched_on, monkeypatch, caplog, version, refused):
    # Triton 3.6's and 3.9's warp-specialized kernels failed the GPU check (triton_common's
    # WARP_SPECIALIZE_WRONG_TRITON, with the check's date): switched on, the call runs the plain
    # kernel, says why, logs it.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton_common.triton, "__version__", version)
    triton_common._wrong_on_this_triton.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=triton_common.__name__):
            got, again = reason("cuda"), reason("cuda")
    finally:
        triton_common._wrong_on_this_triton.cache_clear()
    if refused:
        expected = (f"Triton {version[:3]} gives wrong outputs with it (gpu_check --warp-specialize "
                    f"on an H200, {refused}); the plain kernel runs")
        assert got == again == expected
        warnings = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(warnings) == 1 and expected in warnings[0].getMessage()  # logged once
    else:
        assert got is None and again is None and not caplog.records
    assert reason("cpu") is None  # the interpreter specializes nothing and is not refused


@pytest.mark.parametrize("missing", ["tl.range", "allocator"])
def test_an_older_triton_runs_the_plain_kernels(rng, switched_on, monkeypatch, launches, missing):
    # No tl.range(warp_specialize=...), or no allocator ContextVar where fastdit reads it: the
    # reason names the Triton version, and calls run the plain kernels (no error).
    if missing == "tl.range":
        monkeypatch.setattr(triton_common, "_range_has_warp_specialize", lambda: False)
        expected = f"Triton {triton.__version__} has no tl.range(..., warp_specialize=...)"
    else:
        monkeypatch.setattr(allocation, "_triton_allocation", types.SimpleNamespace())
        expected = f"Triton {triton.__version__} keeps no allocator ContextVar"
    assert reason().startswith(expected)
    q, k, v = (make(rng, (1, 128, 1, 64), torch.bfloat16) for _ in range(3))
    plan = BlockSparsity.dense(128, 128)
    block_sparse_attention(q, k, v, plan, backend="triton")
    block_sparse_attention(q, k, v, plan, backend="triton", quantize="int8-fp8")
    assert launches == [(False, False), (False, False)]
