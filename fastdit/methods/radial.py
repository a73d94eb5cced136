"""Radial attention: a static, distance-decaying block sparsity for video diffusion transformers.

Paper: Li et al., 2025, "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long
Video Generation".

The rule (fastdit's ``METHODS.md``, section 1). The mask is static, identical for every head and
layer, and defined per pair of latent frames ``(i, j)`` of the frame-major video tokens, with
``d = |i - j|``, ``N`` tokens per frame, ``b`` the block size and ``bl(x) = int(x).bit_length()``:

* ``d <= 1``: the whole ``N x N`` tile is kept.
* ``d >= 2``: group ``g = bl(d)``, band width ``w = max(b, decay * 2**bl(N) / 2**g)``; inside
  the tile a (query, key) pair is kept iff ``|col - row| <= w``, where row and col are the
  in-frame raster indices ``h * W + w``. The band halves each time ``d`` doubles.
* Far-diagonal thinning (``d >= 2``): with ``dl = 2**bl(N) / 2**g``, if ``dl < b`` the tile is
  kept only when ``d % int(b / dl) == 0``.
* Attention sink (``sink=True``): every tile ``(i, 0)`` is kept whole, so all frames see frame
  0. The sink is documented for the Wan reference only, so the Wan presets turn it on and the
  HunyuanVideo preset turns it off.
* Text tokens of a joint sequence (``[text | video]`` or ``[video | text]``) keep dense rows
  and dense columns.

Deviation: reduction to ``b x b`` blocks. The kernel executes whole blocks, so the token-level
mask is reduced with the analytic rule "keep a (query block, key block) iff it contains at least
one (query, key) token pair that the token-level mask allows". The block plan is therefore a
superset of the token mask: every pair the rule keeps is computed, plus the other pairs of the
blocks the band touches (blocks are unmasked inside). Token counts need not be multiples of the
block size (Wan 720p, 21 x 45 x 80 = 75,600 tokens, works); a block may straddle two frames.
The reference implementation's reduction (keep a block when more than 60% of its non-empty
columns have density above one third) is not used: it drops blocks that hold allowed pairs, so
its plan is not a superset of the rule. The price is a somewhat higher density than the
reference's reported ~26.5% for Wan 720x960x81 at decay 0.2 (the token rule itself keeps 26.6%
of the pairs there): this module's plan keeps 34.6% of the blocks (30.2% at Wan 720p, 44.1% at
Wan 480p; block 128, sink on). :attr:`MethodPlan.density` reports it.

The block map is computed from block and frame ranges, never from an ``S x S`` token mask, so a
720p plan takes milliseconds on the CPU. Plans are cached per (grid, text layout, block size,
decay, sink, device).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity
from ..layout import LatentGrid, SequenceLayout, as_int, device_key
from .base import Method, MethodPlan, PlanCache

__all__ = ["Radial"]

Device = torch.device | str | None

# Published schedules (dense_steps / dense_layers) and decays, by model.
_PRESETS: dict[str, dict[str, object]] = {
    "wan2.1-14b": dict(decay=0.2, dense_steps=12, dense_layers=1, sink=True),  # of 50 steps
    "hunyuanvideo": dict(decay=0.95, dense_steps=12, dense_layers=0, sink=False),
    "wan2.2-a14b": dict(decay=0.8, dense_steps=11, dense_layers=1, sink=True),  # of 40 steps
    "distilled-4step": dict(decay=0.2, dense_steps=1, dense_layers=1, sink=True),  # Wan 4-step LoRA
}

# Plans are small (a few MB at most) but a long-running server sees many resolutions: keep the
# most recent ones only (one cache for every Radial configuration: the key holds its parameters).
_plan_cache = PlanCache()


def _non_negative_int(name: str, value: object) -> int:
    number = as_int(name, value)
    if number < 0:
        raise ValueError(f"{name} must be a non-negative int, got {name}={value!r}")
    return number


def _as_layout(layout: SequenceLayout | LatentGrid) -> SequenceLayout:
    if isinstance(layout, LatentGrid):
        return SequenceLayout(layout)
    if not isinstance(layout, SequenceLayout):
        raise ValueError(f"layout must be a SequenceLayout or LatentGrid, got layout={layout!r}")
    return layout


@dataclass(frozen=True)
class Radial(Method):
    """Radial attention (Li et al., 2025): static band mask that narrows with frame distance.

    See the module docstring for the exact rule and the block reduction.

    Attributes:
        decay: band-width factor; the band of frame distance ``d >= 2`` is
            ``max(b, decay * 2**bl(N) / 2**bl(d))`` in-frame positions. Must be positive and finite.
        block_size: query and key block size of the plan, 64 or 128.
        sink: keep every tile ``(i, 0)`` whole (all frames attend to frame 0).
        dense_steps, dense_layers, dense_last_steps: the dense schedule the preset was published
            with (first denoising steps, first transformer blocks, last steps run dense). They
            are carried for the pipeline integration and do not affect the plan.
    """

    name = "radial"

    decay: float = 0.2
    block_size: int = 128
    sink: bool = True
    dense_steps: int = 0
    dense_layers: int = 0
    dense_last_steps: int = 0

    def __post_init__(self) -> None:
        decay = self.decay
        if (
            isinstance(decay, bool)
            or not isinstance(decay, numbers.Real)
            or not math.isfinite(float(decay))
            or float(decay) <= 0.0
        ):
            raise ValueError(f"decay must be a positive finite number, got decay={decay!r}")
        object.__setattr__(self, "decay", float(decay))
        block = self.block_size
        if isinstance(block, bool) or block not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got block_size={block!r}"
            )
        object.__setattr__(self, "block_size", int(block))
        if not isinstance(self.sink, bool):
            raise ValueError(f"sink must be a bool, got sink={self.sink!r}")
        for name in ("dense_steps", "dense_layers", "dense_last_steps"):
            object.__setattr__(self, name, _non_negative_int(name, getattr(self, name)))

    # ------------------------------------------------------------------ presets
    @classmethod
    def presets(cls) -> tuple[str, ...]:
        """Names accepted by :meth:`preset`."""
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> Radial:
        """The published configuration ``name`` (see :meth:`presets`), with field overrides.

        ``wan2.1-14b``: decay 0.2, 12 of 50 steps and 1 layer dense, sink on.
        ``hunyuanvideo``: decay 0.95, 12 steps dense, no dense layer, sink off.
        ``wan2.2-a14b``: decay 0.8, 11 of 40 steps and 1 layer dense, sink on.
        ``distilled-4step``: decay 0.2, 1 step and 1 layer dense, sink on (Wan 4-step LoRA).
        """
        if name not in _PRESETS:
            raise ValueError(f"preset must be one of {list(_PRESETS)}, got name={name!r}")
        return replace(cls(**_PRESETS[name]), **overrides)

    # ------------------------------------------------------------------ the rule
    def _half_widths(self, grid: LatentGrid) -> torch.Tensor:
        """LongTensor ``[T, T]``: tile ``(i, j)`` keeps the pairs with ``|col - row| <=`` entry.

        ``-1`` drops the tile; ``N - 1`` keeps it whole. Only ``T**2`` scalars, so a Python loop.
        """
        frames, n, b = grid.frames, grid.tokens_per_frame, self.block_size
        full = 2 ** n.bit_length()
        table = torch.empty(frames, frames, dtype=torch.long)
        for i in range(frames):
            for j in range(frames):
                d = abs(i - j)
                if d <= 1 or (self.sink and j == 0):
                    table[i, j] = n - 1
                    continue
                decay_length = full / 2 ** d.bit_length()
                if decay_length < b and d % int(b / decay_length) != 0:
                    table[i, j] = -1
                    continue
                # |col - row| is an integer, so "<= w" is "<= floor(w)".
                width = max(b, self.decay * decay_length)
                table[i, j] = min(math.floor(width), n - 1)
        return table

    def token_mask(self, grid: LatentGrid, device: Device = None) -> torch.Tensor:
        """BoolTensor ``[T*H*W, T*H*W]``: the exact token rule over the frame-major video tokens.

        Materialises the full token mask, so it is meant for tests and small grids only; plans
        come from :meth:`block_map`, which never builds it.
        """
        if not isinstance(grid, LatentGrid):
            raise ValueError(f"grid must be a LatentGrid, got grid={grid!r}")
        frames, n = grid.frames, grid.tokens_per_frame
        half_width = self._half_widths(grid).to(device)
        raster = torch.arange(n, device=device)
        in_frame_distance = (raster[None, :] - raster[:, None]).abs()
        mask = in_frame_distance <= half_width[:, :, None, None]  # [T_q, T_k, n_q, n_k]
        return mask.permute(0, 2, 1, 3).reshape(frames * n, frames * n)

    def block_map(self, layout: SequenceLayout | LatentGrid, device: Device = None) -> torch.Tensor:
        """BoolTensor ``[1, 1, nb, nb]``, ``nb = ceil(S / block_size)``: block ``(p, c)`` is kept
        iff it holds at least one (query, key) pair the token-level rule keeps; every block
        touching a text token is kept.

        Works on block and frame ranges (memory ``T * m**2`` per query frame, ``m`` blocks per
        frame), never on an ``S x S`` mask; built on the CPU, returned on ``device``.
        """
        layout = _as_layout(layout)
        grid, b = layout.grid, self.block_size
        frames, n = grid.frames, grid.tokens_per_frame
        num_blocks = math.ceil(layout.num_tokens / b)
        half_width = self._half_widths(grid)

        # The blocks overlapping each frame, padded to the widest frame, and the in-frame raster
        # range [lo, hi] each covers: a block straddling two frames appears in both.
        frame_start = layout.video_offset + torch.arange(frames) * n
        first = frame_start // b
        last = (frame_start + n - 1) // b
        width = int((last - first).max()) + 1
        blocks = first[:, None] + torch.arange(width)  # [T, m]
        valid = blocks <= last[:, None]
        lo = (blocks * b - frame_start[:, None]).clamp(min=0)
        hi = ((blocks + 1) * b - 1 - frame_start[:, None]).clamp(max=n - 1)

        out = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
        for i in range(frames):
            w = half_width[i][:, None, None]  # [T_k, 1, 1]
            # Rows [lo_q, hi_q] widened by the band meet columns [lo_k, hi_k] of key frame j.
            keep = (
                (w >= 0)
                & (lo[:, None, :] <= hi[i][None, :, None] + w)
                & (hi[:, None, :] >= lo[i][None, :, None] - w)
                & valid[i][None, :, None]
                & valid[:, None, :]
            )  # [T_k, m_q, m_k]
            j, p, c = keep.nonzero(as_tuple=True)
            out[blocks[i, p], blocks[j, c]] = True

        text = layout.text_slice
        if text is not None:
            text_blocks = slice(text.start // b, (text.stop - 1) // b + 1)
            out[text_blocks, :] = True
            out[:, text_blocks] = True
        return out.to(device)[None, None]

    def plan(self, layout: SequenceLayout | LatentGrid, device: Device = None) -> MethodPlan:
        """The block-sparse plan for ``layout`` in diffusers' frame-major order (no permutation).

        Cached per (grid, text layout, block size, decay, sink, device); the returned plan is
        shared, do not modify its tensors.
        """
        layout = _as_layout(layout)
        device = device_key(device)
        key = (layout.grid, layout.text, self.block_size, self.decay, self.sink, device)

        def build() -> MethodPlan:
            sparsity = BlockSparsity.from_block_map(self.block_map(layout, device), self.block_size)
            return MethodPlan(sparsity, layout, permutation=None)

        return _plan_cache.get_or_build(key, build)
