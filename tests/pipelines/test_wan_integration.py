"""fastdit installed on diffusers' Wan: outputs against stock and masked-reference processors."""

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

import fastdit
from tests.integration_helpers import expand_blocks, run
from fastdit.pipelines.wan import WanSparseAttnProcessor, apply_wan_rotary_emb

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402


def tiny_transformer(seed: int = 0, num_layers: int = 2) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
    ).eval()


def inputs(rng, frames=5, height=12, width=20):
    # Latent 5x12x20 -> token grid 5x6x10 = 300 tokens: not a multiple of 64 or 128.
    x = torch.randn(1, 4, frames, height, width, generator=rng)
    context = torch.randn(1, 7, 16, generator=rng)
    return dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=context, return_dict=False)


class MaskedSelfAttention:
    """Test-only processor: Wan self-attention with a token mask through torch SDPA (the reference)."""

    def __init__(self, token_mask: torch.Tensor) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.token_mask = token_mask
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = apply_wan_rotary_emb(q, *rotary_emb), apply_wan_rotary_emb(k, *rotary_emb)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
            attn_mask=self.token_mask,
        ).transpose(1, 2)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def install_reference(model, token_mask):
    processor = MaskedSelfAttention(token_mask)
    model.set_attn_processor({name: processor if ".attn1." in name else p for name, p in model.attn_processors.items()})


def test_dense_matches_stock_and_remove_restores_exactly(rng):
    model = tiny_transformer()
    kwargs = inputs(rng)
    stock_processors = dict(model.attn_processors)
    stock = run(model, kwargs)
    handle = fastdit.apply(model, fastdit.Dense())
    out = run(model, kwargs)
    assert (out - stock).abs().max() <= 1e-4
    handle.remove()
    assert torch.equal(run(model, kwargs), stock)
    assert all(model.attn_processors[name] is p for name, p in stock_processors.items())
    assert not hasattr(model, "_diffusers_hook")


@pytest.mark.parametrize("block_size", [64, 128])
def test_radial_equals_masked_reference(rng, block_size):
    model = tiny_transformer()
    kwargs = inputs(rng)
    method = fastdit.Radial(decay=0.3, block_size=block_size)
    grid = fastdit.LatentGrid(5, 6, 10)
    block_map = method.block_map(fastdit.SequenceLayout(grid))
    assert not block_map.all(), "the plan must be sparse for this test to mean anything"
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    handle.remove()
    install_reference(model, expand_blocks(block_map, block_size, grid.num_tokens))
    ref = run(model, kwargs)
    assert (out - ref).abs().max() <= 1e-4
    # And it is not the dense answer.
    model.set_attn_processor(dict(tiny_transformer().attn_processors))
    assert (out - run(model, kwargs)).abs().max() > 1e-3


def test_gna_permuted_equals_natten_definition(rng):
    # Blocked (Swin-like) GNA on a 2x8x16 grid with 64-token tiles is perfectly block-sparse:
    # the block plan is exactly the token-level definition, run in tile-major order.
    model = tiny_transformer()
    kwargs = inputs(rng, frames=2, height=16, width=32)
    method = fastdit.GNA(window=(2, 4, 8), stride=(2, 4, 8), tile=(2, 4, 8), block_size=64)
    grid = fastdit.LatentGrid(2, 8, 16)
    assert method.check(grid).perfectly_block_sparse
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert handle.state.active_plan.permutation is not None
    handle.remove()
    install_reference(model, method.token_mask(grid))
    assert (out - run(model, kwargs)).abs().max() <= 1e-4


def test_sliding_gna_is_exact(rng):
    # A non-perfect configuration runs its partial blocks under the window mask: exactly GNA.
    model = tiny_transformer()
    kwargs = inputs(rng)
    method = fastdit.GNA(window=(3, 3, 5), stride=(1, 1, 1), block_size=64)
    grid = fastdit.LatentGrid(5, 6, 10)
    assert not method.check(grid).perfectly_block_sparse
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert handle.state.active_plan.window_mask is not None
    handle.remove()
    install_reference(model, method.token_mask(grid))
    assert (out - run(model, kwargs)).abs().max() <= 1e-4


def test_single_processor_everywhere_keeps_cross_attention_stock(rng):
    model = tiny_transformer()
    kwargs = inputs(rng)
    stock = run(model, kwargs)
    processor = WanSparseAttnProcessor(fastdit.Dense())
    model.set_attn_processor(processor)  # one instance on attn1 and attn2
    with pytest.raises(RuntimeError, match="fastdit.attach"):
        run(model, kwargs)
    handle = fastdit.attach(model)
    assert (run(model, kwargs) - stock).abs().max() <= 1e-4
    handle.remove()
    assert processor.state is None and not hasattr(model, "_diffusers_hook")


def test_schedule_dense_layers_and_steps(rng):
    model = tiny_transformer(num_layers=3)
    kwargs = inputs(rng)
    method = fastdit.Radial(decay=0.3, block_size=64)
    handle = fastdit.apply(model, method, schedule=fastdit.Schedule(dense_steps=1, dense_layers=1))
    for timestep in (900.0, 900.0, 700.0):  # step 0 twice (CFG: cond and uncond), then step 1
        run(model, kwargs | dict(timestep=torch.tensor([timestep])))
    densities = handle.state.densities
    assert handle.state.step == 1
    assert densities[(0, 0)] == densities[(1, 0)] == densities[(0, 1)] == 1.0  # dense
    assert densities[(1, 1)] == densities[(2, 1)] < 1.0  # sparse
    # A higher timestep starts a new generation: the counter resets.
    run(model, kwargs | dict(timestep=torch.tensor([999.0])))
    assert handle.state.step == 0 and handle.state.generation == 2
    handle.remove()


def test_schedule_validation():
    with pytest.raises(ValueError, match="dense_steps"):
        fastdit.Schedule(dense_steps=-1)
    with pytest.raises(ValueError, match="1.5"):
        fastdit.Schedule(dense_steps=1.5)
    schedule = fastdit.Schedule(dense_steps=0.25, dense_last_steps=2)
    assert [schedule.is_dense(s, 10, 5, 30) for s in range(10)] == [True] * 3 + [False] * 5 + [True] * 2
    with pytest.raises(ValueError, match="fraction"):
        schedule.is_dense(0, None, 5, 30)
    assert fastdit.Schedule.from_method(fastdit.Radial.preset("wan2.1-14b")) == fastdit.Schedule(12, 0, 1)


def test_unsupported_model_lists_supported():
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        fastdit.apply(torch.nn.Linear(2, 2), fastdit.Dense())
    model = tiny_transformer()
    handle = fastdit.apply(model, fastdit.Dense())
    with pytest.raises(RuntimeError, match="already installed"):
        fastdit.apply(model, fastdit.Dense())
    fastdit.remove(model)
    assert handle.removed


def test_tiny_pipeline_cfg_steps_and_determinism():
    tiny = pytest.importorskip("fastdit.testing.tiny")
    pipe = tiny.build_tiny_wan_pipeline(seed=0)
    settings = dict(prompt="a cat", height=64, width=64, num_frames=5, num_inference_steps=2,
                    guidance_scale=5.0, output_type="np")
    stock = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    handle = fastdit.apply(pipe, fastdit.Radial(decay=0.5, block_size=64, dense_steps=1))
    seen = []
    original_begin = handle.state.begin_forward

    def record(layout, device, context, timestep):
        original_begin(layout, device, context, timestep)
        seen.append((handle.state.step, handle.state.context))

    handle.state.begin_forward = record
    first = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    second = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    # CFG cond/uncond passes share one step; each generation counts from 0 again.
    assert seen == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")] * 2
    assert handle.state.generation == 2
    assert (first == second).all()  # no state leaks between generations
    handle.remove()
    restored = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    assert (restored == stock).all()
    assert math.isfinite(float(first.mean()))


def test_permuted_order_is_exact_for_every_block(rng):
    # A window covering the whole grid is dense attention in tile-major order: the output must
    # equal stock, which needs RoPE permuted for every block, not only the first.
    model = tiny_transformer(num_layers=3)
    kwargs = inputs(rng, frames=2, height=16, width=32)
    stock = run(model, kwargs)
    handle = fastdit.apply(model, fastdit.GNA(window=(2, 8, 16), tile=(2, 4, 8), block_size=64))
    out = run(model, kwargs)
    assert handle.state.active_plan.permutation is not None
    assert handle.state.active_plan.density == 1.0
    handle.remove()
    assert (out - stock).abs().max() <= 1e-4


def test_apply_keeps_custom_cross_attention_processors(rng):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_transformer()
    kwargs = inputs(rng)
    custom = WanAttnProcessor()  # stands for a user's own processor (IP-adapter, LoRA, ...)
    model.set_attn_processor({n: custom if ".attn2." in n else p for n, p in model.attn_processors.items()})
    handle = fastdit.apply(model, fastdit.Dense())
    processors = model.attn_processors
    assert all(p is custom for n, p in processors.items() if ".attn2." in n)
    assert all(isinstance(p, WanSparseAttnProcessor) for n, p in processors.items() if ".attn1." in n)
    run(model, kwargs)
    handle.remove()
    assert all(p is custom for n, p in model.attn_processors.items() if ".attn2." in n)


def test_attach_refuses_mixed_methods():
    model = tiny_transformer()
    names = list(model.attn_processors)
    mixed = {n: WanSparseAttnProcessor(fastdit.Dense() if i % 2 else fastdit.Radial()) for i, n in enumerate(names)}
    model.set_attn_processor(mixed)
    with pytest.raises(ValueError, match="one method"):
        fastdit.attach(model)
    assert not hasattr(model, "_diffusers_hook")


class RecordingMethod(fastdit.methods.Method):
    """A per-call method (the ``attend`` interface of VMoBA/AdaSpa/PARO/Agent): dense attention
    on the kernel, recording what each call is told."""

    def __init__(self):
        self.dense = fastdit.Dense(block_size=64)
        self.calls = []

    def plan(self, layout, device=None):
        return self.dense.plan(layout, device)

    def new_runtime(self):
        return {"calls": 0}

    def attend(self, query, key, value, call):
        call.runtime["calls"] += 1
        self.calls.append(call)
        return fastdit.block_sparse_attention(query, key, value, call.plan.sparsity), 0.5


def test_per_call_method_sees_step_context_layer_and_runtime():
    tiny = pytest.importorskip("fastdit.testing.tiny")
    pipe = tiny.build_tiny_wan_pipeline(seed=0)
    settings = dict(prompt="a cat", height=64, width=64, num_frames=5, num_inference_steps=2,
                    guidance_scale=5.0, output_type="np")
    stock = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    method = RecordingMethod()
    handle = fastdit.apply(pipe, method, schedule=fastdit.Schedule(dense_steps=1))
    out = pipe(**settings, generator=torch.Generator().manual_seed(1)).frames[0]
    num_layers = len(pipe.transformer.blocks)
    # Step 0 is dense (stock path, attend not called); step 1 runs attend on every layer, per CFG pass.
    seen = [(c.step, c.context, c.layer, c.num_layers, c.transformer, c.num_steps) for c in method.calls]
    assert seen == [(1, ctx, layer, num_layers, 0, 2) for ctx in ("cond", "uncond") for layer in range(num_layers)]
    first_runtime = method.calls[0].runtime
    assert all(c.runtime is first_runtime for c in method.calls) and first_runtime["calls"] == len(seen)
    assert handle.state.densities == {**{(l, 0): 1.0 for l in range(num_layers)}, **{(l, 1): 0.5 for l in range(num_layers)}}
    assert np.abs(out - stock).max() < 1e-4
    pipe(**settings, generator=torch.Generator().manual_seed(1))
    assert method.calls[-1].runtime is not first_runtime  # a new generation, a new runtime
    assert method.calls[-1].generation == method.calls[0].generation + 1
    handle.remove()


def test_shape_change_renews_runtime(rng):
    model = tiny_transformer()
    method = RecordingMethod()
    handle = fastdit.apply(model, method)
    run(model, inputs(rng))
    runtime = handle.state.runtime
    kwargs = inputs(rng, height=16, width=16)
    kwargs["timestep"] = torch.tensor([400.0])  # same generation (timestep goes down)
    run(model, kwargs)
    assert handle.state.generation == 1 and handle.state.runtime is not runtime
    assert method.calls[-1].runtime is handle.state.runtime
    handle.remove()


def test_step_from_per_token_timesteps_and_attach_rolls_back(rng):
    # Wan2.2 TI2V passes per-token timesteps whose first-frame tokens are 0 at every step.
    model = tiny_transformer()
    handle = fastdit.apply(model, fastdit.Dense(block_size=64))
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(2, 4, 4))
    steps = []
    for t in (999.0, 800.0, 600.0):
        timestep = torch.full((1, 32), t)
        timestep[:, :16] = 0.0
        handle.state.begin_forward(layout, torch.device("cpu"), None, timestep)
        steps.append(handle.state.step)
    assert steps == [0, 1, 2] and handle.state.generation == 1
    # Batched-CFG models without a hook reset (UNets): a repeated 1-step call is a new
    # generation, a second CFG context at the same timestep is not.
    handle.state.repeated_timestep_is_new_generation = True
    for context in ("cond", "uncond", "cond", "uncond"):
        handle.state.begin_forward(layout, torch.device("cpu"), type("C", (), {"name": context, "step_index": None})(), torch.tensor([999.0]))
    assert handle.state.generation == 3 and handle.state.step == 0
    handle.remove()

    class TwoModels:  # a pipeline whose second transformer has no fastdit processor
        transformer = tiny_transformer()
        transformer_2 = tiny_transformer()

    pipe = TwoModels()
    pipe.transformer.set_attn_processor(WanSparseAttnProcessor(fastdit.Dense()))
    with pytest.raises(ValueError, match="no fastdit processor is installed"):
        fastdit.attach(pipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook")  # the first model's hooks are undone
    fastdit.attach(pipe.transformer).remove()  # and it can be attached again
