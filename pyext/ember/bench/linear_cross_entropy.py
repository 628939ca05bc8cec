"""The fused linear + cross-entropy against ``F.cross_entropy(F.linear(x, W).float(), target)``: time and
peak extra memory, forward and forward+backward, per provider (issue #13's op targets).

    python -m ember bench --suites linear_cross_entropy [--quick]

Providers: torch eager, torch.compile of the same expression, ember (``ember.ops.linear_cross_entropy``,
this device's backend) and, on GPU with liger_kernel installed, Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss``. Shapes are LM heads: tokens x hidden x vocab.

Peak extra memory: what one call allocates above what existed before it (inputs and weights excluded,
gradients included), the largest over the call. GPU: ``max_memory_allocated`` minus the allocation
before. CPU: the resident-set high-water mark (reset through /proc/self/clear_refs) minus the RSS
before, so every byte the call touched counts, whoever allocated it.

Targets: ember's forward+backward time <= 1.0x torch eager and its peak extra memory <= 0.25x eager's.
This is a report suite (``report(cfg, out_dir)``): memory needs its own single calls, not the timer.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import report as _report
from .harness import current_memory_bytes, peak_memory_bytes, release_cpu_memory, reset_peak_memory, time_fn

SUITE = "linear_cross_entropy"
TIME_TARGET, MEMORY_TARGET = 1.0, 0.25
SHAPES = {  # (tokens, hidden, vocab)
    ("cpu", False): [(1024, 512, 32000), (2048, 1024, 32000)],
    ("cpu", True): [(1024, 512, 32000)],
    ("cuda", False): [(8192, 2048, 32000), (8192, 4096, 128256)],
    ("cuda", True): [(4096, 2048, 32000)],
}


def _eager(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def _ember(x, w, t):
    import ember

    return ember.ops.linear_cross_entropy(x, w, t)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def providers(kind: str, compile: bool) -> list[tuple[str, object, str]]:
    out = [("torch", _eager, ""), ("torch.compile", torch.compile(_eager) if compile else None,
                                   "" if compile else "--no-compile"), ("ember", _ember, "")]
    if kind == "cuda":
        try:
            out.append(("liger", _liger(), ""))
        except Exception as err:  # noqa: BLE001 - not installed or does not import: not comparable here
            out.append(("liger", None, f"liger_kernel unavailable ({type(err).__name__})"))
    else:
        out.append(("liger", None, "Liger-Kernel's kernels are Triton GPU kernels"))
    return out


@dataclass
class Row:
    provider: str
    shape: tuple[int, int, int]
    direction: str
    median_s: float | None = None
    peak_bytes: int | None = None
    error: str | None = None


def _inputs(shape, dtype, device, grad: bool):
    n, h, v = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_(grad)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return x, w, t


def measure(cfg) -> list[Row]:
    from tqdm.auto import tqdm

    dtype = cfg.dtypes[0]
    rows = []
    jobs = [(shape, d, p) for shape in SHAPES[(cfg.kind, bool(cfg.quick))] for d in ("fwd", "fwd+bwd")
            for p in providers(cfg.kind, cfg.compile)]
    for shape, direction, (name, fn, why) in tqdm(jobs, desc="linear_cross_entropy", file=sys.stderr):
        row = Row(name, shape, direction)
        rows.append(row)
        if fn is None:
            row.error = f"skipped: {why}"
            continue
        try:
            grad = direction == "fwd+bwd"
            x, w, t = _inputs(shape, dtype, cfg.device, grad)

            def call():
                if grad:
                    x.grad = w.grad = None
                    fn(x, w, t).backward()
                else:
                    with torch.no_grad():
                        fn(x, w, t)

            call()  # warm-up (torch.compile's compile)
            x.grad = w.grad = None
            gc.collect()
            release_cpu_memory()
            reset_peak_memory(cfg.device)
            before = current_memory_bytes(cfg.device)
            call()
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.synchronize()
            row.peak_bytes = max(0, peak_memory_bytes(cfg.device) - before)
            row.median_s = time_fn(call, cfg.device, cfg.quick, budget_s=1.0 if not cfg.quick else 0.3).median_s
        except Exception as err:  # noqa: BLE001 - one failing provider must not sink the others
            row.error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        finally:
            x = w = t = None  # noqa: F841
            gc.collect()
    return rows


def verdicts(rows: list[Row]) -> list[str]:
    out = []
    by = {(r.provider, r.shape, r.direction): r for r in rows}
    for (p, shape, d), r in by.items():
        base = by.get(("torch", shape, d))
        if p != "ember" or d != "fwd+bwd" or not (base and base.median_s and r.median_s):
            continue
        speed = base.median_s / r.median_s
        mem = r.peak_bytes / base.peak_bytes if base.peak_bytes else None
        out.append(f"{shape}: time {r.median_s / base.median_s:.2f}x eager (target <= {TIME_TARGET}x): "
                   + ("PASS" if speed >= 1 / TIME_TARGET else "FAIL")
                   + (f"; peak extra memory {mem:.2f}x eager (target <= {MEMORY_TARGET}x): "
                      + ("PASS" if mem <= MEMORY_TARGET else "FAIL") if mem is not None else ""))
    return out


def markdown(cfg, rows: list[Row], when: str) -> str:
    dev = _report.cpu_name() if cfg.kind == "cpu" else torch.cuda.get_device_name(cfg.device)
    by = {(r.provider, r.shape, r.direction): r for r in rows}
    lines = [f"# ember linear_cross_entropy ({when})", "",
             f"- device: {dev} ({cfg.device}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"git {_report.git_sha()}, dtype {cfg.dtypes[0]}",
             "- peak extra MB: allocated by one call above what existed before it (gradients included; CPU: RSS "
             "high-water mark)", ""]
    table = []
    for r in rows:
        base = by.get(("torch", r.shape, r.direction))
        speed = base.median_s / r.median_s if base and base.median_s and r.median_s else None
        mem = r.peak_bytes / base.peak_bytes if base and base.peak_bytes and r.peak_bytes is not None else None
        table.append([" x ".join(map(str, r.shape)), r.direction, r.provider,
                      _report._num(None if r.median_s is None else r.median_s * 1e3), _report._num(speed),
                      _report._num(None if r.peak_bytes is None else r.peak_bytes / 2**20), _report._num(mem),
                      r.error or "ok"])
    lines += _report.markdown_table(["tokens x hidden x vocab", "direction", "provider", "median ms", "speed vs eager",
                                     "peak extra MB", "memory vs eager", "status"], table,
                                    ["---", "---", "---", "--:", "--:", "--:", "--:", "---"])
    lines += ["", "Targets (issue #13):"] + [f"- {v}" for v in verdicts(rows)]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["timestamp", "device", "git_sha", "torch", "dtype", "tokens", "hidden", "vocab", "direction", "provider",
               "median_ms", "peak_extra_mb", "status", "error"]


def report(cfg, out_dir):
    import datetime

    now = datetime.datetime.now().astimezone()
    rows = measure(cfg)
    stem = Path(out_dir) / f"ember-linear_cross_entropy_{cfg.kind if cfg.kind == 'cpu' else 'gpu'}_{now:%Y-%m-%d_%H%M%S}"
    text = markdown(cfg, rows, f"{now:%Y-%m-%d %H:%M %Z}")
    dev = _report.cpu_name() if cfg.kind == "cpu" else torch.cuda.get_device_name(cfg.device)
    records = [{"timestamp": now.isoformat(timespec="seconds"), "device": dev, "git_sha": _report.git_sha(),
                "torch": torch.__version__, "dtype": str(cfg.dtypes[0]), "tokens": r.shape[0], "hidden": r.shape[1],
                "vocab": r.shape[2], "direction": r.direction, "provider": r.provider,
                "median_ms": None if r.median_s is None else round(r.median_s * 1e3, 3),
                "peak_extra_mb": None if r.peak_bytes is None else round(r.peak_bytes / 2**20, 1),
                "status": "ok" if r.error is None else ("skipped" if r.error.startswith("skipped") else "error"),
                "error": r.error} for r in rows]
    return _report.write_results(stem.with_suffix(".md"), text, csv_path=stem.with_suffix(".csv"),
                                 columns=CSV_COLUMNS, records=records), text


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import main as bench_main

    sys.exit(bench_main(["--suites", SUITE, *sys.argv[1:]]))
