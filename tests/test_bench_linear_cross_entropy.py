"""The 'linear_cross_entropy' bench suite (issue #13's op targets): time and peak extra memory of the
fused op against the materialised logits, run through the CLI on a small LM-head shape."""
import csv

from ember.bench import linear_cross_entropy as suite
from ember.bench import main as bench_main


def test_cli_runs_the_suite_and_judges_the_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(suite.SHAPES, ("cpu", True), [(256, 64, 4096)])
    assert bench_main(["--device", "cpu", "--suites", "linear_cross_entropy", "--quick", "--no-compile",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# ember linear_cross_entropy" in out and "Targets (issue #13)" in out
    (path,) = list(tmp_path.glob("ember-linear_cross_entropy_*.csv"))
    with open(path, newline="") as f:
        rows = {(r["provider"], r["direction"]): r for r in csv.DictReader(f)}
    for direction in ("fwd", "fwd+bwd"):
        for provider in ("torch", "ember"):
            r = rows[(provider, direction)]
            assert r["status"] == "ok", r["error"]
            assert float(r["median_ms"]) > 0 and float(r["peak_extra_mb"]) >= 0
        assert rows[("torch.compile", direction)]["status"] == "skipped"
    # the materialised logits of this shape are 4 MB, and torch's fwd+bwd holds at least them
    assert float(rows[("torch", "fwd+bwd")]["peak_extra_mb"]) >= 3.5


def test_verdicts_judge_time_and_memory():
    rows = [suite.Row("torch", (8, 4, 16), "fwd+bwd", 2.0, 1000), suite.Row("ember", (8, 4, 16), "fwd+bwd", 1.0, 100),
            suite.Row("torch", (9, 4, 16), "fwd+bwd", 1.0, 1000), suite.Row("ember", (9, 4, 16), "fwd+bwd", 2.0, 900)]
    good, bad = suite.verdicts(rows)
    assert good.count("PASS") == 2 and bad.count("FAIL") == 2
