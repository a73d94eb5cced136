"""BlockSparsity (the plan) against brute force on fresh random inputs."""

import math

import pytest
import torch

from fastdit.kernels import BlockSparsity


def random_map(rng, batch, heads, num_q, num_kv, density):
    return torch.rand(batch, heads, num_q, num_kv, generator=rng) < density


def assert_plan_matches_map(plan, block_map):
    """Every invariant of the padded-CSR form, checked row by row against ``block_map``."""
    assert plan.kv_counts.dtype == torch.int32 and plan.kv_indices.dtype == torch.int32
    assert plan.kv_counts.is_contiguous() and plan.kv_indices.is_contiguous()
    assert plan.kv_counts.shape == block_map.shape[:3]
    assert plan.num_kv_blocks == block_map.shape[-1]
    assert torch.equal(plan.kv_counts, block_map.sum(-1).to(torch.int32))
    assert plan.kv_indices.shape[-1] == max(1, int(block_map.sum(-1).max()))
    for b, h, p in torch.cartesian_prod(*(torch.arange(n) for n in block_map.shape[:3])).tolist():
        count = int(plan.kv_counts[b, h, p])
        row = plan.kv_indices[b, h, p]
        assert torch.equal(row[:count].long(), torch.nonzero(block_map[b, h, p]).flatten())
        assert torch.all(row[:count].diff() > 0), "indices must be strictly increasing"
        assert torch.all(row[count:] == 0), "padding must be 0"
    assert torch.equal(plan.to_block_map(), block_map)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3)])
def test_from_block_map_round_trip(rng, batch, heads, density):
    num_q, num_kv = torch.randint(3, 12, (2,), generator=rng).tolist()
    block_map = random_map(rng, batch, heads, num_q, num_kv, density)
    if 0.0 < density < 1.0:
        block_map[0, 0, 0] = False  # an all-False row
        block_map[-1, -1, 1] = True  # an all-True row
        block_map[0, -1, 2] = False  # only block 0 kept: padding is also 0
        block_map[0, -1, 2, 0] = True
    plan = BlockSparsity.from_block_map(block_map, block_size=128)
    assert_plan_matches_map(plan, block_map)
    assert plan.density == pytest.approx(block_map.float().mean().item(), abs=1e-6)
    assert plan.density == int(block_map.sum()) / block_map.numel()  # exact in float64


def test_block_zero_only(rng):
    # Every row keeps only block 0, or nothing: padding and real entries coincide.
    block_map = torch.zeros(2, 2, 5, 7, dtype=torch.bool)
    block_map[..., 0] = torch.rand(2, 2, 5, generator=rng) < 0.5
    block_map[0, 0, 0, 0] = True
    plan = BlockSparsity.from_block_map(block_map)
    assert_plan_matches_map(plan, block_map)
    assert plan.kv_indices.shape[-1] == 1


@pytest.mark.parametrize("block_size", [64, (128, 64), (64, 128)])
def test_block_sizes_recorded(rng, block_size):
    block_map = random_map(rng, 1, 2, 4, 6, 0.5)
    plan = BlockSparsity.from_block_map(block_map, block_size)
    expected = (block_size, block_size) if isinstance(block_size, int) else block_size
    assert (plan.q_block_size, plan.kv_block_size) == expected
    assert plan.num_q_blocks == 4 and plan.num_kv_blocks == 6


def test_from_indices_broadcast_form(rng):
    num_q, num_kv = 6, 9
    lists, expected = [], torch.zeros(1, 1, num_q, num_kv, dtype=torch.bool)
    for p in range(num_q):
        num_picks = int(torch.randint(0, 12, (1,), generator=rng))
        picks = torch.randint(0, num_kv, (num_picks,), generator=rng)
        picks = picks.tolist() + picks[:2].tolist()  # duplicates, unsorted
        lists.append(picks)
        expected[0, 0, p, picks] = True
    lists[1] = []  # a query block visiting nothing
    expected[0, 0, 1] = False
    plan = BlockSparsity.from_indices(lists, num_kv, block_size=64)
    assert_plan_matches_map(plan, expected)
    assert (plan.q_block_size, plan.kv_block_size) == (64, 64)


def test_from_indices_first_row_empty():
    plan = BlockSparsity.from_indices([[], [3, 1, 1]], 4)
    assert plan.kv_counts.tolist() == [[[0, 2]]]
    assert plan.kv_indices[0, 0, 1].tolist() == [1, 3]


def test_from_indices_nested_form(rng):
    batch, heads, num_q, num_kv = 2, 3, 4, 5
    expected = random_map(rng, batch, heads, num_q, num_kv, 0.5)
    nested = []
    for b in range(batch):
        nested.append([])
        for h in range(heads):
            rows = []
            for p in range(num_q):
                picks = torch.nonzero(expected[b, h, p]).flatten().tolist()
                rows.append(list(reversed(picks)) + picks[:1])  # unsorted, one duplicate
            nested[b].append(rows)
    plan = BlockSparsity.from_indices(nested, num_kv)
    assert_plan_matches_map(plan, expected)


def test_from_indices_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 5\).*got 5.*query block 1"):
        BlockSparsity.from_indices([[0], [1, 5]], 5)
    with pytest.raises(ValueError, match=r"got -1"):
        BlockSparsity.from_indices([[-1]], 5)
    with pytest.raises(ValueError, match=r"got 7 at \(batch 1, head 0, query block 0\)"):
        BlockSparsity.from_indices([[[[0]]], [[[7]]]], 5)


def test_from_indices_ragged_nesting():
    with pytest.raises(ValueError, match="batch 1 has 1 heads, expected 2"):
        BlockSparsity.from_indices([[[[0]], [[1]]], [[[0]]]], 3)
    with pytest.raises(ValueError, match="batch 0 head 1 has 1 query blocks, expected 2"):
        BlockSparsity.from_indices([[[[0], [1]], [[2]]]], 3)
    with pytest.raises((TypeError, ValueError)):  # batch 1 is one nesting level short
        BlockSparsity.from_indices([[[[0]]], [[0]]], 3)


@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3)])
def test_from_kv_indices_topk(rng, batch, heads):
    num_q, num_kv = 7, 10
    top_k = int(torch.randint(1, num_kv + 1, (1,), generator=rng))
    scores = torch.rand(batch, heads, num_q, num_kv, generator=rng)
    picks = torch.topk(scores, top_k, dim=-1).indices
    selection = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picks, True)
    plan = BlockSparsity.from_kv_indices(picks, num_kv, block_size=(128, 64))
    assert torch.all(plan.kv_counts == top_k)
    assert_plan_matches_map(plan, selection)
    reference = BlockSparsity.from_block_map(selection, (128, 64))
    assert torch.equal(plan.kv_counts, reference.kv_counts)
    assert torch.equal(plan.kv_indices, reference.kv_indices)


def test_from_kv_indices_rejects_float():
    with pytest.raises(ValueError, match="float32"):
        BlockSparsity.from_kv_indices(torch.zeros(1, 1, 2, 2), 4)


@pytest.mark.parametrize("seq_q,seq_kv", [(1000, 700), (128, 128), (1, 129), (4096, 64)])
@pytest.mark.parametrize("block_size", [64, 128, (128, 64)])
def test_dense(seq_q, seq_kv, block_size):
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    num_q, num_kv = math.ceil(seq_q / q_block), math.ceil(seq_kv / kv_block)
    plan = BlockSparsity.dense(seq_q, seq_kv, block_size)
    assert (plan.num_q_blocks, plan.num_kv_blocks) == (num_q, num_kv)
    assert plan.kv_counts.shape == (1, 1, num_q) and torch.all(plan.kv_counts == num_kv)
    expected = torch.arange(num_kv, dtype=torch.int32).expand(num_q, -1)
    assert torch.equal(plan.kv_indices[0, 0], expected)
    assert plan.kv_indices.is_contiguous()
    assert plan.density == 1.0
    plan.check_shape(seq_q, seq_kv)
    assert plan.computed_pairs(seq_q, seq_kv) == seq_q * seq_kv


@pytest.mark.parametrize("seq_q,seq_kv", [(1000, 700), (256, 257), (65, 63)])
@pytest.mark.parametrize("block_size", [64, 128, (64, 128)])
def test_computed_pairs_brute_force(rng, seq_q, seq_kv, block_size):
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    num_q, num_kv = math.ceil(seq_q / q_block), math.ceil(seq_kv / kv_block)
    block_map = random_map(rng, 2, 2, num_q, num_kv, 0.4)
    block_map[0, 0, -1, -1] = True  # the ragged corner block
    plan = BlockSparsity.from_block_map(block_map, block_size)
    ones = torch.ones(q_block, kv_block, dtype=torch.int32)
    token_mask = torch.stack(
        [torch.stack([torch.kron(per_h.int(), ones) for per_h in per_b]) for per_b in block_map]
    )[:, :, :seq_q, :seq_kv]
    assert plan.computed_pairs(seq_q, seq_kv) == int(token_mask.sum())


def test_check_shape_names_numbers():
    plan = BlockSparsity.dense(1000, 700)  # 8 x 6 blocks of 128
    plan.check_shape(1000, 700)
    plan.check_shape(897, 641)
    with pytest.raises(ValueError, match=r"8 query blocks x 6 key blocks.*ceil\(1200/128\)=10"):
        plan.check_shape(1200, 700)
    with pytest.raises(ValueError, match=r"ceil\(1000/128\)=8 x ceil\(900/128\)=8"):
        plan.check_shape(1000, 900)
    with pytest.raises(ValueError, match=r"ceil\(1000/128\)=8 x ceil\(640/128\)=5"):
        plan.computed_pairs(1000, 640)


def test_from_block_map_validation():
    with pytest.raises(TypeError, match="int64"):
        BlockSparsity.from_block_map(torch.ones(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32"):
        BlockSparsity.from_block_map(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        BlockSparsity.from_block_map(torch.ones(2, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("block_size,bad", [(32, "32"), (256, "256"), ((128, 96), "96"), (0, "0")])
def test_block_size_validation(block_size, bad):
    block_map = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"one of \(64, 128\), got {bad}\b"):
        BlockSparsity.from_block_map(block_map, block_size)
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        BlockSparsity.dense(256, 256, block_size)
    with pytest.raises(ValueError, match=rf"got {bad}\b"):
        BlockSparsity.from_indices([[0], [1]], 2, block_size)


def test_block_size_wrong_arity():
    with pytest.raises(ValueError, match=r"\(64, 64, 64\)"):
        BlockSparsity.dense(256, 256, (64, 64, 64))


def test_dataclass_validation():
    counts = torch.ones(1, 1, 2, dtype=torch.int32)
    indices = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    BlockSparsity(counts, indices, 128, 128, 3)
    with pytest.raises(TypeError, match="int64"):
        BlockSparsity(counts.long(), indices, 128, 128, 3)
    with pytest.raises(TypeError, match="int64"):
        BlockSparsity(counts, indices.long(), 128, 128, 3)
    with pytest.raises(ValueError, match=r"\(1, 1, 3\)"):
        BlockSparsity(torch.ones(1, 1, 3, dtype=torch.int32), indices, 128, 128, 3)
    with pytest.raises(ValueError, match="got 0"):
        BlockSparsity(counts, indices, 128, 128, 0)
    with pytest.raises(ValueError, match="got 96"):
        BlockSparsity(counts, indices, 128, 96, 3)


def test_to_and_repr(rng):
    block_map = random_map(rng, 2, 3, 4, 5, 0.5)
    plan = BlockSparsity.from_block_map(block_map, (64, 128))
    moved = plan.to("cpu")
    assert isinstance(moved, BlockSparsity) and moved.device == torch.device("cpu")
    assert torch.equal(moved.kv_counts, plan.kv_counts)
    assert torch.equal(moved.kv_indices, plan.kv_indices)
    assert (moved.q_block_size, moved.kv_block_size, moved.num_kv_blocks) == (64, 128, 5)
    assert torch.equal(moved.to_block_map(), block_map)
    text = repr(plan)
    for part in ("batch=2", "heads=3", "q_blocks=4", "kv_blocks=5", "(64, 128)", "cpu"):
        assert part in text, f"{part!r} missing from {text!r}"
