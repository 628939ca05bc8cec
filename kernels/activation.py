"""Elementwise activations in Triton: every activation of ember.activations, forward and backward.

Each element is read once and written once (2 x dtype bytes forward, 3 x backward), so the kernels
are memory bound: the math runs in fp32 (fp64 for fp64 tensors) between one load and one store.
The ``act_forward`` / ``act_backward`` helpers are shared with the gated kernels (gated.py).
"""
import torch
import triton
import triton.language as tl

from ember.activations import ID as ACT_IDS  # the one table; ids as ember::Act in csrc/activation.h

from . import _target

# The ids the kernels switch on, as constexprs (compiled Triton reads only constexpr globals).
_RELU = tl.constexpr(ACT_IDS["relu"])
_SILU = tl.constexpr(ACT_IDS["silu"])
_GELU = tl.constexpr(ACT_IDS["gelu"])
_GELU_TANH = tl.constexpr(ACT_IDS["gelu_tanh"])
_RELU2 = tl.constexpr(ACT_IDS["relu2"])

# tl.constexpr, not plain floats: compiled Triton refuses to read a non-constexpr module global inside a
# kernel ("Cannot access global variable"); only the interpreter accepts a plain float. Keep the tensor
# on the left (x * C): the interpreter's constexpr.__mul__ does not accept a tensor on its right.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_COEFF = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates correctly at both ends (exp -> inf gives 1, exp -> 0
    # gives -1) and needs only exp, which every Triton backend (and the interpreter) provides.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def to_output(y, out_ptr, INTERPRET_BF16: tl.constexpr):
    """Cast fp32 results to the output element type with round-to-nearest-even.

    The Triton interpreter (triton 3.9, how CI runs these kernels on CPU) truncates fp32 -> bf16
    casts, even with fp_downcast_rounding="rtne"; GPUs round to nearest. Under the interpreter, bf16
    outputs are therefore rounded by hand on the bit pattern first (NaN kept as is), so both paths
    give torch's result bit for bit.
    """
    if INTERPRET_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return y.to(out_ptr.dtype.element_ty)


@triton.jit
def act_forward(x, ACT: tl.constexpr):
    """act(x) for a block already converted to the compute dtype."""
    if ACT == _RELU:
        y = tl.where(x < 0.0, 0.0, x)  # NaN < 0 is false: NaN passes through, as in torch.relu
    elif ACT == _SILU:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == _GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == _GELU_TANH:
        y = 0.5 * x * (1.0 + _tanh((x + x * x * x * _TANH_COEFF) * _SQRT_2_OVER_PI))
    else:
        tl.static_assert(ACT == _RELU2, "unknown activation id")
        r = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN, as torch.relu(x) ** 2
        y = r * r
    return y


@triton.jit
def act_backward(g, x, ACT: tl.constexpr):
    """g * act'(x). ReLU selects instead of multiplying, like torch's threshold_backward: grad passes
    where x is not <= 0 (NaN included), and an inf/NaN grad where x <= 0 still gives 0."""
    if ACT == _RELU:
        dx = tl.where(x <= 0.0, 0.0, g)
    elif ACT == _SILU:
        s = 1.0 / (1.0 + tl.exp(-x))
        dx = g * s * (1.0 + x * (1.0 - s))
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        dx = g * (cdf + x * pdf)
    elif ACT == _RELU2:
        dx = tl.where(x <= 0.0, 0.0, x * g * 2.0)  # selected like ReLU's: 0 where x <= 0
    else:
        tl.static_assert(ACT == _GELU_TANH, "unknown activation id")
        x2 = x * x
        t = _tanh((x + x2 * x * _TANH_COEFF) * _SQRT_2_OVER_PI)
        dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + x2 * (3.0 * _TANH_COEFF)))
    return dx


@triton.jit
def _unary_act_fwd_kernel(
    x_ptr,  # input, contiguous, n elements
    y_ptr,  # output, contiguous, n elements, same dtype
    n,  # number of elements
    ACT: tl.constexpr,  # index in ACT_IDS
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 tensors
    INTERPRET_BF16: tl.constexpr,  # see to_output
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(COMPUTE)
    tl.store(y_ptr + offs, to_output(act_forward(x, ACT), y_ptr, INTERPRET_BF16), mask=mask)


@triton.jit
def _unary_act_bwd_kernel(
    g_ptr,  # grad of the output, contiguous
    x_ptr,  # forward input, contiguous
    dx_ptr,  # grad of the input (output), contiguous
    n,
    ACT: tl.constexpr,
    COMPUTE: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask).to(COMPUTE)
    tl.store(dx_ptr + offs, to_output(act_backward(g, x, ACT), dx_ptr, INTERPRET_BF16), mask=mask)


def dtype_args(t: torch.Tensor) -> dict:
    """The constexprs that depend on the element type: compute precision and the interpreter's
    bf16 rounding fix (see to_output)."""
    return {
        "COMPUTE": tl.float64 if t.dtype == torch.float64 else tl.float32,
        "INTERPRET_BF16": _target.interpreting() and t.dtype == torch.bfloat16,
    }


def launch_config(x: torch.Tensor):
    """(BLOCK, num_warps): 16 bytes per thread per access on GPU; one wide block under the CPU
    interpreter, where each program costs a Python round trip."""
    if _target.interpreting():
        return 8192, 1
    return 2048, 8


def unary_act(x: torch.Tensor, act: str) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        block, warps = launch_config(x)
        with _target.device_guard(x):
            _unary_act_fwd_kernel[(triton.cdiv(n, block),)](
                x, y, n, ACT=ACT_IDS[act], **dtype_args(x), BLOCK=block, num_warps=warps
            )
    return y


def unary_act_backward(grad: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    grad, x = grad.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        block, warps = launch_config(x)
        with _target.device_guard(x):
            _unary_act_bwd_kernel[(triton.cdiv(n, block),)](
                grad, x, dx, n, ACT=ACT_IDS[act], **dtype_args(x), BLOCK=block, num_warps=warps
            )
    return dx
