"""Timing, the measured device limit, energy, and the loop that turns cases into result rows.

Timing (``time_fn``: the one timer of every suite, the int8 table, the matmul runner and ``ember demo``)
  GPU  CUDA events around each call, via ``triton.testing.do_bench`` when triton is installed (it
       zeroes a 256 MB buffer before every call, so each call starts with a cold L2, as an activation
       sitting between two matmuls does); otherwise our own event loop that does the same.
  CPU  ``torch.utils.benchmark.Timer.blocked_autorange`` with all of torch's threads (Timer defaults
       to one thread, which would hide the kernels' parallelism).
  Both report the median and the 20th / 80th percentiles. The providers of one comparison are timed
  in interleaved rounds (``run_group``), each row keeping its best round's median.

Device limit
  What ``dst.copy_(src)`` achieves on a tensor far larger than the last-level cache, timed the same
  way; its bytes are 2 x size (one read, one write). Memory-bound kernels are judged as a fraction of
  it: a kernel that moves B bytes in t seconds runs at (B / t) / copy_bw of what the machine can do.

Energy (GPU only)
  NVML's board energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since driver load) read
  before and after a loop of many calls; the delta over the call count is the board's energy per call,
  idle draw included. The counter ticks coarsely, so the loop runs for about a second.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


class WrongResult(AssertionError):
    """A provider's output disagrees with torch eager: its timing would be meaningless."""


@dataclass(frozen=True)
class Config:
    """What the command line asked for; every suite builds its cases from it."""

    device: str  # "cpu" or "cuda[:i]"
    dtypes: tuple[torch.dtype, ...]
    sizes: str  # "small" or "large"
    quick: bool = False  # fewer shapes, shorter timing
    compile: bool = True  # include torch.compile providers

    @property
    def kind(self) -> str:
        return torch.device(self.device).type


@dataclass(frozen=True)
class Target:
    """What a row must reach. kind "copy_bw": GB/s >= value x measured copy bandwidth.
    kind "speedup": median <= the median of every provider in ``peers`` (same op, shape, dtype,
    direction) divided by ``value``, i.e. at least ``value`` times as fast. ``also``: a second
    target the row must reach as well."""

    kind: str
    value: float
    peers: tuple[str, ...] = ()
    also: Target | None = None

    def label(self) -> str:
        if self.kind == "copy_bw":
            text = f">= {self.value:.0%} copy BW"
        else:
            peers = " & ".join(self.peers)
            text = f"not slower than {peers}" if self.value == 1.0 else f">= {self.value:g}x {peers}"
        return text if self.also is None else f"{text} and {self.also.label()}"


@dataclass
class Case:
    """One timed configuration. ``make(check, warmup=True)`` allocates the inputs, checks the result
    against torch eager when ``check`` is true (raising WrongResult), runs it once when ``warmup``
    (compiles, autotunes) and returns the zero-argument callable to time. Nothing heavy happens
    until ``make`` is called. A callable with an ``extra`` attribute (a dict, read after timing,
    e.g. the optimizer state a step leaves) has it copied into ``Row.extra`` for the report."""

    suite: str
    op: str
    direction: str
    provider: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    bytes: int  # the bytes the op must move at minimum (worked out per suite)
    make: Callable[..., Callable[[], Any]]
    target: Target | None = None
    note: str = ""

    def key(self) -> tuple:
        """Rows with the same key are comparable (providers side by side)."""
        return (self.suite, self.op, self.direction, dtype_name(self.dtype), self.shape)

    def name(self) -> str:
        return f"{self.op}/{self.direction}/{self.provider}/{dtype_name(self.dtype)}/{'x'.join(map(str, self.shape))}"


@dataclass
class Row:
    case: Case
    median_s: float | None = None
    p20_s: float | None = None
    p80_s: float | None = None
    energy_mj: float | None = None
    gbps: float | None = None
    frac_copy: float | None = None
    speedup: float | None = None  # torch eager median / this median
    status: str = ""  # PASS / FAIL / n/a against the target; WRONG / ERROR when the case broke
    error: str = ""
    extra: dict = field(default_factory=dict)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(name: str) -> torch.dtype:
    for dtype, short in _DTYPE_NAMES.items():
        if name in (short, str(dtype).replace("torch.", "")):
            return dtype
    raise ValueError(f"ember bench: unknown dtype {name!r}; expected one of {sorted(_DTYPE_NAMES.values())}")


def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float


def _time_cuda_events(fn, warmup_ms: float, rep_ms: float) -> Timing:
    """CUDA-event loop for machines without triton: cold L2 before each call, like do_bench."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - t0) * 1e3 / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n = max(5, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(statistics.median(ms) * 1e-3, _quantile(ms, 0.2) * 1e-3, _quantile(ms, 0.8) * 1e-3)


def time_fn(fn: Callable[[], Any], device: str, quick: bool = False, share: float = 1.0,
            budget_s: float | None = None) -> Timing:
    """Median / p20 / p80 seconds per call of ``fn`` on ``device``: the one timer of every suite.

    The timing budget is ``budget_s`` seconds of timed calls (default: 0.1 s, or 0.03 s on CPU /
    0.025 s on a GPU with ``quick``), scaled by ``share`` (one of several interleaved rounds takes its
    share of a case's budget). A call longer than the budget still runs and is timed."""
    on_gpu = torch.device(device).type == "cuda"
    if budget_s is None:
        budget_s = (0.025 if on_gpu else 0.03) if quick else 0.1
    if on_gpu:
        warmup_ms = 10 if quick else 25
        rep_ms = max(10, budget_s * 1e3 * share)
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, warmup_ms, rep_ms)
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med * 1e-3, p20 * 1e-3, p80 * 1e-3)
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # 0.1 s per case (split over the interleaved rounds) keeps the default CPU run (~150 cases,
    # torch.compile included) to a few minutes on a 2-core machine.
    m = timer.blocked_autorange(min_run_time=max(0.01, budget_s * share))
    times = list(m.times)
    return Timing(m.median, _quantile(times, 0.2), _quantile(times, 0.8))


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Bytes/s of ``dst.copy_(src)`` on tensors far larger than any cache: the device's practical
    memory limit (2 x size bytes per copy: one read, one write)."""
    # 512 MiB per tensor on a GPU (10x an H100's 50 MB L2); 128 MiB on CPU (4x a 32 MB L3).
    numel = (128 if torch.device(device).type == "cuda" else 32) * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / t.median_s


def inplace_bandwidth(device: str, quick: bool = False) -> float:
    """Bytes/s of an in-place ``x.add_(1)`` (2 x size bytes), reported next to the copy bandwidth.
    On CPUs a store to memory not yet in cache first reads the line (write-allocate), so a copy
    really moves 3 x size bytes while an in-place update (an optimizer step) moves 2 x size: in-place
    kernels can show more than 100% of the copy bandwidth. Measured: AMD EPYC 2 cores, copy 30 GB/s,
    in-place 53 GB/s."""
    numel = (128 if torch.device(device).type == "cuda" else 32) * 2**20
    x = torch.randn(numel, device=device)
    t = time_fn(lambda: x.add_(1.0), device, quick)
    return 2 * x.numel() * x.element_size() / t.median_s


def steady_cpu_allocator() -> str | None:
    """Stop glibc's malloc from handing freed memory back to the OS during a CPU benchmark run.

    By default glibc trims the heap top and serves large blocks by mmap with thresholds that adapt at
    run time, so whether a call's multi-MB output (a weight gradient, an activation) lands on fresh pages
    depends on what was freed before it. Fresh pages cost a page fault each (~250 faults and +0.3-0.5 ms
    for a 4 MB gradient here, measured), and they hit whichever provider happens to allocate next: the
    same M=1 linear backward measured 350 us or 850 us from one loop to the next. Fixed thresholds make
    every provider reuse its memory, as a caching allocator (jemalloc, tcmalloc: what torch's CPU tuning
    guide recommends) would. Returns what was set, for the report, or None off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    trim, mmap = 1 << 30, 32 << 20  # 32 MiB: glibc's largest mmap threshold on 64-bit
    if not (mallopt(M_TRIM_THRESHOLD, trim) and mallopt(M_MMAP_THRESHOLD, mmap)):
        return None
    return "glibc malloc with fixed thresholds (trim 1 GiB, mmap 32 MiB): freed memory is reused, not re-faulted"


# ---------------------------------------------------------------------------------------------
# Peak memory of one phase (the decoder and training suites): CPU RSS high-water mark or CUDA's
# max_memory_allocated, reset at the phase's start.
# ---------------------------------------------------------------------------------------------
def release_cpu_memory() -> None:
    """Hand freed heap back to the OS so that the previous provider's model does not stay resident
    and count in the next one's peak (glibc keeps freed small blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_cpu_memory()
    try:  # Linux: writing 5 resets VmHWM (the RSS high-water mark) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the whole process's (ru_maxrss), which only grows


def current_memory_bytes(device: str) -> int:
    """What is in use now, the baseline a peak is measured above: allocated bytes on a GPU, the
    resident set (VmRSS) on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class EnergyMeter:
    """Board energy per call through NVML, or None everywhere when NVML or a GPU is missing."""

    def __init__(self, device: str):
        self._handle = None
        self._nvml = None
        dev = torch.device(device)
        if dev.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            # NVML numbers devices physically; CUDA_VISIBLE_DEVICES may renumber them for torch.
            get_index = getattr(torch.cuda, "_get_nvml_device_index", None)
            nvml_index = get_index(index) if get_index is not None else index
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises on GPUs without the counter
            self._nvml, self._handle = pynvml, handle
        except Exception:  # noqa: BLE001 - any NVML failure just means "no energy column"
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def read_mj(self) -> float | None:
        """The board's energy counter now (mJ since driver load), or None without NVML."""
        if self._handle is None:
            return None
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def per_call_mj(self, fn: Callable[[], Any], seconds_per_call: float, seconds: float) -> float | None:
        if self._handle is None:
            return None
        n = max(10, math.ceil(seconds / max(seconds_per_call, 1e-7)))
        torch.cuda.synchronize()
        e0 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        e1 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        return (e1 - e0) / n

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------------
# Running cases.
# ---------------------------------------------------------------------------------------------
def _rounds(device: str, quick: bool) -> int:
    return 2 if quick else (5 if torch.device(device).type == "cpu" else 3)


def run_group(cases: list[Case], device: str, quick: bool, copy_bw: float, energy: EnergyMeter | None,
              rounds: int | None = None, budget_s: float | None = None) -> list[Row]:
    """Time the providers of one comparison (cases sharing ``Case.key()``) in interleaved rounds.

    Each round times every provider once, in turn, so none is favoured by when it ran: on a shared
    machine (the CPU numbers in bench/results come from 2 cores that also run other jobs) the load
    drifts over seconds, and timing one provider after another turned equal kernels into 0.8x-1.3x
    verdicts. Interference only ever adds time, so a row reports its best round (median, p20, p80).
    ``budget_s`` is a case's timing budget over all its rounds (``time_fn``'s default when None).
    """
    rounds = rounds or _rounds(device, quick)
    rows = [Row(c) for c in cases]
    fns: list[Callable[[], Any] | None] = []
    for case, row in zip(cases, rows):
        try:
            fns.append(case.make(True))
        except WrongResult as err:
            fns.append(None)
            row.status, row.error = "WRONG", str(err)
        except Exception as err:  # noqa: BLE001 - one broken case must not sink the whole run
            fns.append(None)
            row.status, row.error = "ERROR", f"{type(err).__name__}: {err}".splitlines()[0][:300]
    best: list[Timing | None] = [None] * len(cases)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            try:
                t = time_fn(fn, device, quick, share=1.0 / rounds, budget_s=budget_s)
            except Exception as err:  # noqa: BLE001
                fns[i] = None
                rows[i].status, rows[i].error = "ERROR", f"{type(err).__name__}: {err}".splitlines()[0][:300]
                continue
            if best[i] is None or t.median_s < best[i].median_s:
                best[i] = t
    for case, row, fn, t in zip(cases, rows, fns, best):
        if fn is None or t is None:
            continue
        row.median_s, row.p20_s, row.p80_s = t.median_s, t.p20_s, t.p80_s
        row.gbps = case.bytes / row.median_s / 1e9
        row.frac_copy = case.bytes / row.median_s / copy_bw
        if energy is not None and energy.available:
            row.energy_mj = energy.per_call_mj(fn, row.median_s, 0.25 if quick else 1.0)
        row.extra.update(getattr(fn, "extra", None) or {})
    del fns  # the closures hold the inputs: free them before the next group allocates its own
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def group_cases(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped by ``Case.key()`` (the providers of one comparison), in first-seen order."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.key(), []).append(case)
    return list(groups.values())


def judge(rows: list[Row], baseline: str = "torch") -> None:
    """Fill in speedup vs ``baseline`` and PASS / FAIL against each row's target."""
    by_key: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        if r.median_s is not None:
            by_key.setdefault(r.case.key(), {})[r.case.provider] = r
    for r in rows:
        if r.median_s is None:
            continue
        peers = by_key.get(r.case.key(), {})
        if baseline in peers:
            r.speedup = peers[baseline].median_s / r.median_s
        tgt, verdicts = r.case.target, []
        while tgt is not None:
            verdicts.append(_meets(r, tgt, peers))
            tgt = tgt.also
        if verdicts:
            r.status = "FAIL" if False in verdicts else "n/a" if None in verdicts else "PASS"


def _meets(r: Row, tgt: Target, peers: dict[str, Row]) -> bool | None:
    """Whether ``r`` reaches ``tgt`` (None: no peer to compare with)."""
    if tgt.kind == "copy_bw":
        return r.frac_copy >= tgt.value
    if tgt.kind == "speedup":
        present = [peers[p] for p in tgt.peers if p in peers]
        if not present:
            return None
        return all(p.median_s / r.median_s >= tgt.value for p in present)
    raise ValueError(f"ember bench: unknown target kind {tgt.kind!r}")
