"""pytest setup for the benchmark files.

- Collect ``bench_*.py`` here (pyproject's python_files only matches ``test_*.py``).
- With --benchmark-enable, spend at most 0.25 s per case unless --benchmark-max-time says otherwise
  (pytest-benchmark's 1 s default makes the 54 CPU cases take minutes; the medians of these
  millisecond-long calls settle well within 0.25 s).
"""
import pytest

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
