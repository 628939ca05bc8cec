"""What this ember install can do on this machine (``python -m ember info``)."""
from __future__ import annotations

import os
import platform

import torch

from . import _backend, _versions


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return platform.machine()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return " ".join(w for w in wanted if w in flags) or platform.machine()


def _build_archs() -> str:
    try:
        from ._build_info import CUDA_ARCHS
    except ImportError:
        return "unknown"
    return CUDA_ARCHS


def describe() -> str:
    ext = _backend.extension()
    lines = [
        f"ember        {__import__('ember').__version__}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton       {_backend.triton_version() or 'not installed'}"
        + ("  [TRITON_INTERPRET=1: kernels run on CPU tensors]" if _backend.triton_interpret() else ""),
        f"supported    torch {_versions._fmt(_versions.TORCH_MIN)}-{_versions._fmt(_versions.TORCH_MAX)}, "
        f"triton {_versions._fmt(_versions.TRITON_MIN)}-{_versions._fmt(_versions.TRITON_MAX)}",
        f"ember._C     "
        + (
            f"built: C++ CPU kernels ({ext.cpu_isa()} dispatch)" + (", CUDA kernels" if ext.with_cuda() else ", no CUDA")
            if ext is not None
            else f"missing ({getattr(_backend.extension, 'error', 'not built')}); reference and Triton still work"
        ),
        f"CPU          {platform.processor() or platform.machine()}, {os.cpu_count()} cores; ISA: {_cpu_flags()}",
    ]
    if ext is not None and ext.with_cuda():
        lines.append(f"CUDA archs   {_build_archs()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU          {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU          none")
    lines.append(f"backend      requested: {_backend.get_backend()}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        device = torch.device(dev)
        status = ", ".join(
            f"{name}: {'live' if _backend.why_unavailable(name, device) is None else 'off'}" for name in _backend.BACKENDS
        )
        lines.append(f"  on {dev:4s}   {status}; auto -> {_backend.resolve('auto', device, 'info')}")
    return "\n".join(lines)
