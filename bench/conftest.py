"""pytest setup for the benchmark files.

- Collect ``bench_*.py`` here (pyproject's python_files only matches ``test_*.py``).
- With --benchmark-enable, spend at most 0.25 s per case unless --benchmark-max-time says otherwise
  (pytest-benchmark's 1 s default makes the 54 CPU cases take minutes; the medians of these
  millisecond-long calls settle well within 0.25 s).
- ``run_case``: the one way the bench_*.py files hand an ``ember.bench`` Case to pytest-benchmark.
"""
import pytest
import torch

from ember.bench.harness import dtype_name

DEFAULT_MAX_TIME = "0.25"


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself; collecting it here too would
    # run every case twice
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a kernel benchmark case (pytest-benchmark)")
    given = any(str(a).startswith("--benchmark-max-time") for a in config.invocation_params.args)
    if not given and hasattr(config.option, "benchmark_max_time"):
        config.option.benchmark_max_time = DEFAULT_MAX_TIME


@pytest.fixture
def run_case(benchmark):
    """``run_case(case, rates=None)``: build ``case`` (checked against torch eager, as the harness does),
    hand it to pytest-benchmark (timed with --benchmark-enable, run once without) and return the
    callable. The group is the case's comparison (op, direction, dtype, shape), so providers sit side by
    side; extra_info gets the provider, the bytes, what the callable reports in ``extra`` and, when
    timed, GB/s plus each ``rates`` entry (name -> amount per call, e.g. {"TFLOP/s": flops / 1e12})."""
    def run(case, rates: dict[str, float] | None = None):
        torch.manual_seed(0)
        fn = case.make(True, warmup=benchmark.enabled)
        benchmark.group = f"{case.op} {case.direction} {dtype_name(case.dtype)} {'x'.join(map(str, case.shape))}"
        benchmark.extra_info.update(provider=case.provider, bytes=case.bytes)
        benchmark(fn)
        benchmark.extra_info.update(getattr(fn, "extra", None) or {})
        if benchmark.enabled and benchmark.stats is not None:
            median = benchmark.stats.stats.median
            if case.bytes:
                benchmark.extra_info["GB/s"] = round(case.bytes / median / 1e9, 2)
            for name, per_call in (rates or {}).items():
                benchmark.extra_info[name] = round(per_call / median, 4)
        return fn

    return run
