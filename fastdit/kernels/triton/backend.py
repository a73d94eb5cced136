"""The ``triton`` backend: fastdit's own Triton kernels, which run every plan.

Any block size (64/128), window-mask partial blocks, INT8 Q.K^T (P.V in 16 bits, or in FP8 e4m3
with ``quantize="int8-fp8"`` on compute capability >= 8.9), FP8 Q.K^T and P.V (``"fp8"``), fp32
for tests, key padding, LSE; on
Ampere or newer GPUs, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..backend import Backend, Request, register_backend
from ..quantized import FP8_QK_QUANTIZATIONS, FP8_QUANTIZATIONS, fp8_unsupported

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"
    priority = 20
    operations = ("attention", "block_mass", "block_mean_pool", "segment_mean_pool", "quantize_qk")

    def why_not(self, request: Request) -> str | None:
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        device = request.device
        if device.type == "cpu":
            if triton_interpreter_enabled():
                return None
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        if device.type != "cuda":
            return f"device must be cuda (or cpu with TRITON_INTERPRET=1), got {device.type}"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"compute capability must be >= 8.0 (Ampere), got {major}.{minor}"
        if request.quantize in FP8_QUANTIZATIONS:
            return fp8_unsupported(device)
        return None

    def attention(self, q, k, v, plan, *, scale, layout, return_lse, key_lengths, window, quantize, dense):
        interpret = q.device.type == "cpu"
        if quantize is not None:
            from .int8_attention import triton_int8_block_sparse_attention
            from .quantize import triton_quantize_qk

            quantized = triton_quantize_qk(
                q, k, q_block_size=plan.q_block_size, kv_block_size=plan.kv_block_size,
                scale=scale, layout=layout, key_lengths=key_lengths, lse_shift=return_lse,
                smooth_k=True, fp8=quantize in FP8_QK_QUANTIZATIONS,
            )
            quantized_v = None
            if quantize in FP8_QUANTIZATIONS:
                from .int8_attention import V_TRANSPOSED
                from .quantize import triton_quantize_v_fp8

                quantized_v = triton_quantize_v_fp8(
                    v, layout=layout, key_lengths=key_lengths, transposed=V_TRANSPOSED
                )
            return triton_int8_block_sparse_attention(
                quantized, v, plan, layout=layout, return_lse=return_lse,
                key_lengths=key_lengths, interpret=interpret, quantized_v=quantized_v,
            )
        from .attention import triton_block_sparse_attention

        return triton_block_sparse_attention(
            q, k, v, plan, scale=scale, layout=layout, return_lse=return_lse,
            key_lengths=key_lengths, interpret=interpret, window=window,
        )

    def block_mass(self, q, k, lse, plan, *, scale, layout, key_lengths):
        from .mass import triton_block_mass

        return triton_block_mass(
            q, k, lse, plan, scale=scale, layout=layout, key_lengths=key_lengths,
            interpret=q.device.type == "cpu",
        )

    def block_mean_pool(self, x, block_size, *, layout):
        from .pooling import triton_block_mean_pool

        return triton_block_mean_pool(x, block_size, layout=layout)

    def segment_mean_pool(self, x, offsets, *, layout):
        from .pooling import triton_segment_mean_pool

        return triton_segment_mean_pool(x, offsets, layout=layout)

    def quantize_qk(self, q, k, *, q_block_size, kv_block_size, scale, layout, key_lengths, lse_shift, smooth_k):
        from .quantize import triton_quantize_qk

        return triton_quantize_qk(
            q, k, q_block_size=q_block_size, kv_block_size=kv_block_size, scale=scale,
            layout=layout, key_lengths=key_lengths, lse_shift=lse_shift, smooth_k=smooth_k,
        )


def warp_specialization_reason(request: Request) -> str | None:
    """``None`` where the ``triton`` backend runs such a call with its warp-specialized kernel
    (on the CPU interpreter: that kernel's loop, which the interpreter does not specialize),
    else why not (:func:`~fastdit.kernels.triton.triton_common.warp_specialization_skipped`).
    It also needs contiguous, 16-byte aligned inputs, which a request does not describe."""
    if request.operation != "attention":
        return f"{request.operation} has no warp-specialized kernel (attention has)"
    reason = TRITON_BACKEND.cannot_run(request)
    if reason is not None:
        return f"the triton backend cannot run this call: {reason}"
    from .triton_common import warp_specialization_skipped

    return warp_specialization_skipped(
        request.device, request.dtype, request.head_dim, q_block_size=request.q_block_size,
        kv_block_size=request.kv_block_size, key_padding=request.key_padding,
        window=request.window_mask, quantized=request.quantize is not None,
        interpret=request.device.type == "cpu",
    )


TRITON_BACKEND = register_backend(TritonBackend())
