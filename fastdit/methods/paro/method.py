"""PARO: pattern-aware token reordering per head, static block plans, INT8 attention.

Paper: Zhao et al., 2025, "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and
Quantized Attention in Visual Generation Models" (fastdit's ``METHODS.md``, section 5).

The rule. Every (layer, head) has one of the 6 axis orders of the latent grid
(:data:`~fastdit.layout.AXIS_ORDERS`: THW, TWH, HWT, HTW, WHT, WTH). Its Q, K and V (after RoPE)
are reordered into that order, which turns the head's diagonal, multi-diagonal or strided pattern
into a block-local one; attention runs on a static block plan for the current (timestep bucket,
layer, head); the output is put back in the original order. Orders and plans come from an
offline calibration (:func:`fastdit.calibrate`, ``fastdit calibrate``), saved as a
:class:`ParoPlan` file. ``quantize="int8"`` runs the plan on the INT8 kernel (Q and K INT8 with
per-block scales, K smoothed, P.V in bf16/fp16 with fp32 accumulation; see
:mod:`fastdit.kernels.quantized`).

Architecture line: the order and the plan are data (``layout`` -> the plan file -> this method
picks a :class:`~fastdit.kernels.BlockSparsity`), the kernels execute it. Reordering is
:class:`~fastdit.layout.AxisReordering`: one ``torch.gather`` for all heads with index tables
computed once per layout, text tokens of joint models stay in place (and their rows and columns
are dense in every plan).

Timestep buckets: step ``s`` of ``n`` falls in bucket ``min(nb - 1, s * nb // n)`` of the ``nb``
calibrated ones, so a plan calibrated with one step count serves generations with another (by
fraction of the schedule); a call outside a denoising loop uses bucket 0.

Host synchronisation: none per call, except the first time a bucket runs on a device: its block
maps are copied there and turned into plans (``BlockSparsity.from_block_map``, one sync per
layer). They stay there: ``sum H * nQ * max_kv * 4`` bytes over buckets and layers, about 0.1 GB
for Wan2.1-1.3B 480p at 30% density, a few GB for Wan2.1-14B 720p.

Plan file: safetensors, never pickle. ``orders`` (uint8 ``[layers, H]``) and ``masks``: the
boolean ``[buckets, layers, H, nQ, nK]`` block maps bit-packed (``numpy.packbits``), each bucket
XOR-ed with the previous one (neighbouring buckets share most blocks) and deflated (zlib); the
JSON metadata (model class, layers, heads, grid, text layout, steps, buckets, block size,
calibration target, fastdit version) is checked against the pipeline at install and at the first
forward. Size: ``buckets * layers * H * nb^2 / 8`` bytes before deflate: Wan2.1-1.3B at 720p
(nb = 591, 30 layers x 12 heads, 4 buckets) 62.9 MB, Wan2.1-14B at 720p (40 x 40) 279 MB.
Deflate shrinks structured masks a lot and random ones not at all. Measured on synthetic 720p
plans (bands plus strided diagonals per head, ~10% density, 2% of the blocks changing from
bucket to bucket): 2.1 MB (1.3B) and 9.2 MB (14B); uniformly random 30% masks: 60.7 MB (1.3B).
Calibrated masks are what the reordering makes block-local, so they sit at the structured end;
``fastdit calibrate`` prints the real size. The reference stores 1.6 to 8.9 GB of boolean masks.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

from ...files import atomic_path
from ...kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity, block_sparse_attention
from ...kernels.dispatch import QUANTIZED_DTYPES
from ...kernels.quantized import QUANTIZATIONS
from ...layout import AXIS_ORDERS, AxisReordering, LatentGrid, SequenceLayout, TextSegment, device_key
from ..base import AttentionCall, Method, MethodPlan, PlanCache

__all__ = ["PARO", "ParoPlan", "PLAN_FORMAT", "PLAN_FORMAT_VERSION", "layout_to_json"]

PLAN_FORMAT = "fastdit-paro-plan"
PLAN_FORMAT_VERSION = 1
_METADATA_KEY = "fastdit_paro_plan"
_CALIBRATE_HINT = (
    "run `fastdit calibrate --model <model> --height H --width W --num-frames F -o plan.safetensors` "
    "(or fastdit.calibrate(pipe, prompts, output=...)) for this pipeline and size"
)


def layout_to_json(layout: SequenceLayout) -> dict:
    text = None if layout.text is None else {"length": layout.text.length, "position": layout.text.position}
    return {"grid": list(layout.grid.shape), "text": text}


def _layout_from_json(data: dict) -> SequenceLayout:
    text = data.get("text")
    segment = None if text is None else TextSegment(int(text["length"]), text["position"])
    return SequenceLayout(LatentGrid(*data["grid"]), segment)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_metadata(metadata, source: str) -> None:
    """Every metadata entry a plan reads, with its type and range; ``ValueError`` naming
    ``source``, the key and the value otherwise (a plan file edited by hand, or damaged)."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{source}: metadata must be a JSON object, got {type(metadata).__name__}")

    def bad(key: str, rule: str) -> ValueError:
        shown = repr(metadata[key]) if key in metadata else "nothing (the key is missing)"
        return ValueError(f"{source}: metadata {key!r} must be {rule}, got {shown}; {_CALIBRATE_HINT}")

    if not isinstance(metadata.get("model_class"), str) or not metadata["model_class"]:
        raise bad("model_class", "a model class name")
    layers = metadata.get("transformer_layers")
    if not isinstance(layers, list) or not layers or not all(_is_count(n) for n in layers):
        raise bad("transformer_layers", "a non-empty list of layer counts (ints >= 1)")
    for key in ("num_heads", "num_steps", "num_buckets"):
        if not _is_count(metadata.get(key)):
            raise bad(key, "an int >= 1")
    if metadata.get("block_size") not in SUPPORTED_BLOCK_SIZES or isinstance(metadata["block_size"], bool):
        raise bad("block_size", f"one of {SUPPORTED_BLOCK_SIZES}")
    layout = metadata.get("layout")
    try:
        if not isinstance(layout, dict) or not isinstance(layout.get("grid"), list):
            raise TypeError
        if not all(_is_count(n) for n in layout["grid"]) or len(layout["grid"]) != 3:
            raise TypeError
        text = layout.get("text")
        if text is not None and not (isinstance(text, dict) and _is_count(text.get("length"))):
            raise TypeError
        _layout_from_json(layout)
    except (TypeError, ValueError, KeyError):
        raise bad("layout", '{"grid": [T, H, W] (ints >= 1), "text": null or {"length": n, '
                  '"position": "before" | "after"}}') from None
    target = metadata.get("target")
    if (
        not isinstance(target, dict)
        or len(target) != 1
        or next(iter(target)) not in ("density", "recall")
        or isinstance(next(iter(target.values())), bool)
        or not isinstance(next(iter(target.values())), (int, float))
        or not 0 < next(iter(target.values())) <= 1
    ):
        raise bad("target", '{"density": d} or {"recall": r} with a number in (0, 1]')


def _describe_layout(layout: SequenceLayout) -> str:
    text = "" if layout.text is None else f" + {layout.text.length} text tokens ({layout.text.position})"
    return f"grid {layout.grid.shape} ({layout.grid.num_tokens} video tokens){text}"


@dataclass(frozen=True, eq=False)
class ParoPlan:
    """Calibrated axis orders and static block maps of one model at one sequence layout.

    Attributes:
        orders: uint8 ``[L, H]``: index into :data:`~fastdit.layout.AXIS_ORDERS` per (layer, head);
            layers of all transformers in pipeline order (Wan2.2's two experts: ``L = L0 + L1``).
        masks: bool ``[nb_t, L, H, nQ, nK]``: kept (query block, key block) pairs per timestep
            bucket, layer and head, over the reordered sequence (text rows and columns dense).
        metadata: ``model_class``, ``transformer_layers`` (layers per transformer), ``num_heads``,
            ``head_dim``, ``layout`` (grid and text), ``num_steps``, ``num_buckets``,
            ``block_size``, ``target`` (``{"recall": r}`` or ``{"density": d}``),
            ``fastdit_version`` and calibration details (prompts, collected steps, time).
    """

    orders: torch.Tensor
    masks: torch.Tensor
    metadata: dict

    def __post_init__(self) -> None:
        _check_metadata(self.metadata, "ParoPlan")
        meta = self.metadata
        layers, heads = sum(meta["transformer_layers"]), meta["num_heads"]
        nq = math.ceil(self.layout.num_tokens / meta["block_size"])
        want = (meta["num_buckets"], layers, heads, nq, nq)
        if tuple(self.masks.shape) != want or self.masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool {want}, got {self.masks.dtype} {tuple(self.masks.shape)}")
        if tuple(self.orders.shape) != (layers, heads):
            raise ValueError(f"orders must be [{layers}, {heads}], got {tuple(self.orders.shape)}")
        if int(self.orders.max()) >= len(AXIS_ORDERS):
            raise ValueError(f"orders must index AXIS_ORDERS (< {len(AXIS_ORDERS)})")

    # ------------------------------------------------------------------ queries
    @property
    def layout(self) -> SequenceLayout:
        return _layout_from_json(self.metadata["layout"])

    @property
    def block_size(self) -> int:
        return int(self.metadata["block_size"])

    @property
    def num_buckets(self) -> int:
        return int(self.metadata["num_buckets"])

    @property
    def density(self) -> float:
        """Kept blocks over all blocks, averaged over buckets, layers and heads."""
        return float(self.masks.float().mean())

    def order_names(self) -> list[list[str]]:
        """``[L][H]`` order strings."""
        return [[AXIS_ORDERS[int(i)] for i in row] for row in self.orders]

    def bucket(self, step: int | None, num_steps: int | None) -> int:
        """The timestep bucket of denoising ``step`` of ``num_steps`` (by fraction of the schedule)."""
        if step is None:
            return 0
        total = num_steps if num_steps else int(self.metadata["num_steps"])
        return min(self.num_buckets - 1, max(0, step) * self.num_buckets // max(1, total))

    def slot(self, transformer: int, layer: int) -> int:
        """Row of ``orders`` and ``masks`` for ``layer`` of ``transformer``."""
        per_transformer = self.metadata["transformer_layers"]
        if not 0 <= transformer < len(per_transformer) or not 0 <= layer < per_transformer[transformer]:
            raise ValueError(
                f"plan covers transformers with {per_transformer} layers, got layer {layer} of "
                f"transformer {transformer}; {_CALIBRATE_HINT}"
            )
        return sum(per_transformer[:transformer]) + layer

    def summary(self) -> str:
        meta = self.metadata
        counts = torch.bincount(self.orders.flatten().long(), minlength=len(AXIS_ORDERS))
        orders = ", ".join(f"{name} {int(n)}" for name, n in zip(AXIS_ORDERS, counts) if n)
        target = ", ".join(f"{k} {v}" for k, v in meta["target"].items())
        return (
            f"PARO plan for {meta['model_class']}: {_describe_layout(self.layout)}, "
            f"{sum(meta['transformer_layers'])} layers x {meta['num_heads']} heads, block "
            f"{self.block_size}, {self.num_buckets} timestep bucket(s) of {meta['num_steps']} steps; "
            f"target {target}; mean density {self.density:.3f}; orders: {orders}"
        )

    # ------------------------------------------------------------------ checks
    def check_layout(self, layout: SequenceLayout, source: str = "the plan") -> None:
        if layout != self.layout:
            raise ValueError(
                f"{source} was calibrated for {_describe_layout(self.layout)}, but the pipeline runs "
                f"{_describe_layout(layout)}; {_CALIBRATE_HINT}"
            )

    def check_models(self, models, layers: list[int], source: str = "the plan") -> None:
        """Model class, self-attention layers per transformer (as the pipeline adapter counts
        them) and heads of the pipeline's transformers against the metadata."""
        meta = self.metadata
        classes = {type(model).__name__ for model in models}
        if classes != {meta["model_class"]}:
            raise ValueError(
                f"{source} was calibrated on {meta['model_class']}, but the pipeline has "
                f"{sorted(classes)}; {_CALIBRATE_HINT}"
            )
        if list(layers) != list(meta["transformer_layers"]):
            raise ValueError(
                f"{source} covers transformers of {meta['transformer_layers']} self-attention "
                f"layers, but the pipeline's have {list(layers)}; {_CALIBRATE_HINT}"
            )
        heads = [getattr(getattr(model, "config", None), "num_attention_heads", None) for model in models]
        if None not in heads and set(heads) != {meta["num_heads"]}:
            raise ValueError(
                f"{source} has {meta['num_heads']} heads per layer, but the pipeline's transformers "
                f"have {heads}; {_CALIBRATE_HINT}"
            )

    # ------------------------------------------------------------------ file
    def packed_size(self) -> int:
        """Bytes of the bit-packed masks before deflate."""
        return math.ceil(self.masks.numel() / 8)

    def save(self, path: str | os.PathLike) -> int:
        """Write a safetensors file (no pickle); returns its size in bytes."""
        from safetensors.torch import save_file

        buckets = self.masks.shape[0]
        bits = np.packbits(self.masks.reshape(buckets, -1).numpy(), axis=1)
        delta = bits.copy()
        delta[1:] ^= bits[:-1]  # neighbouring buckets mostly agree: XOR leaves mostly zeros
        blob = zlib.compress(delta.tobytes(), 6)
        tensors = {
            "orders": self.orders.to(torch.uint8).contiguous(),
            "masks": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
        }
        metadata = dict(self.metadata, format=PLAN_FORMAT, format_version=PLAN_FORMAT_VERSION)
        with atomic_path(path) as partial:  # a failed write leaves a previous plan file intact
            save_file(tensors, partial, metadata={_METADATA_KEY: json.dumps(metadata)})
        return os.path.getsize(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParoPlan:
        """Read a plan file written by :meth:`save`; raises ValueError naming what is wrong."""
        from safetensors import safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"PARO plan file {path!r} is a directory, not a plan file; {_CALIBRATE_HINT}")
        if not os.path.isfile(path):
            raise ValueError(f"PARO plan file {path!r} does not exist; {_CALIBRATE_HINT}")
        try:
            with safe_open(path, framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - any parse failure means: not a plan file
            raise ValueError(f"{path!r} is not a safetensors PARO plan file: {exc}") from None
        if _METADATA_KEY not in header or set(tensors) != {"orders", "masks"}:
            raise ValueError(f"{path!r} is a safetensors file but not a fastdit PARO plan")
        try:
            metadata = json.loads(header[_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r}: damaged PARO plan (its metadata is not valid JSON: {exc})") from None
        if not isinstance(metadata, dict):
            raise ValueError(
                f"{path!r}: damaged PARO plan (its metadata must be a JSON object, got "
                f"{type(metadata).__name__})"
            )
        if metadata.pop("format", None) != PLAN_FORMAT:
            raise ValueError(f"{path!r} is not a fastdit PARO plan (format {PLAN_FORMAT!r})")
        version = metadata.pop("format_version", None)
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"{path!r} has plan format version {version}, this fastdit reads version "
                f"{PLAN_FORMAT_VERSION}; {_CALIBRATE_HINT}"
            )
        _check_metadata(metadata, f"{path!r} (damaged PARO plan)")
        try:
            layout = _layout_from_json(metadata["layout"])
            nq = math.ceil(layout.num_tokens / metadata["block_size"])
            shape = (
                metadata["num_buckets"], sum(metadata["transformer_layers"]), metadata["num_heads"], nq, nq,
            )
            delta = np.frombuffer(zlib.decompress(tensors["masks"].numpy().tobytes()), dtype=np.uint8)
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise ValueError(f"{path!r}: damaged PARO plan ({type(exc).__name__}: {exc})") from None
        per_bucket = math.ceil(math.prod(shape[1:]) / 8)
        if delta.size != shape[0] * per_bucket:
            raise ValueError(f"{path!r}: mask data does not match the shape {shape} of its metadata")
        bits = np.bitwise_xor.accumulate(delta.reshape(shape[0], per_bucket), axis=0)
        masks = np.unpackbits(bits, axis=1, count=math.prod(shape[1:])).astype(bool)
        try:
            return cls(tensors["orders"], torch.from_numpy(masks.reshape(shape)), metadata)
        except ValueError as exc:
            raise ValueError(f"{path!r}: damaged PARO plan ({exc})") from None


@dataclass
class _DevicePlans:
    """A plan file's orders and block plans on one device (made once, filled per bucket)."""

    order_ids: list[torch.Tensor]  # per layer slot: long [H]
    frame_major: list[bool]  # per layer slot: every head keeps diffusers' order (THW)
    sparsities: dict[tuple[int, int], BlockSparsity] = field(default_factory=dict)


@dataclass(frozen=True)
class PARO(Method):
    """PARO (Zhao et al., 2025): per-head axis reordering, calibrated static block plans, INT8.

    The rule is in this module's docstring. Install with ``fastdit.apply(pipe, PARO(plan=path))``
    after calibrating (``fastdit calibrate`` or :func:`fastdit.calibrate`).

    Args:
        plan: path of the calibrated plan file (required). Init-only: ``PARO.plan`` is the
            method's ``plan(layout, device)`` like every method's; the path is :attr:`plan_file`.
        quantize: ``"int8"`` (the paper's INT8 attention; needs a bf16/fp16 pipeline),
            ``"int8-fp8"`` (INT8 Q.K and FP8 P.V, see :mod:`fastdit.kernels.quantized`) or ``None``
            for the bf16/fp16 block-sparse kernel at the same plan.
        density, recall: the calibration target the plan must have been built with (``None``
            accepts the file's); a plan holds block maps for one target, so another target
            means calibrating again.
    """

    name = "paro"

    plan: InitVar[str | os.PathLike | None] = None
    quantize: str | None = "int8"
    density: float | None = None
    recall: float | None = None
    plan_file: str = field(init=False, default="")
    # The plan file's contents (never evicted) and what is derived per device and layout.
    _loaded: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cache: PlanCache = field(default_factory=PlanCache, init=False, repr=False, compare=False)

    # Per-head orders and plans are sliced to a Ulysses rank's heads (call.heads, fastdit.parallel).
    head_parallel = True

    def __post_init__(self, plan) -> None:
        if plan is None:
            raise ValueError(f"PARO needs a calibrated plan file: PARO(plan=path); {_CALIBRATE_HINT}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got quantize={self.quantize!r}")
        object.__setattr__(self, "plan_file", os.fspath(plan))
        paro_plan = ParoPlan.load(self.plan_file)
        target = paro_plan.metadata["target"]
        for name in ("density", "recall"):
            wanted = getattr(self, name)
            if wanted is not None and target.get(name) != wanted:
                raise ValueError(
                    f"{self.plan_file!r} was calibrated for {target}, not {name}={wanted}; pass "
                    f"{name}=None to use it, or calibrate again with --{name} {wanted}"
                )
        if paro_plan.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"plan block size {paro_plan.block_size} is not one of {SUPPORTED_BLOCK_SIZES}")
        self._loaded["plan"] = paro_plan

    @property
    def paro_plan(self) -> ParoPlan:
        return self._loaded["plan"]

    def check_models(self, models, layers: list[int]) -> None:
        """Called by ``fastdit.apply`` with the transformers and their self-attention layer
        counts: they must be the calibrated ones."""
        self.paro_plan.check_models(models, layers, source=repr(self.plan_file))

    def check_grid(self, grid: LatentGrid) -> None:
        """Raise ``ValueError`` unless the plan file was calibrated for this latent grid."""
        calibrated = self.paro_plan.layout.grid
        if grid != calibrated:
            raise ValueError(
                f"{self.plan_file!r} was calibrated for grid {calibrated.shape}, not {grid.shape}; "
                f"{_CALIBRATE_HINT}"
            )

    def new_runtime(self) -> None:
        return None

    def _device_plans(self, device: torch.device) -> _DevicePlans:
        def build() -> _DevicePlans:
            orders = self.paro_plan.orders.long()
            frame_major = [bool(row.eq(AXIS_ORDERS.index("THW")).all()) for row in orders]
            return _DevicePlans(list(orders.to(device).unbind(0)), frame_major)

        return self._cache.get_or_build(("device", device_key(device)), build)

    def _sparsity(self, plans: _DevicePlans, bucket: int, slot: int, device) -> BlockSparsity:
        sparsity = plans.sparsities.get((bucket, slot))
        if sparsity is None:
            # First use of this bucket on this device: all its layers at once (one host sync each,
            # to size the index lists; never again for this bucket).
            paro_plan = self.paro_plan
            for each in range(paro_plan.masks.shape[1]):
                block_map = paro_plan.masks[bucket, each][None].to(device)
                plans.sparsities[(bucket, each)] = BlockSparsity.from_block_map(block_map, paro_plan.block_size)
            sparsity = plans.sparsities[(bucket, slot)]
        return sparsity

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall):
        paro_plan = self.paro_plan
        slot = paro_plan.slot(call.transformer, call.layer)
        shard = call.heads  # Ulysses: this rank's heads of the layer
        heads = query.shape[2] if shard is None else shard.total
        if heads != paro_plan.metadata["num_heads"]:
            raise ValueError(
                f"{self.plan_file!r} has {paro_plan.metadata['num_heads']} heads per layer, the model "
                f"has {heads}; {_CALIBRATE_HINT}"
            )
        if self.quantize is not None and query.dtype not in QUANTIZED_DTYPES:
            raise ValueError(
                f"PARO(quantize={self.quantize!r}) needs a bf16 or fp16 pipeline (P.V runs in 16 "
                f"bits), got {query.dtype}: load the pipeline in bfloat16 (--dtype bfloat16) or "
                "use PARO(quantize=None)"
            )
        bucket = paro_plan.bucket(call.step, call.num_steps)
        plans = self._device_plans(query.device)
        sparsity = self._sparsity(plans, bucket, slot, query.device)
        density = self._density(bucket, slot)
        order_ids = plans.order_ids[slot]
        if shard is not None:
            sparsity, order_ids = shard.slice_plan(sparsity), shard.local(order_ids, dim=0)
        if plans.frame_major[slot]:  # nothing to reorder in this layer
            out = block_sparse_attention(
                query, key, value, sparsity, key_padding=call.key_padding, quantize=self.quantize
            )
            return out, density
        reordering = self._reordering(call.layout)
        index = reordering.gather_index(order_ids)  # [H, S], shared by Q, K, V and the output
        q, k, v = (reordering.reorder(x, order_ids, index) for x in (query, key, value))
        out = block_sparse_attention(
            q, k, v, sparsity, layout="bhsd", key_padding=call.key_padding, quantize=self.quantize
        )
        return reordering.restore(out, order_ids, index), density

    def _reordering(self, layout: SequenceLayout) -> AxisReordering:
        return self._cache.get_or_build(("reordering", layout), lambda: AxisReordering(layout))

    def _density(self, bucket: int, slot: int) -> float:
        densities = self._loaded.get("densities")
        if densities is None:
            densities = self.paro_plan.masks.float().mean(dim=(2, 3, 4))  # [buckets, layers]
            self._loaded["densities"] = densities
        return float(densities[bucket, slot])


def _method_plan(self: PARO, layout: SequenceLayout, device=None) -> MethodPlan:
    """The static part PARO reports to the integration: a dense plan over the sequence order
    (the per-head reordering and the block plans happen in :meth:`PARO.attend`). Checks the
    layout against the plan file once per layout."""
    device = device_key(device)

    def build() -> MethodPlan:
        self.paro_plan.check_layout(layout, source=repr(self.plan_file))
        seq = layout.num_tokens
        return MethodPlan(BlockSparsity.dense(seq, seq, self.paro_plan.block_size, device=device), layout)

    return self._cache.get_or_build(("method_plan", layout, device), build)


# ``plan`` is both the constructor's path argument (an InitVar, as the CLI's ``plan=path`` and the
# paper's API read) and every method's ``plan(layout, device)``: the method is attached after the
# dataclass is built, so the generated __init__ keeps ``plan=None`` as its default.
PARO.plan = _method_plan
