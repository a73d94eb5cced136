"""fastdit composed with diffusers' step caches and the quantized kernel (fastdit.compose).

The pipeline tests run the tiny Wan pipeline on the kernels' PyTorch reference
(TRITON_INTERPRET=0: plumbing, not kernels) with ``output_type="latent"`` (no VAE decode).
"""

import dataclasses

import pytest
import torch

import fastdit
from fastdit import compose
from fastdit.methods import adaspa as adaspa_module
from fastdit.methods import vmoba as vmoba_module
from fastdit.methods import base as processor_base  # the default Method.attend calls the kernel

diffusers_hooks = pytest.importorskip("diffusers.hooks")
tiny = pytest.importorskip("fastdit.testing.tiny")

# 9 frames of 64 x 128 px -> 3 x 4 x 8 = 96 tokens: two 64-token blocks (AdaSpa can skip one).
SETTINGS = dict(prompt="a cat", height=64, width=128, num_frames=9, num_inference_steps=6,
                guidance_scale=5.0, output_type="latent")
# TaylorSeer's fixed interval: steps 0 and 1 computed (warm-up), then every other one from step 3:
# computed {0, 1, 3, 5}, skipped {2, 4} (blocks return zeros, proj_out is extrapolated).
TAYLORSEER_SKIPS_2_AND_4 = dict(cache_interval=2, disable_cache_before_step=2, use_lite_mode=True)


@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_wan_pipeline(seed=0)


def generate(pipe, seed=1):
    with torch.no_grad():
        return pipe(**SETTINGS, generator=torch.Generator().manual_seed(seed)).frames


def record_steps(handle) -> list:
    """The step index fastdit's state holds after each transformer forward's hook."""
    seen = []
    begin = handle.state.begin_forward

    def wrapped(*args):
        begin(*args)
        seen.append(handle.state.step)

    handle.state.begin_forward = wrapped
    return seen


def all_hooks(model) -> dict:
    """Module name -> hook names of every diffusers registry under ``model``."""
    return {name: list(module._diffusers_hook._hook_order) for name, module in model.named_modules()
            if hasattr(module, "_diffusers_hook") and module._diffusers_hook._hook_order}


# --------------------------------------------------------------------------- cache specs
def test_cache_specs_parse_build_and_fail_clearly():
    name, options = compose.parse_cache_spec("fbc:threshold=0.1")
    assert (name, options) == ("fbc", {"threshold": 0.1})
    config = compose.build_cache_config(name, options)
    assert isinstance(config, diffusers_hooks.FirstBlockCacheConfig) and config.threshold == 0.1
    assert compose.describe_cache(config) == "fbc(threshold=0.1)"
    # A comma item without '=' continues the previous value as a tuple; class names work too.
    name, options = compose.parse_cache_spec(
        "PyramidAttentionBroadcastConfig:spatial_attention_block_skip_range=2,"
        "spatial_attention_timestep_skip_range=100,800")
    config = compose.build_cache_config(name, options)
    assert name == "pab" and config.spatial_attention_timestep_skip_range == (100, 800)
    assert config.current_timestep_callback is None  # set at install time from the pipeline
    config = compose.build_cache_config(*compose.parse_cache_spec(
        "taylorseer:cache_interval=3,taylor_factors_dtype=float32,cache_identifiers=blocks\\.\\d+"))
    assert config.taylor_factors_dtype == torch.float32
    assert config.cache_identifiers == ["blocks\\.\\d+"]
    config = compose.build_cache_config("magcache", {"mag_ratios": (1, 0.99, 0.98)},
                                        num_inference_steps=6)
    assert config.num_inference_steps == 6 and len(config.mag_ratios) == 6  # interpolated
    assert compose.build_cache_config("fbc") == diffusers_hooks.FirstBlockCacheConfig()

    for spec, message in (
        ("teacache", "unknown cache 'teacache'; valid caches: fbc, taylorseer"),
        ("fbc:thresh=0.1", "unknown option 'thresh' for cache fbc .*valid options: threshold"),
        ("fbc:threshold=high", "option threshold must be a number, got threshold='high'"),
        ("taylorseer:cache_interval=2.5", "option cache_interval must be an int"),
        ("taylorseer:use_lite_mode=1", "option use_lite_mode must be true or false"),
        ("taylorseer:taylor_factors_dtype=int8", "taylor_factors_dtype must be one of float32"),
        ("pab:spatial_attention_timestep_skip_range=100", "must be 2 comma-separated values"),
        ("pab:current_timestep_callback=x", "unknown option 'current_timestep_callback'"),
        ("magcache:threshold=0.1", "magcache needs mag_ratios=.* or calibrate=true"),
        ("fbc:threshold=0.1,threshold=0.2", "option 'threshold' is given more than once"),
        ("fbc:0.1", "expected key=value after 'fbc:'"),
        (":threshold=0.1", "--cache expects NAME"),
    ):
        with pytest.raises(ValueError, match=message):
            compose.build_cache_config(*compose.parse_cache_spec(spec))
    with pytest.raises(ValueError, match="cache must be one of diffusers'"):
        compose.cache_name(object())


# --------------------------------------------------------------------------- install / remove
def test_cache_installs_after_fastdit_and_is_removed_first(pipe):
    transformer = pipe.transformer
    processors = dict(transformer.attn_processors)
    before = all_hooks(transformer)
    config = diffusers_hooks.FasterCacheConfig(is_guidance_distilled=True)
    handle = fastdit.apply(pipe, fastdit.Radial(), cache=config)
    # The cache's transformer-level hook wraps fastdit's: fastdit's sees what the blocks see.
    assert transformer._diffusers_hook._hook_order == ["fastdit", "faster_cache_denoiser"]
    assert transformer.is_cache_enabled
    # A copy was installed, with the pipeline's timestep; the caller's config is untouched.
    assert config.current_timestep_callback is None and config.attention_weight_callback is None
    installed = transformer._cache_config
    assert installed is not config
    pipe._current_timestep = torch.tensor(981.0)  # what the denoising loop sets
    assert installed.current_timestep_callback() is pipe._current_timestep
    del pipe._current_timestep
    handle.remove()
    assert not transformer.is_cache_enabled
    assert all_hooks(transformer) == before
    assert all(transformer.attn_processors[name] is p for name, p in processors.items())


def test_cache_errors_roll_back_everything(pipe):
    transformer = pipe.transformer
    processors = dict(transformer.attn_processors)
    user_cache = diffusers_hooks.FirstBlockCacheConfig(threshold=0.2)
    transformer.enable_cache(user_cache)
    try:
        with pytest.raises(ValueError, match="already has a cache enabled"):
            fastdit.apply(pipe, fastdit.Radial(), cache=diffusers_hooks.FirstBlockCacheConfig())
        assert transformer._cache_config is user_cache  # the user's cache stays
        assert "fastdit" not in transformer._diffusers_hook.hooks
        assert all(transformer.attn_processors[name] is p for name, p in processors.items())
    finally:
        transformer.disable_cache()
    # PAB needs the loop's timestep: a bare model has none to offer.
    with pytest.raises(ValueError, match="needs current_timestep_callback"):
        fastdit.apply(transformer, fastdit.Radial(),
                      cache=diffusers_hooks.PyramidAttentionBroadcastConfig())
    assert not transformer.is_cache_enabled and "fastdit" not in transformer._diffusers_hook.hooks
    with pytest.raises(ValueError, match="cache must be one of diffusers'"):
        fastdit.apply(pipe, fastdit.Radial(), cache={"threshold": 0.1})
    # diffusers' default TaylorSeer patterns match no Wan module: an error, not a silent no-op.
    with pytest.raises(ValueError, match="TaylorSeerCacheConfig hooked no module"):
        fastdit.apply(pipe, fastdit.Radial(), cache=diffusers_hooks.TaylorSeerCacheConfig())
    assert not transformer.is_cache_enabled and "fastdit" not in transformer._diffusers_hook.hooks
    sd = tiny.build_tiny_sd_pipeline(seed=0)
    with pytest.raises(ValueError, match="UNet2DConditionModel has no enable_cache"):
        fastdit.apply(sd, fastdit.Dense(), cache=diffusers_hooks.FirstBlockCacheConfig())
    assert not hasattr(sd.unet, "_diffusers_hook") or not sd.unet._diffusers_hook.hooks


# --------------------------------------------------------------------------- step counting
def test_adaspa_searches_a_cache_skipped_at_the_next_computed_step(pipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    masses = []
    mass = adaspa_module.block_mass

    def counted_mass(q, k, lse, plan, **kwargs):
        masses.append(lse)
        return mass(q, k, lse, plan, **kwargs)

    monkeypatch.setattr(adaspa_module, "block_mass", counted_mass)
    method = fastdit.AdaSpa(sparsity=0.5, search_steps=(2, 4), reference_steps=None)
    cache = diffusers_hooks.TaylorSeerCacheConfig(**TAYLORSEER_SKIPS_2_AND_4)
    handle = fastdit.apply(pipe, method, cache=cache)
    steps = record_steps(handle)
    try:
        generate(pipe)
        runtime = handle.state.runtime
        records = runtime.records
    finally:
        handle.remove()
    # fastdit's hook runs on every forward, skipped steps included: the pipeline's step index.
    assert steps == [s for s in range(6) for _ in ("cond", "uncond")]
    layers = range(len(pipe.transformer.blocks))
    # Search step 2 was skipped: dense + LSE at step 3; search step 4 skipped: one mass pass with
    # step 3's LSE at step 5 (without the deferral, step 3's masks would serve to the end).
    expected = [(step, due, kind, False, context, layer)
                for step, due, kind in ((3, 2, "dense-lse"), (5, 4, "cached-lse"))
                for context in ("cond", "uncond") for layer in layers]
    assert [(r["step"], r["due_step"], r["kind"], r["scheduled"], r["context"], r["layer"])
            for r in records] == expected
    per_step = len(expected) // 2
    assert len(masses) == 2 * per_step
    assert all(a is b for a, b in zip(masses[:per_step], masses[per_step:]))  # the cached LSE
    densities = handle.state.densities
    assert sorted({step for _, step in densities}) == [0, 1, 3, 5]
    assert densities[(0, 1)] == 1.0 and densities[(0, 3)] == 1.0 and densities[(0, 5)] == 0.5

    # (Without a cache the searches run at steps 2 and 4: tests/test_adaspa.py.)

def test_dense_schedule_counts_pipeline_steps_when_steps_are_skipped(pipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel_steps = []
    attention = processor_base.block_sparse_attention
    handle = None

    def spy(q, k, v, plan, **kwargs):
        kernel_steps.append(handle.state.step)
        return attention(q, k, v, plan, **kwargs)

    monkeypatch.setattr(processor_base, "block_sparse_attention", spy)
    schedule = fastdit.Schedule(dense_steps=2, dense_last_steps=1)
    cache = diffusers_hooks.TaylorSeerCacheConfig(**TAYLORSEER_SKIPS_2_AND_4)
    handle = fastdit.apply(pipe, fastdit.Radial(), schedule, cache=cache)
    try:
        generate(pipe)
    finally:
        handle.remove()
    # Computed steps 0, 1, 3, 5 of 6: 0-1 dense (first two), 5 dense (last), 3 on the kernel.
    layers, contexts = len(pipe.transformer.blocks), 2
    assert kernel_steps == [3] * layers * contexts
    assert sorted({step for _, step in handle.state.densities}) == [0, 1, 3, 5]


def test_vmoba_under_first_block_cache_plans_only_the_layers_that_run(pipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    attention = vmoba_module.block_sparse_attention
    handle = None

    def spy(q, k, v, plan, **kwargs):
        calls.append(handle.state.step)
        return attention(q, k, v, plan, **kwargs)

    monkeypatch.setattr(vmoba_module, "block_sparse_attention", spy)
    # An infinite threshold: every step after the first computes block 0 only (the head block),
    # whatever the weights: blocks are skipped, not steps.
    cache = diffusers_hooks.FirstBlockCacheConfig(threshold=float("inf"))
    handle = fastdit.apply(pipe, fastdit.VMoBA(dense_steps=2), cache=cache)
    steps = record_steps(handle)
    try:
        generate(pipe)
    finally:
        handle.remove()
    assert steps == [s for s in range(6) for _ in ("cond", "uncond")]
    densities = handle.state.densities
    assert sorted(densities) == [(0, s) for s in range(6)] + [(1, 0)]
    assert calls == [s for s in range(2, 6) for _ in ("cond", "uncond")]  # layer 0, sparse steps
    assert all(densities[(0, s)] == 1.0 for s in (0, 1)) and densities[(1, 0)] == 1.0


# --------------------------------------------------------------------------- quantization
def test_quantize_is_validated_at_apply(pipe):
    with pytest.raises(ValueError, match="needs a bf16 or fp16 pipeline .* got float32 weights"):
        fastdit.apply(pipe, fastdit.Radial(), quantize="int8")
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        fastdit.apply(pipe, fastdit.Radial(), quantize="int4")
    with pytest.raises(ValueError, match="Agent composes its own kernel calls"):
        compose.check_quantize_method(fastdit.Agent(), "int8")
    # PARO's rule: a method config with a quantize field of its own sets it there.
    assert "quantize" in {f.name for f in dataclasses.fields(fastdit.PARO)}

    @dataclasses.dataclass(frozen=True)
    class OwnQuantize:
        quantize: str | None = None

    with pytest.raises(ValueError, match=r"OwnQuantize carries its own quantize \(now None\)"):
        compose.check_quantize_method(OwnQuantize(), "int8")
    registry = getattr(pipe.transformer, "_diffusers_hook", None)  # made by the first hook
    assert registry is None or "fastdit" not in registry.hooks  # the refused apply left nothing
    for method in (fastdit.Dense(), fastdit.Radial(), fastdit.AdaSpa(), fastdit.VMoBA()):
        compose.check_quantize_method(method, "int8")  # accepted


def test_quantize_reaches_the_kernel_for_static_and_per_call_methods(rng, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny.build_tiny_wan_pipeline(seed=0, dtype=torch.bfloat16).transformer
    seen = []

    def spying(module):
        attention = module.block_sparse_attention

        def spy(q, k, v, plan, **kwargs):
            seen.append((kwargs.get("quantize"), kwargs.get("return_lse", False)))
            return attention(q, k, v, plan, **kwargs)

        monkeypatch.setattr(module, "block_sparse_attention", spy)

    spying(processor_base)
    spying(adaspa_module)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 8, 16, generator=rng).bfloat16(),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=rng).bfloat16(),
        return_dict=False,
    )

    def forward(step):
        with torch.no_grad(), model.cache_context("cond", step_index=step, num_inference_steps=4):
            return model(**inputs)[0].float()

    layers = len(model.blocks)
    outputs = {}
    for quantize in (None, "int8"):
        handle = fastdit.apply(model, fastdit.Dense(), quantize=quantize)
        try:
            outputs[quantize] = forward(0)
        finally:
            handle.remove()
    assert seen == [(None, False)] * layers + [("int8", False)] * layers
    error = (outputs["int8"] - outputs[None]).abs().max() / outputs[None].abs().max()
    assert 0 < error < 0.05, f"INT8 vs bf16 relative error {error:.3g}"

    seen.clear()
    handle = fastdit.apply(model, fastdit.AdaSpa(search_steps=(1,), reference_steps=None),
                           quantize="int8")
    try:
        forward(1)  # the search: dense attention with LSE, 16-bit
        forward(2)  # sparse attention on the masks, INT8
    finally:
        handle.remove()
    assert seen == [(None, True)] * layers + [("int8", False)] * layers


# --------------------------------------------------------------------------- command line
def _compare_setup(*argv):
    from fastdit import cli
    from fastdit.cli.common import resolve_run_setup

    args = cli.build_parser().parse_args(["compare", *argv])
    return args, resolve_run_setup(args)


def test_compare_lists_every_combination_as_a_run():
    from fastdit.cli import compare
    from fastdit.cli.common import UsageError

    args, setup = _compare_setup(
        "--methods", "radial,agent", "--cache", "none", "--cache", "f05=fbc:threshold=0.05",
        "--cache", "taylorseer:cache_interval=2", "--quantize", "none,int8", "--dtype", "bfloat16")
    entries = compare.parse_method_entries(args)
    caches = compare.parse_caches(args, setup)
    assert [c if c is None else c[0] for c in caches] == [None, "f05", "taylorseer"]
    assert caches[1][1] == diffusers_hooks.FirstBlockCacheConfig(threshold=0.05)
    quantizations = compare.parse_quantizations(args, setup)
    notices = []
    runs = compare.build_runs(entries, caches, quantizations, [False, True], notices)
    labels = [run.label for run in runs]
    eager = ["dense", "dense+f05", "dense+taylorseer",
             "radial", "radial+int8", "radial+f05", "radial+f05+int8", "radial+taylorseer",
             "radial+taylorseer+int8", "agent", "agent+f05", "agent+taylorseer"]
    assert labels == eager + [label + "+compiled" if label != "dense" else "dense+compiled"
                              for label in eager if "int8" not in label or "agent" not in label]
    assert len(notices) == 6 and all("agent" in n and "skipped" in n for n in notices)
    run = runs[labels.index("radial+f05+int8+compiled")]
    assert (run.entry.label, run.cache[0], run.quantize, run.compiled) == ("radial", "f05", "int8", True)

    for argv, message in (
        (["--cache", "fbc", "--cache", "fbc:threshold=0.2"], "label 'fbc' is used twice"),
        (["--cache", "bad label=fbc"], "label 'bad label' must start with a letter"),
        (["--cache", "fbc:threshold=x"], "--cache 'fbc:threshold=x': cache fbc: option threshold"),
        (["--quantize", "int4"], "--quantize: unknown mode 'int4'"),
        (["--quantize", "int8"], "--quantize int8 needs --dtype bfloat16 or float16"),
    ):
        args, setup = _compare_setup(*argv)
        with pytest.raises(UsageError, match=message):
            compare.parse_caches(args, setup)
            compare.parse_quantizations(args, setup)


@pytest.mark.parametrize("argv, needle", [
    (["compare", "--also-compiled"], "--also-compiled is GPU-only"),
    (["compare", "--cache", "teacache"], "unknown cache 'teacache'"),
    (["generate", "--cache", "pab:spatial_attention_block_skip_range=two"],
     "option spatial_attention_block_skip_range must be an int or none"),
    (["generate", "--cache", "magcache:calibrate=true"], None),  # valid: the tiny model's steps
    (["generate", "--attention", "agent", "--quantize", "int8", "--dtype", "bfloat16"],
     "--quantize int8: Agent composes its own kernel calls"),
    (["generate", "--quantize", "int8"], "--quantize int8 needs --dtype bfloat16 or float16"),
])
def test_bad_cache_and_quantize_options_exit_2_before_loading(argv, needle, tmp_path, capsys,
                                                              monkeypatch):
    from fastdit import cli
    from fastdit.cli import generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the command line must be checked before loading a model")

    monkeypatch.setattr(generate, "load_for_run", no_loading)
    if needle is None:  # valid options reach the loading step (its error: one line, exit 1)
        assert cli.main([*argv, "-o", str(tmp_path / "x.mp4")]) == 1
        assert "before loading" in capsys.readouterr().err
        return
    output = ["-o", str(tmp_path / ("x.mp4" if argv[0] == "generate" else "report"))]
    assert cli.main([*argv, *output]) == 2
    assert needle in capsys.readouterr().err


def test_stock_pipeline_with_a_cache_is_removed_after_the_run(pipe, monkeypatch):
    from fastdit.cli import runner

    probe = runner.SpeedProbe(pipe, torch.device("cpu"))
    cache = diffusers_hooks.TaylorSeerCacheConfig(**TAYLORSEER_SKIPS_2_AND_4)
    blocks_run = []
    hook = pipe.transformer.blocks[0].attn1.register_forward_pre_hook(
        lambda module, args: blocks_run.append(pipe._current_timestep))
    try:
        runner.run_generation(pipe, dict(SETTINGS, output_type="np"), probe, 0, cache=cache)
    finally:
        hook.remove()
        probe.remove()
    assert len(blocks_run) == 4 * 2  # computed steps 0, 1, 3, 5; cond and uncond
    assert not pipe.transformer.is_cache_enabled


def test_report_plots_combinations_and_compares_stock_runs_with_a_cache():
    from fastdit.cli import report

    def run(label, method, base, cache, psnr):
        summary = dict(run_s=1.0, speedup_e2e=2.0, step_s=0.5, transformer_s=0.8,
                       speedup_transformer=2.5, self_attention_share=None, mean_density=None,
                       peak_memory_bytes=None, psnr=psnr, ssim=0.9, lpips=None)
        return dict(label=label, method=method, base=base, summary=summary,
                    cache=None if cache is None else {"label": cache, "config": f"{cache}()"})

    results = {"reference": "dense", "runs": [
        run("dense", "stock", "dense", None, None), run("dense+fbc", "stock", "dense", "fbc", 31.0),
        run("radial+fbc", "radial", "radial", "fbc", 29.0)]}
    assert [r["label"] for r in report._method_runs(results)] == ["dense+fbc", "radial+fbc"]
    rows = report.summary_rows(results)
    assert rows[0][10] == "ref" and rows[1][10] == "31.00" and rows[1][8] == "1 (dense)"
