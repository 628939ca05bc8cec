"""A decoder served end to end (issue #12 part 5): greedy ``generate`` of a Llama-style model with a
KV cache, per provider: prefill and decode tokens/s, peak memory and token agreement with the fp32 model.

    python -m ember bench --suites decoder            # this device's model (~200M CPU, ~1B GPU)
    python -m ember bench --suites decoder --quick    # a smaller model, fewer prompts and tokens
    python -m ember.bench.decoder [--device cpu] [--quick] [--out bench/results]

The model is transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` with seeded random weights (no
checkpoint to download). Every provider is built from the same seed, so all run the same weights:

  torch-fp32        fp32 eager: the reference whose greedy tokens the others are compared with
  torch-bf16        bf16 eager
  torch.compile     bf16, ``torch.compile`` on the model's forward (prefill and decode graphs)
  ember-w8a8        bf16 model, every Linear (lm_head too) ``ember.quantize(mode="w8a8")``
  ember-w8a16       bf16 model, ``ember.quantize(mode="w8a16")``
  ember-w8a8-fp32   fp32 model, ``ember.quantize(mode="w8a8")`` (CPU only: quantize_dynamic's ground)
  ember-w8a16-fp32  fp32 model, ``ember.quantize(mode="w8a16")`` (CPU only)
  torchao-int8      bf16 model, torchao ``Int8DynamicActivationInt8WeightConfig`` (when torchao imports)
  quantize_dynamic  fp32 model, ``torch.ao.quantization.quantize_dynamic`` (qint8 Linears; CPU only)
The ember and torchao rows keep bf16 activations (attention, norms, residuals) so that against
torch-bf16 they differ only in their Linears: that is the comparison issue #12's targets are stated in.
The -fp32 rows keep fp32 activations, as quantize_dynamic does: on a CPU without native bf16 arithmetic
(no AVX512-BF16 / AMX) the bf16 model's attention and norms are slower than fp32's, and a user there
quantizes the fp32 model.

Measured, per provider, over a fixed prompt set (prompts of fixed random token ids, one at a time,
batch 1, as a single stream is served): prefill tokens/s (prompt tokens / time of the first forward,
the one over the prompt), decode tokens/s (the other new tokens / the rest of ``generate``), peak
memory while serving (CPU: the process's resident-set high-water mark, reset through /proc/self/clear_refs
once the provider's model is built, so it counts the resident weights, KV cache and activations; GPU:
``torch.cuda.max_memory_allocated`` from the same point) and agreement:
the fraction of generated tokens equal to the fp32 model's at the same position, and the first
position where any prompt's tokens differ.

This is a report suite (``report(cfg, out_dir)``): one ``generate`` per prompt takes seconds, so the
harness's repeated-call timer does not fit; each phase is timed by forward hooks, summed over the prompts,
and the best of ``Spec.rounds`` passes over the prompt set is kept. It is opt-in (``OPT_IN``): on 2 CPU
cores it takes several minutes (more under load), most of it the fp32 and bf16 models' decode and
torch.compile's compiles.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import report as _report
from .harness import peak_memory_bytes, release_cpu_memory, reset_peak_memory

SUITE = "decoder"
REFERENCE = "torch-fp32"


@dataclass(frozen=True)
class Spec:
    """The model and the workload: everything a run depends on, printed in the report."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    prompts: int
    prompt_len: int
    new_tokens: int
    rounds: int = 2  # times the prompt set is generated per provider; each phase keeps its best round
    seed: int = 0

    def config(self):
        import transformers as tf

        return tf.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                              num_hidden_layers=self.layers, num_attention_heads=self.heads,
                              num_key_value_heads=self.kv_heads,
                              max_position_embeddings=self.prompt_len + self.new_tokens,
                              # no eos/bos/pad: random weights may emit any id, and a stop would end the
                              # stream early and make providers' token counts differ
                              bos_token_id=None, eos_token_id=None, pad_token_id=None)

    def params(self) -> int:
        """Parameter count (untied embedding and lm_head, as LlamaConfig's default)."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    def describe(self) -> str:
        return (f"Llama-style, {_report._num(self.params() / 1e6)}M params (hidden {self.hidden}, {self.layers} layers, "
                f"intermediate {self.intermediate}, vocab {self.vocab}, {self.heads} heads / {self.kv_heads} KV "
                f"heads, random weights seed {self.seed}); {self.prompts} prompts x {self.prompt_len} tokens, "
                f"{self.new_tokens} new tokens each, greedy, batch 1, KV cache; best of {self.rounds} round(s) per phase")


# CPU: ~200M params (the brief's 100-300M range: seconds per prompt on 2 cores); GPU: ~1.1B (a
# TinyLlama-sized model). --quick keeps the shape family but shrinks it so a smoke run takes ~1 min.
SPECS = {
    ("cpu", False): Spec(hidden=1024, layers=12, intermediate=2816, vocab=32000, heads=16, kv_heads=4,
                         prompts=3, prompt_len=128, new_tokens=48),
    ("cpu", True): Spec(hidden=512, layers=4, intermediate=1408, vocab=32000, heads=8, kv_heads=2,
                        prompts=2, prompt_len=64, new_tokens=16, rounds=1),
    ("cuda", False): Spec(hidden=2048, layers=22, intermediate=5632, vocab=32000, heads=32, kv_heads=4,
                          prompts=4, prompt_len=128, new_tokens=64),
    ("cuda", True): Spec(hidden=2048, layers=4, intermediate=5632, vocab=32000, heads=32, kv_heads=4,
                         prompts=2, prompt_len=128, new_tokens=32, rounds=1),
}


# ---------------------------------------------------------------------------------------------
# Providers: name -> (build(spec, device) -> model, or the reason it cannot run here).
# ---------------------------------------------------------------------------------------------
def fresh_model(spec: Spec, device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The seeded random-weight model: every call returns the same weights (init runs in fp32 on the
    CPU under the same seed, then moves), so no provider needs another's copy kept alive."""
    import transformers as tf

    torch.manual_seed(spec.seed)
    m = tf.LlamaForCausalLM(spec.config()).eval().requires_grad_(False)
    return m.to(device=device, dtype=dtype)


def _bf16(spec, device):
    return fresh_model(spec, device, torch.bfloat16)


def _compiled(spec, device):
    m = fresh_model(spec, device, torch.bfloat16)
    # dynamic=True: the KV cache grows every step, and one graph with a symbolic length beats a
    # recompile per position (torch's default would recompile once and then go dynamic anyway)
    m.forward = torch.compile(m.forward, dynamic=True)
    return m


def _ember(mode, dtype=torch.bfloat16):
    def build(spec, device):
        import ember

        m = fresh_model(spec, device, dtype)
        ember.quantize(m, mode=mode)
        return m
    return build


def _torchao(spec, device):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    m = fresh_model(spec, device, torch.bfloat16)
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


def _quantize_dynamic(spec, device):
    m = fresh_model(spec, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao, still the stock CPU int8 path
        return torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)


def providers(kind: str, compile: bool = True) -> list[tuple[str, Callable | None, str]]:
    """(name, build or None, why not) for this device kind, the fp32 reference first."""
    out = [(REFERENCE, fresh_model, ""), ("torch-bf16", _bf16, "")]
    out.append(("torch.compile", _compiled, "") if compile else ("torch.compile", None, "--no-compile"))
    out += [("ember-w8a8", _ember("w8a8"), ""), ("ember-w8a16", _ember("w8a16"), "")]
    try:
        import torchao.quantization  # noqa: F401

        out.append(("torchao-int8", _torchao, ""))
    except Exception as err:  # noqa: BLE001 - any import failure means: not comparable here
        out.append(("torchao-int8", None, f"torchao does not import ({type(err).__name__}: {err})"[:200]))
    if kind == "cpu":
        out += [("ember-w8a8-fp32", _ember("w8a8", torch.float32), ""),
                ("ember-w8a16-fp32", _ember("w8a16", torch.float32), ""),
                ("quantize_dynamic", _quantize_dynamic, "")]
    else:
        out.append(("quantize_dynamic", None, "torch.ao quantize_dynamic has CPU kernels only"))
    return out


# ---------------------------------------------------------------------------------------------
# Timing one generate.
# ---------------------------------------------------------------------------------------------
class PhaseTimer:
    """Wall-clock ends of every forward of ``model`` (a forward hook): the first forward of a
    ``generate`` is the prefill over the prompt, every later one decodes one token."""

    def __init__(self, model: nn.Module, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.ends: list[float] = []
        self._handle = model.register_forward_hook(self._hook)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _hook(self, *_):
        self._sync()  # the forward's kernels must have finished for its end time to mean anything
        self.ends.append(time.perf_counter())

    def start(self) -> float:
        self._sync()
        self.ends.clear()
        return time.perf_counter()

    def close(self):
        self._handle.remove()


def generate(model, ids: torch.Tensor, new_tokens: int):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


@dataclass
class Result:
    provider: str
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    peak_bytes: int | None = None
    agreement: float | None = None  # fraction of generated tokens equal to the reference's
    first_divergence: int | None = None  # earliest new-token position that differs (None: none does)
    tokens: list[torch.Tensor] = field(default_factory=list)  # generated ids per prompt
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.decode_tok_s is not None


def prompt_ids(spec: Spec, device: str) -> list[torch.Tensor]:
    """The fixed prompt set: seeded random token ids (their own generator, so the model's seed and the
    prompts' are independent)."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    return [torch.randint(0, spec.vocab, (1, spec.prompt_len), generator=g).to(device) for _ in range(spec.prompts)]


def run_provider(name: str, build: Callable, spec: Spec, device: str, prompts: list[torch.Tensor]) -> Result:
    res = Result(name)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    else:
        release_cpu_memory()  # the previous provider's model must not stay resident under this one
    try:
        with torch.inference_mode():
            model = build(spec, device)
            # The peak counts from here: what serving holds (weights, KV cache, activations), not the fp32
            # copy every provider is built from (that would make a bf16 or int8 model look as big as fp32).
            reset_peak_memory(device)
            # warm-up on the first prompt with a few new tokens: compiles (torch.compile's prefill and
            # decode graphs), packs weights lazily and touches the KV cache paths before timing
            generate(model, prompts[0], min(4, spec.new_tokens))
            timer = PhaseTimer(model, device)
            prefill_s = decode_s = math.inf
            try:
                # Load on a shared machine only ever adds time: run the prompt set `rounds` times and keep
                # each phase's best round (the harness's rule for interleaved rounds, here per provider so
                # that only one model is resident and the peak memory is this provider's).
                for _ in range(spec.rounds):
                    prefill, decode = 0.0, 0.0
                    tokens = []
                    for ids in prompts:
                        t0 = timer.start()
                        out = generate(model, ids, spec.new_tokens)
                        timer._sync()
                        t1 = time.perf_counter()
                        if not timer.ends:
                            raise RuntimeError("generate ran no forward the hook saw")
                        prefill += timer.ends[0] - t0
                        decode += t1 - timer.ends[0]
                        tokens.append(out[0, ids.shape[1]:].cpu())
                    prefill_s, decode_s = min(prefill_s, prefill), min(decode_s, decode)
                    res.tokens = res.tokens or tokens  # greedy: every round yields the same ids
            finally:
                timer.close()
        n = len(prompts)
        res.prefill_tok_s = n * spec.prompt_len / prefill_s
        # the prefill's forward yields the first new token; the decode steps yield the rest
        res.decode_tok_s = n * (spec.new_tokens - 1) / decode_s if spec.new_tokens > 1 else None
        res.peak_bytes = peak_memory_bytes(device)
    except Exception as err:  # noqa: BLE001 - one broken provider must not sink the others
        res.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    finally:
        model = None  # noqa: F841 - drop the model before the next provider measures its peak
        gc.collect()
    return res


def agreement(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[float, int | None]:
    """(fraction of positions where ``out`` equals ``ref``, over all prompts; the earliest position
    where any prompt differs, or None)."""
    same = total = 0
    first = None
    for r, o in zip(ref, out):
        n = min(len(r), len(o))
        eq = (r[:n] == o[:n])
        same += int(eq.sum())
        total += max(len(r), len(o))  # a shorter output counts its missing tokens as different
        diff = (~eq).nonzero()
        pos = int(diff[0]) if len(diff) else (n if len(r) != len(o) else None)
        if pos is not None:
            first = pos if first is None else min(first, pos)
    return (same / total if total else 0.0), first


def measure(spec: Spec, device: str, compile: bool = True, only: list[str] | None = None,
            progress: bool = True) -> tuple[list[Result], dict[str, str]]:
    """Every provider's Result (the reference first) and {provider: why skipped}."""
    from tqdm import tqdm

    import transformers

    transformers.utils.logging.set_verbosity_error()  # generation-config chatter per call
    todo = [p for p in providers(torch.device(device).type, compile) if only is None or p[0] in only]
    if only is not None and REFERENCE not in only:  # agreement needs the fp32 tokens
        todo.insert(0, providers(torch.device(device).type, compile)[0])
    skipped = {name: why for name, build, why in todo if build is None}
    prompts = prompt_ids(spec, device)
    results: list[Result] = []
    with tqdm(total=len(todo), desc="ember bench decoder", unit="provider", dynamic_ncols=True,
              disable=not progress) as bar:
        for name, build, _ in todo:
            bar.set_postfix_str(name, refresh=True)
            if build is not None:
                results.append(run_provider(name, build, spec, device, prompts))
            bar.update(1)
    ref = next((r for r in results if r.provider == REFERENCE and r.ok), None)
    for r in results:
        if ref is not None and r.ok:
            r.agreement, r.first_divergence = agreement(ref.tokens, r.tokens)
    return results, skipped


# ---------------------------------------------------------------------------------------------
# Targets (issue #12): checked on the measured rows, stated in the report.
# ---------------------------------------------------------------------------------------------
def _amx_in_use() -> bool:
    from .int8 import _amx_in_use as amx

    return amx()


def targets(kind: str) -> list[tuple[str, str, str, float]]:
    """(provider, metric, peer, factor): provider's metric (tokens/s) >= factor x the peer's."""
    out = [(p, "decode_tok_s", "torch-bf16", 1.0) for p in ("ember-w8a8", "ember-w8a16")]
    if kind == "cpu" and _amx_in_use():  # int8 TDPBUSD vs bf16 TDPBF16PS: prefill is compute bound
        out.append(("ember-w8a8", "prefill_tok_s", "torch-bf16", 1.0))
    if kind == "cpu":  # quantize_dynamic on its own ground: an fp32 model's int8 Linears
        out += [("ember-w8a8-fp32", m, "quantize_dynamic", 1.0) for m in ("decode_tok_s", "prefill_tok_s")]
    return out


def verdicts(results: list[Result], kind: str) -> list[tuple[str, str]]:
    """(target text, PASS / FAIL / n/a) for each target."""
    by = {r.provider: r for r in results if r.ok}
    out = []
    for prov, metric, peer, factor in targets(kind):
        phase = metric.split("_")[0]
        text = f"{prov} {phase} tokens/s >= " + (f"{factor:g}x " if factor != 1.0 else "") + f"{peer}"
        mine, theirs = by.get(prov), by.get(peer)
        a = getattr(mine, metric, None) if mine else None
        b = getattr(theirs, metric, None) if theirs else None
        if a is None or b is None:
            out.append((text, "n/a"))
        else:
            out.append((f"{text} ({a:.1f} vs {b:.1f})", "PASS" if a >= factor * b else "FAIL"))
    return out


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
CSV_COLUMNS = ["timestamp", "device", "git_sha", "torch", "transformers", "model", "provider", "prefill_tok_s",
               "decode_tok_s", "peak_mb", "agreement", "first_divergence", "status", "error"]


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name = f"{_report.cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if hasattr(os, "getloadavg"):  # other work on the machine skews every row; say how much there was
        name += f", load average {os.getloadavg()[0]:.1f} at the end"
    return name + ")"


def _status(r: Result, skipped: dict[str, str]) -> str:
    if r.provider in skipped:
        return "skipped"
    return "ERROR" if r.error else "ok"


def markdown(spec: Spec, device: str, results: list[Result], skipped: dict[str, str], when: str) -> str:
    import transformers

    lines = [f"# ember decoder, {when}", "",
             f"device: {_device_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"git {_report.git_sha()}; `python -m ember bench --suites decoder`", "",
             f"model: {spec.describe()}.", "",
             "prefill tok/s: prompt tokens / time of the first forward; decode tok/s: the other new tokens / the "
             "rest of `generate`; peak MB: " + ("`torch.cuda.max_memory_allocated`" if torch.device(device).type ==
                                                 "cuda" else "the process's resident-set high-water mark while generating, the "
                                                 "model already built (weights + KV cache + activations)") +
             f"; agreement: generated tokens equal to {REFERENCE}'s at the same position; first diff: earliest "
             "new-token position where any prompt differs (- none). ember and torchao rows run bf16 activations, "
             "the -fp32 rows and quantize_dynamic fp32.",
             ""]
    ref = next((r for r in results if r.provider == REFERENCE and r.ok), None)
    bf = next((r for r in results if r.provider == "torch-bf16" and r.ok), None)
    rows = []
    for r in results:
        rows.append([r.provider, _report._num(r.prefill_tok_s), _report._num(r.decode_tok_s),
                     "" if bf is None or not r.ok else f"{r.decode_tok_s / bf.decode_tok_s:.2f}x",
                     "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}",
                     "" if r.agreement is None else f"{r.agreement:.3f}",
                     "" if not r.ok or ref is None else ("-" if r.first_divergence is None else r.first_divergence),
                     r.error or "ok"])
    rows += [[name, "", "", "", "", "", "", f"skipped: {why}"] for name, why in skipped.items()]
    lines += _report.markdown_table(["provider", "prefill tok/s", "decode tok/s", "decode vs bf16", "peak MB",
                                     "agreement", "first diff", "status"], rows,
                                    ["---"] + ["--:"] * 6 + ["---"])
    checks = verdicts(results, torch.device(device).type)
    if checks:
        lines += ["", "Targets (issue #12):"] + [f"- {text}: {v}" for text, v in checks]
    return "\n".join(lines) + "\n"


def _draw(results: list[Result]):
    """Prefill and decode tokens/s per provider, side by side (two panels: their scales differ ~10x)."""
    def draw(plt):
        ok = [r for r in results if r.ok]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for ax, metric, title in ((axes[0], "prefill_tok_s", "prefill tokens/s"),
                                  (axes[1], "decode_tok_s", "decode tokens/s")):
            ax.bar([r.provider for r in ok], [getattr(r, metric) or 0.0 for r in ok])
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        fig.tight_layout()
        return fig
    return draw


def write(spec: Spec, device: str, results: list[Result], skipped: dict[str, str], out_dir: str | os.PathLike):
    import datetime

    import transformers

    now = datetime.datetime.now().astimezone()
    kind = "cpu" if torch.device(device).type == "cpu" else "gpu"
    stem = Path(out_dir) / f"ember-decoder_{kind}_{now:%Y-%m-%d_%H%M%S}"
    text = markdown(spec, device, results, skipped, f"{now:%Y-%m-%d %H:%M %Z}")
    common = {"timestamp": now.isoformat(timespec="seconds"), "device": _device_name(device),
              "git_sha": _report.git_sha(), "torch": torch.__version__, "transformers": transformers.__version__,
              "model": spec.describe()}
    records = [{**common, "provider": r.provider, "prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s,
                "peak_mb": None if r.peak_bytes is None else round(r.peak_bytes / 2**20, 1),
                "agreement": r.agreement, "first_divergence": r.first_divergence,
                "status": _status(r, skipped), "error": r.error} for r in results]
    records += [{**common, "provider": name, "status": "skipped", "error": why} for name, why in skipped.items()]
    written = _report.write_results(stem.with_suffix(".md"), text, csv_path=stem.with_suffix(".csv"),
                                    columns=CSV_COLUMNS, records=records, draw=_draw(results))
    return written, text


def spec_for(cfg) -> Spec:
    return SPECS[(cfg.kind, bool(cfg.quick))]


def report(cfg, out_dir):
    """The bench CLI's entry point for this report suite."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config-built model: nothing to fetch
    spec = spec_for(cfg)
    print(f"ember bench decoder: {spec.describe()} on {cfg.device}", file=sys.stderr)
    results, skipped = measure(spec, cfg.device, compile=cfg.compile)
    return write(spec, cfg.device, results, skipped, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ember.bench.decoder", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the smaller model and workload")
    p.add_argument("--providers", nargs="+", help=f"only these (the reference {REFERENCE} always runs)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    spec = SPECS[(torch.device(a.device).type, a.quick)]
    known = [name for name, _, _ in providers(torch.device(a.device).type)]
    unknown = [name for name in a.providers or () if name not in known]
    if unknown:
        p.error(f"--providers {unknown}: expected some of {known}")
    print(f"ember decoder: {spec.describe()} on {a.device}", file=sys.stderr)
    results, skipped = measure(spec, a.device, compile=not a.no_compile, only=a.providers)
    written, text = write(spec, a.device, results, skipped, a.out)
    print(text)
    print(f"wrote {written}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
