"""The benchmark harness: interleaved timing of one comparison, broken cases, the CLI end to end; the
report writer every suite uses (CSV, markdown, optional PNG); the metrics in ember.metrics."""
import csv
import importlib.util
import math
import time

import pytest
import torch

from ember import metrics
from ember.bench import main as bench_main
from ember.bench import report
from ember.bench.harness import Case, Target, WrongResult, group_cases, judge, run_group, time_fn

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _case(provider, make, shape=(8,)):
    return Case("t", "op", "fwd", provider, torch.float32, shape, 1024, make,
                target=Target("speedup", 1.0, ("torch",)) if provider != "torch" else None)


def _sleeper(seconds):
    def make(check, warmup=True):
        x = torch.randn(4)  # something real to hold, freed after the group
        return lambda: (time.sleep(seconds), x.add_(1))
    return make


def test_run_group_times_every_provider_and_judges():
    cases = [_case("torch", _sleeper(0.002)), _case("fast", _sleeper(0.0002)), _case("slow", _sleeper(0.004))]
    rows = run_group(cases, "cpu", quick=True, copy_bw=1e9, energy=None, rounds=2)
    judge(rows)
    assert [r.case.provider for r in rows] == ["torch", "fast", "slow"]
    t, fast, slow = (r.median_s for r in rows)
    assert fast < t < slow
    assert rows[0].p20_s <= rows[0].median_s <= rows[0].p80_s
    assert rows[1].status == "PASS" and rows[2].status == "FAIL"
    assert rows[1].speedup > 1 > rows[2].speedup


def test_run_group_keeps_going_past_broken_cases():
    def wrong(check, warmup=True):
        raise WrongResult("max |diff| 1.0")

    def broken(check, warmup=True):
        raise RuntimeError("no kernel\nsecond line")

    def fails_later(check, warmup=True):
        calls = []

        def fn():
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("died while timed")
        return fn

    cases = [_case("torch", _sleeper(0.0005)), _case("w", wrong), _case("b", broken), _case("l", fails_later)]
    rows = run_group(cases, "cpu", quick=True, copy_bw=1e9, energy=None, rounds=2)
    assert rows[0].median_s is not None
    assert (rows[1].status, rows[1].median_s) == ("WRONG", None)
    assert (rows[2].status, rows[2].error) == ("ERROR", "RuntimeError: no kernel")
    assert rows[3].status == "ERROR" and rows[3].median_s is None


def test_group_cases_keeps_first_seen_order():
    a, b, c = _case("torch", _sleeper(0), (1,)), _case("torch", _sleeper(0), (2,)), _case("x", _sleeper(0), (1,))
    assert group_cases([a, b, c]) == [[a, c], [b]]


def test_cli_quick_run_writes_a_report(tmp_path, capsys):
    rc = bench_main(["--quick", "--suites", "activations", "--ops", "relu", "--no-compile", "--out", str(tmp_path),
                     "--plot"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "## activations: relu" in out and "ember-cpu" in out
    assert len(list(tmp_path.glob("*.md"))) == 1 and len(list(tmp_path.glob("*.csv"))) == 1
    assert len(list(tmp_path.glob("*.png"))) == (1 if HAVE_MATPLOTLIB else 0)
    with open(next(tmp_path.glob("*.csv")), newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == report.CSV_COLUMNS
    assert {r["provider"] for r in records} >= {"torch", "ember-cpu"} and all(r["suite"] == "activations" for r in records)


def test_only_report_suites_have_a_report():
    from ember.bench import SUITES, suite_module

    # the CLI tells a report suite by its report(); a timed suite must not carry that name
    assert [s for s in SUITES if hasattr(suite_module(s), "report")] == [
        "int8_accuracy", "decoder", "cnn", "train", "linear_cross_entropy", "swap"]


def test_time_fn_budget():
    t = time_fn(lambda: time.sleep(0.002), "cpu", budget_s=0.02)
    assert 0.002 <= t.p20_s <= t.median_s <= t.p80_s < 0.05


# ---------------------------------------------------------------------------------------------
# The report writer.
# ---------------------------------------------------------------------------------------------
def test_markdown_table():
    lines = report.markdown_table(["a", "b"], [[1, None], ["x", 2.5]], ["---", "--:"])
    assert lines == ["| a | b |", "|---|--:|", "| 1 |  |", "| x | 2.5 |"]
    assert report.markdown_row(["only"]) == "| only |"


def test_write_results_writes_csv_markdown_and_optional_png(tmp_path):
    cols = ["name", "value"]
    drawn = []

    def draw(plt):
        drawn.append(1)
        fig, ax = plt.subplots()
        ax.plot([1, 2], [3, 4])
        return fig

    w = report.write_results(tmp_path / "sub" / "run.md", "# title\n", csv_path=tmp_path / "sub" / "run.csv",
                             columns=cols, records=[{"name": "a", "value": 1.5}, {"name": "b", "value": None}],
                             draw=draw)
    assert w.md.read_text() == "# title\n"
    with open(w.csv, newline="") as f:
        assert list(csv.reader(f)) == [cols, ["a", "1.5"], ["b", ""]]
    if HAVE_MATPLOTLIB:
        assert w.png == tmp_path / "sub" / "run.png" and w.png.stat().st_size > 0 and drawn
    else:  # matplotlib is optional: no PNG, nothing drawn, the rest written all the same
        assert w.png is None and not drawn and not (tmp_path / "sub" / "run.png").exists()
    assert str(w).startswith(str(w.csv)) and str(w.md) in str(w)
    only_md = report.write_results(tmp_path / "alone.md", "x\n")
    assert (only_md.csv, only_md.png, str(only_md)) == (None, None, str(tmp_path / "alone.md"))


class _FakePyplot:
    """Stands in for matplotlib.pyplot (an optional dependency, often absent) so the drawing code runs."""

    def __init__(self):
        from unittest import mock

        self.axes = []
        self._mock = mock

    def subplots(self, rows, cols, **kw):
        import numpy as np

        axes = np.empty((rows, cols), dtype=object)
        for i in range(rows * cols):
            axes.flat[i] = self._mock.MagicMock()
            self.axes.append(axes.flat[i])
        return self._mock.MagicMock(), axes


def test_png_drawings_run(tmp_path):
    from ember.bench import matmul
    from ember.bench.harness import Row

    rows = [Row(_case(p, _sleeper(0)), median_s=1e-3, speedup=s) for p, s in (("torch", 1.0), ("fast", 2.0))]
    plt = _FakePyplot()
    report._draw_speedups(rows)(plt)
    assert sum(ax.bar.call_count for ax in plt.axes) == 2
    results = [matmul.Result("linear", p, (m, 64, 64), "fp32", "fwd", 1.0, t, 0.5, 1.0) for p, t in
               (("torch", 1.0), ("ember-cpu", 1.2)) for m in (1, 32)]
    plt = _FakePyplot()
    matmul.draw_tflops(results)(plt)
    assert sum(ax.plot.call_count for ax in plt.axes) == 2


def test_write_csv_appends_and_never_mixes_headers(tmp_path):
    path = tmp_path / "runs.csv"
    report.write_csv(path, ["a", "b"], [{"a": 1, "b": 2}], append=True)
    report.write_csv(path, ["a", "b"], [{"a": 3, "b": 4}], append=True)
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["1", "2"], ["3", "4"]]
    other = report.write_csv(path, ["a", "c"], [{"a": 5, "c": 6}], append=True)  # an older / newer column set
    assert other == tmp_path / "runs.2.csv"
    with open(path, newline="") as f:
        assert len(list(csv.reader(f))) == 3  # the first file is left alone
    fresh = report.write_csv(path, ["a", "b"], [{"a": 7, "b": 8}])  # not appending: written anew
    with open(fresh, newline="") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["7", "8"]]


def test_int8_accuracy_report_tables():
    from ember.bench import int8_accuracy as acc

    results = {acc.MINILM: {"w8a8": (0.99697, 22.81)}, acc.LLAMA: {"w8a8": (0.99945, 31.3, 0.973)}}
    text = acc.markdown(results)
    assert f"| {acc.MINILM} | min cosine | SQNR dB |" in text and "| w8a8 | 0.99697 | 22.8 |" in text
    assert "| w8a8 | 0.99945 | 31.3 | 0.973 |" in text
    records = acc.csv_records(results)
    assert [r["model"] for r in records] == [acc.MINILM, acc.LLAMA]
    assert "top1_agreement" not in records[0] and records[1]["top1_agreement"] == 0.973


def test_int8_table_rows_go_through_the_harness():
    from ember.bench import int8

    rows = list(int8.rows("cpu", quick=True, shapes=[("tiny", 4, 64, 32)]))
    assert [r["provider"] for r in rows] == [p for p, _ in int8._table_providers("cpu")]
    assert all("error" not in r for r in rows), rows
    for r in rows:
        assert set(r) == set(int8.TABLE_COLUMNS) and r["median_ms"] > 0
    assert rows[0]["x_vs_torch-fp32"] == 1.0


# ---------------------------------------------------------------------------------------------
# ember.metrics.
# ---------------------------------------------------------------------------------------------
def test_sqnr_db():
    ref = torch.randn(64, 32)
    assert metrics.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise power 1% of the signal's
    assert metrics.sqnr_db(ref, ref) == math.inf
    # computed in float64: a bf16 output is judged on its values
    out = ref.bfloat16()
    assert metrics.sqnr_db(ref, out) == pytest.approx(metrics.sqnr_db(ref.double(), out.double()))


def test_cosines():
    ref = torch.randn(5, 16)
    out = ref.clone()
    out[2] = -out[2]
    per_row = metrics.cosine_per_row(ref, out)
    assert per_row.shape == (5,) and per_row[2].item() == pytest.approx(-1.0) and per_row[0].item() == pytest.approx(1.0)
    assert metrics.min_cosine(ref, out) == pytest.approx(-1.0)
    assert metrics.min_cosine(ref, 3 * ref) == pytest.approx(1.0)  # scale does not matter
    assert metrics.cosine_per_row(ref, out, dim=0).shape == (16,)  # per channel
    flipped = ref.norm(dim=1)[2] ** 2 / ref.pow(2).sum()
    assert metrics.cosine(ref, out) == pytest.approx(1 - 2 * flipped.item(), abs=1e-6)
    logits = torch.randn(2, 3, 7)  # leading dims kept: the worst token over batch x sequence
    noisy = logits + 0.5 * torch.randn(2, 3, 7)
    want = torch.nn.functional.cosine_similarity(logits.flatten(0, 1), noisy.flatten(0, 1), dim=-1).min().item()
    assert metrics.min_cosine(logits, noisy) == pytest.approx(want, abs=1e-6)


def test_errors():
    ref = torch.tensor([0.5, -4.0, 2.0])
    out = torch.tensor([0.5, -3.0, 2.5])
    assert metrics.max_abs_error(ref, out) == 1.0
    assert metrics.max_rel_error(ref, out) == 0.25  # over max |ref| = 4
    small = torch.tensor([1e-3])
    assert metrics.max_rel_error(small, small + 0.5) == pytest.approx(0.5)  # the floor of 1 keeps it absolute
    assert metrics.max_abs_error(torch.empty(0), torch.empty(0)) == 0.0


def test_int8_compute_limit_is_measured():
    from ember import _backend
    from ember.bench.harness import Config
    from ember.bench.int8 import describe_targets

    ext = _backend.extension()
    if ext is None:
        pytest.skip("no compiled extension")
    rate = ext.int8_peak_macs()
    with open("/proc/cpuinfo") as f:
        vnni = "avx512_vnni" in f.read()
    if not vnni:
        assert rate == 0.0
        return
    # A core issues at most a few vpdpbusd (64 MACs) per cycle at a few GHz.
    assert 1e9 < rate < torch.get_num_threads() * 4 * 64 * 6e9
    lines = describe_targets(Config("cpu", (torch.float32,), "small", quick=True))
    assert any("int8 compute limit measured here" in line for line in lines)
