"""fastdit installed on diffusers' HunyuanVideo: outputs against stock and masked-reference processors.

The joint sequence is ``[video | text]`` with right-padded text; the stock model masks padded text
keys for every query row (padded text rows included), which fastdit reproduces with one valid key
length per batch element, so every comparison below covers the whole output.
"""

import pytest
import torch
import torch.nn.functional as F

import fastdit
from tests.integration_helpers import expand_blocks, run
from fastdit.pipelines.hunyuan_video import HunyuanVideoSparseAttnProcessor

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

TEXT = 9  # padded text length
GRID = (6, 6, 8)  # token grid of the default inputs
VIDEO = 6 * 6 * 8


def tiny_transformer(seed=0, num_layers=1, num_single_layers=1, image_condition_type=None):
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
        num_layers=num_layers, num_single_layers=num_single_layers, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=12, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), guidance_embeds=True, image_condition_type=image_condition_type,
    ).eval()


def inputs(rng, frames=6, height=12, width=16, valid=(9, 4)):
    # Latent 6x12x16 -> token grid 6x6x8 = 288 video tokens (+ 9 text): not a multiple of 64 or 128.
    # Batch 2 with different valid text lengths (the second prompt is padded).
    batch = len(valid)
    mask = (torch.arange(TEXT)[None, :] < torch.tensor(valid)[:, None]).long()
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=rng),
        timestep=torch.tensor([500.0] * batch),
        encoder_hidden_states=torch.randn(batch, TEXT, 12, generator=rng),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=rng),
        guidance=torch.tensor([6000.0] * batch),
        return_dict=False,
    )


def joint_names(model):
    """Processor names of the dual- and single-stream blocks' joint attention."""
    prefixes = ("transformer_blocks.", "single_transformer_blocks.")
    return {name for name in model.attn_processors if name.startswith(prefixes)}


class MaskedJointAttention:
    """Test-only processor: HunyuanVideo's joint attention through torch SDPA with a token mask.

    ``token_mask`` ``[S, S]`` over ``[video | text]`` is ANDed with the transformer's key-padding mask.
    """

    def __init__(self, token_mask: torch.Tensor) -> None:
        self.token_mask = token_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        text = encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        q = attn.norm_q(attn.to_q(x).unflatten(2, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(x).unflatten(2, (attn.heads, -1)))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        n = hidden_states.shape[1]
        q = torch.cat([apply_rotary_emb(q[:, :n], image_rotary_emb, sequence_dim=1), q[:, n:]], dim=1)
        k = torch.cat([apply_rotary_emb(k[:, :n], image_rotary_emb, sequence_dim=1), k[:, n:]], dim=1)
        if not single:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        mask = self.token_mask[None, None] & attention_mask  # [B, 1, S, S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), attn_mask=mask
        ).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        video, text_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video, text_out


def install_reference(model, token_mask):
    processor = MaskedJointAttention(token_mask)
    targets = joint_names(model)
    model.set_attn_processor(
        {name: processor if name in targets else p for name, p in model.attn_processors.items()}
    )


def test_stock_masks_padded_text_keys_only(rng):
    # The semantics fastdit reproduces: the stock mask is [B, 1, 1, S] (keys only), valid keys first.
    model = tiny_transformer()
    kwargs = inputs(rng)
    seen = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kw: seen.append(kw["attention_mask"]), with_kwargs=True
    )
    run(model, kwargs)
    (mask,) = seen
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, VIDEO + TEXT)
    lengths = torch.tensor([VIDEO + 9, VIDEO + 4])
    assert torch.equal(mask[:, 0, 0], torch.arange(VIDEO + TEXT)[None] < lengths[:, None])


@pytest.mark.parametrize("image_condition_type", [None, "token_replace"])  # T2V, I2V blocks
def test_dense_matches_stock_and_remove_restores_exactly(rng, image_condition_type):
    model = tiny_transformer(image_condition_type=image_condition_type)
    kwargs = inputs(rng)
    stock_processors = dict(model.attn_processors)
    stock = run(model, kwargs)
    handle = fastdit.apply(model, fastdit.Dense(block_size=64))
    out = run(model, kwargs)
    assert handle.state.layout == fastdit.SequenceLayout(
        fastdit.LatentGrid(*GRID), fastdit.TextSegment(TEXT, "after")
    )
    assert sorted(handle.state.densities) == [(0, 0), (1, 0)]  # dual-stream layer 0, single-stream layer 1
    assert (out - stock).abs().max() <= 1e-4
    handle.remove()
    assert torch.equal(run(model, kwargs), stock)
    assert all(model.attn_processors[name] is p for name, p in stock_processors.items())
    assert not hasattr(model, "_diffusers_hook")


def test_radial_equals_masked_reference(rng):
    model = tiny_transformer()
    kwargs = inputs(rng)
    method = fastdit.Radial(decay=0.3, block_size=64)
    layout = fastdit.SequenceLayout(fastdit.LatentGrid(*GRID), fastdit.TextSegment(TEXT, "after"))
    block_map = method.block_map(layout)
    assert not block_map.all(), "the plan must be sparse for this test to mean anything"
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert all(d < 1.0 for d in handle.state.densities.values())
    handle.remove()
    install_reference(model, expand_blocks(block_map, 64, layout.num_tokens))
    ref = run(model, kwargs)
    assert (out - ref).abs().max() <= 1e-4
    # And it is not the dense answer.
    model.set_attn_processor(dict(tiny_transformer().attn_processors))
    assert (out - run(model, kwargs)).abs().max() > 1e-3


def test_gna_permuted_per_call_equals_natten_definition(rng):
    # Blocked (Swin-like) GNA on a 2x8x16 grid with 64-token tiles is perfectly block-sparse, and
    # the video (256 tokens) ends on a block boundary, so the text blocks hold text only: the plan
    # computes exactly the token mask over the video, with text rows and columns dense.
    model = tiny_transformer()
    kwargs = inputs(rng, frames=2, height=16, width=32)
    grid = fastdit.LatentGrid(2, 8, 16)
    method = fastdit.GNA(window=(2, 4, 8), stride=(2, 4, 8), tile=(2, 4, 8), block_size=64)
    assert method.check(grid).perfectly_block_sparse
    assert not method.token_mask(grid).all()
    handle = fastdit.apply(model, method)
    out = run(model, kwargs)
    assert handle.state.active_plan.permutation is not None
    handle.remove()
    token_mask = torch.ones(grid.num_tokens + TEXT, grid.num_tokens + TEXT, dtype=torch.bool)
    token_mask[: grid.num_tokens, : grid.num_tokens] = method.token_mask(grid)
    install_reference(model, token_mask)
    assert (out - run(model, kwargs)).abs().max() <= 1e-4


def test_single_processor_everywhere_keeps_refiner_stock(rng):
    model = tiny_transformer()
    kwargs = inputs(rng)
    refined = []
    model.context_embedder.register_forward_hook(lambda module, args, output: refined.append(output))
    stock = run(model, kwargs)
    processor = HunyuanVideoSparseAttnProcessor(fastdit.Dense(block_size=64))
    model.set_attn_processor(processor)  # one instance on the joint blocks and the token refiner
    assert model.context_embedder.token_refiner.refiner_blocks[0].attn.processor is processor
    with pytest.raises(RuntimeError, match="fastdit.attach"):
        run(model, kwargs)
    handle = fastdit.attach(model)
    out = run(model, kwargs)
    assert torch.equal(refined[-1], refined[0]), "the token refiner must stay bit-exactly stock"
    assert (out - stock).abs().max() <= 1e-4
    assert sorted(handle.state.densities) == [(0, 0), (1, 0)]
    handle.remove()
    assert processor.state is None and not hasattr(model, "_diffusers_hook")
    # The stock processors back: stock output bit for bit.
    model.set_attn_processor(dict(tiny_transformer().attn_processors))
    assert torch.equal(run(model, kwargs), stock)


def test_apply_leaves_refiner_processor_and_dense_layers_stock(rng):
    model = tiny_transformer(num_layers=2, num_single_layers=1)
    kwargs = inputs(rng)
    stock = run(model, kwargs)
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    # Every layer dense through the schedule: each call is the stock processor, bit for bit.
    method = fastdit.Radial(decay=0.3, block_size=64)
    handle = fastdit.apply(model, method, schedule=fastdit.Schedule(dense_layers=3))
    assert model.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
    assert isinstance(model.single_transformer_blocks[0].attn.processor, HunyuanVideoSparseAttnProcessor)
    assert torch.equal(run(model, kwargs), stock)
    assert handle.state.densities == {(0, 0): 1.0, (1, 0): 1.0, (2, 0): 1.0}
    assert set(handle.state.num_layers.values()) == {3}
    handle.remove()
    # Dense layers 0-1 (dual-stream), sparse layer 2 (single-stream): layers counted across both.
    handle = fastdit.apply(model, method, schedule=fastdit.Schedule(dense_layers=2))
    out = run(model, kwargs)
    densities = handle.state.densities
    assert densities[(0, 0)] == densities[(1, 0)] == 1.0 and densities[(2, 0)] < 1.0
    assert (out - stock).abs().max() > 1e-3
    handle.remove()


def test_extreme_text_lengths_match_stock(rng):
    # A full prompt and a one-token one (most text keys padded). An all-padding prompt is not a
    # case: stock's token refiner divides by the valid count (NaN for every token of that sample).
    model = tiny_transformer()
    kwargs = inputs(rng, valid=(TEXT, 1))
    stock = run(model, kwargs)
    handle = fastdit.apply(model, fastdit.Dense(block_size=128))
    assert (run(model, kwargs) - stock).abs().max() <= 1e-4
    handle.remove()


def test_unsupported_model_lists_supported():
    assert "HunyuanVideoTransformer3DModel" in fastdit.supported_models()
    with pytest.raises(ValueError, match="HunyuanVideoTransformer3DModel"):
        fastdit.apply(torch.nn.Linear(2, 2), fastdit.Dense())
    model = tiny_transformer()
    handle = fastdit.apply(model, fastdit.Dense())
    with pytest.raises(RuntimeError, match="already installed"):
        fastdit.apply(model, fastdit.Dense())
    fastdit.remove(model)
    assert handle.removed


def test_processor_rejects_foreign_mask(rng):
    processor = HunyuanVideoSparseAttnProcessor(fastdit.Dense())
    with pytest.raises(ValueError, match="boolean key mask"):
        processor._valid_key_lengths(torch.zeros(2, 1, 5, 5), 2, 5)
    assert processor._valid_key_lengths(None, 2, 5) is None
