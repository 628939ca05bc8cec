"""Property-based fuzzing of every public op and optimizer on every backend available here (issue #11).

Hypothesis draws shapes (0, 1, primes, up to 4-D), layouts (transposed, strided, storage offset, with
NaN around every view), dtypes and values (tiny, huge, NaN/Inf), forward and backward, and each result is
judged against torch's own functions in float64 by the rule in tests/fuzz_strategies.py: ember's error
at most 2x torch's own error in the same dtype, plus a floor, with non-finite positions agreeing.
Ember's reference backend is one of the backends under test here, never the oracle.

CI runs a fixed, derandomized set of examples (about a minute on 2 cores). More, with fresh random
seeds each run: ``EMBER_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`` (N examples per test on the
reference and C++ backends, N/5 on the Triton interpreter, which is ~100x slower per call). A failure
prints the falsifying draws and a ``@reproduce_failure`` blob.

Bad inputs (wrong dtype, shapes, arguments, sparse gradients) each run in a forked child of one helper
process, so a segfault or a hang is reported as that case's failure instead of killing pytest.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import ember
import fuzz_strategies as fs

_MORE = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "0"))
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.differing_executors])
settings.register_profile("ember-fuzz-ci", derandomize=True, **_COMMON)
settings.register_profile("ember-fuzz-more", derandomize=False, **_COMMON)
PROFILE = settings.get_profile("ember-fuzz-more" if _MORE else "ember-fuzz-ci")

BACKENDS = ["reference", "cpu", "triton"]  # the CPU-tensor backends; "cuda" is the GPU smoke test's
L_ACT = 1.13  # max |act'(x)| over relu, silu, gelu, gelu_tanh: how far an error before the activation grows


def _backend_or_skip(backend):
    why = ember.available_backends("cpu")[backend]
    if why:
        pytest.skip(why)


def fuzz(backend, body, n, n_triton):
    """Runs ``body(data, backend)`` for n examples (n_triton on the interpreter), fixed in CI."""
    _backend_or_skip(backend)
    count = n_triton if backend == "triton" else n
    if _MORE:
        count = max(count, _MORE // 5 if backend == "triton" else _MORE)

    @settings(PROFILE, max_examples=count)
    @given_data
    def run(data):
        body(data, backend)

    run()


def given_data(f):
    from hypothesis import given

    return given(data=st.data())(f)


def draw_dtype(data, backend, gemm=False):
    if backend == "triton" and gemm:
        # the interpreter's tl.dot has no float64 and returns garbage for bf16 (tests/test_linear.py)
        return data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    return data.draw(st.sampled_from(fs.DTYPES), label="dtype")


def draw_tensor(data, shape, dtype, label, values=fs.VALUES, specials=True, huge=None):
    spec = data.draw(fs.tensor_specs(values=values, specials=specials), label=label)
    return fs.make_tensor(shape, dtype, spec, huge=huge)


def _cap(backend, cpu, triton):
    return triton if backend == "triton" else cpu


# ---------------------------------------------------------------------------------------------
# Activations: gelu (erf, tanh), silu, relu; swiglu, geglu.
# ---------------------------------------------------------------------------------------------
TORCH_ACT = {
    "none": lambda t: t,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu2": lambda t: F.relu(t) ** 2,
}


def _gelu_tanh_exact(t):
    # torch's 0.5 x (1 + tanh u) cancels to 0 even in float64 once tanh u rounds to -1 (x < -6 or so),
    # where the true value is x sigmoid(2u) ~ -1e-37 at x = -10: ember's C++ kernel gets that right and
    # the float64 oracle must too. The same torch functions, in the form without the cancellation.
    u = math.sqrt(2 / math.pi) * (t + 0.044715 * t * t * t)
    return t * torch.sigmoid(2 * u)


# the float64 oracles: torch's functions, gelu_tanh in its cancellation-free form
EXACT_ACT = dict(TORCH_ACT, gelu_tanh=_gelu_tanh_exact)


def _ember_act(act, x, backend):
    if act == "gelu_tanh":
        return ember.ops.gelu(x, approximate="tanh", backend=backend)
    return getattr(ember.ops, act)(x, backend=backend)


def _derivative(act, x64):
    """act'(x) in float64 by torch's autograd (ones upstream), so that the exact gradient can be formed
    as grad * act'(x): with an infinite upstream gradient, autograd's chain rule through the pieces of
    act (x * sigmoid(2u) is a sum of two terms) gives inf - inf = NaN where grad * act'(x) is +-inf,
    and either is an artefact of how the formula is split, not the function."""
    x = x64.detach().requires_grad_()
    (d,) = torch.autograd.grad(EXACT_ACT[act](x), x, torch.ones_like(x))
    return d


def _twin_grads(outs, twin_ins, grads):
    outs.backward(grads)
    return [t.grad for t in twin_ins]


def _unary_body(data, backend):
    act = data.draw(st.sampled_from(ember.activations.UNARY), label="act")
    dtype = draw_dtype(data, backend)
    shape = data.draw(fs.shapes(max_numel=_cap(backend, 20000, 3000)), label="shape")
    x = draw_tensor(data, shape, dtype, "x")
    backward = data.draw(st.booleans(), label="backward")
    x64 = x.detach().double()
    xt = x.detach().clone().requires_grad_(backward)
    x.requires_grad_(backward)
    ours, twin = _ember_act(act, x, backend), TORCH_ACT[act](xt)
    fs.judge(f"{act} forward", ours, EXACT_ACT[act](x64), twin, dtype)
    if backward:
        g = draw_tensor(data, shape, dtype, "grad", values=("normal", "small", "large"))
        ours.backward(g)
        twin.backward(g)
        fs.judge(f"{act} backward", x.grad, g.double() * _derivative(act, x64), xt.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unary_activations(backend):
    fuzz(backend, _unary_body, n=60, n_triton=12)


def _gated_body(data, backend):
    act = data.draw(st.sampled_from(["silu", "gelu", "gelu_tanh"]), label="act")
    dtype = draw_dtype(data, backend)
    shape = data.draw(fs.shapes(max_numel=_cap(backend, 20000, 3000)), label="shape")
    # Triton: no "tiny" gates (test_gated_triton_tiny_gate_huge_up records what goes wrong there)
    vals = tuple(v for v in fs.VALUES if v != "tiny") if backend == "triton" else fs.VALUES
    gate, up = draw_tensor(data, shape, dtype, "gate", values=vals), draw_tensor(data, shape, dtype, "up")
    backward = data.draw(st.booleans(), label="backward")
    ins64 = [t.detach().double() for t in (gate, up)]
    inst = [t.detach().clone().requires_grad_(backward) for t in (gate, up)]
    gate.requires_grad_(backward)
    up.requires_grad_(backward)
    if act == "silu":
        ours = ember.ops.swiglu(gate, up, backend=backend)
    else:
        ours = ember.ops.geglu(gate, up, approximate="tanh" if act == "gelu_tanh" else "none", backend=backend)
    outs = (ours, EXACT_ACT[act](ins64[0]) * ins64[1], TORCH_ACT[act](inst[0]) * inst[1])
    fs.judge(f"gated {act} forward", *outs, dtype)
    if backward:
        g = draw_tensor(data, shape, dtype, "grad", values=("normal", "small", "large"))
        outs[0].backward(g)
        outs[2].backward(g)
        g64, (gate64, up64) = g.double(), ins64
        exact = (g64 * up64 * _derivative(act, gate64), g64 * EXACT_ACT[act](gate64))
        for i, (a, e, t) in enumerate(zip((gate, up), exact, inst)):
            fs.judge(f"gated {act} backward d{('gate', 'up')[i]}", a.grad, e, t.grad, dtype)


@pytest.mark.xfail(strict=True, reason=(
    "Triton (interpreter) bf16 swiglu: silu(gate = 1.2e-38) * up = 1.5e37 gives 0.191, float64 and torch 0.0179 "
    "(found by test_fuzz; subnormal/tiny-gate handling of the bf16 path, not yet checked on a GPU)"))
def test_gated_triton_tiny_gate_huge_up():
    _backend_or_skip("triton")
    spec_t, spec_h = ("contiguous", "tiny", 0.0, 0), ("contiguous", "huge", 0.0, 0)
    gate, up = fs.make_tensor((), torch.bfloat16, spec_t), fs.make_tensor((), torch.bfloat16, spec_h)
    fs.judge("swiglu", ember.ops.swiglu(gate, up, backend="triton"), F.silu(gate.double()) * up.double(),
             F.silu(gate) * up, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_activations(backend):
    fuzz(backend, _gated_body, n=50, n_triton=10)


# ---------------------------------------------------------------------------------------------
# linear and gated_linear, forward and backward.
# ---------------------------------------------------------------------------------------------
GEMM_VALUES = ("normal", "small", "large", "tiny", "huge")


def _gemm_problem(data, backend, n_weights):
    dtype = draw_dtype(data, backend, gemm=True)
    cap = _cap(backend, 127, 40)
    sizes = [s for s in fs.SIZES if s <= cap]
    lead = data.draw(fs.shapes(min_dims=0, max_dims=2, max_numel=_cap(backend, 400, 80), sizes=sizes), label="lead")
    K = data.draw(st.sampled_from(sizes), label="K")
    N = data.draw(st.sampled_from(sizes), label="N")
    huge = math.sqrt(torch.finfo(dtype).max) / 4  # products land near, not far past, overflow
    x = draw_tensor(data, (*lead, K), dtype, "x", values=GEMM_VALUES, huge=huge)
    ws = [draw_tensor(data, (N, K), dtype, f"w{i}", values=GEMM_VALUES, huge=huge) for i in range(n_weights)]
    has_bias = data.draw(st.booleans(), label="bias")
    bs = [draw_tensor(data, (N,), dtype, f"b{i}", values=("normal", "large")) if has_bias else None
          for i in range(n_weights)]
    return dtype, lead, K, N, x, ws, bs


def _three(ts, backward):
    """(ember's inputs, float64 copies, torch-dtype copies), all leaves wanting grad if ``backward``."""
    ours = [None if t is None else t.requires_grad_(backward) for t in ts]
    exact = [None if t is None else t.detach().double().requires_grad_(backward) for t in ts]
    twin = [None if t is None else t.detach().clone().requires_grad_(backward) for t in ts]
    return ours, exact, twin


def _abs_mm(a, b):
    """|a| @ |b| in float64 over the last/first dims: the magnitude a correct dot product's error scales with."""
    return a.detach().double().abs() @ b.detach().double().abs()


@pytest.mark.skipif(ember.available_backends("cpu")["cpu"] is not None, reason="needs ember._C")
def test_linear_backward_zero_out_features_cpu():
    # Found by this file: csrc/eager.cpp (now csrc/autograd.cpp) rows() did t.reshape({-1, cols}), ambiguous for a (..., 0)
    # gradient, so the C++ autograd node failed when out_features == 0 and x was not 2-D.
    x = torch.randn(3, requires_grad=True)
    y = ember.ops.linear(x, torch.randn(0, 3, requires_grad=True), backend="cpu")
    y.backward(torch.ones_like(y))
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(3))


def _backward_all(data, outs, shape, dtype):
    """One drawn upstream gradient through ember's, the float64 and torch's same-dtype results."""
    g = draw_tensor(data, shape, dtype, "grad", values=("normal", "small", "large"), specials=False)
    outs[0].backward(g)
    outs[1].backward(g.double())
    outs[2].backward(g)


def _linear_body(data, backend):
    dtype, lead, K, N, x, (w,), (b,) = _gemm_problem(data, backend, 1)
    act = data.draw(st.sampled_from(list(TORCH_ACT)), label="activation")
    r = draw_tensor(data, (*lead, N), dtype, "residual") if data.draw(st.booleans(), label="has_res") else None
    backward = data.draw(st.booleans(), label="backward")
    (xo, wo, bo, ro), (x64, w64, b64, r64), (xt, wt, bt, rt) = _three([x, w, b, r], backward)

    def torch_linear(x_, w_, b_, r_, keep=None):
        pre = F.linear(x_, w_, b_)
        if keep is not None and backward:
            pre.retain_grad()
            keep.append(pre)
        out = (EXACT_ACT if keep is not None else TORCH_ACT)[act](pre)
        return out if r_ is None else out + r_

    pre64 = []
    outs = (ember.ops.linear(xo, wo, bo, activation=act, residual=ro, backend=backend),
            torch_linear(x64, w64, b64, r64, pre64), torch_linear(xt, wt, bt, rt))
    mag = _abs_mm(x, w.t()) + (0 if b is None else b.double().abs())
    scale = 1 + outs[1].detach().abs() + L_ACT * mag + (0 if r is None else r.double().abs())
    fs.judge(f"linear({act}) forward", *outs, dtype, scale=scale, reduction=K)
    if not backward:
        return
    _backward_all(data, outs, (*lead, N), dtype)
    M = math.prod(lead)
    dpre = pre64[0].grad.abs().reshape(M, N)
    x2 = x64.detach().abs().reshape(M, K)
    fs.judge("linear dx", xo.grad, x64.grad, xt.grad, dtype, reduction=N,
             scale=1 + x64.grad.abs() + (dpre @ w64.detach().abs()).reshape(x64.shape))
    fs.judge("linear dW", wo.grad, w64.grad, wt.grad, dtype, reduction=M,
             scale=1 + w64.grad.abs() + dpre.t() @ x2)
    if b is not None:
        fs.judge("linear db", bo.grad, b64.grad, bt.grad, dtype, reduction=M, scale=1 + b64.grad.abs() + dpre.sum(0))
    if r is not None:
        fs.judge("linear dresidual", ro.grad, r64.grad, rt.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear(backend):
    fuzz(backend, _linear_body, n=50, n_triton=10)


def _gated_linear_body(data, backend):
    dtype, lead, K, N, x, (wg, wu), (bg, bu) = _gemm_problem(data, backend, 2)
    act = data.draw(st.sampled_from(["silu", "gelu", "gelu_tanh"]), label="activation")
    backward = data.draw(st.booleans(), label="backward")
    ours, exact, twin = _three([x, wg, wu, bg, bu], backward)

    def torch_gated(x_, wg_, wu_, bg_, bu_, keep=None):
        pg, pu = F.linear(x_, wg_, bg_), F.linear(x_, wu_, bu_)
        if keep is not None and backward:
            for p in (pg, pu):
                p.retain_grad()
                keep.append(p)
        return (EXACT_ACT if keep is not None else TORCH_ACT)[act](pg) * pu

    pres = []
    outs = (ember.ops.gated_linear(*ours, activation=act, backend=backend), torch_gated(*exact, keep=pres),
            torch_gated(*twin))
    with torch.no_grad():
        pg64, pu64 = F.linear(*exact[:2], exact[3]), F.linear(exact[0], exact[2], exact[4])
        mg = _abs_mm(x, wg.t()) + (0 if bg is None else bg.double().abs())
        mu = _abs_mm(x, wu.t()) + (0 if bu is None else bu.double().abs())
        scale = 1 + outs[1].abs() + L_ACT * mg * pu64.abs() + EXACT_ACT[act](pg64).abs() * mu
    fs.judge(f"gated_linear({act}) forward", *outs, dtype, scale=scale, reduction=K)
    if not backward:
        return
    _backward_all(data, outs, (*lead, N), dtype)
    M = math.prod(lead)
    dg, du = (p.grad.abs().reshape(M, N) for p in pres)
    x64, wg64, wu64 = (t.detach() for t in exact[:3])
    x2 = x64.abs().reshape(M, K)
    fs.judge("gated_linear dx", ours[0].grad, exact[0].grad, twin[0].grad, dtype, reduction=2 * N,
             scale=1 + exact[0].grad.abs() + (dg @ wg64.abs() + du @ wu64.abs()).reshape(x64.shape))
    for i, d in ((1, dg), (2, du)):
        fs.judge(f"gated_linear dW[{i}]", ours[i].grad, exact[i].grad, twin[i].grad, dtype, reduction=M,
                 scale=1 + exact[i].grad.abs() + d.t() @ x2)
    if bg is not None:
        for i, d in ((3, dg), (4, du)):
            fs.judge(f"gated_linear db[{i}]", ours[i].grad, exact[i].grad, twin[i].grad, dtype, reduction=M,
                     scale=1 + exact[i].grad.abs() + d.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_linear(backend):
    fuzz(backend, _gated_linear_body, n=40, n_triton=8)


# ---------------------------------------------------------------------------------------------
# int8: quantize_per_token and int8_linear. torch has no twin of a quantized GEMM, so the oracle is
# torch's float64 F.linear on the dequantized weight (the exact function the int8 weight stands for)
# and the twin is torch's F.linear in the dtype on that same weight. w8a16 is then plain 2x-rule
# territory. w8a8 also quantizes x per row by contract; the error that step may add is bounded
# element by element, |y - y_exact| <= L * (0.5 + 2^-10) * s_x[m] * sum_k |w_deq[n, k]|, and is
# given as slack on top of the rule (a wrong scale, a lost row or group breaks it by far).
# ---------------------------------------------------------------------------------------------
INT8_VALUES = ("normal", "small", "large", "tiny")


def _int8_body(data, backend):
    mode = data.draw(st.sampled_from(["w8a8", "w8a16"]), label="mode")
    if backend == "triton" and mode == "w8a16":
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.float64]), label="dtype")
    else:
        # no float64: int8 weights dequantize as q * scale in fp32 (int8.py:dequantize_weight), so a float64
        # input gets fp32 accuracy (2e-9 off torch's float64 F.linear); reported, not judged here
        dtype = data.draw(st.sampled_from(fs.DTYPES[:3]), label="dtype")
    sizes = [s for s in fs.SIZES if 1 <= s <= _cap(backend, 127, 40)]
    lead = data.draw(fs.shapes(min_dims=0, max_dims=2, max_numel=_cap(backend, 300, 64), sizes=sizes), label="lead")
    K = data.draw(st.sampled_from(sizes + [64, 128]), label="K")
    N = data.draw(st.sampled_from(sizes + [16, 48]), label="N")
    # the Triton kernels take groups of a multiple of 16 (and say so for others)
    sizes_g = (16, 32) if backend == "triton" else (4, 8, 32)
    group = data.draw(st.sampled_from([None] + [g for g in sizes_g if K % g == 0 and g < K]), label="group")
    w = draw_tensor(data, (N, K), torch.float32, "w", values=("normal", "small", "large"), specials=False)
    wq, ws = ember.ops.quantize_weight(w, group)
    assert wq.dtype == torch.int8 and (wq.abs() <= 127).all()
    x = draw_tensor(data, (*lead, K), dtype, "x", values=INT8_VALUES)
    b = draw_tensor(data, (N,), dtype, "b", specials=False, values=("normal",)) if data.draw(st.booleans()) else None
    act = data.draw(st.sampled_from(list(TORCH_ACT)), label="act")
    smooth = None
    if data.draw(st.booleans(), label="smooth"):
        smooth = torch.rand(K, generator=torch.Generator().manual_seed(K)) + 0.5
    ours = ember.ops.int8_linear(x, wq, ws, b, activation=act, mode=mode, smooth=smooth, backend=backend)
    deq = wq.double() * (ws.double()[:, None] if ws.dim() == 1 else ws.double().repeat_interleave(K // ws.shape[1], 1))
    xs = x.double() * (1 if smooth is None else smooth.double())
    b64 = None if b is None else b.double()
    exact = EXACT_ACT[act](F.linear(xs, deq, b64))
    xt = x if smooth is None else (x.float() * smooth).to(dtype)
    twin = TORCH_ACT[act](F.linear(xt, deq.to(dtype), b))
    # rows holding NaN/Inf give non-finite outputs in that row only (int8.py's contract; NaN for w8a8)
    bad_rows = ~torch.isfinite(xs.float()).all(-1, keepdim=True).expand(ours.shape)
    if act == "none":  # (relu(-inf) = 0 is right)
        assert (~torch.isfinite(ours[bad_rows])).all(), "a row with NaN/Inf inputs gave a finite output"
    if mode == "w8a8":
        assert torch.isnan(ours[bad_rows]).all(), "w8a8: a row with NaN/Inf inputs must give NaN"
    mag = xs.abs().nan_to_num(posinf=0) @ deq.abs().t() + (0 if b is None else b.double().abs())
    slack = None
    if mode == "w8a8":
        s_x = xs.float().double().abs().nan_to_num(nan=0, posinf=0).amax(-1, keepdim=True) / 127
        slack = L_ACT * (0.5 + 2**-10) * s_x * deq.abs().sum(1)
    fs.judge(f"int8_linear {mode}", ours, exact, twin, dtype, scale=1 + exact.abs() + L_ACT * mag, reduction=K,
             exempt=bad_rows, slack=slack)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear(backend):
    fuzz(backend, _int8_body, n=40, n_triton=8)


def _quantize_body(data, backend):
    dtype = data.draw(st.sampled_from(fs.DTYPES), label="dtype")
    shape = data.draw(fs.shapes(min_dims=1, max_numel=_cap(backend, 20000, 3000)), label="shape")
    # K = 0 is left out: quantize_per_token_reference's x.reshape(-1, K) is ambiguous for it (reported)
    shape = shape if shape[-1] else (*shape[:-1], 1)
    x = draw_tensor(data, shape, dtype, "x", values=("normal", "small", "large"))  # "tiny": the xfail below
    q, scale = ember.ops.quantize_per_token(x, backend=backend)
    K = shape[-1]
    M = math.prod(shape[:-1])
    assert q.shape == (M, K) and q.dtype == torch.int8 and scale.shape == (M,) and scale.dtype == torch.float32
    xf = x.reshape(M, K).float().double()  # the kernels quantize from fp32 (int8.py)
    finite = torch.isfinite(xf).all(-1)
    assert torch.isnan(scale[~finite]).all(), "a row with NaN/Inf must get scale NaN"
    amax = xf[finite].abs().amax(-1) if K else xf.new_zeros(int(finite.sum()))
    # the scale is amax / 127 to fp32 rounding; every element within half a step (+ fp32 rounding)
    assert ((scale[finite].double() - amax / 127).abs() <= 2 * fs.eps(torch.float32) * amax / 127 + 2e-45).all(), "scale != amax / 127"
    assert (q.abs() <= 127).all(), "|q| > 127"
    err = (q[finite].double() * scale[finite].double()[:, None] - xf[finite]).abs()
    assert (err <= scale[finite].double()[:, None] * (0.5 + 1e-3) + 1e-45).all(), "q * scale is off x by over half a step"


@pytest.mark.xfail(strict=True, reason=(
    "quantize_per_token: a row whose amax is below 127 / FLT_MAX (~3.7e-37, subnormal inputs) gets inv = 127 / amax "
    "= inf, so its q are garbage (found by test_fuzz: x = [1.16e-39, 3.8e-44] dequantizes 1.16e-39 off)"))
def test_quantize_per_token_subnormal_row():
    x = torch.tensor([[1.1586e-39, 3.7835e-44]])
    q, scale = ember.ops.quantize_per_token(x, backend="reference")
    assert ((q.double() * scale.double()[:, None] - x.double()).abs() <= scale.double()[:, None] * 0.501).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_per_token(backend):
    fuzz(backend, _quantize_body, n=40, n_triton=8)


# ---------------------------------------------------------------------------------------------
# Optimizers: a few steps of ember.optim.X against torch.optim.X run in float64 on float64 copies (the
# exact result) and in the parameters' dtype (the twin), the 2x rule on every parameter, with the
# scale |p0| + |p1| + lr (an update's error measured against the parameter it moves). Lion has no
# torch twin: its rule in a few lines of torch, run in float64 and in the dtype. AdamW8bit is judged
# here on its full-precision-state path (min_8bit_size above every tensor: tensors under it keep fp32
# moments), against torch AdamW; the 8-bit block states change the update by up to one quantization
# step of a block's largest moment, which no error ratio to torch describes, and are left to the
# bit-exact kernel tests (tests/test_optim_8bit_kernels.py) and the training test
# (tests/test_optim_lion_8bit.py).
# ---------------------------------------------------------------------------------------------
def _optim_kwargs(data, name):
    lr = data.draw(st.sampled_from([1e-3, 1e-2, 0.1]), label="lr")
    wd = data.draw(st.sampled_from([0.0, 0.01, 0.1]), label="weight_decay")
    maximize = data.draw(st.booleans(), label="maximize")
    if name == "SGD":
        momentum = data.draw(st.sampled_from([0.0, 0.9]), label="momentum")
        nesterov = momentum > 0 and data.draw(st.booleans(), label="nesterov")
        return dict(lr=lr, momentum=momentum, dampening=0.0 if nesterov else data.draw(st.sampled_from([0.0, 0.1])),
                    weight_decay=wd, nesterov=nesterov, maximize=maximize)
    if name in ("Adam", "AdamW", "AdamW8bit"):
        kw = dict(lr=lr, betas=data.draw(st.sampled_from([(0.9, 0.999), (0.8, 0.99)]), label="betas"),
                  eps=data.draw(st.sampled_from([1e-8, 1e-6]), label="eps"), weight_decay=wd, maximize=maximize)
        if name != "AdamW8bit":
            kw["amsgrad"] = data.draw(st.booleans(), label="amsgrad")
        return kw
    if name == "Adagrad":
        return dict(lr=lr, lr_decay=data.draw(st.sampled_from([0.0, 0.01])), weight_decay=wd, maximize=maximize,
                    initial_accumulator_value=data.draw(st.sampled_from([0.0, 0.1])), eps=1e-10)
    if name == "RMSprop":
        return dict(lr=lr, alpha=data.draw(st.sampled_from([0.99, 0.9])), eps=1e-8, weight_decay=wd,
                    momentum=data.draw(st.sampled_from([0.0, 0.9])), centered=data.draw(st.booleans(), label="centered"),
                    maximize=maximize)
    return dict(lr=lr, betas=data.draw(st.sampled_from([(0.9, 0.99), (0.95, 0.98)])), weight_decay=wd,
                maximize=maximize)


class _LionTorch(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) in plain torch: the oracle (float64) and the twin (the dtype)."""

    def __init__(self, params, lr, betas, weight_decay, maximize):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for grp in self.param_groups:
            b1, b2 = grp["betas"]
            for p in grp["params"]:
                g = -p.grad if grp["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - grp["lr"] * grp["weight_decay"]).add_(torch.sign(b1 * m + (1 - b1) * g), alpha=-grp["lr"])
                m.mul_(b2).add_(g, alpha=1 - b2)


def _torch_optim(name, params, kw):
    if name == "Lion":
        return _LionTorch(params, **kw)
    return getattr(torch.optim, "AdamW" if name == "AdamW8bit" else name)(params, **kw)


def _optim_body(data, backend, name):
    dtype = data.draw(st.sampled_from(fs.DTYPES), label="dtype")
    kw = _optim_kwargs(data, name)
    n = data.draw(st.integers(1, 3), label="n_params")
    shapes_ = [data.draw(fs.shapes(max_dims=3, max_numel=_cap(backend, 5000, 1500)), label=f"shape{i}") for i in range(n)]
    params = [draw_tensor(data, s, dtype, f"p{i}", values=("normal", "small", "large"), specials=False)
              for i, s in enumerate(shapes_)]
    p0 = [p.detach().double() for p in params]
    exact, twin = [p.clone() for p in p0], [p.detach().clone() for p in params]
    extra = dict(min_8bit_size=1 << 30) if name == "AdamW8bit" else {}
    ours = getattr(ember.optim, name)(params, backend=backend, **kw, **extra)
    # An explicit backend whose kernels do not take a parameter (its supports rule) must refuse the
    # step, naming itself, and leave the parameters untouched; it never falls back in silence.
    op = "adamw8bit_step" if name == "AdamW8bit" else "optim_step"
    if any(ember._backend.why_not(backend, op, dtype=p.dtype, dense=ember.optim._base._dense(p)) for p in params):
        for i, s in enumerate(shapes_):
            params[i].grad = draw_tensor(data, s, dtype, f"grad0.{i}", values=("normal", "small", "large"))
        with pytest.raises(ember.BackendError, match=f"backend '{backend}' cannot run this call"):
            ours.step()
        for a, b in zip(params, p0):
            assert torch.equal(a.detach().double(), b)
        return
    opts = [_torch_optim(name, exact, kw), _torch_optim(name, twin, kw)]
    steps = 1 if name == "Lion" else data.draw(st.integers(1, 2), label="steps")  # Lion: sign() of a near-0 sum flips
    for step in range(steps):
        for i, s in enumerate(shapes_):
            g = draw_tensor(data, s, dtype, f"grad{step}.{i}", values=("normal", "small", "large"))
            params[i].grad, exact[i].grad, twin[i].grad = g, g.double(), g.clone()
        ours.step()
        for o in opts:
            o.step()
    for i, (a, e, t) in enumerate(zip(params, exact, twin)):
        fs.judge(f"{name} param[{i}]", a, e, t, dtype, scale=p0[i].abs() + e.abs() + kw["lr"])


OPTIMIZERS = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Lion", "AdamW8bit"]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizers(backend, name):
    fuzz(backend, lambda data, b: _optim_body(data, b, name), n=15, n_triton=4)


# ---------------------------------------------------------------------------------------------
# Bad inputs, each in a forked child of one helper process (import torch + ember once, ~5 s here, then
# a fork per case): a segfault or abort shows as that case's failure, a hang as a timeout. Each case must
# raise an exception whose message names the argument (the expected words), or not raise at all
# ("same as torch": the case then checks torch's result itself).
# ---------------------------------------------------------------------------------------------
_BAD = {
    "gelu int x": ("ember.ops.gelu(torch.arange(4), backend=B)", ["x", "floating"]),
    "gelu approximate": ("ember.ops.gelu(torch.randn(4), approximate='fast', backend=B)", ["approximate"]),
    "silu sparse x": ("ember.ops.silu(torch.randn(4, 4).to_sparse(), backend=B)", ["x"]),
    "swiglu shapes": ("ember.ops.swiglu(torch.randn(4, 8), torch.randn(1, 8), backend=B)", ["gate", "up", "shape"]),
    "swiglu dtypes": ("ember.ops.swiglu(torch.randn(4), torch.randn(4).double(), backend=B)", ["dtype"]),
    "geglu int up": ("ember.ops.geglu(torch.randn(4), torch.ones(4, dtype=torch.int32), backend=B)", ["up"]),
    "linear in_features": ("ember.ops.linear(torch.randn(3, 5), torch.randn(4, 6), backend=B)", ["in_features"]),
    "linear 1-D weight": ("ember.ops.linear(torch.randn(3, 5), torch.randn(5), backend=B)", ["weight"]),
    "linear bias shape": ("ember.ops.linear(torch.randn(3, 5), torch.randn(4, 5), torch.randn(3), backend=B)", ["bias"]),
    "linear bias dtype": ("ember.ops.linear(torch.randn(3, 5), torch.randn(4, 5), torch.randn(4).half(), backend=B)",
                          ["bias"]),
    "linear residual": ("ember.ops.linear(torch.randn(3, 5), torch.randn(4, 5), residual=torch.randn(3, 5), backend=B)",
                        ["residual"]),
    "linear activation": ("ember.ops.linear(torch.randn(3, 5), torch.randn(4, 5), activation='tanh', backend=B)",
                          ["activation"]),
    "linear int x": ("ember.ops.linear(torch.ones(3, 5, dtype=torch.int64), torch.randn(4, 5), backend=B)", ["x"]),
    "linear scalar x": ("ember.ops.linear(torch.tensor(1.0), torch.randn(4, 1), backend=B)", ["x"]),
    "gated_linear weights": ("ember.ops.gated_linear(torch.randn(3, 5), torch.randn(4, 5), torch.randn(6, 5), backend=B)",
                             ["w_gate", "w_up"]),
    "gated_linear one bias": ("ember.ops.gated_linear(torch.randn(3, 5), torch.randn(4, 5), torch.randn(4, 5), "
                              "torch.randn(4), backend=B)", ["b_gate"]),
    "int8 float w": ("ember.ops.int8_linear(torch.randn(2, 8), torch.randn(4, 8), torch.ones(4), backend=B)", ["w"]),
    "int8 w_scale": ("ember.ops.int8_linear(torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(3), "
                     "backend=B)", ["w_scale"]),
    "int8 in_features": ("ember.ops.int8_linear(torch.randn(2, 7), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), "
                         "backend=B)", ["in_features"]),
    "int8 mode": ("ember.ops.int8_linear(torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), "
                  "mode='w4a8', backend=B)", ["mode"]),
    "int8 smooth": ("ember.ops.int8_linear(torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), "
                    "smooth=torch.ones(7), backend=B)", ["smooth"]),
    "int8 backward": ("x = torch.randn(2, 8, requires_grad=True)\n"
                      "ember.ops.int8_linear(x, torch.ones(4, 8, dtype=torch.int8), torch.ones(4), backend=B).sum()"
                      ".backward()", ["backward"]),
    "quantize int x": ("ember.ops.quantize_per_token(torch.ones(2, 8, dtype=torch.int8), backend=B)", ["x"]),
    "quantize scalar x": ("ember.ops.quantize_per_token(torch.tensor(1.0), backend=B)", ["x"]),
}
for _name in OPTIMIZERS:  # Lion's NaN grads: sign(NaN) as torch.sign has it, judged in test_optimizers
    _BAD[f"{_name} sparse grad"] = (
        f"p = torch.randn(5, 3)\np.grad = torch.randn(5, 3).to_sparse()\nember.optim.{_name}([p], backend=B).step()",
        ["sparse"])
    if _name == "Lion":
        continue
    _BAD[f"{_name} NaN grad"] = (  # no error: NaN where torch has NaN, the other elements moved
        f"p = torch.randn(6)\np.grad = torch.tensor([1.0, math.nan, -2, math.inf, 0, 3])\n"
        f"ember.optim.{_name}([p], backend=B).step()\nassert torch.isnan(p[1]), p", None)

_DRIVER = r"""
import json, math, os, select, signal, sys, time
import torch, ember
cases = json.load(sys.stdin)
for name, backend, code in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            exec(code, {"torch": torch, "ember": ember, "math": math, "B": backend})
            out = {"status": "ok"}
        except BaseException as err:
            out = {"status": "raised", "type": type(err).__name__, "msg": str(err)[:500]}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    deadline, out = time.time() + 60, b""
    while time.time() < deadline and select.select([r], [], [], deadline - time.time())[0]:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    if time.time() >= deadline:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    res = json.loads(out) if out else {"status": "timeout" if time.time() >= deadline else "died"}
    res["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    print(json.dumps([name, backend, res]), flush=True)
"""


@pytest.fixture(scope="module")
def bad_input_results():
    """Runs every (case, backend) of _BAD once; {(case, backend): result}."""
    live = [b for b in BACKENDS if not ember.available_backends("cpu")[b]]
    cases = [(n, b, textwrap.dedent(code)) for n, (code, _) in _BAD.items() for b in live]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # no thread pool in the forking parent
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(cases), capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(__file__))
    results = {}
    for line in proc.stdout.splitlines():
        name, backend, res = json.loads(line)
        results[name, backend] = res
    return results, proc


@pytest.mark.parametrize("case", list(_BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(bad_input_results, case, backend):
    _backend_or_skip(backend)
    results, proc = bad_input_results
    res = results.get((case, backend))
    assert res is not None, f"the helper process never reported this case (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert res["signal"] == 0 and res["status"] not in ("died", "timeout"), f"{case} on {backend}: crashed or hung: {res}"
    words = _BAD[case][1]
    if words is None:
        assert res["status"] == "ok", res
    else:
        assert res["status"] == "raised", f"{case} on {backend}: no error"
        missing = [w for w in words if w not in res["msg"]]
        assert not missing, f"{case} on {backend}: {res['type']}: {res['msg']!r} does not name {missing}"


@pytest.mark.skip(reason="mixed devices need a GPU: a CUDA weight with a CPU input (covered on GPU machines by "
                         "the per-op tests' device checks)")
def test_bad_inputs_mixed_devices():
    pass
