"""``fastdit.kernels.triton.allocation``: Triton's allocator set for fastdit's launches only."""

import types

import pytest
import torch
import triton
from triton.runtime import _allocation

from fastdit.kernels.triton import allocation
from fastdit.kernels.triton.allocation import TorchAllocator, allocator_unavailable, scoped_allocator


def current():
    return _allocation._allocator.get()


def user_allocator(size, alignment, stream):
    return torch.empty(size, dtype=torch.uint8)


@pytest.fixture
def null_allocator():
    """Triton's allocator as a fresh process has it (whatever an earlier test left)."""
    token = _allocation._allocator.set(_allocation.NullAllocator())
    yield
    _allocation._allocator.reset(token)


def test_installs_for_the_block_and_restores_the_previous(null_allocator):
    before = current()
    with scoped_allocator("cpu"):
        inside = current()
        assert isinstance(inside, TorchAllocator) and inside.device == torch.device("cpu")
    assert current() is before


def test_a_user_allocator_wins(null_allocator):
    token = _allocation._allocator.set(user_allocator)
    try:
        with scoped_allocator("cpu"):
            assert current() is user_allocator
        assert current() is user_allocator
    finally:
        _allocation._allocator.reset(token)


def test_nested_blocks_restore_in_order(null_allocator):
    before = current()
    with scoped_allocator("cpu"):
        outer = current()
        with scoped_allocator("meta"):  # another device: its own allocator inside
            assert current().device == torch.device("meta")
        assert current() is outer
        with scoped_allocator("cpu"):
            assert current() is not outer and current().device == torch.device("cpu")
        assert current() is outer
    assert current() is before


def test_restores_when_the_launch_raises(null_allocator):
    before = current()
    with pytest.raises(ZeroDivisionError):
        with scoped_allocator("cpu"):
            1 / 0
    assert current() is before
    token = _allocation._allocator.set(user_allocator)
    try:
        with pytest.raises(ZeroDivisionError), scoped_allocator("cpu"):
            1 / 0
        assert current() is user_allocator
    finally:
        _allocation._allocator.reset(token)


def test_as_a_decorator_each_call_is_scoped(null_allocator):
    seen = []

    @scoped_allocator("cpu")
    def launch(fail: bool):
        seen.append(current())
        if fail:
            raise RuntimeError("launch failed")

    before = current()
    launch(False)
    with pytest.raises(RuntimeError, match="launch failed"):
        launch(True)
    assert current() is before
    assert all(isinstance(a, TorchAllocator) for a in seen) and seen[0] is not seen[1]


@pytest.mark.parametrize("alignment", [None, 0, 1, 16, 128, 4096, 65536])
@pytest.mark.parametrize("size", [0, 1, 100, 4096])
def test_torch_allocator_size_dtype_and_alignment(size, alignment):
    buffer = TorchAllocator("cpu")(size, alignment, None)
    assert buffer.dtype == torch.uint8 and buffer.device.type == "cpu"
    assert buffer.numel() == size and buffer.is_contiguous()
    assert buffer.data_ptr() % max(1, alignment or 1) == 0


def test_a_triton_without_the_context_variable(monkeypatch, null_allocator):
    monkeypatch.setattr(allocation, "_triton_allocation", types.SimpleNamespace())
    reason = allocator_unavailable()
    assert f"Triton {triton.__version__}" in reason and "_allocation._allocator" in reason
    with pytest.raises(RuntimeError, match=f"Triton {triton.__version__} keeps no allocator"):
        with scoped_allocator("cpu"):
            pass
    monkeypatch.undo()
    assert allocator_unavailable() is None
