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
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _versions

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = BACKENDS + ("auto",)

# The `with ember.backend(...)` stack, per thread (and per asyncio task). A ContextVar: every eager op
# call reads it, and it is several times cheaper to read than a threading.local attribute.
_stack: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("ember_backend_stack", default=())
_global_choice: str | None = None


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"ember: unknown backend {name!r}; expected one of {_CHOICES}")
    return name


def env(name: str) -> str | None:
    """``os.environ.get(name)``, cheaply: it is read on every eager op call, and os.environ's Mapping
    layer (key encoding, KeyError) costs about a microsecond; its backing dict is current (os.environ
    writes through it), so this sees what tests and users set at run time."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's os.environ
        return os.environ.get(name)
    value = data.get(_ENV_KEYS.get(name) or os.environ.encodekey(name))
    return None if value is None else os.environ.decodevalue(value)


_ENV_KEYS = {name: os.environ.encodekey(name) for name in ("EMBER_BACKEND", "TRITON_INTERPRET")}


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None restores the EMBER_BACKEND/auto default)."""
    global _global_choice
    _global_choice = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend an op called without ``backend=`` would request (may be "auto")."""
    stack = _stack.get()
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    return _check_name(env("EMBER_BACKEND") or "auto")


def ambient() -> tuple:
    """Everything a call's backend choice reads besides the call's own arguments: the ``with backend``
    stack, ``set_backend``, EMBER_BACKEND and TRITON_INTERPRET. For a caller that keeps its choice from
    one call to the next (Int8Linear's decode path): equal tuples, equal choice. A handful of loads,
    against about a microsecond for ``for_call``'s key and memo lookup (several times that in a model,
    where the call runs with cold caches)."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's os.environ
        return (_stack.get(), _global_choice, env("EMBER_BACKEND"), env("TRITON_INTERPRET"))
    return (_stack.get(), _global_choice, data.get(_ENV_KEYS["EMBER_BACKEND"]),
            data.get(_ENV_KEYS["TRITON_INTERPRET"]))


@contextlib.contextmanager
def backend(name: str):
    """Context manager: ops inside run on ``name`` unless a call passes ``backend=`` itself."""
    token = _stack.set(_stack.get() + (_check_name(name),))
    try:
        yield
    finally:
        _stack.reset(token)


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
    return env("TRITON_INTERPRET") == "1"


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
    # The answer depends on the device type, the op, the inputs the rules read and whether the Triton
    # interpreter is on (the tests toggle it), so it is computed once per combination.
    return _choose(name, device.type, op, label, triton_interpret(), tuple(sorted(inputs.items())))


@functools.lru_cache(maxsize=4096)
def _choose(name: str, device_type: str, op: str, label, _interpret: bool, items: tuple) -> str:
    device, inputs = torch.device(device_type), dict(items)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ()):
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


def for_call(requested: str | None, device: torch.device, op: str, *, label: str | None = None, **inputs) -> str:
    """The concrete backend a public function passes to its ``ember::`` op as ``backend``.

    Under torch.compile / export the choice is made once, at trace time, and baked into the graph (it
    reads thread-locals and the environment, which do not belong in a graph). "cpu" and "cuda" name the
    same ember_C kernels, which dispatch on the tensors' device, so a graph traced on one device still
    runs on the other."""
    if _is_compiling():
        return _traced_choice(requested, device, op, label, tuple(inputs.items()))
    name = requested if requested is not None else get_backend()
    # Every eager op call comes through here, so the answer is memoised on what it depends on (a call
    # site passes its inputs in a fixed order); choose() runs, and raises, only for a new combination.
    key = (name, device, op, label, env("TRITON_INTERPRET"), *inputs.items())
    chosen = _FOR_CALL.get(key)
    if chosen is None:
        chosen = _FOR_CALL[key] = choose(name, device, op, label=label, **inputs)
    return chosen


@torch.compiler.assume_constant_result
def _traced_choice(requested: str | None, device: torch.device, op: str, label: str | None, items: tuple) -> str:
    return choose(requested, device, op, label=label, **dict(items))


_FOR_CALL: dict[tuple, str] = {}
_is_compiling = torch.compiler.is_compiling


def resolve(requested: str | None, device: torch.device, op: str) -> str:
    """The backend a request names, judged on availability only: for ops no backend has rules for,
    and for the early checks before an op's inputs are known (the op then calls ``choose``)."""
    return choose(requested, device, op)
