"""Every ``ember::`` op, declared once: its schema and its fake (meta) kernel.

This is the one place an op's signature lives (the pattern of torchao's ``ops.py`` and bitsandbytes'
``_ops.py``). It needs nothing but torch, so ember imports, traces and exports without its compiled
extension. The rest of an op is registered against these names:

  CPU / CUDA kernels  the op's module in ember.ops (``torch.library.impl``): it runs the backend the
                      ``backend`` argument names (reference, cpu, cuda, triton, or "auto").
  Autograd            csrc/autograd.cpp, in ember._C (``TORCH_LIBRARY_IMPL(ember, Autograd)``), the one
                      autograd of each op. For plain eager tensors on the "cpu"/"cuda" backends it calls
                      the ember_C kernels itself, so an eager call costs one trip through the dispatcher.

``backend`` is an argument rather than a dispatch key because two backends (CUDA C++ and Triton) serve
the same device. ``act`` names an activation of ember.activations ("none" for the plain linear).
"""
from __future__ import annotations

import math

import torch

_lib = torch.library.Library("ember", "DEF")  # noqa: TOR901 - kept alive for the process


def _define(schema: str) -> None:
    _lib.define(schema)


# ---- activations -----------------------------------------------------------------------------
_define("unary_act(Tensor x, str act, str backend) -> Tensor")
_define("unary_act_backward(Tensor grad_out, Tensor x, str act, str backend) -> Tensor")
_define("gated_act(Tensor gate, Tensor up, str act, str backend) -> Tensor")
_define("gated_act_backward(Tensor grad_out, Tensor gate, Tensor up, str act, str backend) -> (Tensor, Tensor)")

# ---- matmul with fused epilogues -------------------------------------------------------------------
# linear_act: (act(x @ weight^T + bias) [+ residual], preact). preact is the pre-activation (rows, N),
# returned when save_preact and act != "none" (what the backward needs), else an empty tensor.
_define("linear_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str act, bool save_preact, "
        "str backend) -> (Tensor, Tensor)")
# Unneeded gradients come back as empty tensors. An empty preact is recomputed.
_define("linear_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor preact, str act, "
        "bool need_dx, bool need_dw, bool need_db, str backend) -> (Tensor, Tensor, Tensor)")
# gated_linear: act(x @ w_gate^T + b_gate) * (x @ w_up^T + b_up); preact is (rows, 2N) = [gate | up].
_define("gated_linear(Tensor x, Tensor w_gate, Tensor w_up, Tensor? b_gate, Tensor? b_up, str act, "
        "bool save_preact, str backend) -> (Tensor, Tensor)")
_define("gated_linear_backward(Tensor grad_out, Tensor x, Tensor w_gate, Tensor w_up, Tensor? b_gate, "
        "Tensor? b_up, Tensor preact, str act, bool need_dx, bool need_dw, bool need_db, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")

# grouped_gated_mlp (ops/moe.py): every expert's w_down[e] @ (act(gate) * up) over x's rows sorted by
# expert, offsets (E,) their end rows; w_gate_up (E, 2I, H) = each expert's [gate; up] rows, w_down
# (E, H, I). preact is (rows, 2I) = [gate | up] when saved.
_define("grouped_gated_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor offsets, str act, bool save_preact, "
        "str backend) -> (Tensor, Tensor)")
_define("grouped_gated_mlp_backward(Tensor grad_out, Tensor x, Tensor w_gate_up, Tensor w_down, Tensor offsets, "
        "Tensor preact, str act, bool need_dx, bool need_dw, str backend) -> (Tensor, Tensor, Tensor)")

# ---- fused linear + cross-entropy (ops/linear_cross_entropy.py) ------------------------------------
# (loss, dx, dw, db): the loss of cross_entropy(x @ weight^T + bias, target) (x 2-D; fp32, or fp64 for
# fp64 x; (rows,) for reduction "none", else 0-d) and, when need_* (reduction mean / sum only), the
# gradients of that loss, computed in the same pass; unneeded ones are empty. chunk_rows: 0 = auto.
_define("linear_cross_entropy(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, str reduction, "
        "float label_smoothing, bool need_dx, bool need_dw, bool need_db, int chunk_rows, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor)")
# reduction "none": the gradients for the per-row upstream gradient grad_loss, logits recomputed.
_define("linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, Tensor target, "
        "int ignore_index, float label_smoothing, bool need_dx, bool need_dw, bool need_db, int chunk_rows, "
        "str backend) -> (Tensor, Tensor, Tensor)")

# ---- int8 inference -----------------------------------------------------------------------------
_define("quantize_per_token(Tensor x, Tensor? smooth, str backend) -> (Tensor, Tensor)")
_define("int8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, Tensor? smooth, str act, str mode, "
        "str backend, Tensor? w_packed=None) -> Tensor")
_define("int8_prepack(Tensor w, Tensor w_scale, str mode, str backend) -> Tensor")

# ---- optimizer steps (in place) --------------------------------------------------------------------
# One step over a (device, dtype) group; csrc/optim.h documents kinds, state slots, hyper and flags.
_define("optim_step(str kind, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] s1, Tensor(c!)[] s2, "
        "Tensor(d!)[] s3, Tensor(e!)[] masters, Tensor(f!)[] steps, float[] hyper, int flags, Tensor? lr, "
        "Tensor? grad_scale, Tensor? found_inf, str backend) -> ()")
_define("adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor(d!)[] exp_avg_absmax, Tensor(e!)[] exp_avg_sq_absmax, Tensor(f!)[] steps, float[] hyper, "
        "int flags, Tensor? lr, Tensor? grad_scale, Tensor? found_inf, str backend) -> ()")


# ---------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes only.
# ---------------------------------------------------------------------------------------------
def _fake(name: str):
    return torch.library.register_fake(f"ember::{name}", lib=_lib)


def _nrows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


@_fake("unary_act")
def _(x, act, backend):
    return x.new_empty(x.shape)


@_fake("unary_act_backward")
def _(grad_out, x, act, backend):
    return x.new_empty(x.shape)


@_fake("gated_act")
def _(gate, up, act, backend):
    return gate.new_empty(gate.shape)


@_fake("gated_act_backward")
def _(grad_out, gate, up, act, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@_fake("linear_act")
def _(x, weight, bias, residual, act, save_preact, backend):
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    if save_preact and act != "none":
        return out, x.new_empty((_nrows(x), weight.shape[0]))
    return out, _empty(x)


@_fake("linear_act_backward")
def _(grad_out, x, weight, bias, preact, act, need_dx, need_dw, need_db, backend):
    return (
        x.new_empty(x.shape) if need_dx else _empty(x),
        x.new_empty(weight.shape) if need_dw else _empty(x),
        x.new_empty((weight.shape[0],)) if need_db else _empty(x),
    )


@_fake("gated_linear")
def _(x, w_gate, w_up, b_gate, b_up, act, save_preact, backend):
    h = x.new_empty((*x.shape[:-1], w_gate.shape[0]))
    return h, (x.new_empty((_nrows(x), 2 * w_gate.shape[0])) if save_preact else _empty(x))


@_fake("gated_linear_backward")
def _(grad_out, x, w_gate, w_up, b_gate, b_up, preact, act, need_dx, need_dw, need_db, backend):
    n = w_gate.shape[0]
    return (
        x.new_empty(x.shape) if need_dx else _empty(x),
        x.new_empty(w_gate.shape) if need_dw else _empty(x),
        x.new_empty(w_up.shape) if need_dw else _empty(x),
        x.new_empty((n,)) if need_db else _empty(x),
        x.new_empty((n,)) if need_db else _empty(x),
    )


@_fake("grouped_gated_mlp")
def _(x, w_gate_up, w_down, offsets, act, save_preact, backend):
    pre = x.new_empty((x.shape[0], w_gate_up.shape[1])) if save_preact else _empty(x)
    return x.new_empty((x.shape[0], w_down.shape[1])), pre


@_fake("grouped_gated_mlp_backward")
def _(grad_out, x, w_gate_up, w_down, offsets, preact, act, need_dx, need_dw, backend):
    return (x.new_empty(x.shape) if need_dx else _empty(x), w_gate_up.new_empty(w_gate_up.shape) if need_dw
            else _empty(x), w_down.new_empty(w_down.shape) if need_dw else _empty(x))


@_fake("linear_cross_entropy")
def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, need_dx, need_dw, need_db, chunk_rows,
      backend):
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=wide)
    return (
        loss,
        x.new_empty(x.shape) if need_dx else _empty(x),
        x.new_empty(weight.shape) if need_dw else _empty(x),
        x.new_empty((weight.shape[0],)) if need_db and bias is not None else _empty(x),
    )


@_fake("linear_cross_entropy_backward")
def _(grad_loss, x, weight, bias, target, ignore_index, label_smoothing, need_dx, need_dw, need_db, chunk_rows,
      backend):
    return (
        x.new_empty(x.shape) if need_dx else _empty(x),
        x.new_empty(weight.shape) if need_dw else _empty(x),
        x.new_empty((weight.shape[0],)) if need_db and bias is not None else _empty(x),
    )


@_fake("quantize_per_token")
def _(x, smooth, backend):
    K = x.shape[-1]
    M = x.numel() // K if K else _nrows(x)
    return x.new_empty(M, K, dtype=torch.int8), x.new_empty(M, dtype=torch.float32)


@_fake("int8_linear")
def _(x, w, w_scale, bias, smooth, act, mode, backend, w_packed=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@_fake("int8_prepack")
def _(w, w_scale, mode, backend):
    # The packed size is the C++ rule's (ember_C's own Meta kernel); the op module says whether this
    # backend packs at all.
    from .int8 import packed_by

    if packed_by(w, mode, backend) is None:
        return w.new_empty(0)
    return torch.ops.ember_C.int8_prepack(w, w_scale)


@_fake("optim_step")
def _(kind, params, grads, s1, s2, s3, masters, steps, hyper, flags, lr, grad_scale, found_inf, backend):
    return None


@_fake("adamw8bit_step")
def _(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, hyper, flags, lr, grad_scale,
      found_inf, backend):
    return None


def impl(name: str):
    """Decorator: ``fn`` is op ``name``'s CPU and CUDA kernel (the backend router of its module)."""
    return torch.library.impl(f"ember::{name}", ("cpu", "cuda"), lib=_lib)


_DIFFERENTIABLE = ("linear_act", "gated_linear", "grouped_gated_mlp", "unary_act", "gated_act", "int8_linear", "linear_cross_entropy")


def guard_without_extension() -> None:
    """Without ember._C there is no autograd for the ops (csrc/autograd.cpp is in it). Then a call that
    would need one raises, instead of torch's silent "no autograd kernel" fallback; the "reference"
    backend never comes here (it is plain torch, differentiated by torch)."""
    for name in _DIFFERENTIABLE:
        op = getattr(torch.ops.ember, name).default

        def no_autograd(*args, _op=op, _name=name):
            if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                raise RuntimeError(f"ember::{_name}: the backward of ember's compiled backends lives in ember._C, "
                                   "which is not built; use backend='reference' to train without it")
            with torch._C._AutoDispatchBelowAutograd():
                return _op(*args)

        _lib.impl(name, no_autograd, "Autograd")
