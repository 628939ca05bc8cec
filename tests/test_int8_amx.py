"""The CPU int8 kernels on AMX tiles (csrc/cpu/isa_amx.cpp, issue #12): run-time ISA choice and its
report, W8A8 exact against an int32-exact reference, W8A16 against the float64 reference by SQNR,
tails and fallbacks, grouped scales, epilogues, thread-count independence, and AMX vs forced-off.

The kernel tests skip on a CPU (or OS) without AMX; the report tests run everywhere."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import ember
from ember import _backend, metrics
from ember.info import native_16bit_gemm
from ember.ops import int8 as I

EXT = _backend.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="needs ember._C")


def _report() -> dict:
    return dict(line.split(": ", 1) for line in EXT.cpu_isa_report().splitlines())


def _amx_on() -> bool:
    return EXT is not None and _report()["int8"].startswith("amx")


needs_amx = pytest.mark.skipif(not _amx_on(), reason="int8 kernels are not on AMX here (no AMX, or the OS refused it)")


def _run_isa(code: str, isa: str | None, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EMBER_CPU_ISA"}
    if isa is not None:
        env["EMBER_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return out


# ---------------------------------------------------------------------------------------------
# The ISA choice and its report.
# ---------------------------------------------------------------------------------------------
@needs_ext
def test_isa_report_names_the_int8_kernels_and_why_amx_is_off():
    r = _report()
    assert r["table"] == EXT.cpu_isa()
    with open("/proc/cpuinfo") as f:
        cpu_amx = " amx_int8" in f.read()
    if r["int8"].startswith("amx"):
        assert cpu_amx and "amx off" not in r and EXT.cpu_isa() == "avx512+amx"
    else:
        assert r["amx off"]  # always a reason when AMX is not used
        if not cpu_amx:
            assert "no AMX" in r["amx off"] or "AVX-512" in r["amx off"] or "portable" in r["amx off"]
    info = ember.info.describe() if hasattr(ember, "info") else __import__("ember.info").info.describe()
    assert "CPU int8" in info


@needs_ext
def test_16bit_gemm_report_agrees_with_the_kernel_flags():
    # CPUID decoding (dispatch.cpp native_16bit_gemm) against what Linux reads from the same CPUID bits.
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    fp16 = "avx512_fp16" in flags or "amx_fp16" in flags
    line = _report()["16-bit GEMMs"]
    assert line.startswith(f"bf16 {'native' if bf16 else 'not native'}, fp16 {'native' if fp16 else 'not native'}")
    assert ("computes those GEMMs in fp32" in line) == (not (bf16 and fp16))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_w8a16_prefill_fallback_without_native_16bit_dot(dtype):
    # Prefill rows off AMX: AVX-512's row GEMM up to 160 rows, the dequantised-copy fallback beyond (and
    # on CPUs without AVX-512). Without a native dot product for x's dtype both run in fp32 and round once
    # at the end: bit for bit the fp32 result, rounded.
    native = native_16bit_gemm(dtype)
    env_isa = os.environ.get("EMBER_CPU_ISA")
    if _amx_on() and env_isa is None:
        pytest.skip("AMX takes these rows; the fallback is not reached")
    g = torch.Generator().manual_seed(3)
    for M in (40, 200):
        x = torch.randn(M, 96, generator=g).to(dtype)
        w = torch.randn(72, 96, generator=g)
        b = torch.randn(72, generator=g).to(dtype)
        qw, sw = I.quantize_weight(w)
        out = I.int8_linear(x, qw, sw, b, mode="w8a16", activation="gelu", backend="cpu")
        want32 = I.int8_linear(x.float(), qw, sw, b.float(), mode="w8a16", activation="gelu", backend="cpu")
        assert out.dtype == dtype and out.shape == (M, 72)
        if not native:
            assert torch.equal(out, want32.to(dtype))
        ref = torch.nn.functional.gelu(x.double() @ I.dequantize_weight(qw, sw).double().t() + b.double())
        assert metrics.sqnr_db(ref, out.double()) > (38 if dtype == torch.bfloat16 else 50)


@needs_ext
@pytest.mark.parametrize("isa", ["avx512", "portable"])
def test_env_override_turns_amx_off(isa):
    code = "from ember._backend import extension as e; print(e().cpu_isa()); print(e().cpu_isa_report())"
    out = _run_isa(code, isa).stdout.splitlines()
    report = dict(line.split(": ", 1) for line in out[1:])
    assert not report["int8"].startswith("amx") and "amx off" in report
    if isa == "avx512" and out[0] == "avx512":  # an AVX-512 CPU
        assert report["amx off"] == "EMBER_CPU_ISA=avx512 forces AMX off"
        assert "vnni" in report["int8"] or "no VNNI" in report["int8"]
    if isa == "portable":
        assert out[0] == "portable"


@needs_ext
def test_amx_peak_is_measured_when_amx_runs():
    rate = EXT.amx_peak_macs()
    if not _amx_on():
        assert rate == 0.0
        return
    # TMUL: 1024 int8 MACs a cycle a core at most (one 16x16x64 tile product per 16 cycles), a few GHz.
    assert 1e10 < rate < torch.get_num_threads() * 1024 * 6e9
    rate_bf16 = EXT.amx_peak_macs(True)
    assert 0.3 * rate < 2 * rate_bf16 < 3 * rate  # bf16 tiles: half the MACs of int8 tiles


# ---------------------------------------------------------------------------------------------
# W8A8 on AMX: exact against the int32 product.
# ---------------------------------------------------------------------------------------------
def _exact_w8a8(x, w, sw, bias, act="none", smooth=None):
    """fp32 y = acc * sw * sx + bias from the exact int32 product of ember's own quantized rows, in the
    kernel's order of fp32 operations (per channel: every rounding the same, so results are equal)."""
    q, sx = I.quantize_per_token(x, smooth, backend="cpu")
    acc = (q.double() @ w.double().T).to(torch.int64)
    assert acc.abs().max() < 2**31
    y = (acc.to(torch.int32).float() * sw) * sx[:, None]
    if bias is not None:
        y = y + bias.float()
    return I._finish(y, None, act, torch.float32)


# (M, K, N): M across 32-row blocks and their tails (1 and 7 are decode rows: the VNNI kernel), N in
# whole and half 32-column panels, K whole 64-k steps (100 and 388: the VNNI kernel takes the call).
W8A8_SHAPES = [(1, 128, 48), (7, 256, 16), (17, 64, 16), (33, 128, 80), (64, 768, 96), (100, 388, 48),
               (1023, 256, 208), (301, 1024, 32)]


@needs_amx
@pytest.mark.parametrize("shape", W8A8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_amx_w8a8_is_exact(shape):
    M, K, N = shape
    torch.manual_seed(M + K + N)
    w, sw = I.quantize_weight(torch.randn(N, K))
    w[0, :] = 127  # extreme sums
    w[-1, :] = -127
    wp = I.int8_prepack(w, sw)
    assert wp.numel() == N * K + 4 * N
    x = torch.randn(M, K) * 3
    x[M // 2, :] = 0
    bias = torch.randn(N)
    for b in (None, bias):
        y = I.int8_linear(x, w, sw, b, backend="cpu", w_packed=wp)
        assert torch.equal(y, _exact_w8a8(x, w, sw, b)), (shape, b is None)
    # epilogues and output dtypes against the float64 reference
    for dtype, act, tol in ((torch.float32, "gelu", 1e-5), (torch.bfloat16, "silu", 1e-2), (torch.float16, "relu", 2e-3),
                            (torch.float64, None, 1e-5)):
        xd = x.to(dtype)
        y = I.int8_linear(xd, w, sw, bias, activation=act, backend="cpu", w_packed=wp)
        ref = I.int8_linear_reference(xd, w, sw, bias, act=act or "none")
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref.double(), atol=tol * ref.abs().max().item(), rtol=tol)


@needs_amx
@pytest.mark.parametrize("shape", [(33, 256, 48, 64), (64, 768, 96, 128), (1023, 512, 80, 128), (40, 256, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_amx_w8a8_grouped(shape):
    # group 32 is not a whole 64-k tile step: the VNNI kernel takes it, on the same pack
    M, K, N, g = shape
    torch.manual_seed(1)
    w, sw = I.quantize_weight(torch.randn(N, K), g)
    w[3, :g] = 0
    wp = I.int8_prepack(w, sw)
    x = torch.randn(M, K + 3)[:, :K]
    bias, smooth = torch.randn(N), torch.rand(K) + 0.5
    for dtype, act, b, sm, tol in ((torch.float32, None, None, None, 1e-5), (torch.float32, "silu", bias, smooth, 1e-5),
                                   (torch.bfloat16, "gelu", bias, None, 1e-2)):
        xd = x.to(dtype)
        y = I.int8_linear(xd, w, sw, b, activation=act, smooth=sm, backend="cpu", w_packed=wp)
        ref = I.int8_linear_reference(xd, w, sw, b, act=act or "none", smooth=sm)
        torch.testing.assert_close(y.double(), ref.double(), atol=tol * ref.abs().max().item(), rtol=tol)


@needs_amx
def test_amx_w8a8_nan_rows_stay_in_their_row():
    M, K, N = 70, 256, 64
    w, sw = I.quantize_weight(torch.randn(N, K))
    wp = I.int8_prepack(w, sw)
    x = torch.randn(M, K)
    x[5, 7] = float("nan")
    x[40, 0] = float("inf")
    y = I.int8_linear(x, w, sw, backend="cpu", w_packed=wp)
    bad = [5, 40]
    assert y[bad].isnan().all()
    keep = [i for i in range(M) if i not in bad]
    assert not y[keep].isnan().any()
    assert torch.equal(y[keep], _exact_w8a8(x[keep], w, sw, None))


# ---------------------------------------------------------------------------------------------
# W8A16 on AMX: bf16 tiles, judged by SQNR and cosine against the float64 reference.
# ---------------------------------------------------------------------------------------------
@needs_amx
@pytest.mark.parametrize("shape", [(17, 64, 16), (33, 128, 80), (1023, 256, 48), (64, 768, 208), (40, 100, 48),
                                   (20, 96, 40), (40, 2304, 48), (2100, 64, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("group_size", [None, 32, 64, 768])
def test_amx_w8a16_matches_reference(shape, group_size):
    # K 100 / N 40: no AMX tile form (K % 32, N % 16); the dequantizing fallback runs. K 2304: two K
    # chunks of the tile kernel (2048 + 256), a group of 768 split by the chunk boundary. M 2100: two runs
    # of x blocks (2048 rows + the rest)
    M, K, N = shape
    if group_size is not None and K % group_size:
        pytest.skip("group does not divide K")
    torch.manual_seed(2)
    w, sw = I.quantize_weight(torch.randn(N, K), group_size)
    bias = torch.randn(N)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(M, K + 2)[:, :K].to(dtype)
        for act, b in ((None, None), ("gelu", bias)):
            y = I.int8_linear(x, w, sw, b, activation=act, mode="w8a16", backend="cpu")
            ref = I.int8_linear_reference(x.double(), w, sw, b if b is None else b.double(), act=act or "none",
                                          mode="w8a16")
            assert y.dtype == dtype and y.shape == (M, N)
            # exact int8 weights; x bf16 as given, or split into two bf16 parts (~16 bits) when wider
            assert metrics.sqnr_db(ref, y.double()) > (40 if dtype == torch.bfloat16 else 60), (dtype, act)
            assert metrics.min_cosine(ref, y.double()) > 0.9999
            if dtype == torch.float32:  # the accuracy W8A16 has on every other CPU path
                torch.testing.assert_close(y.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


@needs_amx
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("K,N,group_size", [(256, 48, None), (512, 1040, 128), (96, 16, 32), (320, 80, 64)],
                         ids=lambda v: str(v))
def test_amx_w8a16_decode_rows(M, K, N, group_size):
    # M <= 16: the transposed tile kernel (weight rows as A tiles, x^T as B) from kNarrowMinRows rows up,
    # the AVX-512 GEMV below it; N 1040 runs a partial 32-row block, N 16 a single 16-row one
    torch.manual_seed(M)
    w, sw = I.quantize_weight(torch.randn(N, K), group_size)
    bias = torch.randn(N)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(M, K + 3)[:, 1:K + 1].to(dtype)  # strided rows with a storage offset
        y = I.int8_linear(x, w, sw, bias, activation="silu", mode="w8a16", backend="cpu")
        ref = I.int8_linear_reference(x.double(), w, sw, bias.double(), act="silu", mode="w8a16")
        assert y.dtype == dtype and y.shape == (M, N)
        assert metrics.sqnr_db(ref, y.double()) > (40 if dtype == torch.bfloat16 else 60), dtype
        if dtype == torch.float32:
            torch.testing.assert_close(y.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


@pytest.fixture
def mkldnn_matmul_precision():
    """Sets torch.backends.mkldnn.matmul.fp32_precision for one test and restores it."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    yield lambda value: setattr(torch.backends.mkldnn.matmul, "fp32_precision", value)
    torch.backends.mkldnn.matmul.fp32_precision = before


@needs_amx
@pytest.mark.parametrize("M", [4, 8, 16, 40])
def test_amx_w8a16_fp32_x_follows_torchs_matmul_precision(M, mkldnn_matmul_precision):
    # "bf16" lets torch's fp32 matmuls run in bf16 on this CPU, and W8A16's fp32 x then takes one bf16
    # part: exactly the bf16-x result, before its final rounding. "tf32": two parts (~16 bits) from 5
    # rows up (below, the fp32 GEMV); the default keeps three (fp32's precision, the 1e-4 of the others).
    torch.manual_seed(M)
    K, N = 512, 96
    w, sw = I.quantize_weight(torch.randn(N, K), 128)
    x, bias = torch.randn(M, K), torch.randn(N)
    ref = I.int8_linear_reference(x.double(), w, sw, bias.double(), mode="w8a16")
    y_bf16 = I.int8_linear(x.bfloat16(), w, sw, bias, mode="w8a16", backend="cpu")
    sqnr = {}
    for precision in ("bf16", "tf32", "ieee"):
        mkldnn_matmul_precision(precision)
        y = I.int8_linear(x, w, sw, bias, mode="w8a16", backend="cpu")
        assert y.dtype == torch.float32
        sqnr[precision] = metrics.sqnr_db(ref, y.double())
        if precision == "bf16":
            assert torch.equal(y.bfloat16(), y_bf16)
    assert sqnr["bf16"] > 35 and sqnr["tf32"] > 80 and sqnr["ieee"] > 120, sqnr
    if M >= 5:
        assert sqnr["ieee"] > sqnr["tf32"] + 10, sqnr


@needs_amx
def test_amx_w8a16_bf16_input_rounds_only_the_output():
    # bf16 x is used as it is and int8 weights are exact in bf16: only fp32 accumulation order and the
    # final rounding to bf16 separate the kernel from the float64 product of the same bf16 values.
    M, K, N = 48, 512, 64
    w, sw = I.quantize_weight(torch.randn(N, K))
    x = torch.randn(M, K).bfloat16()
    y = I.int8_linear(x, w, sw, mode="w8a16", backend="cpu")
    ref = (x.double() @ w.double().T) * sw.double()
    torch.testing.assert_close(y.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=8e-3)


# ---------------------------------------------------------------------------------------------
# Determinism: 1 vs 2 threads, and AMX vs the forced-off (VNNI) path of the same build.
# ---------------------------------------------------------------------------------------------
@needs_amx
def test_amx_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(3)
    M, K, N = 129, 512, 112
    w, sw = I.quantize_weight(torch.randn(N, K))
    wg, swg = I.quantize_weight(torch.randn(N, K), 128)
    wp, wpg = I.int8_prepack(w, sw), I.int8_prepack(wg, swg)
    x, bias = torch.randn(M, K), torch.randn(N)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append([I.int8_linear(x, w, sw, bias, activation="gelu", backend="cpu", w_packed=wp),
                         I.int8_linear(x, wg, swg, bias, backend="cpu", w_packed=wpg),
                         I.int8_linear(x, w, sw, bias, mode="w8a16", backend="cpu"),
                         I.int8_linear(x.bfloat16(), wg, swg, bias, mode="w8a16", backend="cpu")])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


_COMPARE = """
import sys, torch, ember
from ember.ops import int8 as I
torch.manual_seed(0)
outs = []
for M, K, N, g in ((64, 768, 96, None), (1023, 256, 208, None), (33, 512, 80, 128), (7, 256, 48, None)):
    w, sw = I.quantize_weight(torch.randn(N, K), g)
    wp = I.int8_prepack(w, sw)
    x, bias = torch.randn(M, K), torch.randn(N)
    outs.append(I.int8_linear(x, w, sw, bias, backend="cpu", w_packed=wp))
    outs.append(I.int8_linear(x.bfloat16(), w, sw, bias, activation="silu", backend="cpu", w_packed=wp))
    outs.append(I.int8_linear(x, w, sw, bias, mode="w8a16", backend="cpu"))
torch.save(outs, sys.argv[1])
print(ember._backend.extension().cpu_isa())
"""


@needs_amx
def test_amx_and_forced_off_agree():
    with tempfile.TemporaryDirectory() as tmp:
        isas = {}
        for isa in (None, "avx512"):
            isas[isa] = _run_isa(_COMPARE, isa, f"{tmp}/{isa}").stdout.split()[-1]
        assert isas == {None: "avx512+amx", "avx512": "avx512"}
        on, off = torch.load(f"{tmp}/None"), torch.load(f"{tmp}/avx512")
    for i, (a, b) in enumerate(zip(on, off)):
        if i % 3 == 2:  # W8A16: split-bf16 tiles on AMX, fp32 (dequantized weight) GEMM without
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
        else:  # W8A8: the same int32 products and fp32 epilogue arithmetic on both paths
            assert torch.equal(a, b), i
