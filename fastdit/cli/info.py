"""``fastdit info``: versions, optional packages, which kernel backends can run here and why not,
and the supported models, methods (with their options) and presets."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..methods import available as available_methods
from .common import resolve_device

__all__ = ["cmd_info"]


def _option_defaults(cls: type) -> str:
    """``decay=0.2, block_size=128, window (required)`` for a method class."""
    names, required = cls.options()
    defaults = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
    parts = []
    for name in names:
        if name in required:
            parts.append(f"{name} (required)")
        elif name in defaults:
            parts.append(f"{name}={defaults[name]!r}")
        else:
            parts.append(name)
    return ", ".join(parts) if parts else "(no options)"


def cmd_info(args: argparse.Namespace) -> int:
    """``fastdit info``: what this machine can run, and why not where it cannot."""
    import importlib.metadata
    import importlib.util

    import torch

    import fastdit
    from fastdit.kernels import explain_backends
    from fastdit.kernels.backend import EXPLAINED_CALLS

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    device = resolve_device(args.device)
    rows = [("fastdit", fastdit.__version__), ("python", sys.version.split()[0])]
    rows += [(package, version(package)) for package in ("torch", "triton", "diffusers", "transformers")]
    if torch.cuda.is_available():
        rows.append(("cuda", torch.version.cuda))
        rows.append(("cudnn", str(torch.backends.cudnn.version())))
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            rows.append((f"gpu {index}", f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"))
    else:
        rows.append(("gpu", "none (CPU only)"))
    for name, value in rows:
        print(f"{name:<13} {value}")

    print("\noptional packages:")
    from .metrics import load_lpips

    optional = (
        ("imageio-ffmpeg", "writes mp4 videos (OpenCV's writer is the fallback)"),
        ("matplotlib", "plots of fastdit compare and fastdit bench"),
        ("lpips", "LPIPS in fastdit compare (also needs its AlexNet weights cached locally)"),
        ("accelerate", "--cpu-offload"),
        ("xformers", "xformers baseline of fastdit bench"),
        ("scikit-image", "the tests' PSNR/SSIM reference"),
    )
    for package, use in optional:
        print(f"  {package:<15} {version(package):<15} {use}")
    if version("lpips") != "not installed":
        _, lpips_reason = load_lpips("cpu")
        print(f"  LPIPS weights   {'found' if lpips_reason is None else lpips_reason}")
    flex = "available" if importlib.util.find_spec("torch.nn.attention.flex_attention") else (
        "not available in this torch")
    print(f"  FlexAttention   {flex} (baseline of fastdit bench)")

    dtype = getattr(torch, args.dtype)
    print(f"\nkernel backends for {device.type}, {args.dtype}, head_dim {args.head_dim} "
          "(tried in order; the first that can run a call runs it):")
    for call, fields in EXPLAINED_CALLS.items():
        reasons = explain_backends(device, dtype, args.head_dim, **fields)
        runs = next((name for name, reason in reasons.items() if reason is None), "none")
        print(f"  {call:<38} -> {runs}")
        for name, reason in reasons.items():
            if reason is not None and name != runs:
                print(f"  {'':<38}    {name} skipped: {reason}")
                continue
            if name == runs:
                break
        if runs == "triton" and fields["operation"] == "attention":
            specialized = reasons.warp_specialization
            if specialized is None:  # the CPU interpreter runs its loop, not specialized
                specialized = "yes" if device.type == "cuda" else "its loop (interpreter)"
            else:
                specialized = f"no, {specialized}"
            print(f"  {'':<38}    warp-specialized: {specialized}")
    from ..pipelines.base import adapters

    print("\nsupported model families (transformer class; fastdit generate --model picks by it):")
    families = {class_name: adapter().family_name() for class_name, adapter in adapters().items()}
    for class_name, family in sorted(families.items(), key=lambda item: item[1]):
        print(f"  {family:<32} {class_name}")
    methods = available_methods()
    print(f"attention methods: {', '.join(methods)}")
    for name, cls in methods.items():
        print(f"  {name:<10} {cls.__name__}: {_option_defaults(cls)}")
        if cls.presets():
            print(f"  {'':<10} presets: {', '.join(cls.presets())}")
    return 0

