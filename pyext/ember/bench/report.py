"""Writing results: the one module through which every suite's results reach the disk.

``write_results`` is the writer: a run's CSV (columns and one record per row, written fresh or appended),
its markdown and, when a ``draw`` function is given and matplotlib is installed, a PNG beside the
markdown. ``markdown_table`` formats the tables; ``cpu_name`` and ``git_sha`` name the machine and the
checkout in report headers.

The bench CLI's report (``write``) goes through it: one CSV row per case appended to a per-device,
per-day file (so runs accumulate), a markdown report per run (header with the machine and versions,
then one table per op) and, with ``--plot``, a PNG of each row's speedup over torch eager. The matmul
and int8 tables (``python -m ember.bench.matmul`` / ``.int8``) and the int8 accuracy report call
``write_results`` with their own columns.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .harness import Row, dtype_name

CSV_COLUMNS = [
    "timestamp", "device", "git_sha", "torch", "triton", "ember",
    "suite", "op", "direction", "provider", "dtype", "shape",
    "median_us", "p20_us", "p80_us", "bytes", "gbps", "frac_copy_bw", "copy_bw_gbps",
    "speedup_vs_torch", "energy_mj", "target", "status", "error", "extra",
]  # fmt: skip


@dataclass
class Meta:
    device: str  # human-readable, e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC (2 cores, 2 threads)"
    kind: str  # for file names: "cpu" or the GPU's name as a slug
    torch: str
    triton: str
    ember: str
    cuda: str
    git_sha: str
    when: _dt.datetime
    copy_bw: float  # bytes/s
    inplace_bw: float | None = None  # bytes/s of an in-place read + write (see harness.inplace_bandwidth)
    allocator: str | None = None  # what harness.steady_cpu_allocator set, if anything
    targets: list[str] = field(default_factory=list)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """Short SHA of the checkout ember is imported from (``-dirty`` with uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, capture_output=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_meta(device: str, copy_bw: float, targets: list[str], when: _dt.datetime | None = None,
              inplace_bw: float | None = None, allocator: str | None = None) -> Meta:
    import ember
    from .. import _backend

    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        kind = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        kind = "cpu"
    return Meta(
        device=name,
        kind=kind,
        torch=torch.__version__,
        triton=_backend.triton_version() or "not installed",
        ember=ember.__version__,
        cuda=torch.version.cuda or "none",
        git_sha=git_sha(),
        when=when or _dt.datetime.now().astimezone(),
        copy_bw=copy_bw,
        inplace_bw=inplace_bw,
        allocator=allocator,
        targets=targets,
    )


def _num(v: float | None) -> str:
    """About three significant digits, never scientific notation above 1."""
    if v is None:
        return ""
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _us(s: float | None) -> float | None:
    return None if s is None else s * 1e6


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def csv_rows(rows: list[Row], meta: Meta) -> list[dict]:
    out = []
    for r in rows:
        c = r.case
        out.append(
            {
                "timestamp": meta.when.isoformat(timespec="seconds"),
                "device": meta.device,
                "git_sha": meta.git_sha,
                "torch": meta.torch,
                "triton": meta.triton,
                "ember": meta.ember,
                "suite": c.suite,
                "op": c.op,
                "direction": c.direction,
                "provider": c.provider,
                "dtype": dtype_name(c.dtype),
                "shape": _shape(c.shape),
                "median_us": "" if r.median_s is None else f"{_us(r.median_s):.3f}",
                "p20_us": "" if r.p20_s is None else f"{_us(r.p20_s):.3f}",
                "p80_us": "" if r.p80_s is None else f"{_us(r.p80_s):.3f}",
                "bytes": c.bytes,
                "gbps": "" if r.gbps is None else f"{r.gbps:.2f}",
                "frac_copy_bw": "" if r.frac_copy is None else f"{r.frac_copy:.4f}",
                "copy_bw_gbps": f"{meta.copy_bw / 1e9:.2f}",
                "speedup_vs_torch": "" if r.speedup is None else f"{r.speedup:.4f}",
                "energy_mj": "" if r.energy_mj is None else f"{r.energy_mj:.4f}",
                "target": "" if c.target is None else c.target.label(),
                "status": r.status,
                "error": r.error,
                "extra": ";".join(f"{k}={v}" for k, v in r.extra.items()),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# The writer every suite uses.
# ---------------------------------------------------------------------------------------------
def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    """A markdown table's lines: ``head`` cells, one line per row (cells as given, ``None`` empty) and
    ``align`` per column ("---" left, "--:" or "---:" right; default all left)."""
    align = align or ["---"] * len(head)
    return [markdown_row(head), "|" + "|".join(align) + "|"] + [markdown_row(row) for row in rows]


def markdown_row(cells: Sequence[Any]) -> str:
    """One line of a markdown table (for tables printed row by row as results come in)."""
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def write_csv(path: str | os.PathLike, columns: Sequence[str], records: Iterable[dict], append: bool = False) -> Path:
    """Write ``records`` (dicts keyed by ``columns``; ``None`` is written empty) to ``path``.

    ``append``: add to an existing file whose header is ``columns``; a file with another header (an older
    column set) is left alone and the rows go to a sibling file (``name.2.csv``, ...) instead."""
    path, columns = Path(path), list(columns)
    n = 1
    while append and path.exists():
        with open(path, newline="") as f:
            if next(csv.reader(f), None) == columns:
                break
        n += 1
        path = path.with_name(f"{path.stem.split('.')[0]}.{n}{path.suffix}")
    new = not (append and path.exists())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(records)
    return path


def write_png(path: str | os.PathLike, draw: Callable[[Any], Any]) -> Path | None:
    """Save the figure ``draw(pyplot)`` returns as ``path``; None (nothing written) without matplotlib,
    which the benchmarks never require."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display, and no GUI backend to start
    import matplotlib.pyplot as plt

    fig = draw(plt)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


@dataclass
class Written:
    """The files one ``write_results`` call wrote (None: not asked for, or no matplotlib for the PNG)."""

    md: Path
    csv: Path | None = None
    png: Path | None = None

    def __str__(self) -> str:
        paths = [str(p) for p in (self.csv, self.md, self.png) if p is not None]
        return ", ".join(paths[:-1]) + " and " + paths[-1] if len(paths) > 1 else paths[0]


def write_results(md_path: str | os.PathLike, text: str, csv_path: str | os.PathLike | None = None,
                  columns: Sequence[str] = (), records: Iterable[dict] = (), append: bool = False,
                  draw: Callable[[Any], Any] | None = None) -> Written:
    """Write one run's results: the markdown ``text`` to ``md_path``; with ``csv_path``, ``records``
    under ``columns`` (appended when ``append``, see ``write_csv``); with ``draw``, a PNG of the
    figure it returns next to the markdown when matplotlib is installed."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    written = Written(md_path)
    if csv_path is not None:
        written.csv = write_csv(csv_path, columns, records, append)
    md_path.write_text(text)
    if draw is not None:
        written.png = write_png(md_path.with_suffix(".png"), draw)
    return written


# ---------------------------------------------------------------------------------------------
# The bench CLI's report.
# ---------------------------------------------------------------------------------------------
_HEAD = ["direction", "provider", "dtype", "shape", "median us", "p20-p80 us", "GB/s", "of copy BW", "vs torch",
         "mJ/call"]
_ALIGN = ["---"] * 4 + ["--:"] * 6


def _extra_head(key: str) -> str:
    """Row.extra columns: keys ending in ``_bytes`` are shown in MB."""
    return f"{key.removesuffix('_bytes')} MB" if key.endswith("_bytes") else key


def _extra_cell(key: str, value) -> str:
    if value is None:
        return ""
    if key.endswith("_bytes"):
        return _num(value / 1e6)
    return _num(value) if isinstance(value, (int, float)) else str(value)


def markdown(rows: list[Row], meta: Meta) -> str:
    lines = [
        f"# ember benchmarks, {meta.when:%Y-%m-%d %H:%M %Z}",
        "",
        "| | |",
        "|---|---|",
        f"| device | {meta.device} |",
        f"| measured copy bandwidth | {meta.copy_bw / 1e9:.1f} GB/s (`dst.copy_(src)`, 2 x size bytes) |",
        *([f"| measured in-place bandwidth | {meta.inplace_bw / 1e9:.1f} GB/s (`x.add_(1)`, 2 x size bytes; "
           "in-place updates such as optimizer steps skip the write-allocate read a copy pays, so they can "
           "exceed 100% of copy BW) |"] if meta.inplace_bw else []),
        *([f"| allocator | {meta.allocator} |"] if meta.allocator else []),
        f"| torch | {meta.torch} (CUDA {meta.cuda}) |",
        f"| triton | {meta.triton} |",
        f"| ember | {meta.ember} (git {meta.git_sha}) |",
        "",
        "Times are medians of calls timed one by one"
        + (" with a cold L2 (CUDA events)" if meta.kind != "cpu" else " (torch.utils.benchmark)")
        + "; the providers of each comparison are timed in interleaved rounds and each row shows its best"
        " round (median and p20-p80), so load that comes and goes favours no provider."
        + " GB/s counts the bytes each op must move at minimum; 'vs torch' is torch eager time / this time.",
    ]
    if meta.targets:
        lines += ["", "Targets:"] + [f"- {t}" for t in meta.targets]
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "n/a", "WRONG", "ERROR")}
    lines += ["", "Result: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(rows)} rows."]
    for (suite, op), group in _by_op(rows).items():
        keys = list(dict.fromkeys(k for r in group for k in r.extra))
        head = _HEAD + [_extra_head(k) for k in keys] + ["target", "status"]
        align = _ALIGN + ["--:"] * len(keys) + ["---", "---"]
        notes, problems, cells = [], [], []
        for r in group:
            c = r.case
            cells.append([
                c.direction, c.provider, dtype_name(c.dtype), _shape(c.shape), _num(_us(r.median_s)),
                "" if r.p20_s is None else f"{_num(_us(r.p20_s))}-{_num(_us(r.p80_s))}", _num(r.gbps),
                "" if r.frac_copy is None else f"{r.frac_copy:.0%}", "" if r.speedup is None else f"{r.speedup:.2f}x",
                _num(r.energy_mj), *(_extra_cell(k, r.extra.get(k)) for k in keys),
                "" if c.target is None else c.target.label(), r.status,
            ])
            if c.note and c.note not in notes:
                notes.append(c.note)
            if r.error:
                problems.append(f"{c.name()}: {r.status}: {r.error}")
        lines += ["", f"## {suite}: {op}", ""] + markdown_table(head, cells, align)
        lines += [""] * bool(notes or problems) + [f"- {n}" for n in notes] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def _by_op(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.case.suite, r.case.op), []).append(r)
    return groups


def _draw_speedups(rows: list[Row]) -> Callable[[Any], Any]:
    """One panel per (suite, op): each provider's speedup over torch eager, grouped by direction,
    dtype and shape (the comparisons of the markdown's table)."""
    def draw(plt):
        groups = {k: [r for r in g if r.speedup is not None] for k, g in _by_op(rows).items()}
        groups = {k: g for k, g in groups.items() if g} or {("", "no timed rows"): []}
        fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.8 * len(groups)), squeeze=False)
        for ax, ((suite, op), group) in zip(axes.flat, groups.items()):
            labels = list(dict.fromkeys(f"{r.case.direction} {dtype_name(r.case.dtype)} {_shape(r.case.shape)}"
                                        for r in group))
            providers = list(dict.fromkeys(r.case.provider for r in group))
            width = 0.8 / max(1, len(providers))
            for j, provider in enumerate(providers):
                mine = {f"{r.case.direction} {dtype_name(r.case.dtype)} {_shape(r.case.shape)}": r.speedup
                        for r in group if r.case.provider == provider}
                xs = [i + j * width for i, label in enumerate(labels) if label in mine]
                ax.bar(xs, [mine[label] for label in labels if label in mine], width, label=provider)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
            ax.set_title(f"{suite}: {op}", fontsize=9)
            ax.set_ylabel("x torch eager")
            if providers:
                ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    return draw


def write(out_dir: str | os.PathLike, rows: list[Row], meta: Meta, plot: bool = False) -> tuple[Written, str]:
    """Write the CLI's report into ``out_dir``: the CSV (appended), this run's markdown and, with
    ``plot``, its PNG; returns what was written and the markdown text."""
    out = Path(out_dir)
    stem = f"ember-bench_{meta.kind}_{meta.when:%Y-%m-%d}"
    text = markdown(rows, meta)
    written = write_results(out / f"{stem}_{meta.when:%H%M%S}.md", text, csv_path=out / f"{stem}.csv",
                            columns=CSV_COLUMNS, records=csv_rows(rows, meta), append=True,
                            draw=_draw_speedups(rows) if plot else None)
    return written, text
