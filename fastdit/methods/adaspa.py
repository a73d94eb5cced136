"""AdaSpa: online block selection with an LSE cache across denoising steps.

Paper: Xia et al., 2025, "Training-free and Adaptive Sparse Attention for Efficient Long Video
Generation". No reference code is published; this module implements fastdit's ``METHODS.md``,
section 4.

Architecture line: ``layout`` -> ``methods/adaspa.py`` (chooses a block sparsity per layer from
Q and K at the search steps) -> ``kernels/`` (:func:`~fastdit.kernels.block_sparse_attention`,
:func:`~fastdit.kernels.block_mass`). The method launches no attention kernel of its own.

The rule
--------
Blocks of ``b`` tokens (64 in the paper), ``nb = ceil(S / b)``. The exact block mass of query
block ``p`` and key block ``c`` is ``W[p, c] = sum_{i in Q_p} sum_{j in K_c} exp(s_ij - LSE_i)``
with ``s = scale * q . k``; the recall of a mask is its kept mass over the total mass.

* Schedule (50 steps): steps 0-9 dense. Step 10 (first search step): dense attention that also
  returns ``LSE_i`` of every row, cached per (CFG context, transformer, layer); one block-mass pass
  with that LSE; selection. The step's output is the dense attention's. Steps 11-29 run sparse with
  that mask. Step 30 (every later search step): ONE ``QK^T`` block-mass pass with the LSE cached at
  step 10 (no dense attention), a new selection, and the step runs sparse with the new mask, which
  serves the following steps.
* Row-uniform top-k: every query-block row keeps the same number of key blocks, the
  ``k(s) = ceil((1 - s) * nf)`` heaviest by mass (at least 1, at most ``nf``), where ``nf`` is the
  number of key blocks that hold no text (``nb`` for Wan). Blocks of exactly equal mass at the
  cut are taken in ``torch.topk``'s order.
* Head-adaptive budgets: ``r_h`` = recall of head ``h`` with ``k(s)`` blocks per row; ``n`` = number
  of heads with ``r_h > 0.8``; heads ranked by ``r_h`` (descending, ties by head index); the ``n``
  highest get sparsity ``(1 + s) / 2``, the ``n`` lowest ``(3s - 1) / 2``, the rest ``s``.
  **When 2n > heads** the two tiers would overlap; fastdit uses ``m = min(n, heads // 2)`` heads per
  tier, so the tiers are disjoint and the mean budget is kept (with an odd head count the median
  head stays at ``s``). For ``s < 1/3``, ``(3s - 1) / 2`` is negative and is clamped to 0 (dense
  rows for the low tier; the mean is then not kept). Tiers are per batch element (each prompt of a
  batched call is its own attention). Budgets are rounded per head with ``k(.)`` above, so the mean
  density differs from ``1 - s`` by rounding only.
* Text (joint-attention models, ``[video | text]`` or ``[text | video]``): every key block that
  holds a text position is kept in every row, on top of the ``k`` video blocks; every query row of
  a text token is dense. The kernel runs the sparse plan for all rows and a second, dense call for
  the text query tokens only (``S_text`` rows against all keys), whose output replaces those rows.
  Padded text keys are excluded by the kernels' ``key_padding`` in both the attention and the mass.

Recall (reported and used for the tiers) is over the mask as executed: video rows with their
kept blocks plus the text columns, text rows whole.

Decisions where METHODS.md leaves room
---------------------------------------
* **Search steps and run length.** ``search_steps`` are given for a run of ``reference_steps``
  steps (default 50, the paper's) and scale to the run's actual length: the integer ``t`` becomes
  step ``ceil(t / reference_steps * num_steps)`` (Schedule's fraction rule), so (10, 30) is
  (10, 30) at 50 steps, (6, 18) at 30 and (1, 3) at 4. Floats in [0, 1) are fractions of the run
  directly. ``reference_steps=None`` makes integers absolute step indices (then a transformer can
  also be driven outside a pipeline loop, where the step count is unknown). Search steps that
  coincide after scaling are merged; those at or past the run's end never happen. The dense
  warm-up is the shared :class:`~fastdit.schedule.Schedule`'s ``dense_steps``, which this config
  carries as the first search step (same rounding), so warm-up steps take the stock dense path.
* **A layer without a mask at a sparse step** (a user schedule whose dense window covers the first
  search step, Wan2.2's second expert starting mid-run, a batch-size change) runs the first-search
  procedure (dense + LSE + selection) on demand; its record has ``scheduled: False``. A later
  search step without a cached LSE of the right shape does the same.
* **Search steps a step cache skipped.** diffusers' caches (FirstBlockCache, TaylorSeer,
  MagCache, PAB, ...) skip whole steps or single layers, so a layer may not be called at a
  search step. The step index stays the pipeline's (fastdit reads it before every forward, the
  cache's skips included), so nothing drifts: the layer searches at its first computed step after
  the missed one, as that search step would have (a missed first search: dense + LSE; a later
  one: one mass pass with the cached LSE), and the mask then serves until the next search step.
  Its record has ``scheduled: False`` and ``due_step`` the search step it stands in for. Without
  this, a layer that missed the second search would keep the first mask for the rest of the run.
* The dense pass that produces the LSE uses a dense plan of 128-token blocks (faster; the LSE is
  per row, so independent of the block size); the mass pass and the sparse plans use ``block_size``.

State, memory and synchronisation
---------------------------------
:meth:`AdaSpa.new_runtime` returns an :class:`AdaSpaRuntime`, which the integration renews on
every new generation and shape change. It holds, per ``call.cache_key`` = (CFG context,
transformer, layer): the LSE (fp32 ``[B, H, S]``) and the current plan (int32 counts, indices
stored as int16 when ``nb < 32768`` and widened per call). Memory is bounded by the model: one LSE
and one plan per (context, transformer, layer); :meth:`AdaSpaRuntime.memory_bytes` reports it and
:meth:`AdaSpa.estimate_cache_bytes` predicts it. Wan2.1-14B 720p (75,600 tokens, 40 heads, 40
layers): LSE 75,600 x 40 x 40 x 4 B = 484 MB per CFG context; plans at most 40 x 40 x 1182 x 355 x
2 B = 1.34 GB per context with the tiers (355 = widest row, the low tier's), 0.89 GB without.

Selection runs as batched torch ops on the device (top-k, cumulative sums, a stable sort of the
head recalls, scatter, sort of the chosen indices): no Python loop over heads, layers or blocks.
Host synchronisation: none in the mass pass, selection or attention. ``attend`` returns the plan's
density as a 0-d device tensor, which the state reads only when the densities are asked for.
Records keep device tensors and are copied to the host when :attr:`AdaSpaRuntime.records` is read.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity, block_mass, block_sparse_attention
from ..layout import LatentGrid, SequenceLayout, device_key
from ..schedule import resolve_amount
from .base import AttentionCall, Method, MethodPlan, PlanCache

__all__ = ["AdaSpa", "AdaSpaRuntime", "BlockSelection", "select_blocks"]

logger = logging.getLogger("fastdit")

# Block size of the dense pass that produces the LSE at a first search step.
_LSE_PASS_BLOCK = 128
# Dense plans are a few MB at most; keep the most recent shapes only.
_dense_plans = PlanCache()


def _dense_plan(seq_q: int, seq_kv: int, block_size: int, device: torch.device) -> BlockSparsity:
    device = device_key(device)
    return _dense_plans.get_or_build(
        (seq_q, seq_kv, block_size, device),
        lambda: BlockSparsity.dense(seq_q, seq_kv, block_size, device=device),
    )


def _budget(sparsity: float, free_blocks: int) -> int:
    """Key blocks per row at ``sparsity``: ``ceil((1 - sparsity) * free_blocks)`` in [1, free]."""
    if free_blocks == 0:
        return 0
    return min(free_blocks, max(1, math.ceil((1.0 - sparsity) * free_blocks - 1e-9)))


def tier_sparsities(sparsity: float) -> tuple[float, float]:
    """(high-recall tier, low-recall tier) sparsities: ``(1 + s) / 2``, ``max(0, (3s - 1) / 2)``."""
    return (1.0 + sparsity) / 2.0, max(0.0, (3.0 * sparsity - 1.0) / 2.0)


def text_blocks(layout: SequenceLayout, block_size: int) -> tuple[int, int]:
    """``[start, stop)`` of the blocks holding a text position (``(0, 0)`` without text)."""
    text = layout.text_slice
    if text is None:
        return 0, 0
    return text.start // block_size, (text.stop - 1) // block_size + 1


# --------------------------------------------------------------------------- selection
@dataclass(frozen=True, eq=False)
class BlockSelection:
    """One search's outcome for a ``[B, H, nb, nb]`` mass (all tensors on the mass's device).

    Attributes:
        kv_counts, kv_indices: the plan in padded CSR (int32 ``[B, H, nb]`` and ``[B, H, nb, w]``);
            every row of a (batch, head) has the same count.
        blocks_per_row: int32 ``[B, H]``, key blocks per row (text blocks included).
        recall_at_sparsity: fp32 ``[B, H]``, recall with ``k(s)`` blocks in every head (the
            tiers' input).
        recall: fp32 ``[B, H]``, recall of the chosen mask.
        tier: int8 ``[B, H]``: +1 high-recall tier (sparser), -1 low-recall tier (denser), 0
            neither.
        head_sparsity: fp64 ``[B, H]``, the sparsity each head's budget came from.
        num_high_recall_heads: int64 ``[B]``, ``n`` (heads with recall above the threshold).
        density: fp32 scalar, kept (query block, key block) pairs over ``nb**2``, text rows dense,
            averaged over batch and heads.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    blocks_per_row: torch.Tensor
    recall_at_sparsity: torch.Tensor
    recall: torch.Tensor
    tier: torch.Tensor
    head_sparsity: torch.Tensor
    num_high_recall_heads: torch.Tensor
    density: torch.Tensor


def select_blocks(
    mass: torch.Tensor,
    sparsity: float,
    *,
    head_adaptive: bool = True,
    recall_threshold: float = 0.8,
    text: tuple[int, int] = (0, 0),
    shard=None,
) -> BlockSelection:
    """AdaSpa's selection (module docstring) from a block mass ``[B, H, nb, nb]``.

    ``text`` is the ``[start, stop)`` range of text blocks (kept in every row; their rows dense).
    ``shard``: under Ulysses context parallelism the :class:`~fastdit.parallel.HeadShard` the
    mass covers; the budget tiers rank the recalls of all heads of the layer (gathered from every
    rank), as in one process. Batched torch ops only; no host synchronisation.
    """
    if mass.dim() != 4 or mass.shape[-1] != mass.shape[-2]:
        raise ValueError(f"mass must be [B, H, nb, nb], got {tuple(mass.shape)}")
    batch, heads, num_blocks, _ = mass.shape
    device = mass.device
    text_start, text_stop = text
    if not 0 <= text_start <= text_stop <= num_blocks:
        raise ValueError(f"text blocks must lie in [0, {num_blocks}], got {text}")
    num_text = text_stop - text_start
    free = num_blocks - num_text
    k_uniform = _budget(sparsity, free)
    high_sparsity, low_sparsity = tier_sparsities(sparsity)
    k_high, k_low = _budget(high_sparsity, free), _budget(low_sparsity, free)
    k_max = max(k_uniform, k_low) if head_adaptive else k_uniform

    mass = mass.float()
    blocks = torch.arange(num_blocks, device=device)
    is_text = (blocks >= text_start) & (blocks < text_stop)
    video_rows = (~is_text).float()
    row_total = mass.sum(-1)  # [B, H, nb]
    total = row_total.sum(-1)  # [B, H]
    kept_text_rows = (row_total * is_text.float()).sum(-1)
    if num_text:
        text_column_mass = mass[..., text_start:text_stop].sum(-1)
        free_mass = mass.masked_fill(is_text, float("-inf"))
    else:
        text_column_mass = torch.zeros_like(row_total)
        free_mass = mass
    if k_max:
        top_mass, top_index = free_mass.topk(k_max, dim=-1)  # heaviest first
        kept_prefix = top_mass.cumsum(-1)  # [B, H, nb, k_max]

    def recall_with(k: torch.Tensor) -> torch.Tensor:
        """Recall per (batch, head) keeping the ``k[b, h]`` heaviest free blocks per video row."""
        if k_max:
            slot = (k - 1).clamp(min=0)[:, :, None, None].expand(batch, heads, num_blocks, 1)
            kept_free = kept_prefix.gather(-1, slot).squeeze(-1) * (k > 0)[:, :, None]
        else:
            kept_free = torch.zeros_like(row_total)
        kept = ((kept_free + text_column_mass) * video_rows).sum(-1) + kept_text_rows
        return torch.where(total > 0, kept / total.clamp(min=torch.finfo(torch.float32).tiny), 1.0)

    k_all = torch.full((batch, heads), k_uniform, dtype=torch.long, device=device)
    recall_at_sparsity = recall_with(k_all)
    # The tiers rank every head of the layer: under Ulysses, gather the other ranks' recalls.
    all_recalls = recall_at_sparsity if shard is None else shard.gather(recall_at_sparsity, dim=1)
    all_heads = all_recalls.shape[1]
    num_high = (all_recalls > recall_threshold).sum(-1)  # [B]
    if head_adaptive and all_heads >= 2:
        per_tier = num_high.clamp(max=all_heads // 2)[:, None]
        order = torch.sort(all_recalls, dim=-1, descending=True, stable=True).indices
        positions = torch.arange(all_heads, device=device).expand(batch, all_heads)
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        tier = torch.where(rank < per_tier, 1, torch.where(rank >= all_heads - per_tier, -1, 0))
        if shard is not None:
            tier = shard.local(tier, dim=1)
        k_head = torch.where(tier == 1, k_high, torch.where(tier == -1, k_low, k_uniform))
        head_sparsity = torch.where(
            tier == 1, high_sparsity, torch.where(tier == -1, low_sparsity, sparsity)
        ).double()
        recall = recall_with(k_head)
    else:
        tier = torch.zeros((batch, heads), dtype=torch.long, device=device)
        k_head = k_all
        head_sparsity = torch.full(
            (batch, heads), float(sparsity), dtype=torch.float64, device=device
        )
        recall = recall_at_sparsity

    # The first k_head of the heaviest-first list, plus the text blocks, ascending; slots past the
    # count hold num_blocks (sorted last) and are zeroed as the plan's padding.
    width = k_max + num_text
    per_row = (k_head + num_text)[:, :, None]  # [B, H, 1]
    if k_max:
        slot = torch.arange(k_max, device=device)
        chosen = torch.where(slot < k_head[:, :, None, None], top_index, num_blocks)
    else:
        chosen = torch.empty((batch, heads, num_blocks, 0), dtype=torch.long, device=device)
    if num_text:
        text_index = torch.arange(text_start, text_stop, device=device)
        chosen = torch.cat([chosen, text_index.expand(batch, heads, num_blocks, num_text)], dim=-1)
    chosen = chosen.sort(dim=-1).values
    valid = torch.arange(width, device=device) < per_row[..., None]
    kv_indices = torch.where(valid, chosen, 0).to(torch.int32).contiguous()
    kv_counts = per_row.expand(batch, heads, num_blocks).to(torch.int32).contiguous()

    kept_pairs = per_row[..., 0] * (num_blocks - num_text) + num_blocks * num_text
    density = (kept_pairs.double() / (num_blocks * num_blocks)).mean().float()
    return BlockSelection(
        kv_counts=kv_counts,
        kv_indices=kv_indices,
        blocks_per_row=per_row[..., 0].to(torch.int32),
        recall_at_sparsity=recall_at_sparsity,
        recall=recall,
        tier=tier.to(torch.int8),
        head_sparsity=head_sparsity,
        num_high_recall_heads=num_high,
        density=density,
    )


# --------------------------------------------------------------------------- runtime state
@dataclass(eq=False)
class _LayerPlan:
    """The current mask of one (context, transformer, layer), compact between uses."""

    kv_counts: torch.Tensor  # int32 [B, H, nb]
    kv_indices: torch.Tensor  # int16 when nb < 32768, else int32
    block_size: int
    num_kv_blocks: int
    density: torch.Tensor  # fp32 scalar on the device
    searched_at: int | None = None  # the denoising step of the search that chose it

    @classmethod
    def from_selection(
        cls, selection: BlockSelection, block_size: int, searched_at: int | None = None
    ) -> _LayerPlan:
        num_blocks = selection.kv_counts.shape[-1]
        indices = selection.kv_indices
        if num_blocks <= torch.iinfo(torch.int16).max:
            indices = indices.to(torch.int16)
        return cls(
            selection.kv_counts, indices, block_size, num_blocks, selection.density, searched_at
        )

    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    def sparsity(self) -> BlockSparsity:
        # Built from a selection (ascending, unique, in range): no validation, no host sync.
        return BlockSparsity(
            self.kv_counts, self.kv_indices.to(torch.int32), self.block_size, self.block_size,
            self.num_kv_blocks, validate=False,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv_counts, self.kv_indices))


class AdaSpaRuntime:
    """AdaSpa's per-generation state: LSE cache, current plans and search records.

    Keyed by ``AttentionCall.cache_key`` = (CFG context, transformer, layer); one runtime serves one
    generation and one sequence layout (the integration makes a new one otherwise, so nothing
    leaks between generations).

    Attributes:
        records: what each search did (see :attr:`records`).
        generation: the generation this runtime serves (``None`` before the first call).
    """

    def __init__(self) -> None:
        self.generation: int | None = None
        self._lse: dict[tuple, torch.Tensor] = {}
        self._plans: dict[tuple, _LayerPlan] = {}
        self._pending: list[tuple[dict, dict[str, torch.Tensor]]] = []
        self._records: list[dict] = []

    # -- state
    def lse(self, key: tuple) -> torch.Tensor | None:
        """The cached fp32 ``[B, H, S]`` LSE of ``key`` (from its latest dense search)."""
        return self._lse.get(key)

    def plan(self, key: tuple) -> BlockSparsity | None:
        """The current block sparsity of ``key`` (int32, ready for the kernel), or ``None``."""
        entry = self._plans.get(key)
        return entry.sparsity() if entry is not None else None

    def keys(self) -> list[tuple]:
        return sorted(set(self._lse) | set(self._plans), key=repr)

    def clear(self) -> None:
        """Drop every cached LSE, plan and record."""
        self._lse.clear()
        self._plans.clear()
        self._pending.clear()
        self._records.clear()

    def memory_bytes(self) -> dict[str, int]:
        """Device memory held now: ``{"lse": ..., "plans": ..., "total": ..., "entries": ...}``."""
        lse = sum(t.numel() * t.element_size() for t in self._lse.values())
        plans = sum(p.nbytes for p in self._plans.values())
        return {"lse": lse, "plans": plans, "total": lse + plans, "entries": len(self.keys())}

    # -- records
    def _record(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self._pending.append((meta, tensors))

    @property
    def records(self) -> list[dict]:
        """One JSON-serialisable dict per (search, context, transformer, layer), in call order.

        Keys: ``generation``, ``step``, ``num_steps``, ``context``, ``transformer``, ``layer``,
        ``kind`` (``"dense-lse"``: dense attention + LSE, then the mass pass; ``"cached-lse"``: one
        mass pass with the cached LSE), ``due_step`` (the search step this search serves: the step
        itself, the one a step cache made the layer miss, or ``None`` for an on-demand search
        before any search step), ``scheduled`` (False for an on-demand or deferred search, see
        the module
        docstring), ``sparsity``, ``block_size``, ``num_blocks``, ``text_blocks`` ([start, stop)),
        and per batch element and head (lists ``[B][H]``): ``recall_at_sparsity`` (recall with the
        uniform budget), ``tier`` (+1 sparser, 0, -1 denser), ``head_sparsity``, ``blocks_per_row``,
        ``recall`` (at the chosen density); ``num_high_recall_heads`` ([B]) and ``density``.
        Reading this copies pending device values to the host (one synchronisation).
        """
        for meta, tensors in self._pending:
            values = {name: tensor.tolist() for name, tensor in tensors.items()}
            self._records.append({**meta, **values})
        self._pending.clear()
        return self._records

    def __repr__(self) -> str:
        memory = self.memory_bytes()
        return (
            f"AdaSpaRuntime(generation={self.generation}, entries={memory['entries']}, "
            f"lse={memory['lse'] / 2**20:.1f} MiB, plans={memory['plans'] / 2**20:.1f} MiB, "
            f"searches={len(self._records) + len(self._pending)})"
        )


# --------------------------------------------------------------------------- the method
def _check_fraction(name: str, value, *, low: float, high: float, closed_high: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        number = float(value)
        below_high = number <= high if closed_high else number < high
        ok = math.isfinite(number) and low <= number and below_high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(
            f"{name} must be a number in [{low}, {high}{bracket}, got {name}={value!r}"
        )
    return number


@dataclass(frozen=True)
class AdaSpa(Method):
    """AdaSpa (Xia et al., 2025): online row-uniform top-k block selection with head-adaptive
    budgets and an LSE cache across denoising steps. See the module docstring for the exact rule.

    Attributes:
        sparsity: fraction of the (video) key blocks each row skips, in [0, 1); default 0.8.
        block_size: query and key block size, 64 (the paper's) or 128.
        search_steps: steps of a ``reference_steps``-step run at which blocks are selected (ints,
            scaled to the run's length), or fractions of the run (floats in [0, 1)); strictly
            increasing. The first is a dense+LSE search; the others reuse its LSE. Steps before
            the first run dense (carried to the shared schedule as ``dense_steps``).
        head_adaptive: per-head budget tiers from each head's recall.
        recall_threshold: recall above which a head counts as high-recall (the paper's 0.8).
        reference_steps: the run length ``search_steps`` integers are given for (50); ``None``
            makes them absolute step indices.
    """

    name = "adaspa"

    sparsity: float = 0.8
    block_size: int = 64
    search_steps: tuple = (10, 30)
    head_adaptive: bool = True
    recall_threshold: float = 0.8
    reference_steps: int | None = 50

    # fastdit.apply(..., quantize="int8") runs the sparse attention on the INT8 kernel; the dense
    # pass that produces the LSE at a first search stays 16-bit (the LSE drives the selection).
    accepts_quantize = True
    # Runs on Ulysses head shards (fastdit.parallel): the budget tiers gather every head's recall.
    head_parallel = True

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        sparsity = _check_fraction("sparsity", self.sparsity, low=0.0, high=1.0, closed_high=False)
        set_field(self, "sparsity", sparsity)
        block = self.block_size
        if isinstance(block, bool) or block not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got block_size={block!r}"
            )
        set_field(self, "block_size", int(block))
        if not isinstance(self.head_adaptive, bool):
            raise ValueError(
                f"head_adaptive must be a bool, got head_adaptive={self.head_adaptive!r}"
            )
        threshold = _check_fraction(
            "recall_threshold", self.recall_threshold, low=0.0, high=1.0, closed_high=True
        )
        set_field(self, "recall_threshold", threshold)
        reference = self.reference_steps
        if reference is not None and (
            isinstance(reference, bool)
            or not isinstance(reference, numbers.Integral)
            or reference < 1
        ):
            raise ValueError(
                f"reference_steps must be a positive int or None, got reference_steps={reference!r}"
            )
        set_field(self, "reference_steps", None if reference is None else int(reference))
        set_field(self, "search_steps", self._checked_search_steps(self.search_steps))

    def _checked_search_steps(self, steps) -> tuple:
        if isinstance(steps, (numbers.Real, str)) or steps is None:
            steps = (steps,)
        try:
            steps = tuple(steps)
        except TypeError:
            raise ValueError(
                f"search_steps must be a sequence of steps, got search_steps={steps!r}"
            ) from None
        if not steps:
            raise ValueError("search_steps must name at least one step, got search_steps=()")
        checked = []
        for step in steps:
            if isinstance(step, bool) or not isinstance(step, numbers.Real):
                raise ValueError(
                    f"search_steps must hold int steps or fractions in [0, 1), got {step!r} in "
                    f"search_steps={steps!r}"
                )
            if isinstance(step, numbers.Integral):
                step = int(step)
                reference = self.reference_steps
                if step < 0 or (reference is not None and step >= reference):
                    bound = f"in [0, reference_steps={reference})" if reference else ">= 0"
                    raise ValueError(
                        f"search step {step} must be {bound}, got search_steps={steps!r}"
                    )
            else:
                step = float(step)
                if not 0.0 <= step < 1.0:
                    raise ValueError(
                        f"a fractional search step must be in [0, 1), got {step!r} in "
                        f"search_steps={steps!r}"
                    )
            checked.append(step)
        kinds = {type(step) for step in checked}
        if self.reference_steps is None and len(kinds) > 1:
            raise ValueError(
                "with reference_steps=None, search_steps must be all absolute step indices (ints) "
                f"or all fractions (floats), got search_steps={steps!r}"
            )
        fractions = [self._fraction(step) for step in checked]
        positions = [step if f is None else f for step, f in zip(checked, fractions)]
        if any(b <= a for a, b in zip(positions, positions[1:])):
            raise ValueError(
                f"search_steps must be strictly increasing, got search_steps={steps!r}"
            )
        return tuple(checked)

    def _fraction(self, step: int | float) -> float | None:
        """The step as a fraction of the run, or ``None`` for an absolute step index."""
        if isinstance(step, float):
            return step
        if self.reference_steps is None:
            return None
        return step / self.reference_steps

    # ------------------------------------------------------------------ schedule
    @property
    def dense_steps(self) -> int | float:
        """Warm-up steps run dense, for :meth:`Schedule.from_method`: the first search step (a
        fraction when it scales with the run, resolved with the same rounding as the searches)."""
        first = self.search_steps[0]
        fraction = self._fraction(first)
        return first if fraction is None else fraction

    def resolve_search_steps(self, num_steps: int | None) -> tuple[int, ...]:
        """The search steps of a ``num_steps``-step run: ascending, unique, maybe past the end."""
        resolved = []
        for step in self.search_steps:
            fraction = self._fraction(step)
            if fraction is not None:
                step = resolve_amount("search_steps", fraction, num_steps)
            resolved.append(step)
        return tuple(sorted(set(resolved)))

    # ------------------------------------------------------------------ plans
    def plan(self, layout: SequenceLayout | LatentGrid, device=None) -> MethodPlan:
        """The static part: a dense plan of ``block_size`` blocks (the mass pass runs on it)."""
        if isinstance(layout, LatentGrid):
            layout = SequenceLayout(layout)
        if not isinstance(layout, SequenceLayout):
            raise ValueError(
                f"layout must be a SequenceLayout or LatentGrid, got layout={layout!r}"
            )
        device = device_key(device)
        seq = layout.num_tokens
        return MethodPlan(_dense_plan(seq, seq, self.block_size, device), layout)

    def new_runtime(self) -> AdaSpaRuntime:
        return AdaSpaRuntime()

    @staticmethod
    def estimate_cache_bytes(
        num_tokens: int, heads: int, layers: int, *, sparsity: float = 0.8, block_size: int = 64,
        head_adaptive: bool = True, batch: int = 1, contexts: int = 1, text_tokens: int = 0,
    ) -> dict[str, int]:
        """Upper bound of a runtime's device memory: ``{"lse", "plans", "total"}`` in bytes.

        LSE ``contexts * layers * batch * heads * num_tokens * 4``; plans with every head at the
        widest row (the low tier's budget when head-adaptive) and int16 indices when they fit.
        """
        num_blocks = math.ceil(num_tokens / block_size)
        text_count = 0
        if text_tokens:
            text_count = min(num_blocks, math.ceil(text_tokens / block_size) + 1)
        free = num_blocks - text_count
        widest = _budget(tier_sparsities(sparsity)[1] if head_adaptive else sparsity, free)
        if head_adaptive:
            widest = max(widest, _budget(sparsity, free))
        index_bytes = 2 if num_blocks <= torch.iinfo(torch.int16).max else 4
        per_layer_rows = batch * heads * num_blocks
        lse = contexts * layers * batch * heads * num_tokens * 4
        plans = contexts * layers * per_layer_rows * ((widest + text_count) * index_bytes + 4)
        return {"lse": lse, "plans": plans, "total": lse + plans}

    # ------------------------------------------------------------------ per call
    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, float]:
        """Self-attention of one layer at one step, Q/K/V ``[B, S, H, D]`` (module docstring)."""
        runtime = call.runtime
        if not isinstance(runtime, AdaSpaRuntime):
            raise RuntimeError(
                "AdaSpa keeps its LSE cache and masks in a per-generation runtime "
                "(AdaSpa.new_runtime()), which fastdit.apply/attach provide through the "
                f"AttentionCall; got runtime={runtime!r}"
            )
        if runtime.generation != call.generation:
            runtime.clear()  # never serve one generation's state to another
            runtime.generation = call.generation
        layout = call.layout
        seq = query.shape[1]
        if seq != layout.num_tokens:
            raise ValueError(
                f"AdaSpa got {seq} tokens but the layout has {layout.num_tokens} ({layout})"
            )
        cache_key = call.cache_key
        steps = self.resolve_search_steps(call.num_steps) if call.step is not None else ()
        current = runtime._plans.get(cache_key)
        batch_matches = current is not None and current.batch == query.shape[0]
        cached = runtime._lse.get(cache_key)
        lse_usable = cached is not None and tuple(cached.shape) == (
            query.shape[0], query.shape[2], seq
        )
        if call.step is not None and call.step in steps:
            if call.step != steps[0] and lse_usable:
                plan = self._search(query, key, call, cached, "cached-lse", scheduled=True)
                return self._sparse(query, key, value, call, plan), plan.density
            return self._dense_search(query, key, value, call, scheduled=True), 1.0
        if not batch_matches:
            logger.info(
                "fastdit AdaSpa: no mask for %s at step %s; searching now (dense + LSE)",
                cache_key, call.step,
            )
            passed = [s for s in steps if s <= call.step] if call.step is not None else []
            out = self._dense_search(
                query, key, value, call, scheduled=False, due_step=passed[-1] if passed else None
            )
            return out, 1.0
        missed = self._missed_search(steps, call.step, current)
        if missed is not None:
            # A step cache (diffusers' FirstBlockCache, TaylorSeer, ...) skipped this layer at
            # search step ``missed``: search now, at its first computed step after it.
            logger.info(
                "fastdit AdaSpa: %s missed search step %s; searching at step %s",
                cache_key, missed, call.step,
            )
            if missed != steps[0] and lse_usable:
                plan = self._search(
                    query, key, call, cached, "cached-lse", scheduled=False, due_step=missed
                )
                return self._sparse(query, key, value, call, plan), plan.density
            out = self._dense_search(query, key, value, call, scheduled=False, due_step=missed)
            return out, 1.0
        return self._sparse(query, key, value, call, current), current.density

    @staticmethod
    def _missed_search(steps: tuple[int, ...], step: int | None, plan: _LayerPlan) -> int | None:
        """The latest search step at or before ``step`` that came after ``plan``'s search, i.e.
        a search this layer did not run because a step cache skipped it; ``None`` otherwise."""
        if step is None or plan.searched_at is None:
            return None
        due = [s for s in steps if plan.searched_at < s <= step]
        return due[-1] if due else None

    def _dense_search(
        self, query, key, value, call: AttentionCall, *, scheduled: bool,
        due_step: int | None = None,
    ) -> torch.Tensor:
        """Dense attention returning the LSE, cached; then the mass pass and a selection."""
        seq = query.shape[1]
        dense = _dense_plan(seq, seq, _LSE_PASS_BLOCK, query.device)
        out, lse = block_sparse_attention(
            query, key, value, dense, return_lse=True, key_padding=call.key_padding
        )
        call.runtime._lse[call.cache_key] = lse
        self._search(query, key, call, lse, "dense-lse", scheduled=scheduled, due_step=due_step)
        return out

    def _search(
        self, query, key, call: AttentionCall, lse, kind: str, *, scheduled: bool,
        due_step: int | None = None,
    ) -> _LayerPlan:
        """One ``QK^T`` block-mass pass with ``lse``, a selection, and its record."""
        mass = block_mass(query, key, lse, call.plan.sparsity, key_padding=call.key_padding)
        text = text_blocks(call.layout, self.block_size)
        selection = select_blocks(
            mass, self.sparsity, head_adaptive=self.head_adaptive,
            recall_threshold=self.recall_threshold, text=text, shard=call.heads,
        )
        plan = _LayerPlan.from_selection(selection, self.block_size, call.step)
        runtime: AdaSpaRuntime = call.runtime
        runtime._plans[call.cache_key] = plan
        runtime._record(
            dict(
                generation=call.generation, step=call.step, num_steps=call.num_steps,
                context=call.context, transformer=call.transformer, layer=call.layer, kind=kind,
                scheduled=scheduled, due_step=call.step if scheduled else due_step,
                sparsity=self.sparsity, block_size=self.block_size,
                num_blocks=mass.shape[-1], text_blocks=list(text),
            ),
            dict(
                recall_at_sparsity=selection.recall_at_sparsity, tier=selection.tier,
                head_sparsity=selection.head_sparsity, blocks_per_row=selection.blocks_per_row,
                recall=selection.recall, num_high_recall_heads=selection.num_high_recall_heads,
                density=selection.density,
            ),
        )
        return plan

    def _sparse(self, query, key, value, call: AttentionCall, plan: _LayerPlan) -> torch.Tensor:
        """Attention on the current mask; text query rows (if any) recomputed densely."""
        padding = call.key_padding
        quantize = call.quantize
        out = block_sparse_attention(
            query, key, value, plan.sparsity(), key_padding=padding, quantize=quantize
        )
        text = call.layout.text_slice
        if text is not None:
            seq = query.shape[1]
            text_rows = _dense_plan(text.stop - text.start, seq, self.block_size, query.device)
            out[:, text] = block_sparse_attention(
                query[:, text], key, value, text_rows, key_padding=padding, quantize=quantize
            )
        return out
