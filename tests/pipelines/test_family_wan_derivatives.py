"""fastdit on the Wan derivatives: VACE (control blocks too), SkyReels-V2 (diffusion forcing's
block-causal mask folded into the plan) and Wan2.2 TI2V-5B (per-token timesteps)."""

import pytest
import torch

import fastdit
from tests.pipelines.family_helpers import (
    TokenMaskedSDPA,
    check_methods_repeat,
    check_pipeline_dense_and_remove,
    kernel_token_mask,
    paro_method,
    prefix_masks,
    reference_backend,  # noqa: F401 (autouse fixture)
)
from tests.integration_helpers import run

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from fastdit.testing.tiny import TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG  # noqa: E402

GRID = (5, 6, 10)  # 300 tokens: not a multiple of 64


def scheduler():
    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def vace_transformer(seed=0):
    torch.manual_seed(seed)
    return WanVACETransformer3DModel(**TINY_TRANSFORMER_CONFIG, vace_layers=[0, 1], vace_in_channels=96).eval()


def skyreels_transformer(seed=0, frames_per_block=1):
    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    if frames_per_block > 1:
        model._set_ar_attention(frames_per_block)
    return model


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 7, 32, generator=g), negative_prompt_embeds=torch.randn(1, 7, 32, generator=g))


def vae():
    # Narrower than the tiny Wan VAE: VACE's pipeline encodes the control video on every call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKLWan(**(TINY_VAE_CONFIG | dict(base_dim=4, dim_mult=[1, 1, 1, 1]))).eval()


def masked_reference(model, kwargs, method, layout):
    """The stock model's output with the method's token rule added to every self-attention."""
    token_mask = kernel_token_mask(method, layout)
    assert not token_mask.all(), "the rule must be sparse for this test to mean anything"
    reference = TokenMaskedSDPA(prefix_masks(token_mask, layout.grid.num_tokens))
    with reference:
        expected = run(model, kwargs)
    return expected, reference.masked_calls


# ---------------------------------------------------------------------------- VACE
def vace_inputs(rng, frames=GRID[0], height=2 * GRID[1], width=2 * GRID[2]):
    return dict(
        hidden_states=torch.randn(1, 16, frames, height, width, generator=rng),
        control_hidden_states=torch.randn(1, 96, frames, height, width, generator=rng),
        timestep=torch.tensor([600.0]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=rng),
        return_dict=False,
    )


def vace_pipeline():
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae(), scheduler=scheduler(), transformer=vace_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 9 frames of 64 x 128 px -> latent 3 x 8 x 16 -> 3 x 4 x 8 = 96 tokens (the VAE encodes the control video).
VACE_CALL = dict(height=64, width=128, num_frames=9, num_inference_steps=2, guidance_scale=5.0, output_type="latent")


def test_vace_pipeline_dense_matches_stock_and_remove_restores():
    pipe = vace_pipeline()
    layout = check_pipeline_dense_and_remove(pipe, VACE_CALL | embeddings())
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(3, 4, 8))


@pytest.mark.parametrize("method", [
    fastdit.Radial(decay=0.3, block_size=64),
    fastdit.GNA(window=(3, 3, 5), block_size=64),
], ids=["radial", "gna"])
def test_vace_static_methods_equal_masked_reference(rng, method):
    model = vace_transformer()
    kwargs = vace_inputs(rng)
    stock = run(model, kwargs)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert sorted({layer for layer, _ in handle.state.densities}) == [0, 1, 2, 3]  # 2 main + 2 control
    handle.remove()
    expected, calls = masked_reference(model, kwargs, method, fastdit.SequenceLayout(fastdit.LatentGrid(*GRID)))
    assert calls == 4
    assert (out - expected).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


def test_vace_dynamic_methods_and_paro_repeat(tmp_path):
    pipe = vace_pipeline()
    call = VACE_CALL | embeddings()
    methods = [
        fastdit.VMoBA(block_size=64, dense_steps=0),
        fastdit.AdaSpa(block_size=64, sparsity=0.5, search_steps=(0.0, 0.5)),
        fastdit.Agent(video_cell=(1, 2, 2), dense_last_steps=0),
        paro_method(pipe, embeddings(), call, tmp_path),
    ]
    check_methods_repeat(pipe, call, methods)


# ---------------------------------------------------------------------------- SkyReels-V2
def skyreels_inputs(rng, frames=6, height=12, width=20):
    return dict(
        hidden_states=torch.randn(1, 16, frames, height, width, generator=rng),
        timestep=torch.linspace(300.0, 900.0, frames)[None],  # diffusion forcing: one per frame
        encoder_hidden_states=torch.randn(1, 7, 32, generator=rng),
        enable_diffusion_forcing=True,
        return_dict=False,
    )


def causal_mask(grid, frames_per_block):
    frame_block = torch.as_tensor(grid.coords()[:, 0]) // frames_per_block
    return frame_block[None, :] <= frame_block[:, None]


@pytest.mark.parametrize("method, grid", [
    (fastdit.Dense(block_size=64), (6, 6, 10)),
    (fastdit.Radial(decay=0.3, block_size=64), (6, 6, 10)),
    # GNA's tiles are (1, 8, 8), so kernel blocks are frames and never straddle a causal block.
    (fastdit.GNA(window=(3, 5, 5), tile=(1, 8, 8), block_size=64), (4, 8, 8)),
], ids=["dense", "radial", "gna"])
def test_skyreels_block_causal_folded_into_plan(rng, method, grid):
    # 2 frames per causal block: 120-token blocks (6 x 6 x 10) straddle the 64-token kernel blocks.
    model = skyreels_transformer(frames_per_block=2)
    kwargs = skyreels_inputs(rng, grid[0], 2 * grid[1], 2 * grid[2])
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    handle.remove()
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*grid))
    if isinstance(method, fastdit.Dense):  # stock applies the causal mask itself
        expected = run(model, kwargs)
    else:
        expected, calls = masked_reference(model, kwargs, method, layout)
        assert calls == 2
    assert (out - expected).abs().max() <= 1e-4
    # The mask matters: without it (same weights) the output differs.
    model.register_to_config(num_frame_per_block=1)
    assert (out - run(model, kwargs)).abs().max() > 1e-3


def test_skyreels_causal_plan_token_rule():
    # The folded plan computes exactly (plan blocks) AND (block-causal mask), token by token.
    from fastdit.pipelines.skyreels_v2 import block_causal_plan

    grid = fastdit.LatentGrid(6, 6, 10)
    layout = fastdit.SequenceLayout(grid)
    method = fastdit.Radial(decay=0.3, block_size=64)
    folded = block_causal_plan(method.plan(layout), 2)
    seq = grid.num_tokens
    computed = torch.zeros(grid.num_tokens, grid.num_tokens, dtype=torch.bool)
    full = folded.sparsity.to_block_map()[0, 0]
    ones = torch.ones(64, 64, dtype=torch.int32)
    computed |= torch.kron(full.int(), ones).bool()[:seq, :seq]
    partial = torch.kron(folded.window_mask.partial.to_block_map()[0, 0].int(), ones).bool()[:seq, :seq]
    rows = torch.arange(seq)
    computed |= partial & folded.window_mask.allowed(rows, rows)
    assert torch.equal(computed, kernel_token_mask(method, layout) & causal_mask(grid, 2))


def test_skyreels_refusals(rng):
    model = skyreels_transformer(frames_per_block=2)
    kwargs = skyreels_inputs(rng)
    for method in (fastdit.VMoBA(block_size=64, dense_steps=0), fastdit.Agent(video_cell=(1, 2, 2), dense_last_steps=0)):
        handle = fastdit.apply(model, method)
        with pytest.raises(ValueError, match=f"{type(method).__name__} does not apply to SkyReelsV2.*causal_block_size=2"):
            run(model, kwargs)
        handle.remove()
    # Sliding GNA with 8-token tiles: window-masked blocks straddle causal blocks.
    handle = fastdit.apply(model, fastdit.GNA(window=(3, 3, 5), block_size=64))
    with pytest.raises(ValueError, match="tile whose frame extent divides 2"):
        run(model, kwargs)
    handle.remove()


DF_CALL = dict(
    prompt=None, height=96, width=160, num_frames=21, base_num_frames=21, num_inference_steps=2,
    guidance_scale=5.0, output_type="latent",
)


def skyreels_pipeline():
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, transformer=skyreels_transformer(), vae=vae(), scheduler=scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_skyreels_diffusion_forcing_pipeline_dense_and_dynamic_methods(tmp_path):
    pipe = skyreels_pipeline()
    # Block-causal (causal_block_size=2): 6 latent frames of 6 x 10 tokens.
    check_pipeline_dense_and_remove(pipe, DF_CALL | embeddings() | dict(causal_block_size=2))
    # Without the causal mask every method runs.
    pipe.transformer.register_to_config(num_frame_per_block=1)
    call = DF_CALL | embeddings()
    methods = [
        fastdit.VMoBA(block_size=64, dense_steps=0),
        fastdit.AdaSpa(block_size=64, sparsity=0.5, search_steps=(0.0, 0.5)),
        fastdit.Agent(video_cell=(1, 2, 2), dense_last_steps=0),
        paro_method(pipe, embeddings(), call, tmp_path),
    ]
    check_methods_repeat(pipe, call, methods)


# ---------------------------------------------------------------------------- Wan2.2 TI2V-5B
def test_ti2v_per_token_timesteps_with_token_reordering(rng):
    # Wan2.2 TI2V runs WanTransformer3DModel with per-token timesteps (first-frame conditioning
    # tokens at 0): GNA's tile-major order must carry the [B, S, 6, C] modulation with the tokens.
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    grid = fastdit.LatentGrid(*GRID)
    timestep = torch.full((1, grid.num_tokens), 700.0)
    timestep[:, : grid.tokens_per_frame] = 0.0
    kwargs = dict(
        hidden_states=torch.randn(1, 16, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=rng), timestep=timestep,
        encoder_hidden_states=torch.randn(1, 7, 32, generator=rng), return_dict=False,
    )
    method = fastdit.GNA(window=(3, 3, 5), block_size=64)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert handle.state.active_plan.permutation is not None and handle.state.step == 0
    handle.remove()
    expected, calls = masked_reference(model, kwargs, method, fastdit.SequenceLayout(grid))
    assert calls == 2 and (out - expected).abs().max() <= 1e-4


def test_ti2v_pipeline_expand_timesteps_dense_and_methods():
    tiny = pytest.importorskip("fastdit.testing.tiny")
    pipe = tiny.build_tiny_wan_pipeline(seed=0)
    pipe.register_to_config(expand_timesteps=True)  # Wan2.2 TI2V-5B's per-token timesteps
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", height=96, width=160, num_frames=17, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    check_pipeline_dense_and_remove(pipe, call)
    check_methods_repeat(pipe, call, [fastdit.Radial(decay=0.3, block_size=64), fastdit.GNA(window=(3, 3, 5), block_size=64)])
