"""fastdit on HunyuanVideo 1.5: a tiny in-process pipeline and transformer with random weights.

The joint sequence is ``[video | image + byT5 + text]`` with a query-and-key mask; every comparison
covers the whole output (padded rows included, which stock sets to zero).
"""

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
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)

GRID = (5, 6, 10)  # 300 video tokens: not a multiple of 64


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=12, text_embed_2_dim=10, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6), target_size=64,
    ).eval()


def tiny_pipeline():
    from diffusers.guiders import ClassifierFreeGuidance

    with torch.random.fork_rng(devices=[]):
        transformer = tiny_transformer()
        vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.vision_num_semantic_tokens = 5  # 729 SigLIP tokens at full size
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = lambda valid, length: (torch.arange(length) < valid).long()[None]  # noqa: E731
    return dict(
        prompt_embeds=torch.randn(1, 7, 12, generator=g), prompt_embeds_mask=mask(5, 7),
        prompt_embeds_2=torch.randn(1, 4, 10, generator=g), prompt_embeds_mask_2=mask(3, 4),
        negative_prompt_embeds=torch.randn(1, 7, 12, generator=g), negative_prompt_embeds_mask=mask(2, 7),
        negative_prompt_embeds_2=torch.randn(1, 4, 10, generator=g), negative_prompt_embeds_mask_2=mask(1, 4),
    )


# 17 frames of 96 x 160 px -> latent 5 x 6 x 10 (VAE 4x16x16, patch 1): 300 video tokens, + 5 + 4 + 7.
CALL = dict(height=96, width=160, num_frames=17, num_inference_steps=2, output_type="latent")


def inputs(rng, batch=2):
    # I2V-style inputs (image tokens valid), batch 2 with different valid counts and a mask with a
    # hole (the transformer moves valid tokens first; the processor must follow whatever it gets).
    text_mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]])[:batch]
    byt5_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])[:batch]
    return dict(
        hidden_states=torch.randn(batch, 9, *GRID, generator=rng),
        timestep=torch.tensor([700.0] * batch),
        encoder_hidden_states=torch.randn(batch, 7, 12, generator=rng),
        encoder_attention_mask=text_mask,
        encoder_hidden_states_2=torch.randn(batch, 4, 10, generator=rng),
        encoder_attention_mask_2=byt5_mask,
        image_embeds=torch.randn(batch, 3, 8, generator=rng),
        return_dict=False,
    )


def test_pipeline_dense_matches_stock_and_remove_restores():
    pipe = tiny_pipeline()
    layout = check_pipeline_dense_and_remove(pipe, CALL | embeddings())
    assert layout == fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(5 + 4 + 7, "after"))


@pytest.mark.parametrize("method", [
    fastdit.Radial(decay=0.3, block_size=64),
    fastdit.GNA(window=(3, 3, 5), block_size=64),
], ids=["radial", "gna"])
def test_static_methods_equal_masked_reference(rng, method):
    model = tiny_transformer()
    kwargs = inputs(rng)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(14, "after"))
    token_mask = kernel_token_mask(method, layout)
    assert not token_mask.all(), "the rule must be sparse for this test to mean anything"
    stock = run(model, kwargs)
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    handle.remove()
    reference = TokenMaskedSDPA(prefix_masks(token_mask, layout.grid.num_tokens))
    with reference:
        expected = run(model, kwargs)
    assert reference.masked_calls == 2  # both joint layers; the token refiner is left alone
    assert (out - expected).abs().max() <= 1e-4
    assert (out - stock).abs().max() > 1e-3


def test_padded_rows_are_zero_as_stock(rng):
    # Dense on the transformer with a one-token prompt: the padded rows of every layer match stock.
    model = tiny_transformer()
    kwargs = inputs(rng)
    stock_states, fastdit_states = [], []
    hook = model.transformer_blocks[1].register_forward_hook(lambda m, a, o: stock_states.append(o[1]))
    stock = run(model, kwargs)
    hook.remove()
    handle = fastdit.apply(model, fastdit.Dense(block_size=128))
    hook = model.transformer_blocks[1].register_forward_hook(lambda m, a, o: fastdit_states.append(o[1]))
    out = run(model, kwargs)
    hook.remove()
    handle.remove()
    assert (out - stock).abs().max() <= 1e-4
    assert (fastdit_states[0] - stock_states[0]).abs().max() <= 1e-4  # text stream, padded rows too


def test_dynamic_methods_and_paro_repeat(tmp_path):
    pipe = tiny_pipeline()
    call = CALL | embeddings()
    methods = [
        fastdit.VMoBA(block_size=64, dense_steps=0),
        fastdit.AdaSpa(block_size=64, sparsity=0.5, search_steps=(0.0, 0.5)),
        fastdit.Agent(video_cell=(1, 2, 2), dense_last_steps=0),
        paro_method(pipe, embeddings(), call, tmp_path),
    ]
    check_methods_repeat(pipe, call, methods)


def test_size_rule_and_registration():
    from fastdit.pipelines import hunyuan_video15

    assert "HunyuanVideo15Transformer3DModel" in fastdit.supported_models()
    hunyuan_video15.check_sizes(None, 96, 160, 17)
    with pytest.raises(ValueError, match="4k\\+1"):
        hunyuan_video15.check_sizes(None, 96, 160, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        hunyuan_video15.check_sizes(None, 100, 160, 17)
