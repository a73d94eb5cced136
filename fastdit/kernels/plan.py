"""The plan: which key blocks each query block visits.

Architecture line: ``layout`` -> ``methods/<name>.py`` (plans a block sparsity) -> ``kernels/``
(executes it). This module is the contract between the last two stages. A method produces a
:class:`BlockSparsity`; a kernel executes it without knowing which method made it.

The form is FlexAttention's ``BlockMask`` without element-level masks: for every
``(batch or broadcast, head or broadcast, query block)`` a count of key blocks to visit and a padded
list of their indices (padded CSR). Indices within a row are sorted ascending and unique, which
the kernels rely on: the only key blocks that can need a bounds mask (the ragged last block, or
blocks past a batch element's valid key length) form a suffix of each row.

A plan holds no sequence lengths: ``ceil(S / block)`` must equal its block counts, which the
kernels check at the boundary. Build a plan once per shape and reuse it; calling a kernel with a
plan does no host work and no device synchronisation.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import InitVar, dataclass

import torch

SUPPORTED_BLOCK_SIZES = (64, 128)


def normalize_block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    """``128`` -> ``(128, 128)``; validates both entries against :data:`SUPPORTED_BLOCK_SIZES`."""
    if isinstance(block_size, numbers.Integral):
        pair = (int(block_size), int(block_size))
    else:
        pair = tuple(int(b) for b in block_size)
        if len(pair) != 2:
            raise ValueError(f"block_size must be an int or a (q, kv) pair, got {block_size=}")
    for name, size in zip(("q", "kv"), pair):
        if size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"{name} block size must be one of {SUPPORTED_BLOCK_SIZES}, got {size} "
                f"(from {block_size=})"
            )
    return pair  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class BlockSparsity:
    """Which key blocks each query block visits, in padded-CSR form.

    Attributes:
        kv_counts: int32 ``[Bp, Hp, nQ]``; ``Bp`` is 1 (broadcast over batch) or the batch size,
            ``Hp`` likewise for heads.
        kv_indices: int32 ``[Bp, Hp, nQ, max_kv]``; the first ``kv_counts[b, h, p]`` entries of a
            row are the visited key blocks, ascending and unique; the rest is padding (0).
        q_block_size, kv_block_size: tokens per query block and per key block (64 or 128).
        num_kv_blocks: ``nK``, the number of key blocks of the key sequence.
        is_dense: set by :meth:`dense`: every query block visits every key block, so a backend
            may run dense attention without reading the lists.

    Construction checks shapes, dtypes and block sizes, and (``validate=True``, the default) the
    contents: every count in ``[0, max_kv]``, every index in ``[0, nK)`` (padding included), and
    the first ``kv_counts`` indices of each row strictly ascending (sorted and unique). Kernels
    rely on all three: an index out of range reads out of bounds, an unsorted or repeated row
    gives a wrong result. Checking the contents costs one host synchronisation; the constructors
    below build valid plans by construction and skip it (``validate=False``: no sync, on the GPU
    inside a denoising step). Pass ``validate=False`` yourself only for indices you know are valid.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    q_block_size: int
    kv_block_size: int
    num_kv_blocks: int
    is_dense: bool = False
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool = True) -> None:
        counts, indices = self.kv_counts, self.kv_indices
        if counts.dtype != torch.int32 or indices.dtype != torch.int32:
            raise TypeError(
                f"kv_counts and kv_indices must be int32, got {counts.dtype} and {indices.dtype}"
            )
        if counts.dim() != 3 or indices.dim() != 4 or indices.shape[:3] != counts.shape:
            raise ValueError(
                "kv_counts must be [Bp, Hp, nQ] and kv_indices [Bp, Hp, nQ, max_kv], got "
                f"{tuple(counts.shape)} and {tuple(indices.shape)}"
            )
        if counts.device != indices.device:
            raise ValueError(f"kv_counts on {counts.device} but kv_indices on {indices.device}")
        normalize_block_size((self.q_block_size, self.kv_block_size))
        if isinstance(self.num_kv_blocks, bool) or not isinstance(self.num_kv_blocks, numbers.Integral):
            raise TypeError(f"num_kv_blocks must be an int, got {self.num_kv_blocks!r}")
        if self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if validate:
            self._check_contents()

    def _check_contents(self) -> None:
        """Counts in ``[0, max_kv]``, indices in ``[0, nK)``, each row's visited indices strictly
        ascending; one host synchronisation (more only to name the first bad entry)."""
        counts, indices = self.kv_counts, self.kv_indices
        if counts.numel() == 0:
            return
        max_kv, num_kv = indices.shape[-1], self.num_kv_blocks
        bad_count = (counts < 0) | (counts > max_kv)
        bad_index = (indices < 0) | (indices >= num_kv)
        slot = torch.arange(max_kv, device=indices.device)
        visited = slot < counts[..., None]
        not_ascending = visited[..., 1:] & (indices[..., 1:] <= indices[..., :-1])
        flags = torch.stack([bad_count.any(), bad_index.any(), not_ascending.any()]).tolist()

        def where(mask: torch.Tensor) -> tuple[str, tuple[int, ...]]:
            first = tuple(int(i) for i in mask.nonzero()[0])
            return f"(batch {first[0]}, head {first[1]}, query block {first[2]})", first

        if flags[0]:
            at, first = where(bad_count)
            raise ValueError(
                f"kv_counts must lie in [0, max_kv={max_kv}] (max_kv = kv_indices.shape[-1]), got "
                f"{int(counts[first])} at {at}"
            )
        if flags[1]:
            at, first = where(bad_index)
            raise ValueError(
                f"kv_indices must lie in [0, num_kv_blocks={num_kv}) (padding entries too: use 0), "
                f"got {int(indices[first])} at {at}, slot {first[3]}"
            )
        if flags[2]:
            at, first = where(not_ascending)
            row = indices[first[:3]][: int(counts[first[:3]])].tolist()
            raise ValueError(
                f"the first kv_counts[b, h, p] entries of each kv_indices row must be ascending and "
                f"unique, got {row} at {at}"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_map(
        cls,
        block_map: torch.Tensor,
        block_size: int | tuple[int, int] = 128,
        max_kv: int | None = None,
    ) -> BlockSparsity:
        """From a boolean ``[B|1, H|1, nQ, nK]`` map (True = visit), on any device.

        Sizing the index tensor to the longest row costs one host synchronisation; do it once per
        shape. Methods that build plans inside a denoising step pass ``max_kv`` (e.g. ``nK``, an
        upper bound on every row's count) and stay sync-free: kernels only read the first
        ``kv_counts`` entries of a row, so a wider index tensor costs memory, not time.
        """
        q_block, kv_block = normalize_block_size(block_size)
        if block_map.dtype != torch.bool:
            raise TypeError(f"block_map must be a bool tensor, got {block_map.dtype}")
        if block_map.dim() != 4:
            raise ValueError(
                f"block_map must be [B|1, H|1, nQ, nK], got shape {tuple(block_map.shape)}"
            )
        num_kv_blocks = block_map.shape[-1]
        counts = block_map.sum(dim=-1, dtype=torch.int32)
        if max_kv is None:
            max_kv = max(int(counts.max()), 1) if counts.numel() else 1
        elif not 1 <= max_kv <= num_kv_blocks:
            raise ValueError(f"max_kv must be in [1, nK={num_kv_blocks}], got {max_kv=}")
        # A stable sort of "not kept" puts the kept blocks first, in ascending order.
        order = torch.sort((~block_map).to(torch.uint8), dim=-1, stable=True).indices
        indices = order[..., :max_kv].to(torch.int32)
        slot = torch.arange(max_kv, device=block_map.device, dtype=torch.int32)
        indices = torch.where(slot < counts[..., None], indices, 0).contiguous()
        return cls(counts.contiguous(), indices, q_block, kv_block, num_kv_blocks, validate=False)

    @classmethod
    def from_indices(
        cls,
        kv_block_lists: Sequence,
        num_kv_blocks: int,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockSparsity:
        """From nested lists of key-block indices.

        ``kv_block_lists[p]`` lists the key blocks of query block ``p`` (one plan for all batch
        elements and heads), or ``kv_block_lists[b][h][p]`` gives one per batch element and head.
        Duplicates are merged and lists sorted.
        """
        def as_lists(x):
            return x.tolist() if isinstance(x, torch.Tensor) else [as_lists(y) if isinstance(y, (list, tuple, torch.Tensor)) else y for y in x]

        rows = as_lists(kv_block_lists)
        nested = bool(rows) and bool(rows[0]) and isinstance(rows[0][0], Sequence)
        grid = [[rows]] if not nested else [list(per_b) for per_b in rows]
        num_b, num_h = len(grid), len(grid[0])
        num_q = len(grid[0][0])
        block_map = torch.zeros(num_b, num_h, num_q, num_kv_blocks, dtype=torch.bool)
        for b, per_b in enumerate(grid):
            if len(per_b) != num_h:
                raise ValueError(f"batch {b} has {len(per_b)} heads, expected {num_h}")
            for h, per_h in enumerate(per_b):
                if len(per_h) != num_q:
                    raise ValueError(
                        f"batch {b} head {h} has {len(per_h)} query blocks, expected {num_q}"
                    )
                for p, kv_list in enumerate(per_h):
                    for j in kv_list:
                        if not 0 <= int(j) < num_kv_blocks:
                            raise ValueError(
                                f"key block index must be in [0, {num_kv_blocks}), got {j} "
                                f"at (batch {b}, head {h}, query block {p})"
                            )
                        block_map[b, h, p, int(j)] = True
        return cls.from_block_map(block_map.to(device), block_size)

    @classmethod
    def from_kv_indices(
        cls,
        kv_indices: torch.Tensor,
        num_kv_blocks: int,
        block_size: int | tuple[int, int] = 128,
        validate: bool = True,
    ) -> BlockSparsity:
        """From ``[B|1, H|1, nQ, k]`` integer indices, the same count ``k`` for every row.

        The shape a top-k selection produces. Indices must be unique within a row (as
        ``torch.topk`` gives); they are sorted here. ``validate`` checks range and uniqueness,
        which costs one host synchronisation; methods that build plans inside a denoising step
        from indices they know are valid pass ``validate=False`` and stay sync-free.
        """
        q_block, kv_block = normalize_block_size(block_size)
        if kv_indices.dim() != 4 or kv_indices.dtype.is_floating_point:
            raise ValueError(
                f"kv_indices must be an integer [B|1, H|1, nQ, k] tensor, got "
                f"{kv_indices.dtype} {tuple(kv_indices.shape)}"
            )
        sorted_indices = torch.sort(kv_indices.to(torch.int32), dim=-1).values.contiguous()
        if validate and sorted_indices.numel():
            low, high = int(sorted_indices.min()), int(sorted_indices.max())
            if low < 0 or high >= num_kv_blocks:
                raise ValueError(
                    f"kv_indices must lie in [0, {num_kv_blocks}), got values in [{low}, {high}]"
                )
            if bool((sorted_indices[..., 1:] == sorted_indices[..., :-1]).any()):
                raise ValueError("kv_indices must be unique within each row; found a repeated block")
        counts = torch.full(
            kv_indices.shape[:3], kv_indices.shape[-1], dtype=torch.int32, device=kv_indices.device
        )
        # Checked above (validate=True) or vouched for by the caller (validate=False).
        return cls(counts, sorted_indices, q_block, kv_block, num_kv_blocks, validate=False)

    @classmethod
    def dense(
        cls,
        seq_q: int,
        seq_kv: int,
        block_size: int | tuple[int, int] = 128,
        device: torch.device | str | None = None,
    ) -> BlockSparsity:
        """Every query block visits every key block: the dense attention path."""
        q_block, kv_block = normalize_block_size(block_size)
        num_q, num_kv = math.ceil(seq_q / q_block), math.ceil(seq_kv / kv_block)
        indices = torch.arange(num_kv, dtype=torch.int32, device=device)
        indices = indices.expand(1, 1, num_q, num_kv).contiguous()
        counts = torch.full((1, 1, num_q), num_kv, dtype=torch.int32, device=device)
        return cls(counts, indices, q_block, kv_block, num_kv, is_dense=True, validate=False)

    # ------------------------------------------------------------------ queries
    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    @functools.cached_property
    def density(self) -> float:
        """Visited blocks over all ``nQ * nK`` blocks, averaged over stored batch and heads.

        Computed once (one host read); a plan never changes, so later reads cost nothing.
        """
        total = self.kv_counts.numel() * self.num_kv_blocks
        return float(self.kv_counts.sum(dtype=torch.int64)) / total

    def to(self, device: torch.device | str) -> BlockSparsity:
        return BlockSparsity(
            self.kv_counts.to(device),
            self.kv_indices.to(device),
            self.q_block_size,
            self.kv_block_size,
            self.num_kv_blocks,
            self.is_dense,
            validate=False,
        )

    def to_block_map(self) -> torch.Tensor:
        """The boolean ``[Bp, Hp, nQ, nK]`` map this plan visits."""
        shape = (*self.kv_counts.shape, self.num_kv_blocks)
        slot = torch.arange(self.kv_indices.shape[-1], device=self.device)
        valid = (slot < self.kv_counts[..., None]).to(torch.int32)
        hits = torch.zeros(shape, dtype=torch.int32, device=self.device)
        # scatter_add, not scatter: padding entries also point at block 0 and must not erase it.
        block_map = hits.scatter_add_(-1, self.kv_indices.long(), valid) > 0
        return block_map

    def computed_pairs(self, seq_q: int, seq_kv: int) -> int:
        """(query, key) token pairs inside visited blocks, ragged edges counted exactly.

        Summed over the stored batch and head entries (multiply by the broadcast factor).
        """
        self.check_shape(seq_q, seq_kv)
        rows = torch.full((self.num_q_blocks,), self.q_block_size, dtype=torch.int64)
        rows[-1] = seq_q - (self.num_q_blocks - 1) * self.q_block_size
        cols = torch.full((self.num_kv_blocks,), self.kv_block_size, dtype=torch.int64)
        cols[-1] = seq_kv - (self.num_kv_blocks - 1) * self.kv_block_size
        indices, counts = self.kv_indices.cpu().long(), self.kv_counts.cpu().long()
        valid = torch.arange(indices.shape[-1]) < counts[..., None]
        cols_per_row = torch.where(valid, cols[indices], 0).sum(-1)
        return int((cols_per_row * rows).sum())

    def check_shape(self, seq_q: int, seq_kv: int) -> None:
        """Raise unless this plan's block counts match the two sequence lengths."""
        want_q = math.ceil(seq_q / self.q_block_size)
        want_kv = math.ceil(seq_kv / self.kv_block_size)
        if (self.num_q_blocks, self.num_kv_blocks) != (want_q, want_kv):
            raise ValueError(
                f"plan has {self.num_q_blocks} query blocks x {self.num_kv_blocks} key blocks of "
                f"({self.q_block_size}, {self.kv_block_size}) tokens, but the sequences need "
                f"ceil({seq_q}/{self.q_block_size})={want_q} x "
                f"ceil({seq_kv}/{self.kv_block_size})={want_kv}"
            )

    def __repr__(self) -> str:
        bp, hp, nq = self.kv_counts.shape
        return (
            f"BlockSparsity(batch={bp}, heads={hp}, q_blocks={nq}, kv_blocks={self.num_kv_blocks}, "
            f"block_size=({self.q_block_size}, {self.kv_block_size}), device={self.device})"
        )
