"""One Triton GEMM tile per problem instead of tuning all of them: for the device run's tests and smoke.

kernels/linear.py chooses a tile config per problem by compiling and timing every candidate (12 at
the time of writing) the first time it meets the problem. That is right for a benchmark and wasteful
for a test run, where each of hundreds of small problems would pay a dozen compiles. The knob for it
is the environment variable ``EMBER_TRITON_AUTOTUNE=0``; scripts/gpu_check.sh sets it for every stage
but the benchmarks. Where kernels/linear.py does not read that variable (yet), this module pins the
choice itself, so the run is as short either way:

    python3 -m pytest -p gpu_fixed_tiles ...      # with scripts/ on PYTHONPATH (gpu_check.sh does that)
    import gpu_fixed_tiles; gpu_fixed_tiles.pin()  # gpu_smoke.py

(64, 64, 64, GROUP_M 8, 4 warps, 4 stages) fits the shared memory of the fp32 gated kernel (two weight
tiles) on sm_80 and sm_90. A new ``_Tuner()`` (test_triton_tuner_persists_choices) is left alone.
"""
from __future__ import annotations

import os
import sys

FIXED = (64, 64, 64, 8, 4, 4)
KNOB = "EMBER_TRITON_AUTOTUNE"


def knob_supported(module) -> bool:
    """Whether kernels/linear.py reads EMBER_TRITON_AUTOTUNE itself (then nothing needs pinning)."""
    try:
        with open(module.__file__) as f:
            return KNOB in f.read()
    except OSError:
        return False


def pin() -> str:
    """Make the shared tuner return FIXED when the knob is off and linear.py ignores it; say what was done."""
    if os.environ.get(KNOB, "1") != "0":
        return f"{KNOB} is not 0: the tuner times every candidate"
    try:
        from ember.kernels import linear as tk
    except Exception as err:  # noqa: BLE001  (no triton here: nothing to pin)
        return f"ember.kernels.linear not importable ({type(err).__name__}): nothing pinned"
    if knob_supported(tk):
        return f"kernels/linear.py reads {KNOB}=0 itself: nothing pinned"
    tuner, configs = getattr(tk, "TUNER", None), getattr(tk, "_GPU_CONFIGS", None)
    if tuner is None or not hasattr(tuner, "config"):
        return "kernels/linear.py has no TUNER.config any more: nothing pinned (update scripts/gpu_fixed_tiles.py)"
    if configs is not None and FIXED not in configs:
        return f"{FIXED} is no longer a candidate config: nothing pinned (update scripts/gpu_fixed_tiles.py)"
    tuner.config = lambda key, launch: FIXED
    return f"Triton GEMM tile pinned to {FIXED} (kernels/linear.py does not read {KNOB})"


# -- the pytest plugin side ------------------------------------------------------------------------
_NOTE = ""


def pytest_configure(config):
    global _NOTE
    _NOTE = pin()


def pytest_report_header(config):
    return f"gpu_fixed_tiles: {_NOTE}"


if __name__ == "__main__":
    print(pin())
    sys.exit(0)
