"""ember::adamw8bit_step's kernels (C++ CPU, Triton, CUDA) against its pure-PyTorch reference.

Every backend performs the reference's fp32 operations in the same order with correctly rounded
divisions and square roots and round-half-to-even, so the contract tested here is exact: the same
parameters, int8 / uint8 codes and fp32 absmax bit for bit, step after step (a rounding tie could
otherwise flip a code by one and the runs would drift apart)."""
import pytest
import torch

import ember
from ember.ops import optim8bit as op8
from ember.optim import AdamW8bit

SHAPES = [(), (1,), (0,), (7,), (255,), (257,), (3, 5, 7), (4097,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(shapes, dtype, device, backend, **kw):
    ps = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    qs = [p.clone() for p in ps]
    # min_8bit_size=2: () and (1,) keep fp32 moments (ember::optim_step's Adam), the rest are 8-bit
    kw = dict(min_8bit_size=2, weight_decay=0.1) | kw
    return ps, qs, AdamW8bit(ps, backend="reference", **kw), AdamW8bit(qs, backend=backend, **kw)


def _grads(ps, qs, scale=1.0):
    for p, q in zip(ps, qs):
        # gradients over several decades, as moments see them in training
        p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-4, 2, ()).item()
        q.grad = p.grad * scale


def _assert_same(a, b, ps, qs):
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=0, atol=0, equal_nan=True)
        sa, sb = a.state[p], b.state[q]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            torch.testing.assert_close(sb[k].cpu(), sa[k].cpu(), rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_bit_for_bit(backend_device, dtype):
    backend, device = backend_device
    ps, qs, a, b = _pair(SHAPES, dtype, device, backend)
    for _ in range(3 if backend == "triton" else 6):
        _grads(ps, qs)
        a.step()
        b.step()
        _assert_same(a, b, ps, qs)
    assert b.state[qs[-1]]["exp_avg"].dtype == torch.int8 and b.state[qs[0]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(maximize=True, betas=(0.8, 0.95), eps=1e-6), dict(weight_decay=0.0),
                                dict(lr=torch.tensor(3e-3))], ids=["maximize", "no-decay", "tensor-lr"])
def test_options(backend_device, kw):
    backend, device = backend_device
    ps, qs, a, b = _pair([(7,), (300,), (2, 700)], torch.float32, device, backend, **kw)
    for _ in range(2 if backend == "triton" else 4):
        _grads(ps, qs)
        a.step()
        b.step()
    _assert_same(a, b, ps, qs)


def test_amp_found_inf_and_grad_scale(backend_device):
    backend, device = backend_device
    ps, qs, a, b = _pair([(5,), (600,)], torch.float32, device, backend)
    _grads(ps, qs)
    a.step()
    b.step()
    before = [q.clone() for q in qs], {k: v.clone() for k, v in b.state[qs[1]].items()}
    # A skipped step changes nothing, step counts included.
    b.found_inf = torch.ones((), device=device)
    _grads(ps, qs)
    b.step()
    for q, q0 in zip(qs, before[0]):
        assert torch.equal(q, q0)
    for k, v in b.state[qs[1]].items():
        assert torch.equal(v, before[1][k]), k
    # grad_scale divides the gradients (a power of two, as GradScaler's, so exactly).
    b.found_inf = torch.zeros((), device=device)
    b.grad_scale = torch.full((), 1024.0, device=device)
    _grads(ps, qs, scale=1024.0)
    a.step()
    b.step()
    _assert_same(a, b, ps, qs)


def test_state_dict_interchange(backend_device):
    backend, device = backend_device
    ps, qs, a, b = _pair([(1,), (513,), (40, 30)], torch.bfloat16, device, backend)
    _grads(ps, qs)
    a.step()
    b.step()
    # Continue b's run on the reference backend and a's on `backend`: states are interchangeable.
    a2 = AdamW8bit(ps, backend=backend, min_8bit_size=2, weight_decay=0.1)
    b2 = AdamW8bit(qs, backend="reference", min_8bit_size=2, weight_decay=0.1)
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    st = a2.state[ps[1]]
    assert (st["exp_avg"].dtype, st["exp_avg_sq"].dtype, st["exp_avg_absmax"].dtype) == (
        torch.int8, torch.uint8, torch.float32)
    assert a2.state[ps[0]]["exp_avg"].dtype == torch.float32  # not cast to the bf16 parameter's dtype
    _grads(ps, qs)
    a2.step()
    b2.step()
    _assert_same(a2, b2, ps, qs)


def test_backend_choice_and_non_contiguous(monkeypatch):
    seen = []
    real = op8.adamw8bit_step

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(op8, "adamw8bit_step", spy)
    p = torch.randn(600)
    t = torch.randn(100, 70).t()  # dense but not contiguous: blocks follow the logical order
    p.grad, t.grad = torch.randn_like(p), torch.randn_like(t)
    ref_t = t.detach().clone()
    ref_t.grad = t.grad.clone()
    opt = AdamW8bit([p, t], min_8bit_size=2)
    with ember.backend("reference"):
        opt.step()
    assert set(seen) == {"reference"}
    seen.clear()
    opt.step()  # auto on CPU: the C++ kernel, the transposed tensor on the reference
    assert sorted(seen) == ["cpu", "reference"]
    ref = AdamW8bit([ref_t], min_8bit_size=2, backend="reference")
    ref.step()
    ref.step()
    assert torch.equal(t, ref_t) and torch.equal(opt.state[t]["exp_avg"], ref.state[ref_t]["exp_avg"])


def test_bad_arguments_are_named():
    p = torch.randn(300)
    g = torch.randn(300)
    good = [torch.zeros(300, dtype=torch.int8), torch.zeros(300, dtype=torch.uint8), torch.zeros(2), torch.zeros(2)]
    hyper = [1e-3, 0.9, 0.999, 1e-8, 0.0]
    for backend in ("cpu", "triton"):
        bad = list(good)
        bad[1] = torch.zeros(300, dtype=torch.int8)
        with pytest.raises((RuntimeError, ValueError, TypeError), match="exp_avg_sq"):
            op8.adamw8bit_step([p], [g], *([t] for t in bad), [], hyper, 2, None, None, None, backend)
        bad = list(good)
        bad[2] = torch.zeros(3)
        with pytest.raises((RuntimeError, ValueError, TypeError), match="exp_avg_absmax"):
            op8.adamw8bit_step([p], [g], *([t] for t in bad), [], hyper, 2, None, None, None, backend)


def test_nan_moment_makes_its_block_absmax_nan(backend_device):
    # torch.amax propagates NaN, so the reference's absmax of a block holding a NaN moment is NaN; the
    # kernels must agree (a GPU's plain max instruction drops NaN: Triton reduces with
    # propagate_nan=ALL). The other blocks stay finite.
    backend, device = backend_device
    ps, qs, a, b = _pair([(600,)], torch.float32, device, backend, min_8bit_size=1)
    _grads(ps, qs)
    for t in (ps[0], qs[0]):
        t.grad[300] = float("nan")
    a.step()
    b.step()
    for opt, p in ((a, ps[0]), (b, qs[0])):
        am = opt.state[p]["exp_avg_absmax"].cpu()
        assert am[1].isnan() and am[0].isfinite() and am[2].isfinite(), am
    torch.testing.assert_close(qs[0], ps[0], rtol=0, atol=0, equal_nan=True)
    sa, sb = a.state[ps[0]], b.state[qs[0]]
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        torch.testing.assert_close(sb[k].cpu(), sa[k].cpu(), rtol=0, atol=0, equal_nan=True)
    keep = torch.ones(600, dtype=torch.bool)
    keep[256:512] = False  # the NaN block's codes are unspecified (NaN -> int cast)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(sb[k].cpu()[keep], sa[k].cpu()[keep], rtol=0, atol=0)
