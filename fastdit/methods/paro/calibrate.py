"""PARO calibration: per-head axis orders and static block plans from a few dense generations.

``calibrate(pipe, prompts, ...)`` (and ``fastdit calibrate``) runs the pipeline dense on fastdit's
kernel with a collecting method installed through :func:`fastdit.apply`. For every self-attention
call of a collected step it gets Q and K after RoPE (and the dense output with its LSE), and for
each of the 6 axis orders it reorders Q, K and the LSE (all heads alike) and adds the block-level
attention mass ``W[p, c] = sum_{i in p, j in c} softmax_ij`` (:func:`fastdit.kernels.block_mass`,
one ``QK^T`` pass, no ``S x S`` map) into an fp32 accumulator per (timestep bucket, layer, order,
head). Memory: ``buckets * layers * 6 * heads * nb^2 * 4`` bytes on the pipeline's device (Wan2.1-1.3B
480p, block 128, 4 buckets: 2.3 GB). Wan2.1-14B at 720p needs 13.4 GB per bucket, so calibrate it
with ``num_buckets=1`` or 2 on an 80 GB GPU.

Then, per (layer, head), from the mass summed over buckets and normalised per query-block row:

* the order: the one that concentrates the mass into the fewest blocks, i.e. with a recall
  target ``r`` the fewest (query block, key block) pairs such that every query-block row keeps
  at least ``r`` of its mass (rows take their largest blocks first), and with a density target
  ``d`` the largest mass kept by the ``round(d * nK)`` largest blocks of each row; ties go to the
  earlier order of :data:`~fastdit.layout.AXIS_ORDERS` (THW, the identity, first);
* the plan of each timestep bucket: in the chosen order, each query-block row keeps its largest
  blocks by that bucket's mass until the recall target (or the ``round(d * nK)`` largest); the
  diagonal block (the query block's own tokens) is always kept, and blocks holding text tokens
  are dense rows and columns. A bucket without collected steps uses the all-bucket mass.

Deviation from the paper: the order criterion is sparsity only; PAROAttention also weighs how
uniform values are inside a block (which helps quantization). The INT8 kernel's per-block
scales and K smoothing meet the accuracy target without it (tests/kernels/test_int8_attention.py).

Cost: per collected call one dense attention with LSE plus 6 block-mass passes (each about one
``QK^T``), so a calibration takes a few times one dense generation; ``calibration_steps`` limits
collection to some steps (the pipeline still runs all of them, dense).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ...kernels import block_mass, block_sparse_attention
from ...kernels.plan import normalize_block_size
from ...layout import AXIS_ORDERS, AxisReordering, SequenceLayout
from ..base import AttentionCall, Method, MethodPlan
from ..dense import Dense
from .method import ParoPlan, layout_to_json

__all__ = ["DEFAULT_DENSITY", "calibrate", "calibrate_model", "choose_orders", "order_cost", "select_blocks", "spread_steps"]

#: Density target when neither ``density`` nor ``recall`` is given: the upper end of the 20-30%
#: that PAROAttention reports as lossless.
DEFAULT_DENSITY = 0.3


def _check_target(density: float | None, recall: float | None) -> tuple[float | None, float | None]:
    if density is not None and recall is not None:
        raise ValueError(f"give a density or a recall target, not both: got {density=}, {recall=}")
    if density is None and recall is None:
        density = DEFAULT_DENSITY
    value, name = (density, "density") if density is not None else (recall, "recall")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {name}={value!r}")
    return (float(density) if density is not None else None), (float(recall) if recall is not None else None)


def spread_steps(num_steps: int, count: int) -> list[int]:
    """``count`` denoising steps of ``num_steps`` spread evenly from the first to the last (what
    ``fastdit calibrate --calibration-steps`` collects)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_steps:
        raise ValueError(f"the number of calibration steps must be an int in [1, {num_steps}], got {count!r}")
    if count == 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def _sorted_rows(mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's masses in decreasing order (fp64) and their block indices."""
    return mass.double().sort(dim=-1, descending=True)


def _kept_in_sorted_order(sorted_mass: torch.Tensor, density: float | None, recall: float | None) -> torch.Tensor:
    """Bool over each row's blocks sorted by decreasing mass: which of them the target keeps
    (always at least the largest)."""
    num_kv = sorted_mass.shape[-1]
    first = torch.arange(num_kv, device=sorted_mass.device) == 0
    if recall is not None:
        # Keep a block while the mass before it is below the target share of the row's mass;
        # an exact exclusive sum, so recall 1.0 keeps exactly the blocks with any mass.
        cumulative = sorted_mass.cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        return (before < recall * cumulative[..., -1:]) | first
    keep = max(1, round(density * num_kv))
    return torch.arange(num_kv, device=sorted_mass.device) < keep


def select_blocks(mass: torch.Tensor, *, density: float | None = None, recall: float | None = None) -> torch.Tensor:
    """Bool ``[..., nQ, nK]``: per query-block row, its largest blocks by ``mass`` until ``recall``
    of the row's mass (or the ``round(density * nK)`` largest, at least one)."""
    density, recall = _check_target(density, recall)
    sorted_mass, order = _sorted_rows(mass)
    keep = _kept_in_sorted_order(sorted_mass, density, recall).expand_as(sorted_mass)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def order_cost(mass: torch.Tensor, *, density: float | None = None, recall: float | None = None) -> torch.Tensor:
    """Lower is better, ``[...]`` over the leading dims of ``mass [..., nQ, nK]``: with ``recall``,
    the fraction of blocks needed; with ``density``, minus the mean share of row mass the budget
    keeps (rounded to 1e-6 so that float noise does not break ties)."""
    density, recall = _check_target(density, recall)
    sorted_mass, _ = _sorted_rows(mass)
    keep = _kept_in_sorted_order(sorted_mass, density, recall).expand_as(sorted_mass)
    if recall is not None:
        return keep.float().mean(dim=(-1, -2))
    total = sorted_mass.sum(dim=-1)
    share = (sorted_mass * keep).sum(dim=-1) / torch.where(total > 0, total, torch.ones_like(total))
    return (-(share.mean(dim=-1) * 1e6).round() / 1e6).float()


def choose_orders(mass_per_order: torch.Tensor, *, density: float | None = None, recall: float | None = None) -> torch.Tensor:
    """Long ``[H]``: for ``[6, H, nQ, nK]`` masses (one per axis order), each head's best order
    (index into :data:`~fastdit.layout.AXIS_ORDERS`; the first of equals wins)."""
    if mass_per_order.shape[0] != len(AXIS_ORDERS):
        raise ValueError(f"expected {len(AXIS_ORDERS)} orders on dim 0, got shape {tuple(mass_per_order.shape)}")
    cost = order_cost(mass_per_order, density=density, recall=recall)  # [6, H]
    return cost.argmin(dim=0)  # argmin returns the first minimum


def _forced_blocks(layout: SequenceLayout, block_size: int, device) -> torch.Tensor:
    """Bool ``[nb, nb]``: the diagonal, and the rows and columns of blocks holding text."""
    num_blocks = math.ceil(layout.num_tokens / block_size)
    forced = torch.eye(num_blocks, dtype=torch.bool, device=device)
    text = layout.text_slice
    if text is not None:
        first, last = text.start // block_size, (text.stop - 1) // block_size
        forced[first : last + 1, :] = True
        forced[:, first : last + 1] = True
    return forced


class _MassCollector(Method):
    """The method :func:`calibrate` installs: dense attention, plus block mass per axis order."""

    def __init__(self, block_size: int, num_buckets: int, num_steps: int, calibration_steps) -> None:
        self.block_size = block_size
        self.num_buckets = num_buckets
        self.num_steps = num_steps
        self.calibration_steps = None if calibration_steps is None else frozenset(calibration_steps)
        self._dense = Dense(block_size)
        self.layout: SequenceLayout | None = None
        self.reordering: AxisReordering | None = None
        self.accumulators: dict[tuple[int, int], torch.Tensor] = {}
        self.transformer_layers: dict[int, int] = {}
        self.calls_per_bucket = [0] * num_buckets
        self.collected_steps: set[int] = set()
        # Time of the block-mass collection: host seconds on the CPU, CUDA event pairs on a GPU
        # (read once at the end, so timing adds no synchronisation inside attention).
        self._collect_host_seconds = 0.0
        self._collect_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.num_heads = self.head_dim = None

    def plan(self, layout: SequenceLayout, device=None) -> MethodPlan:
        if self.layout is None:
            self.layout, self.reordering = layout, AxisReordering(layout)
        elif layout != self.layout:
            raise ValueError(
                f"every calibration run must have the same size: got {layout} after {self.layout}"
            )
        return self._dense.plan(layout, device)

    def new_runtime(self) -> None:
        return None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall):
        out, lse = block_sparse_attention(
            query, key, value, call.plan.sparsity, key_padding=call.key_padding, return_lse=True
        )
        step = call.step
        if step is None or (self.calibration_steps is not None and step not in self.calibration_steps):
            return out, 1.0
        num_steps = call.num_steps or self.num_steps
        bucket = min(self.num_buckets - 1, step * self.num_buckets // num_steps)
        if query.is_cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        else:
            start = time.perf_counter()
        accumulator = self._accumulator(call, query)
        for index, order in enumerate(AXIS_ORDERS):
            if order == "THW":  # diffusers' order already
                q, k, row_lse = query, key, lse
            else:
                q, k = (self.reordering.reorder_all(x, order, dim=1) for x in (query, key))
                row_lse = self.reordering.reorder_all(lse, order, dim=2)
            mass = block_mass(q, k, row_lse, block_size=self.block_size, key_padding=call.key_padding)
            accumulator[bucket, index] += mass.sum(dim=0)
        self.calls_per_bucket[bucket] += 1
        self.collected_steps.add(step)
        if query.is_cuda:
            events[1].record()
            self._collect_events.append(events)
        else:
            self._collect_host_seconds += time.perf_counter() - start
        return out, 1.0

    @property
    def collect_seconds(self) -> float:
        """Seconds spent collecting block mass so far (waits for the GPU on the first read)."""
        if self._collect_events:
            self._collect_events[-1][1].synchronize()
        gpu_ms = sum(start.elapsed_time(end) for start, end in self._collect_events)
        return self._collect_host_seconds + gpu_ms / 1e3

    def _accumulator(self, call: AttentionCall, query: torch.Tensor) -> torch.Tensor:
        key = (call.transformer, call.layer)
        accumulator = self.accumulators.get(key)
        if accumulator is None:
            _, seq, heads, head_dim = query.shape
            if self.num_heads is not None and (heads, head_dim) != (self.num_heads, self.head_dim):
                raise ValueError(
                    f"all layers must have the same heads and head_dim, got {heads} x {head_dim} "
                    f"after {self.num_heads} x {self.head_dim}"
                )
            self.num_heads, self.head_dim = heads, head_dim
            self.transformer_layers[call.transformer] = call.num_layers
            num_blocks = math.ceil(seq / self.block_size)
            accumulator = torch.zeros(
                (self.num_buckets, len(AXIS_ORDERS), heads, num_blocks, num_blocks),
                dtype=torch.float32, device=query.device,
            )
            self.accumulators[key] = accumulator
        return accumulator

    def build(self, density: float | None = None, recall: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(orders uint8 ``[L, H]``, masks bool ``[buckets, L, H, nb, nb]``) on the CPU."""
        layer_counts = [self.transformer_layers.get(t, 0) for t in range(len(self.transformer_layers))]
        missing = [
            (t, layer) for t, count in enumerate(layer_counts) for layer in range(count)
            if (t, layer) not in self.accumulators
        ]
        if not self.accumulators or missing or 0 in layer_counts:
            raise RuntimeError(
                "calibration collected no attention mass for some layers "
                f"({missing[:4] or 'all'}): check that the pipeline ran at least one collected step"
            )
        forced = None
        orders, masks = [], []
        for t, count in enumerate(layer_counts):
            for layer in range(count):
                accumulator = self.accumulators[(t, layer)]
                total = accumulator.sum(dim=0)  # [6, H, nb, nb]
                order_ids = choose_orders(total, density=density, recall=recall)
                heads = torch.arange(order_ids.shape[0], device=order_ids.device)
                chosen = accumulator[:, order_ids, heads]  # [buckets, H, nb, nb]
                empty = torch.tensor([n == 0 for n in self.calls_per_bucket], device=chosen.device)
                chosen = torch.where(empty[:, None, None, None], total[order_ids, heads][None], chosen)
                if forced is None:
                    forced = _forced_blocks(self.layout, self.block_size, chosen.device)
                masks.append((select_blocks(chosen, density=density, recall=recall) | forced).cpu())
                orders.append(order_ids.to(torch.uint8).cpu())
        return torch.stack(orders), torch.stack(masks, dim=1)


def calibrate(
    pipe,
    prompts: str | Sequence[str],
    num_inference_steps: int = 50,
    *,
    density: float | None = None,
    recall: float | None = None,
    num_buckets: int = 4,
    block_size: int = 128,
    calibration_steps: Sequence[int] | None = None,
    output=None,
    seed: int = 0,
    **pipe_kwargs,
) -> ParoPlan:
    """Calibrate PARO on ``pipe``: run it dense on ``prompts`` and build a :class:`ParoPlan`.

    Args:
        pipe: a diffusers pipeline fastdit supports (``fastdit.supported_models()``), at the size
            (``height``, ``width``, ``num_frames`` in ``pipe_kwargs``) the plan is for.
        prompts: one prompt or several (each is one generation).
        num_inference_steps: denoising steps per generation (the schedule the plan is made for).
        density, recall: the target, one of them (default ``density=0.3``): each query-block row
            keeps ``round(density * nK)`` key blocks, or its largest blocks up to ``recall`` of
            its calibrated attention mass.
        num_buckets: timestep buckets, each with its own plans (steps split evenly).
        block_size: kernel block, 128 or 64.
        calibration_steps: the denoising steps whose attention is collected (default: all;
            :func:`spread_steps` picks evenly spread ones). The others run dense, uncollected.
        output: path to save the plan to (safetensors), or ``None``.
        seed: generation ``i`` uses ``torch.Generator("cpu").manual_seed(seed + i)``.
        pipe_kwargs: passed to every pipeline call (height, width, num_frames, guidance_scale...).

    Returns:
        The plan (``plan.summary()`` describes it; ``plan.save(path)`` writes it).
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("calibrate needs at least one prompt")

    def run() -> None:
        for index, prompt in enumerate(prompt_list):
            pipe(
                prompt=prompt,
                num_inference_steps=num_inference_steps,
                output_type="latent",
                generator=torch.Generator("cpu").manual_seed(seed + index),
                **pipe_kwargs,
            )

    return calibrate_model(
        pipe, run, num_inference_steps, density=density, recall=recall, num_buckets=num_buckets,
        block_size=block_size, calibration_steps=calibration_steps, output=output,
        calibration={"prompts": len(prompt_list)},
    )


def calibrate_model(
    pipe_or_model,
    run: Callable[[], object],
    num_inference_steps: int,
    *,
    density: float | None = None,
    recall: float | None = None,
    num_buckets: int = 4,
    block_size: int = 128,
    calibration_steps: Sequence[int] | None = None,
    output=None,
    calibration: dict | None = None,
) -> ParoPlan:
    """Calibrate PARO on whatever ``run()`` drives: :func:`calibrate`'s core, for callers that
    run the transformer themselves (a denoising loop of their own, a benchmark on random weights).

    ``run()`` must call the model(s) of ``pipe_or_model`` inside diffusers' step context (a
    pipeline does; a loop of one's own enters ``model.cache_context(name, step_index=step,
    num_inference_steps=num_inference_steps)``): only calls with a step index are collected.
    ``calibration`` adds entries to the plan's ``calibration`` metadata (what was run). The other
    arguments are :func:`calibrate`'s.
    """
    from ... import __version__
    from ...integration import apply, denoising_models

    density, recall = _check_target(density, recall)
    block_size, _ = normalize_block_size(block_size)
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or not 1 <= num_buckets <= num_inference_steps:
        raise ValueError(
            f"num_buckets must be an int in [1, num_inference_steps={num_inference_steps}], got {num_buckets!r}"
        )
    if output is not None:
        from ...files import check_writable_file

        reason = check_writable_file(output)  # before the calibration, not after it
        if reason is not None:
            raise ValueError(reason)
    models = denoising_models(pipe_or_model)
    classes = sorted({type(model).__name__ for model in models})
    if len(classes) != 1:
        raise ValueError(f"all transformers of the pipeline must be one class, got {classes}")

    collector = _MassCollector(block_size, num_buckets, num_inference_steps, calibration_steps)
    start = time.perf_counter()
    handle = apply(pipe_or_model, collector)
    try:
        with torch.inference_mode():
            run()
        orders, masks = collector.build(density, recall)
    finally:
        handle.remove()
    seconds = time.perf_counter() - start

    metadata = {
        "model_class": classes[0],
        "transformer_layers": [collector.transformer_layers[t] for t in range(len(collector.transformer_layers))],
        "num_heads": collector.num_heads,
        "head_dim": collector.head_dim,
        "layout": layout_to_json(collector.layout),
        "num_steps": num_inference_steps,
        "num_buckets": num_buckets,
        "block_size": block_size,
        "target": {"recall": recall} if recall is not None else {"density": density},
        "fastdit_version": __version__,
        "calibration": {
            **(calibration or {}),
            "collected_steps": sorted(collector.collected_steps),
            "calls_per_bucket": collector.calls_per_bucket,
            "seconds": round(seconds, 2),
            "collect_seconds": round(collector.collect_seconds, 2),
        },
    }
    plan = ParoPlan(orders, masks, metadata)
    if output is not None:
        plan.save(output)
    return plan
