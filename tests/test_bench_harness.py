"""The benchmark harness: interleaved timing of one comparison, broken cases, the CLI end to end."""
import time

import pytest
import torch

from ember.bench import main as bench_main
from ember.bench.harness import Case, Target, WrongResult, group_cases, judge, run_group


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
    rc = bench_main(["--quick", "--suites", "activations", "--ops", "relu", "--no-compile", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "## activations: relu" in out and "ember-cpu" in out
    assert len(list(tmp_path.glob("*.md"))) == 1 and len(list(tmp_path.glob("*.csv"))) == 1


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
