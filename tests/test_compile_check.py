"""``python -m ember compile-check``: Triton kernels compiled for sm_90a by the real frontend and ptxas,
without a GPU. conftest.py sets TRITON_INTERPRET=1 for this process, so the check runs in a
subprocess without it (compiled Triton, not the interpreter, is what is checked)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from ember import compile_check as cc  # noqa: E402


def _compile_check(tmp_path, match, arch="90"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["EMBER_CACHE_DIR"] = str(tmp_path / "cache")  # a cold result cache: really compile
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "ember", "compile-check", "--only", "triton", "--quick", "--arch", arch,
                        "-j", "1", "-k", match, "--json", str(report)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert report.exists(), r.stdout + r.stderr
    return r, json.loads(report.read_text())


def test_gelu_compiles_for_sm90(tmp_path):
    # gelu's constants were plain module globals: the interpreter reads them, compiled Triton refuses
    r, data = _compile_check(tmp_path, "unary gelu torch.float32")
    recs = data["triton"]
    assert {x["kernel"] for x in recs} == {"_unary_act_fwd_kernel", "_unary_act_bwd_kernel"}
    assert all(x["status"] == "ok" for x in recs), data["failures"]
    assert all(x["arch"] == 90 and x["regs"] and x["regs"] > 0 for x in recs)
    assert all("ACT=2" in x["spec"] and "BLOCK=2048" in x["spec"] for x in recs)  # the GPU's launch config
    assert r.returncode == 0, r.stdout
    assert "_unary_act_fwd_kernel" in r.stdout and "sm_90" in r.stdout


def test_int8_w8a8_group16_compiles_for_sm90(tmp_path):
    # groups of 16 once gave BLOCK_K = 16: int8 tl.dot needs K >= 32 on NVIDIA
    r, data = _compile_check(tmp_path, "w8a8 torch.bfloat16 M=256 group=16")
    gemm = [x for x in data["triton"] if x["kernel"] == "_w8a8_gemm_kernel"]
    assert gemm and all(x["status"] == "ok" for x in gemm), data["failures"]
    assert all("BLOCK_K=32" in x["spec"] and "CHUNK=16" in x["spec"] for x in gemm)
    assert all(x["regs"] and x["smem"] for x in gemm)
    assert r.returncode == 0, r.stdout
    # a second run replays the launchers against the result cache
    r2, data2 = _compile_check(tmp_path, "w8a8 torch.bfloat16 M=256 group=16")
    assert r2.returncode == 0 and all(x["cached"] for x in data2["triton"])


def test_parse_ptxas():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 16 bytes cumulative stack size, 4096 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
    got = cc.parse_ptxas(log)
    assert got == {"_Z3fooPf": {"regs": 72, "stack": 16, "spill_stores": 8, "spill_loads": 4, "smem": 4096}}


def test_cuda_cache_key_covers_every_header(tmp_path, monkeypatch):
    # A changed csrc/cuda/*.cuh must not replay a cached nvcc result (it once did: "*.h*" missed ".cuh").
    import ember.compile_check as cc

    headers = []
    monkeypatch.setattr(cc.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    real_open = open

    def spy_open(path, *a, **k):
        headers.append(os.path.basename(str(path)))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy_open)
    with pytest.raises(RuntimeError, match="stop"):
        cc._cuda_task(os.path.join(cc._ROOT, "csrc", "cuda", "activation.cu"), 90, "nvcc", True)
    assert "common.cuh" in headers and "multi_tensor.cuh" in headers and "activation.h" in headers


def test_a_killed_nvcc_is_not_cached(tmp_path, monkeypatch):
    # nvcc stopped by a signal (a killed job) once left a "Terminated" failure in the cache, which every
    # later run replayed; only results of an nvcc that ran to its end are kept.
    import subprocess

    import ember.compile_check as cc

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    killed = subprocess.CompletedProcess([], -15, stdout="", stderr="Terminated")
    monkeypatch.setattr(cc.subprocess, "run", lambda *a, **k: killed)
    monkeypatch.setattr(cc, "_nvcc_version", lambda nvcc: ["nvcc stand-in"])
    path = os.path.join(cc._ROOT, "csrc", "cuda", "activation.cu")
    assert cc._cuda_task(path, 90, "nvcc", True)["status"] == "fail"
    assert not list(tmp_path.rglob("*.json"))
    ok = subprocess.CompletedProcess([], 0, stdout="", stderr="")
    monkeypatch.setattr(cc.subprocess, "run", lambda *a, **k: ok)
    assert cc._cuda_task(path, 90, "nvcc", True)["status"] == "ok"
    assert len(list(tmp_path.rglob("*.json"))) == 1
