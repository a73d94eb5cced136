"""Public kernel entry points: validation at the boundary, then a backend chosen per call.

Each entry point validates its inputs once (messages name the constraint and the value) and
calls one ``fastdit::`` custom op (:mod:`fastdit.kernels.ops`), which picks the backend at run
time: the first of ``flash4``, ``triton``, ``reference`` that can run the call
(:mod:`fastdit.kernels.backend`), or the one ``backend=`` names. So ``torch.compile`` sees one
opaque operator per call, and :func:`explain_backends` says why a call did not run on a faster
backend.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch

from . import ops
from . import backend as registry
from . import flash4 as _flash4  # noqa: F401  (registers the backends in their order)
from . import reference as _reference  # noqa: F401
from .triton import backend as _triton_backend
from .backend import MAX_HEAD_DIM, Request
from .plan import BlockSparsity
from .quantized import QUANTIZATIONS, QuantizedQK
from .triton.backend import triton_interpreter_enabled  # noqa: F401  (public helper)
from .window import WindowMask

LAYOUTS = ("bshd", "bhsd")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Quantized attention takes fp16/bf16 inputs (INT8 keeps P.V in V's 16-bit dtype; INT8+FP8
# quantizes V from it and writes the output in it).
QUANTIZED_DTYPES = (torch.float16, torch.bfloat16)


class BackendReasons(dict):
    """:func:`explain_backends`' answer: backend name -> ``None`` if it can run the call, else
    the reason it cannot, in the order they are tried. ``warp_specialization``: ``None`` where
    the ``triton`` backend runs the call with its warp-specialized kernel, else why not
    (turned off, Triton too old, not a Hopper GPU, head_dim, block size, key padding, ...)."""

    def __init__(self, reasons: dict[str, str | None], warp_specialization: str | None):
        super().__init__(reasons)
        self.warp_specialization = warp_specialization


def explain_backends(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    operation: str = "attention",
    **call,
) -> BackendReasons:
    """For each backend in order, ``None`` if it can run such a call, else the reason it cannot;
    and, as ``.warp_specialization``, whether the ``triton`` backend runs it warp-specialized
    (``None``) or why not (:class:`BackendReasons`).

    ``call`` takes the fields of :class:`~fastdit.kernels.backend.Request` (``dense``,
    ``q_block_size``, ``kv_block_size``, ``return_lse``, ``key_padding``, ``window_mask``,
    ``quantize``); the default is block-sparse attention over 128-token blocks.
    """
    request = replace(Request(operation, torch.device(device), dtype, head_dim), **call)
    return BackendReasons(
        registry.reasons(request), _triton_backend.warp_specialization_reason(request)
    )


def choose_backend(
    device: torch.device, dtype: torch.dtype, head_dim: int, requested: str | None = None,
    operation: str = "attention", **call,
) -> str:
    """Name of the backend that runs such a call (see :func:`explain_backends`)."""
    request = replace(Request(operation, torch.device(device), dtype, head_dim), **call)
    return registry.choose(request, requested).name


def _check_backend_name(backend: str | None) -> None:
    if backend is not None:
        registry.get_backend(backend)


# ---------------------------------------------------------------------- validation
def _check_tensor(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, S, H, D) or (B, H, S, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype must be one of fp16, bf16, fp32, got {x.dtype}")


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # Kernels read rows of D contiguous elements; any other stride is copied once here.
    return x if x.stride(-1) == 1 else x.contiguous()


def _split_shape(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, seq, heads, head_dim) of a tensor in ``layout``."""
    if layout == "bshd":
        return x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x.shape[0], x.shape[2], x.shape[1], x.shape[3]


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a positive finite number, got {scale=}")
    return scale


def _check_key_padding(key_padding, batch: int, device: torch.device) -> torch.Tensor | None:
    if key_padding is None:
        return None
    if not isinstance(key_padding, torch.Tensor) or key_padding.dtype.is_floating_point or key_padding.dtype == torch.bool:
        raise TypeError(
            "key_padding must be an integer tensor [B] of valid key lengths, got "
            f"{getattr(key_padding, 'dtype', type(key_padding).__name__)}"
        )
    if tuple(key_padding.shape) != (batch,):
        raise ValueError(f"key_padding must have shape [B]=({batch},), got {tuple(key_padding.shape)}")
    if key_padding.device != device:
        raise ValueError(f"key_padding is on {key_padding.device} but q is on {device}")
    return key_padding.to(torch.int32).contiguous()


def _check_plan(plan: BlockSparsity, batch: int, heads: int, seq_q: int, seq_kv: int, device: torch.device) -> None:
    if not isinstance(plan, BlockSparsity):
        raise TypeError(f"plan must be a fastdit.kernels.BlockSparsity, got {type(plan).__name__}")
    plan.check_shape(seq_q, seq_kv)
    plan_b, plan_h, _ = plan.kv_counts.shape
    if plan_b not in (1, batch) or plan_h not in (1, heads):
        raise ValueError(
            f"plan covers batch={plan_b}, heads={plan_h}; it must be 1 or match the inputs' "
            f"batch={batch}, heads={heads}"
        )
    if plan.device != device:
        raise ValueError(
            f"plan is on {plan.device} but q is on {device}: build it there once, or call plan.to(device)"
        )


def _check_qk(q, k, layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_tensor("q", q)
    _check_tensor("k", k)
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"q and k must share dtype and device, got q {q.dtype} on {q.device}, k {k.dtype} on {k.device}")
    batch, seq_q, heads, head_dim = _split_shape(q, layout)
    k_batch, seq_kv, k_heads, k_head_dim = _split_shape(k, layout)
    if (k_batch, k_heads, k_head_dim) != (batch, heads, head_dim):
        raise ValueError(
            f"q and k must agree on batch, heads and head_dim ({layout=}), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim} (q shape {tuple(q.shape)}, {layout=})")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {head_dim}")
    return batch, seq_q, seq_kv, heads, head_dim


def _check_quantize(quantize: str | None, dtype: torch.dtype) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")
    if dtype not in QUANTIZED_DTYPES:
        raise TypeError(
            f"quantize={quantize!r} needs fp16 or bf16 inputs (P.V runs in V's 16-bit dtype), "
            f"got {dtype}"
        )


# ---------------------------------------------------------------------- entry points
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsity,
    *,
    scale: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    key_padding: torch.Tensor | None = None,
    window_mask: WindowMask | None = None,
    backend: str | None = None,
    quantize: str | None = None,
):
    """Attention restricted to the key blocks ``plan`` lists for each query block.

    Args:
        q, k, v: ``(B, S, H, D)`` (``layout="bshd"``, diffusers' layout) or ``(B, H, S, D)``;
            fp16 or bf16 (fp32 for tests); any head_dim <= 256 (64 and 128 are native, others
            are zero-padded inside the kernel); any lengths, ``S_q`` may differ from ``S_kv``.
        plan: a :class:`BlockSparsity` with ``ceil(S_q/bq)`` query blocks and ``ceil(S_kv/bk)``
            key blocks, on the inputs' device; batch and head dims of size 1 broadcast.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        return_lse: also return the natural-log log-sum-exp, fp32 ``[B, H, S_q]``.
        key_padding: int tensor ``[B]`` of valid key lengths (keys at or past it are ignored).
        window_mask: a :class:`~fastdit.kernels.window.WindowMask`: further (partial) blocks,
            computed with its token-level window rule (exact GNA/NATTEN windows).
        backend: ``"flash4"``, ``"triton"`` or ``"reference"`` to force one; by default the
            first that can run the call (:func:`explain_backends` says why the others cannot).
        quantize: ``None`` (fp16/bf16/fp32 throughout), ``"int8"``: Q and K quantized to INT8
            with per-block scales and K smoothed by its mean, P.V in 16 bits, or ``"int8-fp8"``:
            the same INT8 Q.K^T with P.V in FP8 e4m3 (V per channel; compute capability >= 8.9,
            older GPUs run ``"int8"``), or ``"fp8"``: Q.K^T in e4m3 too (same scales, less
            precise scores); fp16/bf16 inputs only; see
            :mod:`fastdit.kernels.quantized`. The quantization pass is part of this call.

    Returns:
        The output in the input's layout and dtype, or ``(out, lse)``. A query row that sees no
        key gets zeros and LSE ``-inf``.
    """
    batch, seq_q, seq_kv, heads, head_dim = _check_qk(q, k, layout)
    _check_tensor("v", v)
    if v.shape != k.shape or v.dtype != q.dtype or v.device != q.device:
        raise ValueError(f"v must match k's shape, dtype and device, got v {v.dtype} {tuple(v.shape)} and k {k.dtype} {tuple(k.shape)}")
    _check_plan(plan, batch, heads, seq_q, seq_kv, q.device)
    scale = _check_scale(scale, head_dim)
    key_lengths = _check_key_padding(key_padding, batch, q.device)
    if window_mask is not None:
        if not isinstance(window_mask, WindowMask):
            raise TypeError(f"window_mask must be a fastdit.kernels.WindowMask, got {type(window_mask).__name__}")
        _check_plan(window_mask.partial, batch, heads, seq_q, seq_kv, q.device)
        window_mask.check(plan, seq_q, seq_kv)
        if not torch.compiler.is_compiling():  # a host read, once per (mask, plan) pair
            window_mask.check_disjoint(plan)
    _check_quantize(quantize, q.dtype)
    if window_mask is not None and quantize is not None:
        raise ValueError(f"window_mask is not supported with quantize={quantize!r} (use the bf16/fp16 kernel)")
    _check_backend_name(backend)
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    window = window_mask
    out, lse = ops.attention(
        q, k, v, plan.kv_counts, plan.kv_indices,
        [plan.q_block_size, plan.kv_block_size, plan.num_kv_blocks], plan.is_dense, scale, layout,
        return_lse, key_lengths,
        window.partial.kv_counts if window is not None else None,
        window.partial.kv_indices if window is not None else None,
        window.query_start if window is not None else None,
        window.key_coords if window is not None else None,
        [*window.window, *window.dilation] if window is not None else [],
        quantize, backend,
    )
    return (out, lse) if return_lse else out


def quantize_qk_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    layout: str = "bshd",
    key_padding: torch.Tensor | None = None,
    lse_shift: bool = False,
    smooth_k: bool = True,
    backend: str | None = None,
) -> QuantizedQK:
    """The quantization pass of ``block_sparse_attention(..., quantize="int8")`` on its own.

    Q and K (fp16/bf16, ``layout``) -> a :class:`~fastdit.kernels.quantized.QuantizedQK`: int8
    ``(B, H, S, D)`` tensors, per-block scales over ``block_size`` (query, key) tokens, K's sampled
    mean (:func:`~fastdit.kernels.quantized.sampled_key_mean`).
    ``smooth_k=False`` skips the smoothing (for comparisons; the attention path always smooths).
    """
    from .plan import normalize_block_size

    batch, _, _, _, head_dim = _check_qk(q, k, layout)
    _check_quantize("int8", q.dtype)
    q_block, kv_block = normalize_block_size(block_size)
    scale = _check_scale(scale, head_dim)
    key_lengths = _check_key_padding(key_padding, batch, q.device)
    _check_backend_name(backend)
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    parts = ops.quantize_qk(
        q, k, q_block, kv_block, scale, layout, key_lengths, lse_shift, smooth_k, backend
    )
    return ops.as_quantized(parts, q_block, kv_block, scale, lse_shift)


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    plan: BlockSparsity | None = None,
    *,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    layout: str = "bshd",
    key_padding: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention mass per (query block, key block), fp32 ``[B, H, nQ, nK]``, in one QK^T pass.

    ``W[b, h, p, c] = sum_{i in block p} sum_{j in block c} exp(scale * q_i . k_j - lse_i)`` for
    the blocks ``plan`` visits (all blocks of ``block_size`` when ``plan`` is None); 0 elsewhere.
    ``lse`` is fp32 ``[B, H, S_q]``, e.g. from ``block_sparse_attention(..., return_lse=True)``
    at this step or a cached earlier one.
    """
    batch, seq_q, seq_kv, heads, head_dim = _check_qk(q, k, layout)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (batch, heads, seq_q):
        raise ValueError(
            f"lse must be a [B, H, S_q]=({batch}, {heads}, {seq_q}) tensor, got {tuple(getattr(lse, 'shape', ()))}"
        )
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    if plan is None:
        plan = BlockSparsity.dense(seq_q, seq_kv, block_size, device=q.device)
    _check_plan(plan, batch, heads, seq_q, seq_kv, q.device)
    scale = _check_scale(scale, head_dim)
    key_lengths = _check_key_padding(key_padding, batch, q.device)
    q, k = _unit_last_stride(q), _unit_last_stride(k)

    _check_backend_name(backend)
    return ops.block_mass(
        q, k, lse.to(torch.float32).contiguous(), plan.kv_counts, plan.kv_indices,
        [plan.q_block_size, plan.kv_block_size, plan.num_kv_blocks], scale, layout, key_lengths,
        backend,
    )


def block_mean_pool(
    x: torch.Tensor, block_size: int, *, layout: str = "bshd", backend: str | None = None
) -> torch.Tensor:
    """Mean of each run of ``block_size`` consecutive tokens: fp32 ``[B, H, ceil(S/block), D]``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_tensor("x", x)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    _, seq_len, _, head_dim = _split_shape(x, layout)
    if seq_len < 1:
        raise ValueError(f"x must have at least one token, got shape {tuple(x.shape)}")
    x = _unit_last_stride(x)
    _check_backend_name(backend)
    return ops.block_mean_pool(x, block_size, layout, backend)


def segment_mean_pool(
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    layout: str = "bshd",
    validate: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean of each run ``offsets[c] <= j < offsets[c + 1]`` of tokens: fp32 ``[B, H, nseg, D]``.

    ``offsets`` is an integer tensor ``[nseg + 1]`` on ``x``'s device, strictly increasing from 0
    to ``S`` (every run non-empty): runs of differing lengths, e.g. ragged partitions laid out
    contiguously. ``validate`` checks that, at the cost of one host synchronisation; callers that
    build the offsets themselves pass ``validate=False`` and stay sync-free. Under
    ``torch.compile`` the check is left out (it reads the device).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_tensor("x", x)
    _, seq_len, _, head_dim = _split_shape(x, layout)
    if (
        not isinstance(offsets, torch.Tensor)
        or offsets.dim() != 1
        or offsets.numel() < 2
        or offsets.dtype.is_floating_point
        or offsets.dtype == torch.bool
    ):
        raise ValueError(
            "offsets must be a 1-D integer tensor [nseg + 1] with at least one segment, got "
            f"{getattr(offsets, 'dtype', type(offsets).__name__)} "
            f"{tuple(getattr(offsets, 'shape', ()))}"
        )
    if offsets.device != x.device:
        raise ValueError(f"offsets is on {offsets.device} but x is on {x.device}")
    if validate and not torch.compiler.is_compiling():
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0 or last != seq_len or bool((offsets[1:] <= offsets[:-1]).any()):
            raise ValueError(
                f"offsets must increase strictly from 0 to the sequence length {seq_len}, got "
                f"{offsets.tolist() if offsets.numel() <= 16 else f'[{first}, ..., {last}]'}"
            )
    x = _unit_last_stride(x)
    offsets = offsets.to(torch.int32).contiguous()
    _check_backend_name(backend)
    return ops.segment_mean_pool(x, offsets, layout, backend)


@functools.lru_cache(maxsize=32)
def _dense_plan(seq_q: int, seq_kv: int, device: torch.device) -> BlockSparsity:
    return BlockSparsity.dense(seq_q, seq_kv, 128, device=device)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    key_padding: torch.Tensor | None = None,
    backend: str | None = None,
):
    """Dense attention on the fastest backend that runs it (FA4's dense kernel where it can):
    :func:`block_sparse_attention` with a cached dense plan."""
    _check_qk(q, k, layout)
    seq_dim = 1 if layout == "bshd" else 2
    plan = _dense_plan(q.shape[seq_dim], k.shape[seq_dim], q.device)
    return block_sparse_attention(
        q, k, v, plan, scale=scale, layout=layout, return_lse=return_lse,
        key_padding=key_padding, backend=backend,
    )


def fastest_dense_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend :func:`dense_attention` runs such a call on."""
    return choose_backend(device, dtype, head_dim, dense=True)
