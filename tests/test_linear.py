"""ember.ops.linear / ember.nn.Linear: forward and backward on every backend against the float64
reference, opcheck, torch.compile, the module's contract, and errors.

Accuracy criterion (as flash-attention's tests): against the float64 result on the same inputs, the
op's error must be at most twice plain PyTorch's error in the same dtype, plus a small floor.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ember
from ember.ops.activation import act_reference
from ember.info import native_16bit_gemm
from ember.ops.linear import linear_act

ACTS = list(ember.activations.EPILOGUE)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float64, id="fp64"),
]
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
# (x shape, out_features): M=1, odd K and N, 3-D batched; small enough for the Triton interpreter.
SHAPES = [((1, 17), 9), ((7, 64), 48), ((33, 17), 48), ((2, 5, 17), 9)]


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's tl.dot has no float64")
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's tl.dot returns garbage for bfloat16 inputs; bf16 is tested on GPU")


def eager(x, w, b, act, residual=None):
    """What torch eager computes: F.linear, then the activation, then the residual add."""
    y = F.linear(x, w, b)
    y = y if act == "none" else act_reference(y, act)
    return y if residual is None else y + residual


def check_close(name, got, want64, torch_lp):
    """|got - want64| <= 2 |torch_lp - want64| + floor, elementwise max."""
    floor = FLOOR[got.dtype] * max(1.0, want64.abs().max().item())
    err = (got.double() - want64).abs().max().item()
    torch_err = (torch_lp.double() - want64).abs().max().item()
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} vs torch's {torch_err:.3g} (+{floor:.3g})"


def _run(fn, inputs, grad):
    inputs = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_forward_backward(backend_device, dtype, shape, act):
    backend, device = backend_device
    _skip_unsupported(backend, dtype)
    (xs, n) = shape
    k = xs[-1]
    x = torch.randn(xs, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, device=device, dtype=dtype)
    res = torch.randn(*xs[:-1], n, device=device, dtype=dtype) if act == "gelu" else None
    grad = torch.randn(*xs[:-1], n, device=device, dtype=dtype)

    ours = _run(lambda x, w, b, r: ember.ops.linear(x, w, b, activation=act, residual=r, backend=backend),
                [x, w, b, res], grad)
    want = _run(lambda x, w, b, r: eager(x, w, b, act, r), [t.double() if t is not None else None for t in (x, w, b, res)],
                grad.double())
    lp = _run(lambda x, w, b, r: eager(x, w, b, act, r), [x, w, b, res], grad)
    check_close("out", ours[0], want[0], lp[0])
    assert ours[0].dtype == dtype and ours[0].shape == (*xs[:-1], n)
    for name, g, g64, glp in zip(("dx", "dw", "db", "dres"), ours[1], want[1], lp[1]):
        if g64 is not None:
            assert g.shape == g64.shape and g.dtype == dtype, name
            check_close(name, g, g64, glp)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_non_contiguous_inputs_and_no_bias(backend):
    if ember.available_backends()[backend]:
        pytest.skip(ember.available_backends()[backend])
    x = torch.randn(17, 6, dtype=torch.float64).t()  # (6, 17), column-major
    w = torch.randn(9, 17, dtype=torch.float64).t().contiguous().t()  # (9, 17) with strides (1, 9)
    if backend == "triton":
        x, w = x.float(), w.float()
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = ember.ops.linear(xr, wr, activation="silu", backend=backend)
    ref = F.silu(x.double() @ w.double().t())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    F.silu(x64 @ w64.t()).sum().backward()
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wr.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


def test_inference_keeps_no_preactivation_and_matches_training():
    x, w, b = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)
    with torch.no_grad():
        out, pre = linear_act(x, w, b, None, "gelu", False, "cpu")
        assert pre.numel() == 0
    out2, pre2 = linear_act(x, w, b, None, "gelu", True, "cpu")
    assert pre2.shape == (5, 7)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(pre2, F.linear(x, w, b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("shape", [(6, 12), (2, 3, 12), (0, 12), (2, 0, 12)])
def test_relu_keeps_its_output_not_a_second_buffer(backend, shape):
    # ReLU's grad reads off its output, so the op saves the output (as torch's relu does) and no
    # pre-activation: training holds one (rows, N) buffer per layer, not two. Grads stay exact, NaN
    # rows included, and an in-place change to the output is refused as torch refuses it.
    dtype, tol = (torch.float32, 1e-4) if backend == "triton" else (torch.float64, 1e-12)  # tl.dot: no fp64
    x = torch.randn(*shape, dtype=dtype)
    if x.numel():
        x.view(-1, 12)[0, 3] = float("nan")
    x.requires_grad_()
    w = torch.randn(9, 12, dtype=dtype, requires_grad=True)
    b = torch.randn(9, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ember.ops.linear(x, w, b, activation="relu", backend=backend)
    big = [t for t in saved if t.dim() >= 2 and t.shape[-1] == 9]
    assert len(big) == 1 and big[0].data_ptr() == out.data_ptr()
    g = torch.randn_like(out)
    out.backward(g)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.relu(F.linear(x2, w2, b2)).backward(g)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
    if out.numel():
        again = ember.ops.linear(x, w, b, activation="relu", backend=backend)
        again.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            again.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep_pre", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-res", "res"])
def test_cpu_epilogue_variants(dtype, keep_pre, with_bias, with_residual):
    # The C++ kernel adds the bias in the activation pass after a plain GEMM (fp32/fp64), or in the
    # GEMM (bf16), in six variants: every one against float64, the kept pre-activation included (it
    # must hold x @ w^T + b, which backward differentiates at). Odd widths, a strided residual and a
    # strided bias; 1031 rows x 37 columns span several of map_rows' work chunks.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1031, 19, generator=g).to(dtype)
    w = (torch.randn(37, 19, generator=g) / 19**0.5).to(dtype)
    b = torch.randn(74, generator=g).to(dtype)[::2] if with_bias else None
    res = torch.randn(1031, 80, generator=g).to(dtype)[:, 3:40] if with_residual else None
    out, pre = linear_act(x, w, b, res, "gelu", keep_pre, "cpu")
    pre64 = x.double() @ w.double().t() + (b.double() if with_bias else 0)
    want = F.gelu(pre64) + (res.double() if with_residual else 0)
    tol = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert out.is_contiguous() and out.dtype == dtype
    if keep_pre:
        torch.testing.assert_close(pre.double(), pre64, atol=tol, rtol=tol)
        assert pre.data_ptr() != out.data_ptr()
    else:
        assert pre.numel() == 0


@pytest.mark.skipif(ember._backend.extension() is None, reason="needs ember._C")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_16bit_gemms_run_in_fp32_without_a_native_dot(dtype):
    # Where the CPU has no native bf16/fp16 dot product, a C++ op's GEMM with enough multiply-adds per
    # converted element runs in fp32 and rounds once: the kept pre-activation and the weight gradient
    # are then exactly fp32's, rounded. A small one (one row) stays in the 16-bit type: ATen's result.
    if native_16bit_gemm(dtype):
        pytest.skip(f"this CPU has a native {dtype} dot product: the GEMMs stay in {dtype}")
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((97, 64), (80, 64), (80,)))
    _, pre = linear_act(x, w, b, None, "silu", True, "cpu")
    assert torch.equal(pre, F.linear(x.float(), w.float(), b.float()).to(dtype))
    grad = torch.randn(97, 80, generator=g).to(dtype)
    _, dw, _ = torch.ops.ember_C.linear_act_backward(grad, x, w, pre, "none", False, True, False)
    assert torch.equal(dw, (grad.float().t() @ x.float()).to(dtype))
    _, pre1 = linear_act(x[:1], w, b, None, "silu", True, "cpu")
    assert torch.equal(pre1, F.linear(x[:1], w, b))


def test_empty_and_large_rows_bias_grad():
    # rows > the C++ backward's row chunk (64): the bias grad is summed over several partials.
    x = torch.randn(1000, 8, dtype=torch.float64, requires_grad=True)
    lin = ember.nn.Linear(8, 600, activation="gelu", dtype=torch.float64)
    with ember.backend("cpu"):
        lin(x).sum().backward()
    ref = nn.Linear(8, 600, dtype=torch.float64)
    ref.load_state_dict(lin.state_dict())
    x2 = x.detach().requires_grad_()
    F.gelu(ref(x2)).sum().backward()
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-9, rtol=1e-9)
    empty = ember.ops.linear(torch.randn(0, 8), torch.randn(3, 8), torch.randn(3), activation="relu", backend="cpu")
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_opcheck(backend):
    if ember.available_backends()[backend]:
        pytest.skip(ember.available_backends()[backend])
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    r = torch.randn(2, 3, 6, requires_grad=True)
    for act in ("gelu", "none"):
        torch.library.opcheck(torch.ops.ember.linear_act.default, (x, w, b, r, act, True, backend))
    torch.library.opcheck(torch.ops.ember.linear_act.default, (x.detach(), w.detach(), None, None, "relu", False, backend))


def test_gradcheck_fp64():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu", "reference"):
        torch.autograd.gradcheck(lambda x, w, b: ember.ops.linear(x, w, b, activation="gelu_tanh", backend=backend),
                                 (x, w, b))


def test_torch_compile_fullgraph():
    lin = ember.nn.Linear(16, 24, activation="gelu")
    x = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    ref = lin(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, lin.weight.grad)


def test_module_contract():
    torch.manual_seed(0)
    lin = ember.nn.Linear(10, 6, activation="silu")
    plain = nn.Linear(10, 6)
    assert isinstance(lin, nn.Linear)
    assert lin.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(lin.state_dict())
    x = torch.randn(4, 10)
    torch.testing.assert_close(lin(x), F.silu(plain(x)))
    nb = ember.nn.Linear(10, 6, bias=False)
    assert nb.bias is None and "bias" not in nb.state_dict()
    torch.testing.assert_close(nb(x), F.linear(x, nb.weight))
    shared = ember.nn.Linear.from_linear(plain, "gelu")
    assert shared.weight is plain.weight and shared.bias is plain.bias
    assert "activation='gelu'" in repr(shared)


def test_errors():
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.raises(ValueError, match="x has 7 features"):
        ember.ops.linear(torch.randn(4, 7), w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        ember.ops.linear(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ember.ops.linear(x, w.double(), b)
    with pytest.raises(TypeError, match="floating-point"):
        ember.ops.linear(x.long(), w, b)
    with pytest.raises(ValueError, match="activation must be one of"):
        ember.ops.linear(x, w, b, activation="tanh")
    with pytest.raises(ValueError, match="must be 2-D"):
        ember.ops.linear(x, w[None], b)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ember.ops.linear(x, w, b, residual=torch.randn(4, 6))
    with pytest.raises(ValueError, match="activation must be one of"):
        ember.nn.Linear(3, 4, activation="tanh")
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.ember_C.linear_act(torch.randn(2, 3, 4), torch.randn(5, 4), None, None, "gelu", False)


@pytest.mark.parametrize("variant", ["pointer", "tma"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_triton_kernel_variants(variant, gated):
    """Both Triton kernels (per-tile pointer kernel; persistent TMA kernel, chosen automatically on
    sm_90) on the same problem; under the interpreter the TMA descriptors are emulated."""
    if ember.available_backends()["triton"]:
        pytest.skip(ember.available_backends()["triton"])
    from ember.kernels import linear as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, k, n = 37, 72, 40  # 4 x 3 tiles of 32 (the interpreter's tile) with ragged edges and a K tail
    x = torch.randn(m, k, device=device)
    w, w2 = torch.randn(n, k, device=device), torch.randn(n, k, device=device)
    b, b2 = torch.randn(n, device=device), torch.randn(n, device=device)
    res = None if gated else torch.randn(m, n, device=device)
    out, pre = tk.gemm(x, w, b, res, "gelu", w2=w2 if gated else None, b2=b2 if gated else None, save_pre=True,
                       variant=variant)
    with torch.no_grad():
        g = x.double() @ w.double().t() + b.double()
        if gated:
            u = x.double() @ w2.double().t() + b2.double()
            want, want_pre = F.gelu(g) * u, torch.cat([g, u], 1)
        else:
            want, want_pre = F.gelu(g) + res.double(), g
    tol = 1e-2 if device == "cuda" else 1e-4  # GPU fp32 may use TF32 per torch's setting
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(pre.double(), want_pre, atol=tol, rtol=tol)


def test_triton_tuner_persists_choices(tmp_path, monkeypatch):
    """The per-problem tile choice is timed once, then read back from the JSON cache by a new tuner
    (a new process) without timing again."""
    pytest.importorskip("triton")
    from ember.kernels import linear as tk

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    timed = []

    def fake_bench(fn, **kw):
        fn()
        return 1.0 if len(timed) != 4 else 0.5  # the 4th config is the fastest

    monkeypatch.setattr(tk.triton.testing, "do_bench", fake_bench)
    first = tk._Tuner().config("dev|key", lambda cfg: timed.append(cfg))
    assert first == tk._GPU_CONFIGS[3] and len(timed) == len(tk._GPU_CONFIGS)
    timed.clear()
    again = tk._Tuner().config("dev|key", lambda cfg: timed.append(cfg))
    assert again == first and timed == []
    assert (tmp_path / "linear_configs.json").exists()


def test_triton_fp32_follows_torch_fp32_precision():
    # torch >= 2.9 keeps the choice in matmul.fp32_precision; allow_tf32 is a shim there that pytest's
    # monkeypatch cannot restore (pytest 9.2 raised AttributeError in teardown), so set and restore by hand.
    pytest.importorskip("triton")
    from ember.kernels import linear as tk

    cuda = torch.device("cuda")
    matmul = torch.backends.cuda.matmul
    try:
        new_api = isinstance(matmul.fp32_precision, str)
    except AttributeError:
        new_api = False
    name = "fp32_precision" if new_api else "allow_tf32"
    on, off = ("tf32", "ieee") if new_api else (True, False)
    saved = getattr(matmul, name)
    try:
        setattr(matmul, name, on)
        assert tk._precision(torch.float32, cuda) == "tf32"
        assert tk._precision(torch.bfloat16, cuda) == "ieee"  # only fp32 operands have a tf32 mode
        setattr(matmul, name, off)
        assert tk._precision(torch.float32, cuda) == "ieee"
        assert tk._precision(torch.float32, torch.device("cpu")) == "ieee"  # the interpreter: exact fp32
    finally:
        setattr(matmul, name, saved)


def test_inference_fast_path_matches_the_op_and_yields_to_dispatch_modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w, b = torch.randn(2, 3, 12), torch.randn(7, 12), torch.randn(7)
    with torch.no_grad():
        fast = ember.ops.linear(x, w, b, activation="silu", backend="cpu")
        gated = ember.ops.gated_linear(x, w, w * 2, activation="gelu", backend="cpu")
    via_op, _ = linear_act(x, w, b, None, "silu", False, "cpu")
    torch.testing.assert_close(fast, via_op, atol=0, rtol=0)
    torch.testing.assert_close(gated, F.gelu(F.linear(x, w)) * F.linear(x, w * 2), atol=1e-5, rtol=1e-5)

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Log():
        ember.ops.linear(x, w, b, activation="silu", backend="cpu")
    assert any("ember.linear_act" in s for s in seen), seen


def _triton_or_skip():
    pytest.importorskip("triton")
    if ember.available_backends()["triton"]:
        pytest.skip(ember.available_backends()["triton"])
    from ember.kernels import linear as tk

    return tk


@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
def test_triton_gated_reads_w_up_through_its_own_strides(layout):
    """The gated GEMM once addressed w_up with w_gate's strides: wrong whenever the two differ."""
    tk = _triton_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, k, n = 19, 40, 24
    x, wg = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    if layout == "transposed":  # (n, k) view of a (k, n) contiguous tensor: strides (1, n)
        wu = torch.randn(k, n, device=device).t()
    else:  # (n, k) columns of a wider weight: strides (k + 9, 1)
        wu = torch.randn(n, k + 9, device=device)[:, 3:k + 3]
    assert wu.stride() != wg.stride()
    bg, bu = torch.randn(n, device=device), torch.randn(n, device=device)
    h, pre = tk.gated_linear(x, wg, wu, bg, bu, "silu", True)
    with torch.no_grad():
        g = x.double() @ wg.double().t() + bg.double()
        u = x.double() @ wu.double().t() + bu.double()
    tol = 1e-2 if device == "cuda" else 1e-4
    torch.testing.assert_close(h.double(), F.silu(g) * u, atol=tol, rtol=tol)
    torch.testing.assert_close(pre.double(), torch.cat([g, u], 1), atol=tol, rtol=tol)
    out = ember.ops.gated_linear(x, wg, wu, bg, bu, activation="silu", backend="triton")
    torch.testing.assert_close(out.double(), F.silu(g) * u, atol=tol, rtol=tol)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_triton_strided_bias(gated):
    """The epilogue read bias[n] at unit stride; a strided bias view (every other element) must work."""
    tk = _triton_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, k, n = 21, 24, 40
    x, w, w2 = (torch.randn(m, k, device=device), torch.randn(n, k, device=device), torch.randn(n, k, device=device))
    b, b2 = torch.randn(2 * n, device=device)[::2], torch.randn(3 * n, device=device)[1::3]
    assert b.stride(0) == 2 and b2.stride(0) == 3
    out, _ = tk.gemm(x, w, b, None, "relu", w2=w2 if gated else None, b2=b2 if gated else None, variant="pointer")
    with torch.no_grad():
        want = F.relu(x.double() @ w.double().t() + b.double())
        if gated:
            want = want * (x.double() @ w2.double().t() + b2.double())
    tol = 1e-2 if device == "cuda" else 1e-4
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    y = ember.ops.linear(x, w, b, activation="relu", backend="triton")
    torch.testing.assert_close(y.double(), F.relu(x.double() @ w.double().t() + b.double()), atol=tol, rtol=tol)


@pytest.fixture
def compile_target():
    """Pretend to launch for a given GPU (as `python -m ember compile-check` does): pure Python."""
    tk = _triton_or_skip()
    from ember.kernels import _target

    def set_target(arch):
        cap = {90: (9, 0), 80: (8, 0)}[arch]
        _target.set_compile_target(_target.CompileTarget(f"test sm_{arch}", cap, 100))

    yield tk, set_target
    _target.set_compile_target(None)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_tile_candidates_fit_shared_memory(compile_target, arch):
    tk, set_target = compile_target
    set_target(arch)
    cpu = torch.device("cpu")
    limit = {80: 166912, 90: 232448}[arch]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for gated in (False, True):
            for prec in ("ieee", "tf32"):
                cands = tk.candidate_configs(dtype, gated, prec, cpu)
                assert cands, (dtype, gated, prec)
                es = torch.empty((), dtype=dtype).element_size()
                assert all(tk.smem_bytes(c, es, gated) <= limit for c in cands)
                for M, N, K in ((1, 4096, 4096), (8, 768, 3072), (40, 4096, 1024), (4096, 4096, 4096), (512, 64, 64)):
                    assert tk.heuristic_config(M, N, K, dtype, gated, prec, cpu) in cands
    # the largest fp32 gated tiles need 288 KB: never a candidate anywhere
    assert (128, 256, 64, 8, 8, 3) not in tk.candidate_configs(torch.float32, True, "tf32", cpu)
    if arch == 80:  # 196 KB: fits sm_90's 227 KB, not sm_80's 163 KB
        assert (128, 128, 64, 8, 4, 4) not in tk.candidate_configs(torch.float32, False, "tf32", cpu)


def test_triton_heuristic_tiles(compile_target):
    tk, set_target = compile_target
    set_target(90)
    cpu = torch.device("cpu")
    h = tk.heuristic_config
    assert h(1, 4096, 4096, torch.bfloat16, False, "ieee", cpu)[0] == 16  # decode: narrow M tile
    assert h(8, 4096, 4096, torch.float16, True, "ieee", cpu)[0] == 16
    assert h(4096, 4096, 4096, torch.bfloat16, False, "ieee", cpu) == (128, 128, 64, 8, 8, 3)  # 4 warps spilled
    big_gated = h(4096, 4096, 4096, torch.bfloat16, True, "ieee", cpu)
    assert big_gated[2] <= 32 or big_gated[0] <= 64  # two accumulators: a smaller K or M tile
    assert h(4096, 4096, 4096, torch.float32, False, "tf32", cpu)[2] == 32  # fp32: half the K tile
    # exact fp32 on FMA units: every candidate has a small K tile and at most 32 accumulators per thread
    # (BLOCK_K 64 spilled 0.1-47 KB per thread on sm_80 / sm_90: compile-check)
    for arch in (80, 90):
        set_target(arch)
        for gated in (False, True):
            for bm, bn, bk, _, warps, _ in tk.candidate_configs(torch.float32, gated, "ieee", cpu):
                assert bk <= 32 and bm * bn * (2 if gated else 1) <= 32 * 32 * warps, (arch, gated, bm, bn, bk)
            assert h(1, 4096, 4096, torch.float32, gated, "ieee", cpu)[0] == 16


def test_triton_tma_variant_never_on_sm80(compile_target):
    tk, set_target = compile_target
    set_target(80)
    x, w = torch.randn(32, 64), torch.randn(48, 64)
    assert not tk._tma_ok(x, w)  # "auto" takes the pointer kernel
    with pytest.raises(ValueError, match="sm_90"):
        tk.gemm(x, w, variant="tma")


def test_triton_autotune_off_never_times(tmp_path, monkeypatch):
    """EMBER_TRITON_AUTOTUNE=0: the heuristic's config, no do_bench, nothing written to the cache; a
    choice already in the cache is still used."""
    tk = _triton_or_skip()
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EMBER_TRITON_AUTOTUNE", "0")

    def no_bench(fn, **kw):
        raise AssertionError("do_bench called with EMBER_TRITON_AUTOTUNE=0")

    monkeypatch.setattr(tk.triton.testing, "do_bench", no_bench)
    launched = []
    cands, default = tk._GPU_CONFIGS[2:6], tk._GPU_CONFIGS[4]
    tune = tk.autotune_enabled(torch.device("cpu"))
    assert tune is False
    got = tk._Tuner().config("dev|key", launched.append, cands, default, tune=tune)
    assert got == default and launched == []
    assert not (tmp_path / "linear_configs.json").exists()
    (tmp_path / "linear_configs.json").write_text('{"dev|key": [%s]}' % ", ".join(map(str, cands[1])))
    assert tk._Tuner().config("dev|key", launched.append, cands, default, tune=False) == cands[1]
    # a remembered config that is no longer a candidate (e.g. over this GPU's shared memory) is dropped
    assert tk._Tuner().config("dev|key", launched.append, cands[2:], default, tune=False) == default
    monkeypatch.delenv("EMBER_TRITON_AUTOTUNE")
    assert tk.autotune_enabled(torch.device("cpu")) is True
