"""Several GPUs: full-size Wan2.1-14B under diffusers' Ulysses context parallelism, stock vs fastdit.

What it measures
----------------
One launch runs at one Ulysses degree ``N`` = the number of processes torchrun starts (``N = 1``:
no parallelism, the baseline). Every rank builds the same full-size ``WanTransformer3DModel``
with random bf16 weights (``e2e_bench.build_transformer``: Wan2.1-14B, 40 layers, 40 heads x
128) and, for ``N > 1``, calls ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``
(diffusers' Wan ``_cp_plan``: each rank runs the blocks on 1/N of the tokens and attention on
1/N of the heads). Input: 720p x 81 frames, latent ``[1, 16, 21, 90, 160]`` -> 21 x 45 x 80 =
75,600 tokens, text ``[1, 512, 4096]``. One STEP is classifier-free guidance: two forwards
(``cond``, ``uncond``) inside ``model.cache_context(name, step_index=i, num_inference_steps=50)``,
as the Wan pipeline's loop runs them. Methods (``--methods``):

* ``stock-cudnn``: diffusers' stock processors (its Ulysses template for ``N > 1``), SDPA forced
  to cuDNN;
* ``dense``: ``fastdit.Dense()``, fastdit's kernel with a full plan (fastdit's all-to-alls);
* ``radial``: ``fastdit.Radial.preset("wan2.1-14b")``; its sparse step (index 12) is timed, its
  dense steps are the stock computation (stock-cudnn's step is reused);
* ``adaspa``: ``fastdit.AdaSpa()``; phases in step order on one installation: search step 10
  (dense attention with LSE, block mass, selection; the recalls of all heads gathered across
  ranks), sparse step 11, cached-LSE search step 30, sparse step 31; steps 0-9 reuse stock-cudnn.

Per (method, phase): ms per step (the slowest rank's; every rank's is recorded), peak GPU memory
per rank, the share of a forward spent in communication (one profiled ``cond`` forward: CUDA time
of NCCL kernels over the forward's wall time; on the CPU, gloo collectives' CPU time), and the
density the step ran. Then per method the 50-step estimate as ``e2e_bench.py`` makes it
(``50 * step`` for stock and Dense; ``12 * dense + 38 * sparse`` for Radial;
``10 * dense + search + 19 * sparse + cached search + 19 * late sparse`` for AdaSpa; VAE, text
encoder and scheduler excluded), its speedup over stock-cudnn at the same GPU count, and, when the
1-GPU results of the same configuration are in ``--out`` (or ``--baseline``), the speedup over
1 GPU and the scaling efficiency ``T_1 / (N * T_N)``.

Correctness: the output of a ``--check-layers``-layer model (default 2, the same width and
tokens) under Ulysses against the same model without parallelism (built and run on each rank's
GPU), per method at its sparse step (AdaSpa: after its four phases): max abs difference, and
relative to the reference's max abs value (bf16: small but not zero where cuBLAS picks other
kernels for other row counts; fp32 on the CPU: 0 or ~1e-7). On one GPU there is nothing to
compare (0 by definition).

How to run
----------
    # 1 GPU (the baseline; the lead runs this one), full size, ~6-8 min on an H200:
    torchrun --nproc-per-node 1 -m benchmarks.cp_bench
    # quick: 4 layers, ~1 min
    torchrun --nproc-per-node 1 -m benchmarks.cp_bench --layers 4
    # 2 and 4 GPUs (the same command; results land next to the 1-GPU ones and are compared):
    torchrun --nproc-per-node 2 -m benchmarks.cp_bench
    torchrun --nproc-per-node 4 -m benchmarks.cp_bench
    # one table over every degree found in --out
    python -m benchmarks.cp_bench --combine
    # CPU smoke test over gloo: a tiny Wan, fp32, the PyTorch reference kernels (< 1 min)
    torchrun --nproc-per-node 2 -m benchmarks.cp_bench --smoke --out /tmp/cp_smoke

Writes ``cp_bench_<gpu-slug>_<YYYY-MM-DD>_<config>_u<N>.{json,csv}`` into ``--out`` (default
``benchmarks/results/<gpu>_<date>``; rank 0 only; ``<config>`` e.g. ``wan14b-720p``, ``wan14b-720p-4layers``),
and with ``--combine`` ``..._<config>_combined.{json,csv,png}`` per configuration.
NVLink multicast stays off: the script sets ``NCCL_NVLS_ENABLE=0`` (and PyTorch's and
NVSHMEM's switches) before anything initialises NCCL.

Runtime estimate (H200, full 14B 720p, defaults ``--warmup 1 --repeat 1``)
---------------------------------------------------------------------------
One forward takes ~12 s with cuDNN on one GPU (e2e_bench on an H100; an H200 is somewhat faster),
Dense ~14 s, a Radial sparse step's forward ~7 s. On one GPU: stock 3 forwards + 1 profiled
(~50 s), Dense ~55 s, Radial sparse ~30 s, AdaSpa 4 phases x 3 forwards + profiled ones (~2.5
min), check models and the 28 GB build ~30 s: about 5-6 minutes, inside a 10-minute call
(``--methods`` splits it). ``--layers 4`` scales every forward by 4/40. With ``N`` GPUs every
forward is roughly ``N`` times shorter plus the all-to-alls.
Memory per GPU: the whole model (28 GB bf16: Ulysses replicates weights) plus activations of
75,600 / N tokens, AdaSpa's LSE cache and plans (~3.7 GB / N), the check models (~1.4 GB each).
"""

from __future__ import annotations

import os

# Before torch initialises NCCL: no NVLink multicast (it can take the host's shared GPUs down).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's per-start/stop log lines

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.e2e_bench import WAN_COMMON, ModelSpec, build_transformer, make_inputs, sdpa_context  # noqa: E402
from benchmarks.harness import add_out_argument, git_commit, synchronize  # noqa: E402

import fastdit  # noqa: E402
from fastdit.parallel import enable as enable_ulysses  # noqa: E402
from fastdit.cli.report import agg_pyplot  # noqa: E402

NUM_STEPS = 50
TIMESTEP = 500.0
ALL_METHODS = ("stock-cudnn", "dense", "radial", "adaspa")
RADIAL_PRESET = "wan2.1-14b"
COMM_NAMES = ("nccl", "all_to_all", "alltoall", "all_gather", "allgather")

CSV_FIELDS = (
    "degree", "model", "tokens", "layers", "heads", "dtype", "method", "phase", "step_index",
    "status", "ms_step", "ms_step_ranks", "comm_ms_forward", "comm_share", "peak_mem_gib_ranks",
    "peak_mem_gib_max", "step_density", "e2e_s", "speedup_vs_stock", "speedup_vs_1gpu",
    "scaling_efficiency", "check_max_abs", "check_rel", "error",
)

MODELS = {
    "14b": dict(WAN_COMMON, num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
    "1.3b": dict(WAN_COMMON, num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
}
SIZES = {"720p": (21, 90, 160), "480p": (21, 60, 104)}  # latent T x H x W (81 frames)
SMOKE_CONFIG = dict(WAN_COMMON, num_layers=2, num_attention_heads=4, attention_head_dim=32,
                    ffn_dim=128, text_dim=64, freq_dim=32)
SMOKE_LATENT = (4, 16, 24)  # tokens 4 x 8 x 12 = 384


# --------------------------------------------------------------------------- processes
@dataclasses.dataclass
class Ranks:
    """This process in the launch: rank, degree, device, and collectives over all ranks."""

    rank: int
    degree: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, value) -> list:
        if self.degree == 1:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.degree
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.degree > 1:
            import torch.distributed as dist

            dist.barrier()


def start(args: argparse.Namespace) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.smoke or not torch.cuda.is_available():
        if not args.smoke:
            raise SystemExit("cp_bench needs CUDA GPUs (or --smoke for the CPU test at a toy size)")
        # diffusers 0.42.1's enable_parallelism places rank r on device
        # r % torch.accelerator.device_count(), which is 0 on a CPU-only torch: report one device
        # for the CPU smoke test (not needed, and not done, on a GPU machine).
        if torch.accelerator.device_count() == 0:
            torch.accelerator.device_count = lambda: 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world == 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Ranks(0, 1, device)
    from fastdit.parallel import launch

    run = launch(world)
    return Ranks(run.rank, world, run.device)


# --------------------------------------------------------------------------- one configuration
def model_spec(args: argparse.Namespace) -> ModelSpec:
    if args.smoke:
        config, latent = dict(SMOKE_CONFIG), SMOKE_LATENT
        text_len = 16
    else:
        config = dict(MODELS[args.model])
        latent = SIZES[args.size] if args.latent is None else tuple(args.latent)
        text_len = 512
    if args.layers is not None:
        config["num_layers"] = args.layers
    size = args.size if args.latent is None else "x".join(map(str, latent))
    name = "smoke" if args.smoke else f"wan{args.model}-{size}"
    if args.layers is not None:
        name += f"-{args.layers}layers"  # a quick run never mixes with the full one
    return ModelSpec(name, name, config, latent=(1, 16, *latent), text_len=text_len, warmup=args.warmup,
                     repeat=args.repeat)


def methods() -> dict:
    return {"dense": fastdit.Dense(), "radial": fastdit.Radial.preset(RADIAL_PRESET), "adaspa": fastdit.AdaSpa()}


def phases(name: str, num_steps: int = NUM_STEPS) -> list[tuple[str, int]]:
    """(phase, step index) timed per method, in the order they run."""
    if name in ("stock-cudnn", "dense"):
        return [("step", 0)]
    if name == "radial":
        return [("sparse-step", fastdit.Radial.preset(RADIAL_PRESET).dense_steps)]
    search = fastdit.AdaSpa().resolve_search_steps(num_steps)
    return [("search-step", search[0]), ("sparse-step", search[0] + 1),
            ("cached-search-step", search[1]), ("late-sparse-step", search[1] + 1)]


def estimate(name: str, ms: dict[str, float], stock_ms: float | None, num_steps: int = NUM_STEPS) -> float | None:
    """Milliseconds of a ``num_steps``-step denoising loop from the timed phases."""
    if name in ("stock-cudnn", "dense"):
        return num_steps * ms["step"]
    if stock_ms is None:
        return None
    if name == "radial":
        dense = fastdit.Radial.preset(RADIAL_PRESET).dense_steps
        return dense * stock_ms + (num_steps - dense) * ms["sparse-step"]
    first, second = fastdit.AdaSpa().resolve_search_steps(num_steps)
    return (first * stock_ms + ms["search-step"] + (second - first - 1) * ms["sparse-step"]
            + ms["cached-search-step"] + (num_steps - second - 1) * ms["late-sparse-step"])


def forward(model, inputs, device, name: str, step_index: int):
    timestep = torch.tensor([TIMESTEP], device=device)
    text = inputs.text_cond if name == "cond" else inputs.text_uncond
    with model.cache_context(name, step_index=step_index, num_inference_steps=NUM_STEPS):
        return model(hidden_states=inputs.latent, timestep=timestep, encoder_hidden_states=text,
                     return_dict=False)[0]


def comm_share(model, inputs, ranks: Ranks, step_index: int) -> tuple[float | None, float | None]:
    """(communication ms, its share) of one profiled ``cond`` forward on this rank."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ranks.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    ranks.barrier()
    synchronize(ranks.device)
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        forward(model, inputs, ranks.device, "cond", step_index)
        synchronize(ranks.device)
        wall_ms = (time.perf_counter() - begin) * 1e3
    comm_us = 0.0
    for event in prof.key_averages():
        if any(token in event.key.lower() for token in COMM_NAMES):
            comm_us += event.device_time_total if cuda else event.self_cpu_time_total
    return comm_us / 1e3, comm_us / 1e3 / wall_ms if wall_ms else None


def time_phase(model, inputs, ranks: Ranks, step_index: int, args, sdpa) -> dict:
    """Warm-up forwards, ``repeat`` timed CFG steps, one profiled forward; this rank's numbers."""
    device = ranks.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = []
    with torch.inference_mode(), sdpa():
        for index in range(args.warmup):
            forward(model, inputs, device, "cond" if index % 2 == 0 else "uncond", step_index)
        for _ in range(args.repeat):
            ranks.barrier()
            synchronize(device)
            begin = time.perf_counter()
            forward(model, inputs, device, "cond", step_index)
            forward(model, inputs, device, "uncond", step_index)
            synchronize(device)
            step_ms.append((time.perf_counter() - begin) * 1e3)
        comm_ms, share = (None, None)
        if args.comm_profile and ranks.degree > 1:
            comm_ms, share = comm_share(model, inputs, ranks, step_index)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(ms=min(step_ms) if step_ms else None, comm_ms=comm_ms, comm_share=share, peak=peak)


def check_output(spec: ModelSpec, name: str, ranks: Ranks, args, dtype) -> dict:
    """``--check-layers`` layers under Ulysses against the same model in one process."""
    if args.check_layers == 0:
        return {}
    config = dict(spec.config, num_layers=args.check_layers)
    check_spec = dataclasses.replace(spec, config=config)
    inputs = make_inputs(check_spec, ranks.device, dtype, args.seed)
    step_index = phases(name)[-1][1] if name != "stock-cudnn" else 0
    outputs = []
    for parallel in (False, True):
        if parallel and ranks.degree == 1:
            break
        model = build_transformer(check_spec, ranks.device, dtype, args.seed)
        if parallel:
            enable_ulysses(model, ranks.degree)
        method = methods().get(name)
        handle = fastdit.apply(model, method) if method is not None else None
        with torch.inference_mode(), sdpa_context("CUDNN_ATTENTION", ranks.device)():
            for phase_step in [step for _, step in phases(name)] if name == "adaspa" else [step_index]:
                out = forward(model, inputs, ranks.device, "cond", phase_step)
        outputs.append(out.float())
        if handle is not None:
            handle.remove()
        del model
    if len(outputs) == 1:
        return dict(check_max_abs=0.0, check_rel=0.0)
    difference = float((outputs[1] - outputs[0]).abs().max())
    return dict(check_max_abs=difference, check_rel=difference / max(float(outputs[0].abs().max()), 1e-30))


def run_method(name: str, model, inputs, ranks: Ranks, args, spec, dtype, stock_ms) -> tuple[list[dict], dict]:
    sdpa = sdpa_context("CUDNN_ATTENTION", ranks.device)
    method = methods().get(name)
    handle = fastdit.apply(model, method) if method is not None else None
    rows, timed = [], {}
    try:
        for phase, step_index in phases(name):
            mine = time_phase(model, inputs, ranks, step_index, args, sdpa)
            density = None
            if handle is not None:
                values = [v for (layer, step), v in handle.state.densities.items() if step == step_index]
                density = sum(values) / len(values) if values else None
                ulysses = handle.state.parallel
                if ulysses is not None and density is not None:
                    density = ulysses.mean_over_ranks({"d": density}).get("d")
            every = ranks.gather(mine)
            step_ms = max(entry["ms"] for entry in every)
            shares = [entry["comm_share"] for entry in every if entry["comm_share"] is not None]
            comm = [entry["comm_ms"] for entry in every if entry["comm_ms"] is not None]
            peaks = [entry["peak"] for entry in every]
            timed[phase] = step_ms
            rows.append(dict(
                method=name, phase=phase, step_index=step_index, status="ok", ms_step=step_ms,
                ms_step_ranks=[entry["ms"] for entry in every],
                comm_ms_forward=max(comm) if comm else None,
                comm_share=max(shares) if shares else None,
                peak_mem_gib_ranks=peaks,
                peak_mem_gib_max=max(peaks) if None not in peaks else None,
                step_density=density,
            ))
    finally:
        if handle is not None:
            handle.remove()
    ms_estimate = estimate(name, timed, stock_ms)
    summary = dict(method=name, phase="50-step estimate", status="ok",
                   e2e_s=ms_estimate / 1e3 if ms_estimate is not None else None)
    summary.update(check_output(spec, name, ranks, args, dtype))
    return rows, summary


# --------------------------------------------------------------------------- files
def stem(metadata: dict) -> str:
    name = metadata["device_name"] if metadata["device_type"] == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cp_bench_{slug}_{metadata['date']}_{metadata['model']}"


def write(rows: list[dict], metadata: dict, out: Path, suffix: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stem(metadata)}_{suffix}"
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    json_path.write_text(json.dumps({"metadata": metadata, "rows": rows}, indent=1, default=str))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def load_degrees(out: Path, metadata: dict, baseline: Path | None) -> dict[int, dict]:
    """Results of this configuration at every degree found (``_u<N>.json``), by degree."""
    found = {}
    paths = sorted(out.glob(f"{stem(metadata)}_u*.json"))
    if baseline is not None:
        paths.append(baseline)
    for path in paths:
        data = json.loads(path.read_text())
        same = all(data["metadata"].get(key) == metadata.get(key) for key in ("model", "tokens", "layers", "dtype"))
        if same:
            found[data["metadata"]["degree"]] = data
    return found


def compare_degrees(rows: list[dict], degree: int, baseline: dict | None) -> None:
    """Speedup over stock at this degree, and over 1 GPU / scaling efficiency from ``baseline``."""
    estimates = {row["method"]: row for row in rows if row["phase"] == "50-step estimate"}
    stock = estimates.get("stock-cudnn", {}).get("e2e_s")
    ones = {}
    if baseline is not None:
        ones = {row["method"]: row.get("e2e_s") for row in baseline["rows"] if row["phase"] == "50-step estimate"}
    for name, row in estimates.items():
        row["degree"] = degree
        value = row.get("e2e_s")
        row["speedup_vs_stock"] = stock / value if stock and value else None
        one = ones.get(name)
        row["speedup_vs_1gpu"] = one / value if one and value else None
        row["scaling_efficiency"] = one / (degree * value) if one and value else None


def format_table(rows: list[dict], metadata: dict) -> str:
    lines = [f"cp_bench: {metadata['label']}, Ulysses degree {metadata['degree']}, {metadata['device_name']}"]
    header = f"{'method':<12} {'phase':<19} {'ms/step':>10} {'comm':>6} {'peak GiB':>9} {'density':>8}"
    lines += [header, "-" * len(header)]
    for row in rows:
        if row["phase"] == "50-step estimate":
            continue
        share = f"{row['comm_share']:.0%}" if row.get("comm_share") is not None else "-"
        peak = f"{row['peak_mem_gib_max']:.1f}" if row.get("peak_mem_gib_max") is not None else "-"
        density = f"{row['step_density']:.3f}" if row.get("step_density") is not None else "-"
        lines.append(f"{row['method']:<12} {row['phase']:<19} {row['ms_step']:>10.1f} {share:>6} {peak:>9} {density:>8}")
    lines.append("")
    header = f"{'method':<12} {'50 steps':>9} {'vs stock':>9} {'vs 1 GPU':>9} {'efficiency':>10} {'check rel diff':>15}"
    lines += [header, "-" * len(header)]

    def number(value, text):
        return text.format(value) if value is not None else "-"

    for row in rows:
        if row["phase"] != "50-step estimate":
            continue
        lines.append(
            f"{row['method']:<12} {number(row.get('e2e_s'), '{:.1f} s'):>9} "
            f"{number(row.get('speedup_vs_stock'), '{:.2f}x'):>9} {number(row.get('speedup_vs_1gpu'), '{:.2f}x'):>9} "
            f"{number(row.get('scaling_efficiency'), '{:.0%}'):>10} {number(row.get('check_rel'), '{:.1e}'):>15}"
        )
    return "\n".join(lines)


def combine(args: argparse.Namespace) -> None:
    """One table and plot over every degree of each configuration in ``--out``."""
    groups: dict[str, dict[int, dict]] = {}
    for path in sorted(args.out.glob("cp_bench_*_u*.json")):
        data = json.loads(path.read_text())
        groups.setdefault(stem(data["metadata"]), {})[data["metadata"]["degree"]] = data
    if not groups:
        raise SystemExit(f"no cp_bench_*_u<N>.json in {args.out}")
    for name, by_degree in groups.items():
        rows = []
        baseline = by_degree.get(1)
        for degree, data in sorted(by_degree.items()):
            degree_rows = [dict(row, degree=degree) for row in data["rows"]]
            compare_degrees(degree_rows, degree, baseline)
            rows += degree_rows
            print(format_table(degree_rows, data["metadata"]), "\n")
        metadata = dict(next(iter(by_degree.values()))["metadata"], degrees=sorted(by_degree))
        write(rows, metadata, args.out, "combined")
        plot(rows, metadata, args.out / f"{name}_combined.png")
        print(f"wrote {args.out / name}_combined.{{json,csv,png}}")


def plot(rows: list[dict], metadata: dict, path: Path) -> None:
    plt = agg_pyplot()
    if plt is None:
        return
    estimates = [row for row in rows if row["phase"] == "50-step estimate" and row.get("e2e_s")]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(row["method"] for row in estimates):
        mine = sorted((row["degree"], row) for row in estimates if row["method"] == name)
        left.plot([d for d, _ in mine], [r["e2e_s"] for _, r in mine], marker="o", label=name)
        efficiency = [(d, r["scaling_efficiency"]) for d, r in mine if r.get("scaling_efficiency") is not None]
        if efficiency:
            right.plot(*zip(*efficiency), marker="o", label=name)
    left.set(xlabel="GPUs (Ulysses degree)", ylabel="50-step transformer time (s)", yscale="log",
             title=metadata["label"])
    right.set(xlabel="GPUs (Ulysses degree)", ylabel="scaling efficiency T1 / (N TN)", ylim=(0, 1.1))
    for axis in (left, right):
        axis.set_xticks(sorted({row["degree"] for row in estimates}))
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time Wan2.1 transformer steps under diffusers' Ulysses context parallelism "
        "(degree = torchrun's process count): stock cuDNN against fastdit Dense, Radial, AdaSpa.")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help=f"comma list of {', '.join(ALL_METHODS)} (default: all)")
    parser.add_argument("--model", choices=sorted(MODELS), default="14b", help="Wan2.1 config (default: 14b)")
    parser.add_argument("--size", choices=sorted(SIZES), default="720p", help="81 frames at this size (default: 720p)")
    parser.add_argument("--latent", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        metavar="T,H,W", help="latent frames, height, width instead of --size")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default: the model's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per phase (default: 1)")
    parser.add_argument("--repeat", type=int, default=1, help="timed CFG steps per phase, the fastest kept (default: 1)")
    parser.add_argument("--check-layers", type=int, default=2,
                        help="layers of the model compared with one process (0: skip) (default: 2)")
    parser.add_argument("--no-comm-profile", dest="comm_profile", action="store_false",
                        help="skip the profiled forward that measures communication (default: on for N > 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="1-GPU JSON to compare with (default: the _u1 file of this configuration in --out)")
    add_out_argument(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, fp32, a tiny 2-layer Wan (4 heads, 384 tokens), fastdit's reference kernels")
    parser.add_argument("--combine", action="store_true", help="only combine the _u<N>.json files in --out")
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in args.methods if name not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(ALL_METHODS)}")
    if any(name in ("radial", "adaspa") for name in args.methods) and "stock-cudnn" not in args.methods:
        parser.error("radial and adaspa reuse stock-cudnn's step for their dense steps: include stock-cudnn")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.combine:
        combine(args)
        return
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch reference kernels on the CPU
    ranks = start(args)
    dtype = torch.float32 if ranks.device.type == "cpu" else torch.bfloat16
    spec = model_spec(args)
    heads = spec.config["num_attention_heads"]
    if heads % ranks.degree:
        raise SystemExit(f"{heads} heads do not split over {ranks.degree} GPUs")
    metadata = dict(
        date=datetime.date.today().isoformat(), degree=ranks.degree, model=spec.name,
        label=f"Wan2.1 {spec.name} ({spec.config['num_layers']} layers, {heads} heads), {spec.grid.num_tokens} tokens",
        tokens=spec.grid.num_tokens, grid=list(spec.grid.shape), layers=spec.config["num_layers"], heads=heads,
        dtype=str(dtype).removeprefix("torch."), device_type=ranks.device.type,
        device_name=torch.cuda.get_device_name(ranks.device) if ranks.device.type == "cuda" else "cpu",
        torch=torch.__version__, fastdit=fastdit.__version__, git_commit=git_commit(), num_steps=NUM_STEPS,
        nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), warmup=args.warmup, repeat=args.repeat,
        check_layers=args.check_layers, smoke=args.smoke,
    )
    begin = time.perf_counter()
    model = build_transformer(spec, ranks.device, dtype, args.seed)
    if ranks.degree > 1:
        enable_ulysses(model, ranks.degree)
    inputs = make_inputs(spec, ranks.device, dtype, args.seed)
    if ranks.main:
        print(f"built {metadata['label']} on {ranks.degree} rank(s) in {time.perf_counter() - begin:.1f} s", flush=True)
    rows: list[dict] = []
    stock_ms = None
    baselines = load_degrees(args.out, metadata, args.baseline) if ranks.main else {}
    for name in [m for m in ALL_METHODS if m in args.methods]:
        started = time.perf_counter()
        method_rows, summary = run_method(name, model, inputs, ranks, args, spec, dtype, stock_ms)
        if name == "stock-cudnn":
            stock_ms = method_rows[0]["ms_step"]
        rows += method_rows + [summary]
        if ranks.main:
            for row in method_rows + [summary]:
                row.update(degree=ranks.degree, model=spec.name, tokens=spec.grid.num_tokens,
                           layers=spec.config["num_layers"], heads=heads, dtype=metadata["dtype"])
            compare_degrees(rows, ranks.degree, baselines.get(1) if ranks.degree > 1 else None)
            write(rows, metadata, args.out, f"u{ranks.degree}")  # after every method: partial results kept
            print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    if ranks.main:
        print()
        print(format_table(rows, metadata))
        print(f"\nwrote {args.out / stem(metadata)}_u{ranks.degree}.{{json,csv}}")


if __name__ == "__main__":
    main()
