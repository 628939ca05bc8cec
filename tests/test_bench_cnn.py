"""The 'cnn' bench suite (issue #13 part 4): the seeds' CNN trained on scikit-learn's digits with
torch (eager + SGD momentum) and with ember (swap + ember.optim.SGD). Both start from the same weights
and see the same batches; ember must reach >= 0.9 test accuracy within 2 points of torch."""
import csv

import pytest
import torch

pytest.importorskip("sklearn")

from ember.bench import cnn  # noqa: E402
from ember.bench import main as bench_main  # noqa: E402


def test_digits_split_is_the_real_dataset():
    x_tr, y_tr, x_te, y_te = cnn.digits("cpu")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0 and x_tr.std() > 0.1
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) == set(range(10))


def test_ember_swap_fuses_the_classifier():
    import ember

    model = cnn.DigitsCNN()
    x = torch.rand(5, 1, 8, 8)
    ref = model(x)
    report = ember.swap(model)
    # the classifier's Linear+ReLU pairs fused; the convs' lone ReLUs stay torch's (never faster alone)
    assert {r.name for r in report.replaced} == {"classifier"}
    assert {s.name for s in report.skipped if "lone relu" in s.reason} == {"features.1", "features.4"}
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_ember_trains_as_well_as_torch():
    spec = cnn.Spec(epochs=10)
    t, e = cnn.train("torch", spec), cnn.train("ember", spec)
    assert len(e.accuracy) == spec.epochs and len(e.epoch_s) == spec.epochs
    assert e.final_accuracy >= cnn.ACCURACY_FLOOR, e.accuracy
    assert abs(e.final_accuracy - t.final_accuracy) <= cnn.ACCURACY_GAP, (t.accuracy, e.accuracy)
    assert all(v.endswith("PASS") for _, v in cnn.verdicts([t, e]))


def test_cli_runs_the_suite(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cnn.SPECS, True, cnn.Spec(epochs=2))
    assert bench_main(["--device", "cpu", "--suites", "cnn", "--quick", "--out", str(tmp_path)]) == 0
    assert "# ember cnn" in capsys.readouterr().out
    (path,) = list(tmp_path.glob("ember-cnn_*.csv"))
    with open(path, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"torch", "ember"}
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        assert 0.0 <= float(r["final_accuracy"]) <= 1.0 and float(r["median_epoch_ms"]) > 0
