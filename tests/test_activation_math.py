"""The C++ CPU kernels' own fp32 math (csrc/cpu/vec_activation.h: inline exp and erf on AVX-512) against
float64, over the whole useful input range and at the special values, forward and backward."""
import pytest
import torch

import ember
from ember.ops.activation import ACTS, act_backward_reference, act_reference

if ember._backend.extension() is None:
    pytest.skip("ember._C not built", allow_module_level=True)



SPECIAL = [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, -1e-40, 1e-30, -1e-30,
           80.0, 88.7, 89.0, 100.0, -80.0, -88.7, -89.0, -104.0, -200.0, 3.4e38, -3.4e38]


def _grid():
    # Dense where the functions bend, sparse out to where they saturate; not a multiple of 16 (the
    # vector width) so the masked tail runs too.
    return torch.cat([torch.linspace(-12, 12, 1_000_003), torch.linspace(-100, 100, 20_001)])


@pytest.mark.parametrize("act", ACTS)
def test_fp32_forward_and_backward_within_a_few_ulp_of_float64(act):
    x = _grid()
    y = torch.ops.ember_C.unary_act(x, act)
    ref = act_reference(x.double(), act)
    # |error| <= 1e-5 + 1.3e-6 |ref|: the fp32 tolerance every op test uses. A&S erf's absolute
    # error (1.5e-7) is what sets GELU's; SiLU and GELU-tanh are within a few ulp.
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1.3e-6)
    g = torch.randn_like(x)
    dx = torch.ops.ember_C.unary_act_backward(g, x, act)
    torch.testing.assert_close(dx.double(), act_backward_reference(g.double(), x.double(), act), atol=1e-5, rtol=2e-6)


def test_exp_keeps_relative_accuracy_down_to_tiny_results():
    # silu(x) = x * exp(x) / (1 + exp(x)) ~ x e^x for x << 0: its relative error is exp's.
    x = torch.linspace(-85, -20, 100_003)
    y = torch.ops.ember_C.unary_act(x, "silu").double()
    ref = act_reference(x.double(), "silu")
    assert ((y - ref).abs() / ref.abs()).max() < 1e-6


@pytest.mark.parametrize("act", ACTS)
def test_special_values_match_the_float64_reference(act):
    x = torch.tensor(SPECIAL)
    ref = act_reference(x.double(), act).float()  # infinities, NaNs and underflow to 0 as fp32 has them
    torch.testing.assert_close(torch.ops.ember_C.unary_act(x, act), ref, atol=1e-30, rtol=1.3e-6, equal_nan=True)
    # Backward at |x| > 1e19: x^2 overflows fp32, and GELU-tanh's gradient is NaN there in torch's fp32
    # kernel as in ours; the float64 reference has no such overflow, so those points are left out.
    x = x[~(x.abs() > 1e19)]
    g = torch.ones_like(x)
    dref = act_backward_reference(g.double(), x.double(), act).float()
    torch.testing.assert_close(torch.ops.ember_C.unary_act_backward(g, x, act), dref, atol=1e-30, rtol=2e-6,
                               equal_nan=True)


@pytest.mark.parametrize("act", ACTS)
def test_no_subnormal_results_where_exp_underflows(act):
    # exp gives 0 below -87 instead of underflowing gradually: every instruction that makes a subnormal
    # takes a microcode assist on Intel cores, and so does every GEMM instruction that later reads one
    # (exact GELU's backward on pre-activations of std 16 ran 12x slower, and the linear backward around
    # it 4x, before). GELU's exp(-x^2 / 2) underflows past |x| = 13.2, the sigmoids past x = +-87.
    x = torch.cat([torch.linspace(-120, 120, 240_007), torch.linspace(-14.5, -13.0, 30_011)])
    tiny = torch.finfo(torch.float32).tiny
    for what, out in (("forward", torch.ops.ember_C.unary_act(x, act)),
                      ("backward", torch.ops.ember_C.unary_act_backward(torch.ones_like(x), x, act))):
        a = out.abs()
        subnormal = (a > 0) & (a < tiny)
        assert not subnormal.any(), f"{act} {what}: subnormal at x = {x[subnormal][:4].tolist()}"
