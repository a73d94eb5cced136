"""VMoBA: partitions, scores and both selections against brute-force per-token references, the
query-tile aggregation rule, the block plan, the attention output against masked SDPA, and the
integration into diffusers' Wan and HunyuanVideo."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastdit
from fastdit import LatentGrid, SequenceLayout, TextSegment, VMoBA
from fastdit.kernels import BlockSparsity, segment_mean_pool
from fastdit.kernels.reference import segment_mean_pool_reference
from fastdit.methods.base import AttentionCall
from fastdit.methods.vmoba import (
    PUBLISHED_PARTITION_SIZES,
    VideoPartition,
    default_partition_sizes,
    global_threshold_tiles,
    normalise_scores_,
    topk_tile_means,
    topk_tiles,
)
from tests.integration_helpers import run

# Ragged grid (5 frames, 6 x 10) with explicit sizes that divide nothing, and a divisible one.
RAGGED = (LatentGrid(5, 6, 10), ((2,), (4, 3), (2, 4, 3)))
DIVISIBLE = (LatentGrid(4, 8, 16), ((1,), (4, 8), (2, 4, 8)))


# --------------------------------------------------------------------------- brute force


def brute_partition_ids(grid: LatentGrid, box) -> list[int]:
    n_h, n_w = math.ceil(grid.height / box[1]), math.ceil(grid.width / box[2])
    ids = []
    for t in range(grid.frames):
        for h in range(grid.height):
            for w in range(grid.width):
                ids.append(((t // box[0]) * n_h + h // box[1]) * n_w + w // box[2])
    return ids


def brute_global_threshold(values: torch.Tensor, tau: float) -> torch.Tensor:
    """Per (b, h): sort all (query, partition) values descending, keep the shortest prefix whose
    cumulative sum reaches tau * total, plus every pair equal to the last kept value."""
    batch, heads, num, parts = values.shape
    out = torch.zeros(batch, heads, num, parts, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            flat = values[b, h].flatten().double()
            ordered = flat.sort(descending=True).values
            target = tau * float(flat.sum())
            if target <= 0:
                continue
            cumulative = 0.0
            for count, value in enumerate(ordered.tolist(), start=1):
                cumulative += value
                if cumulative >= target:
                    break
            out[b, h] = values[b, h].double() >= ordered[count - 1]
    return out


def brute_topk(scores: torch.Tensor, k: int, own: torch.Tensor) -> torch.Tensor:
    """Per query: its own partition plus the k - 1 best other partitions."""
    batch, heads, num, parts = scores.shape
    out = torch.zeros(batch, heads, num, parts, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(num):
                own_c = int(own[i])
                others = [c for c in range(parts) if c != own_c]
                others.sort(key=lambda c: -float(scores[b, h, i, c]))
                for c in [own_c] + others[: k - 1]:
                    out[b, h, i, c] = True
    return out


def brute_tile_union(token_selection: torch.Tensor, tile: int, front: int) -> torch.Tensor:
    """The documented aggregation rule: a tile keeps a partition iff one of its queries does."""
    num = token_selection.shape[2]
    tile_of = [(front + p) // tile for p in range(num)]
    out = torch.zeros(*token_selection.shape[:2], tile_of[-1] + 1, token_selection.shape[3], dtype=torch.bool)
    for p, t in enumerate(tile_of):
        out[:, :, t] |= token_selection[:, :, p]
    return out


def structured_qk(rng, grid, box, batch=1, heads=2, dim=32, text=0, text_before=False):
    """Q/K ``[B, S, H, D]`` (frame-major video, plus text) whose keys cluster per partition and whose
    queries lean towards their own partition: a selection with structure, as in real models."""
    ids = torch.tensor(brute_partition_ids(grid, box))
    centres = torch.randn(batch, int(ids.max()) + 1, heads, dim, generator=rng)
    key = centres[:, ids] + 0.5 * torch.randn(batch, len(ids), heads, dim, generator=rng)
    query = 0.8 * centres[:, ids] + torch.randn(batch, len(ids), heads, dim, generator=rng)
    if text:
        key_t, query_t = (torch.randn(batch, text, heads, dim, generator=rng) for _ in range(2))
        parts = ((key_t, key), (query_t, query)) if text_before else ((key, key_t), (query, query_t))
        key, query = (torch.cat(p, dim=1) for p in parts)
    return query, key


# --------------------------------------------------------------------------- partitions


def test_default_partition_sizes_published_and_rule():
    for shape, sizes in PUBLISHED_PARTITION_SIZES.items():
        assert default_partition_sizes(LatentGrid(*shape)) == sizes
    # HunyuanVideo 720p: nearest setting in tokens per frame is Wan 720p (counts 7, 5x8, 3x3x4).
    assert default_partition_sizes(LatentGrid(33, 45, 80)) == ((5,), (9, 10), (11, 15, 20))
    # A small grid takes the 480p counts (7, 6x4, 3x6x4): sizes ceil(extent / count).
    assert default_partition_sizes(LatentGrid(5, 6, 10)) == ((1,), (1, 3), (2, 1, 3))
    method = VMoBA()
    grid = LatentGrid(21, 30, 52)
    boxes = [method.partition(grid, layer).box for layer in range(6)]
    assert boxes == [(3, 30, 52), (21, 5, 13), (7, 5, 13)] * 2
    assert [method.partition(grid, layer).num_partitions for layer in range(3)] == [7, 24, 72]
    clamped = VMoBA(partition_sizes=(50, (100, 3), (2, 100, 100)))
    assert clamped.resolve_partition_sizes(grid) == ((21,), (30, 3), (2, 30, 52))


@pytest.mark.parametrize("grid, sizes", [RAGGED, DIVISIBLE])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_partition_equals_brute_force(grid, sizes, layer):
    partition = VMoBA(partition_sizes=sizes).partition(grid, layer)
    box = list(grid.shape)
    dims = {0: (0,), 1: (1, 2), 2: (0, 1, 2)}[layer]
    for d, s in zip(dims, sizes[layer]):
        box[d] = s
    assert partition.box == tuple(box)
    ids = brute_partition_ids(grid, box)
    assert partition.token_partition().tolist() == ids
    # Partition-major: partitions one after another, frame-major (ascending index) inside each.
    order = partition.order().tolist()
    expected = [i for c in range(max(ids) + 1) for i in range(len(ids)) if ids[i] == c]
    assert order == expected
    assert partition.partition_of_position().tolist() == sorted(ids)
    offsets = partition.offsets().tolist()
    assert offsets == [sum(1 for i in ids if i < c) for c in range(max(ids) + 2)]
    assert torch.equal(partition.order()[partition.inverse()], torch.arange(len(ids)))
    assert partition.is_identity == (order == list(range(len(ids))))


def test_partition_major_order_is_the_reference_rearrange():
    # The reference code's "(nct ct nch ch ncw cw) -> (nct nch ncw ct ch cw)" on a divisible grid.
    grid = LatentGrid(4, 8, 16)
    partition = VideoPartition(grid, (2, 4, 8))
    index = torch.arange(grid.num_tokens).reshape(2, 2, 2, 4, 2, 8)  # (nct, ct, nch, ch, ncw, cw)
    assert torch.equal(partition.order(), index.permute(0, 2, 4, 1, 3, 5).flatten())


# --------------------------------------------------------------------------- kernels it uses


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_segment_mean_pool_matches_loops(rng, layout):
    offsets = torch.tensor([0, 5, 6, 70, 130, 197])
    x = torch.randn(2, 197, 3, 40, generator=rng).to(torch.bfloat16)
    x = x if layout == "bshd" else x.transpose(1, 2).contiguous()
    pooled = segment_mean_pool(x, offsets, layout=layout, backend="triton")
    xs = x.float() if layout == "bhsd" else x.float().transpose(1, 2)
    expected = torch.stack([xs[:, :, a:b].mean(2) for a, b in zip(offsets[:-1], offsets[1:])], dim=2)
    assert pooled.dtype == torch.float32 and pooled.shape == (2, 3, 5, 40)
    assert (pooled - expected).abs().max() <= 1e-5
    assert (segment_mean_pool_reference(x, offsets, layout=layout) - expected).abs().max() <= 1e-5


def test_segment_mean_pool_validates_offsets(rng):
    x = torch.randn(1, 10, 2, 16, generator=rng)
    for bad in ([0, 4, 4, 10], [1, 10], [0, 9]):
        with pytest.raises(ValueError, match="increase strictly from 0 to the sequence length 10"):
            segment_mean_pool(x, torch.tensor(bad))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        segment_mean_pool(x, torch.tensor([0.0, 10.0]))


def test_from_block_map_with_row_width_is_the_same_plan(rng):
    block_map = torch.rand(2, 3, 5, 7, generator=rng) < 0.4
    block_map[0, 0, 0] = False  # an empty row
    narrow = BlockSparsity.from_block_map(block_map, 64)
    wide = BlockSparsity.from_block_map(block_map, 64, max_kv=7)
    assert wide.kv_indices.shape[-1] == 7
    assert torch.equal(wide.to_block_map(), block_map) and torch.equal(narrow.kv_counts, wide.kv_counts)
    with pytest.raises(ValueError, match="max_kv must be in"):
        BlockSparsity.from_block_map(block_map, 64, max_kv=8)


# --------------------------------------------------------------------------- scores and selection


@pytest.mark.parametrize("grid, sizes", [RAGGED, DIVISIBLE])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_scores_are_raw_dot_products_with_mean_keys(rng, grid, sizes, layer):
    method = VMoBA(partition_sizes=sizes, block_size=64)
    layout = SequenceLayout(grid)
    query, key = (torch.randn(2, grid.num_tokens, 2, 16, generator=rng) for _ in range(2))
    structure = method._structure(layout, layer, "cpu")
    order = structure.sequence_order
    permuted = [x if order is None else x[:, order] for x in (query, key)]
    scores = method._scores(*permuted, structure)  # [B, H, N, P], queries partition-major
    ids = torch.tensor(brute_partition_ids(grid, method.partition(grid, layer).box))
    means = torch.stack([key[:, ids == c].double().mean(1) for c in range(int(ids.max()) + 1)], 1)
    expected = torch.einsum("bnhd,bphd->bhnp", query.double(), means)  # frame-major queries
    position_of = method.partition(grid, layer).inverse()
    assert torch.allclose(scores[:, :, position_of].double(), expected, atol=1e-4)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tau", [0.25, 0.6])
def test_global_threshold_equals_brute_force_at_token_and_tile_level(rng, ties, tau):
    scores = torch.randn(2, 3, 53, 7, generator=rng)
    if ties:  # few distinct values: the threshold lands inside a run of equal scores
        scores = scores.mul(2).round()
    values = normalise_scores_(scores.clone())
    expected = brute_global_threshold(values, tau)
    assert 0 < expected.float().mean() < 1
    assert torch.equal(global_threshold_tiles(values, tau), expected)
    for tile, front in ((64, 0), (8, 0), (8, 5), (5, 3)):
        assert torch.equal(
            global_threshold_tiles(values, tau, tile, front), brute_tile_union(expected, tile, front)
        ), (tile, front)


def test_global_threshold_degenerate_head_selects_nothing():
    values = normalise_scores_(torch.full((1, 2, 10, 3), 1.5))
    assert (values == 0).all()
    assert not global_threshold_tiles(values, 0.25).any()


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_topk_equals_brute_force_at_token_and_tile_level(rng, k):
    scores = torch.randn(2, 2, 37, 6, generator=rng)
    own = torch.randint(0, 6, (37,), generator=rng).sort().values
    expected = brute_topk(scores, min(k, 6), own)
    assert torch.equal(topk_tiles(scores, k, own), expected)
    for tile, front in ((64, 0), (8, 3), (5, 0)):
        assert torch.equal(topk_tiles(scores, k, own, tile, front), brute_tile_union(expected, tile, front))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_tile_means_equals_brute_force(rng, k):
    tile_scores = torch.randn(2, 2, 9, 6, generator=rng)
    own_tiles = torch.rand(9, 6, generator=rng) < 0.25
    own_tiles[torch.arange(9), torch.randint(0, 6, (9,), generator=rng)] = True  # >= 1 own per tile
    expected = torch.zeros(2, 2, 9, 6, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            for t in range(9):
                others = [c for c in range(6) if not own_tiles[t, c]]
                others.sort(key=lambda c: -float(tile_scores[b, h, t, c]))
                for c in [c for c in range(6) if own_tiles[t, c]] + others[: k - 1]:
                    expected[b, h, t, c] = True
    assert torch.equal(topk_tile_means(tile_scores, k, own_tiles), expected)


@pytest.mark.parametrize("selection", ["global_threshold", "topk"])
@pytest.mark.parametrize("grid, sizes", [RAGGED, DIVISIBLE])
@pytest.mark.parametrize("layer", [0, 2])
def test_mean_aggregation_selects_with_tile_mean_queries(rng, selection, grid, sizes, layer):
    method = VMoBA(partition_sizes=sizes, selection=selection, topk=(2, 3, 4), block_size=64,
                   query_aggregation="mean")
    layout = SequenceLayout(grid, TextSegment(5, "before"))  # the first tile holds 59 video queries
    box = method.partition(grid, layer).box
    query, key = structured_qk(rng, grid, box, batch=2, text=5, text_before=True)
    chosen = method.select(query, key, layout, layer)
    ids = torch.tensor(brute_partition_ids(grid, box))
    parts = int(ids.max()) + 1
    order = method.partition(grid, layer).order()
    video_q, video_k = query[:, 5:], key[:, 5:]
    means = torch.stack([video_k[:, ids == c].mean(1) for c in range(parts)], 1)  # [B, P, H, D]
    tile_of = [(5 + p) // 64 for p in range(grid.num_tokens)]  # partition-major positions
    tiles = tile_of[-1] + 1
    tile_queries = torch.stack(
        [video_q[:, order[[p for p in range(len(order)) if tile_of[p] == t]]].mean(1) for t in range(tiles)], 1
    )
    tile_scores = torch.einsum("bthd,bphd->bhtp", tile_queries, means)
    own = brute_tile_union(F.one_hot(ids[order], parts).bool()[None, None], 64, 5)[0, 0]
    if selection == "topk":
        expected = torch.zeros(2, 2, tiles, parts, dtype=torch.bool)
        for b in range(2):
            for h in range(2):
                for t in range(tiles):
                    others = [c for c in range(parts) if not own[t, c]]
                    others.sort(key=lambda c: -float(tile_scores[b, h, t, c]))
                    expected[b, h, t] = own[t]
                    expected[b, h, t, others[: (2, 3, 4)[layer] - 1]] = True
    else:
        expected = brute_global_threshold(normalise_scores_(tile_scores.clone()), method.tau) | own
    mismatches = int((chosen.tile_partitions != expected).sum())  # fp32 rounding at the threshold
    assert mismatches <= 1, mismatches


@pytest.mark.parametrize("selection", ["global_threshold", "topk"])
@pytest.mark.parametrize("grid, sizes", [RAGGED, DIVISIBLE])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tile_selection_is_union_of_brute_force_token_selection(rng, selection, grid, sizes, layer):
    # End to end through VMoBA.select: partitions, pooled keys, scores, selection, own partitions.
    method = VMoBA(partition_sizes=sizes, selection=selection, topk=(2, 3, 4), block_size=64,
                   query_aggregation="union")
    layout = SequenceLayout(grid)
    box = method.partition(grid, layer).box
    query, key = structured_qk(rng, grid, box, batch=2)
    chosen = method.select(query, key, layout, layer)
    ids = torch.tensor(brute_partition_ids(grid, box))
    parts = int(ids.max()) + 1
    means = torch.stack([key[:, ids == c].mean(1) for c in range(parts)], 1)  # [B, P, H, D]
    scores = torch.einsum("bnhd,bphd->bhnp", query, means)  # frame-major queries
    if selection == "topk":
        tokens = brute_topk(scores, (2, 3, 4)[layer], ids)
    else:
        tokens = brute_global_threshold(normalise_scores_(scores.clone()), method.tau)
        tokens |= F.one_hot(ids, parts).bool()
    order = method.partition(grid, layer).order()
    expected = brute_tile_union(tokens[:, :, order], 64, 0)  # tiles cut the partition-major order
    # fp32 scores computed two ways may differ in the last bit: allow a pair right at the threshold.
    mismatches = int((chosen.tile_partitions != expected).sum())
    assert mismatches <= 1, mismatches
    assert chosen.tile_partitions.shape == expected.shape


# --------------------------------------------------------------------------- plan and attention


def token_mask_in_original_order(chosen, num_tokens: int, block: int) -> torch.Tensor:
    """``[B, H, S, S]`` token mask of the plan, rows and columns in the original token order."""
    block_map = chosen.sparsity.to_block_map()
    tokens = torch.arange(num_tokens) // block
    mask = block_map[:, :, tokens][..., tokens]  # kernel order
    if chosen.sequence_inverse is not None:
        inverse = chosen.sequence_inverse
        mask = mask[:, :, inverse][..., inverse]
    return mask


@pytest.mark.parametrize(
    "grid, sizes, text, aggregation",
    [(*RAGGED, None, "union"), (*DIVISIBLE, None, "union"), (*RAGGED, ("after", 9, 4), "union"),
     (*RAGGED, ("before", 11, 11), "union"), (*RAGGED, ("before", 11, 11), "mean")],
)
@pytest.mark.parametrize("layer", [1, 2])
def test_plan_and_attention_match_masked_sdpa(rng, grid, sizes, text, aggregation, layer):
    method = VMoBA(partition_sizes=sizes, tau=0.05, block_size=64, query_aggregation=aggregation)
    num_text = text[1] if text else 0
    layout = SequenceLayout(grid, TextSegment(num_text, text[0]) if text else None)
    box = method.partition(grid, layer).box
    query, key = structured_qk(rng, grid, box, batch=2, text=num_text, text_before=bool(text) and text[0] == "before")
    value = torch.randn(query.shape, generator=rng)
    chosen = method.select(query, key, layout, layer)
    block = 64
    nb = math.ceil(layout.num_tokens / block)
    block_map = chosen.sparsity.to_block_map()
    assert block_map.shape == (2, 2, nb, nb)
    # The plan from the tile selection: a key block is visited iff it overlaps a visited partition;
    # text rows and columns dense.
    offsets = method.partition(grid, layer).offsets() + layout.video_offset
    expected = torch.zeros(2, 2, nb, nb, dtype=torch.bool)
    first_tile = layout.video_offset // block
    for t in range(chosen.tile_partitions.shape[2]):
        for c in range(len(offsets) - 1):
            blocks = range(int(offsets[c]) // block, (int(offsets[c + 1]) - 1) // block + 1)
            for kb in blocks:
                expected[:, :, first_tile + t, kb] |= chosen.tile_partitions[:, :, t, c]
    if text:
        is_text = layout.is_text().tolist()
        text_blocks = [p // block for p in range(layout.num_tokens) if is_text[p]]
        expected[:, :, text_blocks] = True
        expected[:, :, :, text_blocks] = True
    assert torch.equal(block_map, expected)
    assert not block_map.all(), "the plan must be sparse for this test to mean anything"

    # The token-level selection is inside the plan (superset), in the original order.
    mask = token_mask_in_original_order(chosen, layout.num_tokens, block)
    ids = torch.tensor(brute_partition_ids(grid, box))
    video = layout.video_slice
    video_mask = mask[:, :, video, video]
    own = ids[:, None] == ids[None, :]
    assert (video_mask | ~own).all()
    if text:
        assert mask[:, :, layout.text_slice].all() and mask[:, :, :, layout.text_slice].all()

    # attend: the kernel on the plan equals SDPA with the plan's token mask (and the key padding).
    valid = torch.tensor([layout.num_tokens, layout.num_tokens - 3]) if text and text[0] == "after" else None
    call = AttentionCall(method.plan(layout), layer, 3, 0, 4, 10, "cond", 1, key_padding=valid)
    out, density = method.attend(query, key, value, call)
    assert float(density) == pytest.approx(chosen.sparsity.density)
    if valid is not None:
        mask = mask & (torch.arange(layout.num_tokens)[None, :] < valid[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(
        query.transpose(1, 2).double(), key.transpose(1, 2).double(), value.transpose(1, 2).double(),
        attn_mask=mask,
    ).transpose(1, 2)
    assert (out.double() - ref).abs().max() <= 1e-4


def test_analyze_reports_token_and_block_densities(rng):
    grid, sizes = DIVISIBLE
    method = VMoBA(partition_sizes=sizes, tau=0.05, block_size=64, query_aggregation="union")
    layout = SequenceLayout(grid)
    query, key = structured_qk(rng, grid, method.partition(grid, 2).box)
    stats = method.analyze(query, key, layout, 2)
    assert (stats.kind, stats.box, stats.num_partitions) == ("3d", (2, 4, 8), 8)
    # The union rule computes every pair a token selects, plus what the tile's other queries
    # select: token <= tile (equal only when a tile's queries agree, which random queries need not).
    # Tiles and key blocks are whole partitions here (64 tokens each): no rounding after that.
    assert 0 < stats.token_density <= stats.tile_density
    assert stats.tile_density == pytest.approx(stats.computed_density)
    assert stats.computed_density == pytest.approx(stats.block_density)
    ragged, ragged_sizes = RAGGED
    method = VMoBA(partition_sizes=ragged_sizes, tau=0.05, block_size=64, query_aggregation="union")
    query, key = structured_qk(rng, ragged, method.partition(ragged, 2).box)
    stats = method.analyze(query, key, SequenceLayout(ragged), 2)
    assert 0 < stats.token_density <= stats.tile_density <= stats.computed_density <= 1


def test_validation():
    with pytest.raises(ValueError, match=r"tau must be a number in \(0, 1\], got tau=0"):
        VMoBA(tau=0)
    with pytest.raises(ValueError, match="selection must be one of"):
        VMoBA(selection="local")
    with pytest.raises(ValueError, match=r"topk must be \(k_1D, k_2D, k_3D\)"):
        VMoBA(topk=(2, 6))
    with pytest.raises(ValueError, match="topk entries must be >= 1"):
        VMoBA(topk=(0, 6, 18))
    with pytest.raises(ValueError, match=r"partition_sizes\[1\] \(2d\) must have 2 entries"):
        VMoBA(partition_sizes=((3,), (5,), (7, 5, 13)))
    with pytest.raises(ValueError, match="partition sizes must be >= 1"):
        VMoBA(partition_sizes=((0,), (5, 13), (7, 5, 13)))
    with pytest.raises(ValueError, match="block_size must be one of"):
        VMoBA(block_size=96)
    with pytest.raises(ValueError, match="query_aggregation must be one of"):
        VMoBA(query_aggregation="max")
    with pytest.raises(ValueError, match="dense_steps"):
        VMoBA(dense_steps=1.5)
    assert fastdit.Schedule.from_method(VMoBA()) == fastdit.Schedule(dense_steps=0.25)
    method = VMoBA()
    layout = SequenceLayout(LatentGrid(2, 4, 4))
    with pytest.raises(ValueError, match=r"query and key must be \[B, S=32, H, D\]"):
        method.select(torch.zeros(1, 31, 2, 16), torch.zeros(1, 31, 2, 16), layout, 0)


# --------------------------------------------------------------------------- diffusers integration


class MaskedVMoBA(fastdit.methods.Method):
    """Test-only per-call method: VMoBA's selection, attention by float64 SDPA with the token mask
    the plan implies (original token order, key padding applied)."""

    def __init__(self, method: VMoBA) -> None:
        self.method = method
        self.kinds: dict[int, str] = {}

    def plan(self, layout, device=None):
        return self.method.plan(layout, device)

    def attend(self, query, key, value, call):
        chosen = self.method.select(query, key, call.layout, call.layer)
        self.kinds[call.layer] = chosen.partition.box
        mask = token_mask_in_original_order(chosen, call.layout.num_tokens, self.method.block_size)
        if call.key_padding is not None:
            cols = torch.arange(call.layout.num_tokens)
            mask = mask & (cols[None, :] < call.key_padding[:, None])[:, None, None]
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2).double(), key.transpose(1, 2).double(),
            value.transpose(1, 2).double(), attn_mask=mask,
        ).transpose(1, 2)
        return out.to(query.dtype), chosen.sparsity.density


def wan_transformer(num_layers=3):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    ).eval()


def test_wan_transformer_equals_masked_reference_per_layer(rng):
    pytest.importorskip("diffusers")
    model = wan_transformer(num_layers=3)
    grid, sizes = RAGGED
    kwargs = dict(
        hidden_states=torch.randn(1, 4, 5, 12, 20, generator=rng), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 7, 16, generator=rng), return_dict=False,
    )
    method = VMoBA(partition_sizes=sizes, selection="topk", topk=(1, 2, 2), block_size=64, dense_steps=0)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    densities = dict(handle.state.densities)
    handle.remove()
    assert sorted(densities) == [(0, 0), (1, 0), (2, 0)] and min(densities.values()) < 1.0
    reference = MaskedVMoBA(method)
    handle = fastdit.apply(model, reference)
    ref = run(model, kwargs)
    handle.remove()
    assert reference.kinds == {layer: method.partition(grid, layer).box for layer in range(3)}
    assert handle.state.densities == pytest.approx(densities)
    assert (out - ref).abs().max() <= 1e-4


def test_hunyuan_transformer_equals_masked_reference(rng):
    pytest.importorskip("diffusers")
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=1, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
        guidance_embeds=True,
    ).eval()
    text, valid = 9, (9, 4)
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 6, 12, 16, generator=rng),  # token grid 6 x 6 x 8
        timestep=torch.tensor([500.0] * 2),
        encoder_hidden_states=torch.randn(2, text, 12, generator=rng),
        encoder_attention_mask=(torch.arange(text)[None] < torch.tensor(valid)[:, None]).long(),
        pooled_projections=torch.randn(2, 8, generator=rng),
        guidance=torch.tensor([6000.0] * 2),
        return_dict=False,
    )
    method = VMoBA(partition_sizes=((2,), (3, 4), (3, 3, 4)), tau=0.05, block_size=64, dense_steps=0)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    densities = dict(handle.state.densities)
    handle.remove()
    assert sorted(densities) == [(0, 0), (1, 0), (2, 0)] and min(densities.values()) < 1.0
    handle = fastdit.apply(model, MaskedVMoBA(method))
    ref = run(model, kwargs)
    handle.remove()
    assert (out - ref).abs().max() <= 1e-4
    assert torch.isfinite(out).all()


def test_tiny_wan_pipeline_honours_the_dense_quarter():
    tiny = pytest.importorskip("fastdit.testing.tiny")
    pipe = tiny.build_tiny_wan_pipeline(seed=0)
    settings = dict(prompt="a cat", height=64, width=64, num_frames=5, num_inference_steps=4,
                    guidance_scale=5.0, output_type="np")
    handle = fastdit.apply(pipe, VMoBA(block_size=64))  # paper schedule: first 25% of steps dense
    seen = []
    original = VMoBA.attend

    def spy(self, query, key, value, call):
        seen.append((call.step, call.context, call.layer))
        return original(self, query, key, value, call)

    with mock.patch.object(VMoBA, "attend", spy):
        frames = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    handle.remove()
    layers = len(pipe.transformer.blocks)
    assert seen == [(s, c, l) for s in (1, 2, 3) for c in ("cond", "uncond") for l in range(layers)]
    assert all(handle.state.densities[(l, 0)] == 1.0 for l in range(layers))
    assert torch.isfinite(torch.as_tensor(frames)).all()


def test_cli_knows_vmoba():
    from fastdit.cli import common as clicommon

    method = clicommon.build_method("vmoba", {"tau": 0.3, "topk": (1, 2, 3), "selection": "topk"})
    assert (method.tau, method.topk, method.selection) == (0.3, (1, 2, 3), "topk")
    assert clicommon.build_schedule(method) == fastdit.Schedule(dense_steps=0.25)


@pytest.mark.parametrize("aggregation", ["union", "mean"])
def test_grid_within_one_tile(rng, aggregation):
    # 32 video tokens + 9 text tokens: one query tile, one key block, so the plan is dense.
    grid = LatentGrid(2, 4, 4)
    layout = SequenceLayout(grid, TextSegment(9, "after"))
    method = VMoBA(block_size=64, query_aggregation=aggregation)
    query, key = (torch.randn(1, 41, 2, 16, generator=rng) for _ in range(2))
    for layer in range(3):
        chosen = method.select(query, key, layout, layer)
        assert chosen.tile_partitions.shape[2] == 1 and chosen.sparsity.density == 1.0
