"""Token-level masks inside a plan's partial blocks: factorised windows (NATTEN's family).

A :class:`BlockSparsity` lists the key blocks each query block computes whole. Some rules (GNA
with a sliding window, odd extents, dilation) allow only part of a block; FlexAttention splits such
a plan into full blocks and partial blocks with a ``mask_mod``. fastdit does the same with one
mask family the kernel evaluates from two small tensors instead of an arbitrary function::

    allowed(i, j) = query_start[i, 0] < 0                  # unrestricted query (e.g. text)
                 or key_coords[j, 0] < 0                   # key every query sees (e.g. text)
                 or all over d in (0, 1, 2):
                        0 <= delta_d < window_d * dilation_d  and  delta_d % dilation_d == 0
                    where delta_d = key_coords[j, d] - query_start[i, d]

``query_start[i]`` is query ``i``'s first allowed key coordinate in each dimension and
``key_coords[j]`` key ``j``'s coordinates, both in the sequence order the kernel sees (tile-major
after a permutation). The mask is shared by every batch element and head. ``partial`` lists the
blocks it applies to; they must not repeat a block of the plan, whose blocks stay unmasked.
Memory: ``6 * S`` int32 values, never ``S x S``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .plan import BlockSparsity

__all__ = ["WindowMask"]


@dataclass(frozen=True, eq=False)
class WindowMask:
    """The partial blocks of a plan and the factorised window rule applied inside them.

    Attributes:
        partial: blocks computed with the token mask (same block sizes as the plan they extend,
            disjoint from it).
        query_start: int32 ``[S_q, 3]``; a negative first entry marks an unrestricted query.
        key_coords: int32 ``[S_kv, 3]``; a negative first entry marks a key visible to all queries.
        window: keys per query in each dimension, ``>= 1``.
        dilation: step between allowed keys in each dimension, ``>= 1``.
    """

    partial: BlockSparsity
    query_start: torch.Tensor
    key_coords: torch.Tensor
    window: tuple[int, int, int]
    dilation: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.partial, BlockSparsity):
            raise TypeError(f"partial must be a BlockSparsity, got {type(self.partial).__name__}")
        for name in ("query_start", "key_coords"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.dim() != 2 or x.shape[1] != 3:
                raise ValueError(
                    f"{name} must be an int32 tensor [S, 3], got "
                    f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
                )
            if x.device != self.partial.device:
                raise ValueError(f"{name} is on {x.device} but partial is on {self.partial.device}")
            object.__setattr__(self, name, x.contiguous())  # the kernel reads rows of 3 int32
        window, dilation = tuple(int(w) for w in self.window), tuple(int(d) for d in self.dilation)
        if len(window) != 3 or len(dilation) != 3 or min(window + dilation) < 1:
            raise ValueError(f"window and dilation must be 3 ints >= 1, got {window=}, {dilation=}")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "dilation", dilation)

    @property
    def device(self) -> torch.device:
        return self.partial.device

    def to(self, device: torch.device | str) -> WindowMask:
        return WindowMask(
            self.partial.to(device), self.query_start.to(device), self.key_coords.to(device),
            self.window, self.dilation,
        )

    def check(self, plan: BlockSparsity, seq_q: int, seq_kv: int) -> None:
        """Raise ValueError unless this mask fits ``plan`` and the sequence lengths."""
        if (self.partial.q_block_size, self.partial.kv_block_size) != (plan.q_block_size, plan.kv_block_size):
            raise ValueError(
                f"window mask blocks ({self.partial.q_block_size}, {self.partial.kv_block_size}) must "
                f"match the plan's ({plan.q_block_size}, {plan.kv_block_size})"
            )
        self.partial.check_shape(seq_q, seq_kv)
        if self.query_start.shape[0] != seq_q or self.key_coords.shape[0] != seq_kv:
            raise ValueError(
                f"window mask covers {self.query_start.shape[0]} queries and {self.key_coords.shape[0]} "
                f"keys, but the inputs have S_q={seq_q} and S_kv={seq_kv}"
            )

    def check_disjoint(self, plan: BlockSparsity) -> None:
        """Raise ValueError if a partial block is also one of ``plan``'s blocks (the kernel would
        count it twice). One device-to-host read per (mask, plan) pair, then remembered."""
        checked = self.__dict__.setdefault("_disjoint_from", weakref.WeakSet())
        if plan in checked:
            return
        both = plan.to_block_map().bool() & self.partial.to_block_map().bool()
        if bool(both.any()):
            where = [int(i) for i in both.nonzero()[0]]
            raise ValueError(
                "window_mask.partial must not repeat a block of the plan, got block "
                f"(batch, head, q_block, kv_block)={tuple(where)} in both"
            )
        checked.add(plan)

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """BoolTensor ``[len(rows), len(cols)]`` of the token rule (reference and tests)."""
        start = self.query_start[rows].long()
        coords = self.key_coords[cols].long()
        delta = coords[None, :, :] - start[:, None, :]
        window = torch.tensor(self.window, device=delta.device)
        dilation = torch.tensor(self.dilation, device=delta.device)
        inside = ((delta >= 0) & (delta < window * dilation) & (delta % dilation == 0)).all(dim=-1)
        return inside | (start[:, None, 0] < 0) | (coords[None, :, 0] < 0)

    @property
    def density(self) -> float:
        """Share of (query block, key block) pairs the partial list visits."""
        return self.partial.density
