"""Which implementation runs an op: the backend registry and the rules for choosing one.

Backends:
  "reference"  pure PyTorch (the test oracle; runs anywhere)
  "cpu"        ember's C++ CPU kernels (ember._C)
  "cuda"       ember's CUDA C++ kernels (ember._C built with CUDA)
  "triton"     ember's Triton kernels (GPU; on CPU tensors only under TRITON_INTERPRET=1)
  "auto"       the fastest backend available for the tensors' device

Precedence: the op's ``backend=`` argument, then the innermost ``with ember.backend(...)``, then
``ember.set_backend(...)``, then the ``EMBER_BACKEND`` environment variable, then "auto".
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from . import _versions

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = BACKENDS + ("auto",)

_local = threading.local()
_global_choice: str | None = None


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"ember: unknown backend {name!r}; expected one of {_CHOICES}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None restores the EMBER_BACKEND/auto default)."""
    global _global_choice
    _global_choice = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend an op called without ``backend=`` would request (may be "auto")."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    return _check_name(os.environ.get("EMBER_BACKEND", "auto"))


@contextlib.contextmanager
def backend(name: str):
    """Context manager: ops inside run on ``name`` unless a call passes ``backend=`` itself."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


# ----------------------------------------------------------------------------------------------
# What is available on this machine.
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def extension():
    """The compiled ember._C module, or None (pure-Python install or failed import)."""
    try:
        return importlib.import_module("ember._C")
    except ImportError as err:  # keep the reason for `python -m ember info`
        extension.error = str(err)  # type: ignore[attr-defined]
        return None


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and ext.with_cuda())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a sentence saying what is missing."""
    kind = device.type
    if name == "reference":
        return None
    if name == "cpu":
        if kind != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got tensors on {device}"
        if extension() is None:
            return "ember._C is not built (pure-Python install); reinstall with a C++ compiler"
        return None
    if name == "cuda":
        if kind != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got tensors on {device}"
        if not extension_has_cuda():
            return "ember._C was built without CUDA (needs a CUDA build of torch and a CUDA toolkit at install time)"
        return None
    if name == "triton":
        if triton_version() is None:
            return "triton is not installed (pip install triton)"
        version_problem = _versions.why_triton_off()
        if version_problem is not None:
            return version_problem
        if kind == "cuda":
            return None
        if kind == "cpu":
            if triton_interpret():
                return None
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        return f"the 'triton' backend does not support device {device}"
    raise ValueError(f"ember: unknown backend {name!r}")


# ----------------------------------------------------------------------------------------------
# What each backend's kernels take. A backend that is available on the device may still not take a
# call (the Triton GEMM has no float64, the CUDA int8 GEMM only per-channel W8A8, ...). Each backend
# declares that once, next to its kernels, as ``supports`` rules: a function of the call's inputs
# (keywords such as dtype=, mode=) returning None when the kernels take the call, else the reason.
#   kernels/supports.py       the Triton kernels
#   pyext/ember/ops/_native.py  ember._C's C++ CPU and CUDA kernels
# The reference backend takes everything.
# ----------------------------------------------------------------------------------------------
class BackendError(RuntimeError):
    """An explicitly requested backend cannot run a call. Explicit requests never fall back."""


@dataclass(frozen=True)
class Rule:
    backend: str
    op: str
    check: Callable[..., "str | None"]
    summary: str  # one line for `python -m ember info`


_RULES: dict[tuple[str, str], Rule] = {}


def supports(backend: str, *ops: str, summary: str):
    """Decorator: ``check(**inputs) -> None | reason`` is what ``backend``'s kernels take for ``ops``."""
    _check_name(backend)

    def register(check):
        for op in ops:
            _RULES[(backend, op)] = Rule(backend, op, check, summary)
        return check

    return register


def dense_update_rule(kernels: str, dtypes: tuple[torch.dtype, ...], layout: str) -> Callable[..., "str | None"]:
    """The rule of a multi-tensor update kernel: it updates parameters of ``dtypes`` that are dense in
    the sense ``layout`` words (the caller judges ``dense`` that way)."""
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)

    def check(*, dtype: torch.dtype, dense: bool) -> str | None:
        if dtype not in dtypes:
            return f"{kernels} update {names} parameters, got {dtype}"
        if not dense:
            return f"{kernels} walk dense ({layout}) parameters"
        return None

    return check


def rules() -> tuple[Rule, ...]:
    _load_rules()
    return tuple(_RULES.values())


@functools.lru_cache(maxsize=None)
def _load_rules() -> None:
    # Importing the declaring modules registers their rules. ember.kernels.supports needs no triton.
    importlib.import_module("ember.ops._native")
    importlib.import_module("ember.kernels.supports")


def why_not(name: str, op: str, **inputs) -> str | None:
    """None when backend ``name``'s kernels take this call of ``op``, else the reason."""
    _load_rules()
    rule = _RULES.get((name, op))
    return None if rule is None else rule.check(**inputs)


# Fastest first, per device type: "auto" takes the first that is available and supports the call. For
# the memory-bound ops so far the CUDA C++ kernels beat Triton; Triton serves what they do not take.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def choose(requested: str | None, device: torch.device, op: str, *, label: str | None = None, **inputs) -> str:
    """The concrete backend that runs this call of ``op`` (None = the ambient request).

    "auto": the fastest backend available on ``device`` whose kernels take the inputs. An explicit
    name: that backend, or a BackendError naming it and the reason it cannot run the call. Without
    inputs only availability is judged (``resolve``)."""
    name = _check_name(requested) if requested is not None else get_backend()
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            if why_unavailable(candidate, device) is None and (not inputs or why_not(candidate, op, **inputs) is None):
                return candidate
        return "reference"
    where = f"ember.{label}" if label else f"ember.ops.{op}"
    reason = why_unavailable(name, device)
    if reason is not None:
        raise BackendError(f"{where}: backend {name!r} is unavailable: {reason}")
    reason = why_not(name, op, **inputs) if inputs else None
    if reason is not None:
        raise BackendError(f"{where}: backend {name!r} cannot run this call: {reason}. Use backend='auto' "
                           "to let ember choose one that can")
    return name


def resolve(requested: str | None, device: torch.device, op: str) -> str:
    """The backend a request names, judged on availability only: for ops no backend has rules for,
    and for the early checks before an op's inputs are known (the op then calls ``choose``)."""
    return choose(requested, device, op)


@functools.lru_cache(maxsize=None)
def _native_auto(device_type: str) -> bool:
    # What "auto" resolves to depends only on the device type and on the build of ember._C.
    if device_type == "cpu":
        return extension() is not None
    return device_type == "cuda" and extension_has_cuda()


def native(requested: str | None, device: torch.device, op: str) -> bool:
    """Whether a call resolves to ember's compiled kernels ("cpu" / "cuda": the ember_C ops), which
    the eager fast paths then call directly. The common case ("auto" on CPU or CUDA) is one cached
    lookup; anything else goes through resolve(), which also raises for an unavailable request."""
    name = requested if requested is not None else get_backend()
    if name == "auto" and device.type in ("cpu", "cuda"):
        return _native_auto(device.type)
    return resolve(name, device, op) in ("cpu", "cuda")


# Under torch.compile / torch.export the request is read once, at trace time, and baked into the
# graph as the op's `backend` string argument (it reads thread-locals and the environment, which do
# not belong in a graph). "auto" stays "auto" in the graph and is resolved per call from the tensors'
# device, so an exported program still runs on another device.
@torch.compiler.assume_constant_result
def request(backend: str | None, device: torch.device, op: str) -> str:
    """What an op call asks for: "auto", or an explicit backend checked to be available here."""
    name = _check_name(backend) if backend is not None else get_backend()
    return name if name == "auto" else resolve(name, device, op)
