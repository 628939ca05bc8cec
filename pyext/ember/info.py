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


def native_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether the C++ CPU kernels found a native dot product for bf16 / fp16 on this CPU (the
    "16-bit GEMMs" line of the ISA report); where not, their big enough 16-bit GEMMs run in fp32."""
    ext = _backend.extension()
    report = getattr(ext, "cpu_isa_report", None) if ext is not None else None
    if report is None or dtype not in (torch.bfloat16, torch.float16):
        return False
    fields = dict(line.split(": ", 1) for line in report().splitlines() if ": " in line)
    part = fields.get("16-bit GEMMs", "").split(",")[0 if dtype == torch.bfloat16 else 1]
    return "not native" not in part


def _int8_isa(ext) -> list[str]:
    """Which kernels the CPU int8 ops run on (AMX tiles, AVX512-VNNI, ...) and why AMX is off if it is."""
    report = getattr(ext, "cpu_isa_report", None) if ext is not None else None
    if report is None:
        return []
    fields = dict(line.split(": ", 1) for line in report().splitlines() if ": " in line)
    lines = [f"CPU int8     {fields.get('int8', 'unknown')}"]
    if "amx off" in fields:
        lines.append(f"             AMX off: {fields['amx off']}")
    if "16-bit GEMMs" in fields:
        lines.append(f"CPU 16-bit   {fields['16-bit GEMMs']}")
    return lines


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
    lines += _int8_isa(ext)
    if ext is not None and ext.with_cuda():
        lines.append(f"CUDA archs   {_build_archs()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU          {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU          none")
    lines.append(f"backend      requested: {_backend.get_backend()}")
    lines += _registry(["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    return "\n".join(lines)


# The ops whose backends the registry chooses between, in the order users meet them.
_OPS = ("unary_act", "gated_act", "linear", "gated_linear", "grouped_gated_mlp", "quantize_per_token", "int8_linear",
        "optim_step", "adamw8bit_step")


def _registry(devices: list[str]) -> list[str]:
    """Per device: which backends are live (and why the others are not), then per op the order "auto"
    tries the live ones in, each with what its kernels take (its supports rule; none: every input)."""
    rules = {(r.backend, r.op): r.summary for r in _backend.rules()}
    lines = []
    for dev in devices:
        device = torch.device(dev)
        off = {name: _backend.why_unavailable(name, device) for name in _backend.BACKENDS}
        live = [n for n in _backend._AUTO_ORDER.get(device.type, ("reference",)) if off[n] is None]
        explicit = [n for n in _backend.BACKENDS if off[n] is None and n not in live]
        lines.append(f"  on {dev:4s}   live: {', '.join(live)}"
                     + (f"; {', '.join(explicit)} only when asked for by name" if explicit else ""))
        for name, reason in off.items():
            if reason is not None:
                lines.append(f"               {name} off: {reason}")
        for op in _OPS:
            order = " > ".join(f"{n} ({rules[(n, op)]})" if (n, op) in rules else n for n in live)
            lines.append(f"    {op:19s}{order}")
    return lines
