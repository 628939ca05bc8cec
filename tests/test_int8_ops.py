"""ember.ops.quantize_per_token / int8_linear on every backend against the pure-PyTorch reference, plus
quantization properties, bad inputs and the inference-only contract."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ember
from ember.ops import int8 as I

SHAPES = [(1, 64, 32), (7, 96, 48), (33, 128, 80), (5, 256, 17)]  # (M, K, N): odd M and N on purpose


def _backend_args(backend_device):
    name, device = backend_device
    return name, torch.device(device)


def _weights(N, K, device, group_size=None):
    w = torch.randn(N, K, device=device)
    return I.quantize_weight(w, group_size)


def test_quantize_weight_error_bound_and_zero_rows():
    w = torch.randn(24, 128)
    w[3] = 0
    for g in (None, 32):
        q, s = I.quantize_weight(w, g)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert s.shape == ((24,) if g is None else (24, 4))
        deq = I.dequantize_weight(q, s)
        step = I._expand_scale(s, 128)
        assert ((deq - w).abs() <= step / 2 + 1e-7).all()
        assert (deq[3] == 0).all() and (q.abs() <= 127).all()
    with pytest.raises(ValueError, match="group_size"):
        I.quantize_weight(w, 48)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        I.quantize_weight(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_matches_reference(backend_device, dtype):
    name, dev = _backend_args(backend_device)
    x = torch.randn(37, 200, device=dev).to(dtype) * 3
    x[5] = 0
    smooth = torch.rand(200, device=dev) + 0.5
    for sm in (None, smooth):
        q, s = I.quantize_per_token(x, sm, backend=name)
        qr, sr = I.quantize_per_token_reference(x, sm)
        torch.testing.assert_close(s, sr, atol=0, rtol=0)
        # identical fp32 arithmetic; allow a rare 1-step tie difference from fused multiply-adds
        assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 1e-3
        assert (q[5] == 0).all() and s[5] == 0


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_linear_matches_reference(backend_device, mode, group_size, shape):
    name, dev = _backend_args(backend_device)
    M, K, N = shape
    w, sw = _weights(N, K, dev, group_size)
    x = torch.randn(M, K, device=dev)
    bias = torch.randn(N, device=dev)
    y = I.int8_linear(x, w, sw, bias, mode=mode, backend=name)
    ref = I.int8_linear_reference(x, w, sw, bias, "none", mode)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_linear_w8a8_smoothing_and_strided_rows(backend_device, group_size):
    # the smoothing multiply and the row stride feed the quantization (Triton: the GEMM's prologue)
    name, dev = _backend_args(backend_device)
    M, K, N = 19, 96, 40
    w, sw = _weights(N, K, dev, group_size)
    x = torch.randn(M, K + 5, device=dev)[:, :K] * 4
    smooth = torch.rand(K, device=dev) + 0.5
    bias = torch.randn(N, device=dev)
    y = I.int8_linear(x, w, sw, bias, activation="silu", smooth=smooth, backend=name)
    ref = I.int8_linear_reference(x, w, sw, bias, "silu", "w8a8", smooth)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-6)])
@pytest.mark.parametrize("act", [None, *ember.activations.UNARY])
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_int8_linear_dtypes_and_fused_act(backend_device, dtype, tol, act, mode):
    name, dev = _backend_args(backend_device)
    if name == "triton" and dev.type == "cpu" and dtype == torch.bfloat16 and mode == "w8a16":
        pytest.skip("the Triton interpreter's bf16 tl.dot returns garbage; bf16 w8a16 is checked on GPU only")
    w, sw = _weights(40, 64, dev)
    x = torch.randn(2, 3, 64, device=dev).to(dtype)  # 3-D input
    bias = torch.randn(40, device=dev).to(dtype)
    y = I.int8_linear(x, w, sw, bias, activation=act, mode=mode, backend=name)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    ref = I.int8_linear_reference(x, w, sw, bias, act or "none", mode).double()
    # an output-rounding ulp of the largest outputs (GEMM results share one scale across a row); in W8A8
    # a kernel may also round one activation the other way on an exact .5 tie (fma vs mul+add): one
    # quantization step of one product, ~1% of the largest output at K = 64
    atol = (tol if mode == "w8a16" else max(tol, 3e-2)) * ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=tol)


def test_int8_linear_decode_sizes_and_noncontiguous(backend_device):
    name, dev = _backend_args(backend_device)
    # every decode row count the CPU GEMVs tile differently (2 x 8, 4 x 5, 8 x 3 + remainders), 67
    # channels (a remainder for each channel tile width), per-channel and grouped scales
    weights = [_weights(64, 256, dev, 64), _weights(67, 256, dev), _weights(67, 256, dev, 16)]
    for M in (1, 2, 3, 5, 7, 8, 13, 16, 17):
        x = torch.randn(M, 512, device=dev)[:, ::2]  # strided rows and columns
        for w, sw in weights:
            for mode in ("w8a8", "w8a16"):
                y = I.int8_linear(x, w, sw, mode=mode, backend=name)
                ref = I.int8_linear_reference(x, w, sw, None, "none", mode)
                torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_nan_inf_and_zero_rows_stay_in_their_row(backend_device, mode):
    name, dev = _backend_args(backend_device)
    w, sw = _weights(24, 64, dev)
    w[5] = 0
    sw[5] = 0
    bias = torch.randn(24, device=dev)
    x = torch.randn(6, 64, device=dev)
    clean = I.int8_linear(x, w, sw, bias, mode=mode, backend=name)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3] = 0
    y = I.int8_linear(x, w, sw, bias, mode=mode, backend=name)
    keep = [0, 4, 5]
    torch.testing.assert_close(y[keep], clean[keep], atol=0, rtol=0)  # other rows never touched
    assert y[1].isnan().any() and not torch.isfinite(y[2]).all()
    torch.testing.assert_close(y[3], bias, atol=1e-6, rtol=0)  # zero row -> bias
    torch.testing.assert_close(y[[0, 4, 5], 5], bias[5].expand(3), atol=1e-6, rtol=0)  # zero weight row


def test_empty_inputs(backend_device):
    name, dev = _backend_args(backend_device)
    w, sw = _weights(8, 32, dev)
    for mode in ("w8a8", "w8a16"):
        assert I.int8_linear(torch.randn(0, 32, device=dev), w, sw, mode=mode, backend=name).shape == (0, 8)


def test_bad_inputs_raise_clear_errors():
    w, sw = _weights(8, 32, "cpu")
    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        I.int8_linear(x.long(), w, sw)
    with pytest.raises(TypeError, match="w must be a 2-D int8"):
        I.int8_linear(x, w.float(), sw)
    with pytest.raises(TypeError, match="w_scale must be a float32"):
        I.int8_linear(x, w, sw.half())
    with pytest.raises(ValueError, match="w_scale must be"):
        I.int8_linear(x, w, sw[:4])
    with pytest.raises(ValueError, match="in_features=32"):
        I.int8_linear(torch.randn(4, 31), w, sw)
    with pytest.raises(ValueError, match="mode must be"):
        I.int8_linear(x, w, sw, mode="w4a16")
    with pytest.raises(ValueError, match="activation must be"):
        I.int8_linear(x, w, sw, activation="tanh")
    with pytest.raises(ValueError, match="bias must have shape"):
        I.int8_linear(x, w, sw, torch.randn(9))
    with pytest.raises(ValueError, match="same device"):
        I.int8_linear(x, w.to("meta"), sw)
    with pytest.raises(ValueError, match="smooth must be"):
        I.int8_linear(x, w, sw, smooth=torch.ones(31))


def test_backward_raises():
    w, sw = _weights(8, 32, "cpu")
    x = torch.randn(4, 32, requires_grad=True)
    y = I.int8_linear(x, w, sw, backend="reference")
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_opcheck(mode):
    w, sw = _weights(16, 64, "cpu", 32)
    b = "cpu" if ember.available_backends()["cpu"] is None else "reference"
    args = (torch.randn(3, 64), w, sw, torch.randn(16), None, "silu", mode, b)
    torch.library.opcheck(torch.ops.ember.int8_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ember.quantize_per_token.default, (torch.randn(3, 64), None, b),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    w, sw = _weights(16, 64, "cpu")
    f = torch.compile(lambda x: I.int8_linear(x, w, sw, mode="w8a8"), fullgraph=True, backend="eager")
    x = torch.randn(5, 64)
    torch.testing.assert_close(f(x), I.int8_linear(x, w, sw, mode="w8a8"), atol=0, rtol=0)


def _reference_pack(w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """The CPU W8A8 packed layout written out in PyTorch (the description beside ember_C::int8_prepack in
    csrc/cpu/int8.cpp): the (N/16, K/4, 16, 4) int8 tiles, then (G, N) int32 128 * sum of w over each group."""
    N, K = w.shape
    g = K if group_size is None else group_size
    tiles = w.reshape(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).reshape(-1)
    corr = (w.reshape(N, K // g, g).sum(-1, dtype=torch.int32) * 128).t().contiguous().view(torch.int8).reshape(-1)
    return torch.cat([tiles, corr])


@pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")
@pytest.mark.parametrize("N,K,group_size", [(48, 100, None), (16, 4, None), (96, 256, 64), (64, 96, 4), (208, 388, 4),
                                            (32, 384, 128), (1024, 64, 32)])
def test_cpu_prepack_equals_reference_layout_bit_for_bit(N, K, group_size):
    w, sw = _weights(N, K, "cpu", group_size)
    w[:, 0] = -127  # the extremes of the int8 range in every column sum
    w[0] = 127
    wp = I.int8_prepack(w, sw)
    assert wp.dtype == torch.int8 and wp.dim() == 1 and wp.numel() == N * K + 4 * N * (1 if group_size is None else K // group_size)
    assert torch.equal(wp, _reference_pack(w, group_size))
    assert torch.equal(torch.ops.ember_C.int8_prepack(w, sw), wp)
    tiles = wp[: N * K].view(N // 16, K // 4, 16, 4)
    assert torch.equal(tiles[N // 16 - 1, 0, 5], w[N - 16 + 5, 0:4])  # last block, k 0..3, its channel 5
    # a non-contiguous weight packs as its contiguous copy
    assert torch.equal(I.int8_prepack(w.t().contiguous().t(), sw), wp)


def test_int8_prepack_empty_where_no_packed_form(backend_device):
    name, dev = _backend_args(backend_device)
    native_cpu = name == "cpu"
    for N, K, g, packable in [(48, 100, None, True), (96, 256, 64, True), (40, 100, None, False),
                              (48, 102, None, False), (16, 24, 6, False), (16, 20, 10, False), (16, 40, 8, True)]:
        w, sw = _weights(N, K, dev, g)
        for mode in I.MODES:
            wp = I.int8_prepack(w, sw, mode=mode, backend=name)
            assert wp.dtype == torch.int8 and wp.device == w.device
            has = native_cpu and packable and mode == "w8a8"
            assert wp.numel() == (N * K + 4 * N * (1 if g is None else K // g) if has else 0), (N, K, g, mode)
            if name == "triton" and g is not None and g % 16:
                continue  # Triton's grouped GEMM takes groups of 16k only
            # the op takes its own answer either way, an empty one as no packed weight
            x = torch.randn(5, K, device=dev)
            y = I.int8_linear(x, w, sw, mode=mode, backend=name, w_packed=wp)
            torch.testing.assert_close(y, I.int8_linear_reference(x, w, sw, None, "none", mode), atol=1e-4, rtol=1e-4)


def test_int8_prepack_traces_and_checks_inputs():
    w, sw = _weights(48, 64, "cpu", 16)
    b = "cpu" if ember.available_backends()["cpu"] is None else "reference"
    for mode in I.MODES:
        torch.library.opcheck(torch.ops.ember.int8_prepack.default, (w, sw, mode, b),
                              test_utils=("test_schema", "test_faketensor"))
    # the fake kernel's size comes from the C++ rule (ember_C's Meta kernel)
    real = I.int8_prepack(w, sw, backend=b)
    with FakeTensorMode() as mode:
        fake = torch.ops.ember.int8_prepack.default(mode.from_tensor(w), mode.from_tensor(sw), "w8a8", b)
    assert fake.shape == real.shape and fake.dtype == real.dtype
    assert I.int8_prepack(w.to("meta"), sw.to("meta")).numel() == 0  # the meta device has no packed form
    with pytest.raises(TypeError, match="w must be a 2-D int8"):
        I.int8_prepack(w.float(), sw)
    with pytest.raises(ValueError, match="w_scale must be"):
        I.int8_prepack(w, sw[:, :3])
    with pytest.raises(ValueError, match="mode must be"):
        I.int8_prepack(w, sw, mode="w4a16")
    with pytest.raises(ValueError, match="w_packed must be"):
        I.int8_linear(torch.randn(2, 64), w, sw, w_packed=torch.zeros(3, dtype=torch.int32))


# (M, K, N): M across the 6-row register tile and its tails, decode and prefill sizes; N in whole and
# partial 64-channel panels; K not a multiple of 64.
PACKED_SHAPES = [(1, 100, 48), (5, 388, 80), (6, 64, 64), (7, 4, 16), (16, 256, 112), (37, 132, 208), (301, 768, 96)]


@pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")
@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_packed_gemm_matches_reference(shape):
    M, K, N = shape
    w, sw = _weights(N, K, "cpu")
    wp = I.int8_prepack(w, sw)
    bias, smooth = torch.randn(N), torch.rand(K) + 0.5
    for dtype, act, b, sm in ((torch.float32, None, None, None), (torch.float32, "gelu", bias, smooth),
                              (torch.bfloat16, "silu", bias, None), (torch.float16, "relu", bias, None),
                              (torch.float64, None, bias, smooth)):
        # a non-contiguous x (every other column of a wider tensor is not allowed: rows strided instead)
        x = torch.randn(M, K + 3)[:, :K].to(dtype)
        y = I.int8_linear(x, w, sw, b, activation=act, smooth=sm, backend="cpu", w_packed=wp)
        ref = I.int8_linear_reference(x, w, sw, b, act=act or "none", smooth=sm)
        assert y.dtype == dtype and y.shape == (M, N)
        tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(y.double(), ref.double(), atol=tol * ref.abs().max().item(), rtol=tol)


# (M, K, N, group_size): groups of 4..K inputs, M across the register tile's tails, N in partial panels.
GROUPED_SHAPES = [(1, 128, 48, 32), (5, 256, 80, 64), (7, 384, 16, 128), (33, 256, 208, 256), (12, 96, 64, 4)]


@pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")
@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_packed_grouped_gemm_matches_reference(shape):
    M, K, N, g = shape
    w, sw = _weights(N, K, "cpu", g)
    wp = I.int8_prepack(w, sw)
    assert wp.numel() == N * K + 4 * N * (K // g)
    # the per-group column sums, (G, N) after the tiles
    want = (w.reshape(N, K // g, g).sum(-1, dtype=torch.int32) * 128).t()
    assert torch.equal(wp[N * K :].view(torch.int32).view(K // g, N), want)
    w[3, :g] = 0  # one all-zero group
    wp = I.int8_prepack(w, sw)
    bias, smooth = torch.randn(N), torch.rand(K) + 0.5
    for dtype, act, b, sm in ((torch.float32, None, None, None), (torch.float32, "silu", bias, smooth),
                              (torch.bfloat16, "gelu", bias, None)):
        x = torch.randn(M, K + 5)[:, :K].to(dtype)
        ref = I.int8_linear_reference(x, w, sw, b, act=act or "none", smooth=sm)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        for packed in (wp, None):  # the VNNI kernel, and ATen's int8 GEMM per group without a pack
            y = I.int8_linear(x, w, sw, b, activation=act, smooth=sm, backend="cpu", w_packed=packed)
            assert y.dtype == dtype and y.shape == (M, N)
            torch.testing.assert_close(y.double(), ref.double(), atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")
def test_grouped_int8linear_packs_and_keeps_nan_rows_apart():
    lin = torch.nn.Linear(256, 96)
    q = ember.nn.Int8Linear.from_linear(lin, "w8a8", group_size=64)
    x = torch.randn(9, 256)
    x[2, 10] = float("nan")
    y = q(x)
    assert q.weight_packed.numel() == q.cpu_packed_nbytes() == 96 * 256 + 4 * 96 * 4
    assert y[2].isnan().all() and not y[[0, 1, *range(3, 9)]].isnan().any()
    keep = [0, 1, *range(3, 9)]
    torch.testing.assert_close(y[keep], I.int8_linear_reference(x[keep], q.weight, q.weight_scale, q.bias),
                               atol=1e-4, rtol=1e-5)
    # a group that is not a multiple of 4 runs unpacked
    g6 = ember.nn.Int8Linear.from_linear(torch.nn.Linear(252, 96), "w8a8", group_size=6)
    assert g6.weight_packed.numel() == g6.cpu_packed_nbytes() == 0
    x6 = torch.randn(9, 252)
    torch.testing.assert_close(g6(x6), I.int8_linear_reference(x6, g6.weight, g6.weight_scale, g6.bias), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")
def test_cpu_packed_gemm_nan_and_zero_rows_stay_in_their_row():
    w, sw = _weights(64, 96, "cpu")
    w[5] = 0
    sw[5] = 0
    bias = torch.randn(64)
    x = torch.randn(13, 96)
    x[1, 3], x[2, 7], x[3] = float("nan"), float("inf"), 0.0
    y = I.int8_linear(x, w, sw, bias, backend="cpu", w_packed=I.int8_prepack(w, sw))
    assert y[1].isnan().all() and y[2].isnan().all()
    keep = [0] + list(range(3, 13))
    torch.testing.assert_close(y[keep], I.int8_linear_reference(x[keep], w, sw, bias), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y[3], bias)  # zero row -> bias
    torch.testing.assert_close(y[keep, 5], bias[5].expand(len(keep)))  # zero weight row -> bias


@pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")
def test_int8linear_cpu_eager_path_matches_op():
    lin = torch.nn.Linear(100, 48)
    q = ember.nn.Int8Linear.from_linear(lin, "w8a8", activation="gelu")
    x = torch.randn(2, 3, 100)
    y = q(x)
    assert q.weight_packed.numel() == 48 * 100 + 4 * 48 and y.shape == (2, 3, 48)
    ref = I.int8_linear_reference(x, q.weight, q.weight_scale, q.bias, act="gelu")
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    q.weight[0, 0] += 1  # an in-place weight edit repacks
    torch.testing.assert_close(q(x), I.int8_linear_reference(x, q.weight, q.weight_scale, q.bias, act="gelu"),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(2, 99))  # bad input still gets int8_linear's error
    with ember.backend("reference"):  # an ambient backend choice is still honoured
        ref = I.int8_linear(x, q.weight, q.weight_scale, q.bias, activation="gelu")
        torch.testing.assert_close(q(x), ref, atol=0, rtol=0)


def test_cpu_w8a8_inside_and_outside_inference_mode():
    # the CPU path caches an int32 workspace per thread; it must work in both modes, in either order
    w, sw = _weights(64, 128, "cpu")
    x = torch.randn(40, 128)
    ref = I.int8_linear_reference(x, w, sw)
    with torch.inference_mode():
        a = I.int8_linear(x, w, sw)
    b = I.int8_linear(x, w, sw)
    with torch.inference_mode():
        c = I.int8_linear(x, w, sw)
    for y in (a, b, c):
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("group_size", [16, 32, 48, 128])
def test_int8_linear_group_sizes(backend_device, mode, group_size):
    # Triton: groups of 16 (and 48 = 3 x 16) run as 32-wide int8 dots split per 16-column half, since
    # int8 tl.dot needs K >= 32 on NVIDIA; 32 and 128 as one dot per K block
    name, dev = _backend_args(backend_device)
    M, K, N = 17, 384, 40
    w, sw = _weights(N, K, dev, group_size)
    x = torch.randn(M, K, device=dev) * 2
    bias = torch.randn(N, device=dev)
    y = I.int8_linear(x, w, sw, bias, activation="gelu", mode=mode, backend=name)
    ref = I.int8_linear_reference(x, w, sw, bias, "gelu", mode)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_triton_int8_block_k_and_unsupported_groups():
    pytest.importorskip("triton")
    from ember.kernels import int8_gemm as tk

    assert tk.block_k("w8a8", 16, True) == (32, 16)  # never an int8 dot with K = 16
    assert tk.block_k("w8a8", 48, True) == (32, 16)
    assert tk.block_k("w8a8", 32, True) == (32, 32)
    assert tk.block_k("w8a8", 256, True) == (64, 64)
    assert tk.block_k("w8a16", 16, True) == (16, 16)
    assert tk.block_k("w8a8", 384, False) == (64, 64)
    with pytest.raises(ValueError, match="group_size=8"):
        tk.block_k("w8a8", 8, True)
    with pytest.raises(ValueError, match="group_size=24"):
        tk.block_k("w8a16", 24, True)


def test_quantize_per_token_scale_is_a_true_division(backend_device):
    # amax / 127 correctly rounded (Triton: div_rn; torch on CUDA would multiply by a reciprocal for a
    # Python-scalar divisor, so the reference divides by a tensor): the scales agree exactly on every
    # backend, and differ from the reciprocal product on some rows
    name, dev = _backend_args(backend_device)
    # 512 rows through the Triton interpreter (one program per row: 4096 took 30 s), 4096 elsewhere
    rows = 512 if name == "triton" and dev.type == "cpu" else 4096
    x = torch.rand(rows, 64, device=dev) * 7
    _, s = I.quantize_per_token(x, None, backend=name)
    amax = x.abs().amax(1)
    exact = (amax.double() / 127).float()
    torch.testing.assert_close(s, exact, atol=0, rtol=0)
    assert (amax * (1 / torch.tensor(127.0, device=dev)) != exact).any()


def test_w8a8_packed_row_chunks_cover_every_row():
    """The CPU packed GEMM splits rows into chunks whose activations fit a cache budget (128 KiB: 32 rows
    at K = 4096); row counts just past one chunk, and many chunks with a remainder, each row exactly once."""
    w, sw = _weights(48, 4096, torch.device("cpu"))
    packed = I.int8_prepack(w, sw)
    for M in (33, 41, 100, 257):
        x = torch.randn(M, 4096)
        y = I.int8_linear(x, w, sw, mode="w8a8", w_packed=packed)
        torch.testing.assert_close(y, I.int8_linear_reference(x, w, sw, None, "none", "w8a8"), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_w8a16_row_gemm_sizes(group_size):
    """The CPU W8A16 GEMM for 12-160 rows (AVX-512): rows in 16-row blocks padded with zeros (a tail of 1-4
    rows past whole blocks on the GEMV), channels in 24-channel panels (12-channel halves), k in 128-k
    panel chunks. Row counts at each end of its range and
    around block boundaries, channel counts around the panel widths, K across a chunk boundary; strided x,
    bias and a fused activation; every dtype x takes."""
    g = torch.Generator().manual_seed(11)
    for M, K, N in ((11, 64, 24), (12, 64, 25), (16, 128, 7), (17, 192, 36), (32, 320, 49), (47, 64, 12),
                    (100, 384, 72), (160, 128, 30), (161, 64, 24)):
        w, sw = I.quantize_weight(torch.randn(N, K, generator=g), group_size)
        bias = torch.randn(N, generator=g)
        x = torch.randn(M, 2 * K, generator=g)[:, :K]  # rows 2K apart
        y = I.int8_linear(x, w, sw, bias, activation="gelu", mode="w8a16", backend="cpu")
        ref = I.int8_linear_reference(x, w, sw, bias, "gelu", "w8a16")
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4, msg=f"M={M} K={K} N={N}")
        for dtype in (torch.bfloat16, torch.float16):
            y16 = I.int8_linear(x.to(dtype), w, sw, bias, mode="w8a16", backend="cpu")
            ref16 = I.int8_linear_reference(x.to(dtype).float(), w, sw, bias, "none", "w8a16")
            assert y16.dtype == dtype
            torch.testing.assert_close(y16.float(), ref16, atol=1e-2 * ref16.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("M", [40, 36])
@pytest.mark.parametrize("K", [1, 15, 129])
def test_w8a16_row_gemm_k_tails_and_rows_apart(K, M):
    """K not a multiple of 16 (the panel's masked tail; per-channel scales take any K), and NaN / Inf /
    zero rows staying in their row, inside a zero-padded 16-row block (M = 40) or among the last rows
    the GEMV takes (M = 36: 32 + 4)."""
    g = torch.Generator().manual_seed(5)
    N = 26
    w, sw = I.quantize_weight(torch.randn(N, K, generator=g))
    bias = torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g)
    clean = I.int8_linear(x, w, sw, bias, mode="w8a16", backend="cpu")
    torch.testing.assert_close(clean, I.int8_linear_reference(x, w, sw, bias, "none", "w8a16"), atol=1e-5, rtol=1e-5)
    x[3, 0], x[17, K - 1], x[M - 3] = float("nan"), float("inf"), 0
    y = I.int8_linear(x, w, sw, bias, mode="w8a16", backend="cpu")
    keep = [i for i in range(M) if i not in (3, 17, M - 3)]
    assert torch.equal(y[keep], clean[keep])
    assert y[3].isnan().all() and not torch.isfinite(y[17]).any()
    torch.testing.assert_close(y[M - 3], bias, atol=1e-6, rtol=0)


@pytest.mark.parametrize("M", [70, 68])
def test_w8a16_row_gemm_does_not_depend_on_the_thread_count(M):
    g = torch.Generator().manual_seed(9)
    w, sw = I.quantize_weight(torch.randn(200, 320, generator=g), 64)
    x, bias = torch.randn(M, 320, generator=g), torch.randn(200, generator=g)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(I.int8_linear(x, w, sw, bias, mode="w8a16", backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
