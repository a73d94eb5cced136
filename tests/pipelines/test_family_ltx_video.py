"""fastdit on LTX-Video: tiny in-process pipelines (T2V, and the condition pipeline that prepends
conditioning tokens) and transformer with random weights."""

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
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXConditionPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from fastdit.pipelines.ltx_video import grid_from_video_coords  # noqa: E402

GRID = (5, 6, 10)  # 300 video tokens
EXTRA = 2 * 6 * 10  # two conditioning frames in front


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=2, caption_channels=16,
    ).eval()


def tiny_vae():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        ).eval()


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, 6, 16, generator=g), prompt_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
        negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
        negative_prompt_attention_mask=torch.tensor([[1, 1, 0, 0, 0, 0]]),
    )


# 33 frames of 160 x 320 px -> latent 5 x 5 x 10 (VAE 8x32x32, patch 1): 250 tokens.
CALL = dict(height=160, width=320, num_frames=33, num_inference_steps=2, guidance_scale=3.0, output_type="latent")


def pipeline(cls=LTXPipeline):
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
               transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def coords(grid, start_frame=0):
    """LTXConditionPipeline's coordinates of a grid (pixels: t * 8 - 7 clamped, h * 32, w * 32)."""
    t, h, w = grid.coords().unbind(1)
    t = (t * 8 + 1 - 8).clamp(min=0) + start_frame
    return torch.stack([t, h * 32, w * 32]).float()


def inputs(rng):
    # Two conditioning frames at frame index 40 in front of the 5 x 6 x 10 video, per-token timesteps.
    video = fastdit.LatentGrid(*GRID)
    condition = fastdit.LatentGrid(2, GRID[1], GRID[2])
    video_coords = torch.cat([coords(condition, 40), coords(video)], dim=1)[None] / 25.0
    timestep = torch.full((1, EXTRA + video.num_tokens), 800.0)
    timestep[:, :EXTRA] = 0.0
    return dict(
        hidden_states=torch.randn(1, EXTRA + video.num_tokens, 8, generator=rng),
        encoder_hidden_states=torch.randn(1, 6, 16, generator=rng), timestep=timestep,
        encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]]), video_coords=video_coords, return_dict=False,
    )


def test_grid_from_video_coords():
    video = fastdit.LatentGrid(*GRID)
    video_coords = torch.cat([coords(fastdit.LatentGrid(1, 6, 10), 16), coords(video)], dim=1)[None]
    assert grid_from_video_coords(video_coords) == (60, video)
    with pytest.raises(ValueError, match="not a frame-major video grid"):
        grid_from_video_coords(video_coords[:, :, :-1])
    with pytest.raises(ValueError, match="\\(0, 0, 0\\)"):
        grid_from_video_coords(video_coords + 1)


def test_pipelines_dense_match_stock_and_remove_restores():
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
    from PIL import Image

    layout = check_pipeline_dense_and_remove(pipeline(), CALL | embeddings())
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(5, 5, 10))
    # Conditions at frame 0 (in place) and frame 16 (one latent frame of tokens in front).
    image = Image.new("RGB", (320, 160), (200, 40, 90))
    conditions = [LTXVideoCondition(image=image, frame_index=0), LTXVideoCondition(image=image, frame_index=16)]
    layout = check_pipeline_dense_and_remove(pipeline(LTXConditionPipeline), CALL | embeddings() | dict(conditions=conditions))
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(5, 5, 10), fastdit.TextSegment(50, "before"))


@pytest.mark.parametrize("method", [
    fastdit.Radial(decay=0.3, block_size=64),
    fastdit.GNA(window=(3, 3, 5), block_size=64),
], ids=["radial", "gna"])
def test_static_methods_equal_masked_reference(rng, method):
    model = tiny_transformer()
    kwargs = inputs(rng)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(EXTRA, "before"))
    token_mask = kernel_token_mask(method, layout)
    assert not token_mask.all()
    stock = run(model, kwargs)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert handle.state.layout == layout
    handle.remove()
    reference = TokenMaskedSDPA(prefix_masks(token_mask, layout.num_tokens))
    with reference:
        expected = run(model, kwargs)
    assert reference.masked_calls == 2  # attn1 of both blocks; cross-attention is left alone
    assert (out - expected).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


def test_dynamic_methods_and_paro_repeat(tmp_path):
    pipe = pipeline()
    call = CALL | embeddings()
    methods = [
        fastdit.VMoBA(block_size=64, dense_steps=0),
        fastdit.AdaSpa(block_size=64, sparsity=0.5, search_steps=(0.0, 0.5)),
        fastdit.Agent(video_cell=(1, 2, 2), dense_last_steps=0),
        paro_method(pipe, embeddings(), call, tmp_path),
    ]
    check_methods_repeat(pipe, call, methods)


def test_size_rule():
    from fastdit.pipelines import ltx_video

    ltx_video.check_sizes(None, 512, 768, 121)
    with pytest.raises(ValueError, match="8k\\+1"):
        ltx_video.check_sizes(None, 512, 768, 81 + 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        ltx_video.check_sizes(None, 496, 768, 121)
