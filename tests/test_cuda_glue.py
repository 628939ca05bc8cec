"""The CUDA glue's argument checks, called straight through torch.ops.ember_C (below ember's Python
checks), so a wrong bias or residual is an error naming it, never an out-of-bounds read. GPU only."""
import pytest
import torch

import ember
from ember.ops import int8 as I

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ember._backend.extension_has_cuda()),
                                reason="needs a CUDA device and ember._C built with CUDA")


def _operands(dtype=torch.bfloat16, M=37, K=64, N=48):
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
    return x, w


@pytest.mark.parametrize("bad, match", [
    (lambda N, x: torch.randn(N + 1, device="cuda", dtype=x.dtype), "bias must have shape"),
    (lambda N, x: torch.randn(N, device="cuda", dtype=torch.float32), "bias must have x's dtype"),
    (lambda N, x: torch.randn(N, dtype=x.dtype), "bias"),
])
def test_linear_bias_is_checked(bad, match):
    x, w = _operands()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ember_C.linear_act(x, w, bad(w.shape[0], x), None, "gelu", False)
    with pytest.raises(RuntimeError, match=match.replace("bias", "b_up")):
        torch.ops.ember_C.gated_linear(x, w, w, None, bad(w.shape[0], x), "silu", False)


def test_linear_residual_is_checked_and_strided_bias_read_right():
    x, w = _operands()
    M, N = x.shape[0], w.shape[0]
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.ember_C.linear_act(x, w, None, torch.randn(M, N - 1, device="cuda", dtype=x.dtype), "none", False)
    bias = torch.randn(2 * N, device="cuda", dtype=x.dtype)[::2]  # stride 2: copied, not misread
    res = torch.randn(N, M, device="cuda", dtype=x.dtype).t()  # column stride M
    out, _ = torch.ops.ember_C.linear_act(x, w, bias, res, "none", False)
    want = torch.addmm(bias.float(), x.float(), w.float().t()) + res.float()
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=2e-2)


def test_w8a8_weight_at_misaligned_offset():
    K, N = 64, 40
    x = torch.randn(33, K, device="cuda")
    w, sw = I.quantize_weight(torch.randn(N, K, device="cuda"))
    buf = torch.empty(N * K + 3, dtype=torch.int8, device="cuda")
    w_odd = buf[3:].view(N, K)  # contiguous, but 3 bytes past a 16-byte boundary
    w_odd.copy_(w)
    assert w_odd.data_ptr() % 16 != 0
    got = torch.ops.ember_C.int8_linear_w8a8(x, w_odd, sw.reshape(N), None, None, -1)
    want = torch.ops.ember_C.int8_linear_w8a8(x, w, sw.reshape(N), None, None, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
