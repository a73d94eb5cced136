"""Kernel backends behind one interface, and the ordered choice among them.

A backend is one module (``flash4.py``, ``triton/backend.py``, ``reference.py``) holding a
:class:`Backend` subclass: the operations it runs and a ``cannot_run(request)`` check that returns
``None`` or the reason it cannot run one call (NATTEN's ``choose_backend``). Every call takes the
first registered backend that can run it, by ``priority``: ``flash4`` (FlashAttention-4's CuTe
DSL kernels: fastest where it applies), ``triton`` (fastdit's kernels: any plan), ``reference``
(PyTorch: any device). ``backend="..."`` forces one. :func:`explain_backends` answers "why did
this call not run on FA4?". Adding a backend is one new module that calls
:func:`register_backend`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .plan import BlockSparsity
    from .quantized import QuantizedQK
    from .window import WindowMask

logger = logging.getLogger("fastdit")

MAX_HEAD_DIM = 256
OPERATIONS = ("attention", "block_mass", "block_mean_pool", "segment_mean_pool", "quantize_qk")


@dataclass(frozen=True)
class Request:
    """What one kernel call needs of a backend: everything but the tensors' values.

    Attributes:
        operation: one of :data:`OPERATIONS`.
        device, dtype, head_dim: of the inputs.
        q_block_size, kv_block_size: the plan's blocks (attention, block mass).
        dense: the plan visits every key block (``BlockSparsity.dense``): no block lists needed.
        return_lse: the call asks for the log-sum-exp too.
        key_padding: the call has per-batch valid key lengths.
        window_mask: the call has window-mask partial blocks (token-level rule).
        quantize: ``None`` or the quantized mode (``"int8"``, ``"int8-fp8"``, ``"fp8"``).
    """

    operation: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    q_block_size: int = 128
    kv_block_size: int = 128
    dense: bool = False
    return_lse: bool = False
    key_padding: bool = False
    window_mask: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {self.operation!r}")
        object.__setattr__(self, "device", torch.device(self.device))


class Backend:
    """One executor of fastdit's kernel operations.

    Subclasses set ``name``, ``priority`` (lower is tried first) and ``operations``, implement
    :meth:`why_not` (``None`` when they can run the request) and the operations they declare.
    """

    name: ClassVar[str]
    priority: ClassVar[int]
    operations: ClassVar[tuple[str, ...]]

    def cannot_run(self, request: Request) -> str | None:
        """``None`` if this backend runs ``request``, else the reason (one line)."""
        if request.operation not in self.operations:
            return f"does not implement {request.operation}"
        if request.head_dim < 1 or request.head_dim > MAX_HEAD_DIM:
            return f"head_dim must be in [1, {MAX_HEAD_DIM}], got {request.head_dim}"
        return self.why_not(request)

    def why_not(self, request: Request) -> str | None:
        return None

    # Operations: inputs arrive validated, on one device, last dim contiguous.
    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsity, *,
        scale: float, layout: str, return_lse: bool, key_lengths: torch.Tensor | None,
        window: WindowMask | None, quantize: str | None, dense: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def block_mass(
        self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, plan: BlockSparsity, *,
        scale: float, layout: str, key_lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def block_mean_pool(self, x: torch.Tensor, block_size: int, *, layout: str) -> torch.Tensor:
        raise NotImplementedError

    def segment_mean_pool(self, x: torch.Tensor, offsets: torch.Tensor, *, layout: str) -> torch.Tensor:
        raise NotImplementedError

    def quantize_qk(
        self, q: torch.Tensor, k: torch.Tensor, *, q_block_size: int, kv_block_size: int,
        scale: float, layout: str, key_lengths: torch.Tensor | None, lse_shift: bool,
        smooth_k: bool,
    ) -> QuantizedQK:
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_logged_fallbacks: set[tuple[str, str, str]] = set()


def register_backend(backend: Backend) -> Backend:
    """Add (or replace, by name) a backend; the order of choice follows ``priority``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a fastdit.kernels.Backend, got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend
    ordered = sorted(_REGISTRY.values(), key=lambda b: b.priority)
    _REGISTRY.clear()
    _REGISTRY.update((b.name, b) for b in ordered)
    return backend


def backends() -> tuple[Backend, ...]:
    """The registered backends in the order they are tried."""
    return tuple(_REGISTRY.values())


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def reasons(request: Request) -> dict[str, str | None]:
    """For each backend in order, ``None`` if it can run ``request``, else why not."""
    return {backend.name: backend.cannot_run(request) for backend in _REGISTRY.values()}


def choose(request: Request, requested: str | None = None) -> Backend:
    """The backend that runs ``request``: ``requested`` if given (raising with its reason when it
    cannot), else the first that can. A CUDA call that ends on the reference path is logged once."""
    if requested is not None:
        backend = get_backend(requested)
        reason = backend.cannot_run(request)
        if reason is not None:
            raise RuntimeError(f"backend {requested!r} cannot run: {reason}")
        return backend
    why = reasons(request)
    name = next((n for n, reason in why.items() if reason is None), None)
    if name is None:
        raise RuntimeError(
            f"no fastdit backend can run {request.operation} here: "
            + "; ".join(f"{n}: {r}" for n, r in why.items())
        )
    if name == "reference" and request.device.type == "cuda":
        key = (request.operation, request.device.type, str(why))
        if key not in _logged_fallbacks:
            _logged_fallbacks.add(key)
            logger.warning(
                "fastdit: running %s on the PyTorch reference path: %s", request.operation,
                "; ".join(f"{n}: {r}" for n, r in why.items() if r is not None),
            )
    return _REGISTRY[name]


# What `explain_backends` and `fastdit info` report, one line per kind of call.
EXPLAINED_CALLS = {
    "dense attention": dict(operation="attention", dense=True),
    "dense attention + LSE": dict(operation="attention", dense=True, return_lse=True),
    "block-sparse attention (128 blocks)": dict(operation="attention"),
    "block-sparse attention + LSE": dict(operation="attention", return_lse=True),
    "block-sparse attention (64 blocks)": dict(operation="attention", q_block_size=64, kv_block_size=64),
    "attention + key padding": dict(operation="attention", key_padding=True),
    "attention + window mask (GNA)": dict(operation="attention", window_mask=True),
    "INT8 attention": dict(operation="attention", quantize="int8"),
    "INT8 Q.K + FP8 P.V attention": dict(operation="attention", quantize="int8-fp8"),
    "FP8 Q.K + FP8 P.V attention": dict(operation="attention", quantize="fp8"),
    "block mass": dict(operation="block_mass"),
    "pooling": dict(operation="block_mean_pool"),
    "INT8 quantization": dict(operation="quantize_qk"),
}


def explain_calls(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128
) -> dict[str, dict[str, str | None]]:
    """For each kind of call in :data:`EXPLAINED_CALLS`: each backend's reason (or ``None``)."""
    base = Request("attention", torch.device(device), dtype, head_dim)
    return {label: reasons(replace(base, **fields)) for label, fields in EXPLAINED_CALLS.items()}


def runnable_quantize(quantize: str | None, device: torch.device) -> str | None:
    """The quantized mode a call runs: ``quantize``, except an FP8 mode on a GPU without FP8
    tensor cores (compute capability < 8.9), which runs ``"int8"`` (logged once, with the reason
    :func:`explain_backends` gives for the FP8 modes there)."""
    from .quantized import FP8_QUANTIZATIONS, fp8_unsupported

    if quantize not in FP8_QUANTIZATIONS:
        return quantize
    reason = fp8_unsupported(device)
    if reason is None:
        return quantize
    key = ("quantize", str(device), reason)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        logger.warning("fastdit: %s", reason)
    return "int8"


def unregister_backend(name: str) -> Backend:
    """Remove a registered backend (the inverse of :func:`register_backend`)."""
    return _REGISTRY.pop(get_backend(name).name)
