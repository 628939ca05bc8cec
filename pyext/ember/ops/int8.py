"""Int8 inference ops: ``ember::quantize_per_token``, ``ember::int8_linear`` and ``ember::int8_prepack``.

Quantization is symmetric (no zero points): an int8 value q stands for q * scale.

  weights      per output channel (scale (N,)) or per group of ``group_size`` input channels
               (scale (N, K / group_size)); made once, offline, by ``quantize_weight``
  activations  per token (row) at run time: scale_m = max_k |x[m, k]| / 127, computed inside the op

``int8_linear(x, w, w_scale, bias, activation=, mode=, smooth=)`` computes ``act(x @ dequant(w).T + bias)``:

  mode="w8a16"  weight-only: the int8 weight is widened inside the GEMM (x keeps its precision)
  mode="w8a8"   dynamic: x is quantized per token, the product runs on int8 units with int32
                accumulation, and the dequantization (row scale x column scale), bias and activation
                are the GEMM's epilogue
  smooth        optional (K,) fp32 per-input-channel multiplier applied to x before quantization
                (SmoothQuant's 1 / s; ``ember.quantize`` folds s into the weight)

``int8_prepack(w, w_scale, mode=)`` is the weight in the layout a backend's own W8A8 kernel reads
(``int8_linear(..., w_packed=)``), made once per weight; an empty tensor where the backend reads the
plain weight. Only the C++ CPU kernel has one (its layout is described beside it, csrc/cpu/int8.cpp).

Rows whose activations hold NaN or Inf give NaN outputs in that row only (torch would give a mix of
+-Inf and NaN there); other rows are never affected. Inference only: backward raises.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, activations
from ._common import as_rows, check_float
from ._schemas import impl

MODES = ("w8a8", "w8a16")
ACT_IDS = activations.ID  # the epilogue's activation, as the kernels' int code
QMAX = 127.0


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the test oracle and the fallback on any device).
# ---------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight, per output channel (``group_size=None``) or per group of input channels.

    Returns ``(w_int8 (N, K), scale fp32 (N,) or (N, K // group_size))``. An all-zero row (or group)
    gets scale 0 and zeros, so it dequantizes to exactly zero.
    """
    check_float("quantize_weight", "w", w)
    if w.dim() != 2:
        raise ValueError(f"ember.ops.quantize_weight: w must be 2-D (out_features, in_features), got {w.dim()}-D")
    N, K = w.shape
    g = check_group_size("quantize_weight", K, group_size)
    wf = w.detach().to(torch.float32 if w.dtype != torch.float64 else torch.float64).reshape(N, K // g, g)
    if not wf.is_meta and not torch.isfinite(wf).all():
        raise ValueError("ember.ops.quantize_weight: w holds NaN or Inf; such a weight cannot be quantized")
    amax = wf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, QMAX / amax, torch.zeros_like(amax))
    q = torch.round(wf * inv).clamp_(-QMAX, QMAX).to(torch.int8).reshape(N, K)
    scale = (amax / QMAX).to(torch.float32).reshape(N, K // g)
    return q, (scale.reshape(N) if group_size is None else scale)


def check_group_size(op: str, K: int, group_size: int | None) -> int:
    if group_size is None:
        return K
    if not isinstance(group_size, int) or group_size <= 0 or K % group_size:
        raise ValueError(f"ember.ops.{op}: group_size must be a positive divisor of in_features={K}, got {group_size!r}")
    return group_size


def quantize_per_token_reference(x: torch.Tensor, smooth: torch.Tensor | None = None):
    """(q int8, scale fp32) per row of ``x.reshape(-1, K)``; the same fp32 arithmetic as the kernels."""
    xf = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).float()  # not (-1, K): ambiguous when K == 0
    if smooth is not None:
        xf = xf * smooth.float()
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    amax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] else xf.new_zeros(xf.shape[0], 1)
    # torch.full_like(amax, QMAX) / amax, not QMAX / amax: torch computes scalar / tensor as
    # reciprocal(tensor) * scalar, one ulp away from the kernels' 127 / amax, and x * inv then lands
    # on the other side of a .5 tie now and then (one element of one row off by one step).
    inv = torch.where(amax > 0, torch.full_like(amax, QMAX) / amax, torch.zeros_like(amax))
    q = torch.round(torch.where(finite, xf * inv, 0.0)).clamp_(-QMAX, QMAX).to(torch.int8)
    # amax / a tensor of 127s, not amax / 127: on CUDA torch turns division by a Python scalar into a
    # multiplication by its rounded reciprocal, which the kernels' correctly rounded division (CUDA
    # `/`, Triton tl.div_rn) does not match bit for bit.
    scale = torch.where(finite, amax / torch.full_like(amax, QMAX), torch.full_like(amax, math.nan)).reshape(-1)
    return q, scale


def _expand_scale(w_scale: torch.Tensor, K: int) -> torch.Tensor:
    """(N,) or (N, G) scales -> (N, K) per-element scales."""
    if w_scale.dim() == 1:
        return w_scale[:, None].expand(-1, K)
    return w_scale.repeat_interleave(K // w_scale.shape[1], dim=1)


def dequantize_weight(w: torch.Tensor, w_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (w.to(torch.float32) * _expand_scale(w_scale.float(), w.shape[1])).to(dtype)


def _finish(y: torch.Tensor, bias, act: str, dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    if act != "none":
        y = activations.reference(y, act)
    return y.to(dtype)


def int8_linear_reference(x, w, w_scale, bias=None, act="none", mode="w8a8", smooth=None) -> torch.Tensor:
    K, N = w.shape[1], w.shape[0]
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, K)
    if mode == "w8a16":
        xs = x2.to(wide) * smooth.to(wide) if smooth is not None else x2.to(wide)
        y = xs @ dequantize_weight(w, w_scale, wide).T
    else:
        q, sx = quantize_per_token_reference(x2, smooth)
        G = 1 if w_scale.dim() == 1 else w_scale.shape[1]
        sw = w_scale.reshape(N, G).double()
        # int32-exact products in float64 (|sum| < 2^53), one per weight group
        qg, wg = q.double().reshape(-1, G, K // G), w.double().reshape(N, G, K // G)
        acc = torch.einsum("mgk,ngk->mng", qg, wg)
        y = ((acc * sw[None]).sum(-1) * sx.double()[:, None]).to(wide)
    return _finish(y, bias, act, x.dtype).reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------------------------------------
# Backends.
# ---------------------------------------------------------------------------------------------
def _quantize_forward(x, smooth, backend):
    backend = _backend.resolve(backend, x.device, "quantize_per_token")
    if backend == "reference":
        return quantize_per_token_reference(x, smooth)
    x2 = as_rows(x)
    if backend == "triton":
        from ember.kernels import int8_gemm as tk

        return tk.quantize_per_token(x2, smooth)
    return torch.ops.ember_C.quantize_per_token(x2, smooth)  # C++ CPU or CUDA kernel


def _linear_forward(x, w, w_scale, bias, smooth, act, mode, backend, w_packed=None):
    N, K = w.shape
    group = None if w_scale.dim() == 1 or w_scale.shape[1] == 1 else K // w_scale.shape[1]
    backend = _backend.choose(backend, x.device, "int8_linear", mode=mode, group=group, in_features=K)
    if backend == "reference":
        return int8_linear_reference(x, w, w_scale, bias, act, mode, smooth)
    x2 = as_rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], N)
    if backend == "triton":
        from ember.kernels import int8_gemm as tk

        y = tk.int8_linear(x2, w, w_scale, bias, smooth, ACT_IDS[act], mode)
    elif backend == "cuda":
        y = torch.ops.ember_C.int8_linear_w8a8(x2, w, w_scale.reshape(N), bias, smooth, ACT_IDS[act])
    else:
        y = cpu_kernel(x2, w, w_scale, bias, smooth, act, mode, w_packed)
    return torch.ops.aten._unsafe_view.default(y, (*x.shape[:-1], N))


def cpu_kernel(x2, w, w_scale, bias, smooth, act, mode, w_packed=None) -> torch.Tensor:
    """The C++ CPU kernel's call on rows x2 (M, K): ember.ops.int8_linear's "cpu" backend, and the direct
    call Int8Linear makes in eager inference (see its forward)."""
    if mode == "w8a8":
        grouped = w_scale.dim() == 2 and w_scale.shape[1] > 1
        return torch.ops.ember_C.int8_linear_w8a8(x2, w, w_scale if grouped else w_scale.reshape(w.shape[0]), bias,
                                                  smooth, ACT_IDS[act], w_packed)
    if smooth is not None:
        x2 = x2 * smooth.to(x2.dtype)
    return torch.ops.ember_C.int8_linear_w8a16(x2, w, w_scale, bias, ACT_IDS[act])


impl("quantize_per_token")(_quantize_forward)
impl("int8_linear")(_linear_forward)  # its autograd (inference only: backward raises) is csrc/autograd.cpp's


def packed_by(w: torch.Tensor, mode: str, backend: str) -> str | None:
    """The ember_C kernel that has a packed weight for this call, or None (the plain weight is read)."""
    if mode != "w8a8":
        return None
    return "cpu" if _backend.resolve(backend, w.device, "int8_prepack") == "cpu" else None


@impl("int8_prepack")
def _(w, w_scale, mode, backend):
    if packed_by(w, mode, backend) is None:
        return w.new_empty(0)
    return torch.ops.ember_C.int8_prepack(w, w_scale)


_QUANTIZE = torch.ops.ember.quantize_per_token.default
_INT8_LINEAR = torch.ops.ember.int8_linear.default
_PREPACK = torch.ops.ember.int8_prepack.default


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------
def _check_smooth(op, smooth, K, device):
    if smooth is None:
        return
    if not isinstance(smooth, torch.Tensor) or smooth.shape != (K,) or smooth.dtype != torch.float32:
        got = f"{smooth.dtype} {tuple(smooth.shape)}" if isinstance(smooth, torch.Tensor) else type(smooth).__name__
        raise ValueError(f"ember.ops.{op}: smooth must be a float32 tensor of shape ({K},), got {got}")
    if smooth.device != device:
        raise ValueError(f"ember.ops.{op}: smooth must be on {device} like x, got {smooth.device}")


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None, *, backend: str | None = None):
    """Per-row symmetric int8 quantization of ``x.reshape(-1, K)``: ``(q int8 (M, K), scale fp32 (M,))``
    with ``x[m] * smooth ~= q[m] * scale[m]``."""
    check_float("quantize_per_token", "x", x)
    if x.dim() == 0:
        raise ValueError("ember.ops.quantize_per_token: x must have at least one dimension")
    _check_smooth("quantize_per_token", smooth, x.shape[-1], x.device)
    return _QUANTIZE(x, smooth, _backend.for_call(backend, x.device, "quantize_per_token"))


def _check_int8_weight(op: str, w) -> None:
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or w.dim() != 2:
        got = f"{w.dtype} {w.dim()}-D" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"ember.ops.{op}: w must be a 2-D int8 tensor (out_features, in_features), got {got}")


def _scale_shape_ok(w_scale: torch.Tensor, N: int, K: int) -> bool:
    """(N,) per channel, or (N, G) per group with G dividing K."""
    return w_scale.shape == (N,) or (w_scale.dim() == 2 and w_scale.shape[0] == N and w_scale.shape[1] > 0
                                     and K % w_scale.shape[1] == 0)


def int8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    mode: str = "w8a8",
    smooth: torch.Tensor | None = None,
    backend: str | None = None,
    w_packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``activation((x * smooth) @ dequant(w, w_scale).T + bias)`` with int8 weights; see the module docstring.

    ``w_packed`` (optional, CPU W8A8): ``int8_prepack(w, w_scale)``; with it the CPU runs ember's own
    AMX or VNNI GEMM (quantize, GEMM and epilogue fused; per-group scales applied per group in registers) instead
    of ATen's int8 GEMM (one per group). An empty ``w_packed`` (no packed form) is the same as None.
    Int8Linear holds it as its ``weight_packed`` buffer."""
    op = "int8_linear"
    check_float(op, "x", x)
    if mode not in MODES:
        raise ValueError(f"ember.ops.{op}: mode must be one of {MODES}, got {mode!r}")
    act = activations.check(f"ember.ops.{op}", activation)
    _check_int8_weight(op, w)
    N, K = w.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"ember.ops.{op}: x must end in in_features={K}, got shape {tuple(x.shape)}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32:
        raise TypeError(f"ember.ops.{op}: w_scale must be a float32 tensor, got "
                        f"{w_scale.dtype if isinstance(w_scale, torch.Tensor) else type(w_scale).__name__}")
    if not _scale_shape_ok(w_scale, N, K):
        raise ValueError(f"ember.ops.{op}: w_scale must be ({N},) or ({N}, K // group_size), got {tuple(w_scale.shape)}")
    if bias is not None:
        check_float(op, "bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"ember.ops.{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("w", w), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"ember.ops.{op}: {name} must be on the same device as x ({x.device}), got {t.device}")
    _check_smooth(op, smooth, K, x.device)
    w = w if w.is_contiguous() else w.contiguous()
    w_scale = w_scale if w_scale.is_contiguous() else w_scale.contiguous()
    if w_packed is not None and w_packed.numel() == 0:
        w_packed = None
    # The size is the kernel's to check (ember_C compares it with the rule that made it).
    if w_packed is not None and (w_packed.dtype != torch.int8 or w_packed.dim() != 1 or w_packed.device != x.device):
        raise ValueError(f"ember.ops.{op}: w_packed must be int8_prepack(w, w_scale) on {x.device}")
    return _INT8_LINEAR(x, w, w_scale, bias, smooth, act, mode, backend_for(backend, x.device, mode, w_scale, K),
                        w_packed)


def backend_for(requested: str | None, device: torch.device, mode: str, w_scale: torch.Tensor, K: int) -> str:
    """The backend string of an int8_linear call (``_backend.for_call`` with what the rules read)."""
    group = None if w_scale.dim() == 1 or w_scale.shape[1] == 1 else K // w_scale.shape[1]
    return _backend.for_call(requested, device, "int8_linear", mode=mode, group=group, in_features=K)


def int8_prepack(w: torch.Tensor, w_scale: torch.Tensor, *, mode: str = "w8a8",
                 backend: str | None = None) -> torch.Tensor:
    """The packed form of the int8 weight ``w`` (N, K) that ``int8_linear(x, w, w_scale, mode=mode,
    w_packed=...)`` reads on ``backend``: a flat int8 tensor, or an empty one where that backend has no
    packed form (reference, Triton, CUDA, W8A16, or a shape the CPU kernel cannot take: N % 16, K % 4 or
    group_size % 4). The group size follows from ``w_scale``'s shape ((N,) or (N, K // group_size))."""
    op = "int8_prepack"
    if mode not in MODES:
        raise ValueError(f"ember.ops.{op}: mode must be one of {MODES}, got {mode!r}")
    _check_int8_weight(op, w)
    N, K = w.shape
    is_tensor = isinstance(w_scale, torch.Tensor)
    if not (is_tensor and w_scale.dtype == torch.float32 and w_scale.device == w.device
            and _scale_shape_ok(w_scale, N, K)):
        got = f"{w_scale.dtype} {tuple(w_scale.shape)} on {w_scale.device}" if is_tensor else type(w_scale).__name__
        raise ValueError(f"ember.ops.{op}: w_scale must be float32 ({N},) or ({N}, K // group_size) on {w.device}, "
                         f"got {got}")
    return _PREPACK(w.contiguous(), w_scale, mode, _backend.for_call(backend, w.device, op))
