"""The 'swap' bench suite (issue #14): the coverage table's rows through the CLI, on two tiny
architectures (the architectures themselves are checked in tests/test_swap_architectures.py)."""
import csv

import pytest

pytest.importorskip("transformers")

from ember.bench import main as bench_main  # noqa: E402
from ember.bench import swap  # noqa: E402


def test_cli_writes_the_coverage_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(swap.WIDTHS, "quick", swap.WIDTHS["tiny"])
    monkeypatch.setattr(swap, "ARCHITECTURES", [swap.BY_NAME["gpt-neox"], swap.BY_NAME["phi3"]])
    assert bench_main(["--device", "cpu", "--suites", "swap", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# ember swap" in out and "GPTNeoXMLP: up-proj + act (x2)" in out and "PackedGatedMLP" in out
    (path,) = list(tmp_path.glob("ember-swap_cpu_*.csv"))
    with open(path, newline="") as f:
        rows = {r["arch"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"gpt-neox", "phi3"}
    for r in rows.values():
        assert r["error"] == "" and r["verdict"].startswith(("PASS", "FAIL")) and float(r["aa_spread"]) >= 0
        assert float(r["fwd_eager_ms"]) > 0 and float(r["fwd_bwd_swapped_ms"]) > 0
        assert float(r["max_rel_diff"]) <= swap.RTOL


def test_verdicts():
    ok = swap.Row("a", fused="x", fwd=(2.0, 1.0), fwd_bwd=(1.0, 1.0))
    slow = swap.Row("b", fused="x", fwd=(1.0, 2.0), fwd_bwd=(1.0, 1.0))
    assert swap.verdict(ok) == "PASS" and swap.verdict(slow) == "FAIL"
    near = swap.Row("e", fused="x", fwd=(1.0, 1.01), fwd_bwd=(1.0, 1.0), noise=0.02)
    assert swap.verdict(near) == "FAIL within noise (A/A 2.0%)"
    assert swap.verdict(swap.Row("c", fused="nothing")) == "n/a (nothing swapped)"
    assert swap.verdict(swap.Row("d", error="boom")) == "ERROR"
