"""fastdit on Mochi: per-sample text (stock drops padded tokens sample by sample), tiny pipeline
and transformer with random weights, a model without diffusers' AttentionMixin."""

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
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel  # noqa: E402

GRID = (5, 6, 10)  # 300 video tokens
TEXT = 6


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=8,
        in_channels=4, text_embed_dim=16, time_embed_dim=16,
    ).eval()


def pipeline():
    # The VAE only decodes, and these runs stop at the latents.
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, TEXT, 16, generator=g), prompt_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
        negative_prompt_embeds=torch.randn(1, TEXT, 16, generator=g),
        negative_prompt_attention_mask=torch.tensor([[1, 1, 0, 0, 0, 0]]),
    )


# 25 frames of 96 x 160 px -> latent 5 x 12 x 20 (VAE 6x8x8) -> 5 x 6 x 10 tokens; CFG batched.
CALL = dict(height=96, width=160, num_frames=25, num_inference_steps=2, guidance_scale=4.5, output_type="latent")


def inputs(rng):
    # Batch 2: a mask with holes (stock compacts the valid tokens) and a one-token prompt.
    return dict(
        hidden_states=torch.randn(2, 4, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=rng),
        encoder_hidden_states=torch.randn(2, TEXT, 16, generator=rng), timestep=torch.tensor([600, 600]),
        encoder_attention_mask=torch.tensor([[1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]]), return_dict=False,
    )


def test_pipeline_dense_matches_stock_and_remove_restores():
    layout = check_pipeline_dense_and_remove(pipeline(), CALL | embeddings())
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(TEXT, "after"))


@pytest.mark.parametrize("method", [
    fastdit.Dense(block_size=64),
    fastdit.Radial(decay=0.3, block_size=64),
    fastdit.GNA(window=(3, 3, 5), block_size=64),
], ids=["dense", "radial", "gna"])
def test_methods_equal_masked_reference_per_sample_text(rng, method):
    model = tiny_transformer()
    kwargs = inputs(rng)
    stock = run(model, kwargs)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    handle.remove()
    if isinstance(method, fastdit.Dense):
        assert (out - stock).abs().max() <= 1e-4
        return
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(TEXT, "after"))
    token_mask = kernel_token_mask(method, layout)
    assert not token_mask.all()
    reference = TokenMaskedSDPA(prefix_masks(token_mask, layout.grid.num_tokens))
    with reference:
        expected = run(model, kwargs)
    assert reference.masked_calls == 4  # 2 layers x 2 samples (stock loops over the batch)
    assert (out - expected).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


def test_text_stream_matches_stock_rows(rng):
    # The text output of a block (valid outputs first, then zeros) is stock's, padded rows included.
    model = tiny_transformer()
    kwargs = inputs(rng)
    seen = []
    hook = model.transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.append(o[1]))
    run(model, kwargs)
    handle = fastdit.apply(model, fastdit.Dense(block_size=128))
    run(model, kwargs)
    handle.remove()
    hook.remove()
    assert (seen[0] - seen[1]).abs().max() <= 1e-4


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


def test_attach_sets_processor_attributes(rng):
    from fastdit.pipelines.mochi import MochiSparseAttnProcessor, set_attn_processor

    model = tiny_transformer()
    kwargs = inputs(rng)
    stock = run(model, kwargs)
    processor = MochiSparseAttnProcessor(fastdit.Dense(block_size=64))
    set_attn_processor(model, processor)
    with pytest.raises(RuntimeError, match="fastdit.attach"):
        run(model, kwargs)
    handle = fastdit.attach(model)
    assert (run(model, kwargs) - stock).abs().max() <= 1e-4
    handle.remove()
    assert processor.state is None
