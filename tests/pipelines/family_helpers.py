"""Shared by the model-family integration tests (test_family_*.py).

* :class:`TokenMaskedSDPA`: the masked reference. Inside ``with TokenMaskedSDPA(mask_for):`` every
  ``F.scaled_dot_product_attention`` call (diffusers' stock processors call it directly or through
  ``dispatch_attention_fn``) whose sequence ``mask_for`` recognises also gets that token mask
  (ANDed with the model's own mask) and runs in float64. Stock processors plus this mode are the
  method's token rule on the stock model, independent of fastdit's adapters.
* :func:`kernel_token_mask`: Radial's and GNA's token rules over a layout's sequence (video
  frame-major, other tokens where the layout puts them, dense).
* :func:`check_pipeline_dense_and_remove`, :func:`check_methods_repeat`: the pipeline-level checks
  every family runs (Dense equals stock with CFG; ``remove`` restores stock bit for bit; each
  dynamic method runs two generations of one seed identically).

The fastdit runs use the PyTorch reference backend (``TRITON_INTERPRET=0``): the kernels are tested
elsewhere, here the adapters are the point and the interpreter would make these tests slow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fastdit
from tests.integration_helpers import expand_blocks

SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class TokenMaskedSDPA(TorchFunctionMode):
    """Adds ``mask_for(S_q, S_kv)`` (a bool ``[S_q, S_kv]`` mask, or ``None`` to leave the call as
    it is) to every SDPA call inside the block; counts the calls it masked in ``masked_calls``."""

    def __init__(self, mask_for) -> None:
        super().__init__()
        self.mask_for = mask_for
        self.masked_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        kwargs.update(zip(SDPA_PARAMETERS, args))
        query, key, value = kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value")
        token_mask = self.mask_for(query.shape[-2], key.shape[-2])
        if token_mask is None:
            return func(query, key, value, **kwargs)
        self.masked_calls += 1
        mask = kwargs.pop("attn_mask", None)
        token_mask = token_mask.to(query.device)
        if mask is None:
            mask = token_mask
        elif mask.dtype == torch.bool:
            mask = mask & token_mask
        else:
            mask = mask.double().masked_fill(~token_mask, float("-inf"))
        out = func(query.double(), key.double(), value.double(), attn_mask=mask, **kwargs)
        return out.to(query.dtype)


def kernel_token_mask(method, layout: fastdit.SequenceLayout) -> torch.Tensor:
    """Bool ``[S, S]`` over ``layout``'s sequence: Radial's computed blocks (its plan keeps whole
    blocks) or GNA's exact window over the video; rows and columns of other tokens all True."""
    seq = layout.num_tokens
    if isinstance(method, fastdit.Radial):
        return expand_blocks(method.block_map(layout), method.block_size, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool)
    video = layout.video_slice
    mask[video, video] = method.token_mask(layout.grid)
    return mask


def prefix_masks(full: torch.Tensor, num_video: int):
    """``mask_for`` of models whose stock sequence is a prefix of the kernel's (``[video | valid
    text]``, Mochi) or equals it: any square call at least ``num_video`` long."""

    def mask_for(seq_q: int, seq_kv: int):
        if seq_q != seq_kv or not num_video <= seq_q <= full.shape[0]:
            return None
        return full[:seq_q, :seq_q]

    return mask_for


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """Imported by every family test module (autouse there): fastdit's kernels on the PyTorch
    reference path (no Triton interpreter), and one intra-op thread: these models are tiny, and
    on a busy 2-core machine OpenMP's spinning threads make each small op ~50x slower."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(pipe, kwargs: dict, seed: int = 1) -> torch.Tensor:
    """One pipeline call with a fresh generator; the output latents or frames as a tensor."""
    with torch.no_grad():
        output = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    result = getattr(output, "frames", None)
    if result is None:
        result = output.images
    return torch.as_tensor(result)


def check_pipeline_dense_and_remove(pipe, kwargs: dict, block_size: int = 64) -> fastdit.SequenceLayout:
    """Dense equals the stock processors within 1e-4 over a whole CFG pipeline run, and
    ``remove`` restores the stock output and processor objects bit for bit. Returns the layout."""
    models = [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]
    from fastdit.pipelines import adapter_for

    def _processors(model):
        return adapter_for(model).attn_processors(model)

    stock_processors = [_processors(model) for model in models]
    stock = generate(pipe, kwargs)
    # The stock run may create a hook registry (guiders, cache contexts): remove must leave it so.
    registries = [getattr(model, "_diffusers_hook", None) for model in models]
    handle = fastdit.apply(pipe, fastdit.Dense(block_size=block_size))
    out = generate(pipe, kwargs)
    layout = handle.state.layout
    assert handle.state.densities, "fastdit's processors never ran"
    handle.remove()
    assert torch.isfinite(out).all()
    assert (out - stock).abs().max() <= 1e-4
    assert torch.equal(generate(pipe, kwargs), stock)
    for model, saved, registry in zip(models, stock_processors, registries):
        assert all(_processors(model)[name] is p for name, p in saved.items())
        assert getattr(model, "_diffusers_hook", None) is registry
        assert registry is None or "fastdit" not in registry.hooks
    return layout


def check_methods_repeat(pipe, kwargs: dict, methods) -> dict:
    """Each method runs two generations of one seed identically (no state leaks between them) and
    at least one of its calls is sparse; returns ``{name: output}``."""
    outputs = {}
    for method in methods:
        handle = fastdit.apply(pipe, method)
        try:
            first = generate(pipe, kwargs)
            densities = handle.state.densities
            second = generate(pipe, kwargs)
        finally:
            handle.remove()
        name = type(method).__name__
        assert torch.isfinite(first).all(), name
        assert torch.equal(first, second), f"{name}: two generations of one seed differ"
        assert min(densities.values()) < 1.0, f"{name} never ran sparse: {densities}"
        outputs[name] = first
    return outputs


class PromptEmbeddingsPipe:
    """What :func:`fastdit.calibrate` needs from a pipeline built without text encoders: a callable
    taking ``prompt=`` (mapped to fixed embeddings) with the pipeline's transformer and scheduler."""

    def __init__(self, pipe, embeddings: dict) -> None:
        self.pipe, self.embeddings = pipe, embeddings
        self.transformer, self.scheduler = pipe.transformer, pipe.scheduler

    def __call__(self, prompt=None, **kwargs):
        return self.pipe(prompt=None, **self.embeddings, **kwargs)


def paro_method(pipe, embeddings: dict, call_kwargs: dict, tmp_path, density: float = 0.5):
    """A PARO method calibrated on ``pipe`` (2 buckets) with ``call_kwargs`` minus the embeddings."""
    settings = {k: v for k, v in call_kwargs.items() if k not in embeddings and k not in ("output_type", "prompt")}
    steps = settings.pop("num_inference_steps")
    plan = fastdit.calibrate(
        PromptEmbeddingsPipe(pipe, embeddings), ["p"], steps, density=density, num_buckets=min(2, steps),
        block_size=64, output=tmp_path / "paro.safetensors", **settings,
    )
    assert math.isclose(plan.masks.float().mean().item(), plan.density)
    return fastdit.PARO(plan=str(tmp_path / "paro.safetensors"), quantize=None)
