"""PARO: axis orders and per-head reordering, calibration (orders, block plans) against brute
force, plan files, and the method end to end on the tiny Wan pipeline."""

import json
import math
import struct

import pytest
import torch

import fastdit
from fastdit.methods.paro.calibrate import _MassCollector, order_cost, select_blocks
from fastdit.kernels import BlockSparsity, block_sparse_attention
from fastdit.layout import (
    AXIS_ORDERS,
    AxisReordering,
    LatentGrid,
    SequenceLayout,
    TextSegment,
    axis_order_permutation,
)
from fastdit.methods.base import AttentionCall
from fastdit.methods.paro import PARO, ParoPlan, layout_to_json

GRID = LatentGrid(3, 4, 5)


# --------------------------------------------------------------------------- axis orders
def test_axis_order_permutation_is_lexicographic_order():
    coords = GRID.coords().tolist()
    for order in AXIS_ORDERS:
        axes = ["THW".index(axis) for axis in order]
        expected = sorted(range(GRID.num_tokens), key=lambda i: [coords[i][a] for a in axes])
        assert axis_order_permutation(GRID, order).tolist() == expected, order
    assert torch.equal(axis_order_permutation(GRID, "THW"), torch.arange(GRID.num_tokens))
    with pytest.raises(ValueError, match="order must be one of"):
        axis_order_permutation(GRID, "TTH")


@pytest.mark.parametrize("text", [None, "before", "after"])
def test_per_head_reordering_and_inverse_keep_text_in_place(rng, text):
    layout = SequenceLayout(GRID, None if text is None else TextSegment(7, text))
    seq = layout.num_tokens
    x = torch.randn(2, seq, len(AXIS_ORDERS), 4, generator=rng)
    order_ids = torch.randperm(len(AXIS_ORDERS), generator=rng)  # every head another order
    reordering = AxisReordering(layout)
    y = reordering.reorder(x, order_ids)
    assert y.shape == (2, len(AXIS_ORDERS), seq, 4) and y.is_contiguous()
    video = layout.video_slice
    for head, order_id in enumerate(order_ids.tolist()):
        expected = x[:, :, head].clone()
        permutation = axis_order_permutation(GRID, AXIS_ORDERS[order_id])
        expected[:, video] = x[:, video][:, permutation, head]
        assert torch.equal(y[:, head], expected)
        assert torch.equal(reordering.reorder_all(x, AXIS_ORDERS[order_id])[:, :, head], expected)
    restored = reordering.restore(y, order_ids)
    assert restored.shape == x.shape and restored.is_contiguous() and torch.equal(restored, x)
    gather, scatter = reordering.gather_index(order_ids), reordering.scatter_index(order_ids)
    assert torch.equal(torch.gather(gather, 1, scatter), torch.arange(seq).expand(len(AXIS_ORDERS), seq))
    lse = torch.randn(2, len(AXIS_ORDERS), seq, generator=rng)
    expected = lse.clone()
    expected[..., video] = lse[..., video][..., axis_order_permutation(GRID, "WHT")]
    assert torch.equal(reordering.reorder_all(lse, "WHT", dim=2), expected)
    with pytest.raises(ValueError, match="order_ids must be"):
        reordering.reorder(x, order_ids[:2])


# --------------------------------------------------------------------------- plan rule
def brute_force_keep(row: list[float], density=None, recall=None) -> set[int]:
    """The rule for one row: its largest blocks until ``recall`` of the row's mass, or the
    ``round(density * n)`` largest (at least one)."""
    ranked = sorted(range(len(row)), key=lambda c: -row[c])
    if density is not None:
        return set(ranked[: max(1, round(density * len(row)))])
    total, kept, mass = sum(row[c] for c in ranked), [], 0.0
    for c in ranked:
        kept.append(c)
        mass += row[c]
        if mass >= recall * total:
            break
    return set(kept)


@pytest.mark.parametrize("target", [{"recall": 0.8}, {"density": 0.3}, {"recall": 1.0}])
def test_select_blocks_and_order_cost_match_brute_force(rng, target):
    mass = torch.rand(3, 5, 7, generator=rng) ** 3
    mask = select_blocks(mass, **target)
    counts = []
    for head in range(3):
        for row in range(5):
            kept = brute_force_keep(mass[head, row].tolist(), **target)
            assert set(torch.nonzero(mask[head, row]).flatten().tolist()) == kept
            counts.append(len(kept))
    cost = order_cost(mass, **target)
    if "recall" in target:
        expected = torch.tensor(counts, dtype=torch.float32).view(3, 5).mean(1) / 7
        assert torch.allclose(cost, expected)
    else:
        probs = mass / mass.sum(-1, keepdim=True)
        expected = -(probs * mask).sum(-1).mean(-1)
        assert torch.allclose(cost, expected, atol=2e-6)
    with pytest.raises(ValueError, match="not both"):
        select_blocks(mass, density=0.3, recall=0.9)


def gaussian_qk(grid: LatentGrid, precision: list[tuple[float, float, float]], head_dim: int):
    """Q, K ``[1, N, H, D]`` whose attention is ``exp(-sum_a p_a (c_a(i) - c_a(j))^2)`` (softmax
    of scale * q . k at the default scale): per head, precisions ``p`` for (T, H, W)."""
    coords = grid.coords().double()
    qs, ks = [], []
    for p in precision:
        p = torch.tensor(p, dtype=torch.float64)
        q = torch.cat([2 * p * coords, torch.ones(len(coords), 1, dtype=torch.float64)], 1)
        k = torch.cat([coords, -(p * coords**2).sum(1, keepdim=True)], 1)
        q = torch.nn.functional.pad(q, (0, head_dim - 4)) * math.sqrt(head_dim)  # cancel 1/sqrt(D)
        qs.append(q)
        ks.append(torch.nn.functional.pad(k, (0, head_dim - 4)))
    return torch.stack(qs, 1)[None].float(), torch.stack(ks, 1)[None].float()


def test_calibrated_order_of_axis_banded_heads_is_that_axis_order(rng):
    # Head a attends along one axis (wide Gaussian) and is sharp along the other two: orders with
    # that axis innermost make its pattern block-local, so calibration must pick one of them.
    # The grid is large enough against the block that no other order is as good.
    grid, block = LatentGrid(6, 10, 12), 128
    layout = SequenceLayout(grid)
    wide, sharp = 0.02, 6.0
    banded = {"T": (wide, sharp, sharp), "H": (sharp, wide, sharp), "W": (sharp, sharp, wide)}
    q, k = gaussian_qk(grid, list(banded.values()), head_dim=16)
    v = torch.randn(q.shape, generator=rng)
    collector = _MassCollector(block_size=block, num_buckets=1, num_steps=1, calibration_steps=None)
    method_plan = collector.plan(layout)
    call = AttentionCall(method_plan, 0, 1, 0, step=0, num_steps=1, context=None, generation=0)
    out, _ = collector.attend(q, k, v, call)
    dense = block_sparse_attention(q, k, v, BlockSparsity.dense(grid.num_tokens, grid.num_tokens, block))
    assert torch.allclose(out, dense, atol=1e-5)  # calibration runs the model dense
    for target in ({"recall": 0.9}, {"density": 0.25}):
        orders, masks = collector.build(**target)
        chosen = [AXIS_ORDERS[i] for i in orders[0].tolist()]
        for head, axis in enumerate(banded):
            assert chosen[head][-1] == axis, (target, chosen, axis)
        # The plan against brute force: exact fp64 attention in the chosen order, block mass per
        # row, the target's blocks plus the diagonal. Symmetric neighbours tie, so compare how
        # many blocks and how much mass are kept, not which of two equal blocks.
        reordering = AxisReordering(layout)
        nb = math.ceil(grid.num_tokens / block)
        pad = nb * block - grid.num_tokens
        for head, order in enumerate(chosen):
            qh = reordering.reorder_all(q, order)[0, :, head].double()
            kh = reordering.reorder_all(k, order)[0, :, head].double()
            probs = torch.softmax(qh @ kh.T / 4.0, dim=-1)
            mass = torch.nn.functional.pad(probs, (0, pad, 0, pad)).view(nb, block, nb, block).sum((1, 3))
            for row in range(nb):
                best = list(brute_force_keep(mass[row].tolist(), **target) | {row})
                ours = torch.nonzero(masks[0, 0, head, row]).flatten()
                assert len(ours) == len(best) and masks[0, 0, head, row, row]
                assert mass[row, ours].sum() >= mass[row, best].sum() - 1e-4


# --------------------------------------------------------------------------- plan files
def make_plan(rng, layout, transformer_layers=(2,), heads=3, buckets=2, block=64, target=None):
    layers = sum(transformer_layers)
    nb = math.ceil(layout.num_tokens / block)
    metadata = {
        "model_class": "WanTransformer3DModel",
        "transformer_layers": list(transformer_layers),
        "num_heads": heads,
        "head_dim": 32,
        "layout": layout_to_json(layout),
        "num_steps": 4,
        "num_buckets": buckets,
        "block_size": block,
        "target": target or {"density": 0.3},
        "fastdit_version": fastdit.__version__,
    }
    masks = torch.rand(buckets, layers, heads, nb, nb, generator=rng) < 0.4
    orders = torch.randint(0, len(AXIS_ORDERS), (layers, heads), generator=rng).to(torch.uint8)
    return ParoPlan(orders, masks, metadata)


def test_plan_file_round_trip(rng, tmp_path):
    layout = SequenceLayout(LatentGrid(2, 6, 10), TextSegment(20, "after"))
    plan = make_plan(rng, layout, transformer_layers=(2, 1))
    path = tmp_path / "plan.safetensors"
    size = plan.save(path)
    loaded = ParoPlan.load(path)
    assert torch.equal(loaded.orders, plan.orders) and torch.equal(loaded.masks, plan.masks)
    assert loaded.metadata == plan.metadata and loaded.layout == layout
    assert size == path.stat().st_size
    # safetensors: an 8-byte header length, a JSON header, raw tensor bytes; no pickle anywhere.
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])
    assert set(header) == {"__metadata__", "orders", "masks"}
    assert json.loads(header["__metadata__"]["fastdit_paro_plan"])["format"] == "fastdit-paro-plan"
    assert plan.slot(1, 0) == 2 and plan.bucket(3, 4) == 1 and plan.bucket(1, 4) == 0
    assert plan.bucket(5, 10) == 1 and plan.bucket(None, None) == 0
    # Identical buckets deflate to almost nothing after the XOR with the previous bucket.
    same = ParoPlan(plan.orders, plan.masks[:1].expand_as(plan.masks).clone(), plan.metadata)
    assert same.save(tmp_path / "same.safetensors") < size


def test_plan_file_refusals(rng, tmp_path):
    from safetensors.torch import save_file

    layout = SequenceLayout(LatentGrid(2, 6, 10))
    path = tmp_path / "plan.safetensors"
    make_plan(rng, layout).save(path)
    with pytest.raises(ValueError, match="fastdit calibrate"):
        PARO()
    with pytest.raises(ValueError, match="does not exist.*fastdit calibrate"):
        PARO(plan=tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors PARO plan"):
        ParoPlan.load(tmp_path / "junk.safetensors")
    damaged = {"fastdit_paro_plan": json.dumps({"format": "fastdit-paro-plan", "format_version": 1})}
    save_file({"orders": torch.zeros(1, 1, dtype=torch.uint8), "masks": torch.zeros(3, dtype=torch.uint8)},
              str(tmp_path / "damaged.safetensors"), metadata=damaged)
    with pytest.raises(ValueError, match="damaged PARO plan"):
        ParoPlan.load(tmp_path / "damaged.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastdit PARO plan"):
        ParoPlan.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"calibrated for \{'density': 0.3\}, not density=0.5"):
        PARO(plan=path, density=0.5)
    method = PARO(plan=path, quantize=None)
    assert method.plan_file == str(path)
    assert method.plan(layout).layout == layout
    with pytest.raises(ValueError, match=r"calibrated for grid \(2, 6, 10\).*runs grid \(3, 6, 10\)"):
        method.plan(SequenceLayout(LatentGrid(3, 6, 10)))
    with pytest.raises(ValueError, match="text tokens"):
        method.plan(SequenceLayout(LatentGrid(2, 6, 10), TextSegment(8, "after")))
    with pytest.raises(ValueError, match="calibrated on WanTransformer3DModel"):
        method.check_models([torch.nn.Linear(2, 2)], [2])


# --------------------------------------------------------------------------- end to end
TINY = dict(height=96, width=160, num_frames=17, guidance_scale=1.0)


def test_calibrate_then_generate_with_paro_on_tiny_wan(tmp_path):
    from fastdit.testing.tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(dtype=torch.bfloat16)
    path = tmp_path / "plan.safetensors"
    plan = fastdit.calibrate(pipe, "a red fox", num_inference_steps=2, num_buckets=2, recall=0.9, output=path, **TINY)
    assert plan.masks.shape == (2, 2, 2, 3, 3) and plan.orders.shape == (2, 2)
    assert plan.metadata["calibration"]["collected_steps"] == [0, 1]
    assert plan.metadata["calibration"]["calls_per_bucket"] == [2, 2]  # 2 layers, 1 step per bucket

    def generate(method):
        handle = fastdit.apply(pipe, method)
        try:
            with torch.inference_mode():
                latents = pipe(
                    "a red fox", num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **TINY,
                ).frames
            densities = dict(handle.state.densities)
        finally:
            handle.remove()
        return latents.float(), densities

    dense, _ = generate(fastdit.Dense())
    relative = lambda x: ((x - dense).norm() / dense.norm()).item()  # noqa: E731
    for quantize in (None, "int8"):
        out, densities = generate(PARO(plan=path, quantize=quantize))
        assert torch.isfinite(out).all()
        assert relative(out) < 0.2, (quantize, relative(out))
        expected = plan.masks.float().mean(dim=(2, 3, 4))  # [bucket, layer]
        assert densities == {(layer, step): pytest.approx(float(expected[step, layer])) for layer in range(2) for step in range(2)}
    # With every block kept, PARO is dense attention through the reordering: same output
    # (mixed orders on the bf16 kernel; frame-major orders, no reordering, on INT8).
    mixed = torch.tensor([[1, 2], [3, 5]], dtype=torch.uint8)  # TWH, HWT / HTW, WTH
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("full", "thw", "mixed")}
    ParoPlan(mixed, torch.ones_like(plan.masks), plan.metadata).save(paths["full"])
    ParoPlan(torch.zeros_like(mixed), torch.ones_like(plan.masks), plan.metadata).save(paths["thw"])
    ParoPlan(mixed, plan.masks, plan.metadata).save(paths["mixed"])
    out, _ = generate(PARO(plan=paths["full"], quantize=None))
    assert relative(out) < 1e-2
    out, _ = generate(PARO(plan=paths["thw"], quantize="int8"))
    assert relative(out) < 5e-2
    out, _ = generate(PARO(plan=paths["mixed"], quantize="int8"))  # reordered, sparse, INT8
    assert torch.isfinite(out).all() and relative(out) < 0.2
    # A plan for another model is refused at install time, before anything changes.
    other = dict(plan.metadata, transformer_layers=[3])
    ParoPlan(plan.orders.repeat(2, 1)[:3], plan.masks.repeat(1, 2, 1, 1, 1)[:, :3], other).save(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"covers transformers of \[3\] self-attention layers"):
        fastdit.apply(pipe, PARO(plan=tmp_path / "o.safetensors"))
    # INT8 needs a 16-bit pipeline: a clear error, not a kernel failure.
    pipe32 = build_tiny_wan_pipeline(dtype=torch.float32)
    handle = fastdit.apply(pipe32, PARO(plan=path))
    with pytest.raises(ValueError, match="needs a bf16 or fp16 pipeline"), torch.inference_mode():
        pipe32("a red fox", num_inference_steps=1, output_type="latent", **TINY)
    handle.remove()


def test_paro_on_hunyuan_video_keeps_text_in_place_and_dense(rng, tmp_path):
    # Joint [video | text] attention with per-batch text padding (valid lengths 9 and 4): the
    # collector's block mass, the plans' dense text rows/columns, and PARO's reordering with the
    # text left in place, against fastdit's dense path on the same transformer.
    from tests.integration_helpers import run
    from tests.pipelines.test_hunyuan_integration import inputs, tiny_transformer

    model = tiny_transformer()
    kwargs = inputs(rng)
    collector = _MassCollector(block_size=64, num_buckets=1, num_steps=1, calibration_steps=None)
    handle = fastdit.apply(model, collector)
    dense = run(model, kwargs)
    handle.remove()
    layout = collector.layout
    assert layout.text is not None and layout.text.position == "after" and collector.transformer_layers == {0: 2}
    orders, masks = collector.build(recall=0.9)
    text_block = layout.text_slice.start // 64  # video 288 tokens, text 288..296: block 4
    assert masks[..., text_block, :].all() and masks[..., :, text_block].all()
    metadata = {
        "model_class": type(model).__name__, "transformer_layers": [2], "num_heads": 2,
        "head_dim": 16, "layout": layout_to_json(layout), "num_steps": 1, "num_buckets": 1,
        "block_size": 64, "target": {"recall": 0.9}, "fastdit_version": fastdit.__version__,
    }
    mixed = torch.tensor([[2, 4], [5, 1]], dtype=torch.uint8)
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("full", "calibrated")}
    ParoPlan(mixed, torch.ones_like(masks), metadata).save(paths["full"])
    ParoPlan(orders, masks, metadata).save(paths["calibrated"])
    handle = fastdit.apply(model, PARO(plan=paths["full"], quantize=None))
    out = run(model, kwargs)
    handle.remove()
    assert torch.allclose(out, dense, atol=1e-4, rtol=1e-4)  # reordering is exact, text in place
    handle = fastdit.apply(model, PARO(plan=paths["calibrated"], quantize=None))
    out = run(model, kwargs)
    handle.remove()
    assert torch.isfinite(out).all() and ((out - dense).norm() / dense.norm()) < 0.2
