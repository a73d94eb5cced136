"""Methods and model adapters as registered classes: by subclassing, by name, through entry points."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastdit
from fastdit import cli, plugins
from fastdit.cli import common as clicommon
from fastdit.cli import compare
from fastdit.methods import base as methods_base
from fastdit.pipelines import base as pipelines_base
from tests.integration_helpers import expand_blocks, run
from tests.pipelines.test_wan_integration import inputs, install_reference, tiny_transformer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def band():
    """examples/write_a_method.py imported: its ``Band`` registered as "band" for one test."""
    spec = importlib.util.spec_from_file_location("write_a_method", EXAMPLES / "write_a_method.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.Band
    fastdit.methods.unregister("band")


def test_example_method_registers_and_runs_by_name(rng, band, tmp_path, capsys):
    assert fastdit.methods.available()["band"] is band
    assert list(fastdit.methods.available())[:3] == ["dense", "radial", "gna"]  # fastdit's first
    model = tiny_transformer()
    kwargs = inputs(rng)  # 300 tokens: 5 blocks of 64, a band of width 1 is sparse
    handle = fastdit.apply(model, "band", width=1)
    assert isinstance(handle.state.method, band) and handle.state.method.width == 1
    out = run(model, kwargs)
    handle.remove()
    num_blocks = 5
    blocks = torch.arange(num_blocks)
    block_map = ((blocks[:, None] - blocks[None, :]).abs() <= 1)[None, None]
    install_reference(model, expand_blocks(block_map, 64, 300))
    assert (out - run(model, kwargs)).abs().max() <= 1e-4
    model.set_attn_processor(dict(tiny_transformer().attn_processors))
    assert (out - run(model, kwargs)).abs().max() > 1e-3, "the band must change the output"

    # The command line takes it by name too: generate, compare's entries, info.
    video = tmp_path / "band.mp4"
    argv = ["generate", "--attention", "band", "--attention-opt", "width=0", "--height", "64",
            "--width", "64", "--num-frames", "5", "--steps", "1", "-o", str(video)]
    assert cli.main(argv) == 0 and video.exists()
    assert "band(width=0, block_size=64)" in capsys.readouterr().out
    args = cli.build_parser().parse_args(["compare", "--methods", "b=band", "--method-opt", "b:width=2"])
    (entry,) = compare.parse_method_entries(args)
    assert isinstance(entry.method, band) and entry.method.width == 2
    assert cli.main(["info", "--device", "cpu"]) == 0
    assert "band       Band: width=1, block_size=64" in capsys.readouterr().out


def test_method_names_options_and_errors(band):
    with pytest.raises(fastdit.methods.MethodOptionError, match="unknown option 'depth'.*width, block_size"):
        fastdit.methods.create("band", {"depth": 1})
    with pytest.raises(fastdit.methods.MethodOptionError, match="band has no presets.*radial"):
        fastdit.methods.create("band", preset="x")
    with pytest.raises(ValueError, match="width=-1"):  # the method's own check passes through
        fastdit.methods.create("band", {"width": -1})
    with pytest.raises(clicommon.UsageError, match="bad --attention-opt for --attention band: .*width=-1"):
        clicommon.build_method("band", {"width": -1})
    with pytest.raises(fastdit.methods.MethodOptionError, match="requires option window=..."):
        fastdit.methods.as_method("gna")
    with pytest.raises(TypeError, match="already built"):
        fastdit.methods.as_method(band(), width=2)
    with pytest.raises(TypeError, match=r"Band\(...\), not the class"):
        fastdit.methods.as_method(band)
    with pytest.raises(TypeError, match="must be a fastdit.methods.Method"):
        fastdit.apply(tiny_transformer(), object())
    # A name is one method's: another class cannot take it; a redefinition (reload) replaces it.
    with pytest.raises(ValueError, match="'band' is taken by write_a_method.Band"):
        type("Band", (fastdit.methods.Method,), {"name": "band", "plan": band.plan})
    with pytest.raises(ValueError, match="name='no spaces'"):
        type("Spaced", (fastdit.methods.Method,), {"name": "no spaces"})
    fastdit.methods.register(band)
    assert fastdit.methods.get("band") is band


def _install_plugin(tmp_path, monkeypatch, group, entries, source):
    """A package on sys.path declaring ``entries`` (name -> object path) in entry-point ``group``."""
    dist = tmp_path / "fastdit_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastdit-plugin-demo\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (dist / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    (tmp_path / "fastdit_plugin_demo.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fastdit_plugin_demo", raising=False)


def test_entry_point_methods_load_once_and_a_broken_one_is_skipped(tmp_path, monkeypatch):
    _install_plugin(tmp_path, monkeypatch, "fastdit.methods",
                    {"shifted": "fastdit_plugin_demo:Shifted", "broken": "fastdit_plugin_demo:Missing"},
                    """
                    import fastdit

                    class Shifted(fastdit.methods.Dense):  # no name: the entry point names it
                        pass
                    """)
    monkeypatch.setattr(plugins, "_loaded_groups", set())
    monkeypatch.setattr(methods_base, "_methods", dict(methods_base._methods))
    with pytest.warns(UserWarning, match="skipped method plugin 'broken'.*Missing"):
        methods = fastdit.methods.available()
    assert methods["shifted"].__module__ == "fastdit_plugin_demo" and "broken" not in methods
    assert "shifted" in clicommon.method_names()
    assert isinstance(fastdit.methods.create("shifted", {"block_size": 64}), fastdit.Dense)


def test_model_adapters_register_by_subclassing_and_entry_point(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(pipelines_base, "_adapters", dict(pipelines_base._adapters))
    assert set(fastdit.supported_models()) >= {"WanTransformer3DModel", "UNet2DConditionModel",
                                               "HunyuanVideoTransformer3DModel"}
    wan = pipelines_base.adapters()["WanTransformer3DModel"]

    class RenamedWan(type(tiny_transformer())):
        """A Wan transformer under another class name: a model family fastdit does not know."""

    model = tiny_transformer()
    model.__class__ = RenamedWan
    with pytest.raises(ValueError, match="does not support RenamedWan yet"):
        fastdit.apply(model, "dense")
    _install_plugin(tmp_path, monkeypatch, "fastdit.pipelines",
                    {"renamed": "fastdit_plugin_demo:RenamedWanAdapter"},
                    """
                    from fastdit.pipelines.wan import WanAdapter

                    class RenamedWanAdapter(WanAdapter):
                        model_classes = ("RenamedWan",)
                    """)
    monkeypatch.setattr(plugins, "_loaded_groups", set())
    assert "RenamedWan" in fastdit.supported_models()
    with pytest.raises(ValueError, match="WanTransformer3DModel is adapted by .*WanAdapter already"):
        type("Again", (wan,), {"model_classes": ("WanTransformer3DModel",)})
    kwargs = inputs(rng)
    with fastdit.apply(model, fastdit.Radial(decay=0.3, block_size=64)):
        out = run(model, kwargs)
    reference = tiny_transformer()
    with fastdit.apply(reference, fastdit.Radial(decay=0.3, block_size=64)):
        assert torch.equal(out, run(reference, kwargs))
    assert not any(hasattr(module, "_diffusers_hook") for module in model.modules())


def test_every_hook_is_a_model_hook_removed_exactly(rng):
    """GNA on Wan registers block hooks; removal leaves no registry, and keeps a user's hook."""
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    model = tiny_transformer()
    kwargs = inputs(rng, frames=2, height=16, width=32)
    user_hook = ModelHook()
    HookRegistry.check_if_exists_or_initialize(model.blocks[1]).register_hook(user_hook, "user")
    stock = run(model, kwargs)
    method = fastdit.GNA(window=(2, 4, 8), stride=(2, 4, 8), tile=(2, 4, 8), block_size=64)
    handle = fastdit.apply(model, method)
    names = {name: sorted(module._diffusers_hook.hooks) for name, module in model.named_modules()
             if hasattr(module, "_diffusers_hook")}
    assert names == {"": ["fastdit"], "blocks.0": ["fastdit.permute"],
                     "blocks.1": ["fastdit.permute", "user"]}
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    run(model, kwargs)
    assert handle.state.active_plan.permutation is not None
    handle.remove()
    left = {name for name, module in model.named_modules() if hasattr(module, "_diffusers_hook")}
    assert left == {"blocks.1"} and model.blocks[1]._diffusers_hook.hooks == {"user": user_hook}
    assert torch.equal(run(model, kwargs), stock)
