"""Generalized Neighborhood Attention, GNA (Hassani et al., 2025), with NATTEN's window semantics.

The rule, per dimension (T, H, W) with extent ``X``, window ``w``, stride ``s``, dilation ``d``
(non-causal), for a query at coordinate ``q`` and a key at coordinate ``k``:

* dilation groups: ``g = x mod d``, in-group coordinate ``x' = x // d``, group length
  ``X_g = ceil((X - g) / d)``; query and key must share the group, the rest works on ``x'``;
* ``L = w // 2``, ``R = w // 2 + (w % 2) - 1`` (even ``w``: one fewer key on the right);
* stride-group leader ``lead(q) = min((q' // s) * s + s // 2, X_g - 1)``, centre
  ``c = clamp(lead(q), L, X_g - 1 - R)``; the allowed keys are ``k' in [c - L, c + R]``: always
  exactly ``w`` keys, the window shifts inward at borders instead of shrinking.

The 3-D mask is the AND of the three 1-D masks, so it is never materialised: everything below
works on the per-dimension ``[X, X]`` matrices (:func:`allowed_1d`). ``s = 1`` is neighborhood
attention, ``s = w`` blocked (Swin-like) attention, ``s = tile, w = odd * tile`` Sliding Tile
Attention. Validation (NATTEN's): ``w * d <= X`` and ``1 <= s <= w``.

Block-level reduction. The video tokens are reordered tile-major
(:class:`~fastdit.layout.TilePermutation`) with a tile whose volume divides ``block_size`` (by
default it equals it, so query tile == key tile == kernel block). Tiles are products of
per-dimension intervals, so the number of allowed (query, key) pairs of every (query block, key
block) is a product of per-dimension tile-level counts, reduced to blocks without building an
``N x N`` mask. A block with every pair allowed is *full* and runs unmasked; a block with some
pairs allowed is *partial* and runs with a :class:`~fastdit.kernels.WindowMask` (per-token window
starts and coordinates), which applies the rule above per pair inside the kernel. The plan
therefore always computes exactly GNA. When there are no partial blocks ("perfectly
block-sparse": stride a multiple of the query tile and window starts aligned with key tiles) the
kernel does no element masking at all; :meth:`GNA.check` says whether that holds, how much work
the partial blocks waste (``extra_pairs_fraction``) and why.

Padding rule. A tile that does not divide the grid leaves padding positions inside the permuted
sequence; they are zero vectors whose logit 0 would receive softmax weight, and the kernel's
``key_padding`` (one valid length per batch element) cannot mask positions in the middle of the
sequence. So a tile must divide every grid extent: :meth:`GNA.plan` raises otherwise, naming a
tile that does divide. With ``tile=None`` the tile is chosen per grid by :func:`choose_tile`.

Text tokens are dense: every block that holds a text position is kept as a query row and as a key
column (text queries attend to everything, video queries attend to all text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity, WindowMask
from ..layout import LatentGrid, SequenceLayout, TilePermutation, device_key, positive_int
from .base import Method, MethodPlan, PlanCache

__all__ = [
    "GNA", "GNACheck", "allowed_1d", "check_dimension", "choose_tile", "int_tuple", "neighborhood_1d",
]

DIM_NAMES = ("T", "H", "W")
# Above this many (tile x block) entries, choose_tile does not verify multi-tile blocks for
# perfect block sparsity (they are treated as not perfect, which is always safe).
_MAX_VERIFY_ENTRIES = 1 << 23


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def int_tuple(name: str, value: object, ndim: int) -> tuple[int, ...]:
    """An int (repeated ``ndim`` times) or a length-``ndim`` sequence of positive ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(f"{name} must be an int or have {ndim} entries, got {name}={value!r}")
        return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    v = positive_int(name, value)
    return (v,) * ndim


def check_dimension(
    extent: int, window: int, stride: int, dilation: int, *, window_name: str = "window", dim: str = ""
) -> None:
    """Raise ValueError unless ``1 <= stride <= window`` and ``window * dilation <= extent``."""
    where = f" in dimension {dim}" if dim else ""
    if not 1 <= stride <= window:
        raise ValueError(
            f"stride must be in [1, {window_name}]{where}, got {stride=} for {window_name}={window}"
        )
    if window * dilation > extent:
        raise ValueError(
            f"{window_name} * dilation must be <= extent{where}, got {window_name}={window}, "
            f"{dilation=} for {extent=}"
        )


# --------------------------------------------------------------------------- #
# Per-dimension rule
# --------------------------------------------------------------------------- #


def neighborhood_1d(
    extent: int, window: int, stride: int = 1, dilation: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """LongTensor ``[extent]``: the first allowed key of each query, in original coordinates.

    Query ``q`` attends to exactly the ``window`` keys ``start[q] + j * dilation``, ``j < window``.
    """
    check_dimension(extent, window, stride, dilation)
    x = torch.arange(extent, device=device, dtype=torch.long)
    group = x % dilation
    x_in_group = x // dilation
    group_length = (extent - group + dilation - 1) // dilation
    left = window // 2
    right = window // 2 + window % 2 - 1
    lead = torch.minimum((x_in_group // stride) * stride + stride // 2, group_length - 1)
    centre = torch.minimum(lead.clamp(min=left), group_length - 1 - right)
    return (centre - left) * dilation + group


def allowed_1d(
    extent: int, window: int, stride: int = 1, dilation: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """BoolTensor ``[extent, extent]``: ``[q, k]`` is True iff key ``k`` is in query ``q``'s window."""
    start = neighborhood_1d(extent, window, stride, dilation, device)
    k = torch.arange(extent, device=device, dtype=torch.long)
    offset = k[None, :] - start[:, None]
    return (offset >= 0) & (offset % dilation == 0) & (offset < window * dilation)


def _tile_counts(allowed: torch.Tensor, tile: int) -> torch.Tensor:
    """``[n, n]`` allowed pairs per (query tile, key tile) of a 1-D mask whose extent ``tile`` divides."""
    n = allowed.shape[0] // tile
    return allowed.reshape(n, tile, n, tile).sum(dim=(1, 3))


def _divisors_dividing(extent: int, block_size: int) -> list[int]:
    return [t for t in range(1, min(extent, block_size) + 1) if extent % t == 0 and block_size % t == 0]


# --------------------------------------------------------------------------- #
# Block reduction
# --------------------------------------------------------------------------- #


def _reduce_to_blocks(
    per_dim: list[torch.Tensor],
    tile: tuple[int, int, int],
    video_offset: int,
    num_blocks: int,
    block_size: int,
) -> torch.Tensor:
    """Float64 ``[num_blocks, num_blocks]``: ``sum over tile pairs touching the two blocks of
    prod_d per_dim[d][tile_d(q), tile_d(k)]``, with the tiles in tile-major order from sequence
    position ``video_offset``.

    With ``covers[tile, block]`` = "block holds a position of tile", this is
    ``covers^T (P_t (x) P_h (x) P_w) covers``, applied one dimension at a time (no ``N x N``).
    """
    device = per_dim[0].device
    t, h, w = (m.to(torch.float64) for m in per_dim)
    nt, nh, nw = t.shape[0], h.shape[0], w.shape[0]
    num_tiles, volume = nt * nh * nw, tile[0] * tile[1] * tile[2]
    if volume == block_size and video_offset % block_size == 0:
        # One tile per block: a Kronecker product of the per-dimension matrices.
        out = torch.zeros(num_blocks, num_blocks, dtype=torch.float64, device=device)
        first = video_offset // block_size
        kron = (t[:, None, None, :, None, None] * h[None, :, None, None, :, None]) * w[None, None, :, None, None, :]
        out[first : first + num_tiles, first : first + num_tiles] = kron.reshape(num_tiles, num_tiles)
        return out
    positions = torch.arange(num_tiles * volume, device=device)
    covers = torch.zeros(num_tiles, num_blocks, dtype=torch.float64, device=device)
    covers[positions // volume, (positions + video_offset) // block_size] = 1.0
    z = covers.reshape(nt, nh, nw, num_blocks)
    z = torch.einsum("xa,abcq->xbcq", t, z)
    z = torch.einsum("yb,xbcq->xycq", h, z)
    z = torch.einsum("zc,xycq->xyzq", w, z)
    return covers.T @ z.reshape(num_tiles, num_blocks)


def _video_block_map(
    tile_maps: list[torch.Tensor],
    tile: tuple[int, int, int],
    video_offset: int,
    num_blocks: int,
    block_size: int,
) -> torch.Tensor:
    """BoolTensor ``[num_blocks, num_blocks]``: blocks holding an allowed (video, video) pair.

    ``tile_maps[d]`` is dimension ``d``'s ``[n_d, n_d]`` tile-level map; video position ``p`` of the
    tile-major sequence (no padding) sits at sequence position ``video_offset + p``.
    """
    return _reduce_to_blocks(tile_maps, tile, video_offset, num_blocks, block_size) > 0


def _video_block_pairs(
    tile_counts: list[torch.Tensor],
    tile: tuple[int, int, int],
    video_offset: int,
    num_blocks: int,
    block_size: int,
) -> torch.Tensor | None:
    """Float64 ``[num_blocks, num_blocks]``: allowed (video, video) token pairs per block pair.

    ``tile_counts[d]`` is dimension ``d``'s ``[n_d, n_d]`` allowed pairs per tile pair; a tile
    pair's 3-D count is their product. Exact when no tile straddles two blocks (the video starts
    on a tile boundary); ``None`` otherwise.
    """
    if video_offset % (tile[0] * tile[1] * tile[2]):
        return None
    return _reduce_to_blocks(tile_counts, tile, video_offset, num_blocks, block_size)


def _outer_and(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The 3-D mask ``[nt*nh*nw, nt*nh*nw]`` (frame-major on both sides) of three 1-D masks."""
    n = t.shape[0] * h.shape[0] * w.shape[0]
    mask = t[:, None, None, :, None, None] & h[None, :, None, None, :, None]
    return (mask & w[None, None, :, None, None, :]).reshape(n, n)


def _block_sizes(num_video: int, video_offset: int, num_blocks: int, block_size: int, device):
    """Video positions per block, float64 ``[num_blocks]``."""
    positions = torch.arange(num_video, device=device) + video_offset
    return torch.bincount(positions // block_size, minlength=num_blocks).to(torch.float64)


@dataclass(frozen=True)
class GNACheck:
    """How well a GNA configuration maps onto block plans for one grid and tile.

    Attributes:
        tile, block_size: the tile and kernel block the check is for.
        perfectly_block_sparse: every kept block is fully allowed, so the kernel runs no element
            mask (otherwise partial blocks run with a window mask: still exact, slower per block).
        token_density: allowed (query, key) pairs over ``N^2``.
        block_density: kept blocks (full and partial) over all blocks.
        extra_pairs_fraction: pairs inside kept blocks that the window rule masks out, over all
            pairs of kept blocks: the work partial blocks waste (0 when perfect).
        reason: why the configuration is not perfectly block-sparse ("" when it is).
    """

    tile: tuple[int, int, int]
    block_size: int
    perfectly_block_sparse: bool
    token_density: float
    block_density: float
    extra_pairs_fraction: float
    reason: str = ""


# --------------------------------------------------------------------------- #
# Method
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class GNA(Method):
    """Generalized Neighborhood Attention (Hassani et al., 2025) over the video tokens.

    The exact per-dimension rule is in this module's docstring (NATTEN semantics).

    Attributes:
        window: ``(wT, wH, wW)`` keys per query in each dimension (an int means all three).
        stride: ``(sT, sH, sW)``, ``1 <= s <= w``; ``s = w`` is Swin-like blocked attention.
        dilation: ``(dT, dH, dW)``; ``w * d`` must not exceed the grid extent.
        tile: ``(tT, tH, tW)`` of the tile-major order; its volume must divide ``block_size`` and
            each entry must divide the grid extent (see the module's padding rule). ``None``
            (default) picks, per grid, :func:`choose_tile`'s tile: perfectly block-sparse if one
            exists, else the largest volume (ideally ``block_size``) with the sparsest plan.
        block_size: kernel block (64 or 128).
    """

    name = "gna"

    window: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    dilation: tuple[int, int, int] = (1, 1, 1)
    tile: tuple[int, int, int] | None = None
    block_size: int = 128
    _cache: PlanCache = field(default_factory=PlanCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        window = int_tuple("window", self.window, 3)
        stride = int_tuple("stride", self.stride, 3)
        dilation = int_tuple("dilation", self.dilation, 3)
        for dim, w, s in zip(DIM_NAMES, window, stride):
            if not 1 <= s <= w:
                raise ValueError(
                    f"stride must be in [1, window] in dimension {dim}, got {stride=} for {window=}"
                )
        block_size = positive_int("block_size", self.block_size)
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size=}")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "block_size", block_size)
        if self.tile is not None:
            if not isinstance(self.tile, (list, tuple)):
                raise ValueError(f"tile must be a tuple (tT, tH, tW) or None, got tile={self.tile!r}")
            tile = int_tuple("tile", self.tile, 3)
            volume = tile[0] * tile[1] * tile[2]
            if block_size % volume:
                raise ValueError(
                    f"tile volume must divide block_size, got tile={tile} (volume {volume}) "
                    f"for {block_size=}"
                )
            object.__setattr__(self, "tile", tile)

    # -- per grid ------------------------------------------------------------ #

    def _check_grid(self, grid: LatentGrid) -> None:
        if not isinstance(grid, LatentGrid):
            raise ValueError(f"grid must be a LatentGrid, got grid={grid!r}")
        for dim, extent, w, s, d in zip(DIM_NAMES, grid.shape, self.window, self.stride, self.dilation):
            check_dimension(extent, w, s, d, dim=dim)

    def resolve_tile(self, grid: LatentGrid) -> tuple[int, int, int]:
        """The tile used for ``grid``: the explicit one (checked to divide the grid) or the chosen one."""
        self._check_grid(grid)
        if self.tile is None:
            return self._cache.get_or_build(
                ("tile", grid),
                lambda: choose_tile(grid, self.window, self.stride, self.dilation, self.block_size),
            )
        if any(extent % t for extent, t in zip(grid.shape, self.tile)):
            suggestion = choose_tile(grid, self.window, self.stride, self.dilation, self.block_size)
            raise ValueError(
                f"tile must divide the grid in every dimension (padding tokens inside the sequence "
                f"cannot be masked), got tile={self.tile} for grid={grid.shape}; "
                f"try tile={suggestion} or tile=None"
            )
        return self.tile

    def check_grid(self, grid: LatentGrid) -> None:
        """Raise ``ValueError`` unless this configuration runs on ``grid``: window, stride and
        dilation fit every extent, and an explicit tile divides it (``fastdit generate`` asks
        before generating)."""
        self.resolve_tile(grid)

    def allowed_1d(self, grid: LatentGrid, device=None) -> list[torch.Tensor]:
        """The three per-dimension ``[X, X]`` masks for ``grid`` (T, H, W)."""
        self._check_grid(grid)
        return [
            allowed_1d(extent, w, s, d, device)
            for extent, w, s, d in zip(grid.shape, self.window, self.stride, self.dilation)
        ]

    def token_mask(self, grid: LatentGrid, device=None) -> torch.Tensor:
        """BoolTensor ``[N, N]`` in frame-major order: the exact GNA mask (small grids, tests only)."""
        return _outer_and(*self.allowed_1d(grid, device))

    def _tile_maps(self, grid: LatentGrid, tile, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        masks = self.allowed_1d(grid, device)
        counts = [_tile_counts(m, t) for m, t in zip(masks, tile)]
        return masks, counts

    def block_map(self, layout: SequenceLayout, device=None) -> torch.Tensor:
        """BoolTensor ``[1, 1, nQ, nK]`` over the tile-major permuted sequence (text dense)."""
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"layout must be a SequenceLayout, got layout={layout!r}")
        grid = layout.grid
        tile = self.resolve_tile(grid)
        _, counts = self._tile_maps(grid, tile, device)
        num_blocks = math.ceil(layout.num_tokens / self.block_size)
        tile_maps = [c > 0 for c in counts]
        out = _video_block_map(tile_maps, tile, layout.video_offset, num_blocks, self.block_size)
        text = layout.text_slice
        if text is not None:
            first, last = text.start // self.block_size, (text.stop - 1) // self.block_size
            out[first : last + 1, :] = True
            out[:, first : last + 1] = True
        return out[None, None]

    def check(self, grid: LatentGrid) -> GNACheck:
        """Density of the token mask and of the block plan for ``grid`` (video only), and the gap."""
        tile = self.resolve_tile(grid)
        return _check(grid, self.window, self.stride, self.dilation, tile, self.block_size)

    def plan(self, layout: SequenceLayout, device=None) -> MethodPlan:
        """The exact plan over ``permutation.permute_sequence`` order: full blocks unmasked, partial
        blocks under a window mask; cached per layout and device."""
        device = device_key(device)
        return self._cache.get_or_build((layout, device), lambda: self._build_plan(layout, device))

    def _build_plan(self, layout: SequenceLayout, device) -> MethodPlan:
        grid, block = layout.grid, self.block_size
        tile = self.resolve_tile(grid)
        permutation = TilePermutation(grid, tile)
        kept = self.block_map(layout, device=device)[0, 0]
        _, counts = self._tile_maps(grid, tile, device)
        num_blocks = kept.shape[0]
        pairs = _video_block_pairs(counts, tile, layout.video_offset, num_blocks, block)
        if pairs is None:  # tiles straddle blocks: treat every kept block as partial (still exact)
            full = torch.zeros_like(kept)
        else:
            video = _block_sizes(grid.num_tokens, layout.video_offset, num_blocks, block, kept.device)
            # Blocks without video on one side (text only) are fully allowed: 0 == 0.
            full = kept & (pairs == video[:, None] * video[None, :])
        partial = kept & ~full
        sparsity = BlockSparsity.from_block_map(full[None, None], block)
        window_mask = None
        if bool(partial.any()):
            window_mask = WindowMask(
                BlockSparsity.from_block_map(partial[None, None], block),
                self._query_starts(layout, permutation, kept.device),
                permutation.permute_sequence(layout.token_coords(kept.device), layout, dim=0).to(torch.int32),
                self.window,
                self.dilation,
            )
        return MethodPlan(sparsity, layout, permutation, window_mask)

    def _query_starts(self, layout: SequenceLayout, permutation: TilePermutation, device) -> torch.Tensor:
        """int32 ``[S, 3]`` first allowed key coordinate per dimension, in the plan's order (text -1)."""
        coords = layout.token_coords(device)
        video = coords[:, 0] >= 0
        starts = torch.full_like(coords, -1)
        for dim, (extent, w, s, d) in enumerate(zip(layout.grid.shape, self.window, self.stride, self.dilation)):
            first = neighborhood_1d(extent, w, s, d, device)
            starts[video, dim] = first[coords[video, dim]]
        return permutation.permute_sequence(starts, layout, dim=0).to(torch.int32)


def _check(grid, window, stride, dilation, tile, block_size) -> GNACheck:
    masks = [allowed_1d(x, w, s, d) for x, w, s, d in zip(grid.shape, window, stride, dilation)]
    counts = [_tile_counts(m, t) for m, t in zip(masks, tile)]
    n = grid.num_tokens
    num_blocks = math.ceil(n / block_size)
    block = _video_block_map([c > 0 for c in counts], tile, 0, num_blocks, block_size)
    sizes = _block_sizes(n, 0, num_blocks, block_size, block.device)
    computed = float(sizes @ block.to(torch.float64) @ sizes)
    allowed = math.prod(int(m.sum()) for m in masks)
    extra = computed - allowed
    perfect = extra == 0
    reason = ""
    if not perfect:
        mixed = []
        for dim, c, t, w, s, d in zip(DIM_NAMES, counts, tile, window, stride, dilation):
            partial = int(((c > 0) & (c < t * t)).sum())
            if partial:
                mixed.append(
                    f"{dim}: window={w}, stride={s}, dilation={d} with tile {t} leaves {partial} of "
                    f"{int((c > 0).sum())} visited tile pairs partially allowed"
                )
        if mixed:
            reason = "; ".join(mixed) + (
                " (stride must be a multiple of the tile and window starts aligned with key tiles)"
            )
        else:
            volume = tile[0] * tile[1] * tile[2]
            reason = (
                f"each {block_size}-token block holds {block_size // volume} tiles of {tile} and mixes "
                f"allowed and disallowed tile pairs; use a tile of volume {block_size}"
            )
    return GNACheck(
        tile=tuple(tile),
        block_size=block_size,
        perfectly_block_sparse=perfect,
        token_density=allowed / n**2,
        block_density=float(block.to(torch.float64).mean()),
        extra_pairs_fraction=extra / computed if computed else 0.0,
        reason=reason,
    )


def choose_tile(
    grid: LatentGrid,
    window,
    stride=1,
    dilation=1,
    block_size: int = 128,
    perfect_only: bool = False,
) -> tuple[int, int, int] | None:
    """A tile for GNA on ``grid``: every entry divides its extent and the volume divides ``block_size``.

    Preference: perfectly block-sparse tiles first, then larger volume (``block_size`` itself when
    the grid allows), then the sparsest plan (product of per-dimension tile-level densities; exact
    for one tile per block). ``perfect_only`` returns ``None`` when no tile is perfect.
    """
    window = int_tuple("window", window, 3)
    stride = int_tuple("stride", stride, 3)
    dilation = int_tuple("dilation", dilation, 3)
    for dim, extent, w, s, d in zip(DIM_NAMES, grid.shape, window, stride, dilation):
        check_dimension(extent, w, s, d, dim=dim)
    # Per dimension and tile size: (tile-level density, no partially allowed tile pair).
    per_dim = []
    for extent, w, s, d in zip(grid.shape, window, stride, dilation):
        mask = allowed_1d(extent, w, s, d)
        stats = {}
        for t in _divisors_dividing(extent, block_size):
            c = _tile_counts(mask, t)
            stats[t] = (float((c > 0).to(torch.float64).mean()), not bool(((c > 0) & (c < t * t)).any()))
        per_dim.append(stats)
    candidates = []
    for tt, st in per_dim[0].items():
        for th, sh in per_dim[1].items():
            for tw, sw in per_dim[2].items():
                volume = tt * th * tw
                if block_size % volume:
                    continue
                pure = st[1] and sh[1] and sw[1]
                density = st[0] * sh[0] * sw[0]
                candidates.append((not pure, -volume, density, (-tw, -th), (tt, th, tw)))
    candidates.sort()
    for not_pure, neg_volume, _, _, tile in candidates:
        if not_pure:
            break
        if -neg_volume == block_size:
            return tile  # one tile per block: per-dimension purity is exactly perfection
        num_tiles = grid.num_tokens // -neg_volume
        if num_tiles * math.ceil(grid.num_tokens / block_size) > _MAX_VERIFY_ENTRIES:
            continue
        if _check(grid, window, stride, dilation, tile, block_size).perfectly_block_sparse:
            return tile
    if perfect_only:
        return None
    best = min(candidates, key=lambda c: (c[1], c[2], c[3]))
    return best[4]
