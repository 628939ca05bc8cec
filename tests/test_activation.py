"""relu / silu / gelu / gelu_tanh / relu2: every backend against the float64 reference, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import ember
from ember.ops.activation import act_backward_reference, act_reference

from tolerances import DTYPE_TOLS

# (ember function, kwargs, act name, torch function)
UNARY = [
    pytest.param((ember.ops.gelu, {}, "gelu", lambda x: F.gelu(x)), id="gelu"),
    pytest.param((ember.ops.gelu, {"approximate": "tanh"}, "gelu_tanh", lambda x: F.gelu(x, approximate="tanh")), id="gelu_tanh"),
    pytest.param((ember.ops.silu, {}, "silu", F.silu), id="silu"),
    pytest.param((ember.ops.relu, {}, "relu", F.relu), id="relu"),
    pytest.param((ember.ops.relu2, {}, "relu2", lambda x: F.relu(x) ** 2), id="relu2"),
]

SHAPES = [
    pytest.param((1,), id="1"),
    pytest.param((7,), id="7"),
    pytest.param((1023,), id="1023"),
    pytest.param((4097,), id="4097"),
    pytest.param((3, 5, 7), id="3d"),
    pytest.param("noncontig", id="noncontig"),
    pytest.param((0,), id="empty"),
    pytest.param((4, 0, 3), id="empty3d"),
    pytest.param((), id="scalar"),
]


def make_input(shape, dtype, device):
    if shape == "noncontig":
        x = (3 * torch.randn(65, 33, dtype=torch.float64, device=device)).to(dtype).t()
        assert not x.is_contiguous()
        return x
    # spread of 3 reaches the tails where erf/tanh/exp saturate
    return (3 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)


def assert_close(actual, expected_fp64, dtype, atol, rtol):
    assert actual.dtype == dtype and actual.shape == expected_fp64.shape
    torch.testing.assert_close(actual.double(), expected_fp64.to(dtype).double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", UNARY)
@pytest.mark.parametrize("dtype_tol", DTYPE_TOLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(case, dtype_tol, shape, backend_device):
    fn, kwargs, act, _ = case
    dtype, atol, rtol = dtype_tol
    backend, device = backend_device
    x = make_input(shape, dtype, device).requires_grad_()
    y = fn(x, **kwargs, backend=backend)
    assert_close(y, act_reference(x.detach().double(), act), dtype, atol, rtol)

    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    expected = act_backward_reference(grad.double(), x.detach().double(), act)
    assert_close(dx, expected, dtype, 2 * atol, 2 * rtol)


@pytest.mark.parametrize("case", UNARY)
def test_reference_matches_torch(case):
    """The oracle itself: the reference formulas equal torch's functions and autograd in float64."""
    _, _, act, torch_fn = case
    x = (4 * torch.randn(2049, dtype=torch.float64)).requires_grad_()
    y = torch_fn(x)
    torch.testing.assert_close(act_reference(x.detach(), act), y.detach(), atol=1e-14, rtol=1e-14)
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(act_backward_reference(grad, x.detach(), act), dx, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("case", UNARY)
def test_no_worse_than_torch_in_low_precision(case, backend_device):
    """flash-attention's rule: in bf16, ember's error vs fp64 is at most ~that of torch's own bf16 op."""
    fn, kwargs, act, torch_fn = case
    backend, device = backend_device
    x = make_input((4097,), torch.bfloat16, device)
    truth = act_reference(x.double(), act)
    ours = (fn(x, **kwargs, backend=backend).double() - truth).abs().max().item()
    theirs = (torch_fn(x).double() - truth).abs().max().item()
    assert ours <= 2 * theirs + 1e-6


@pytest.mark.parametrize("case", UNARY)
def test_gradcheck_fp64(case, backend_device):
    fn, kwargs, _, _ = case
    backend, device = backend_device
    x = torch.randn(2, 9, dtype=torch.float64, device=device)
    if case[2] == "relu":  # keep away from the kink at 0, where the derivative is undefined
        x = x + 0.1 * x.sign()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, **kwargs, backend=backend), (x,))


@pytest.mark.parametrize("act", ember.activations.UNARY)
def test_opcheck(act, backend_device):
    backend, device = backend_device
    x = torch.randn(5, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.ember.unary_act.default, (x, act, backend))
    g = torch.randn(5, 7, device=device)
    torch.library.opcheck(torch.ops.ember.unary_act_backward.default, (g, x.detach(), act, backend))


@pytest.mark.parametrize("case", UNARY)
def test_nan_inf_like_torch(case, backend_device):
    """NaN propagates as in torch; huge finite values give torch's float64 answer (torch's own fp32
    CPU gelu overflows to inf at 3e38, ember does not). At +-inf torch disagrees with itself between
    CPU and CUDA (CPU gelu(inf) is NaN), so there torch's answer or the limit (inf, 0) is accepted."""
    fn, kwargs, _, torch_fn = case
    backend, device = backend_device
    inf = float("inf")
    x = torch.tensor([float("nan"), 0.0, -0.0, 1e30, -1e30, 3e38, 80.0, -80.0, inf, -inf], device=device)
    x.requires_grad_()
    y = fn(x, **kwargs, backend=backend)
    expected = torch_fn(x)
    finite = torch.isfinite(x)
    assert y[x.isnan()].isnan().all()
    truth = torch_fn(x.detach().double()).float()
    torch.testing.assert_close(y[finite], truth[finite], atol=1e-6, rtol=0)
    for value, limit in ((inf, inf), (-inf, 0.0)):
        ours, theirs = y[x == value].item(), expected[x == value].item()
        assert ours == limit or ours == theirs or (ours != ours and theirs != theirs), (value, ours, theirs)
    grad = torch.ones_like(y)
    (ours,) = torch.autograd.grad(y, x, grad)
    (theirs,) = torch.autograd.grad(torch_fn(x), x, grad)
    torch.testing.assert_close(ours[finite | x.isnan()], theirs[finite | x.isnan()], atol=1e-6, rtol=0, equal_nan=True)


def test_backward_saves_no_more_than_torch():
    saved = []

    def count(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(64, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        ember.ops.gelu(x)
    ours, saved[:] = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        F.gelu(x)
    assert ours <= sum(saved)


# ------------------------------------------------------------------------------------------
# Modules: same constructor, repr, isinstance as torch.nn; compile and export.
# ------------------------------------------------------------------------------------------
def test_relu2_module_matches_transformers():
    """ember.nn.ReLU2 against transformers' ReLUSquaredActivation (torch.nn has no squared ReLU)."""
    activations = pytest.importorskip("transformers.activations")
    theirs = activations.ACT2CLS["relu2"]()
    x = (3 * torch.randn(3, 17, dtype=torch.float64)).requires_grad_()
    y = ember.nn.ReLU2()(x)
    torch.testing.assert_close(y, theirs(x), atol=0, rtol=1e-15)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(theirs(x), x, g)[0])


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (ember.nn.GELU(), torch.nn.GELU()),
        (ember.nn.GELU(approximate="tanh"), torch.nn.GELU(approximate="tanh")),
        (ember.nn.SiLU(), torch.nn.SiLU()),
        (ember.nn.ReLU(), torch.nn.ReLU()),
        (ember.nn.ReLU(inplace=True), torch.nn.ReLU(inplace=True)),
        (ember.nn.SiLU(inplace=True), torch.nn.SiLU(inplace=True)),
    ],
    ids=["gelu", "gelu_tanh", "silu", "relu", "relu_inplace", "silu_inplace"],
)
def test_modules_match_torch_nn(ours, theirs):
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, type(theirs))
    x = torch.randn(3, 17)
    torch.testing.assert_close(ours(x.clone()), theirs(x.clone()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("module", [ember.nn.GELU(), ember.nn.GELU("tanh"), ember.nn.SiLU(), ember.nn.ReLU(),
                                    ember.nn.ReLU2()], ids=["gelu", "gelu_tanh", "silu", "relu", "relu2"])
def test_compile_fullgraph(module):
    x = torch.randn(4, 33, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, module(x))
    (g1,) = torch.autograd.grad(y.sum(), x)
    (g2,) = torch.autograd.grad(module(x).sum(), x)
    torch.testing.assert_close(g1, g2)


def test_compile_inductor_and_export():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), ember.nn.GELU(), torch.nn.Linear(32, 16), ember.nn.SiLU())
    x = torch.randn(5, 16)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    exported = torch.export.export(model, (x,))
    assert any("ember.unary_act" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), model(x))


# ------------------------------------------------------------------------------------------
# Bad input: a clear Python error naming the argument, never a crash.
# ------------------------------------------------------------------------------------------
def test_integer_dtype_rejected():
    with pytest.raises(TypeError, match=r"ember.ops.gelu: x must be a floating-point tensor.*torch.int64"):
        ember.ops.gelu(torch.arange(5))


def test_non_tensor_and_sparse_rejected():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ember.ops.silu([1.0, 2.0])
    with pytest.raises(TypeError, match="dense"):
        ember.ops.relu(torch.eye(3).to_sparse())


def test_bad_approximate():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        ember.ops.gelu(torch.randn(3), approximate="fast")


def test_kernel_level_op_checks_dtype():
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        ember.ops.activation._forward(torch.arange(3), "gelu", "cpu")
