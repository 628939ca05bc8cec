"""ember: fused Triton / CUDA C++ / C++ kernels for PyTorch, as drop-in modules and ops.

    import ember
    y = ember.ops.swiglu(gate, up)             # one op, backend chosen for the device
    report = ember.swap(model)                 # replace activations / gated MLPs in place
    with ember.backend("triton"): ...          # force a backend
    report = ember.quantize(model, mode="w8a8")  # int8 Linear layers, in place
"""
from ._versions import check_at_import as _check_versions

_check_versions()  # torch / triton in the supported range (pyproject.toml), else a clear message

from ._backend import BACKENDS, BackendError, backend, get_backend, set_backend  # noqa: E402
from . import activations, ops, nn, optim  # noqa: E402  (ops registers the torch.library custom ops)
from .swap import SwapReport, SwapRule, register_rule, swap, unswap  # noqa: E402  (the function shadows the package name)
from . import quant  # noqa: E402
from .quant import quantize  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # ember.onnx on first use, not at import: it needs onnxscript, which plain ember does not.
    if name == "onnx":
        import importlib

        return importlib.import_module(".onnx", __name__)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")


def available_backends(device="cpu") -> dict:
    """{backend: None if usable on ``device`` else the reason it is not}."""
    import torch

    from ._backend import why_unavailable

    dev = torch.device(device)
    return {name: why_unavailable(name, dev) for name in BACKENDS}


__all__ = ["ops", "nn", "optim", "quant", "quantize", "swap", "unswap", "SwapRule", "SwapReport", "register_rule", "backend", "set_backend", "get_backend", "available_backends", "BACKENDS", "BackendError"]
