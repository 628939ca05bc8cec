"""ember.swap never makes a model slower through a lone activation (issue #14): a lone activation module
(not part of a fused block) is replaced only where ember's kernel measured faster than torch's on the
model's device (swap/activations.py's LONE_FASTER), and the report says why the others stay."""
import pytest
import torch
from torch import nn

import ember
from ember.swap import activations


def _model():
    return nn.Sequential(nn.Conv1d(2, 2, 1), nn.GELU(), nn.Conv1d(2, 2, 1), nn.GELU(approximate="tanh"),
                         nn.Conv1d(2, 2, 1), nn.SiLU(), nn.Conv1d(2, 2, 1), nn.ReLU())


@pytest.mark.parametrize("vendor,swapped", [
    ("GenuineIntel", {"1", "3"}),  # both GELUs
    ("AuthenticAMD", {"1", "3"}),
    ("other", set()),
])
def test_auto_replaces_only_what_is_faster_on_this_cpu(monkeypatch, vendor, swapped):
    monkeypatch.setattr(activations, "cpu_vendor", lambda: vendor)
    model = _model()
    x = torch.randn(3, 2, 5)
    want = model(x)
    report = ember.swap(model)
    assert {r.name for r in report.replaced} == swapped
    held = {s.name: s.reason for s in report.skipped}
    for name in {"1", "3", "5", "7"} - swapped:
        assert "not faster with ember's kernel on this device" in held[name] and "activations=True" in held[name]
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_true_and_false_override_the_table(monkeypatch):
    monkeypatch.setattr(activations, "cpu_vendor", lambda: "other")
    model = _model()
    assert {r.name for r in ember.swap(model, activations=True).replaced} == {"1", "3", "5", "7"}
    ember.unswap(model)
    report = ember.swap(model, activations=False)
    assert not report.replaced and all("activations=False" in s.reason for s in report.skipped)


def test_fused_activations_are_not_held_back(monkeypatch):
    monkeypatch.setattr(activations, "cpu_vendor", lambda: "other")
    model = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))})  # relu fused
    report = ember.swap(model)
    assert [r.rule for r in report.replaced] == ["linear-act-sequential"]


def test_the_policy_leaks_out_of_no_swap_and_bad_values_raise():
    with pytest.raises(ValueError, match="activations must be"):
        ember.swap(_model(), activations="fast")
    assert activations._lone_policy.get()[0] == activations.ALL_KINDS  # reset after every swap
    ember.swap(_model(), activations=False)
    assert activations._lone_policy.get()[0] == activations.ALL_KINDS


def test_gpu_models_use_the_gpu_row():
    kinds, where = activations.lone_policy("auto", "cuda")
    assert where == "GPU" and kinds == activations.LONE_FASTER["cuda"]
