"""AdaSpa: selection against a brute-force implementation of the rule, LSE caching across steps,
sparse steps against a masked dense reference, the schedule in a tiny CFG pipeline run."""

import gc
import math
import weakref

import pytest
import torch

import fastdit
from fastdit.methods import adaspa as adaspa_module
from fastdit.methods.adaspa import AdaSpa, AdaSpaRuntime, select_blocks, text_blocks
from fastdit.methods.base import AttentionCall

BLOCK = 64


# ----------------------------------------------------------------------------- references
def budget(sparsity, free):
    """Blocks per row at ``sparsity`` (the rounding the module documents)."""
    if free == 0:
        return 0
    return min(free, max(1, math.ceil((1 - sparsity) * free - 1e-9)))


def exact_attention(q, k, v=None, *, lse=None, key_padding=None, token_mask=None):
    """fp64 materialised attention of [B, S, H, D] inputs: (probabilities, lse, output).

    ``lse`` given: probabilities ``exp(s - lse)`` with that LSE (unnormalised), as the cached path.
    """
    q, k = q.double().transpose(1, 2), k.double().transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    seq_kv = k.shape[2]
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if key_padding is not None:
        allowed &= (torch.arange(seq_kv)[None, :] < key_padding[:, None])[:, None, None, :]
    if token_mask is not None:
        allowed &= token_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    if lse is None:
        lse = scores.logsumexp(-1)
    probs = torch.exp(scores - lse.double()[..., None])
    out = None
    if v is not None:
        out = (probs @ v.double().transpose(1, 2)).transpose(1, 2)
    return probs, lse, out


def block_sum(probs, block=BLOCK):
    """[B, H, S, S] -> [B, H, nb, nb] block masses."""
    seq = probs.shape[-1]
    nb = math.ceil(seq / block)
    padded = torch.nn.functional.pad(probs, (0, nb * block - seq, 0, nb * block - seq))
    return padded.reshape(*probs.shape[:2], nb, block, nb, block).sum((3, 5))


def assert_mass_close(mass, W):
    """Kernel block mass (fp32, up to one unit per query row) against the fp64 brute force."""
    torch.testing.assert_close(mass.double(), W.double(), rtol=2e-5, atol=1e-5)


def brute_force_recall(W, b, h, rows):
    """Recall of ``rows[p]`` (kept key blocks per query block) for (b, h) of mass ``W``."""
    kept = sum(W[b, h, p, sorted(cols)].sum().item() for p, cols in enumerate(rows))
    return kept / W[b, h].sum().item()


def brute_force_rows(W, b, h, k, text):
    """The rule's mask for (b, h) with ``k`` video blocks per row: list of sets per query block."""
    nb = W.shape[-1]
    text_set = set(range(*text))
    free = [c for c in range(nb) if c not in text_set]
    rows = []
    for p in range(nb):
        if p in text_set:
            rows.append(set(range(nb)))
        else:
            heaviest = sorted(free, key=lambda c: -W[b, h, p, c].item())[:k]
            rows.append(set(heaviest) | text_set)
    return rows


def check_selection(selection, W, sparsity, *, head_adaptive=True, threshold=0.8, text=(0, 0),
                    mass_tol=0.0, recall_tol=1e-6):
    """Assert that ``selection`` is the AdaSpa rule applied to mass ``W`` (fp64 brute force).

    Ties within ``mass_tol`` (block masses) or ``recall_tol`` (head recalls) may go either way;
    everything else must match exactly.
    """
    W = W.double()
    batch, heads, nb, _ = W.shape
    text_set = set(range(*text))
    free = nb - len(text_set)
    k_uniform = budget(sparsity, free)
    k_tier = {1: budget((1 + sparsity) / 2, free), 0: k_uniform,
              -1: budget(max(0.0, (3 * sparsity - 1) / 2), free)}
    tiers = selection.tier.long()
    counts, indices = selection.kv_counts, selection.kv_indices
    for b in range(batch):
        recall_s = [brute_force_recall(W, b, h, brute_force_rows(W, b, h, k_uniform, text))
                    for h in range(heads)]
        assert selection.recall_at_sparsity[b].tolist() == pytest.approx(recall_s, abs=1e-5)
        n_low = sum(r > threshold + recall_tol for r in recall_s)
        n_high = sum(r > threshold - recall_tol for r in recall_s)
        assert n_low <= int(selection.num_high_recall_heads[b]) <= n_high
        per_tier = int((tiers[b] == 1).sum())
        assert int((tiers[b] == -1).sum()) == per_tier
        if head_adaptive and heads >= 2:
            assert min(n_low, heads // 2) <= per_tier <= min(n_high, heads // 2)
            for i in range(heads):
                for j in range(heads):
                    if tiers[b, i] > tiers[b, j]:  # i sparser than j: i's recall must rank higher
                        assert recall_s[i] >= recall_s[j] - recall_tol, (b, i, j, recall_s)
        else:
            assert per_tier == 0
        for h in range(heads):
            k = k_tier[int(tiers[b, h])]
            assert int(selection.blocks_per_row[b, h]) == k + len(text_set)
            assert (counts[b, h] == k + len(text_set)).all(), "rows must be uniform"
            rows = []
            for p in range(nb):
                chosen = indices[b, h, p, : counts[b, h, p]].tolist()
                assert chosen == sorted(set(chosen)), "indices ascending and unique"
                chosen = set(chosen)
                assert text_set <= chosen, "text blocks are always kept"
                video = chosen - text_set
                others = set(range(nb)) - text_set - video
                assert len(video) == k
                if video and others:
                    lightest_kept = min(W[b, h, p, c].item() for c in video)
                    heaviest_dropped = max(W[b, h, p, c].item() for c in others)
                    assert lightest_kept >= heaviest_dropped - mass_tol, (b, h, p)
                rows.append(set(range(nb)) if p in text_set else chosen)
            assert float(selection.recall[b, h]) == pytest.approx(
                brute_force_recall(W, b, h, rows), abs=1e-5)
    video_rows = nb - len(text_set)
    expected_density = ((selection.blocks_per_row.double() * video_rows + nb * len(text_set))
                        / nb**2).mean()
    assert float(selection.density) == pytest.approx(float(expected_density), abs=1e-6)


# ------------------------------------------------------------------------------- inputs
def structured_qk(rng, batch, seq, heads, dim, sharpness):
    """Q/K whose attention concentrates on a few key blocks per query block, more so for sharper
    heads, so head recalls spread across the 0.8 threshold."""
    nb = math.ceil(seq / BLOCK)
    centers = torch.randn(nb, dim, generator=rng)
    block_of = torch.arange(seq) // BLOCK
    noise = 0.5 * torch.randn(batch, seq, heads, dim, generator=rng)
    key = centers[block_of][None, :, None, :] + noise
    targets = torch.stack([torch.randperm(nb, generator=rng) for _ in range(heads)], -1)  # [nb, H]
    query = centers[targets[block_of]] * torch.tensor(sharpness)[None, :, None]  # [S, H, D]
    query = query[None] + 0.3 * torch.randn(batch, seq, heads, dim, generator=rng)
    return query, key


def make_call(method, layout, runtime, step, *, num_steps=None, layer=0, context="cond",
              key_padding=None, generation=1):
    return AttentionCall(
        plan=method.plan(layout), layer=layer, num_layers=2, transformer=0, step=step,
        num_steps=num_steps, context=context, generation=generation, runtime=runtime,
        key_padding=key_padding,
    )


def masked_reference(query, key, value, runtime_plan, layout, key_padding=None):
    """fp64 attention with the plan's per-(batch, head) block mask; text query rows dense."""
    seq = query.shape[1]
    block_map = runtime_plan.to_block_map()
    token_mask = block_map.repeat_interleave(BLOCK, -1).repeat_interleave(BLOCK, -2)
    token_mask = token_mask[..., :seq, :seq]
    if layout.text_slice is not None:
        token_mask = token_mask.clone()
        token_mask[..., layout.text_slice, :] = True
    return exact_attention(query, key, value, key_padding=key_padding, token_mask=token_mask)[2]


# ------------------------------------------------------------------------------- config
def test_config_defaults_schedule_and_validation():
    method = AdaSpa()
    assert (method.sparsity, method.block_size, method.search_steps, method.head_adaptive) == (
        0.8, 64, (10, 30), True)
    assert method.resolve_search_steps(50) == (10, 30)
    assert method.resolve_search_steps(30) == (6, 18)
    assert method.resolve_search_steps(4) == (1, 3)
    assert method.resolve_search_steps(3) == (1, 2)
    schedule = fastdit.Schedule.from_method(method)
    for num_steps in (50, 30, 4):
        first = method.resolve_search_steps(num_steps)[0]
        dense = [s for s in range(num_steps) if schedule.is_dense(s, num_steps, 5, 40)]
        assert dense == list(range(first)), "warm-up = the steps before the first search"
    assert AdaSpa(search_steps=(0.25, 0.5)).resolve_search_steps(8) == (2, 4)
    absolute = AdaSpa(search_steps=(2, 5), reference_steps=None)
    assert absolute.resolve_search_steps(None) == (2, 5) and absolute.dense_steps == 2
    assert AdaSpa(search_steps=(10, 11)).resolve_search_steps(3) == (1,)  # merged after scaling
    with pytest.raises(ValueError, match="fraction"):
        method.resolve_search_steps(None)
    bad = [
        (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
        (dict(block_size=32), "block_size"), (dict(search_steps=(30, 10)), "strictly increasing"),
        (dict(search_steps=()), "at least one"), (dict(search_steps=(10, 50)), "reference_steps"),
        (dict(search_steps=(0.5, 1.5)), r"\[0, 1\)"), (dict(head_adaptive=1), "head_adaptive"),
        (dict(reference_steps=0), "reference_steps"),
        (dict(recall_threshold=2), "recall_threshold"),
        (dict(search_steps=(2, 0.5), reference_steps=None), "all absolute"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            AdaSpa(**kwargs)


def test_cli_builds_adaspa():
    from fastdit.cli.common import build_method, build_schedule

    method = build_method("adaspa", {"sparsity": 0.7, "search_steps": (5, 15)})
    assert method == AdaSpa(sparsity=0.7, search_steps=(5, 15))
    assert build_schedule(method).dense_steps == pytest.approx(0.1)


# ---------------------------------------------------------------------------- selection rule
@pytest.mark.parametrize(
    "batch, heads, nb, sparsity, text, head_adaptive",
    [
        (2, 4, 9, 0.8, (0, 0), True),
        (1, 5, 8, 0.6, (0, 0), True),  # odd head count: the median head stays at s
        (1, 4, 10, 0.7, (8, 10), True),  # [video | text]
        (2, 3, 7, 0.5, (0, 1), True),  # [text | video]
        (1, 4, 9, 0.8, (0, 0), False),
        (1, 4, 6, 0.2, (0, 0), True),  # (3s - 1) / 2 < 0: the low tier is dense
    ],
)
def test_selection_equals_brute_force_rule(rng, batch, heads, nb, sparsity, text, head_adaptive):
    # Rows of softmax-like masses whose concentration differs per head: head recalls spread
    # across the 0.8 threshold.
    temperature = torch.linspace(0.3, 4.0, heads)[torch.randperm(heads, generator=rng)]
    logits = torch.randn(batch, heads, nb, nb, generator=rng) * temperature[None, :, None, None]
    W = torch.softmax(logits, -1) * torch.rand(batch, heads, nb, 1, generator=rng).add(0.5)
    selection = select_blocks(W, sparsity, head_adaptive=head_adaptive, text=text)
    check_selection(selection, W, sparsity, head_adaptive=head_adaptive, text=text)
    if head_adaptive and sparsity >= 0.5:
        assert (selection.tier != 0).any(), "inputs must exercise the tiers"


def test_tiers_when_more_than_half_the_heads_have_high_recall():
    # nb 4, s 0.5: k = 2 blocks per row; head h keeps a fraction 2 * a_h of every row with 2 blocks.
    recall = torch.tensor([0.95, 0.90, 0.85, 0.99, 0.81])
    a = recall / 2
    rows = torch.stack([a, a, (1 - 2 * a) / 2, (1 - 2 * a) / 2], -1)  # [H, 4]
    W = torch.stack([rows.roll(p, -1) for p in range(4)], 1)[None]  # [1, H, 4, 4]
    selection = select_blocks(W, 0.5)
    assert selection.num_high_recall_heads.tolist() == [5]  # 2n = 10 > 5 heads
    # m = min(5, 5 // 2) = 2 per tier: heads 3 and 0 sparser, 2 and 4 denser, head 1 unchanged.
    assert selection.tier.tolist() == [[1, 0, -1, 1, -1]]
    assert selection.blocks_per_row.tolist() == [[1, 2, 3, 1, 3]]
    assert selection.head_sparsity[0].tolist() == pytest.approx([0.75, 0.5, 0.25, 0.75, 0.25])
    assert selection.recall_at_sparsity[0].tolist() == pytest.approx(recall.tolist(), abs=1e-6)
    check_selection(selection, W, 0.5)


# ------------------------------------------------------------------- the method, step by step
class KernelCalls:
    """Counts AdaSpa's kernel calls (and keeps the masses it computed) by step."""

    def __init__(self, monkeypatch):
        self.masses, self.attention = [], []
        mass, attention = adaspa_module.block_mass, adaspa_module.block_sparse_attention

        def counted_mass(q, k, lse, plan, **kwargs):
            result = mass(q, k, lse, plan, **kwargs)
            self.masses.append((lse, result))
            return result

        def counted_attention(q, k, v, plan, **kwargs):
            self.attention.append(
                dict(return_lse=kwargs.get("return_lse", False), density=plan.density)
            )
            return attention(q, k, v, plan, **kwargs)

        monkeypatch.setattr(adaspa_module, "block_mass", counted_mass)
        monkeypatch.setattr(adaspa_module, "block_sparse_attention", counted_attention)

    def reset(self):
        self.masses.clear()
        self.attention.clear()


def test_search_sparse_and_cached_search_against_brute_force(rng, monkeypatch):
    batch, seq, heads, dim = 1, 5 * BLOCK + 17, 4, 32  # 6 blocks, the last one ragged
    sparsity = 0.6
    method = AdaSpa(sparsity=sparsity, search_steps=(1, 3), reference_steps=None)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(1, 1, seq))
    runtime = method.new_runtime()
    sharpness = [0.05, 0.15, 0.3, 1.0]
    q1, k1 = structured_qk(rng, batch, seq, heads, dim, sharpness)
    v1 = torch.randn(batch, seq, heads, dim, generator=rng)
    # A later step: the same structure, perturbed (the model's Q/K drift between steps).
    q3 = q1 + 0.2 * torch.randn(q1.shape, generator=rng)
    k3 = k1 + 0.2 * torch.randn(k1.shape, generator=rng)
    v3 = torch.randn(v1.shape, generator=rng)
    calls = KernelCalls(monkeypatch)

    # Step 1, the first search: dense attention with LSE, mass pass, selection.
    out1, density1 = method.attend(q1, k1, v1, make_call(method, layout, runtime, 1))
    probs1, lse1, dense1 = exact_attention(q1, k1, v1)
    assert density1 == 1.0
    assert (out1 - dense1).abs().max() <= 1e-4, "the first search step's output is dense attention"
    assert [c["return_lse"] for c in calls.attention] == [True] and len(calls.masses) == 1
    assert (runtime.lse(("cond", 0, 0)) - lse1).abs().max() <= 1e-4
    W1 = block_sum(probs1)
    assert_mass_close(calls.masses[0][1], W1)
    selection1 = select_blocks(calls.masses[0][1], sparsity)
    check_selection(selection1, W1, sparsity, mass_tol=1e-4, recall_tol=1e-5)
    assert (selection1.tier != 0).any(), "inputs must exercise the tiers"
    plan1 = runtime.plan(("cond", 0, 0))
    assert torch.equal(plan1.kv_indices, selection1.kv_indices)
    assert plan1.density < 1.0

    # Step 2: sparse with the step-1 mask, no search.
    calls.reset()
    out2, density2 = method.attend(q3, k3, v3, make_call(method, layout, runtime, 2))
    assert calls.masses == [] and [c["return_lse"] for c in calls.attention] == [False]
    assert density2 == pytest.approx(plan1.density)
    assert (out2 - masked_reference(q3, k3, v3, plan1, layout)).abs().max() <= 1e-4
    assert (out2 - exact_attention(q3, k3, v3)[2]).abs().max() > 1e-3, "the mask must matter"

    # Step 3: one mass pass with the LSE cached at step 1, no dense attention, then sparse.
    calls.reset()
    out3, density3 = method.attend(q3, k3, v3, make_call(method, layout, runtime, 3))
    assert len(calls.masses) == 1 and calls.masses[0][0] is runtime.lse(("cond", 0, 0))
    assert [c["return_lse"] for c in calls.attention] == [False]
    assert calls.attention[0]["density"] < 1.0
    W3 = block_sum(exact_attention(q3, k3, lse=lse1)[0])  # brute force with the cached LSE
    assert_mass_close(calls.masses[0][1], W3)
    row_sums = W3.sum(-1).div(BLOCK)[..., :-1]  # full blocks: one unit per row with a fresh LSE
    assert (row_sums - 1).abs().max() > 1e-3, "a stale LSE: rows are not normalised"
    check_selection(select_blocks(calls.masses[0][1], sparsity), W3, sparsity,
                    mass_tol=1e-4, recall_tol=1e-5)
    plan3 = runtime.plan(("cond", 0, 0))
    assert density3 == pytest.approx(plan3.density)
    assert (out3 - masked_reference(q3, k3, v3, plan3, layout)).abs().max() <= 1e-4

    records = runtime.records
    assert [(r["step"], r["kind"], r["scheduled"]) for r in records] == [
        (1, "dense-lse", True), (3, "cached-lse", True)]
    selection3 = select_blocks(calls.masses[0][1], sparsity)
    for record, selection in zip(records, (selection1, selection3)):
        assert record["recall"] == selection.recall.tolist()
        assert record["tier"] == selection.tier.tolist()
        assert len(record["recall"][0]) == heads
    import json

    json.dumps(records)  # JSON-serialisable as they are


def test_joint_text_blocks_kept_and_text_rows_dense(rng, monkeypatch):
    # [video | text] with padded text keys (HunyuanVideo's layout): 200 video + 40 text tokens.
    batch, heads, dim, video, text = 2, 2, 32, 200, 40
    layout = fastdit.SequenceLayout(
        fastdit.LatentGrid(1, 10, 20), fastdit.TextSegment(text, "after")
    )
    seq = layout.num_tokens
    key_padding = torch.tensor([seq, video + 7], dtype=torch.int32)
    method = AdaSpa(sparsity=0.75, search_steps=(0, 2), reference_steps=None)
    runtime = method.new_runtime()
    query, key = structured_qk(rng, batch, seq, heads, dim, [0.1, 0.5])
    value = torch.randn(batch, seq, heads, dim, generator=rng)
    calls = KernelCalls(monkeypatch)
    call0 = make_call(method, layout, runtime, 0, key_padding=key_padding)
    out0, _ = method.attend(query, key, value, call0)
    probs, lse, dense = exact_attention(query, key, value, key_padding=key_padding)
    assert (out0 - dense).abs().max() <= 1e-4
    text_range = text_blocks(layout, BLOCK)
    assert text_range == (3, 4)  # tokens 200..239: block 3 holds video and text
    plan = runtime.plan(("cond", 0, 0))
    W = block_sum(probs)  # padded text keys carry no mass
    (_, mass), = calls.masses
    assert_mass_close(mass, W)
    selection = select_blocks(mass, 0.75, text=text_range)
    assert torch.equal(plan.kv_indices, selection.kv_indices)
    check_selection(selection, W, 0.75, text=text_range, mass_tol=1e-4, recall_tol=1e-5)
    block_map = plan.to_block_map()
    assert block_map[..., 3].all(), "every row keeps the text block"
    assert not block_map.all()
    call1 = make_call(method, layout, runtime, 1, key_padding=key_padding)
    out1, density = method.attend(query, key, value, call1)
    assert density < 1.0
    text_rows = (out1[:, video:] - dense[:, video:]).abs().max()
    assert text_rows <= 1e-4, "text rows attend to everything"
    reference = masked_reference(query, key, value, plan, layout, key_padding=key_padding)
    assert (out1 - reference).abs().max() <= 1e-4
    assert (out1[:, :video] - dense[:, :video]).abs().max() > 1e-3


def test_on_demand_search_and_runtime_memory(rng):
    method = AdaSpa(sparsity=0.8, search_steps=(3, 6), reference_steps=None, head_adaptive=False)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(2, 4, 24))  # 192 tokens, 3 blocks
    runtime = method.new_runtime()
    qkv = [torch.randn(1, 192, 2, 32, generator=rng) for _ in range(3)]
    # Step 1 is no search step but the layer has no mask yet (a user schedule skipped the warm-up).
    _, density = method.attend(*qkv, make_call(method, layout, runtime, 1))
    _, density = method.attend(*qkv, make_call(method, layout, runtime, 2))
    method.attend(*qkv, make_call(method, layout, runtime, 2, layer=1, context="uncond"))
    assert density == pytest.approx(1 / 3)  # k = ceil(0.2 * 3) = 1 block of 3 per row
    assert [(r["step"], r["layer"], r["kind"], r["scheduled"]) for r in runtime.records] == [
        (1, 0, "dense-lse", False), (2, 1, "dense-lse", False)]
    memory = runtime.memory_bytes()
    assert memory["entries"] == 2
    assert memory["lse"] == 2 * 1 * 2 * 192 * 4  # two keys x [B, H, S] fp32
    assert memory["plans"] == 2 * (2 * 3 * 4 + 2 * 3 * 1 * 2)  # int32 counts + int16 indices
    estimate = AdaSpa.estimate_cache_bytes(192, 2, 1, sparsity=0.8, head_adaptive=False, contexts=2)
    assert estimate["lse"] == memory["lse"] and estimate["plans"] == memory["plans"]
    # The figure: Wan2.1-14B 720p, one CFG context.
    assert AdaSpa.estimate_cache_bytes(75_600, 40, 40)["lse"] == 75_600 * 40 * 40 * 4
    # A call from another generation never sees this state.
    method.attend(*qkv, make_call(method, layout, runtime, 2, generation=2))
    assert runtime.generation == 2 and [r["generation"] for r in runtime.records] == [2]
    with pytest.raises(RuntimeError, match="runtime"):
        method.attend(*qkv, make_call(method, layout, None, 2))


# ------------------------------------------------------------------------ in a pipeline
def test_tiny_pipeline_searches_at_scaled_steps_and_generations_do_not_leak(monkeypatch):
    tiny = pytest.importorskip("fastdit.testing.tiny")
    # The reference backend keeps the CPU run short; the kernels are tested above (interpreter).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pipe = tiny.build_tiny_wan_pipeline(seed=0)
    settings = dict(prompt="a cat", height=64, width=128, num_frames=9, num_inference_steps=5,
                    guidance_scale=5.0, output_type="np")  # 3 x 4 x 8 = 96 tokens, 2 blocks
    method = AdaSpa()  # (10, 30) of 50 -> (1, 3) of 5: step 0 dense, 1 search, 3 cached search
    handle = fastdit.apply(pipe, method)
    calls = KernelCalls(monkeypatch)
    steps_seen = []
    begin = handle.state.begin_forward

    def record_step(*args):
        begin(*args)
        steps_seen.append(handle.state.step)

    handle.state.begin_forward = record_step
    first = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    runtime = handle.state.runtime
    assert isinstance(runtime, AdaSpaRuntime)
    layers = range(len(pipe.transformer.blocks))
    expected = [(step, kind, context, layer) for step, kind in ((1, "dense-lse"), (3, "cached-lse"))
                for context in ("cond", "uncond") for layer in layers]
    assert [(r["step"], r["kind"], r["context"], r["layer"]) for r in runtime.records] == expected
    assert all(r["scheduled"] and r["num_steps"] == 5 for r in runtime.records)
    # Kernel calls: LSE-returning dense attention only at step 1, one mass pass per layer and
    # search, sparse attention at steps 2-4 (step 0 is stock).
    calls_per_step = len(layers) * 2
    assert len(calls.masses) == 2 * calls_per_step
    expected_lse = [True] * calls_per_step + [False] * 3 * calls_per_step
    assert [c["return_lse"] for c in calls.attention] == expected_lse
    assert all(c["density"] < 1.0 for c in calls.attention[calls_per_step:])
    assert steps_seen == [s for s in range(5) for _ in range(2)]
    densities = handle.state.densities
    assert [densities[(0, s)] for s in range(5)][:2] == [1.0, 1.0] and densities[(0, 2)] < 1.0
    assert runtime.memory_bytes()["entries"] == calls_per_step

    # A second generation: a new runtime searching from scratch, the first one freed.
    old = weakref.ref(runtime)
    del runtime
    calls.reset()
    second = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    gc.collect()
    assert old() is None, "the previous generation's LSE cache and plans must be released"
    assert [(r["step"], r["kind"]) for r in handle.state.runtime.records][:1] == [(1, "dense-lse")]
    assert len(calls.masses) == 2 * calls_per_step
    assert (first == second).all()
    handle.remove()


def test_hunyuan_video_joint_attention_keeps_text(rng, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference backend: plumbing, not kernels
    from tests.pipelines.test_hunyuan_integration import GRID, TEXT, inputs, tiny_transformer

    from tests.integration_helpers import run

    model = tiny_transformer()
    kwargs = inputs(rng)
    stock = run(model, kwargs)
    method = AdaSpa(sparsity=0.5, search_steps=(1, 2), reference_steps=None)
    handle = fastdit.apply(model, method)
    outputs = []
    for timestep in (900.0, 800.0, 700.0):  # steps 0 (dense), 1 (search), 2 (cached search)
        kwargs["timestep"] = torch.tensor([timestep] * 2)
        outputs.append(run(model, kwargs))
    kwargs["timestep"] = torch.tensor([800.0] * 2)
    handle.remove()
    assert (outputs[1] - run(model, kwargs)).abs().max() <= 1e-4, "a dense+LSE search step is dense"
    records = handle.state.runtime.records
    video = GRID[0] * GRID[1] * GRID[2]
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(TEXT, "after"))
    text = text_blocks(layout, BLOCK)
    assert [(r["step"], r["kind"], r["layer"]) for r in records] == [
        (1, "dense-lse", 0), (1, "dense-lse", 1), (2, "cached-lse", 0), (2, "cached-lse", 1)]
    assert text == (video // BLOCK, video // BLOCK + 1)
    assert all(r["text_blocks"] == list(text) for r in records)
    for layer in (0, 1):
        block_map = handle.state.runtime.plan((None, 0, layer)).to_block_map()
        assert block_map[..., text[0]:text[1]].all() and not block_map.all()
    assert torch.isfinite(outputs[2]).all() and (outputs[2] - stock).abs().max() > 1e-3
