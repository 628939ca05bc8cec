"""The eager fast path (ember.ops._common.eager_native): plain eager calls on the CPU backend skip the
torch.library custom op and make one call into ember._C (csrc/eager.cpp), which runs the ember_C kernels
and, for training, records a C++ autograd node. Its results and gradients must equal the custom op's (up to the
BLAS's own run-to-run rounding), and anything that must see the custom op (dispatch modes, vmap,
compile) must still get it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ember
from ember.ops.activation import unary_act
from ember.ops.gated import gated_act
from ember.ops.linear import gated_linear_op, linear_act

pytestmark = pytest.mark.skipif(ember._backend.extension() is None, reason="ember._C not built")


def _grads(fn, tensors, grad):
    out = fn(*tensors)
    return [out.detach()] + list(torch.autograd.grad(out, tensors, grad))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
def test_linear_matches_custom_op(act):
    torch.manual_seed(0)
    base = torch.randn(3, 7, 19)
    x = base[:, :, :17]  # non-contiguous rows, 3-D
    w, b, r = torch.randn(9, 17), torch.randn(9), torch.randn(3, 7, 9)
    grad = torch.randn(3, 7, 9)
    fast = _grads(lambda *t: ember.ops.linear(t[0], t[1], t[2], activation=act, residual=t[3], backend="cpu"),
                  _leaves(x, w, b, r), grad)
    slow = _grads(lambda *t: linear_act(*t, act, act != "none", "cpu")[0], _leaves(x, w, b, r), grad)
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(ember.ops.linear(x, w, b, activation=act, residual=r, backend="cpu"),
                                   linear_act(x, w, b, r, act, False, "cpu")[0])


def test_gated_linear_matches_custom_op():
    torch.manual_seed(1)
    x, wg, wu = torch.randn(2, 5, 13), torch.randn(11, 13), torch.randn(11, 13)
    bg, bu = torch.randn(11), torch.randn(11)
    grad = torch.randn(2, 5, 11)
    fast = _grads(lambda *t: ember.ops.gated_linear(*t, activation="silu", backend="cpu"), _leaves(x, wg, wu, bg, bu),
                  grad)
    slow = _grads(lambda *t: gated_linear_op(*t, "silu", True, "cpu")[0], _leaves(x, wg, wu, bg, bu), grad)
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want)


def test_activations_match_custom_op():
    torch.manual_seed(2)
    x, grad = torch.randn(4, 1023), torch.randn(4, 1023)
    for act, fn in (("gelu", ember.ops.gelu), ("silu", ember.ops.silu), ("relu", ember.ops.relu)):
        fast = _grads(lambda t: fn(t, backend="cpu"), _leaves(x), grad)
        slow = _grads(lambda t: unary_act(t, act, "cpu"), _leaves(x), grad)
        for got, want in zip(fast, slow):
            torch.testing.assert_close(got, want)
    gate, up = x[:, :500], x[:, 500:1000]  # halves of one buffer: strided rows
    fast = _grads(lambda a, b: ember.ops.swiglu(a, b, backend="cpu"), _leaves(gate, up), grad[:, :500])
    slow = _grads(lambda a, b: gated_act(a, b, "silu", "cpu"), _leaves(gate, up), grad[:, :500])
    for got, want in zip(fast, slow):
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


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_vmap_still_see_the_custom_op():
    from ember.ops._common import eager_native

    x, w = torch.randn(5, 8), torch.randn(4, 8)
    assert eager_native("cpu", "linear", x, w)
    with _Recorder() as rec:
        ember.ops.linear(x, w, activation="gelu", backend="cpu")
        ember.ops.silu(x, backend="cpu")
    assert any("ember.linear_act" in op for op in rec.ops), rec.ops
    assert any("ember.unary_act" in op for op in rec.ops), rec.ops
    seen = []
    torch.vmap(lambda t: seen.append(eager_native("cpu", "gelu", t)) or t * 2)(torch.randn(3, 6))
    assert seen == [False]
    assert not eager_native("reference", "linear", x, w)


# ---- the C++ entry points themselves (csrc/eager.cpp) ------------------------------------------------
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
def test_bad_input_through_the_cpp_path_gives_the_python_error(call, exc, words):
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
