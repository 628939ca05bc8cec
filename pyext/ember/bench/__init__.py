"""``python -m ember bench``: time ember's kernels against torch eager, torch.compile and peers.

    python -m ember bench                          # every suite, this machine's defaults
    python -m ember bench --quick                  # one shape, short timing: a smoke run
    python -m ember bench --ops swiglu geglu --providers torch ember-cuda --dtype bf16 fp16

Each family of kernels is a suite: a module in this package with ``cases(cfg) -> list[Case]`` (and
optionally ``describe_targets(cfg) -> list[str]`` for the report). A report suite has
``report(cfg, out_dir) -> (written, markdown)`` instead: it measures something other than time (e.g.
int8_accuracy) and writes its files through ``report.write_results``. Register it in ``SUITES``; the
harness times every case (``harness.run_group``, ``harness.time_fn``), ``report.write`` writes a CSV row
per case and a markdown table per op into ``--out`` (and a PNG with ``--plot``) and prints the markdown.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import sys

import torch

from .harness import (Case, Config, EnergyMeter, Row, Target, copy_bandwidth, group_cases, inplace_bandwidth, judge,
                      parse_dtype, run_group, steady_cpu_allocator)

# Suite name -> module (in this package) whose ``cases(cfg)`` produces the cases. Imported only
# when the suite runs, so one suite's heavy imports never slow another down.
SUITES: dict[str, str] = {
    "activations": "activations",
    "optim": "optim",
    "matmul": "matmul",
    "int8": "int8",
    "int8_accuracy": "int8_accuracy",
    "decoder": "decoder",
    "cnn": "cnn",
    "train": "train",
    "linear_cross_entropy": "linear_cross_entropy",
    "swap": "swap",
}
# Suites run only when named with --suites: the matmul suite's GPU shapes compile torch.compile
# (max-autotune) per shape and take tens of minutes; its own entry point is python -m ember.bench.matmul.
# int8_accuracy loads transformers and a real checkpoint (~30 s on CPU, not a timing). decoder serves a
# ~200M-param Llama through generate for 7 providers (a few minutes on 2 cores, torch.compile's compiles
# included); train trains a ~46M-param Llama 20 steps per provider (minutes on 2 cores). scripts/main.sh
# runs both after the default suites. linear_cross_entropy times LM-head shapes (seconds per call on
# CPU) with separate memory runs. swap builds ~20 transformers architectures and times each whole model
# (a few minutes).
OPT_IN = {"matmul", "int8_accuracy", "decoder", "train", "linear_cross_entropy", "swap"}


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"ember bench: unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return importlib.import_module(f"{__name__}.{SUITES[name]}")


def collect(cfg: Config, suites: list[str]) -> tuple[list[Case], list[str]]:
    """All cases of ``suites`` for ``cfg`` and the lines describing their targets."""
    cases, targets = [], []
    for name in suites:
        mod = suite_module(name)
        if not hasattr(mod, "cases"):  # a report suite (see the module docstring)
            continue
        cases += mod.cases(cfg)
        if hasattr(mod, "describe_targets"):
            targets += mod.describe_targets(cfg)
    return cases, targets


def _names(values: list[str] | None) -> list[str] | None:
    """Accept both ``--ops a b`` and ``--ops a,b``."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def _parser(default_device: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ember bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device, help=f"cpu or cuda[:i] (default here: {default_device})")
    p.add_argument("--dtype", nargs="+", help="one or more of fp32 bf16 fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--suites", nargs="+", help=f"suites to run (default: all of {', '.join(SUITES)})")
    p.add_argument("--ops", nargs="+", help="only these ops (e.g. gelu gelu_tanh silu relu swiglu geglu)")
    p.add_argument("--providers", nargs="+", help="only these providers (e.g. torch torch.compile ember-cuda)")
    p.add_argument("--sizes", choices=("small", "large"), help="shape set (default: large on GPU, small on CPU)")
    p.add_argument("--out", default="bench/results", help="directory for the CSV and markdown (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--quick", action="store_true", help="first shape only and short timing")
    p.add_argument("--plot", action="store_true", help="also draw each row's speedup over torch eager as a PNG next to "
                   "the markdown (needs matplotlib; skipped without it)")
    p.add_argument("--list", action="store_true", help="list the cases and exit without timing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `python -m ember bench -- --quick` hands us the separator too
        argv = argv[1:]
    args = _parser("cuda" if torch.cuda.is_available() else "cpu").parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        print(f"ember bench: --device must be cpu or cuda[:i], got {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ember bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    if on_gpu and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and do_bench time the current device's stream
    try:
        dtypes = tuple(parse_dtype(d) for d in (_names(args.dtype) or ["bf16" if on_gpu else "fp32"]))
        suites = _names(args.suites) or [s for s in SUITES if s not in OPT_IN]
        sizes = args.sizes or ("large" if on_gpu else "small")
        cfg = Config(str(device), dtypes, sizes, quick=args.quick, compile=not args.no_compile)
        cases, targets = collect(cfg, suites)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2

    for flag, attr in (("--ops", "op"), ("--providers", "provider")):
        wanted = _names(getattr(args, flag[2:]))
        if wanted is None:
            continue
        known = {getattr(c, attr) for c in cases}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"ember bench: {flag} {unknown} match no case here; known: {sorted(known)}", file=sys.stderr)
            return 2
        cases = [c for c in cases if getattr(c, attr) in wanted]

    reports = [s for s in suites if hasattr(suite_module(s), "report")]
    if args.list:
        for s in reports:
            print(s, "(report)")
        for c in cases:
            print(c.suite, c.name(), "" if c.target is None else f"[{c.target.label()}]")
        return 0

    for name in reports:
        written, text = suite_module(name).report(cfg, args.out)
        print(text)
        print(f"ember bench: wrote {written}", file=sys.stderr)
    if not cases:
        return 0

    from tqdm import tqdm

    from . import report

    started = datetime.datetime.now().astimezone()
    allocator = steady_cpu_allocator() if device.type == "cpu" else None
    torch.manual_seed(0)
    print(f"ember bench: {len(cases)} cases on {device}; measuring copy bandwidth ...", file=sys.stderr)
    copy_bw = copy_bandwidth(str(device), args.quick)
    inplace_bw = inplace_bandwidth(str(device), args.quick)
    energy = EnergyMeter(str(device))
    rows: list[Row] = []
    try:
        with tqdm(total=len(cases), desc="ember bench", unit="case", dynamic_ncols=True) as bar:
            for group in group_cases(cases):
                bar.set_postfix_str(group[0].name(), refresh=False)
                rows += run_group(group, str(device), args.quick, copy_bw, energy)
                bar.update(len(group))
    finally:
        energy.close()
    order = {id(c): i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[id(r.case)])  # the suites' own order (grouping may interleave them)
    judge(rows)

    meta = report.make_meta(str(device), copy_bw, targets, when=started, inplace_bw=inplace_bw, allocator=allocator)
    written, text = report.write(args.out, rows, meta, plot=args.plot)
    print(text)
    print(f"ember bench: wrote {written}", file=sys.stderr)
    if args.plot and written.png is None:
        print("ember bench: --plot: matplotlib is not installed, no PNG drawn", file=sys.stderr)
    broken = [r for r in rows if r.status in ("WRONG", "ERROR")]
    for r in broken:
        print(f"ember bench: {r.case.name()}: {r.status}: {r.error}", file=sys.stderr)
    return 1 if broken else 0


__all__ = ["SUITES", "main", "collect", "suite_module", "Case", "Config", "Row", "Target"]
