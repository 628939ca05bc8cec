"""ember.optim against torch.optim: every optimizer x option set x dtype x backend, step by step.

fp32 parameters must agree with torch to 1e-6 of their scale after >= 50 steps (fewer steps on the
Triton interpreter, which is slow), except in rare ill-conditioned elements, where ember must be as close
to torch's float64 run as torch's fp32 run is (see assert_scaled_close); fp16 / bf16 parameters are checked against ember's own reference
(same math, one rounding per stored tensor) within a few ulps, and against torch more loosely (torch
rounds the state after every sub-operation, ember once).
"""
import pytest
import torch

import ember

# (ember/torch class name, kwargs)
CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=1e-2, maximize=True, eps=1e-6)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-8)),
    ("RMSprop", dict(lr=1e-2)),
    ("RMSprop", dict(lr=1e-2, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-2, momentum=0.5, maximize=True)),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]

# 0-dim, tiny, odd sizes, and one crossing the C++ kernel's 65536-element chunk and the interpreter's
# 16384-element Triton chunk.
SHAPES = [(), (1,), (7,), (33, 129), (3, 5, 7), (65536 + 37,)]
TRITON_SHAPES = [(), (1,), (7,), (33, 129), (16384 + 37,)]


def steps_for(backend):
    return 8 if backend == "triton" else 50


def make_params(shapes, dtype, device):
    return [torch.randn(s, dtype=torch.float64, device=device).to(dtype) for s in shapes]


def run_pair(name, kw, backend, device, dtype, shapes, steps, ember_kw=None, fp64_truth=False):
    """Runs torch.optim.<name> and ember.optim.<name> on identical parameters and gradients (and,
    with ``fp64_truth``, torch in float64 on the same sequence: its parameters and optimizer are
    returned as fifth and sixth values)."""
    ps = make_params(shapes, dtype, device)
    qs = [p.clone() for p in ps]
    ts = [p.double() for p in ps] if fp64_truth else []
    a = getattr(torch.optim, name)(ps, **kw)
    b = getattr(ember.optim, name)(qs, backend=backend, **kw, **(ember_kw or {}))
    c = getattr(torch.optim, name)(ts, **kw) if fp64_truth else None
    for _ in range(steps):
        for p, q, t in zip(ps, qs, ts or ps):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
            if fp64_truth:
                t.grad = p.grad.double()
        a.step()
        b.step()
        if c is not None:
            c.step()
    return (ps, qs, a, b, ts, c) if fp64_truth else (ps, qs, a, b)


def _max_err(x, y):
    return (x.double() - y.double()).abs().max().item() if y.numel() else 0.0


def assert_scaled_close(actual, expected, rel, truth=None, factor=4.0):
    """|actual - expected| <= rel x scale, or, given ``truth`` (torch's float64 results of the same run),
    ember no farther from the exact result than ``factor`` x torch's own fp32 run or 2 x rel x scale.

    The second clause is for the tails: after 50 steps, a 65k-element tensor occasionally has an
    element where two correct fp32 implementations part by a few 1e-6 (Adam with amsgrad and weight
    decay on ~1 seed in 8), and centered RMSprop's sqrt(E[g^2] - E[g]^2) cancels catastrophically on
    random gradients (up to ~1e-3 apart, torch's own fp32 run as far from float64). There ember must
    be as accurate as torch, not bit-close to it.
    """
    for i, (x, y) in enumerate(zip(actual, expected)):
        scale = max(1.0, y.double().abs().max().item()) if y.numel() else 1.0
        err = _max_err(x, y)
        if err <= rel * scale:
            continue
        assert truth is not None, f"shape {tuple(y.shape)}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"
        ours, theirs = _max_err(x, truth[i]), _max_err(y, truth[i])
        assert ours <= max(factor * theirs, 2 * rel * scale), (
            f"shape {tuple(y.shape)}: {err:.3g} from torch (> {rel:g} x scale {scale:.3g}) and {ours:.3g} from "
            f"float64, more than {factor:g} x torch's own {theirs:.3g}"
        )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fp32_matches_torch(case, backend_device):
    name, kw = case
    backend, device = backend_device
    shapes = TRITON_SHAPES if backend == "triton" else SHAPES
    ps, qs, a, b, exact, c = run_pair(name, kw, backend, device, torch.float32, shapes, steps_for(backend),
                                      fp64_truth=True)
    assert_scaled_close(qs, ps, 1e-6, truth=exact)
    # the state agrees too, key for key, in torch's layout
    for p, q, t in zip(ps, qs, exact):
        sa, sb, st = a.state[p], b.state[q], c.state[t]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and sa[k].device == sb[k].device, k
            if k == "step":
                assert sa[k].item() == sb[k].item()
            else:
                assert_scaled_close([sb[k]], [sa[k]], 1e-5, truth=[st[k]])


LOW = [pytest.param((torch.bfloat16, 2e-2, 6e-2), id="bf16"), pytest.param((torch.float16, 3e-3, 1e-2), id="fp16")]


# Adam-family and RMSprop runs in fp16/bf16 are compared with ember's reference instead (test below): with
# separately rounded moments, torch's low-precision Adam drifts from any single-rounding kernel.
LOW_CASES = [1, 2, 9]


@pytest.mark.parametrize("case", [CASES[i] for i in LOW_CASES], ids=[CASE_IDS[i] for i in LOW_CASES])
@pytest.mark.parametrize("low", LOW)
def test_low_precision(case, low, backend_device):
    name, kw = case
    dtype, _, rel_torch = low
    backend, device = backend_device
    if dtype == torch.float16 and name == "RMSprop":
        # g*g underflows fp16 (and centered RMSprop's s1 - s2^2 rounds below 0): torch's and any
        # other rounding order blow up differently; those runs are compared with ember's reference.
        pytest.skip("fp16 second moments are ill-conditioned; covered by test_low_precision_against_reference")
    shapes, steps = [(), (7,), (33, 129)], 20 if backend != "triton" else 6
    torch_ps, qs, _, b = run_pair(name, kw, backend, device, dtype, shapes, steps)
    assert all(q.dtype == dtype for q in qs)
    assert all(v.dtype == dtype for st in b.state.values() for k, v in st.items() if k != "step")
    assert_scaled_close(qs, torch_ps, rel_torch)


@pytest.mark.parametrize("low", LOW)
def test_low_precision_against_reference(low, backend_device):
    dtype, rel_ref, _ = low
    backend, device = backend_device
    for name, kw in CASES[1::3]:
        ps = make_params([(7,), (33, 65)], dtype, device)
        qs = [p.clone() for p in ps]
        a = getattr(ember.optim, name)(ps, backend="reference", **kw)
        b = getattr(ember.optim, name)(qs, backend=backend, **kw)
        for _ in range(5):
            for p, q in zip(ps, qs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            a.step()
            b.step()
        # one rounding per store on both sides: at most a stray ulp apart
        assert_scaled_close(qs, ps, rel_ref / 4)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"])
def test_master_weights_track_fp32(name, backend_device):
    """bf16 parameters with master_weights=True follow an fp32 torch run of the same gradients."""
    backend, device = backend_device
    kw = dict(CASES[[c[0] for c in CASES].index(name) + 1][1])
    ps = make_params([(7,), (33, 65)], torch.bfloat16, device)
    ref = [p.float() for p in ps]
    exact = [p.double() for p in ps]  # for the ill-conditioned tails (see assert_scaled_close)
    a = getattr(torch.optim, name)(ref, **kw)
    b = getattr(ember.optim, name)(ps, backend=backend, master_weights=True, **kw)
    c = getattr(torch.optim, name)(exact, **kw)
    for _ in range(10 if backend == "triton" else 50):
        for p, r, e in zip(ps, ref, exact):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.float()
            e.grad = p.grad.double()
        a.step()
        b.step()
        c.step()
    masters = [b.state[p]["master_param"] for p in ps]
    assert_scaled_close(masters, ref, 1e-6, truth=exact)
    assert_scaled_close(ps, ref, 1e-2)
    for p, m in zip(ps, masters):
        assert torch.equal(p, m.to(torch.bfloat16))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fp64_matches_torch(case, backend, monkeypatch):
    """float64 parameters: the C++ CPU kernel has a float64 path (float64 math and state); the CUDA
    and Triton kernels send float64 groups to the reference backend. Both agree with torch's float64
    run to float64 rounding."""
    if ember._backend.why_unavailable(backend, torch.device("cpu")):
        pytest.skip(ember._backend.why_unavailable(backend, torch.device("cpu")))
    if backend == "cpu":  # the group must not be rerouted to the reference backend
        from ember.ops import optim as op

        def rerouted(*args):
            raise AssertionError("a float64 group ran on the reference backend")

        monkeypatch.setattr(op, "_step_reference", rerouted)
    name, kw = case
    # The reference path is the one fp32 runs already cover; small shapes keep it quick.
    shapes = SHAPES if backend == "cpu" else SHAPES[:-1]
    ps, qs, a, b = run_pair(name, kw, backend, "cpu", torch.float64, shapes, 20)
    assert all(q.dtype == torch.float64 for q in qs)
    assert_scaled_close(qs, ps, 1e-12)
    for p, q in zip(ps, qs):
        for k, v in a.state[p].items():
            assert b.state[q][k].dtype == v.dtype, k
            if k == "step":
                assert b.state[q][k].item() == v.item()
            else:
                assert_scaled_close([b.state[q][k]], [v], 1e-11)
