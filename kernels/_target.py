"""Where a Triton launch is headed, asked in one place by every launcher in this package.

Three cases:
  * a GPU: tensors on CUDA, launch parameters for the GPU;
  * the interpreter (TRITON_INTERPRET=1, how CI runs the kernels on CPU tensors): few wide programs,
    since each program is a Python round trip, and bf16 rounding fixed by hand (activation.to_output);
  * a compile-only target (``python -m ember compile-check``): CPU tensors, no interpreter, a stand-in
    driver that reports a GPU architecture. Launchers must then pick exactly what they would pick on
    that GPU, so the device's properties come from here, not from torch.cuda.

So the launchers branch on ``interpreting()``, never on ``tensor.device.type``.
"""
from __future__ import annotations

import contextlib
import os

import torch

# Triton reads the variable when a kernel is decorated; so do we, once.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class CompileTarget:
    """The GPU a compile-only run stands in for (set by ember.compile_check)."""

    def __init__(self, name: str, capability: tuple[int, int], sm_count: int):
        self.name, self.capability, self.sm_count = name, capability, sm_count


_compile_target: CompileTarget | None = None


def set_compile_target(target: CompileTarget | None) -> None:
    global _compile_target
    _compile_target = target


def interpreting() -> bool:
    """True when kernels run in Triton's interpreter (launch parameters for the CPU)."""
    return _INTERPRET and _compile_target is None


def device_name(device: torch.device) -> str:
    if _compile_target is not None:
        return _compile_target.name
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def capability(device: torch.device) -> tuple[int, int]:
    if _compile_target is not None:
        return _compile_target.capability
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def sm_count(device: torch.device) -> int:
    if _compile_target is not None:
        return _compile_target.sm_count
    if device.type != "cuda":
        return 4  # interpreter: a few persistent programs, so each walks several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


# Largest shared memory one block may opt into, by compute capability (CUDA programming guide,
# "Technical Specifications"): a config over it compiles but fails at launch (OutOfResources).
_SMEM_PER_BLOCK = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (7, 5): 65536}


def shared_mem_limit(device: torch.device) -> int:
    """Bytes of shared memory one block can use on the GPU a launch is headed for."""
    if _compile_target is None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
    return _SMEM_PER_BLOCK.get(capability(device), 101376)


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for CUDA tensors (a launch goes to the *current* device, so a
    tensor on cuda:1 needs it current); nothing for CPU, interpreter and compile-only runs."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
