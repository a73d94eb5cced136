"""fastdit on the image families: Flux.1 (dual- and single-stream blocks, text before the image)
and QwenImage (padded text in the middle of the sequence, reference-image tokens of the edit
pipelines). Tiny in-process pipelines and transformers with random weights."""

import pytest
import torch

import fastdit
from tests.pipelines.family_helpers import (
    TokenMaskedSDPA,
    check_methods_repeat,
    check_pipeline_dense_and_remove,
    paro_method,
    reference_backend,  # noqa: F401 (autouse fixture)
)
from tests.integration_helpers import run

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

GRID = (1, 10, 16)  # 160 image tokens: not a multiple of 64
GNA = fastdit.GNA(window=(1, 5, 7), block_size=64)
TEXT = 6


def video_mask_at(offset: int, grid, method=GNA):
    """``mask_for``: the method's token rule on the image tokens at ``offset``, everything else dense."""
    grid = fastdit.LatentGrid(*grid)
    rule = method.token_mask(grid)
    image = slice(offset, offset + grid.num_tokens)

    def mask_for(seq_q, seq_kv):
        if seq_q != seq_kv or seq_q < offset + grid.num_tokens:
            return None
        mask = torch.ones(seq_q, seq_q, dtype=torch.bool)
        mask[image, image] = rule
        return mask

    return mask_for


def check_gna_against_reference(model, kwargs, mask_for, calls):
    assert not GNA.token_mask(fastdit.LatentGrid(*GRID)).all()
    stock = run(model, kwargs)
    handle = fastdit.apply(model, GNA)
    out = run(model, kwargs)
    handle.remove()
    reference = TokenMaskedSDPA(mask_for)
    with reference:
        expected = run(model, kwargs)
    assert reference.masked_calls == calls
    assert (out - expected).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


def dynamic_methods():
    return [
        fastdit.VMoBA(block_size=64, dense_steps=0),
        fastdit.AdaSpa(block_size=64, sparsity=0.5, search_steps=(0.0, 0.5)),
        fastdit.Agent(cell=(2, 2), dense_last_steps=0),
    ]


# ---------------------------------------------------------------------------- Flux
def flux_transformer(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_pipeline():
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, TEXT, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        negative_prompt_embeds=torch.randn(1, TEXT, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
    )


# 256 x 384 px -> latent 32 x 48 -> packed 2x2: 16 x 24 tokens; true CFG (negative prompt, 2 passes).
IMAGE_CALL = dict(height=256, width=384, num_inference_steps=2, true_cfg_scale=4.0, output_type="latent")


def flux_inputs(rng):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as Pipe

    return dict(
        hidden_states=torch.randn(1, 160, 16, generator=rng), encoder_hidden_states=torch.randn(1, TEXT, 32, generator=rng),
        pooled_projections=torch.randn(1, 8, generator=rng), timestep=torch.tensor([0.7]),
        img_ids=Pipe._prepare_latent_image_ids(1, GRID[1], GRID[2], "cpu", torch.float32),
        txt_ids=torch.zeros(TEXT, 3), return_dict=False,
    )


def test_flux_pipeline_dense_matches_stock_and_remove_restores():
    layout = check_pipeline_dense_and_remove(flux_pipeline(), IMAGE_CALL | dict(guidance_scale=3.5) | flux_embeddings())
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(1, 16, 24), fastdit.TextSegment(TEXT, "before"))


def test_flux_gna_equals_masked_reference(rng):
    # One dual-stream and one single-stream block: both joint attentions over [text | image].
    check_gna_against_reference(flux_transformer(), flux_inputs(rng), video_mask_at(TEXT, GRID), calls=2)


def test_flux_dynamic_methods_and_paro_repeat(tmp_path):
    pipe = flux_pipeline()
    call = IMAGE_CALL | dict(guidance_scale=3.5) | flux_embeddings()
    check_methods_repeat(pipe, call, dynamic_methods() + [paro_method(pipe, flux_embeddings(), call, tmp_path)])


def test_flux_refusals(rng):
    from fastdit.pipelines.flux import grid_from_ids

    model = flux_transformer()
    with pytest.raises(ValueError, match="Radial does not apply to FluxTransformer2DModel"):
        fastdit.apply(model, fastdit.Radial())
    assert not hasattr(model, "_diffusers_hook")  # refused before anything was installed
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    saved = model.transformer_blocks[0].attn.processor
    model.transformer_blocks[0].attn.set_processor(FluxIPAdapterAttnProcessor(32, 8))
    with pytest.raises(ValueError, match="IP-Adapter"):
        fastdit.apply(model, fastdit.Dense())
    model.transformer_blocks[0].attn.set_processor(saved)
    ids = flux_inputs(rng)["img_ids"]
    kontext = torch.cat([ids, ids + torch.tensor([1.0, 0.0, 0.0])])  # a reference image's tokens
    with pytest.raises(ValueError, match="Kontext"):
        grid_from_ids(kontext)


# ---------------------------------------------------------------------------- QwenImage
def qwen_transformer(seed=0):
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()


def qwen_pipeline():
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=qwen_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, TEXT, 16, generator=g), prompt_embeds_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
        negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g),
        negative_prompt_embeds_mask=torch.tensor([[1, 1, 0, 0, 0, 0]]),
    )


def qwen_inputs(rng, references=0):
    # Batch 2, padded text in the middle of [text | image], one mask with a hole.
    tokens = 160 * (1 + references)
    return dict(
        hidden_states=torch.randn(2, tokens, 16, generator=rng), encoder_hidden_states=torch.randn(2, TEXT, 16, generator=rng),
        encoder_hidden_states_mask=torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]]),
        timestep=torch.tensor([0.7, 0.7]), img_shapes=[[GRID] * (1 + references)] * 2, return_dict=False,
    )


def test_qwenimage_pipeline_dense_matches_stock_and_remove_restores():
    layout = check_pipeline_dense_and_remove(qwen_pipeline(), IMAGE_CALL | qwen_embeddings())
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(1, 16, 24), fastdit.TextSegment(TEXT, "after"))


@pytest.mark.parametrize("references", [0, 1], ids=["t2i", "edit"])
def test_qwenimage_gna_equals_masked_reference(rng, references):
    # The reference works in stock's [text | image | references] order: GNA on the image tokens.
    check_gna_against_reference(qwen_transformer(), qwen_inputs(rng, references), video_mask_at(TEXT, GRID), calls=2)


def test_qwenimage_dense_with_middle_padding_matches_stock(rng):
    # The whole output and the text stream (padded rows included: they attend to the valid keys).
    model = qwen_transformer()
    kwargs = qwen_inputs(rng, references=1)
    text_streams = []
    hook = model.transformer_blocks[0].register_forward_hook(lambda m, a, o: text_streams.append(o[0]))
    stock = run(model, kwargs)
    handle = fastdit.apply(model, fastdit.Dense(block_size=64))
    out = run(model, kwargs)
    assert handle.state.layout.text == fastdit.TextSegment(160 + TEXT, "after")
    handle.remove()
    hook.remove()
    assert (out - stock).abs().max() <= 1e-4
    assert (text_streams[1] - text_streams[0]).abs().max() <= 1e-4


def test_qwenimage_dynamic_methods_and_paro_repeat(tmp_path):
    pipe = qwen_pipeline()
    call = IMAGE_CALL | qwen_embeddings()
    check_methods_repeat(pipe, call, dynamic_methods() + [paro_method(pipe, qwen_embeddings(), call, tmp_path)])
    with pytest.raises(ValueError, match="Radial does not apply to QwenImageTransformer2DModel"):
        fastdit.apply(pipe, fastdit.Radial())
