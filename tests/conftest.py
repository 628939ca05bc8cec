"""Test setup shared by every test file.

Without a GPU, Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must be
set before any @triton.jit function is defined, i.e. before ember.kernels is imported.
"""
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ember  # noqa: E402
from ember import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])



def backend_device_pairs():
    """Every (backend, device) combination worth testing; unavailable ones are kept and skipped
    with the reason, so a CPU-only run shows what it did not cover."""
    pairs = []
    for device in ["cpu", "cuda"]:
        for name in _backend.BACKENDS:
            if name == "cpu" and device == "cuda" or name == "cuda" and device == "cpu":
                continue
            pairs.append(pytest.param((name, device), id=f"{name}-{device}"))
    return pairs


@pytest.fixture
def backend_device(request):
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = _backend.why_unavailable(name, torch.device(device))
    if reason:
        pytest.skip(reason)
    return name, device


def pytest_generate_tests(metafunc):
    if "backend_device" in metafunc.fixturenames:
        metafunc.parametrize("backend_device", backend_device_pairs(), indirect=True)


# Fresh random data on every run; EMBER_TEST_SEED=<printed seed> reproduces a failing run.
SESSION_SEED = int(os.environ.get("EMBER_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"ember: EMBER_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
