"""VMoBA: Mixture-of-Block Attention (Wu et al., 2025), training-free, on fastdit's kernels.

Paper: Wu et al., 2025, "VMoBA: Mixture-of-Block Attention for Video Diffusion Models".
Architecture line: ``layout`` -> this module (plans a per-head block sparsity from Q and K on every
sparse call) -> :func:`fastdit.kernels.block_sparse_attention` (executes it).

The rule (fastdit's ``METHODS.md``, section 3)
----------------------------------------------
* Layer-wise recurrent partition of the latent grid ``T x H x W`` by ``layer % 3``: 0 -> 1D
  temporal partitions (runs of ``s_T`` whole frames), 1 -> 2D spatial partitions (an
  ``s_H x s_W`` patch across all frames), 2 -> 3D cuboids ``s_T x s_H x s_W``. Every kind is a box
  ``(bT, bH, bW)`` (1D: ``(s_T, H, W)``, 2D: ``(T, s_H, s_W)``) and token ``(t, h, w)`` belongs to
  partition ``((t // bT) * nH + h // bH) * nW + w // bW``; extents that the sizes do not divide
  leave smaller last partitions (ragged), nothing is padded.
* Key summary of partition ``c``: ``kbar_c`` = mean of its keys, in fp32. Score of video query
  ``i`` for partition ``c``: the raw dot product ``s_ic = q_i . kbar_c`` (no scale, no softmax).
* ``selection="global_threshold"`` (default, the paper's rule), per batch element and head:
  min-max normalise ``v = (s - min) / (max - min)`` over all (query, partition) pairs of the head
  (``max == min``: ``v = 0``), sort the pairs by ``v`` descending and keep the shortest prefix whose
  cumulative ``v`` reaches ``tau`` of the total. Ties: every pair whose ``v`` equals the last kept
  value is kept too, so the set does not depend on a sort order; i.e. keep ``v >= v*`` with ``v*``
  the value at which the cumulative sum first reaches ``tau * total`` (nothing when the total is 0).
  Every query also keeps its own partition.
* ``selection="topk"``: per query, its own partition plus the ``k - 1`` highest-scoring others
  (``k`` per partition kind, ``topk=(k_1D, k_2D, k_3D)``; the paper's training-free Wan 480p
  values 2/6/18 count the own partition, as the reference code does by boosting it). Ties at the
  ``k``-th score are all kept.
* The first 25% of the denoising steps run dense (``dense_steps=0.25``, the paper's training-free
  schedule), through the shared :class:`~fastdit.schedule.Schedule`.

Deviation from the reference code: its ``head_global`` threshold counts the own-partition pairs
towards ``tau`` first and sorts only the other pairs (and always keeps at least one of them); this
module implements the rule as ``METHODS.md`` states it (all pairs ranked together, own partitions
added afterwards), which selects a few more pairs.

Partition sizes
---------------
Published sizes in latent tokens: Wan 480p (21 x 30 x 52): 1D 3 frames, 2D 5 x 13, 3D 7 x 5 x 13;
Wan 720p (21 x 45 x 80): 3, 9 x 10, 7 x 15 x 20. With ``partition_sizes=None`` every grid takes the
partition *counts* per dimension of the published setting closest in tokens per frame (480p:
1D 7, 2D 6 x 4, 3D 3 x 6 x 4; 720p: 7, 5 x 8, 3 x 3 x 4) and sizes ``ceil(extent / count)``, which
gives exactly the published sizes on the published grids (HunyuanVideo 33 x 45 x 80: 1D 5 frames,
2D 9 x 10, 3D 11 x 15 x 20). Explicit sizes larger than the grid are clamped to it.

Mapping the token rule onto the tile-based kernel
-------------------------------------------------
The kernel visits (query tile, key block) pairs of ``block_size`` consecutive tokens. Each call
reorders the video tokens *partition-major* for this layer's partition kind (partitions one after
another, frame-major inside: the reference code's order), so a partition is one contiguous run of
tokens; text tokens stay in place. Then:

* Query side, ``query_aggregation="union"``: a query tile visits partition ``c`` iff at
  least one of its video tokens selects ``c`` (so each tile visits every partition one of its
  tokens lives in): every pair the token rule selects is computed. For the
  global threshold this is ``max_{i in tile} v_ic >= v*``; it is computed without the token-level
  selection: with ``M`` the tile maxima and ``G(x) = sum of v > x``, a tile keeps ``c`` iff
  ``G(M_c) < tau * total`` (equivalent to ``M_c >= v*`` for data values). ``G`` at all tile maxima
  comes from one bucketing pass (``searchsorted`` of every ``v`` into the sorted tile maxima and an
  fp64 ``index_add_`` of ``v`` per bucket, then a suffix sum), so no sort of all ``N x P`` pairs is
  needed and memory stays bounded (the pass runs over query chunks of at most ``2**25`` pairs).
  The union grows with the disagreement between a tile's queries: with unstructured (random)
  Q/K almost every tile selects every partition.
* Query side, ``query_aggregation="mean"`` (default): the rule runs with one query per tile, the mean of the
  tile's video queries (scores ``qbar . kbar_c``, the tile mean of its queries' scores): the global
  threshold over all (tile, partition) pairs of the head (each tile counts once), or per tile its
  own partitions plus the ``k - 1`` best others. Density follows ``tau``/``k`` as at token level,
  but a token's own selection is no longer guaranteed to be computed (a deviation from the token
  rule; :meth:`VMoBA.analyze` reports both densities). It is also cheaper: no ``[B, H, N, P]``
  tensor, the queries are mean-pooled per tile by the segment pooling kernel.
* Why ``"mean"`` is the default: on synthetic clustered Q/K at the Wan 480p grid the union plan
  was nearly dense for the 2D and 3D kinds (block density 0.94 / 0.97 where the token rule keeps
  0.18 / 0.19), so it saves almost nothing; the mean rule kept 0.13 / 0.21, following ``tau``.
  ``"union"`` stays available for a plan that computes every pair the token rule selects.
* Key side: a key block is visited iff one of the partitions it overlaps is visited (a block that
  straddles a partition boundary is shared). With the union rule the plan is therefore a superset
  of the token-level selection: every selected (query, key) pair is computed, plus the rest of the
  tiles and blocks it touches. :meth:`VMoBA.analyze` reports the token-level density next to the
  density after the tile aggregation and the block density.
* Joint ``[video | text]`` sequences (HunyuanVideo): query tiles and key blocks holding a text token
  are dense (text queries attend to everything, every query attends to all text); padded text keys
  are masked by the kernel's ``key_padding``.

Cost on the hot path (GPU): one gather of Q, K, V into partition-major order and one scatter of the
output per call (none for the 1D kind, whose order is frame-major already); index tensors are built
once per grid and cached. Then a segment mean pool (Triton), with the union rule an fp32
``[B, H, N, P]`` score tensor (the largest temporary: ``4 * H * N * P`` bytes per sample, 480 MB for
Wan2.1-14B 720p, P <= 40; the mean rule needs ``[B, H, nQ, P]`` only), the selection, a
``[B, H, nQ, nK]`` block map and the kernel. No Python loop over heads, layers or
blocks (a loop over a few fixed-size query chunks bounds temporaries), no host synchronisation in
:meth:`VMoBA.attend`; the returned density is a 0-d tensor the state keeps as is and reads only
when the densities are asked for (after the run). Summation order of
the fp64 bucket sums is not deterministic on the GPU (atomics), which can only flip a pair lying
within rounding of the threshold.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..kernels import (
    SUPPORTED_BLOCK_SIZES,
    BlockSparsity,
    block_sparse_attention,
    segment_mean_pool,
)
from ..layout import LatentGrid, SequenceLayout, as_int, device_key
from ..schedule import Schedule
from .base import AttentionCall, Method, MethodPlan, PlanCache

__all__ = [
    "PARTITION_KINDS",
    "PUBLISHED_PARTITION_SIZES",
    "VMoBA",
    "VMoBACallPlan",
    "VMoBAStats",
    "VideoPartition",
    "default_partition_sizes",
    "global_threshold_tiles",
    "normalise_scores_",
    "topk_tile_means",
    "topk_tiles",
]

Device = torch.device | str | None

PARTITION_KINDS = ("1d", "2d", "3d")  # by layer % 3
SELECTIONS = ("global_threshold", "topk")
QUERY_AGGREGATIONS = ("union", "mean")

# Published partition sizes (latent tokens) per grid: (1D (sT,), 2D (sH, sW), 3D (sT, sH, sW)).
PUBLISHED_PARTITION_SIZES: dict[tuple[int, int, int], tuple[tuple[int, ...], ...]] = {
    (21, 30, 52): ((3,), (5, 13), (7, 5, 13)),  # Wan 480p x 81 frames
    (21, 45, 80): ((3,), (9, 10), (7, 15, 20)),  # Wan 720p x 81 frames
}
# Which grid dimensions (T, H, W) each partition kind splits.
_KIND_DIMS = {"1d": (0,), "2d": (1, 2), "3d": (0, 1, 2)}

# Pairs (query x partition) per chunk of the bucketing/top-k passes: bounds their temporaries
# (int32 buckets, fp64 values) to a few hundred MB whatever the resolution.
_CHUNK_PAIRS = 1 << 25


# --------------------------------------------------------------------------- partitions


def default_partition_sizes(grid: LatentGrid) -> tuple[tuple[int, ...], ...]:
    """``((sT,), (sH, sW), (sT, sH, sW))`` for ``grid``: see the module docstring's rule.

    The published setting closest in tokens per frame (log ratio) gives the partition counts per
    dimension; each size is ``ceil(extent / count)``.
    """
    if not isinstance(grid, LatentGrid):
        raise ValueError(f"grid must be a LatentGrid, got grid={grid!r}")
    reference = min(
        PUBLISHED_PARTITION_SIZES,
        key=lambda shape: abs(math.log(grid.tokens_per_frame / (shape[1] * shape[2]))),
    )
    sizes = []
    for kind, published in zip(PARTITION_KINDS, PUBLISHED_PARTITION_SIZES[reference]):
        dims = _KIND_DIMS[kind]
        counts = [math.ceil(reference[d] / s) for d, s in zip(dims, published)]
        sizes.append(tuple(math.ceil(grid.shape[d] / n) for d, n in zip(dims, counts)))
    return tuple(sizes)


@dataclass(frozen=True, eq=False)
class VideoPartition:
    """One VMoBA partition of a latent grid, and the partition-major order of its tokens.

    ``box = (bT, bH, bW)``: partition ``((t // bT) * nH + h // bH) * nW + w // bW`` holds token
    ``(t, h, w)``, with ``(nT, nH, nW) = ceil(extent / box)``; the last partition along a dimension
    is smaller when the box does not divide the extent. In partition-major order partitions follow
    each other by id, tokens frame-major inside each, so partition ``c`` is the run
    ``offsets[c] <= position < offsets[c + 1]``.
    """

    grid: LatentGrid
    box: tuple[int, int, int]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        box = tuple(self.box)
        if len(box) != 3 or any(not 1 <= b <= e for b, e in zip(box, self.grid.shape)):
            raise ValueError(
                f"box must be 3 sizes in [1, extent] for grid {self.grid.shape}, "
                f"got box={self.box!r}"
            )
        object.__setattr__(self, "box", box)

    @property
    def counts(self) -> tuple[int, int, int]:
        """``(nT, nH, nW)``: partitions along each dimension."""
        counts = (math.ceil(e / b) for e, b in zip(self.grid.shape, self.box))
        return tuple(counts)  # type: ignore[return-value]

    @property
    def num_partitions(self) -> int:
        return math.prod(self.counts)

    @property
    def is_identity(self) -> bool:
        """Partition-major order is frame-major order (1D partitions, or a single partition)."""
        return self.box[1:] == self.grid.shape[1:] or self.num_partitions == 1

    def token_partition(self, device: Device = None) -> torch.Tensor:
        """LongTensor ``[N]``: partition of each frame-major token."""
        t, h, w = self.grid.coords(device).unbind(1)
        _, n_h, n_w = self.counts
        b_t, b_h, b_w = self.box
        return ((t // b_t) * n_h + h // b_h) * n_w + w // b_w

    def _cpu(self) -> dict[str, torch.Tensor]:
        cached = self._cache.get("cpu")
        if cached is None:
            partition = self.token_partition()
            order = torch.sort(partition, stable=True).indices  # frame-major inside a partition
            sizes = torch.bincount(partition, minlength=self.num_partitions)
            offsets = torch.zeros(self.num_partitions + 1, dtype=torch.long)
            offsets[1:] = sizes.cumsum(0)
            cached = dict(
                order=order,
                inverse=torch.argsort(order),
                partition_of_position=partition[order],
                offsets=offsets,
            )
            self._cache["cpu"] = cached
        return cached

    def order(self) -> torch.Tensor:
        """LongTensor ``[N]`` (CPU): frame-major token at each partition-major position."""
        return self._cpu()["order"]

    def inverse(self) -> torch.Tensor:
        """LongTensor ``[N]`` (CPU): partition-major position of each frame-major token."""
        return self._cpu()["inverse"]

    def partition_of_position(self) -> torch.Tensor:
        """LongTensor ``[N]`` (CPU): partition at each partition-major position (ascending)."""
        return self._cpu()["partition_of_position"]

    def offsets(self) -> torch.Tensor:
        """LongTensor ``[P + 1]`` (CPU): partition ``c`` holds positions ``offsets[c]`` to
        ``offsets[c + 1] - 1``."""
        return self._cpu()["offsets"]


# --------------------------------------------------------------------------- selection


def _tile_spans(num_positions: int, tile: int, front: int) -> tuple[int, int]:
    """(tiles, size of the first tile) when position ``p`` sits in tile ``(front + p) // tile``."""
    num_tiles = (front + num_positions - 1) // tile + 1
    return num_tiles, min(tile - front, num_positions)


def _tile_reduce(x: torch.Tensor, tile: int, front: int, reduce) -> torch.Tensor:
    """``reduce`` (``amax``/``any``-like, called as ``reduce(t, dim)``) of ``x [B, H, N, P]`` over
    each tile of positions along dim 2 -> ``[B, H, nT, P]``; position ``p`` is in tile
    ``(front + p) // tile``. No copy of ``x``: the aligned middle is a reshaped view."""
    num = x.shape[2]
    parts = []
    head = min(tile - front, num) if front else 0
    if head:
        parts.append(reduce(x[:, :, :head], 2)[:, :, None])
    full = (num - head) // tile
    if full:
        body = x[:, :, head : head + full * tile]
        parts.append(reduce(body.unflatten(2, (full, tile)), 3))
    if head + full * tile < num:
        parts.append(reduce(x[:, :, head + full * tile :], 2)[:, :, None])
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.amax(dim)


def _any(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.any(dim)


def _tile_chunks(num_positions: int, tile: int, front: int, positions_per_chunk: int):
    """Position ranges ``(start, stop, front_in_chunk)`` covering whole tiles, about
    ``positions_per_chunk`` positions each."""
    num_tiles, _ = _tile_spans(num_positions, tile, front)
    tiles_per_chunk = max(1, positions_per_chunk // tile)
    for first in range(0, num_tiles, tiles_per_chunk):
        last = min(first + tiles_per_chunk, num_tiles)
        start = max(0, first * tile - front)
        stop = min(num_positions, last * tile - front)
        yield start, stop, front if first == 0 else 0


def normalise_scores_(scores: torch.Tensor) -> torch.Tensor:
    """Min-max normalise ``scores [B, H, N, P]`` in place per ``(b, h)``:
    ``(s - min) / (max - min)`` (divisor 1 when ``max == min``: every value becomes 0)."""
    flat = scores.flatten(2)
    low = flat.amin(-1)[:, :, None, None]
    span = flat.amax(-1)[:, :, None, None] - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    return scores.sub_(low).div_(span)


def global_threshold_tiles(
    values: torch.Tensor, tau: float, tile: int = 1, front: int = 0
) -> torch.Tensor:
    """Bool ``[B, H, nT, P]``: tile ``q`` keeps partition ``c`` iff one of its queries' pair
    ``(i, c)`` is in the global-threshold prefix of its head (own partitions not included).

    ``values [B, H, N, P]`` are min-max normalised scores (:func:`normalise_scores_`), queries in
    the order that tiles cut (position ``p`` in tile ``(front + p) // tile``); ``tile=1`` gives the
    token-level selection. See the module docstring for the rule and the bucketing algorithm.
    """
    batch, heads, num, parts = values.shape
    tile_max = _tile_reduce(values, tile, front, _amax)  # [B, H, nT, P]
    num_tiles = tile_max.shape[2]
    boundaries = tile_max.flatten(2).sort(-1).values.contiguous()  # [B, H, K]
    buckets_per_head = boundaries.shape[-1] + 1
    if batch * heads * buckets_per_head >= 2**31:
        raise ValueError(
            f"too many (tile, partition) pairs for the int32 bucket index: {batch=} {heads=} "
            f"{num_tiles=} partitions={parts}; use a larger block_size"
        )
    base = (torch.arange(batch * heads, device=values.device, dtype=torch.int32)
            * buckets_per_head).view(batch, heads, 1)
    sums = torch.zeros(batch * heads * buckets_per_head, dtype=torch.float64, device=values.device)
    rows = max(1, _CHUNK_PAIRS // max(1, batch * heads * parts))
    for start in range(0, num, rows):
        chunk = values[:, :, start : start + rows].flatten(2)
        # bucket r = number of tile maxima strictly below v
        bucket = torch.searchsorted(boundaries, chunk.contiguous(), out_int32=True)
        sums.index_add_(0, (bucket + base).flatten(), chunk.flatten().to(torch.float64))
    sums = sums.view(batch, heads, buckets_per_head)
    above_bucket = sums.flip(-1).cumsum(-1).flip(-1)  # [r] = sum of v in buckets >= r
    total = above_bucket[..., :1]
    # G(M) = sum of v > M = buckets >= (number of tile maxima <= M)
    rank = torch.searchsorted(boundaries, tile_max.flatten(2).contiguous(), right=True)
    above = above_bucket.gather(-1, rank)
    keep = above < tau * total
    return keep.view(batch, heads, num_tiles, parts)


def topk_tiles(
    scores: torch.Tensor, k: int, own_partition: torch.Tensor, tile: int = 1, front: int = 0
) -> torch.Tensor:
    """Bool ``[B, H, nT, P]``: tile ``q`` keeps partition ``c`` iff one of its queries keeps ``c``
    among its own partition plus its ``k - 1`` best-scoring other partitions (ties at the ``k``-th
    score kept). ``scores [B, H, N, P]`` raw, ``own_partition [N]`` long on the same device."""
    batch, heads, num, parts = scores.shape
    num_tiles, _ = _tile_spans(num, tile, front)
    if k >= parts:
        return torch.ones(batch, heads, num_tiles, parts, dtype=torch.bool, device=scores.device)
    out = []
    rows = max(tile, _CHUNK_PAIRS // max(1, batch * heads * parts))
    for start, stop, chunk_front in _tile_chunks(num, tile, front, rows):
        chunk = scores[:, :, start:stop].clone()
        own = own_partition[start:stop].view(1, 1, -1, 1).expand(batch, heads, -1, 1)
        chunk.scatter_(-1, own, float("inf"))
        kth = chunk.topk(k, dim=-1, sorted=True).values[..., -1:]
        out.append(_tile_reduce(chunk >= kth, tile, chunk_front, _any))
    return torch.cat(out, dim=2)


def topk_tile_means(tile_scores: torch.Tensor, k: int, own_tiles: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, H, nT, P]`` for ``query_aggregation="mean"``: each tile keeps its own partitions
    (``own_tiles [nT, P]``) plus the ``k - 1`` best-scoring other partitions by its mean-query
    scores ``tile_scores [B, H, nT, P]`` (ties at the last kept score kept)."""
    others = tile_scores.masked_fill(own_tiles, float("-inf"))
    extra = min(k - 1, tile_scores.shape[-1])
    keep = own_tiles.expand_as(tile_scores).clone()
    if extra > 0:
        kth = others.topk(extra, dim=-1, sorted=True).values[..., -1:]
        keep |= (others >= kth) & (others > float("-inf"))
    return keep


# --------------------------------------------------------------------------- per-call structure


@dataclass(frozen=True, eq=False)
class _Structure:
    """Everything about one (layout, partition, block size, device) that does not depend on Q/K."""

    partition: VideoPartition
    layout: SequenceLayout
    block_size: int
    sequence_order: torch.Tensor | None  # [S] gather index into kernel order; None: identity
    sequence_inverse: torch.Tensor | None  # [S]
    offsets: torch.Tensor  # [P + 1] int32
    partition_of_position: torch.Tensor  # [N] long
    own_tiles: torch.Tensor  # [nTv, P] bool: partitions the tokens of each video tile live in
    tile_offsets: torch.Tensor  # [nTv + 1] int32: video positions of each query tile
    cover: torch.Tensor  # [P, nK] float32: key blocks overlapping each partition
    text_map: torch.Tensor  # [nQ, nK] bool: text rows and columns
    first_tile: int
    front: int  # video positions missing from the first video tile

    @property
    def num_blocks(self) -> int:
        return self.text_map.shape[0]


def _build_structure(layout: SequenceLayout, partition: VideoPartition, block_size: int,
                     device: torch.device) -> _Structure:
    b = block_size
    num_video, offset, total = layout.grid.num_tokens, layout.video_offset, layout.num_tokens
    num_blocks = math.ceil(total / b)
    parts = partition.num_partitions
    if partition.is_identity:
        sequence_order = sequence_inverse = None
    else:
        sequence_order = torch.arange(total)
        sequence_order[offset : offset + num_video] = partition.order() + offset
        sequence_inverse = torch.arange(total)
        sequence_inverse[offset : offset + num_video] = partition.inverse() + offset
        sequence_order, sequence_inverse = sequence_order.to(device), sequence_inverse.to(device)
    offsets = partition.offsets()
    own = partition.partition_of_position()
    front = offset % b
    own_onehot = torch.zeros(1, 1, num_video, parts, dtype=torch.bool)
    own_onehot[0, 0, torch.arange(num_video), own] = True
    own_tiles = _tile_reduce(own_onehot, b, front, _any)[0, 0]
    # Tile starts in video positions: the first tile lacks the `front` positions before the video.
    tile_offsets = torch.cat((
        torch.zeros(1, dtype=torch.long),
        torch.arange(b - front, max(num_video, b - front), b, dtype=torch.long),
        torch.tensor([num_video]),
    ))
    first_block = (offsets[:-1] + offset) // b
    last_block = (offsets[1:] - 1 + offset) // b
    blocks = torch.arange(num_blocks)
    cover = (blocks >= first_block[:, None]) & (blocks <= last_block[:, None])
    text_map = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    text = layout.text_slice
    if text is not None:
        text_blocks = slice(text.start // b, (text.stop - 1) // b + 1)
        text_map[text_blocks, :] = True
        text_map[:, text_blocks] = True
    return _Structure(
        partition=partition,
        layout=layout,
        block_size=b,
        sequence_order=sequence_order,
        sequence_inverse=sequence_inverse,
        offsets=offsets.to(device=device, dtype=torch.int32),
        partition_of_position=own.to(device),
        own_tiles=own_tiles.to(device),
        tile_offsets=tile_offsets.to(device=device, dtype=torch.int32),
        cover=cover.to(device=device, dtype=torch.float32),
        text_map=text_map.to(device),
        first_tile=offset // b,
        front=front,
    )


@dataclass(frozen=True, eq=False)
class VMoBACallPlan:
    """What :meth:`VMoBA.select` chose for one call.

    Attributes:
        sparsity: per-(batch, head) block plan over the sequence in ``sequence_order``.
        sequence_order: ``[S]`` long, the original position at each kernel position (video
            partition-major, text in place), or ``None`` when it is the identity.
        sequence_inverse: ``[S]`` long, the kernel position of each original position, or ``None``.
        partition: the partition of this layer's kind.
        tile_partitions: bool ``[B, H, nTv, P]``, partitions each video query tile visits (the
            aggregated selection, own partitions included).
    """

    sparsity: BlockSparsity
    sequence_order: torch.Tensor | None
    sequence_inverse: torch.Tensor | None
    partition: VideoPartition
    tile_partitions: torch.Tensor

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` in original order -> kernel order (dim 1)."""
        return x if self.sequence_order is None else x.index_select(1, self.sequence_order)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` in kernel order -> original order (dim 1)."""
        return y if self.sequence_inverse is None else y.index_select(1, self.sequence_inverse)


@dataclass(frozen=True)
class VMoBAStats:
    """Densities of one call's selection (:meth:`VMoBA.analyze`); video x video pairs unless said.

    Attributes:
        kind: partition kind of the layer ("1d", "2d", "3d").
        box: partition box ``(bT, bH, bW)``; ``num_partitions``: their number.
        token_density: (query, key) pairs the token-level rule selects (own partitions included),
            over ``N**2``, mean over batch and heads.
        tile_density: pairs computed after the query-tile aggregation (union or mean), before
            key-block rounding.
        computed_density: pairs the block plan computes (tile union and key-block rounding).
        block_density: visited (query tile, key block) pairs of the whole plan (text included),
            over ``nQ * nK``: the density the attention call reports.
    """

    kind: str
    box: tuple[int, int, int]
    num_partitions: int
    token_density: float
    tile_density: float
    computed_density: float
    block_density: float


# --------------------------------------------------------------------------- the method


def _check_sizes(partition_sizes) -> tuple[tuple[int, ...], ...] | None:
    if partition_sizes is None:
        return None
    try:
        entries = list(partition_sizes)
    except TypeError:
        entries = []
    if len(entries) != 3:
        raise ValueError(
            "partition_sizes must be ((sT,), (sH, sW), (sT, sH, sW)) or None, got "
            f"partition_sizes={partition_sizes!r}"
        )
    out = []
    for kind, entry in zip(PARTITION_KINDS, entries):
        values = (entry,) if isinstance(entry, numbers.Integral) else tuple(entry)
        expected = len(_KIND_DIMS[kind])
        if len(values) != expected:
            raise ValueError(
                f"partition_sizes[{PARTITION_KINDS.index(kind)}] ({kind}) must have {expected} "
                f"entries, got {entry!r} in partition_sizes={partition_sizes!r}"
            )
        values = tuple(as_int(f"partition_sizes ({kind})", v) for v in values)
        if min(values) < 1:
            raise ValueError(f"partition sizes must be >= 1, got {kind} {values}")
        out.append(values)
    return tuple(out)


@dataclass(frozen=True)
class VMoBA(Method):
    """VMoBA (Wu et al., 2025): per-head mixture-of-block attention chosen from Q and K per call.

    The exact rule, the tile aggregation and the costs are in this module's docstring.

    Attributes:
        tau: global-threshold share of the head's total normalised similarity, in (0, 1]
            (paper default 0.25).
        partition_sizes: ``((sT,), (sH, sW), (sT, sH, sW))`` in latent tokens for the 1D, 2D and 3D
            layers (the paper's "block sizes"), or ``None`` for the published sizes on the
            published grids and the documented rule elsewhere.
        selection: ``"global_threshold"`` (the paper's) or ``"topk"`` (the reference code's
            training-free mode).
        topk: ``(k_1D, k_2D, k_3D)`` partitions per query in ``"topk"`` mode, own partition
            included (the paper's training-free Wan 480p values 2/6/18).
        block_size: kernel query tile and key block (64 or 128).
        query_aggregation: how a query tile's selection follows from its queries: ``"union"``
            (every token's selection is computed) or ``"mean"`` (the tile's mean query selects);
            see the module docstring.
        dense_steps, dense_last_steps, dense_layers: the dense schedule (ints count, floats are
            fractions): the paper's training-free setting runs the first 25% of the steps dense.
    """

    name = "vmoba"

    tau: float = 0.25
    partition_sizes: tuple | None = None
    selection: str = "global_threshold"
    topk: tuple[int, int, int] = (2, 6, 18)
    block_size: int = 128
    query_aggregation: str = "mean"
    dense_steps: int | float = 0.25
    dense_last_steps: int | float = 0
    dense_layers: int | float = 0
    _cache: PlanCache = field(default_factory=PlanCache, init=False, repr=False, compare=False)

    # fastdit.apply(..., quantize="int8") runs the selected blocks on the INT8 kernel.
    accepts_quantize = True

    # Selections are per (batch, head): runs on Ulysses head shards (fastdit.parallel).
    head_parallel = True

    def __post_init__(self) -> None:
        tau = self.tau
        if (
            isinstance(tau, bool)
            or not isinstance(tau, numbers.Real)
            or not math.isfinite(float(tau))
            or not 0.0 < float(tau) <= 1.0
        ):
            raise ValueError(f"tau must be a number in (0, 1], got tau={tau!r}")
        object.__setattr__(self, "tau", float(tau))
        object.__setattr__(self, "partition_sizes", _check_sizes(self.partition_sizes))
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"selection must be one of {SELECTIONS}, got selection={self.selection!r}"
            )
        try:
            topk = tuple(self.topk)
        except TypeError:
            topk = ()
        if len(topk) != 3:
            raise ValueError(f"topk must be (k_1D, k_2D, k_3D), got topk={self.topk!r}")
        topk = tuple(as_int("topk", k) for k in topk)
        if min(topk) < 1:
            raise ValueError(f"topk entries must be >= 1, got topk={topk}")
        object.__setattr__(self, "topk", topk)
        block = self.block_size
        if isinstance(block, bool) or block not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got block_size={block!r}"
            )
        object.__setattr__(self, "block_size", int(block))
        if self.query_aggregation not in QUERY_AGGREGATIONS:
            raise ValueError(
                f"query_aggregation must be one of {QUERY_AGGREGATIONS}, got "
                f"query_aggregation={self.query_aggregation!r}"
            )
        schedule = Schedule(self.dense_steps, self.dense_last_steps, self.dense_layers)  # validates
        for name in ("dense_steps", "dense_last_steps", "dense_layers"):
            object.__setattr__(self, name, getattr(schedule, name))

    # ------------------------------------------------------------------ partitions
    def resolve_partition_sizes(self, grid: LatentGrid) -> tuple[tuple[int, ...], ...]:
        """The ``((sT,), (sH, sW), (sT, sH, sW))`` used on ``grid`` (explicit ones clamped)."""
        if self.partition_sizes is None:
            return default_partition_sizes(grid)
        return tuple(
            tuple(min(s, grid.shape[d]) for d, s in zip(_KIND_DIMS[kind], sizes))
            for kind, sizes in zip(PARTITION_KINDS, self.partition_sizes)
        )

    def partition(self, grid: LatentGrid, layer: int) -> VideoPartition:
        """The partition of ``grid`` that transformer layer ``layer`` uses (kind ``layer % 3``)."""
        kind = PARTITION_KINDS[layer % 3]
        box = list(grid.shape)
        for d, s in zip(_KIND_DIMS[kind], self.resolve_partition_sizes(grid)[layer % 3]):
            box[d] = s
        return VideoPartition(grid, tuple(box))

    def _structure(self, layout: SequenceLayout, layer: int, device: torch.device) -> _Structure:
        device = device_key(device)
        return self._cache.get_or_build(
            (layout, layer % 3, device),
            lambda: _build_structure(layout, self.partition(layout.grid, layer), self.block_size, device),
        )

    # ------------------------------------------------------------------ static interface
    def plan(self, layout: SequenceLayout | LatentGrid, device: Device = None) -> MethodPlan:
        """The static part: a dense plan in frame-major order (no permutation); the sparse plan is
        chosen per call by :meth:`attend`."""
        if isinstance(layout, LatentGrid):
            layout = SequenceLayout(layout)
        device = device_key(device)
        n = layout.num_tokens
        return self._cache.get_or_build(
            ("plan", layout, device),
            lambda: MethodPlan(BlockSparsity.dense(n, n, self.block_size, device=device), layout),
        )

    def new_runtime(self) -> None:
        """VMoBA keeps no state between calls: every sparse call selects from its own Q and K."""
        return None

    # ------------------------------------------------------------------ per call
    @staticmethod
    def _mean_keys(key: torch.Tensor, structure: _Structure) -> torch.Tensor:
        """fp32 ``[B, H, P, D]``: each partition's mean key; K ``[B, S, H, D]`` in kernel order."""
        video = structure.layout.video_slice
        return segment_mean_pool(key[:, video], structure.offsets, validate=False)

    def _tile_mean_scores(
        self, query: torch.Tensor, key: torch.Tensor, structure: _Structure
    ) -> torch.Tensor:
        """fp32 ``[B, H, nTv, P]``: each query tile's mean video query against the mean keys."""
        video = structure.layout.video_slice
        mean_queries = segment_mean_pool(query[:, video], structure.tile_offsets, validate=False)
        return torch.einsum("bhtd,bhpd->bhtp", mean_queries, self._mean_keys(key, structure))

    def _scores(
        self, query: torch.Tensor, key: torch.Tensor, structure: _Structure
    ) -> torch.Tensor:
        """Raw scores fp32 ``[B, H, N, P]`` of the video queries (partition-major) against the
        partitions' mean keys; Q/K ``[B, S, H, D]`` already in kernel order."""
        query_video = query[:, structure.layout.video_slice]
        mean_keys = self._mean_keys(key, structure)  # [B, H, P, D]
        batch, num, heads, head_dim = query_video.shape
        parts = mean_keys.shape[2]
        scores = torch.empty(batch, heads, num, parts, dtype=torch.float32, device=query.device)
        rows = max(1, _CHUNK_PAIRS // max(1, batch * heads * max(head_dim, parts)))
        for start in range(0, num, rows):
            q = query_video[:, start : start + rows].to(torch.float32)
            scores[:, :, start : start + rows] = torch.einsum("bnhd,bhpd->bhnp", q, mean_keys)
        return scores

    def select(
        self, query: torch.Tensor, key: torch.Tensor, layout: SequenceLayout, layer: int
    ) -> VMoBACallPlan:
        """The block plan of one call: Q/K ``[B, S, H, D]`` in original (frame-major) order."""
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"layout must be a SequenceLayout, got layout={layout!r}")
        if query.dim() != 4 or key.shape != query.shape or query.shape[1] != layout.num_tokens:
            raise ValueError(
                f"query and key must be [B, S={layout.num_tokens}, H, D] for the layout "
                f"(grid {layout.grid.shape}, text {layout.text_length}), got "
                f"{tuple(query.shape)} and {tuple(key.shape)}"
            )
        structure = self._structure(layout, layer, query.device)
        order = structure.sequence_order
        if order is not None:
            query, key = query.index_select(1, order), key.index_select(1, order)
        tiles = self._tile_partitions(query, key, structure, layer)
        sparsity = self._sparsity(tiles, structure)
        return VMoBACallPlan(
            sparsity, order, structure.sequence_inverse, structure.partition, tiles
        )

    def _tile_partitions(self, query, key, structure: _Structure, layer: int) -> torch.Tensor:
        if self.query_aggregation == "mean":
            tile_scores = self._tile_mean_scores(query, key, structure)
            if self.selection == "topk":
                return topk_tile_means(tile_scores, self.topk[layer % 3], structure.own_tiles)
            keep = global_threshold_tiles(normalise_scores_(tile_scores), self.tau)
            return keep | structure.own_tiles
        scores = self._scores(query, key, structure)
        b, front = structure.block_size, structure.front
        if self.selection == "topk":
            k = self.topk[layer % 3]
            return topk_tiles(scores, k, structure.partition_of_position, b, front)
        keep = global_threshold_tiles(normalise_scores_(scores), self.tau, b, front)
        return keep | structure.own_tiles

    def _sparsity(self, tiles: torch.Tensor, structure: _Structure) -> BlockSparsity:
        batch, heads, num_tiles, _ = tiles.shape
        video_rows = torch.matmul(tiles.to(torch.float32), structure.cover) > 0  # [B, H, nTv, nK]
        block_map = structure.text_map.expand(batch, heads, -1, -1).clone()
        rows = slice(structure.first_tile, structure.first_tile + num_tiles)
        block_map[:, :, rows] |= video_rows
        return BlockSparsity.from_block_map(
            block_map, self.block_size, max_kv=structure.num_blocks
        )

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention of one call; Q/K/V ``[B, S, H, D]`` in frame-major order (the plan from
        :meth:`plan` has no permutation). Returns the output in the same order and the block
        density it ran at (a 0-d tensor: no host synchronisation here)."""
        if call.plan.permutation is not None:
            raise ValueError(
                "VMoBA reorders tokens per call; its MethodPlan must carry no permutation"
            )
        selected = self.select(query, key, call.layout, call.layer)
        out = block_sparse_attention(
            selected.permute(query), selected.permute(key), selected.permute(value),
            selected.sparsity, key_padding=call.key_padding, quantize=call.quantize,
        )
        counts = selected.sparsity.kv_counts
        total = counts.numel() * selected.sparsity.num_kv_blocks
        density = counts.sum(dtype=torch.float32) / total
        return selected.unpermute(out), density

    # ------------------------------------------------------------------ reporting
    def analyze(
        self, query: torch.Tensor, key: torch.Tensor, layout: SequenceLayout, layer: int
    ) -> VMoBAStats:
        """Token-level density of the rule next to the densities the block plan computes.

        Runs the selection at token level too (``tile = 1``: a sort of ``N * P`` values per head),
        so it is meant for reports, not for the denoising loop; host reads allowed.
        """
        selected = self.select(query, key, layout, layer)
        structure = self._structure(layout, layer, query.device)
        order = structure.sequence_order
        q, k = (x if order is None else x.index_select(1, order) for x in (query, key))
        scores = self._scores(q, k, structure)
        if self.selection == "topk":
            tokens = topk_tiles(scores, self.topk[layer % 3], structure.partition_of_position)
        else:
            own = torch.nn.functional.one_hot(
                structure.partition_of_position, structure.partition.num_partitions
            ).bool()
            tokens = global_threshold_tiles(normalise_scores_(scores), self.tau) | own
        offsets = structure.offsets.to(torch.float64)
        sizes = offsets[1:] - offsets[:-1]
        num = float(layout.grid.num_tokens)
        token_pairs = (tokens.to(torch.float64) @ sizes).sum((-1,)).mean()
        b, front = structure.block_size, structure.front
        video_rows_per_tile = _tile_reduce(
            torch.ones(1, 1, int(num), 1, dtype=torch.float64, device=query.device),
            b, front, lambda t, d: t.sum(d),
        )[0, 0, :, 0]
        tile_pairs = selected.tile_partitions.to(torch.float64) @ sizes  # [B, H, nTv]
        tile_pairs = (tile_pairs * video_rows_per_tile).sum(-1).mean()
        block_map = selected.sparsity.to_block_map().to(torch.float64)
        video_positions = torch.zeros(layout.num_tokens, dtype=torch.float64, device=query.device)
        video_positions[layout.video_slice] = 1.0
        per_block = torch.zeros(structure.num_blocks, dtype=torch.float64, device=query.device)
        per_block.index_add_(
            0, torch.arange(layout.num_tokens, device=query.device) // b, video_positions
        )
        computed = (per_block @ block_map @ per_block).mean()
        return VMoBAStats(
            kind=PARTITION_KINDS[layer % 3],
            box=structure.partition.box,
            num_partitions=structure.partition.num_partitions,
            token_density=float(token_pairs) / num**2,
            tile_density=float(tile_pairs) / num**2,
            computed_density=float(computed) / num**2,
            block_density=selected.sparsity.density,
        )
