"""Token layout of a video diffusion transformer's self-attention sequence.

This module is the first stage of the fastdit architecture line::

    layout            latent grid T x H x W, text segments, tile permutations
      -> methods/<name>.py   plans a block sparsity over the laid-out tokens
      -> kernels/            Triton kernels that run the planned block-sparse attention

It describes *where* every token of the attention sequence lives (which latent
frame / row / column, or which text position) and how to reorder the video
tokens tile-major so that a 3D tile of the latent grid becomes one contiguous
block of the sequence, or per head into one of the 6 axis orders of (T, H, W)
(PARO). It knows nothing about sparsity methods or kernels.

Conventions
-----------
* diffusers orders the video tokens of one sample frame-major:
  ``idx = t * H * W + h * W + w`` for a latent grid of ``T x H x W`` tokens
  (after the VAE and the patchify step).
* A joint self-attention sequence may also hold text tokens, either after the
  video (HunyuanVideo: ``[video | text]``, text right-padded and masked) or
  before it (CogVideoX: ``[text | video]``).
* Every tensor-producing method is vectorised (no Python loop over tokens) and
  accepts a ``device`` so that it also runs on CUDA tensors.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "AXIS_ORDERS",
    "AxisReordering",
    "LatentGrid",
    "TextSegment",
    "SequenceLayout",
    "TilePermutation",
    "as_int",
    "axis_order_permutation",
    "device_key",
    "positive_int",
]

Device = torch.device | str | None


def as_int(name: str, value: object) -> int:
    """Return ``value`` as a Python int, or raise ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {name}={value!r} (bool)")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"{name} must be an int, got {name}={value!r} ({type(value).__name__})"
        ) from None


def positive_int(name: str, value: object) -> int:
    """Return ``value`` as a Python int >= 1, or raise ValueError naming ``name``."""
    v = as_int(name, value)
    if v < 1:
        raise ValueError(f"{name} must be a positive int (>= 1), got {name}={value!r}")
    return v


def device_key(device: Device) -> torch.device:
    """Canonical device used as a cache key (``cuda`` -> ``cuda:<current>``)."""
    d = torch.device("cpu") if device is None else torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _normalize_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor, got dim={dim}")
    return dim % ndim


# --------------------------------------------------------------------------- #
# Latent grid
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LatentGrid:
    """Latent token grid of one video sample after VAE encoding and patchify.

    ``frames x height x width`` tokens (``T x H x W``), ordered frame-major as in
    diffusers: token ``(t, h, w)`` sits at index ``t * H * W + h * W + w``.
    """

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))

    @classmethod
    def from_video(
        cls,
        num_frames: int,
        height_px: int,
        width_px: int,
        vae_temporal: int = 4,
        vae_spatial: int = 8,
        patch: tuple[int, int, int] = (1, 2, 2),
    ) -> LatentGrid:
        """Latent grid of a ``num_frames x height_px x width_px`` video.

        ``T = ((num_frames - 1) // vae_temporal + 1) // patch[0]``,
        ``H = height_px // vae_spatial // patch[1]``,
        ``W = width_px // vae_spatial // patch[2]``
        (a causal video VAE keeps the first frame and compresses the rest by
        ``vae_temporal``; with the default ``patch[0] == 1`` the temporal formula
        is ``T = (num_frames - 1) // vae_temporal + 1``).

        Examples (Wan 2.1): 81 x 480 x 832 -> 21 x 30 x 52 = 32,760 tokens;
        81 x 720 x 1280 -> 21 x 45 x 80 = 75,600 tokens.
        """
        num_frames = positive_int("num_frames", num_frames)
        height_px = positive_int("height_px", height_px)
        width_px = positive_int("width_px", width_px)
        vae_temporal = positive_int("vae_temporal", vae_temporal)
        vae_spatial = positive_int("vae_spatial", vae_spatial)
        patch_t = tuple(patch)
        if len(patch_t) != 3:
            raise ValueError(f"patch must have 3 entries (pt, ph, pw), got patch={patch!r}")
        pt, ph, pw = (positive_int(f"patch[{i}]", p) for i, p in enumerate(patch_t))

        frames = ((num_frames - 1) // vae_temporal + 1) // pt
        height = height_px // vae_spatial // ph
        width = width_px // vae_spatial // pw
        if min(frames, height, width) < 1:
            raise ValueError(
                "video too small for its VAE/patch factors: "
                f"got num_frames={num_frames}, height_px={height_px}, width_px={width_px} "
                f"with vae_temporal={vae_temporal}, vae_spatial={vae_spatial}, patch={patch_t} "
                f"-> grid ({frames}, {height}, {width})"
            )
        return cls(frames, height, width)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, H, W)``."""
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_frame(self) -> int:
        """``H * W``."""
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        """``N = T * H * W``."""
        return self.frames * self.height * self.width

    def token_index(
        self, t: torch.Tensor | int, h: torch.Tensor | int, w: torch.Tensor | int
    ) -> torch.Tensor | int:
        """Frame-major token index ``t * H * W + h * W + w``.

        Vectorised: ``t``, ``h``, ``w`` may be ints or broadcastable integer
        tensors. Tensor inputs are not bounds-checked (callers pass in-range
        coordinates); int inputs are.
        """
        if not any(isinstance(v, torch.Tensor) for v in (t, h, w)):
            for name, v, extent in (("t", t, self.frames), ("h", h, self.height), ("w", w, self.width)):
                v = as_int(name, v)
                if not 0 <= v < extent:
                    raise ValueError(f"{name} must be in [0, {extent}) for grid {self.shape}, got {name}={v}")
        return t * self.tokens_per_frame + h * self.width + w

    def coords(self, device: Device = None) -> torch.Tensor:
        """LongTensor ``[N, 3]``: row ``i`` is ``(t, h, w)`` of token ``i``.

        ``t = i // (H * W)``, ``h = (i // W) % H``, ``w = i % W``.
        """
        idx = torch.arange(self.num_tokens, device=device, dtype=torch.long)
        t = idx // self.tokens_per_frame
        h = (idx // self.width) % self.height
        w = idx % self.width
        return torch.stack((t, h, w), dim=1)


# --------------------------------------------------------------------------- #
# Joint (video + text) sequence
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TextSegment:
    """Text tokens inside a joint self-attention sequence.

    ``length`` text positions placed ``"before"`` the video tokens
    (CogVideoX: ``[text | video]``) or ``"after"`` them (HunyuanVideo:
    ``[video | text]``). If ``valid_length`` is given, only the first
    ``valid_length`` text positions are real tokens; the rest are padding that
    the model masks out as keys.
    """

    length: int
    position: Literal["before", "after"]
    valid_length: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", positive_int("length", self.length))
        if self.position not in ("before", "after"):
            raise ValueError(f"position must be 'before' or 'after', got position={self.position!r}")
        if self.valid_length is not None:
            v = as_int("valid_length", self.valid_length)
            if not 0 <= v <= self.length:
                raise ValueError(
                    f"valid_length must be in [0, length={self.length}], got valid_length={self.valid_length!r}"
                )
            object.__setattr__(self, "valid_length", v)

    @property
    def num_valid(self) -> int:
        """``valid_length`` if given, else ``length``."""
        return self.length if self.valid_length is None else self.valid_length


@dataclass(frozen=True)
class SequenceLayout:
    """The whole self-attention sequence of one sample: video tokens plus optional text.

    With ``N = grid.num_tokens`` and ``L = text.length`` (0 without text):
    ``num_tokens = N + L``; text ``"before"`` -> video occupies ``[L, L + N)``,
    text ``[0, L)``; text ``"after"`` -> video ``[0, N)``, text ``[N, N + L)``.
    Within the video slice tokens are frame-major (see :class:`LatentGrid`).
    """

    grid: LatentGrid
    text: TextSegment | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.grid, LatentGrid):
            raise ValueError(f"grid must be a LatentGrid, got grid={self.grid!r}")
        if self.text is not None and not isinstance(self.text, TextSegment):
            raise ValueError(f"text must be a TextSegment or None, got text={self.text!r}")

    @property
    def text_length(self) -> int:
        """``L``: number of text positions (0 without text)."""
        return 0 if self.text is None else self.text.length

    @property
    def num_tokens(self) -> int:
        """``N + L``."""
        return self.grid.num_tokens + self.text_length

    @property
    def video_offset(self) -> int:
        """Index of the first video token: ``L`` if text is before, else 0."""
        return self.text_length if self.text is not None and self.text.position == "before" else 0

    @property
    def video_slice(self) -> slice:
        """``slice(video_offset, video_offset + N)``."""
        return slice(self.video_offset, self.video_offset + self.grid.num_tokens)

    @property
    def text_slice(self) -> slice | None:
        """``slice(0, L)`` (before), ``slice(N, N + L)`` (after), or None without text."""
        if self.text is None:
            return None
        if self.text.position == "before":
            return slice(0, self.text.length)
        n = self.grid.num_tokens
        return slice(n, n + self.text.length)

    def is_text(self, device: Device = None) -> torch.Tensor:
        """BoolTensor ``[num_tokens]``: True at text positions (padded ones included)."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool, device=device)
        if self.text_slice is not None:
            mask[self.text_slice] = True
        return mask

    def key_valid_mask(self, device: Device = None) -> torch.Tensor:
        """BoolTensor ``[num_tokens]``: False only at text padding (text positions >= ``valid_length``)."""
        mask = torch.ones(self.num_tokens, dtype=torch.bool, device=device)
        if self.text is not None and self.text.num_valid < self.text.length:
            start = self.text_slice.start  # type: ignore[union-attr]
            mask[start + self.text.num_valid : start + self.text.length] = False
        return mask

    def token_coords(self, device: Device = None) -> torch.Tensor:
        """LongTensor ``[num_tokens, 3]``: ``(t, h, w)`` for video rows, ``(-1, -1, -1)`` for text rows."""
        out = torch.full((self.num_tokens, 3), -1, dtype=torch.long, device=device)
        out[self.video_slice] = self.grid.coords(device)
        return out


# --------------------------------------------------------------------------- #
# Tile-major permutation
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TilePermutation:
    """Tile-major reordering of the video tokens for a tile shape ``(tT, tH, tW)``.

    The grid is padded up to a multiple of the tile in each dimension:
    ``Tp = ceil(T / tT) * tT``, ``Hp = ceil(H / tH) * tH``, ``Wp = ceil(W / tW) * tW``.
    Token ``(t, h, w)`` goes to tile-major position::

        seq = [((t // tT) * (Hp / tH) + h // tH) * (Wp / tW) + w // tW] * (tT * tH * tW)
              + ((t % tT) * tH + h % tH) * tW + w % tW

    i.e. tiles are laid out frame-major over the tile grid
    ``(Tp / tT) x (Hp / tH) x (Wp / tW)``, and each tile holds ``tT * tH * tW``
    consecutive positions, frame-major inside the tile. Positions of padded grid
    cells outside the real grid are padding.

    Index tensors (int64, built once on CPU and cached per device):

    * ``gather_index(device)`` ``[padded_tokens]``: frame-major token index at
      each tile-major position, ``-1`` at padding;
    * ``scatter_index(device)`` ``[N]``: tile-major position of each token.
    """

    grid: LatentGrid
    tile: tuple[int, int, int]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.grid, LatentGrid):
            raise ValueError(f"grid must be a LatentGrid, got grid={self.grid!r}")
        try:
            tile = tuple(self.tile)
        except TypeError:
            raise ValueError(f"tile must be a tuple (tT, tH, tW), got tile={self.tile!r}") from None
        if len(tile) != 3:
            raise ValueError(f"tile must have 3 entries (tT, tH, tW), got tile={self.tile!r}")
        tile = tuple(positive_int(f"tile[{i}]", v) for i, v in enumerate(tile))
        for i, (name, size, extent) in enumerate(zip(("tT", "tH", "tW"), tile, self.grid.shape)):
            if size > extent:
                raise ValueError(
                    f"tile must not exceed the grid in any dimension: "
                    f"got tile[{i}]={name}={size} > grid.shape[{i}]={extent} "
                    f"(tile={tile}, grid={self.grid.shape})"
                )
        object.__setattr__(self, "tile", tile)

    # -- shapes ------------------------------------------------------------- #

    @property
    def padded_grid(self) -> tuple[int, int, int]:
        """``(Tp, Hp, Wp)``: each grid extent rounded up to a multiple of its tile extent."""
        return tuple(math.ceil(n / s) * s for n, s in zip(self.grid.shape, self.tile))  # type: ignore[return-value]

    @property
    def tile_grid(self) -> LatentGrid:
        """Grid of tiles ``(Tp / tT, Hp / tH, Wp / tW)``; tile ``k`` of the sequence is its token ``k``."""
        return LatentGrid(*(p // s for p, s in zip(self.padded_grid, self.tile)))

    @property
    def tile_volume(self) -> int:
        """``tT * tH * tW``: positions per tile (= block size along the sequence)."""
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def num_tiles(self) -> int:
        """``(Tp / tT) * (Hp / tH) * (Wp / tW)``."""
        return self.tile_grid.num_tokens

    @property
    def padded_tokens(self) -> int:
        """``Tp * Hp * Wp = num_tiles * tile_volume``."""
        return self.num_tiles * self.tile_volume

    @property
    def num_padding(self) -> int:
        """``padded_tokens - N``."""
        return self.padded_tokens - self.grid.num_tokens

    @property
    def is_identity(self) -> bool:
        """True iff there is no padding and every token keeps its position."""
        return self._cpu_indices()[2]

    # -- index tensors ------------------------------------------------------ #

    def _cpu_indices(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        cached = self._cache.get("cpu_meta")
        if cached is None:
            tT, tH, tW = self.tile
            _, Hp, Wp = self.padded_grid
            n_h, n_w = Hp // tH, Wp // tW
            t, h, w = self.grid.coords().unbind(1)
            tile_id = ((t // tT) * n_h + h // tH) * n_w + w // tW
            local = ((t % tT) * tH + h % tH) * tW + w % tW
            scatter = tile_id * self.tile_volume + local
            n = self.grid.num_tokens
            gather = torch.full((self.padded_tokens,), -1, dtype=torch.long)
            gather[scatter] = torch.arange(n, dtype=torch.long)
            identity = self.padded_tokens == n and bool(
                torch.equal(scatter, torch.arange(n, dtype=torch.long))
            )
            cached = (gather, scatter, identity)
            self._cache["cpu_meta"] = cached
        return cached

    def _indices(self, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
        key = device_key(device)
        cached = self._cache.get(key)
        if cached is None:
            gather, scatter, _ = self._cpu_indices()
            cached = (gather.to(key), scatter.to(key))
            self._cache[key] = cached
        return cached

    def gather_index(self, device: Device = None) -> torch.Tensor:
        """LongTensor ``[padded_tokens]``: original token at each tile-major position, ``-1`` at padding.

        Cached per device; do not modify in place.
        """
        return self._indices(device)[0]

    def scatter_index(self, device: Device = None) -> torch.Tensor:
        """LongTensor ``[N]``: tile-major position of each original (frame-major) token.

        Cached per device; do not modify in place.
        """
        return self._indices(device)[1]

    def valid_mask(self, device: Device = None) -> torch.Tensor:
        """BoolTensor ``[padded_tokens]``: True at real tokens, False at padding (``gather_index >= 0``).

        Cached per device; do not modify in place.
        """
        key = device_key(device)
        mkey = ("valid", key)
        mask = self._cache.get(mkey)
        if mask is None:
            mask = self.gather_index(key) >= 0
            self._cache[mkey] = mask
        return mask

    # -- video-only permutation -------------------------------------------- #

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Frame-major -> tile-major along ``dim``.

        ``x.shape[dim]`` must be ``N``; returns a tensor with ``padded_tokens``
        on ``dim`` where ``out[..., scatter_index[i], ...] = x[..., i, ...]`` and
        padding positions are zero. If :attr:`is_identity`, returns ``x`` itself.
        """
        dim = _normalize_dim(dim, x.ndim)
        n = self.grid.num_tokens
        if x.shape[dim] != n:
            raise ValueError(
                f"x.shape[{dim}] must equal grid.num_tokens={n} for grid {self.grid.shape}, "
                f"got x.shape={tuple(x.shape)}"
            )
        if self.is_identity:
            return x
        gather, scatter = self._indices(x.device)
        if self.num_padding == 0:
            return x.index_select(dim, gather)
        shape = list(x.shape)
        shape[dim] = self.padded_tokens
        out = x.new_zeros(shape)
        return out.index_copy_(dim, scatter, x)

    def unpermute(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Tile-major -> frame-major along ``dim`` (inverse of :meth:`permute`, padding dropped).

        ``y.shape[dim]`` must be ``padded_tokens``; returns ``y.index_select(dim, scatter_index)``
        with ``N`` on ``dim``. If :attr:`is_identity`, returns ``y`` itself.
        """
        dim = _normalize_dim(dim, y.ndim)
        if y.shape[dim] != self.padded_tokens:
            raise ValueError(
                f"y.shape[{dim}] must equal padded_tokens={self.padded_tokens} "
                f"for grid {self.grid.shape} and tile {self.tile}, got y.shape={tuple(y.shape)}"
            )
        if self.is_identity:
            return y
        return y.index_select(dim, self.scatter_index(y.device))

    # -- joint sequence permutation ----------------------------------------- #

    def _check_layout(self, layout: SequenceLayout) -> None:
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"layout must be a SequenceLayout, got layout={layout!r}")
        if layout.grid != self.grid:
            raise ValueError(
                f"layout.grid must equal the permutation's grid {self.grid.shape}, got layout.grid={layout.grid.shape}"
            )

    def permuted_sequence_length(self, layout: SequenceLayout) -> int:
        """``padded_tokens + L``: length of :meth:`permute_sequence`'s output along ``dim``."""
        self._check_layout(layout)
        return self.padded_tokens + layout.text_length

    def permute_sequence(self, x: torch.Tensor, layout: SequenceLayout, dim: int = 1) -> torch.Tensor:
        """Permute only the video part of a joint sequence; text stays in place.

        ``x.shape[dim]`` must be ``layout.num_tokens``. Output has
        ``padded_tokens + L`` on ``dim``: ``[text | permute(video)]`` for text
        before, ``[permute(video) | text]`` for text after. The permuted video
        therefore starts at ``layout.video_offset`` in the output as well.
        """
        self._check_layout(layout)
        dim = _normalize_dim(dim, x.ndim)
        if x.shape[dim] != layout.num_tokens:
            raise ValueError(
                f"x.shape[{dim}] must equal layout.num_tokens={layout.num_tokens}, got x.shape={tuple(x.shape)}"
            )
        if layout.text is None:
            return self.permute(x, dim)
        if self.is_identity:
            return x
        n, tl = self.grid.num_tokens, layout.text_length
        if layout.text.position == "before":
            text, video = x.split((tl, n), dim)
            return torch.cat((text, self.permute(video, dim)), dim)
        video, text = x.split((n, tl), dim)
        return torch.cat((self.permute(video, dim), text), dim)

    def unpermute_sequence(self, y: torch.Tensor, layout: SequenceLayout, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`permute_sequence`: returns ``layout.num_tokens`` on ``dim`` in the original order."""
        self._check_layout(layout)
        dim = _normalize_dim(dim, y.ndim)
        expected = self.padded_tokens + layout.text_length
        if y.shape[dim] != expected:
            raise ValueError(
                f"y.shape[{dim}] must equal padded_tokens + text length = {expected}, got y.shape={tuple(y.shape)}"
            )
        if layout.text is None:
            return self.unpermute(y, dim)
        if self.is_identity:
            return y
        tl = layout.text_length
        if layout.text.position == "before":
            text, video = y.split((tl, self.padded_tokens), dim)
            return torch.cat((text, self.unpermute(video, dim)), dim)
        video, text = y.split((self.padded_tokens, tl), dim)
        return torch.cat((self.unpermute(video, dim), text), dim)

    def sequence_valid_mask(self, layout: SequenceLayout, device: Device = None) -> torch.Tensor:
        """BoolTensor ``[padded_tokens + L]`` over the permuted joint sequence.

        False at video padding positions and at text padding (text positions
        ``>= valid_length``); True elsewhere. Usable as a key mask.
        """
        self._check_layout(layout)
        video = self.valid_mask(device)
        if layout.text is None:
            return video.clone()
        text = torch.arange(layout.text.length, device=video.device) < layout.text.num_valid
        parts = (text, video) if layout.text.position == "before" else (video, text)
        return torch.cat(parts)


# --------------------------------------------------------------------------- #
# Axis orders (PARO)
# --------------------------------------------------------------------------- #

#: The 6 orders of the latent axes; ``"THW"`` is diffusers' frame-major order (the identity).
AXIS_ORDERS = ("THW", "TWH", "HWT", "HTW", "WHT", "WTH")


def axis_order_permutation(grid: LatentGrid, order: str, device: Device = None) -> torch.Tensor:
    """LongTensor ``[N]``: the frame-major index of the token at each position of ``order``.

    In order ``"HWT"`` (say) tokens are sorted by ``h``, then ``w``, then ``t``: position
    ``(h * W + w) * T + t`` holds frame-major token ``t * H * W + h * W + w``. The inverse is
    ``argsort`` of it (see :class:`AxisReordering`).
    """
    if order not in AXIS_ORDERS:
        raise ValueError(f"order must be one of {AXIS_ORDERS}, got order={order!r}")
    axes = tuple("THW".index(axis) for axis in order)
    frame_major = torch.arange(grid.num_tokens, device=device, dtype=torch.long).view(grid.shape)
    return frame_major.permute(axes).reshape(-1)


@dataclass(frozen=True)
class AxisReordering:
    """Per-head reordering of a self-attention sequence into axis orders (PARO), text in place.

    For each of the 6 :data:`AXIS_ORDERS` an index table over the whole sequence
    (``layout.num_tokens`` positions): the video slice follows :func:`axis_order_permutation`,
    text positions map to themselves. The tables (``[6, S]`` int64, computed once per layout and
    device and cached) are shared by every layer; a layer's heads pick rows of them with an
    ``order_ids`` tensor ``[H]`` (indices into :data:`AXIS_ORDERS`), so reordering all heads is
    one ``torch.gather`` (no loop over heads) and nothing per layer is stored but ``H`` ints.
    """

    layout: SequenceLayout
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, SequenceLayout):
            raise ValueError(f"layout must be a SequenceLayout, got layout={self.layout!r}")

    def _tables(self, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
        key = device_key(device)
        cached = self._cache.get(key)
        if cached is None:
            cpu = self._cache.get("cpu_tables")
            if cpu is None:
                seq = self.layout.num_tokens
                video = self.layout.video_slice
                gather = torch.arange(seq, dtype=torch.long).repeat(len(AXIS_ORDERS), 1)
                for row, order in enumerate(AXIS_ORDERS):
                    gather[row, video] = axis_order_permutation(self.layout.grid, order) + video.start
                scatter = torch.argsort(gather, dim=1)
                cpu = (gather, scatter)
                self._cache["cpu_tables"] = cpu
            cached = tuple(t.to(key) for t in cpu)
            self._cache[key] = cached
        return cached

    def gather_index(self, order_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor ``[H, S]``: for each head, the original position of each reordered position."""
        return self._tables(order_ids.device)[0][order_ids]

    def scatter_index(self, order_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor ``[H, S]``: for each head, the reordered position of each original position."""
        return self._tables(order_ids.device)[1][order_ids]

    def _check(self, x: torch.Tensor, dim: int, order_ids: torch.Tensor | None, head_dim_pos: int) -> None:
        if x.dim() != 4 or x.shape[dim] != self.layout.num_tokens:
            raise ValueError(
                f"expected a 4-D tensor with layout.num_tokens={self.layout.num_tokens} on dim {dim}, "
                f"got shape {tuple(x.shape)}"
            )
        if order_ids is not None and tuple(order_ids.shape) != (x.shape[head_dim_pos],):
            raise ValueError(
                f"order_ids must be [H]=({x.shape[head_dim_pos]},), got {tuple(order_ids.shape)}"
            )

    def reorder(self, x: torch.Tensor, order_ids: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S, H, D)`` in sequence order -> contiguous ``(B, H, S, D)``, head ``h`` in order
        ``AXIS_ORDERS[order_ids[h]]``. ``index``: ``gather_index(order_ids)`` when the caller
        reorders several tensors alike (Q, K, V and the output share one)."""
        self._check(x, 1, order_ids, 2)
        batch, seq, heads, head_dim = x.shape
        index = self.gather_index(order_ids) if index is None else index
        return torch.gather(x.transpose(1, 2), 2, index[None, :, :, None].expand(batch, heads, seq, head_dim))

    def restore(self, y: torch.Tensor, order_ids: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`reorder`: ``(B, H, S, D)`` reordered -> contiguous ``(B, S, H, D)``
        (one scatter straight into the sequence-major output)."""
        self._check(y, 2, order_ids, 1)
        batch, heads, seq, head_dim = y.shape
        out = torch.empty((batch, seq, heads, head_dim), dtype=y.dtype, device=y.device)
        index = self.gather_index(order_ids) if index is None else index
        out.transpose(1, 2).scatter_(2, index[None, :, :, None].expand(batch, heads, seq, head_dim), y)
        return out

    def reorder_all(self, x: torch.Tensor, order: str, dim: int = 1) -> torch.Tensor:
        """Every head into the same ``order``, along sequence dimension ``dim`` (calibration)."""
        dim = _normalize_dim(dim, x.ndim)
        if x.shape[dim] != self.layout.num_tokens:
            raise ValueError(
                f"x.shape[{dim}] must equal layout.num_tokens={self.layout.num_tokens}, got {tuple(x.shape)}"
            )
        if order not in AXIS_ORDERS:
            raise ValueError(f"order must be one of {AXIS_ORDERS}, got order={order!r}")
        return x.index_select(dim, self._tables(x.device)[0][AXIS_ORDERS.index(order)])
