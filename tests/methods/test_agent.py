"""Agent attention: the method against a brute-force implementation of the formula, installed on
diffusers' UNet (SD 1.5- and SDXL-style), Wan and HunyuanVideo, the guard, and a tiny offline
Stable Diffusion pipeline end to end.

The brute force is plain torch in float64 with its own cell assignment (``index_add`` of each
token into its cell), so it shares no code with fastdit's pooling or kernels.
"""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastdit
from fastdit import cli
from fastdit.cli import common as clicommon
from fastdit.methods import agent as agent_module
from fastdit.methods.base import AttentionCall
from fastdit.pipelines.unet import UNetSparseAttnProcessor
from fastdit.pipelines.wan import apply_wan_rotary_emb
from tests.integration_helpers import run

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel, UNet2DConditionModel, WanTransformer3DModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

ALL_STEPS = fastdit.Schedule()  # agents on every step (direct model calls know no step count)


# --------------------------------------------------------------------------- the formula
def brute_force_agent(q, k, v, grid, cell, exponent=0.15, shortcut=0.075, text=0, key_valid=None):
    """``softmax(Q A^T d**-exponent) softmax(A K^T / sqrt(d)) V + shortcut V`` in float64.

    ``q, k, v``: ``[B, S, H, D]`` over ``[video (frame-major) | text]`` (``text`` tokens last).
    Agents: means of the video queries over ``cell`` (clamped to the grid). With text, video rows
    take one softmax over [agents (scale d**-exponent) | valid text keys (d**-0.5)] with values
    [agent values | text values]; text rows are exact over the valid keys ``key_valid`` ``[B, S]``.
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, seq, heads, dim = q.shape
    frames, height, width = grid
    n_video = frames * height * width
    ct, ch, cw = (min(c, e) for c, e in zip(cell, grid))
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    cells_h, cells_w = math.ceil(height / ch), math.ceil(width / cw)
    cell_id = (((t // ct) * cells_h + h // ch) * cells_w + w // cw).flatten()
    num_agents = int(cell_id.max()) + 1
    qv, kv, vv = q[:, :n_video], k[:, :n_video], v[:, :n_video]
    sums = torch.zeros(batch, num_agents, heads, dim, dtype=torch.float64).index_add_(1, cell_id, qv)
    counts = torch.zeros(num_agents, dtype=torch.float64).index_add_(0, cell_id, torch.ones(n_video, dtype=torch.float64))
    agents = sums / counts[None, :, None, None]
    stage1 = torch.einsum("bnhd,bshd->bhns", agents, kv) / math.sqrt(dim)
    agent_values = torch.einsum("bhns,bshd->bnhd", stage1.softmax(-1), vv)
    logits = torch.einsum("bshd,bnhd->bhsn", qv, agents) * dim**-exponent
    values = agent_values
    if text:
        text_logits = torch.einsum("bshd,bthd->bhst", qv, k[:, n_video:]) / math.sqrt(dim)
        valid_text = key_valid[:, n_video:]
        text_logits = text_logits.masked_fill(~valid_text[:, None, None, :], float("-inf"))
        logits = torch.cat([logits, text_logits], dim=-1)
        values = torch.cat([agent_values, v[:, n_video:]], dim=1)
    video_out = torch.einsum("bhsn,bnhd->bshd", logits.softmax(-1), values) + shortcut * vv
    if not text:
        return video_out
    exact = torch.einsum("bshd,bthd->bhst", q[:, n_video:], k) / math.sqrt(dim)
    exact = exact.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    text_out = torch.einsum("bhst,bthd->bshd", exact.softmax(-1), v)
    return torch.cat([video_out, text_out], dim=1)


def call_for(layout, key_padding=None):
    method = fastdit.Agent()
    return AttentionCall(plan=method.plan(layout), layer=0, num_layers=1, transformer=0, step=0,
                         num_steps=None, context=None, generation=1, key_padding=key_padding)


@pytest.mark.parametrize("grid, cell", [((3, 5, 7), (2, 2, 4)), ((1, 9, 6), (1, 4, 4))])
def test_attend_equals_formula(rng, grid, cell):
    # Edge cells hold fewer tokens than the cell volume (5 % 2, 7 % 4, 9 % 4): the means must
    # count only real tokens.
    method = fastdit.Agent(cell=cell[1:], video_cell=cell, block_size=64)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*grid))
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 16, generator=rng) for _ in range(3))
    out, density = method.attend(q, k, v, call_for(layout))
    ref = brute_force_agent(q, k, v, grid, cell)
    assert (out - ref).abs().max() <= 1e-4
    n = method.num_agents(layout.grid)
    assert n == math.prod(math.ceil(e / c) for e, c in zip(grid, cell))
    assert density == pytest.approx(2 * n / layout.num_tokens)


def test_attend_keeps_text_exact(rng):
    grid, text = (2, 4, 6), 5
    method = fastdit.Agent(video_cell=(1, 2, 3), block_size=64)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*grid), fastdit.TextSegment(text, "after"))
    seq = layout.num_tokens
    q, k, v = (torch.randn(2, seq, 2, 16, generator=rng) for _ in range(3))
    lengths = torch.tensor([seq, seq - 3], dtype=torch.int32)  # the second prompt is padded
    out, _ = method.attend(q, k, v, call_for(layout, key_padding=lengths))
    key_valid = torch.arange(seq)[None] < lengths[:, None]
    ref = brute_force_agent(q, k, v, grid, (1, 2, 3), text=text, key_valid=key_valid)
    assert (out - ref).abs().max() <= 1e-4


def test_config_validation():
    with pytest.raises(ValueError, match="cell must have 2 entries"):
        fastdit.Agent(cell=(2, 8, 8))
    with pytest.raises(ValueError, match=r"video_cell\[1\]"):
        fastdit.Agent(video_cell=(2, 0, 8))
    with pytest.raises(ValueError, match="shortcut"):
        fastdit.Agent(shortcut=float("nan"))
    with pytest.raises(ValueError, match="block_size"):
        fastdit.Agent(block_size=96)
    with pytest.raises(ValueError, match="dense_last_steps"):
        fastdit.Agent(dense_last_steps=1.5)
    assert fastdit.Schedule.from_method(fastdit.Agent()) == fastdit.Schedule(dense_last_steps=0.6)


def test_guard_boundary_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(agent_module, "_logged_guards", set())
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(1, 4, 4))
    assert fastdit.Agent(cell=(2, 2)).runs_on(layout)  # 4 agents < 16 / 2
    with caplog.at_level(logging.WARNING, logger="fastdit"):
        assert not fastdit.Agent(cell=(2, 1)).runs_on(layout)  # 8 agents: not fewer than half
        assert not fastdit.Agent(cell=(2, 1)).runs_on(layout)
    assert len([r for r in caplog.records if "guard" in r.getMessage()]) == 1
    assert not fastdit.Agent(cell=(2, 2)).runs_on(layout, downsample=2)  # max_downsample 1


# --------------------------------------------------------------------------- UNet
def tiny_unet(seed=0, sdxl=False):
    torch.manual_seed(seed)
    common = dict(in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=16,
                  norm_num_groups=8)
    if not sdxl:  # SD 1.5's block types: attention at the highest resolution
        return UNet2DConditionModel(
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, **common,
        ).eval()
    # SDXL's: no attention in the highest-resolution blocks, text_time conditioning
    return UNet2DConditionModel(
        block_out_channels=(16, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 2), transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16, **common,
    ).eval()


def unet_inputs(rng, height=10, width=14, sdxl=False, timestep=500.0):
    kwargs = dict(sample=torch.randn(1, 4, height, width, generator=rng), timestep=torch.tensor(timestep),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=rng), return_dict=False)
    if sdxl:
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, 16, generator=rng),
                                           time_ids=torch.randn(1, 6, generator=rng))
    return kwargs


class UNetAgentReference:
    """Test-only processor: UNet self-attention (``AttnProcessor2_0``'s steps) with the brute-force
    agent formula on a known ``H x W`` grid."""

    def __init__(self, grid, cell):
        self.grid, self.cell = grid, cell

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert encoder_hidden_states is None and attention_mask is None
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        out = brute_force_agent(q, k, v, self.grid, self.cell).flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def install_unet_reference(unet, prefixes, grid, cell):
    reference = UNetAgentReference(grid, cell)
    unet.set_attn_processor({
        name: reference if name.startswith(prefixes) and ".attn1." in name else processor
        for name, processor in unet.attn_processors.items()
    })


@pytest.mark.parametrize("sdxl", [False, True])
def test_unet_highest_resolution_self_attention_equals_formula(rng, sdxl):
    unet = tiny_unet(sdxl=sdxl)
    kwargs = unet_inputs(rng, sdxl=sdxl)
    stock_processors = dict(unet.attn_processors)
    stock = run(unet, kwargs)
    handle = fastdit.apply(unet, fastdit.Agent(), schedule=ALL_STEPS)
    out = run(unet, kwargs)
    processors = unet.attn_processors
    # Cross-attention keeps its stock processor objects; self-attention is fastdit's.
    assert all(processors[n] is p for n, p in stock_processors.items() if ".attn2." in n)
    assert all(isinstance(p, UNetSparseAttnProcessor) for n, p in processors.items() if ".attn1." in n)
    handle.remove()
    assert torch.equal(run(unet, kwargs), stock)
    assert all(unet.attn_processors[n] is p for n, p in stock_processors.items())

    # The highest-resolution self-attention: 10 x 14 latent (SD 1.5: down_blocks.0, up_blocks.1);
    # SDXL's first blocks have none, so it is the 5 x 7 level (down_blocks.1, up_blocks.1).
    grid, prefixes = ((1, 5, 7), ("down_blocks.1.", "up_blocks.1.")) if sdxl else ((1, 10, 14), ("down_blocks.0.", "up_blocks.1."))
    densities = handle.state.densities
    agent_layers = sorted(layer for (layer, _), d in densities.items() if d < 1.0)
    # SDXL: down_blocks.1 (layer 0), up_blocks.1 (9, 10); down_blocks.2, mid, up_blocks.0 run stock.
    assert agent_layers == ([0, 9, 10] if sdxl else [0, 2, 3])
    install_unet_reference(unet, prefixes, grid, (1, 4, 4))
    ref = run(unet, kwargs)
    assert (out - ref).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3  # agents changed the output: the test means something


def test_unet_dense_step_and_max_downsample_equal_stock_exactly(rng):
    unet = tiny_unet()
    kwargs = unet_inputs(rng, timestep=900.0)
    stock = run(unet, kwargs)
    handle = fastdit.apply(unet, fastdit.Agent(max_downsample=2), schedule=fastdit.Schedule(dense_steps=1))
    assert torch.equal(run(unet, kwargs), stock)  # step 0 is dense: every call went to stock
    later = kwargs | dict(timestep=torch.tensor(700.0))
    run(unet, later)
    # max_downsample=2 also takes the mid block (layer 1, 5 x 7): every self-attention ran agents.
    assert handle.state.step == 1
    assert all(handle.state.densities[(layer, 1)] < 1.0 for layer in range(4))
    assert all(handle.state.densities[(layer, 0)] == 1.0 for layer in range(4))
    handle.remove()


def test_unet_guard_runs_stock_and_logs_once(rng, monkeypatch, caplog):
    monkeypatch.setattr(agent_module, "_logged_guards", set())
    unet = tiny_unet()
    kwargs = unet_inputs(rng)
    later = kwargs | dict(timestep=torch.tensor(400.0))
    stock, stock_later = run(unet, kwargs), run(unet, later)
    handle = fastdit.apply(unet, fastdit.Agent(cell=(1, 2)), schedule=ALL_STEPS)  # 70 agents for 140 tokens
    with caplog.at_level(logging.WARNING, logger="fastdit"):
        assert torch.equal(run(unet, kwargs), stock)
        assert torch.equal(run(unet, later), stock_later)
    assert len([r for r in caplog.records if "guard" in r.getMessage()]) == 1
    assert set(handle.state.densities.values()) == {1.0}
    handle.remove()


def test_unet_set_attn_processor_then_attach(rng):
    unet = tiny_unet()
    kwargs = unet_inputs(rng)
    handle = fastdit.apply(unet, fastdit.Agent(), schedule=ALL_STEPS)
    applied = run(unet, kwargs)
    handle.remove()
    processor = UNetSparseAttnProcessor(fastdit.Agent(), schedule=ALL_STEPS)
    unet.set_attn_processor(processor)  # one instance on attn1 and attn2
    with pytest.raises(RuntimeError, match="fastdit.attach"):
        run(unet, kwargs)
    handle = fastdit.attach(unet)
    assert torch.equal(run(unet, kwargs), applied)  # cross-attention delegated to stock
    handle.remove()
    assert processor.state is None and not hasattr(unet, "_diffusers_hook")


# --------------------------------------------------------------------------- Wan
def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    ).eval()


class WanAgentReference:
    """Test-only processor: Wan self-attention (norms, RoPE) with the brute-force agent formula."""

    def __init__(self, grid, cell):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.grid, self.cell, self.stock = grid, cell, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = apply_wan_rotary_emb(q, *rotary_emb), apply_wan_rotary_emb(k, *rotary_emb)
        out = brute_force_agent(q, k, v, self.grid, self.cell).flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def test_wan_equals_formula_on_chosen_layers(rng):
    model = tiny_wan()
    # Latent 5x12x20 -> token grid 5x6x10 = 300 tokens; cells 2x4x4 -> 3*2*3 = 18 agents.
    kwargs = dict(hidden_states=torch.randn(1, 4, 5, 12, 20, generator=rng), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, 16, generator=rng), return_dict=False)
    stock = run(model, kwargs)
    method = fastdit.Agent(video_cell=(2, 4, 4), block_size=64)
    handle = fastdit.apply(model, method, schedule=fastdit.Schedule(dense_layers=1))
    out = run(model, kwargs)
    assert handle.state.densities == {(0, 0): 1.0, (1, 0): pytest.approx(2 * 18 / 300)}
    handle.remove()
    reference = WanAgentReference((5, 6, 10), (2, 4, 4))
    model.set_attn_processor({n: reference if n.startswith("blocks.1.") else p for n, p in model.attn_processors.items()})
    ref = run(model, kwargs)
    assert (out - ref).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


# --------------------------------------------------------------------------- HunyuanVideo
class HunyuanAgentReference:
    """Test-only processor: HunyuanVideo's joint attention (projections, norms, RoPE on video,
    [video | text]) with the brute-force agent formula, text exact, padded text keys masked."""

    def __init__(self, grid, cell):
        self.grid, self.cell = grid, cell

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        text, n = encoder_hidden_states.shape[1], hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        q = attn.norm_q(attn.to_q(x).unflatten(2, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(x).unflatten(2, (attn.heads, -1)))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        q = torch.cat([apply_rotary_emb(q[:, :n], image_rotary_emb, sequence_dim=1), q[:, n:]], dim=1)
        k = torch.cat([apply_rotary_emb(k[:, :n], image_rotary_emb, sequence_dim=1), k[:, n:]], dim=1)
        if not single:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        key_valid = attention_mask[:, 0, 0]
        out = brute_force_agent(q, k, v, self.grid, self.cell, text=text, key_valid=key_valid)
        out = out.flatten(2, 3).to(q.dtype)
        video, text_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video, text_out


def test_hunyuan_agents_with_exact_text_equal_formula(rng):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()
    text, valid = 9, torch.tensor([9, 4])  # the second prompt is padded
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 4, 8, 12, generator=rng),  # token grid 4x4x6 = 96
        timestep=torch.tensor([500.0, 500.0]),
        encoder_hidden_states=torch.randn(2, text, 12, generator=rng),
        encoder_attention_mask=(torch.arange(text)[None] < valid[:, None]).long(),
        pooled_projections=torch.randn(2, 8, generator=rng), guidance=torch.tensor([6000.0] * 2),
        return_dict=False,
    )
    stock = run(model, kwargs)
    handle = fastdit.apply(model, fastdit.Agent(video_cell=(2, 2, 3), block_size=64), schedule=ALL_STEPS)
    out = run(model, kwargs)
    handle.remove()
    reference = HunyuanAgentReference((4, 4, 6), (2, 2, 3))
    joint = ("transformer_blocks.", "single_transformer_blocks.")
    model.set_attn_processor({n: reference if n.startswith(joint) else p for n, p in model.attn_processors.items()})
    assert (out - run(model, kwargs)).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


# --------------------------------------------------------------------------- pipelines
def test_tiny_sd_pipeline_end_to_end():
    tiny = pytest.importorskip("fastdit.testing.tiny")
    pipe = tiny.build_tiny_sd_pipeline(seed=0)
    settings = dict(prompt="a red cat", height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                    output_type="np")
    stock = pipe(**settings, generator=torch.Generator().manual_seed(1)).images
    stock_processors = dict(pipe.unet.attn_processors)
    handle = fastdit.apply(pipe, fastdit.Agent())
    out = pipe(**settings, generator=torch.Generator().manual_seed(1)).images
    # Default schedule: agents in the first 40% of the 3 steps (step 0), exact afterwards; the
    # step count comes from the scheduler (the SD pipeline sets no cache_context).
    densities = handle.state.densities
    assert handle.state.num_steps == 3
    assert densities[(0, 0)] < 1.0 and densities[(1, 0)] == 1.0  # layer 1: the mid block
    assert all(densities[(layer, step)] == 1.0 for layer in range(4) for step in (1, 2))
    assert np.isfinite(out).all() and np.abs(out - stock).max() > 1e-4
    # SD never resets stateful hooks: repeated 1-step calls (same timestep) are new generations.
    generation = handle.state.generation
    for _ in range(2):
        pipe(**settings | dict(num_inference_steps=1), generator=torch.Generator().manual_seed(1))
    assert handle.state.generation == generation + 2 and handle.state.num_steps == 1
    handle.remove()
    assert all(pipe.unet.attn_processors[n] is p for n, p in stock_processors.items())
    assert (pipe(**settings, generator=torch.Generator().manual_seed(1)).images == stock).all()


def test_cli_generates_with_agent_on_wan(tmp_path):
    method = clicommon.build_method("agent", {"video_cell": (2, 4, 4)})
    assert method == fastdit.Agent(video_cell=(2, 4, 4))
    output = tmp_path / "agent.mp4"
    code = cli.main(["generate", "--attention", "agent", "--attention-opt", "video_cell=2,4,4",
                     "--height", "64", "--width", "64", "--num-frames", "9", "--steps", "2",
                     "--output", str(output)])
    assert code == 0 and output.stat().st_size > 0
