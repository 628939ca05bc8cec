"""The 'swap' bench suite (issue #14): the coverage table's rows through the CLI, on two tiny
architectures (the architectures themselves are checked in tests/test_swap_architectures.py)."""
import csv

import pytest
import torch

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
    # per-round ratios decide when present: a clear loss in every round fails even with a noisy A/A
    # of 0.5%, and a median below 1.0 whose interval reaches 1.0 is unresolved, not a pass
    lost = swap.Row("f", fused="x", fwd=(1.0, 1.0), fwd_bwd=(1.0, 1.0), noise=0.005,
                    fwd_ratios=[0.95, 0.96, 0.94, 0.95, 0.96], fwd_bwd_ratios=[1.02] * 5)
    assert swap.verdict(lost) == "FAIL"
    spread = swap.Row("g", fused="x", fwd=(1.0, 1.0), fwd_bwd=(1.0, 1.0), noise=0.001,
                      fwd_ratios=[0.97, 1.01, 0.99, 1.02, 0.98, 0.985, 1.005], fwd_bwd_ratios=[1.02] * 7)
    assert swap.verdict(spread).startswith("FAIL within noise")
    lo, hi = spread.interval("fwd")
    assert lo <= spread.speed("fwd") <= hi and lo < 1.0 <= hi
    assert swap.verdict(swap.Row("c", fused="nothing")) == "n/a (nothing swapped)"
    assert swap.verdict(swap.Row("d", error="boom")) == "ERROR"


def test_unresolved_speeds_get_more_rounds(monkeypatch):
    # A speed whose interval straddles 1.0 is timed in up to EXTRA_ROUNDS more batches; a clear one
    # is not. _rounds is replaced by synthetic per-round times: (eager, swapped, twin) seconds.
    calls = []

    def fake_rounds(fns, rounds, budget_s, first=0):
        calls.append(first)
        if len(calls) <= 1 + swap.EXTRA_ROUNDS:  # forward: alternates 0.98x / 1.02x, never resolves
            return [[1.0, 1.0 / (0.98 if (first + i) % 2 else 1.02), 1.0] for i in range(rounds)]
        return [[1.1, 1.0, 1.1] for _ in range(rounds)]  # 1.1x every round: resolved at once

    monkeypatch.setattr(swap, "_rounds", fake_rounds)
    row = swap.measure_one(swap.BY_NAME["gpt-neox"], swap.WIDTHS["tiny"], rounds=6, budget_s=0.0)
    assert row.error is None
    assert len(row.fwd_ratios) == 6 * (1 + swap.EXTRA_ROUNDS) and len(row.fwd_bwd_ratios) == 6
    assert calls == [0, 6, 12, 0]  # continuations keep rotating the order
    assert swap._rounds_cell(row) == "18 / 6"
    lo, hi = row.interval("fwd")
    assert lo < 1.0 < hi and row.interval("fwd_bwd")[0] > 1.0


@pytest.mark.parametrize("name", ["gpt-neox", "llama"])
def test_bf16_rows_are_checked_against_the_fp32_model(name):
    model, fused, report, inputs, rel = swap.compare(swap.BY_NAME[name], swap.WIDTHS["tiny"], torch.bfloat16)
    assert report.replaced and next(model.parameters()).dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in inputs.values() if v.is_floating_point())
    assert 0 <= rel < 0.1
