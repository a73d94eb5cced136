"""Radial attention: token rule against a scalar transcription, block map against brute force,
densities at Wan resolutions, and the plan through the Triton kernel (CPU interpreter)."""

import math

import pytest
import torch

from fastdit.kernels import block_sparse_attention
from fastdit.layout import LatentGrid, SequenceLayout, TextSegment
from fastdit.methods import MethodPlan
from fastdit.methods.radial import Radial

DECAYS = (0.2, 0.8, 0.95)


def scalar_rule(query, key, grid, decay, block, sink):
    """METHODS.md section 1 transcribed literally for one (query, key) video token pair."""
    n = grid.height * grid.width
    i, row = divmod(query, n)
    j, col = divmod(key, n)
    d = abs(i - j)
    if d <= 1:
        return True
    if sink and j == 0:
        return True
    g = d.bit_length()
    dl = 2 ** n.bit_length() / 2**g
    if dl < block and d % int(block / dl) != 0:
        return False
    w = max(block, decay * 2 ** n.bit_length() / 2**g)
    return abs(col - row) <= w


def full_token_mask(method, layout):
    """Token mask over the whole sequence: the video rule placed at the video offset, text dense."""
    mask = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    video = layout.video_slice
    mask[video, video] = method.token_mask(layout.grid)
    return mask


def brute_force_block_map(token_mask, block):
    """Block (p, c) kept iff any token pair inside it is kept."""
    seq = token_mask.shape[0]
    num_blocks = math.ceil(seq / block)
    padded = torch.zeros(num_blocks * block, num_blocks * block, dtype=torch.bool)
    padded[:seq, :seq] = token_mask
    return padded.view(num_blocks, block, num_blocks, block).any(dim=3).any(dim=1)


def token_pair_density(method, grid):
    """Fraction of (query, key) video pairs the token rule keeps, from per-tile band counts."""
    n = grid.tokens_per_frame
    half_widths = method._half_widths(grid)
    raster = torch.arange(n)
    kept = 0
    for w in half_widths.flatten().tolist():
        if w >= 0:
            kept += int(((raster + w).clamp(max=n - 1) - (raster - w).clamp(min=0) + 1).sum())
    return kept / grid.num_tokens**2


# --------------------------------------------------------------------------- token rule
@pytest.mark.parametrize("shape", [(5, 6, 10), (9, 4, 7), (40, 8, 8), (3, 11, 13)])
def test_token_mask_matches_scalar_rule(rng, shape):
    grid = LatentGrid(*shape)
    for decay, block, sink in ((0.2, 128, True), (0.95, 64, False), (0.8, 64, True)):
        method = Radial(decay=decay, block_size=block, sink=sink)
        mask = method.token_mask(grid)
        assert mask.shape == (grid.num_tokens, grid.num_tokens)
        pairs = torch.randint(0, grid.num_tokens, (300, 2), generator=rng).tolist()
        for query, key in pairs:
            expected = scalar_rule(query, key, grid, decay, block, sink)
            assert bool(mask[query, key]) == expected, (shape, decay, block, sink, query, key)


# --------------------------------------------------------------------------- block reduction
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("shape", [(5, 6, 10), (9, 4, 7), (3, 11, 13), (17, 3, 5)])
def test_block_map_equals_brute_force_reduction(shape, block):
    grid = LatentGrid(*shape)
    assert grid.tokens_per_frame % block and grid.num_tokens % block  # ragged on purpose
    for decay in DECAYS:
        for sink in (True, False):
            method = Radial(decay=decay, block_size=block, sink=sink)
            block_map = method.block_map(grid)
            num_blocks = math.ceil(grid.num_tokens / block)
            assert block_map.dtype == torch.bool
            assert block_map.shape == (1, 1, num_blocks, num_blocks)
            expected = brute_force_block_map(method.token_mask(grid), block)
            assert torch.equal(block_map[0, 0], expected), (shape, block, decay, sink)


@pytest.mark.parametrize("shape, block", [((40, 8, 8), 64), ((33, 5, 13), 64), ((24, 6, 20), 128)])
def test_far_diagonal_thinning_drops_tiles_and_blocks(shape, block):
    grid = LatentGrid(*shape)
    n = grid.tokens_per_frame
    method = Radial(decay=0.2, block_size=block, sink=False)
    mask = method.token_mask(grid)
    tiles = mask.view(grid.frames, n, grid.frames, n).any(dim=3).any(dim=1)  # [T, T] any pair kept
    # Thinning is the only way the rule empties a whole tile, so empty tiles prove it ran.
    dropped = [(i, j) for i in range(grid.frames) for j in range(grid.frames) if not tiles[i, j]]
    assert dropped, "thinning removed no tile: the test grid does not exercise it"
    for i, j in dropped:
        d = abs(i - j)
        dl = 2 ** n.bit_length() / 2 ** d.bit_length()
        assert d >= 2 and dl < block and d % int(block / dl) != 0
    block_map = method.block_map(grid)[0, 0]
    assert torch.equal(block_map, brute_force_block_map(mask, block))
    assert not bool(block_map.all())
    # The sink keeps column frame 0 whole even where thinning would drop it.
    with_sink = Radial(decay=0.2, block_size=block, sink=True).token_mask(grid)
    assert bool(with_sink[:, :n].all())


# --------------------------------------------------------------------------- text segments
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize(
    "text",
    [
        TextSegment(77, "before"),
        TextSegment(128, "before"),
        TextSegment(50, "after", valid_length=31),
        TextSegment(256, "after"),
    ],
)
def test_text_rows_and_columns_dense(text, block):
    grid = LatentGrid(9, 4, 7)
    layout = SequenceLayout(grid, text)
    method = Radial(decay=0.2, block_size=block)
    block_map = method.block_map(layout)[0, 0]
    assert torch.equal(block_map, brute_force_block_map(full_token_mask(method, layout), block))

    text_blocks = slice(layout.text_slice.start // block, (layout.text_slice.stop - 1) // block + 1)
    assert bool(block_map[text_blocks, :].all()) and bool(block_map[:, text_blocks].all())

    # Video blocks that hold no text are the text-free map, shifted by whole blocks.
    video_only = method.block_map(grid)[0, 0]
    if layout.video_offset % block == 0:
        shift = layout.video_offset // block
        video_blocks = slice(shift, shift + grid.num_tokens // block)  # complete, text-free blocks
        local = slice(0, grid.num_tokens // block)
        assert torch.equal(block_map[video_blocks, video_blocks], video_only[local, local])


# --------------------------------------------------------------------------- Wan resolutions
# Block densities measured with this rule (block 128, decay 0.2, sink on). The paper reports
# ~26.5% for 720x960x81 with its 60%/one-third reduction, which drops allowed pairs; that is
# about the token-level pair density (26.6% here), while the analytic superset keeps 34.6% of
# the blocks. Token-pair densities: 480p 30.7%, 720p 24.5%.
WAN_DENSITIES = {
    (21, 30, 52): 0.4412,  # 480x832x81
    (21, 45, 80): 0.3024,  # 720x1280x81
    (21, 45, 60): 0.3462,  # 720x960x81
}


@pytest.mark.parametrize("shape", list(WAN_DENSITIES))
def test_wan_plans_report_density(shape):
    # Speed is the benchmarks' business (plan build times are in fastdit bench): no timing here.
    grid = LatentGrid(*shape)
    method = Radial(decay=0.2, block_size=128, sink=True)
    block_map = method.block_map(grid)
    num_blocks = math.ceil(grid.num_tokens / 128)  # 720p: 75,600 tokens, 591 blocks
    assert block_map.shape == (1, 1, num_blocks, num_blocks)

    density = int(block_map.sum()) / block_map.numel()
    pair_density = token_pair_density(method, grid)
    print(f"{shape}: block density {density:.4f}, token-pair density {pair_density:.4f}")
    # Blocks cover every kept pair, so the block density cannot fall below the pair density.
    assert pair_density <= density <= 0.5
    assert density == pytest.approx(WAN_DENSITIES[shape], abs=1e-3)
    if shape == (21, 45, 60):
        assert 0.265 <= density <= 0.40

    plan = method.plan(SequenceLayout(grid))
    assert plan.density == pytest.approx(density, abs=1e-9)
    assert torch.equal(plan.sparsity.to_block_map(), block_map)


# --------------------------------------------------------------------------- method -> kernel
@pytest.mark.parametrize(
    "shape, sink, text",
    [
        ((6, 5, 9), True, None),
        ((8, 5, 9), False, None),
        ((6, 5, 9), True, TextSegment(40, "before")),
    ],
)
def test_plan_through_triton_kernel_matches_masked_attention(rng, shape, sink, text):
    layout = SequenceLayout(LatentGrid(*shape), text)
    method = Radial(decay=0.2, block_size=64, sink=sink)
    plan = method.plan(layout)
    assert isinstance(plan, MethodPlan) and plan.permutation is None and plan.layout == layout
    assert plan.density < 1.0  # the mask is actually sparse

    seq, heads, head_dim = layout.num_tokens, 2, 32
    q, k, v = (torch.randn(1, seq, heads, head_dim, generator=rng) for _ in range(3))
    out = block_sparse_attention(q, k, v, plan.sparsity, backend="triton")

    block_map = method.block_map(layout)[0, 0]
    token_mask = block_map.repeat_interleave(64, 0).repeat_interleave(64, 1)[:seq, :seq]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(head_dim)
    probs = torch.softmax(scores.masked_fill(~token_mask, float("-inf")), dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- caching, config
def test_plans_are_cached_per_shape_and_config():
    grid = LatentGrid(5, 6, 10)
    layout = SequenceLayout(grid)
    method = Radial(decay=0.2, block_size=64)
    plan = method.plan(layout)
    assert method.plan(layout) is plan
    assert Radial(decay=0.2, block_size=64, dense_steps=7).plan(layout) is plan  # schedule only
    assert method.plan(grid) is plan  # a bare grid is the text-free layout

    others = [
        method.plan(LatentGrid(5, 6, 11)),
        method.plan(SequenceLayout(grid, TextSegment(30, "after"))),
        Radial(decay=0.8, block_size=64).plan(layout),
        Radial(decay=0.2, block_size=128).plan(layout),
        Radial(decay=0.2, block_size=64, sink=False).plan(layout),
    ]
    assert all(other is not plan for other in others)
    assert others[0].layout.grid == LatentGrid(5, 6, 11)
    assert others[0].sparsity.num_kv_blocks == math.ceil(5 * 6 * 11 / 64)
    assert others[3].sparsity.q_block_size == 128


def test_presets():
    assert set(Radial.presets()) == {"wan2.1-14b", "hunyuanvideo", "wan2.2-a14b", "distilled-4step"}
    wan = Radial.preset("wan2.1-14b")
    assert (wan.decay, wan.dense_steps, wan.dense_layers, wan.sink) == (0.2, 12, 1, True)
    hunyuan = Radial.preset("hunyuanvideo")
    hunyuan_fields = (hunyuan.decay, hunyuan.dense_steps, hunyuan.dense_layers, hunyuan.sink)
    assert hunyuan_fields == (0.95, 12, 0, False)
    wan22 = Radial.preset("wan2.2-a14b")
    assert (wan22.decay, wan22.dense_steps, wan22.dense_layers, wan22.sink) == (0.8, 11, 1, True)
    distilled = Radial.preset("distilled-4step")
    assert (distilled.decay, distilled.dense_steps, distilled.dense_layers) == (0.2, 1, 1)
    assert Radial.preset("wan2.1-14b", block_size=64).block_size == 64

    with pytest.raises(ValueError, match="preset must be one of") as error:
        Radial.preset("wan3")
    assert "'wan3'" in str(error.value)
    assert all(name in str(error.value) for name in Radial.presets())


@pytest.mark.parametrize("decay", [0, -0.5, float("nan"), float("inf"), True, "0.2"])
def test_bad_decay_raises_with_value(decay):
    with pytest.raises(ValueError, match="decay must be a positive finite number") as error:
        Radial(decay=decay)
    assert repr(decay) in str(error.value)


@pytest.mark.parametrize(
    "field, value", [("block_size", 96), ("block_size", 32), ("dense_steps", -1), ("sink", 1)]
)
def test_bad_fields_raise_with_value(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        Radial(**{field: value})
