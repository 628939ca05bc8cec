"""scripts/gpu_smoke.py, the program the device run puts under compute-sanitizer, proven on the CPU:
it passes on ember's C++ CPU kernels, and a deliberately wrong result makes it fail."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ember

SMOKE = Path(__file__).resolve().parent.parent / "scripts" / "gpu_smoke.py"
pytestmark = pytest.mark.skipif(ember.available_backends("cpu")["cpu"] is not None, reason="needs ember._C")


def _smoke(*args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "EMBER_SMOKE_PERTURB"} | (env or {})
    return subprocess.run([sys.executable, str(SMOKE), "--device", "cpu", "--backend", "cpu", "--tiny", *args],
                          capture_output=True, text=True, timeout=300, env=full)


def test_cpu_kernels_pass():
    run = _smoke()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    checks = [ln for ln in lines if ln[:3] in ("ok ", "BAD", "ERR")]
    assert len(checks) > 50 and all(ln.startswith("ok ") for ln in checks)
    groups = {ln.split()[1].split(".")[0] for ln in checks}
    assert {"unary", "gated", "linear", "gated_linear", "quantize", "w8a8", "w8a16", "optim", "adamw8bit"} <= groups
    assert lines[-1].startswith("SMOKE cpu/cpu: all ") and " ok " in lines[-1]


def test_a_wrong_result_is_caught():
    # one output of one check, off by one: that check is BAD, the rest still run, the exit status is 1
    run = _smoke("--only", "linear_bwd", env={"EMBER_SMOKE_PERTURB": "linear.bwd"})
    assert run.returncode == 1, run.stdout[-3000:]
    bad = [ln for ln in run.stdout.splitlines() if ln.startswith("BAD")]
    assert bad and all("linear.bwd" in ln for ln in bad)
    assert "SMOKE cpu/cpu: FAILED" in run.stdout.splitlines()[-1]


def test_only_and_bad_arguments():
    run = _smoke("--only", "adamw8bit", "--perturb", "adamw8bit fp32")  # the fp32 parameters' check
    assert run.returncode == 1 and "BAD adamw8bit fp32" in run.stdout and "BAD adamw8bit bf16" not in run.stdout
    assert _smoke("--only", "nonsense").returncode == 2
