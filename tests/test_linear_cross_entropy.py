"""ember.ops.linear_cross_entropy / ember.nn.LinearCrossEntropy: loss and gradients on every backend
against torch's cross-entropy of the materialised logits in float64, the chunked paths, the edge cases
torch defines (ignored targets, all ignored, empty input, label smoothing), bad input, compile/export,
and that the CPU kernel never allocates a (tokens x vocab) tensor.

Accuracy criterion (as tests/test_linear.py): the error against float64 is at most twice plain torch's
error in the same dtype, plus a small floor.
"""
import pytest
import torch
import torch.nn.functional as F

import ember
from ember.ops.linear_cross_entropy import lce_op, reference

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]


def _skip(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend takes no float64")
    if backend == "triton" and dtype in (torch.bfloat16, torch.float16) and not torch.cuda.is_available():
        pytest.skip("low-precision Triton runs are checked on GPU (the interpreter's fp16/bf16 casts truncate)")


def _data(n, h, v, dtype, device, ignore_every=0, bias=True, scale=1.0):
    x = (torch.randn(n, h, device=device) * scale).to(dtype)
    w = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype)
    b = torch.randn(v, device=device).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        t[1::ignore_every] = -100  # never row 0, so no call has every target ignored
    return x, w, b, t


def _grads(fn, x, w, b, t, upstream=None):
    leaves = [a.detach().requires_grad_(True) if a is not None else None for a in (x, w, b)]
    loss = fn(leaves[0], leaves[1], t, leaves[2])
    g = torch.ones_like(loss) if upstream is None else upstream
    loss.backward(g)
    return loss.detach(), [a.grad if a is not None else None for a in leaves]


def _close(name, got, want64, torch_lp):
    floor = FLOOR[got.dtype if got.dtype in FLOOR else torch.float32] * max(1.0, want64.abs().max().item())
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    terr = (torch_lp.double() - want64).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * terr + floor, f"{name}: error {err:.3g} vs torch's {terr:.3g} (+{floor:.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 7, 5), (37, 19, 257), (70, 33, 1000)], ids=str)
def test_matches_torch(backend_device, dtype, reduction, smoothing, shape):
    backend, device = backend_device
    _skip(backend, dtype)
    n, h, v = shape
    x, w, b, t = _data(n, h, v, dtype, device, ignore_every=5)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ups = torch.randn(n, device=device) if reduction == "none" else None
    # chunk_size 8: several chunks and a ragged last one even at these sizes
    got, g_got = _grads(lambda *a: ember.ops.linear_cross_entropy(*a, **kw, chunk_size=8, backend=backend), x, w, b,
                        t, ups)
    want, g_want = _grads(lambda *a: reference(*a, **kw), x.double(), w.double(), b.double(), t,
                          None if ups is None else ups.double())
    lp, g_lp = _grads(lambda *a: reference(*a, **kw), x, w, b, t, ups)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == want.shape
    _close("loss", got, want, lp)
    for name, a, c, d in zip(("dx", "dw", "db"), g_got, g_want, g_lp):
        assert a.dtype == dtype and a.shape == c.shape, name
        _close(name, a, c, d)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    x, w, b, t = _data(9, 5, 11, torch.float64, "cpu", ignore_every=4)
    for reduction in ("mean", "none"):
        fn = lambda x, w, b: ember.ops.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=0.2,  # noqa: E731
                                                            chunk_size=4, backend=backend)
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_3d_noncontiguous_and_offset_inputs():
    big = torch.randn(3, 8, 40)
    x = big[1:, :, 3:25:2].transpose(0, 1)  # (8, 2, 11): non-contiguous, storage offset
    w = torch.randn(31, 11)
    t = torch.randint(0, 31, (8, 2))
    for reduction in ("mean", "none"):
        got = ember.ops.linear_cross_entropy(x, w, t, reduction=reduction)
        want = reference(x.double(), w.double(), t, reduction=reduction)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_vocab_of_one_and_4097():
    for v in (1, 4097):
        x, w, b, t = _data(5, 6, v, torch.float32, "cpu")
        got, gg = _grads(lambda *a: ember.ops.linear_cross_entropy(*a), x, w, b, t)
        want, gw = _grads(lambda *a: reference(*a), x.double(), w.double(), b.double(), t)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for a, c in zip(gg, gw):
            torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_all_ignored_and_empty_are_what_torch_gives(backend):
    x, w, b, t = _data(4, 3, 6, torch.float32, "cpu")
    t[:] = -100
    for reduction in ("mean", "sum", "none"):
        got, gg = _grads(lambda *a: ember.ops.linear_cross_entropy(*a, reduction=reduction, backend=backend), x, w, b, t)
        want, gw = _grads(lambda *a: reference(*a, reduction=reduction), x, w, b, t)
        torch.testing.assert_close(got, want, equal_nan=True)  # mean: NaN, sum: 0, none: zeros
        for a, c in zip(gg, gw):
            torch.testing.assert_close(a, c)  # zeros everywhere
    e = torch.randn(0, 3)
    for reduction in ("mean", "sum", "none"):
        got = ember.ops.linear_cross_entropy(e, w, torch.zeros(0, dtype=torch.long), b, reduction=reduction,
                                             backend=backend)
        want = reference(e, w, torch.zeros(0, dtype=torch.long), b, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)


def test_custom_ignore_index_and_uint8_targets():
    x, w, b, t = _data(10, 4, 9, torch.float32, "cpu")
    t[3] = 7
    got = ember.ops.linear_cross_entropy(x, w, t, b, ignore_index=7)
    torch.testing.assert_close(got, reference(x, w, t, b, ignore_index=7))
    t8 = torch.randint(0, 9, (10,), dtype=torch.uint8)
    torch.testing.assert_close(ember.ops.linear_cross_entropy(x, w, t8, b), reference(x, w, t8.long(), b))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_of_range_targets_raise_torchs_index_error(backend):
    x, w, b, t = _data(6, 4, 9, torch.float32, "cpu")
    for bad in (9, -3):
        t[2] = bad
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            ember.ops.linear_cross_entropy(x, w, t, b, backend=backend)
        with pytest.raises(IndexError):
            F.cross_entropy(F.linear(x, w, b), t)


def test_bad_arguments_name_themselves():
    x, w, b, t = _data(6, 4, 9, torch.float32, "cpu")
    f = ember.ops.linear_cross_entropy
    with pytest.raises(ValueError, match="weight"):
        f(x, torch.randn(9, 5), t)
    with pytest.raises(TypeError, match="weight"):
        f(x, w.double(), t)
    with pytest.raises(ValueError, match="bias"):
        f(x, w, t, torch.randn(8))
    with pytest.raises(TypeError, match="target"):
        f(x, w, t.int())
    with pytest.raises(ValueError, match="target"):
        f(x, w, t[:5])
    with pytest.raises(ValueError, match="reduction"):
        f(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        f(x, w, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="x"):
        f(x.long(), w, t)
    with pytest.raises(ValueError, match="chunk_size"):
        f(x, w, t, chunk_size=0)


def test_nan_logits_give_nan_loss_like_torch():
    x, w, b, t = _data(5, 4, 9, torch.float32, "cpu", bias=False)
    x[2, 1] = float("nan")
    got = ember.ops.linear_cross_entropy(x, w, t, reduction="none")
    want = reference(x, w, t, reduction="none")
    torch.testing.assert_close(got, want, equal_nan=True)


def test_no_grad_computes_the_loss_only_and_keeps_nothing():
    x, w, b, t = _data(16, 8, 50, torch.float32, "cpu")
    with torch.no_grad():
        got = ember.ops.linear_cross_entropy(x, w, t, b)
    assert not got.requires_grad
    loss, dx, dw, db = lce_op(x, w, b, t, -100, "mean", 0.0, False, False, False, 0, "cpu")
    assert dx.numel() == dw.numel() == db.numel() == 0
    torch.testing.assert_close(loss, reference(x, w, t, b))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_upstream_gradient_scales_and_retained_graphs_stay_correct(scale):
    # an upstream gradient of 1 hands the saved gradients on uncopied: a second backward through a
    # retained graph, and gradients accumulated over both, must still be exact
    x, w, b, t = _data(20, 8, 50, torch.float32, "cpu")
    runs = []
    for fn in (reference, ember.ops.linear_cross_entropy):
        leaves = [a.detach().requires_grad_(True) for a in (x, w, b)]
        loss = fn(leaves[0], leaves[1], t, leaves[2]) * scale
        loss.backward(retain_graph=True)
        first = [a.grad.clone() for a in leaves]
        loss.backward()
        runs.append((first, [a.grad for a in leaves]))
    (ref_first, ref_both), (first, both) = runs
    for got, want in zip(first + both, ref_first + ref_both):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for one, two in zip(first, both):
        torch.testing.assert_close(two, 2 * one, rtol=1e-5, atol=1e-6)


def test_weight_tied_with_an_embedding_accumulates_both_gradients():
    emb = torch.nn.Embedding(40, 8)
    ids = torch.randint(0, 40, (3, 6))
    grads = []
    for fn in (lambda h, t: reference(h, emb.weight, t), lambda h, t: ember.ops.linear_cross_entropy(h, emb.weight, t)):
        emb.zero_grad()
        h = emb(ids) * 1.5
        loss = fn(h, ids)
        loss.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_and_export_see_one_op():
    x, w, b, t = _data(12, 8, 30, torch.float32, "cpu")

    def f(x, w, b, t):
        return ember.ops.linear_cross_entropy(x, w, t, b)

    want, gw = _grads(lambda x, w, t, b: f(x, w, b, t), x, w, b, t)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, gg = _grads(lambda x, w, t, b: cf(x, w, b, t), x, w, b, t)
    torch.testing.assert_close(got, want)
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c)
    class Head(torch.nn.Module):
        def forward(self, x, w, b, t):
            return f(x, w, b, t)

    graph = torch.export.export(Head(), (x, w, b, t)).graph_module.code
    assert "ember.linear_cross_entropy" in graph


def test_cpu_kernel_never_allocates_tokens_x_vocab():
    n, h, v = 512, 16, 4096  # full logits: 8 MB; a chunk here is 64 rows (1 MB)
    x, w, b, t = _data(n, h, v, torch.float32, "cpu")
    x.requires_grad_(True)
    w.requires_grad_(True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ember.ops.linear_cross_entropy(x, w, t, chunk_size=64).backward()
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    full = n * v * 4
    # the largest single allocation is the (vocab, hidden) dW or one chunk, never the whole logits
    assert 0 < biggest <= max(64 * v * 4, v * h * 4) < full, (biggest, full)


def test_module_shares_the_linear_parameters():
    lin = torch.nn.Linear(8, 30)
    head = ember.nn.LinearCrossEntropy.from_linear(lin, label_smoothing=0.1)
    assert head.weight is lin.weight and head.bias is lin.bias
    assert list(head.state_dict()) == ["weight", "bias"]
    x, t = torch.randn(4, 5, 8), torch.randint(0, 30, (4, 5))
    torch.testing.assert_close(head(x, t), reference(x, lin.weight, t, lin.bias, label_smoothing=0.1))
    fresh = ember.nn.LinearCrossEntropy(8, 30, bias=False, reduction="none")
    assert fresh(x, t).shape == (4, 5) and fresh.bias is None
    with pytest.raises(ValueError, match="reduction"):
        ember.nn.LinearCrossEntropy(8, 30, reduction="avg")
