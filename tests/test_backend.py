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
    assert "torch" in info.stdout and "auto ->" in info.stdout


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
