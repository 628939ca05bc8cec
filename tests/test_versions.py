"""The supported torch / triton range: declared in pyproject.toml, checked at import."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

from ember import _versions as V  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_same_range():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = next(d for d in meta["dependencies"] if d.startswith("torch"))
    assert torch_spec == f"torch>={V.TORCH_MIN[0]}.{V.TORCH_MIN[1]},<{V.TORCH_MAX[0]}.{V.TORCH_MAX[1] + 1}"
    triton_spec = meta["optional-dependencies"]["triton"][0]
    assert triton_spec == f"triton>={V.TRITON_MIN[0]}.{V.TRITON_MIN[1]},<{V.TRITON_MAX[0]}.{V.TRITON_MAX[1] + 1}"


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.13.0+cpu", "2.14.1"])
def test_supported_torch_passes_silently(version):
    assert V.check_torch(version) is None


def test_old_torch_is_refused_with_the_range():
    with pytest.raises(ImportError, match=r"torch >= 2\.11 .*found torch 2\.10\.0"):
        V.check_torch("2.10.0")


def test_newer_torch_warns():
    assert "untested" in V.check_torch("2.15.0")


@pytest.mark.parametrize("triton", ["3.6.0", "3.9.0"])
def test_supported_triton(triton):
    assert V.triton_problem(triton, "2.4.6", interpreting=False) is None


def test_triton_outside_range_names_it():
    assert re.search(r"triton 3\.5\.1 is outside .* 3\.6-3\.9", V.triton_problem("3.5.1", None, False))
    assert "outside" in V.triton_problem("3.10.0", None, False)


def test_triton36_interpreter_needs_numpy_below_24():
    assert "numpy<2.4" in V.triton_problem("3.6.0", "2.4.0", interpreting=True)
    assert V.triton_problem("3.6.0", "2.3.5", interpreting=True) is None
    assert V.triton_problem("3.6.0", "2.5.2", interpreting=False) is None  # compiled kernels don't care
    assert V.triton_problem("3.9.0", "2.4.6", interpreting=True) is None


def test_constraints_pin_every_test_dependency():
    pins = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    assert "torch" not in pins  # the machine's own torch is kept
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for name in ("pytest", "pytest-benchmark", "transformers", "safetensors", "expecttest", "numpy", "triton",
                 "onnx", "onnxscript", "onnxruntime", "torchao", "scikit-learn", "matplotlib"):
        assert name in pins, name
        assert name in setup, name
