"""Rendering of a ``fastdit compare`` result: console table, ``report.md``, ``report.html``, plots.

Works on the JSON form of the results (:mod:`fastdit.cli.compare` documents the schema), so a report
can be rendered again from a ``results.json``. Plots need matplotlib (the ``report`` extra); without
it the reports are written with tables only and a notice says why. ``report.html`` is one file: its
plots are embedded as base64 PNG (the videos are linked, relative to the report directory).

Plots:

* ``speedup_vs_psnr.png``: per method, end-to-end speedup over dense (filled) and transformer
  speedup (hollow) against PSNR vs dense; an infinite PSNR (identical video) is drawn at the right
  edge with an arrow marker;
* ``psnr_per_frame.png``: PSNR vs dense per frame, averaged over videos, one line per method
  (identical frames drawn at the top edge);
* ``density.png``: per method, a heatmap of attention density per layer (rows) and denoising step
  (columns), the mean over videos of fastdit's per-layer record (1 = dense);
* ``time_breakdown.png``: per run, the mean end-to-end time split into self-attention, the rest of
  the transformer, and everything outside it (text encoder, scheduler, VAE decode).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from ..files import atomic_path, atomic_write_text

__all__ = ["format_summary_table", "make_plots", "render_html", "render_markdown", "write_report"]

PLOT_NAMES = ("speedup_vs_psnr", "psnr_per_frame", "density", "time_breakdown")


# --------------------------------------------------------------------------- numbers
def _number(value) -> float | None:
    """A JSON number back to float ("inf" -> inf); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return float(value)  # "inf", "-inf", "nan"
    return float(value)


def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    value = _number(value)
    if value is None:
        return none
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def _fmt_seconds(value) -> str:
    value = _number(value)
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _fmt_memory(value) -> str:
    value = _number(value)
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def _fmt_share(value) -> str:
    value = _number(value)
    return "-" if value is None else f"{value:.0%}"


# --------------------------------------------------------------------------- tables
SUMMARY_COLUMNS = (
    "run", "method", "end-to-end", "speedup", "per step", "transformer", "speedup (tr.)",
    "self-attn share", "density", "peak memory", "PSNR dB", "SSIM", "LPIPS",
)


def summary_columns(results: dict) -> tuple[str, ...]:
    """``SUMMARY_COLUMNS``, with the checker's column when the videos were scored against their
    captions (``fastdit compare`` on the embedded trained model)."""
    if any((run["summary"].get("checker") is not None) for run in results["runs"]):
        return (*SUMMARY_COLUMNS, "checker colour/shape/motion")
    return SUMMARY_COLUMNS


def _fmt_checker(value) -> str:
    if not value:
        return "-"
    return " / ".join(f"{value[key]:.0%}" for key in ("colour", "shape", "motion"))


def _is_reference(results: dict, run: dict) -> bool:
    return run["label"] == results.get("reference", "dense")


def summary_rows(results: dict) -> list[list[str]]:
    checker = len(summary_columns(results)) > len(SUMMARY_COLUMNS)
    rows = []
    for run in results["runs"]:
        s = run["summary"]
        reference = _is_reference(results, run)
        rows.append([
            run["label"],
            run["method"],
            _fmt_seconds(s["run_s"]),
            _fmt(s["speedup_e2e"], ".2f") + "x",
            _fmt_seconds(s["step_s"]),
            _fmt_seconds(s["transformer_s"]),
            _fmt(s["speedup_transformer"], ".2f") + "x",
            _fmt_share(s["self_attention_share"]),
            "1 (dense)" if run["method"] == "stock" else _fmt(s["mean_density"], ".3f"),
            _fmt_memory(s["peak_memory_bytes"]),
            "ref" if reference else _fmt(s["psnr"], ".2f"),
            "ref" if reference else _fmt(s["ssim"], ".4f"),
            "ref" if reference else _fmt(s["lpips"], ".4f"),
        ] + ([_fmt_checker(s.get("checker"))] if checker else []))
    return rows


def video_rows(results: dict) -> list[list[str]]:
    with_reference_dir = results["settings"].get("reference_dir") is not None
    rows = []
    for run in results["runs"]:
        for video in run["videos"]:
            quality = video["quality"] or {}
            row = [
                run["label"], str(video["prompt_index"]), str(video["seed"]),
                _fmt_seconds(video["speed"]["run_s"]),
                _fmt_seconds(video["speed"]["transformer_s"]),
                _fmt(quality.get("psnr"), ".2f", "ref"), _fmt(quality.get("ssim"), ".4f", "ref"),
                _fmt(quality.get("lpips"), ".4f", "ref" if not quality else "-"),
            ]
            if with_reference_dir:
                other = video["quality_vs_reference_dir"] or {}
                row += [_fmt(other.get("psnr"), ".2f"), _fmt(other.get("ssim"), ".4f")]
            row.append(video["file"])
            rows.append(row)
    return rows


def video_columns(results: dict) -> list[str]:
    columns = ["run", "prompt", "seed", "end-to-end", "transformer", "PSNR dB", "SSIM", "LPIPS"]
    if results["settings"].get("reference_dir") is not None:
        columns += ["PSNR vs ref dir", "SSIM vs ref dir"]
    return columns + ["video"]


def format_summary_table(results: dict) -> str:
    """Fixed-width console table of the per-run summary."""
    columns = summary_columns(results)
    rows = [list(columns)] + summary_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _markdown_table(columns, rows) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def agg_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` when matplotlib is not
    installed (every fastdit plot, the report's and the benchmarks', goes through this)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, **kwargs) -> None:
    """``fig.savefig`` under a temporary name, renamed when complete (no partial PNG)."""
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=110, **kwargs)


def _finish(plt, fig, axis, path: Path, xlabel: str, ylabel: str, title: str,
            legend: bool) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    if legend:
        axis.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _method_runs(results: dict) -> list[dict]:
    """Every run but the reference (stock runs with a cache or compiled included)."""
    return [run for run in results["runs"] if not _is_reference(results, run)]


# Marker per cache of a combination run (compare --cache): the method keeps its colour.
_CACHE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _plot_speedup_vs_psnr(plt, results: dict, path: Path) -> None:
    runs = _method_runs(results)
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    psnrs = [_number(run["summary"]["psnr"]) for run in runs]
    finite = [p for p in psnrs if p is not None and math.isfinite(p)]
    right = (max(finite) + 5.0) if finite else 60.0
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Combinations (method x cache x quantize x compile): colour by method entry, marker by cache;
    # runs without those keys (older reports) get one colour each.
    bases = list(dict.fromkeys(run.get("base", run["label"]) for run in runs))
    caches = [None] + [c for c in dict.fromkeys((run.get("cache") or {}).get("label") for run in runs)
                       if c is not None]
    for run, psnr in zip(runs, psnrs):
        if psnr is None:
            continue
        color = colors[bases.index(run.get("base", run["label"])) % len(colors)]
        x = right if math.isinf(psnr) else psnr
        cache = (run.get("cache") or {}).get("label")
        marker = ">" if math.isinf(psnr) else _CACHE_MARKERS[caches.index(cache) % len(_CACHE_MARKERS)]
        e2e = _number(run["summary"]["speedup_e2e"])
        transformer = _number(run["summary"]["speedup_transformer"])
        if e2e is not None:
            axis.scatter([x], [e2e], color=color, marker=marker, s=60, label=run["label"])
            axis.annotate(run["label"], (x, e2e), textcoords="offset points", xytext=(6, 4),
                          fontsize=8)
        if transformer is not None:
            axis.scatter([x], [transformer], facecolors="none", edgecolors=color, marker=marker,
                         s=60)
    axis.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    title = "speed vs quality (filled: end to end, hollow: transformer)"
    if len(caches) > 1:
        title += "\ncolour: method, marker: cache (" + ", ".join(
            f"{_CACHE_MARKERS[i % len(_CACHE_MARKERS)]} {c or 'none'}" for i, c in enumerate(caches)) + ")"
    _finish(plt, fig, axis, path, "PSNR vs dense (dB; arrow at the edge: identical)",
            "speedup over dense", title, legend=bool(runs))


def _plot_psnr_per_frame(plt, results: dict, path: Path) -> None:
    fig, axis = plt.subplots(figsize=(6.5, 4.0))
    curves = {}
    for run in _method_runs(results):
        per_video = [[_number(v) for v in video["quality"]["psnr_per_frame"]]
                     for video in run["videos"] if video["quality"]]
        if not per_video:
            continue
        frames = min(len(v) for v in per_video)
        curves[run["label"]] = [
            math.inf if any(math.isinf(v[f]) for v in per_video)
            else sum(v[f] for v in per_video) / len(per_video)
            for f in range(frames)
        ]
    finite = [v for curve in curves.values() for v in curve if math.isfinite(v)]
    top = (max(finite) + 3.0) if finite else 60.0
    for label, curve in curves.items():
        shown = [top if math.isinf(v) else v for v in curve]
        axis.plot(range(len(shown)), shown, marker=".", label=label)
    if any(math.isinf(v) for curve in curves.values() for v in curve):
        axis.axhline(top, color="gray", linestyle="--", linewidth=1)
        axis.annotate("identical (inf)", (0, top), textcoords="offset points", xytext=(2, 3),
                      fontsize=8, color="gray")
    _finish(plt, fig, axis, path, "frame", "PSNR vs dense (dB), mean over videos",
            "per-frame PSNR", legend=bool(curves))


def _plot_density(plt, results: dict, path: Path) -> bool:
    runs = [run for run in _method_runs(results) if run["summary"].get("density")]
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(min(4.2 * len(runs), 16), 3.6), squeeze=False)
    image = None
    for axis, run in zip(axes[0], runs):
        density = run["summary"]["density"]
        values = [[math.nan if v is None else float(v) for v in row] for row in density["values"]]
        image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                            interpolation="nearest")
        steps = ["-" if s is None else str(s) for s in density["steps"]]
        layers = [str(layer) for layer in density["layers"]]
        axis.set_xticks(range(len(steps)), steps if len(steps) <= 25 else None)
        axis.set_yticks(range(len(layers)), layers if len(layers) <= 25 else None)
        if len(steps) * len(layers) <= 64:
            for row, line in enumerate(values):
                for column, value in enumerate(line):
                    if not math.isnan(value):
                        axis.text(column, row, f"{value:.2f}", ha="center", va="center",
                                  fontsize=7, color="white" if value < 0.6 else "black")
        axis.set_xlabel("denoising step")
        axis.set_ylabel("layer")
        axis.set_title(f"{run['label']} (mean {_fmt(run['summary']['mean_density'], '.3f')})",
                       fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="attention density")
    _save(fig, path, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_time_breakdown(plt, results: dict, path: Path) -> None:
    runs = results["runs"]
    labels = [run["label"] for run in runs]
    attention, transformer, outside = [], [], []
    for run in runs:
        s = run["summary"]
        total = _number(s["run_s"]) or 0.0
        in_transformer = _number(s["transformer_s"]) or 0.0
        share = _number(s["self_attention_share"])
        in_attention = in_transformer * share if share is not None else 0.0
        attention.append(in_attention)
        transformer.append(in_transformer - in_attention)
        outside.append(max(total - in_transformer, 0.0))
    fig, axis = plt.subplots(figsize=(max(4.5, 1.1 * len(runs) + 2), 4.0))
    positions = range(len(runs))
    axis.bar(positions, attention, label="self-attention modules")
    axis.bar(positions, transformer, bottom=attention, label="rest of the transformer")
    axis.bar(positions, outside, bottom=[a + t for a, t in zip(attention, transformer)],
             label="outside the transformer")
    axis.set_xticks(list(positions), labels, rotation=20)
    axis.set_ylabel("seconds per video (mean)")
    axis.set_title("where the time goes")
    axis.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def make_plots(results: dict, plots_dir: Path) -> tuple[list[Path], list[str]]:
    """Write the report's PNG plots into ``plots_dir``; returns (paths, notices)."""
    plt = agg_pyplot()
    if plt is None:
        return [], ["plots skipped: matplotlib is not installed (pip install 'fastdit[report]')"]
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths, notices = [], []
    if _method_runs(results):
        for name, plot in (("speedup_vs_psnr", _plot_speedup_vs_psnr),
                           ("psnr_per_frame", _plot_psnr_per_frame)):
            plot(plt, results, plots_dir / f"{name}.png")
            paths.append(plots_dir / f"{name}.png")
        if _plot_density(plt, results, plots_dir / "density.png"):
            paths.append(plots_dir / "density.png")
        else:
            notices.append("density heatmap skipped: no method recorded a density")
    _plot_time_breakdown(plt, results, plots_dir / "time_breakdown.png")
    paths.append(plots_dir / "time_breakdown.png")
    return paths, notices


# --------------------------------------------------------------------------- documents
_MEASUREMENT_NOTES = [
    "Reference: the same pipeline with diffusers' stock attention processors (dense), same "
    "prompts, seeds and settings. Speedup = dense mean time / method mean time.",
    "end-to-end: the whole pipeline call (text encoder, denoising loop, VAE decode); per step: "
    "between the pipeline's step callbacks (device synchronised); transformer: every transformer "
    "forward, synchronised at its boundaries.",
    "self-attn share: time inside the self-attention modules (forward hooks; CUDA events on the "
    "GPU, no sync inside the forward; QKV/out projections included) over transformer time.",
    "density: fraction of (query block, key block) pairs computed, fastdit's per-layer record "
    "averaged over layers and steps (dense layers and steps count as 1).",
    "PSNR/SSIM: on the uint8 frames before video encoding; video PSNR from the MSE of all frames "
    "(inf: identical), SSIM the mean over frames (Gaussian window 1.5, as scikit-image).",
]


def _settings_lines(results: dict) -> list[tuple[str, str]]:
    settings, env = results["settings"], results["environment"]
    model = (settings.get("model_description") or settings["model"]
             or "tiny (embedded, random weights)")
    size = (f"{settings['num_frames']} frames, {settings['height']}x{settings['width']} px, "
            f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}")
    device = env["gpu"] or env["device"]
    return [
        ("model", f"{model} ({settings['pipeline']}, {settings['transformer']})"),
        ("video", size.replace("None", "pipeline default")),
        ("device", f"{device}, {settings['dtype']}" + (", compiled" if settings["compile"] else "")
         + (", CPU offload" if settings["cpu_offload"] else "")),
        ("prompts", "; ".join(f"[{i}] {p}" for i, p in enumerate(settings["prompts"]))),
        ("seeds", ", ".join(str(s) for s in settings["seeds"])),
        ("warm-up", f"{settings['warmup']} untimed generation(s) per method"),
        ("software", f"fastdit {env['fastdit']}, torch {env['torch']}, triton {env['triton']}, "
         f"diffusers {env['diffusers']}" + (f", CUDA {env['cuda']}" if env["cuda"] else "")),
        ("created", results["created"]),
    ]


def render_markdown(results: dict, plot_paths: list[str]) -> str:
    lines = ["# fastdit compare", ""]
    lines += [f"- **{name}**: {value}" for name, value in _settings_lines(results)]
    if results["notices"]:
        lines += ["", "## Notices", ""] + [f"- {notice}" for notice in results["notices"]]
    lines += ["", "## Summary", "", _markdown_table(summary_columns(results), summary_rows(results)), ""]
    lines += ["Methods:", ""]
    lines += [f"- `{run['label']}`: {run['description']}" for run in results["runs"]]
    lines += ["", "## Plots", ""]
    if plot_paths:
        lines += [f"![{Path(p).stem}]({p})" for p in plot_paths]
    else:
        lines.append("(no plots: see the notices)")
    lines += ["", "## Videos", "", _markdown_table(video_columns(results), video_rows(results))]
    if results["grids"]:
        lines += ["", "Side by side: " + ", ".join(f"[{g}]({g})" for g in results["grids"])]
    lines += ["", "## How it is measured", ""] + [f"- {note}" for note in _MEASUREMENT_NOTES]
    lines += ["", "Machine-readable: `results.json` (schema in `fastdit/cli/compare.py`).", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.notice { background: #fff6d5; border-left: 4px solid #e0b400; padding: 0.4em 0.8em; margin: 0.3em 0; }
img { max-width: 100%; } video { max-width: 100%; margin: 0.5em 0; }
dt { font-weight: bold; float: left; width: 7em; } dd { margin-left: 8em; }
"""


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(results: dict, plots: dict[str, bytes]) -> str:
    """One self-contained page: tables, notices and the plots as base64 PNG."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>fastdit compare</title>",
             f"<style>{_CSS}</style></head><body><h1>fastdit compare</h1><dl>"]
    parts += [f"<dt>{html.escape(n)}</dt><dd>{html.escape(v)}</dd>"
              for n, v in _settings_lines(results)]
    parts.append("</dl>")
    if results["notices"]:
        parts.append("<h2>Notices</h2>")
        parts += [f"<div class='notice'>{html.escape(n)}</div>" for n in results["notices"]]
    parts += ["<h2>Summary</h2>", _html_table(summary_columns(results), summary_rows(results)), "<ul>"]
    parts += [f"<li><code>{html.escape(r['label'])}</code>: {html.escape(r['description'])}</li>"
              for r in results["runs"]]
    parts += ["</ul>", "<h2>Plots</h2>"]
    if plots:
        for name, png in plots.items():
            encoded = base64.b64encode(png).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(name)}' "
                         f"src='data:image/png;base64,{encoded}'></p>")
    else:
        parts.append("<p>(no plots: see the notices)</p>")
    parts += ["<h2>Videos</h2>", _html_table(video_columns(results), video_rows(results))]
    for grid in results["grids"]:
        parts.append(f"<p>{html.escape(grid)} (linked, next to this file)<br>"
                     f"<video controls loop muted src='{html.escape(grid)}'></video></p>")
    parts.append("<h2>How it is measured</h2><ul>")
    parts += [f"<li>{html.escape(note)}</li>" for note in _MEASUREMENT_NOTES]
    parts.append("</ul><p>Machine-readable: results.json (schema in fastdit/cli/compare.py).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict, out_dir: Path) -> dict:
    """Write plots, ``report.md`` and ``report.html`` into ``out_dir``.

    Returns ``{"plots": [paths], "notices": [str]}`` (notices: what was skipped and why).
    """
    out_dir = Path(out_dir)
    plot_paths, notices = make_plots(results, out_dir / "plots")
    shown = dict(results, notices=list(results["notices"]) + notices)
    relative = [str(p.relative_to(out_dir)).replace("\\", "/") for p in plot_paths]
    atomic_write_text(out_dir / "report.md", render_markdown(shown, relative))
    plots = {p.stem: p.read_bytes() for p in plot_paths}
    atomic_write_text(out_dir / "report.html", render_html(shown, plots))
    return {"plots": plot_paths, "notices": notices}
