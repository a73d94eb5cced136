"""Triton's launch-time allocator, provided for fastdit's own launches and only for them.

A kernel that builds a tensor descriptor on the device (the warp-specialized attention kernels
load Q that way, :func:`~fastdit.kernels.triton.triton_common.load_q_tile`) needs global memory
for it: at launch, Triton's GPU launcher asks the allocator of the current context for
``grid size x bytes per program``. There is none by default (Triton's ``NullAllocator`` raises),
and ``triton.set_allocator`` would set one for the whole context, which a library must not do.
:func:`scoped_allocator` installs :class:`TorchAllocator` around one launch, only where no
allocator is set (a user's own wins), and puts back the previous one with the ContextVar's
token, also when the launch raises.

Triton keeps the allocator in the ContextVar ``triton.runtime._allocation._allocator`` with a
``NullAllocator`` default, and its launchers read it at each launch (Triton 3.6 and 3.9 alike).
That name is private and Triton has no public getter nor a setter that returns a token, so it is
read here through :func:`allocator_unavailable`, which says so, naming the Triton version, where
it is not there; the warp-specialized kernels then do not run (the plain ones do).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import triton

try:
    from triton.runtime import _allocation as _triton_allocation
except ImportError:  # pragma: no cover - depends on the Triton version
    _triton_allocation = None

__all__ = ["TorchAllocator", "allocator_unavailable", "scoped_allocator"]


class TorchAllocator:
    """Triton's allocator protocol ``(size, alignment, stream) -> buffer`` on torch's caching
    allocator: ``size`` bytes (uint8) on ``device``, starting at a multiple of ``alignment``. The
    buffer is allocated on torch's current stream, which is the one Triton launches on; Triton
    holds it until the launch is queued, and the caching allocator reuses it only for work
    queued after that on the same stream."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __call__(self, size: int, alignment: int, stream: int | None) -> torch.Tensor:
        size, alignment = int(size), max(1, int(alignment or 1))
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        if buffer.data_ptr() % alignment == 0:  # torch's blocks are 512-byte aligned on CUDA
            return buffer
        buffer = torch.empty(size + alignment - 1, dtype=torch.uint8, device=self.device)
        start = -buffer.data_ptr() % alignment
        return buffer[start:start + size]

    def __repr__(self) -> str:
        return f"TorchAllocator({str(self.device)!r})"


def _allocator_context() -> tuple[ContextVar, type] | None:
    """Triton's allocator ContextVar and its null allocator's class, or None where this Triton
    keeps them elsewhere."""
    variable = getattr(_triton_allocation, "_allocator", None)
    null_allocator = getattr(_triton_allocation, "NullAllocator", None)
    if not isinstance(variable, ContextVar) or not isinstance(null_allocator, type):
        return None
    return variable, null_allocator


def allocator_unavailable() -> str | None:
    """``None`` where :func:`scoped_allocator` works with this Triton, else why not."""
    if _allocator_context() is None:
        return (
            f"Triton {triton.__version__} keeps no allocator ContextVar with a NullAllocator "
            "default at triton.runtime._allocation._allocator (Triton 3.6 and 3.9 do), which "
            "fastdit's scoped allocator needs"
        )
    return None


@contextlib.contextmanager
def scoped_allocator(device: torch.device | str):
    """Triton's allocator set to a :class:`TorchAllocator` on ``device`` for the ``with`` block,
    where the current one is Triton's null allocator or another of these (a nested block for
    another device); a user's own allocator is left in place. On leaving, the previous
    allocator is restored with the ContextVar's token, so nothing of it outlives the block."""
    context = _allocator_context()
    if context is None:
        raise RuntimeError(allocator_unavailable())
    variable, null_allocator = context
    if not isinstance(variable.get(), (null_allocator, TorchAllocator)):
        yield
        return
    token = variable.set(TorchAllocator(device))
    try:
        yield
    finally:
        variable.reset(token)
