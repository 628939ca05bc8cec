"""Backend choice: per call, context, process default, environment, auto; clear errors."""
import os
import subprocess
import sys

import pytest
import torch

import ember
from ember import _backend


def test_auto_prefers_cpp_kernels_on_cpu():
    assert _backend.resolve("auto", torch.device("cpu"), "t") == ("cpu" if _backend.extension() else "reference")


def test_precedence_call_over_context_over_global_over_env(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv("EMBER_BACKEND", "cpu")
    assert _backend.resolve(None, dev, "t") == "cpu"
    ember.set_backend("reference")
    try:
        assert _backend.resolve(None, dev, "t") == "reference"
        with ember.backend("cpu"):
            assert _backend.resolve(None, dev, "t") == "cpu"
            with ember.backend("reference"):
                assert ember.get_backend() == "reference"
            assert _backend.resolve("reference", dev, "t") == "reference"
        assert ember.get_backend() == "reference"
    finally:
        ember.set_backend(None)
    assert ember.get_backend() == "cpu"


def test_context_selects_kernel():
    x = torch.randn(100)
    with ember.backend("reference"):
        ref = ember.ops.gelu(x)
    with ember.backend("cpu"):
        ours = ember.ops.gelu(x)
    torch.testing.assert_close(ref, ours)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ember.ops.gelu(torch.randn(3), backend="gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        ember.set_backend("fast")


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match=r"ember.ops.silu: backend 'cuda' is unavailable: the 'cuda' backend runs on CUDA tensors"):
        ember.ops.silu(torch.randn(3), backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.triton_version() is None:
        pytest.skip("triton not installed")
    assert "TRITON_INTERPRET=1" in _backend.why_unavailable("triton", torch.device("cpu"))


def test_available_backends_lists_every_backend():
    status = ember.available_backends("cpu")
    assert set(status) == set(_backend.BACKENDS)
    assert status["reference"] is None


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=300)


def test_works_without_extension():
    """A pure-Python install (no ember._C): reference path works, auto falls back, 'cpu' explains."""
    code = (
        "import sys; sys.modules['ember._C'] = None\n"
        "import torch, ember\n"
        "x = torch.randn(10)\n"
        "torch.testing.assert_close(ember.ops.gelu(x), torch.nn.functional.gelu(x))\n"
        "try:\n    ember.ops.gelu(x, backend='cpu')\nexcept RuntimeError as e:\n    print('ERR', e)\n"
        "from ember.info import describe; print(describe())\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "ERR ember.ops.gelu: backend 'cpu' is unavailable: ember._C is not built" in out.stdout
    assert "ember._C     missing" in out.stdout


def test_env_variable_and_info_cli():
    out = _run("import ember, torch; print(ember.get_backend())", EMBER_BACKEND="reference")
    assert out.stdout.strip() == "reference"
    info = subprocess.run([sys.executable, "-m", "ember", "info"], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "torch" in info.stdout and "live:" in info.stdout and "int8_linear" in info.stdout


def test_portable_cpu_kernels_match_avx512():
    """The portable C++ build (what CPUs without AVX-512 run) is checked here by forcing it."""
    if _backend.extension() is None:
        pytest.skip("ember._C not built")
    code = (
        "import torch, ember, sys\n"
        "from ember._backend import extension\n"
        "print(extension().cpu_isa())\n"
        "torch.manual_seed(0)\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):\n"
        "    x = (3 * torch.randn(4099, dtype=torch.float64)).to(dtype).requires_grad_()\n"
        "    u = torch.randn(4099, dtype=dtype)\n"
        "    outs = [ember.ops.gelu(x), ember.ops.gelu(x, 'tanh'), ember.ops.silu(x), ember.ops.relu(x),\n"
        "            ember.ops.swiglu(x, u), ember.ops.geglu(x, u)]\n"
        "    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), x)\n"
        "    torch.save([o.detach() for o in outs] + list(grads), sys.argv[1] + str(dtype))\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for isa in ("portable", "native"):
            out = subprocess.run([sys.executable, "-c", code, f"{tmp}/{isa}"], capture_output=True, text=True,
                                 env={**os.environ, "EMBER_CPU_ISA": isa}, timeout=300)
            assert out.returncode == 0, out.stderr
            results[isa] = out.stdout.split()[0]
        assert results["portable"] == "portable"
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            a, b = torch.load(f"{tmp}/portable{dtype}"), torch.load(f"{tmp}/native{dtype}")
            tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
            for t1, t2 in zip(a, b):
                torch.testing.assert_close(t1, t2, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# The registry: supports rules, "auto" skipping a backend that cannot take a call, and explicit
# requests that cannot serve raising instead of falling back.
# ---------------------------------------------------------------------------------------------
def test_every_rule_has_a_summary_and_names_a_known_backend():
    rules = _backend.rules()
    assert {(r.backend, r.op) for r in rules} >= {("triton", "linear"), ("cuda", "int8_linear"), ("cpu", "optim_step")}
    for r in rules:
        assert r.backend in _backend.BACKENDS and r.summary


def test_auto_takes_the_fastest_backend_whose_rule_takes_the_call():
    cpu = torch.device("cpu")
    want = "cpu" if _backend.extension() else "reference"
    assert _backend.choose("auto", cpu, "optim_step", dtype=torch.float64, dense=True) == want
    assert _backend.choose("auto", cpu, "optim_step", dtype=torch.float32, dense=False) == "reference"
    assert _backend.choose("auto", cpu, "adamw8bit_step", dtype=torch.float64, dense=True) == "reference"


def test_cuda_int8_rules_send_what_the_cuda_kernels_lack_elsewhere():
    why = _backend.why_not
    assert why("cuda", "int8_linear", mode="w8a8", group=None, in_features=64) is None
    assert "W8A8 only" in why("cuda", "int8_linear", mode="w8a16", group=None, in_features=64)
    assert "not groups" in why("cuda", "int8_linear", mode="w8a8", group=32, in_features=64)
    assert "% 16" in why("cuda", "int8_linear", mode="w8a8", group=None, in_features=40)
    assert why("triton", "int8_linear", mode="w8a8", group=32, in_features=64) is None
    assert "multiple of 16" in why("triton", "int8_linear", mode="w8a8", group=24, in_features=48)


def test_explicit_triton_request_it_cannot_serve_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(_backend.BackendError, match=r"ember.ops.linear: backend 'triton' cannot run this call: "
                                                    r"the Triton GEMM takes .* got torch.float64"):
        ember.ops.linear(x, w, backend="triton")
    torch.testing.assert_close(ember.ops.linear(x, w), x @ w.t())  # auto: served by another backend


def test_explicit_optimizer_backend_never_falls_back(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    p.grad = torch.randn(8, dtype=torch.float64)
    opt = ember.optim.AdamW([p], lr=0.1, backend="triton")
    with pytest.raises(_backend.BackendError, match=r"ember.optim.AdamW: backend 'triton' cannot run this call: .*float64"):
        opt.step()
    ember.optim.AdamW([p], lr=0.1).step()  # auto takes the group (C++ or reference)


def test_explicit_8bit_backend_refuses_a_strided_parameter():
    if _backend.extension() is None:
        pytest.skip("ember._C not built")
    p = torch.nn.Parameter(torch.randn(96, 64).t())  # 6144 elements, quantized state, not contiguous
    p.grad = torch.randn(96, 64).t()
    before = p.detach().clone()
    with pytest.raises(_backend.BackendError, match="AdamW8bit: backend 'cpu' cannot run this call: .*dense"):
        ember.optim.AdamW8bit([p], lr=0.1, backend="cpu").step()
    ember.optim.AdamW8bit([p], lr=0.1).step()  # auto: the reference takes it
    assert not torch.equal(p.detach(), before)


def test_info_prints_the_registry():
    from ember import info

    text = info.describe()
    assert "int8_linear" in text and "optim_step" in text and "live:" in text


def test_a_refused_step_changes_nothing():
    """Backends are chosen for every group before any update: a step an explicit backend refuses for one
    parameter leaves the others (already planned, in an earlier bucket) untouched too."""
    if _backend.extension() is None:
        pytest.skip("ember._C not built")
    dense = torch.nn.Parameter(torch.randn(16))
    strided = torch.nn.Parameter(torch.randn(8, 8)[:, ::2])  # neither contiguous nor gap-free
    for p in (dense, strided):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in (dense, strided)]
    opt = ember.optim.SGD([{"params": [dense]}, {"params": [strided]}], lr=0.1, momentum=0.9, backend="cpu")
    with pytest.raises(_backend.BackendError, match="SGD: backend 'cpu' cannot run this call"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(strided, before[1])
