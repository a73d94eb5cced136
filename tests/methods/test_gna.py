import math
import random

import pytest
import torch

from fastdit import natten
from fastdit.kernels import block_sparse_attention
from fastdit.layout import LatentGrid, SequenceLayout, TextSegment, TilePermutation
from fastdit.methods.gna import GNA, allowed_1d, choose_tile, neighborhood_1d


# --------------------------------------------------------------------------- scalar reference
def scalar_keys(extent, window, stride, dilation, q):
    """METHODS.md's rule for one query coordinate, written out literally."""
    g = q % dilation
    q_in = q // dilation
    group_length = math.ceil((extent - g) / dilation)
    left = window // 2
    right = window // 2 + (window % 2) - 1
    lead = min((q_in // stride) * stride + stride // 2, group_length - 1)
    centre = min(max(lead, left), group_length - 1 - right)
    return {k * dilation + g for k in range(centre - left, centre + right + 1)}


def scalar_mask(shape, window, stride, dilation):
    """Frame-major [N, N] float64 mask from the scalar rule, 3-D AND by brute force."""
    coords = [(t, h, w) for t in range(shape[0]) for h in range(shape[1]) for w in range(shape[2])]
    keys = [
        [scalar_keys(shape[d], window[d], stride[d], dilation[d], x) for x in range(shape[d])]
        for d in range(3)
    ]
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, q in enumerate(coords):
        for j, k in enumerate(coords):
            mask[i, j] = all(k[d] in keys[d][q[d]] for d in range(3))
    return mask


def random_config(gen):
    extent = gen.randint(1, 40)
    dilation = gen.randint(1, extent)
    window = gen.randint(1, extent // dilation)
    stride = gen.randint(1, window)
    return extent, window, stride, dilation


def masked_reference(q, k, v, mask, scale=None):
    """fp64 softmax attention on [B, N, H, D] under a [N, N] bool mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def permuted_block_reduction(mask, layout, tile, block_size):
    """Brute force: the [S, S] sequence mask (text dense) permuted tile-major, reduced to blocks."""
    perm = TilePermutation(layout.grid, tile)
    s = layout.num_tokens
    full = torch.ones(s, s, dtype=torch.bool)
    video = layout.video_slice
    full[video, video] = mask
    order = perm.permute_sequence(torch.arange(s)[None], layout, dim=1)[0]
    full = full[order][:, order]
    nb = math.ceil(s / block_size)
    padded = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
    padded[:s, :s] = full
    return padded.reshape(nb, block_size, nb, block_size).any(dim=3).any(dim=1)


# --------------------------------------------------------------------------- the rule
def test_1d_rule_matches_scalar_rule(rng):
    gen = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    for _ in range(400):
        extent, window, stride, dilation = random_config(gen)
        mask = allowed_1d(extent, window, stride, dilation)
        start = neighborhood_1d(extent, window, stride, dilation)
        for q in range(extent):
            keys = scalar_keys(extent, window, stride, dilation, q)
            assert len(keys) == window and all(0 <= k < extent for k in keys)
            assert set(torch.nonzero(mask[q]).flatten().tolist()) == keys, (extent, window, stride, dilation, q)
            assert int(start[q]) == min(keys)


def test_token_mask_matches_brute_force(rng):
    gen = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    for _ in range(6):
        shape = tuple(gen.randint(1, 5) for _ in range(3))
        configs = [random_config_for(gen, x) for x in shape]
        window, stride, dilation = zip(*configs)
        method = GNA(window, stride, dilation, tile=(1, 1, 1), block_size=64)
        expected = scalar_mask(shape, window, stride, dilation)
        assert torch.equal(method.token_mask(LatentGrid(*shape)), expected)


def random_config_for(gen, extent):
    dilation = gen.randint(1, extent)
    window = gen.randint(1, extent // dilation)
    return window, gen.randint(1, window), dilation


# --------------------------------------------------------------------------- block plans
@pytest.mark.parametrize(
    "shape, window, stride, dilation, tile, block_size, text",
    [
        ((2, 8, 12), (1, 3, 5), (1, 1, 2), (1, 2, 1), (1, 4, 4), 64, None),
        ((4, 8, 8), (3, 4, 3), (2, 2, 1), (1, 1, 2), (2, 4, 8), 64, None),
        ((3, 6, 10), (2, 3, 4), (1, 2, 2), (1, 2, 2), (1, 2, 2), 64, None),
        ((2, 8, 16), (2, 5, 6), (2, 3, 3), (1, 1, 1), (1, 8, 8), 64, TextSegment(40, "before")),
        ((2, 8, 16), (1, 4, 8), (1, 4, 8), (1, 2, 1), (1, 8, 16), 128, TextSegment(30, "after", 20)),
    ],
)
def test_block_map_matches_brute_force(shape, window, stride, dilation, tile, block_size, text):
    grid = LatentGrid(*shape)
    layout = SequenceLayout(grid, text)
    method = GNA(window, stride, dilation, tile=tile, block_size=block_size)
    expected = permuted_block_reduction(method.token_mask(grid), layout, tile, block_size)
    block_map = method.block_map(layout)
    assert block_map.shape == (1, 1, *expected.shape)
    assert torch.equal(block_map[0, 0], expected)

    # check(): counts against the brute-force token mask and block map (video only).
    report = method.check(grid)
    mask = method.token_mask(grid)
    video_blocks = permuted_block_reduction(mask, SequenceLayout(grid), tile, block_size)
    n, nb = grid.num_tokens, video_blocks.shape[0]
    token_blocks = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
    order = TilePermutation(grid, tile).gather_index()
    token_blocks[:n, :n] = mask[order][:, order]
    computed = video_blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    computed[n:] = False
    computed[:, n:] = False
    extra = int((computed & ~token_blocks).sum())
    assert report.token_density == pytest.approx(int(mask.sum()) / n**2)
    assert report.block_density == pytest.approx(float(video_blocks.float().mean()))
    assert report.extra_pairs_fraction == pytest.approx(extra / int(computed.sum()))
    assert report.perfectly_block_sparse == (extra == 0)
    assert (report.reason == "") == report.perfectly_block_sparse


def test_perfect_and_sliding_configs():
    grid = LatentGrid(2, 16, 16)
    swin = GNA((1, 8, 8), (1, 8, 8), tile=(1, 8, 8), block_size=64)
    report = swin.check(grid)
    assert report.perfectly_block_sparse and report.extra_pairs_fraction == 0.0
    assert report.block_density == pytest.approx(report.token_density)
    # Every kept block is fully allowed: block map expanded to tokens == permuted token mask.
    order = TilePermutation(grid, (1, 8, 8)).gather_index()
    tokens = swin.token_mask(grid)[order][:, order]
    expanded = swin.block_map(SequenceLayout(grid))[0, 0].repeat_interleave(64, 0).repeat_interleave(64, 1)
    assert torch.equal(expanded, tokens)

    sliding = GNA((1, 5, 5), (1, 1, 1), tile=(1, 8, 8), block_size=64)
    report = sliding.check(grid)
    assert not report.perfectly_block_sparse
    assert report.extra_pairs_fraction > 0 and "H: window=5, stride=1" in report.reason


def test_default_tile_and_plan_cache():
    grid = LatentGrid(30, 48, 80)  # HunyuanVideo's reference config is perfectly block-sparse
    method = GNA((18, 24, 24), (16, 8, 8))
    assert method.resolve_tile(grid) == (2, 8, 8)
    assert method.check(grid).perfectly_block_sparse
    small = LatentGrid(3, 6, 10)  # no tile of volume 64 divides: the largest dividing one is taken
    tile = choose_tile(small, (2, 3, 4), 1, 1, 64)
    assert all(x % t == 0 for x, t in zip(small.shape, tile)) and 64 % math.prod(tile) == 0
    layout = SequenceLayout(small, TextSegment(16, "after"))
    m = GNA((2, 3, 4), block_size=64)
    plan = m.plan(layout)
    assert plan is m.plan(layout)
    assert plan.permutation.num_padding == 0 and plan.sequence_length == layout.num_tokens
    assert plan.sparsity.num_q_blocks == math.ceil(layout.num_tokens / 64)


@pytest.mark.parametrize("position", ["before", "after"])
def test_perfect_plan_runs_exactly_without_element_masks(rng, position):
    # Perfect video config (frame-local 8x8 windows) with dense text, 64-aligned text segment.
    grid = LatentGrid(2, 8, 8)
    layout = SequenceLayout(grid, TextSegment(64, position))
    method = GNA((1, 8, 8), (1, 8, 8), tile=(1, 8, 8), block_size=64)
    plan = method.plan(layout)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 32, generator=rng) for _ in range(3))
    perm = plan.permutation
    assert plan.window_mask is None
    out = block_sparse_attention(
        *(perm.permute_sequence(x, layout) for x in (q, k, v)), plan.sparsity, layout="bshd"
    )
    out = perm.unpermute_sequence(out, layout)
    mask = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    mask[layout.video_slice, layout.video_slice] = method.token_mask(grid)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("position", [None, "before", "after"])
def test_sliding_plan_is_exact_with_window_mask(rng, position):
    # Sliding windows with dilation on a grid no tile of volume 64 divides: partial blocks.
    grid = LatentGrid(3, 6, 10)
    layout = SequenceLayout(grid, TextSegment(16, position) if position else None)
    method = GNA((2, 3, 4), stride=(1, 2, 1), dilation=(1, 2, 2), block_size=64)
    plan = method.plan(layout)
    assert plan.window_mask is not None and not method.check(grid).perfectly_block_sparse
    full = plan.sparsity.to_block_map().bool()
    assert not (full & plan.window_mask.partial.to_block_map().bool()).any()  # disjoint lists
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 32, generator=rng) for _ in range(3))
    perm = plan.permutation
    out = block_sparse_attention(
        *(perm.permute_sequence(x, layout) for x in (q, k, v)), plan.sparsity, layout="bshd",
        window_mask=plan.window_mask, backend="triton",
    )
    out = perm.unpermute_sequence(out, layout)
    mask = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    mask[layout.video_slice, layout.video_slice] = method.token_mask(grid)
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, mask), atol=1e-4, rtol=1e-4)
    # Full blocks are exactly the blocks whose every (video, video) pair is allowed.
    if position is None:
        permuted = mask[perm.gather_index()][:, perm.gather_index()]
        blocks = math.ceil(grid.num_tokens / 64)
        padded = torch.zeros(blocks * 64, blocks * 64, dtype=torch.bool)
        padded[: grid.num_tokens, : grid.num_tokens] = permuted
        exists = torch.ones_like(padded)
        exists[grid.num_tokens :] = False
        exists[:, grid.num_tokens :] = False
        all_allowed = (padded | ~exists).reshape(blocks, 64, blocks, 64).all(dim=3).all(dim=1)
        assert torch.equal(full[0, 0], all_allowed)


# --------------------------------------------------------------------------- NATTEN API
NA = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}


def natten_reference(q, k, v, kernel_size, stride, dilation):
    ndim = q.dim() - 3
    spatial = tuple(q.shape[1 : 1 + ndim])
    pad = (1,) * (3 - ndim)
    as_tuple = lambda p: (p,) * ndim if isinstance(p, int) else tuple(p)  # noqa: E731
    mask = scalar_mask(
        pad + spatial, pad + as_tuple(kernel_size), pad + as_tuple(stride), pad + as_tuple(dilation)
    )
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    flat = [x.reshape(b, -1, h, d) for x in (q, k, v)]
    return masked_reference(*flat, mask).reshape(q.shape)


@pytest.mark.parametrize(
    "spatial, kernel_size, stride, dilation, block_sparse",
    [
        ((3, 8, 8), (2, 8, 8), (2, 1, 1), 1, True),  # T=3 is no tile multiple; tile (1, 8, 8)
        ((5, 64), (3, 64), 1, 1, True),
        ((192,), 64, 64, 1, True),
        ((37,), 6, 3, 2, False),
        ((10, 12), (5, 4), (2, 2), (2, 1), False),
        ((3, 6, 10), (2, 3, 4), (1, 2, 2), (1, 2, 2), False),
    ],
)
def test_natten_matches_definition(rng, spatial, kernel_size, stride, dilation, block_sparse):
    ndim = len(spatial)
    q, k, v = (torch.randn(2, *spatial, 2, 16, generator=rng) for _ in range(3))
    out = NA[ndim](q, k, v, kernel_size, stride=stride, dilation=dilation)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(
        out.double(), natten_reference(q, k, v, kernel_size, stride, dilation), atol=1e-4, rtol=1e-4
    )
    pad = (1,) * (3 - ndim)
    grid = LatentGrid(*(pad + spatial))
    params = [pad + ((p,) * ndim if isinstance(p, int) else p) for p in (kernel_size, stride, dilation)]
    plan = natten._method_for(grid, *params).plan(SequenceLayout(grid))
    assert (plan.window_mask is None) == block_sparse


# --------------------------------------------------------------------------- validation
def test_validation_messages():
    grid = LatentGrid(2, 8, 8)
    with pytest.raises(ValueError, match=r"window \* dilation must be <= extent in dimension H.*window=9.*extent=8"):
        GNA((1, 9, 3)).check(grid)
    with pytest.raises(ValueError, match=r"dilation=2 for extent=8"):
        GNA((1, 5, 3), dilation=(1, 2, 1)).check(grid)
    with pytest.raises(ValueError, match=r"stride must be in \[1, window\].*stride=\(1, 4, 1\)"):
        GNA((1, 3, 3), stride=(1, 4, 1))
    with pytest.raises(ValueError, match=r"tile must divide the grid.*tile=\(1, 8, 8\).*grid=\(2, 8, 12\)"):
        GNA((1, 3, 3), tile=(1, 8, 8), block_size=64).plan(SequenceLayout(LatentGrid(2, 8, 12)))
    with pytest.raises(ValueError, match=r"tile volume must divide block_size.*volume 48"):
        GNA((1, 3, 3), tile=(1, 4, 12), block_size=64)
    with pytest.raises(ValueError, match=r"block_size must be one of"):
        GNA((1, 3, 3), block_size=32)
    q = torch.randn(1, 10, 12, 2, 16)
    with pytest.raises(ValueError, match=r"kernel_size \* dilation must be <= extent in dimension 0.*kernel_size=11.*extent=10"):
        natten.na2d(q, q, q, kernel_size=(11, 3))
    with pytest.raises(ValueError, match=r"stride must be in \[1, kernel_size\].*stride=5 for kernel_size=3"):
        natten.na2d(q, q, q, kernel_size=3, stride=(1, 5))
    with pytest.raises(ValueError, match=r"kernel_size must be an int or have 2 entries"):
        natten.na2d(q, q, q, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match=r"rank 5"):
        natten.na2d(q[0], q[0], q[0], kernel_size=3)
    with pytest.raises(TypeError, match=r"dtype"):
        natten.na2d(q.double(), q.double(), q.double(), kernel_size=3)
    with pytest.raises(ValueError, match=r"non-causal"):
        natten.na2d(q, q, q, kernel_size=3, is_causal=True)
