"""fastdit under diffusers' Ulysses context parallelism: 2 and 4 CPU processes over gloo.

Every child process runs the same tiny Wan pipeline (4 heads, 5x4x8 = 160 tokens) twice per
method: once in one process (no parallelism) and once under
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``, with fastdit
installed before or after ``enable_parallelism``; the latents must agree to 1e-5 (fp32).

The children are forked from the test process (torch and diffusers already imported: no start-up
cost) and run fastdit's kernels on the PyTorch reference backend (``TRITON_INTERPRET=0``), one
thread each. diffusers 0.42.1's ``enable_parallelism`` places rank ``r`` on device
``r % torch.accelerator.device_count()``, which divides by zero on a CPU-only torch; the children
report one device so that diffusers' own code runs unchanged on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import socket
import traceback

import pytest
import torch

import fastdit

diffusers = pytest.importorskip("diffusers")
# Imported here, in the test process: the forked ranks inherit them instead of importing each.
from diffusers import ContextParallelConfig, HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402

TIMEOUT_S = 300
SIZE = dict(height=64, width=128, num_frames=17)  # latent 5x8x16 -> tokens 5x4x8 = 160
PROMPT = "a red fox runs through a snowy forest"


# --------------------------------------------------------------------------- process harness
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world: int, port: int, queue, target, args) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), TRITON_INTERPRET="0",
    )
    torch.set_num_threads(1)
    if torch.accelerator.device_count() == 0:  # see the module docstring
        torch.accelerator.device_count = lambda: 1
    stdout = io.StringIO()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        with contextlib.redirect_stdout(stdout):
            result = target(rank, world, *args)
        # No rank leaves (and tears its connections down) while another still sets up a group.
        dist.barrier()
        queue.put((rank, "ok", result, stdout.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc(), stdout.getvalue()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, target, *args) -> list:
    """Run ``target(rank, world, *args)`` in ``world`` forked processes; their results by rank
    (each a ``(result, stdout)`` pair). Any failure fails the test with every rank's traceback."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_child, args=(rank, world, port, queue, target, args), daemon=True)
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    reports = {}
    try:
        for _ in range(world):
            rank, status, value, stdout = queue.get(timeout=TIMEOUT_S)
            reports[rank] = (status, value, stdout)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [f"rank {rank}:\n{value}" for rank, (status, value, _) in sorted(reports.items()) if status != "ok"]
    assert not errors, "\n".join(errors)
    assert len(reports) == world, f"only ranks {sorted(reports)} reported"
    return [(reports[rank][1], reports[rank][2]) for rank in range(world)]


# --------------------------------------------------------------------------- what the ranks run
@pytest.fixture(scope="module")
def tiny_pipe():
    """The embedded tiny Wan pipeline, built once in the test process (its imports included) and
    inherited by the forked ranks, which swap in their own transformers."""
    from fastdit.testing.tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_transformer(seed: int, heads: int = 4):
    from fastdit.testing.tiny import TINY_TRANSFORMER_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        config = dict(TINY_TRANSFORMER_CONFIG, num_attention_heads=heads, attention_head_dim=16)
        return WanTransformer3DModel(**config).eval()


class PerHeadStatic(fastdit.methods.Method):
    """A static method whose plan differs per head (random block maps, fixed per layout): the
    processor slices it to each rank's heads."""

    def __init__(self, heads: int = 4, seed: int = 0) -> None:
        self.heads, self.seed, self._plans = heads, seed, {}

    def plan(self, layout, device=None):
        from fastdit.kernels import BlockSparsity
        from fastdit.methods.base import MethodPlan

        if layout not in self._plans:
            blocks = math.ceil(layout.num_tokens / 64)
            generator = torch.Generator().manual_seed(self.seed)
            block_map = torch.rand(1, self.heads, blocks, blocks, generator=generator) < 0.5
            block_map |= torch.eye(blocks, dtype=torch.bool)
            self._plans[layout] = MethodPlan(BlockSparsity.from_block_map(block_map.to(device), 64), layout)
        return self._plans[layout]


def methods(paro_path: str | None = None) -> dict:
    """Every method, with schedules that run dense and sparse steps in a 3-step generation."""
    entries = {
        "dense": fastdit.Dense(block_size=64),
        "radial": fastdit.Radial(decay=0.3, block_size=64, dense_steps=1),
        "gna": fastdit.GNA(window=(3, 3, 5), block_size=64),  # permuted, with a window mask
        "vmoba": fastdit.VMoBA(block_size=64, dense_steps=1, partition_sizes=((1,), (2, 4), (1, 2, 4))),
        "adaspa": fastdit.AdaSpa(sparsity=0.5, search_steps=(1, 2), reference_steps=None),
        "agent": fastdit.Agent(video_cell=(1, 2, 2), dense_last_steps=0, block_size=64),
        "per-head": PerHeadStatic(),
    }
    if paro_path is not None:
        entries["paro"] = fastdit.PARO(plan=paro_path, quantize=None)
    return entries


def generate(pipe, seed: int, steps: int = 3) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            PROMPT, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
            generator=torch.Generator().manual_seed(seed), **SIZE,
        ).frames.float()


def enable_ulysses(model, degree: int, **options) -> None:
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, **options))


def compare_methods(rank: int, world: int, pipe, seed: int, orders: dict[str, list[str]], paro_path):
    """Per method (``orders``: name -> install orders): the one-process latents, then under Ulysses
    with fastdit installed before (``apply-first``) or after (``parallelism-first``)
    ``enable_parallelism``; max abs differences, densities and what the plan exercised."""
    table = methods(paro_path)
    results = {}
    for name, install_orders in orders.items():
        method = table[name]
        pipe.transformer = tiny_transformer(seed)
        handle = fastdit.apply(pipe, method)
        reference = generate(pipe, seed)
        reference_densities = dict(handle.state.densities)
        plan = handle.state.active_plan
        handle.remove()
        for order in install_orders:
            pipe.transformer = tiny_transformer(seed)
            if order == "apply-first":
                handle = fastdit.apply(pipe, method)
                enable_ulysses(pipe.transformer, world)
            else:
                enable_ulysses(pipe.transformer, world)
                handle = fastdit.apply(pipe, method)
            out = generate(pipe, seed)
            ulysses = handle.state.parallel
            densities = ulysses.mean_over_ranks(handle.state.densities, ulysses.head_share)
            handle.remove()
            results[(name, order)] = dict(
                diff=float((out - reference).abs().max()),
                densities=densities, reference_densities=reference_densities,
                sparse=plan.density < 1, permuted=plan.permutation is not None,
                window=plan.window_mask is not None,
            )
    return results


# --------------------------------------------------------------------------- tests
def _paro_plan_file(rng, directory) -> str:
    """A random PARO plan for the 4-head tiny transformer: mixed axis orders and block masks per
    head, so slicing the plan to a rank's heads matters."""
    from fastdit.layout import AXIS_ORDERS, LatentGrid, SequenceLayout
    from fastdit.methods.paro import ParoPlan, layout_to_json

    layout = SequenceLayout(LatentGrid(5, 4, 8))
    nb = math.ceil(layout.num_tokens / 64)
    metadata = {
        "model_class": "WanTransformer3DModel", "transformer_layers": [2], "num_heads": 4,
        "head_dim": 16, "layout": layout_to_json(layout), "num_steps": 3, "num_buckets": 2,
        "block_size": 64, "target": {"density": 0.5}, "fastdit_version": fastdit.__version__,
    }
    masks = torch.rand(2, 2, 4, nb, nb, generator=rng) < 0.6
    masks |= torch.eye(nb, dtype=torch.bool)  # every query block sees its own keys
    orders = torch.randperm(len(AXIS_ORDERS), generator=rng)[:4].repeat(2, 1).to(torch.uint8)
    path = os.path.join(directory, "paro.safetensors")
    ParoPlan(orders, masks, metadata).save(path)
    return path


def _check(results: dict, names) -> None:
    for (name, order), entry in results.items():
        assert entry["diff"] <= 1e-5, (name, order, entry["diff"])
        assert entry["densities"] == pytest.approx(entry["reference_densities"], rel=1e-6), (name, order)
    for name in names:
        assert any(name == key[0] for key in results), name
    assert results[next(k for k in results if k[0] == "gna")]["permuted"]
    assert results[next(k for k in results if k[0] == "gna")]["window"]
    assert results[next(k for k in results if k[0] == "radial")]["sparse"]


BOTH_ORDERS = ["apply-first", "parallelism-first"]


def test_every_method_equals_one_process_on_2_ranks(rng, tmp_path, tiny_pipe):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    names = [*methods(), "paro"]
    orders = {name: BOTH_ORDERS for name in names}
    ranks = run_ranks(2, compare_methods, tiny_pipe, seed, orders, _paro_plan_file(rng, tmp_path))
    results = ranks[0][0]
    assert len(results) == 2 * len(names)
    _check(results, names)
    assert ranks[1][0] == results  # every rank computed the same thing


def uneven_shards(rank: int, world: int, pipe, seed: int, names: list[str]):
    """``ulysses_anything``: 7 heads over 4 ranks (2, 2, 2, 1), against one process; and the
    all-to-alls alone on 75 tokens (19, 19, 19, 18; diffusers' own gather of uneven shards
    needs NCCL, gloo's all_gather takes equal sizes only)."""
    from fastdit.parallel import split_sizes

    table = methods()
    results = {}
    for name in names:
        pipe.transformer = tiny_transformer(seed, heads=7)
        handle = fastdit.apply(pipe, table[name])
        reference = generate(pipe, seed)
        handle.remove()
        enable_ulysses(pipe.transformer, world, ulysses_anything=True)
        handle = fastdit.apply(pipe, table[name])
        out = generate(pipe, seed)
        ulysses = handle.state.parallel
        handle.remove()
        results[name] = float((out - reference).abs().max())
    generator = torch.Generator().manual_seed(seed)
    full = [torch.randn(2, 75, 6, 8, generator=generator) for _ in range(3)]
    seq = split_sizes(75, world)
    mine = [x.narrow(1, sum(seq[:rank]), seq[rank]) for x in full]
    shard = ulysses.heads(6)
    gathered = ulysses.to_heads(mine, 75)
    results["to_heads"] = all(torch.equal(g, shard.local(x, 2)) for g, x in zip(gathered, full))
    results["to_sequence"] = torch.equal(ulysses.to_sequence(gathered[0], 6), mine[0])
    results["gather"] = torch.equal(shard.gather(shard.local(full[0], 2), 2), full[0])
    return results


def test_methods_equal_one_process_on_4_ranks(rng, tmp_path, tiny_pipe):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    names = [*methods(), "paro"]
    # One install order per method here (both are covered on 2 ranks), alternating.
    orders = {name: [BOTH_ORDERS[index % 2]] for index, name in enumerate(names)}
    ranks = run_ranks(4, compare_methods, tiny_pipe, seed, orders, _paro_plan_file(rng, tmp_path))
    _check(ranks[0][0], names)
    assert all(result == ranks[0][0] for result, _ in ranks)
    for result, _ in run_ranks(4, uneven_shards, tiny_pipe, seed, ["gna", "adaspa"]):
        assert result.pop("to_heads") and result.pop("to_sequence") and result.pop("gather")
        for name, diff in result.items():
            assert diff <= 1e-5, (name, diff)


class PerCallWithoutHeadParallel(fastdit.methods.Method):
    """A per-call method that does not declare ``head_parallel``: refused under Ulysses."""

    def plan(self, layout, device=None):
        return fastdit.Dense(block_size=64).plan(layout, device)

    def attend(self, query, key, value, call):  # pragma: no cover - never reached
        raise AssertionError("ran on a head shard")


def transformer_inputs(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 5, 8, 16, generator=generator),  # tokens 5x4x8 = 160
        timestep=torch.tensor([700.0]), encoder_hidden_states=torch.randn(1, 7, 32, generator=generator),
        return_dict=False,
    )


def refusals_and_remove(rank: int, world: int, seed: int):
    """What fastdit refuses (at apply, or at the first forward when parallelism comes later), and
    ``remove`` after ``enable_parallelism`` (the restored stock processors get the parallel config)."""
    inputs = transformer_inputs(seed)
    messages = {}

    def attempt(key, action):
        try:
            action()
            messages[key] = None
        except ValueError as exc:
            messages[key] = str(exc)

    radial = fastdit.Radial(decay=0.3, block_size=64)
    model = tiny_transformer(seed)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    attempt("ring, then apply", lambda: fastdit.apply(model, radial))
    messages["ring, then apply: untouched"] = not hasattr(model, "_diffusers_hook") or "fastdit" not in model._diffusers_hook.hooks

    model = tiny_transformer(seed)
    handle = fastdit.apply(model, radial)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    with torch.inference_mode():
        attempt("apply, then ring: first forward", lambda: model(**inputs))
    handle.remove()

    model = tiny_transformer(seed)
    enable_ulysses(model, world)
    attempt("per-call method without head_parallel", lambda: fastdit.apply(model, PerCallWithoutHeadParallel()))

    model = tiny_transformer(seed, heads=3)
    enable_ulysses(model, world)
    attempt("3 heads on 2 ranks", lambda: fastdit.apply(model, radial))

    # remove(): apply -> enable_parallelism -> remove gives stock Ulysses, equal to one process.
    model = tiny_transformer(seed)
    with torch.inference_mode():
        stock = model(**inputs)[0]
        handle = fastdit.apply(model, radial)
        enable_ulysses(model, world)
        sparse = model(**inputs)[0]
        handle.remove()
        restored = model(**inputs)[0]
    messages["remove: stock again"] = float((restored - stock).abs().max())
    messages["sparse differs from stock"] = float((sparse - stock).abs().max())
    return messages


def test_refusals_and_remove_on_2_ranks(rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    messages = run_ranks(2, refusals_and_remove, seed)[0][0]
    assert "ring attention (ring_degree=2) is not supported" in messages["ring, then apply"]
    assert "ContextParallelConfig(ulysses_degree=2)" in messages["ring, then apply"]
    assert messages["ring, then apply: untouched"]
    assert "ring attention (ring_degree=2)" in messages["apply, then ring: first forward"]
    assert "does not declare head_parallel=True" in messages["per-call method without head_parallel"]
    assert "got 3 heads for ulysses_degree=2" in messages["3 heads on 2 ranks"]
    assert messages["remove: stock again"] <= 1e-5
    assert messages["sparse differs from stock"] > 1e-3


def cli_runs(rank: int, world: int, directory: str):
    """``fastdit generate`` and ``fastdit compare`` with ``--ulysses`` as torchrun would start them
    (RANK, WORLD_SIZE, LOCAL_RANK set); which files each rank wrote."""
    from fastdit import cli
    from fastdit.cli import compare, generate, report

    written = []

    def recording(function):
        def wrapper(*args, **kwargs):
            written.append(function.__name__)
            return function(*args, **kwargs)
        return wrapper

    generate.write_video = compare.write_video = recording(generate.write_video)
    report.write_report = recording(report.write_report)
    small = ["--height", "64", "--width", "64", "--num-frames", "9", "--steps", "2"]  # 48 tokens
    video = os.path.join(directory, "out.mp4")
    codes = [
        cli.main(["generate", *small, "--attention", "radial", "--attention-opt", "block_size=64",
                  "--ulysses", str(world), "-o", video]),
        cli.main(["compare", *small, "--methods", "radial", "--method-opt", "block_size=64",
                  "--warmup", "0", "--no-lpips", "--ulysses", str(world),
                  "-o", os.path.join(directory, "report")]),
    ]
    return codes, written


def test_cli_generate_and_compare_under_torchrun_on_2_ranks(tmp_path, tiny_pipe, capsys, monkeypatch):
    import json

    ranks = run_ranks(2, cli_runs, str(tmp_path))
    (codes, written), stdout = ranks[0]
    assert codes == [0, 0]
    assert written == ["write_video", "write_video", "write_video", "write_video", "write_report"]
    assert ranks[1][0] == ([0, 0], []) and ranks[1][1] == ""  # rank 1 neither writes nor prints
    assert (tmp_path / "out.mp4").stat().st_size > 0
    assert "parallel     Ulysses context parallelism over 2 ranks (gloo)" in stdout
    for rank in (0, 1):
        assert f"  rank {rank}       run " in stdout, stdout
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["settings"]["ulysses"] == 2
    for run in results["runs"]:
        assert [entry["rank"] for entry in run["videos"][0]["ranks"]] == [0, 1]
    # One process without --ulysses under a torchrun launch of 2: refused, nothing runs.
    from fastdit import cli

    with monkeypatch.context() as patch:
        patch.setenv("WORLD_SIZE", "2")
        assert cli.main(["generate", "-o", str(tmp_path / "never.mp4")]) == 2
    assert "pass --ulysses 2" in capsys.readouterr().err
    assert cli.main(["generate", "--ulysses", "2", "-o", str(tmp_path / "never.mp4")]) == 2
    assert "torchrun --nproc-per-node 2 -m fastdit ... --ulysses 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- HunyuanVideo
def tiny_hunyuan(seed: int, image_condition_type=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
            patch_size_t=1, text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
            guidance_embeds=True, image_condition_type=image_condition_type,
        ).eval()


def hunyuan_inputs(seed: int) -> dict:
    """Latent 5x8x16 -> 5x4x8 = 160 video tokens, 9 text tokens padded to valid lengths 9 and 4."""
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 4])[:, None]).long()
    return dict(
        hidden_states=torch.randn(2, 4, 5, 8, 16, generator=generator),
        encoder_hidden_states=torch.randn(2, 9, 12, generator=generator), encoder_attention_mask=mask,
        pooled_projections=torch.randn(2, 8, generator=generator), guidance=torch.tensor([6000.0] * 2),
        return_dict=False,
    )


def hunyuan_steps(model, inputs: dict, steps: int = 3) -> torch.Tensor:
    """``steps`` denoising steps as the pipeline's loop marks them (one pass each)."""
    outputs = []
    with torch.inference_mode():
        for step in range(steps):
            timestep = torch.tensor([900.0 - 300 * step] * 2)
            with model.cache_context("cond", step_index=step, num_inference_steps=steps):
                outputs.append(model(timestep=timestep, **inputs)[0])
    return torch.stack(outputs)


def hunyuan_compare(rank: int, world: int, seed: int, orders: dict[str, list[str]]):
    from fastdit.pipelines.hunyuan_video import context_parallel_plan

    inputs = hunyuan_inputs(seed)
    table = methods()
    results = {}

    def enable(model):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world),
                                 cp_plan=context_parallel_plan(model))

    for name, install_orders in orders.items():
        model = tiny_hunyuan(seed)
        handle = fastdit.apply(model, table[name])
        reference = hunyuan_steps(model, inputs)
        handle.remove()
        for order in install_orders:
            model = tiny_hunyuan(seed)
            if order == "apply-first":
                handle = fastdit.apply(model, table[name])
                enable(model)
            else:
                enable(model)
                handle = fastdit.apply(model, table[name])
            results[(name, order)] = float((hunyuan_steps(model, inputs) - reference).abs().max())
    # After remove, the stock processors cannot run fastdit's plan: an error, not another result.
    handle.remove()
    try:
        hunyuan_steps(model, inputs, steps=1)
        results["stock after remove"] = "ran"
    except RuntimeError as exc:
        results["stock after remove"] = str(exc)
    model = tiny_hunyuan(seed, image_condition_type="token_replace")
    enable(model)
    try:
        fastdit.apply(model, table["radial"])
        results["token_replace"] = None
    except ValueError as exc:
        results["token_replace"] = str(exc)
    return results


def test_hunyuan_video_equals_one_process_on_2_ranks(rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    names = list(methods())
    orders = {name: [BOTH_ORDERS[index % 2]] for index, name in enumerate(names)}
    orders["radial"] = BOTH_ORDERS
    results = run_ranks(2, hunyuan_compare, seed, orders)[0][0]
    assert "token_replace" in results.pop("token_replace")
    assert results.pop("stock after remove") != "ran"
    assert len(results) == len(names) + 1
    for key, diff in results.items():
        assert diff <= 1e-5, (key, diff)
