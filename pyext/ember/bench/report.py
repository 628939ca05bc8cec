"""Writing results: one CSV row per case (appended to a per-device, per-day file, so runs accumulate)
and a markdown report per run (header with the machine and versions, then one table per op)."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

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


def _cpu_name() -> str:
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
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
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


def write_csv(path: Path, rows: list[Row], meta: Meta) -> Path:
    """Append to ``path``; a file whose header differs (an older column set) is left alone and the
    rows go to a sibling file instead."""
    n = 1
    while path.exists():
        with open(path, newline="") as f:
            if next(csv.reader(f), None) == CSV_COLUMNS:
                break
        n += 1
        path = path.with_name(f"{path.stem.split('.')[0]}.{n}{path.suffix}")
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(csv_rows(rows, meta))
    return path


_TABLE_HEAD = (
    "| direction | provider | dtype | shape | median us | p20-p80 us | GB/s | of copy BW | vs torch | mJ/call "
    "|{extra} target | status |\n|---|---|---|---|--:|--:|--:|--:|--:|--:|{align}---|---|"
)


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
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.case.suite, r.case.op), []).append(r)
    for (suite, op), group in groups.items():
        keys = list(dict.fromkeys(k for r in group for k in r.extra))
        head = _TABLE_HEAD.format(extra="".join(f" {_extra_head(k)} |" for k in keys), align="--:|" * len(keys))
        lines += ["", f"## {suite}: {op}", "", head]
        notes, problems = [], []
        for r in group:
            c = r.case
            spread = "" if r.p20_s is None else f"{_num(_us(r.p20_s))}-{_num(_us(r.p80_s))}"
            frac = "" if r.frac_copy is None else f"{r.frac_copy:.0%}"
            speed = "" if r.speedup is None else f"{r.speedup:.2f}x"
            target = "" if c.target is None else c.target.label()
            extra = "".join(f" {_extra_cell(k, r.extra.get(k))} |" for k in keys)
            lines.append(
                f"| {c.direction} | {c.provider} | {dtype_name(c.dtype)} | {_shape(c.shape)} | {_num(_us(r.median_s))} "
                f"| {spread} | {_num(r.gbps)} | {frac} | {speed} | {_num(r.energy_mj)} |{extra} {target} | {r.status} |"
            )
            if c.note and c.note not in notes:
                notes.append(c.note)
            if r.error:
                problems.append(f"{c.name()}: {r.status}: {r.error}")
        lines += [""] * bool(notes or problems) + [f"- {n}" for n in notes] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def write(out_dir: str | os.PathLike, rows: list[Row], meta: Meta) -> tuple[Path, Path, str]:
    """Write the CSV (appended) and this run's markdown into ``out_dir``; returns both paths and the
    markdown text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ember-bench_{meta.kind}_{meta.when:%Y-%m-%d}"
    csv_path = write_csv(out / f"{stem}.csv", rows, meta)
    text = markdown(rows, meta)
    md_path = out / f"{stem}_{meta.when:%H%M%S}.md"
    md_path.write_text(text)
    return csv_path, md_path, text
