"""fastdit on CogVideoX 1.0 and 1.5 (temporal patch): tiny in-process pipeline and transformer."""

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
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)

GRID = (5, 6, 10)  # 300 video tokens
TEXT = 7


def tiny_transformer(seed=0, patch_size_t=None):
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=20, sample_height=12, sample_frames=17, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    ).eval()


def pipeline(patch_size_t=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLCogVideoX(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=2)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(),
                             transformer=tiny_transformer(patch_size_t=patch_size_t), scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, TEXT, 16, generator=g), negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g))


# 17 frames of 96 x 160 px -> latent 5 x 12 x 20 (frames on dim 1) -> 5 x 6 x 10 tokens + 7 text.
CALL = dict(height=96, width=160, num_frames=17, num_inference_steps=2, guidance_scale=6.0, output_type="latent")


def rotary(model, grid):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return get_3d_rotary_pos_embed(
        embed_dim=model.config.attention_head_dim, crops_coords=((0, 0), (grid[1], grid[2])),
        grid_size=(grid[1], grid[2]), temporal_size=grid[0],
    )


def inputs(rng, model):
    return dict(
        hidden_states=torch.randn(2, GRID[0], 4, 2 * GRID[1], 2 * GRID[2], generator=rng),
        encoder_hidden_states=torch.randn(2, TEXT, 16, generator=rng), timestep=torch.tensor([600, 600]),
        image_rotary_emb=rotary(model, GRID), return_dict=False,
    )


@pytest.mark.parametrize("patch_size_t, frames, grid", [(None, 17, (5, 6, 10)), (2, 21, (3, 6, 10))], ids=["1.0", "1.5"])
def test_pipeline_dense_matches_stock_and_remove_restores(patch_size_t, frames, grid):
    layout = check_pipeline_dense_and_remove(pipeline(patch_size_t), CALL | embeddings() | dict(num_frames=frames))
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(*grid), fastdit.TextSegment(TEXT, "before"))


@pytest.mark.parametrize("method", [
    fastdit.Radial(decay=0.3, block_size=64),
    fastdit.GNA(window=(3, 3, 5), block_size=64),
], ids=["radial", "gna"])
def test_static_methods_equal_masked_reference(rng, method):
    model = tiny_transformer()
    kwargs = inputs(rng, model)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(TEXT, "before"))
    token_mask = kernel_token_mask(method, layout)
    assert not token_mask.all()
    stock = run(model, kwargs)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    handle.remove()
    reference = TokenMaskedSDPA(prefix_masks(token_mask, layout.num_tokens))
    with reference:
        expected = run(model, kwargs)
    assert reference.masked_calls == 2
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
