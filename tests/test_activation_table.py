"""The one activation table (ember/activations.py): the C++ enum agrees with it, each derivative is the
derivative of its forward, and every family that takes an activation accepts exactly the table's names.
The per-backend numerics of each activation are tested in test_activation.py, test_linear.py,
test_int8_ops.py and test_fuzz.py, all of which take their activation lists from the table."""
import pytest
import torch
import torch.nn.functional as F

import ember
from ember import activations


def test_cpp_enum_mirrors_the_table():
    ext = ember._backend.extension()
    if ext is None:
        pytest.skip("ember._C not built")
    assert dict(ext.activations()) == {n: a.id for n, a in activations.TABLE.items() if n != "none"}
    assert activations.ID["none"] == -1  # ember::Act::kNone, the epilogue without an activation


def test_triton_ids_are_the_tables():
    pytest.importorskip("triton")
    from ember.kernels import activation as tk

    assert tk.ACT_IDS is activations.ID


@pytest.mark.parametrize("name", list(activations.TABLE))
def test_backward_is_the_derivative_of_forward(name):
    act = activations.TABLE[name]
    # away from relu's kink at 0, where the one-sided derivatives differ
    x = (3 * torch.randn(4097, dtype=torch.float64)).requires_grad_()
    x.data[x.data.abs() < 1e-3] = 0.5
    g = torch.randn_like(x)
    (want,) = torch.autograd.grad(act.forward(x), x, g)
    torch.testing.assert_close(act.backward(g, x.detach()), want, atol=1e-12, rtol=1e-12)


def test_relu2_matches_torch_including_nan_and_the_kink():
    x = torch.tensor([float("nan"), -float("inf"), -2.0, -0.0, 0.0, 1e-30, 3.0, 1e20, float("inf")],
                     dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, float("inf"), 1.0, float("nan"), 2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    ours = activations.reference(x, "relu2")
    theirs = F.relu(x) ** 2
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    (want,) = torch.autograd.grad(theirs, x, g)
    got = activations.reference_backward(g, x.detach(), "relu2")
    # torch's chain rule gives inf * 0 = NaN where x <= 0 meets an infinite grad; ember selects 0 there,
    # as torch's own relu backward (threshold_backward) does
    where = torch.isfinite(g) | (x > 0)
    torch.testing.assert_close(got[where], want[where], equal_nan=True)
    assert got[1] == 0 and got[3] == 0


def test_check_names_the_op_and_the_choices():
    assert activations.check("ember.ops.linear", None) == "none"
    with pytest.raises(ValueError, match=r"ember.ops.linear: activation must be one of .*relu2.*got 'tanh'"):
        activations.check("ember.ops.linear", "tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        activations.check("x", "relu2", activations.GATED)


def test_every_family_takes_exactly_the_tables_names():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    for name in activations.EPILOGUE:
        ember.ops.linear(x, w, activation=name, backend="reference")
        wq, ws = ember.ops.quantize_weight(w)
        ember.ops.int8_linear(x, wq, ws, activation=name, backend="reference")
        ember.nn.Linear(8, 5, activation=None if name == "none" else name)
        ember.nn.Int8Linear(8, 5, activation=name)
    for name in activations.GATED:
        ember.ops.gated_linear(x, w, w, activation=name, backend="reference")
        ember.nn.GatedMLP(8, 4, activation=name)
    for bad in ("tanh", "Relu", ""):
        with pytest.raises(ValueError, match="activation must be one of"):
            ember.ops.linear(x, w, activation=bad)
        with pytest.raises(ValueError, match="activation must be one of"):
            ember.ops.int8_linear(x, *ember.ops.quantize_weight(w), activation=bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        ember.ops.gated_linear(x, w, w, activation="relu2")


def test_int8_kernels_refuse_an_unknown_activation_code():
    if ember._backend.extension() is None:
        pytest.skip("ember._C not built")
    x, (wq, ws) = torch.randn(2, 32), ember.ops.quantize_weight(torch.randn(16, 32))
    for op in (torch.ops.ember_C.int8_linear_w8a16, torch.ops.ember_C.int8_linear_w8a8):
        args = (x, wq, ws, None, 5) if op is torch.ops.ember_C.int8_linear_w8a16 else (x, wq, ws, None, None, 5)
        with pytest.raises(ValueError, match="act must be -1 \\(none\\) or an ember::Act id, got 5"):
            op(*args)
