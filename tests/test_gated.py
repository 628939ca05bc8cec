"""swiglu / geglu (fused act(gate) * up): every backend against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import ember
from ember.ops.gated import gated_backward_reference, gated_reference

from tolerances import DTYPE_TOLS

# (ember function, kwargs, act, torch eager equivalent)
GATED = [
    pytest.param((ember.ops.swiglu, {}, "silu", lambda g, u: F.silu(g) * u), id="swiglu"),
    pytest.param((ember.ops.geglu, {}, "gelu", lambda g, u: F.gelu(g) * u), id="geglu"),
    pytest.param((ember.ops.geglu, {"approximate": "tanh"}, "gelu_tanh", lambda g, u: F.gelu(g, approximate="tanh") * u),
                 id="geglu_tanh"),
]

LAYOUTS = [
    pytest.param((1,), id="1"),
    pytest.param((7,), id="7"),
    pytest.param((1023,), id="1023"),
    pytest.param((4097,), id="4097"),
    pytest.param((2, 3, 7), id="3d"),
    pytest.param("halves", id="halves"),  # x.chunk(2, -1): strided rows, read in place
    pytest.param("transposed", id="transposed"),  # non-contiguous last dim: copied
    pytest.param((0, 5), id="empty"),
    pytest.param((3, 0), id="empty_cols"),
]


def make_pair(layout, dtype, device):
    def rnd(*shape):
        return (3 * torch.randn(*shape, dtype=torch.float64, device=device)).to(dtype)

    if layout == "halves":
        gate, up = rnd(4, 5, 2 * 33).chunk(2, dim=-1)
        assert not gate.is_contiguous()
        return gate, up
    if layout == "transposed":
        return rnd(17, 9).t(), rnd(17, 9).t()
    return rnd(*layout), rnd(*layout)


@pytest.mark.parametrize("case", GATED)
@pytest.mark.parametrize("dtype_tol", DTYPE_TOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward(case, dtype_tol, layout, backend_device):
    fn, kwargs, act, _ = case
    dtype, atol, rtol = dtype_tol
    backend, device = backend_device
    gate, up = (t.requires_grad_() for t in make_pair(layout, dtype, device))
    y = fn(gate, up, **kwargs, backend=backend)
    expected = gated_reference(gate.detach().double(), up.detach().double(), act)
    assert y.shape == gate.shape and y.dtype == dtype
    # the product of two rounded values: allow the rounding of up's magnitude on top of the activation's
    torch.testing.assert_close(y.double(), expected.to(dtype).double(), atol=3 * atol, rtol=2 * rtol)

    grad = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), grad)
    eg, eu = gated_backward_reference(grad.double(), gate.detach().double(), up.detach().double(), act)
    torch.testing.assert_close(dgate.double(), eg.to(dtype).double(), atol=6 * atol, rtol=4 * rtol)
    torch.testing.assert_close(dup.double(), eu.to(dtype).double(), atol=3 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("case", GATED)
def test_reference_matches_torch(case):
    _, _, act, torch_fn = case
    gate = (3 * torch.randn(33, 65, dtype=torch.float64)).requires_grad_()
    up = torch.randn(33, 65, dtype=torch.float64).requires_grad_()
    y = torch_fn(gate, up)
    torch.testing.assert_close(gated_reference(gate.detach(), up.detach(), act), y.detach(), atol=1e-13, rtol=1e-13)
    grad = torch.randn_like(y)
    expected = torch.autograd.grad(y, (gate, up), grad)
    for ours, theirs in zip(gated_backward_reference(grad, gate.detach(), up.detach(), act), expected):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", GATED)
def test_no_worse_than_torch_in_bf16(case, backend_device):
    fn, kwargs, act, torch_fn = case
    backend, device = backend_device
    gate, up = make_pair((64, 129), torch.bfloat16, device)
    truth = gated_reference(gate.double(), up.double(), act)
    ours = (fn(gate, up, **kwargs, backend=backend).double() - truth).abs().max().item()
    theirs = (torch_fn(gate, up).double() - truth).abs().max().item()  # eager rounds act(gate) first
    assert ours <= 2 * theirs + 1e-6


@pytest.mark.parametrize("case", GATED)
def test_gradcheck_fp64(case, backend_device):
    fn, kwargs, _, _ = case
    backend, device = backend_device
    gate, up = (torch.randn(3, 2, 10, dtype=torch.float64, device=device).chunk(2, -1))
    gate, up = gate.requires_grad_(), up.requires_grad_()
    assert torch.autograd.gradcheck(lambda g, u: fn(g, u, **kwargs, backend=backend), (gate, up))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_opcheck(act, backend_device):
    backend, device = backend_device
    gate = torch.randn(4, 9, device=device, requires_grad=True)
    up = torch.randn(4, 9, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.ember.gated_act.default, (gate, up, act, backend))
    grad = torch.randn(4, 9, device=device)
    torch.library.opcheck(torch.ops.ember.gated_act_backward.default, (grad, gate.detach(), up.detach(), act, backend))


def test_backward_saves_less_than_eager():
    """Eager keeps act(gate) as well as gate and up; the fused op recomputes it."""
    saved = []

    def count(t):
        saved.append(t.numel() * t.element_size())
        return t

    gate = torch.randn(64, 64, requires_grad=True)
    up = torch.randn(64, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        ember.ops.swiglu(gate, up)
    ours, saved[:] = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        F.silu(gate) * up
    assert ours < sum(saved)


def test_nan_stays_in_its_element():
    gate = torch.randn(4, 8)
    up = torch.randn(4, 8)
    gate[1, 3] = float("nan")
    up[2, 5] = float("inf")
    y = ember.ops.swiglu(gate, up)
    expected = F.silu(gate) * up
    torch.testing.assert_close(y, expected, equal_nan=True)


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module, torch_fn",
    [
        (ember.nn.SwiGLU(), lambda g, u: F.silu(g) * u),
        (ember.nn.GeGLU(), lambda g, u: F.gelu(g) * u),
        (ember.nn.GeGLU("tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
    ],
    ids=["swiglu", "geglu", "geglu_tanh"],
)
def test_modules_two_and_one_tensor_forms(module, torch_fn):
    x = torch.randn(2, 5, 24, requires_grad=True)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(module(x), torch_fn(gate, up))
    torch.testing.assert_close(module(gate, up), torch_fn(gate, up))
    (g1,) = torch.autograd.grad(module(x).sum(), x)
    (g2,) = torch.autograd.grad(torch_fn(gate, up).sum(), x)
    torch.testing.assert_close(g1, g2)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x))


def test_module_repr():
    assert repr(ember.nn.GeGLU("tanh")) == "GeGLU(approximate='tanh')"
    assert repr(ember.nn.SwiGLU()) == "SwiGLU()"


def test_export_gated():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 32)
            self.act = ember.nn.SwiGLU()

        def forward(self, x):
            return self.act(self.proj(x))

    model, x = Block(), torch.randn(3, 8)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"ember.ops.swiglu: gate and up must have the same shape, got \(4, 8\) and \(4, 9\)"):
        ember.ops.swiglu(torch.randn(4, 8), torch.randn(4, 9))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="gate and up must have the same dtype"):
        ember.ops.geglu(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16))


def test_integer_rejected():
    with pytest.raises(TypeError, match="ember.ops.swiglu: up must be a floating-point tensor"):
        ember.ops.swiglu(torch.randn(3), torch.arange(3))


def test_mixed_devices():
    with pytest.raises(ValueError, match="gate and up must be on the same device, got cpu and meta"):
        ember.ops.swiglu(torch.randn(3), torch.randn(3, device="meta"))


def test_odd_single_tensor():
    with pytest.raises(ValueError, match="ember.nn.SwiGLU: a single input must hold gate and up"):
        ember.nn.SwiGLU()(torch.randn(2, 7))


def test_kernel_level_checks():
    with pytest.raises(RuntimeError, match="gate and up must have the same shape"):
        torch.ops.ember_C.gated_act(torch.randn(2, 3), torch.randn(2, 4), "silu")
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.ember_C.gated_act(torch.randn(2, 3, 1), torch.randn(2, 3, 1), "silu")
    with pytest.raises(ValueError, match="unknown activation 'tanh'; expected one of relu, silu, gelu, gelu_tanh, relu2"):
        torch.ops.ember_C.gated_act(torch.randn(2, 3), torch.randn(2, 3), "tanh")
