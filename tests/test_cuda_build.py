"""What the CUDA build promises, checked on the PTX nvcc makes here (no GPU needed; skipped without nvcc)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


def nvcc_flags() -> list[str]:
    text = (ROOT / "csrc" / "cuda" / "nvcc_flags.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_adamw8bit_kernel_has_no_contracted_multiply_adds(tmp_path):
    # AdamW8bit's codes are bit-equal across backends only if every a*b+c rounds twice, as in the
    # float32 reference; nvcc's default --fmad=true fused 120 of them in this file.
    ptx = tmp_path / "optim8bit.ptx"
    subprocess.run([NVCC, "-ptx", *nvcc_flags(), "-I", str(ROOT / "csrc"), "-gencode", "arch=compute_90a,code=sm_90a",
                    str(ROOT / "csrc" / "cuda" / "optim8bit.cu"), "-o", str(ptx)], check=True, capture_output=True)
    text = ptx.read_text()
    assert "adamw8bit_kernel" in text
    assert "fma.rn.f32" not in text
