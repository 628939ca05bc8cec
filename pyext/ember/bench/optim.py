"""Optimizer step benchmark: ember.optim against torch.optim's for-loop, foreach and fused paths.

The parameter list is LLM-like (embedding, per-layer attention / MLP matrices, norms and biases,
~200 tensors) scaled to ``total`` parameters (default 1e9 on GPU, 5e7 on CPU). Each step's traffic
is counted as the bytes an ideal kernel must move, e.g. fp32 AdamW reads p, g, m, v and writes p, m, v:
28 bytes per parameter. Rows report median ms, effective GB/s, that rate as a fraction of the
measured copy bandwidth (x.copy_(y) on a 256 MB buffer: 2 x 256 MB per copy), and the optimizer-state
memory. To be registered with `python -m ember bench` as the "optim" suite.
"""
from __future__ import annotations

import statistics
import time

import torch

# bytes moved per parameter (fp32), by optimizer configuration
CONFIGS = {
    "AdamW": (dict(lr=1e-3, weight_decay=0.01), 28),
    "SGD": (dict(lr=1e-2, momentum=0.9), 20),
    "Adagrad": (dict(lr=1e-2), 20),
    "RMSprop": (dict(lr=1e-2), 20),
    "Lion": (dict(lr=1e-4), 20),
}


def llm_shapes(total: float, d: int = 1024, vocab: int = 32000):
    """Embedding + n layers of (q,k,v,o, gate,up,down, 2 norms, 4 biases) until ~total params."""
    ff = int(d * 8 / 3) // 64 * 64
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)] + [(d,)] * 2 + [(d,)] * 3 + [(ff,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    n_layers = max(1, int((total - vocab * d) // per_layer))
    return [(vocab, d)] + layer * n_layers + [(d,)]


def scale_shapes(total: float):
    d = 1024 if total >= 2e8 else 512
    return llm_shapes(total, d=d, vocab=32000 if total >= 2e8 else 8000)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """GB/s of dst.copy_(src), counting read + write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / ms / 1e6


def providers(name, device):
    import ember

    out = {}
    tcls = getattr(torch.optim, name, None)
    if tcls is not None:
        out["torch-forloop"] = lambda ps, kw: tcls(ps, foreach=False, **kw)
        out["torch-foreach"] = lambda ps, kw: tcls(ps, foreach=True, **kw)
        if name in ("AdamW", "SGD", "Adagrad"):
            out["torch-fused"] = lambda ps, kw: tcls(ps, fused=True, **kw)
    ecls = getattr(ember.optim, name)
    for b in ("cpu", "cuda", "triton") if device.type == "cuda" else ("cpu",):
        if ember._backend.why_unavailable(b, device) is None:
            out[f"ember-{b}"] = lambda ps, kw, b=b: ecls(ps, backend=b, **kw)
    try:  # peers, when installed
        import bitsandbytes as bnb  # noqa: F401

        if device.type == "cuda" and name == "AdamW":
            out["bnb-AdamW32bit"] = lambda ps, kw: bnb.optim.AdamW32bit(ps, **kw)
    except ImportError:
        pass
    try:
        from apex.optimizers import FusedAdam

        if device.type == "cuda" and name == "AdamW":
            out["apex-FusedAdam"] = lambda ps, kw: FusedAdam(ps, adam_w_mode=True, **kw)
    except ImportError:
        pass
    return out


def run(device="cpu", total: float | None = None, names=None, reps: int = 5):
    """Benchmark rows: dicts with optimizer, provider, params, tensors, ms, GB/s, frac_copy, state_MB."""
    device = torch.device(device)
    total = total or (1e9 if device.type == "cuda" else 5e7)
    shapes = scale_shapes(total)
    params = [torch.randn(s, device=device) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    bw = copy_bandwidth(device)
    rows = []
    for name in names or CONFIGS:
        kw, bytes_per = CONFIGS[name]
        for prov, make in providers(name, device).items():
            opt = make(params, kw)
            ms = _median_ms(opt.step, device, reps=reps)
            state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                        if torch.is_tensor(v) and v.numel() > 1)
            gbs = bytes_per * n / ms / 1e6
            rows.append(dict(optimizer=name, provider=prov, params=n, tensors=len(params), ms=round(ms, 2),
                             GBps=round(gbs, 1), frac_copy=round(gbs / bw, 3), state_MB=round(state / 2**20, 1),
                             copy_GBps=round(bw, 1), device=str(device)))
            del opt
    return rows


def format_rows(rows) -> str:
    cols = ["optimizer", "provider", "ms", "GBps", "frac_copy", "state_MB"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    r = run(dev)
    print(f"{r[0]['params'] / 1e6:.1f}M params in {r[0]['tensors']} tensors on {dev}; copy {r[0]['copy_GBps']} GB/s")
    print(format_rows(r))
