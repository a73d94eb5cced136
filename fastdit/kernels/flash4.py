"""The ``flash4`` backend: fastdit plans executed by FlashAttention-4 (``flash_attn.cute``).

FlashAttention-4 (``pip install "fastdit[fa4]"``: ``flash-attn-4`` and NVIDIA's CuTe DSL, no CUDA
build) runs FlexAttention-style block lists on Hopper: per ``(batch, head, query block)`` a count
and an ascending list of "full" key blocks (computed whole) and of "mask" blocks (computed under a
``mask_mod``). A :class:`~fastdit.kernels.BlockSparsity` row is exactly a full-block list, so the
conversion (:func:`flash4_block_sparse_tensors`) passes ``kv_counts``/``kv_indices`` through and
gives an empty mask list; no copy of the plan is made. The kernel visits a row's blocks from the
last listed to the first and bounds-masks the first one it visits (the highest index), which is
where the ragged last key block and a batch element's valid key length can end, because rows are
ascending. Key padding passes as FA4's ``seqused_k``; key blocks that lie wholly past a batch
element's valid length are dropped from that element's counts, on the device.

Dense plans (``BlockSparsity.dense``) take FA4's dense path, which needs no block lists.

What stays on the ``triton`` backend, and why (:func:`fastdit.kernels.explain_backends` says it
per call): fp32 inputs (FA4 runs fp16/bf16); INT8 (FA4 has no INT8 path on Hopper); window-mask
partial blocks (GNA's token-level window rule is not expressed as an FA4 ``mask_mod``); 64-token
key blocks (on sm90 FA4's key block is its 128-token key tile); head_dim > 128 with block lists
(FA4's sm90 key tile is narrower there); GPUs other than sm90 for block lists (only sm90 was
validated here); any FA4 error at run time, which is logged once and remembered.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os
import site
import sys

import torch

from .backend import Backend, Request, choose, register_backend
from .plan import BlockSparsity

logger = logging.getLogger("fastdit")

FLASH4_DTYPES = (torch.float16, torch.bfloat16)
# Architectures (compute capability major) where fastdit sends plans to FA4.
DENSE_ARCHS = (9, 10, 11)
BLOCK_SPARSE_ARCHS = (9,)
BLOCK_SPARSE_KV_BLOCK = 128
BLOCK_SPARSE_MAX_HEAD_DIM = 128
INSTALL_HINT = 'pip install "fastdit[fa4]"'


def _import_flash_attn_cute():
    import flash_attn.cute as cute
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401

    return cute


@functools.lru_cache(maxsize=1)
def flash_attn_cute():
    """The imported ``flash_attn.cute`` module, or the reason it cannot be imported."""
    if importlib.util.find_spec("flash_attn") is None:
        return f"flash-attn-4 is not installed ({INSTALL_HINT})"
    try:
        return _import_flash_attn_cute()
    except Exception as first:  # any import failure is a reason, not a crash
        error = first
    # nvidia-cutlass-dsl finds its libraries through a .pth file, which a `pip install --target
    # DIR` folder on PYTHONPATH does not run: add such folders as site directories and retry.
    folders = [p for p in sys.path if p and glob.glob(os.path.join(p, "nvidia_cutlass_dsl*.pth"))]
    for folder in folders:
        site.addsitedir(folder)
    if folders:
        try:
            return _import_flash_attn_cute()
        except Exception as exc:
            error = exc
    return f"flash_attn.cute failed to import: {type(error).__name__}: {error}"


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # The empty mask-block lists; read-only, so one tensor per shape serves every call.
    return torch.zeros(shape, dtype=torch.int32, device=device)


def flash4_block_sparse_tensors(
    plan: BlockSparsity, batch: int, key_lengths: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """FA4's block-sparse tensors for ``plan``: every listed block a full block, no mask blocks.

    Returns ``mask_block_cnt [Bp, Hp, nQ]`` and ``mask_block_idx [Bp, Hp, nQ, 1]`` (zeros),
    ``full_block_cnt`` and ``full_block_idx`` (the plan's counts and indices, batch dimension
    ``batch`` when ``key_lengths`` truncates them per element). Pure tensor ops on the plan's device,
    no host synchronisation.
    """
    counts, indices = plan.kv_counts, plan.kv_indices
    if key_lengths is not None:
        # Rows are ascending: the blocks before ceil(length / kv_block) form a prefix of each row.
        limit = (key_lengths.to(torch.int32) + plan.kv_block_size - 1) // plan.kv_block_size
        slot = torch.arange(indices.shape[-1], device=indices.device, dtype=torch.int32)
        valid = (slot < counts[..., None]) & (indices < limit[:, None, None, None])
        counts = valid.sum(-1, dtype=torch.int32)  # [B, Hp, nQ]
        indices = indices.expand(batch, *indices.shape[1:])
    mask_counts = _zeros(tuple(counts.shape), counts.device)
    mask_indices = _zeros((*counts.shape, 1), counts.device)
    return {
        "mask_block_cnt": mask_counts,
        "mask_block_idx": mask_indices,
        "full_block_cnt": counts,
        "full_block_idx": indices,
    }


class Flash4Backend(Backend):
    name = "flash4"
    priority = 10
    operations = ("attention",)

    def __init__(self) -> None:
        self._runtime_failures: dict[tuple, str] = {}

    def why_not(self, request: Request) -> str | None:
        if request.device.type != "cuda":
            return f"needs a CUDA device, got {request.device.type}"
        if request.dtype not in FLASH4_DTYPES:
            return f"FA4 runs fp16/bf16, got {request.dtype}"
        if request.quantize is not None:
            return f"FA4 has no {request.quantize} path on this GPU (the triton backend has)"
        if request.window_mask:
            return "window-mask partial blocks need GNA's token-level window rule (triton backend)"
        if request.head_dim % 8:
            return f"FA4 needs head_dim divisible by 8, got {request.head_dim}"
        major, minor = torch.cuda.get_device_capability(request.device)
        if request.dense:
            if major not in DENSE_ARCHS:
                return f"FA4 runs on sm90/sm100, got sm_{major}{minor}"
        else:
            if major not in BLOCK_SPARSE_ARCHS:
                return f"fastdit sends block lists to FA4 on sm90 only, got sm_{major}{minor}"
            if request.kv_block_size != BLOCK_SPARSE_KV_BLOCK:
                return (
                    f"FA4's sm90 key block is its {BLOCK_SPARSE_KV_BLOCK}-token key tile, got "
                    f"{request.kv_block_size}-token key blocks"
                )
            if request.head_dim > BLOCK_SPARSE_MAX_HEAD_DIM:
                return (
                    f"FA4's sm90 key tile is narrower than {BLOCK_SPARSE_KV_BLOCK} tokens at "
                    f"head_dim {request.head_dim} > {BLOCK_SPARSE_MAX_HEAD_DIM}"
                )
        failure = self._runtime_failures.get(self._signature(request))
        if failure is not None:
            return f"FA4 failed on this kind of call earlier: {failure}"
        module = flash_attn_cute()
        if isinstance(module, str):
            return module
        return None

    @staticmethod
    def _signature(request: Request) -> tuple:
        return (request.device, request.dtype, request.head_dim, request.dense,
                request.q_block_size, request.kv_block_size, request.key_padding,
                request.return_lse)

    def attention(self, q, k, v, plan, *, scale, layout, return_lse, key_lengths, window, quantize, dense):
        module = flash_attn_cute()
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        if layout == "bhsd":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        tensors = None
        if not dense:
            tensors = BlockSparseTensorsTorch(
                **flash4_block_sparse_tensors(plan, q.shape[0], key_lengths),
                block_size=(plan.q_block_size, plan.kv_block_size),
            )
        out, lse = module.flash_attn_varlen_func(
            q, k, v, seqused_k=key_lengths, softmax_scale=scale,
            block_sparse_tensors=tensors, return_lse=return_lse,
        )
        if layout == "bhsd":
            out = out.transpose(1, 2)
        return out, (lse if return_lse else None)

    def run_or_remember(self, request: Request, *args, **kwargs):
        """Run on FA4; an FA4 error (compile or argument check) is logged once and remembered for
        this kind of call (``why_not`` then names it), and the call runs on the next backend that
        can, exactly. The fallback is chosen only then: nothing extra per call."""
        try:
            return self.attention(*args, **kwargs)
        except Exception as exc:  # FA4's JIT and checks raise many types
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._runtime_failures[self._signature(request)] = reason
            fallback = choose(request)
            logger.warning("fastdit: FA4 failed (%s); this kind of call runs on %s from now on",
                           reason, fallback.name)
            return fallback.attention(*args, **kwargs)


register_backend(Flash4Backend())
