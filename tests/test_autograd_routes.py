"""The one autograd of the ember ops (csrc/autograd.cpp, under the Autograd key) and its two routes.

Plain eager tensors on the "cpu" backend go straight to the ember_C kernels; anything else (here: a
dispatch mode, which is what tracing, FakeTensorMode and FlopCounterMode look like to it) goes below
autograd to the op's registered kernel. The two must give the same results and gradients (up to the BLAS's
own run-to-run rounding), and whatever must see the ember op (dispatch modes, vmap, compile) gets it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ember
from ember.ops.linear import gated_linear_op, linear_act

pytestmark = pytest.mark.skipif(ember._backend.extension() is None, reason="ember._C not built")


class _Recorder(TorchDispatchMode):
    """Records the ops it sees; its presence also sends ember's autograd down the op's route."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _both_routes(fn, tensors, grad):
    """(direct route, op route): output and gradients of fn, in plain eager mode and under a mode."""
    direct = _grads(fn, _leaves(*tensors), grad)
    with _Recorder() as rec:
        through_op = _grads(fn, _leaves(*tensors), grad)
    assert any(op.startswith("ember.") for op in rec.ops), rec.ops
    return direct, through_op


def _grads(fn, tensors, grad):
    out = fn(*tensors)
    return [out.detach()] + list(torch.autograd.grad(out, tensors, grad))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_linear_routes_agree(act):
    torch.manual_seed(0)
    base = torch.randn(3, 7, 19)
    x = base[:, :, :17]  # non-contiguous rows, 3-D
    w, b, r = torch.randn(9, 17), torch.randn(9), torch.randn(3, 7, 9)
    direct, through_op = _both_routes(
        lambda *t: ember.ops.linear(t[0], t[1], t[2], activation=act, residual=t[3], backend="cpu"), (x, w, b, r),
        torch.randn(3, 7, 9))
    for got, want in zip(direct, through_op):
        torch.testing.assert_close(got, want)
    # The op called directly, with save_preact: the pre-activation comes back only when asked for.
    with torch.no_grad():
        out, pre = linear_act(x, w, b, r, act, True, "cpu")
        torch.testing.assert_close(out, ember.ops.linear(x, w, b, activation=act, residual=r, backend="cpu"))
        assert pre.shape == ((21, 9) if act != "none" else (0,))
        assert linear_act(x, w, b, r, act, False, "cpu")[1].numel() == 0


def test_gated_linear_routes_agree():
    torch.manual_seed(1)
    x, wg, wu = torch.randn(2, 5, 13), torch.randn(11, 13), torch.randn(11, 13)
    bg, bu = torch.randn(11), torch.randn(11)
    direct, through_op = _both_routes(lambda *t: ember.ops.gated_linear(*t, activation="silu", backend="cpu"),
                                      (x, wg, wu, bg, bu), torch.randn(2, 5, 11))
    for got, want in zip(direct, through_op):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        h, pre = gated_linear_op(x, wg, wu, bg, bu, "silu", True, "cpu")
    torch.testing.assert_close(h, direct[0])
    assert pre.shape == (10, 22)


def test_activation_routes_agree():
    torch.manual_seed(2)
    x, grad = torch.randn(4, 1023), torch.randn(4, 1023)
    for fn in (ember.ops.gelu, ember.ops.silu, ember.ops.relu, ember.ops.relu2):
        direct, through_op = _both_routes(lambda t: fn(t, backend="cpu"), (x,), grad)
        for got, want in zip(direct, through_op):
            torch.testing.assert_close(got, want)
    gate, up = x[:, :500], x[:, 500:1000]  # halves of one buffer: strided rows
    direct, through_op = _both_routes(lambda a, b: ember.ops.swiglu(a, b, backend="cpu"), (gate, up), grad[:, :500])
    for got, want in zip(direct, through_op):
        torch.testing.assert_close(got, want)


def test_outputs_allow_inplace_and_refuse_double_backward():
    x, w = _leaves(torch.randn(2, 3, 8), torch.randn(4, 8))
    y = ember.ops.linear(x, w, activation="gelu", backend="cpu")
    y.add_(1.0)  # a view made inside an autograd.Function would refuse this
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    (gx,) = torch.autograd.grad(ember.ops.silu(x, backend="cpu").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(gx.sum(), x)


def test_dispatch_modes_vmap_and_export_see_the_ember_op():
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    with _Recorder() as rec:
        ember.ops.linear(x, w, activation="gelu")
        ember.ops.silu(x)
    assert any("ember.linear_act" in op for op in rec.ops), rec.ops
    assert any("ember.unary_act" in op for op in rec.ops), rec.ops
    # vmap: torch's fallback runs the op per slice; the result is the op's.
    xs = torch.randn(3, 5, 8)
    torch.testing.assert_close(torch.vmap(lambda t: ember.ops.linear(t, w, activation="gelu"))(xs),
                               ember.ops.linear(xs, w, activation="gelu"))

    class Layer(torch.nn.Module):
        def forward(self, t):
            return ember.ops.linear(t, w, activation="gelu")

    exported = torch.export.export(Layer(), (x,))
    assert any("ember.linear_act" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), Layer()(x))


def test_reference_backend_takes_the_op_and_its_derivative():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with _Recorder() as rec:
        y = ember.ops.linear(x, w, activation="gelu", backend="reference")
    assert any("ember.linear_act" in op for op in rec.ops), rec.ops
    assert torch.autograd.gradcheck(lambda a, b: ember.ops.linear(a, b, activation="gelu", backend="reference"),
                                    (x, w))
    # ReLU's derivative at 0 is the table's (0), as torch.relu's.
    z = torch.tensor([0.0, -0.0, 1.0, -1.0], requires_grad=True)
    (gz,) = torch.autograd.grad(ember.ops.relu(z, backend="reference").sum(), z)
    assert gz.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert y.shape == (3, 4)


# ---- the direct route (plain eager tensors) ------------------------------------------------------------
def test_linear_cpp_path_gradcheck_and_partial_grads():
    torch.manual_seed(3)
    x, w, b, r = (torch.randn(*s, dtype=torch.float64) for s in ((2, 3, 5), (4, 5), (4,), (2, 3, 4)))
    for act in ("none", "gelu", "relu"):
        x_, w_, b_, r_ = _leaves(x, w, b, r)
        assert torch.autograd.gradcheck(
            lambda *t: ember.ops.linear(t[0], t[1], t[2], activation=act, residual=t[3], backend="cpu"), (x_, w_, b_, r_))
    # Only some inputs need a gradient: the rest get none, and a 1-D x gives a 1-D output like F.linear.
    xv, w_ = torch.randn(5, dtype=torch.float64), w.clone().requires_grad_(True)
    y = ember.ops.linear(xv, w_, b, activation="silu", backend="cpu")
    assert y.shape == (4,)
    (gw,) = torch.autograd.grad(y.sum(), w_)
    torch.testing.assert_close(gw, torch.autograd.grad(torch.nn.functional.silu(xv @ w_.T + b).sum(), w_)[0])
    # torch.autograd.grad for x alone must not need (or compute) the weight gradient.
    x_, w_ = _leaves(x, w)
    (gx,) = torch.autograd.grad(ember.ops.linear(x_, w_, activation="gelu", backend="cpu").sum(), x_)
    assert gx.shape == x.shape and w_.grad is None


def test_gated_linear_cpp_path_gradcheck():
    torch.manual_seed(4)
    ts = [torch.randn(*s, dtype=torch.float64) for s in ((3, 6), (5, 6), (5, 6), (5,), (5,))]
    assert torch.autograd.gradcheck(lambda *t: ember.ops.gated_linear(*t, activation="gelu_tanh", backend="cpu"),
                                    tuple(_leaves(*ts)))
    assert torch.autograd.gradcheck(lambda *t: ember.ops.gated_linear(*t, activation="silu", backend="cpu"),
                                    tuple(_leaves(*ts[:3])))


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, w: ember.ops.linear(x, w.double(), backend="cpu"), TypeError, "weight must have x's dtype"),
    (lambda x, w: ember.ops.linear(x, w[:, :5], backend="cpu"), ValueError, "in_features"),
    (lambda x, w: ember.ops.linear(x, w, torch.randn(3), backend="cpu"), ValueError, "bias must have shape"),
    (lambda x, w: ember.ops.linear(x, w, residual=torch.randn(6, 4), backend="cpu"), ValueError, "residual"),
    (lambda x, w: ember.ops.linear(x, w, activation="tanh", backend="cpu"), ValueError, "activation must be one of"),
    (lambda x, w: ember.ops.linear(x.to_sparse(), w, backend="cpu"), TypeError, "dense"),
    (lambda x, w: ember.ops.linear(x.int(), w, backend="cpu"), TypeError, "floating-point"),
    (lambda x, w: ember.ops.gated_linear(x, w, w, activation="relu", backend="cpu"), ValueError, "activation"),
    (lambda x, w: ember.ops.gated_linear(x, w, w, torch.randn(4), backend="cpu"), ValueError, "both b_gate and b_up"),
    (lambda x, w: ember.ops.swiglu(x, x[..., :4], backend="cpu"), ValueError, "same shape"),
    (lambda x, w: ember.ops.gelu(x.int(), backend="cpu"), TypeError, "floating-point"),
])
def test_bad_input_gives_the_python_error(call, exc, words):
    x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
    with pytest.raises(exc, match=words):
        call(x, w)


def test_create_graph_gives_first_order_grads_and_refuses_the_second():
    x, w, b = _leaves(torch.randn(3, 8), torch.randn(4, 8), torch.randn(4))
    for fn in (lambda: ember.ops.linear(x, w, b, activation="gelu", backend="cpu"),
               lambda: ember.ops.gated_linear(x, w, w, activation="silu", backend="cpu")):
        gx, gw = torch.autograd.grad(fn().sum(), (x, w), create_graph=True)
        want = torch.autograd.grad(fn().sum(), (x, w))
        torch.testing.assert_close((gx.detach(), gw.detach()), want)
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(gx.sum(), w)
