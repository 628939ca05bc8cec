"""ember.ops.grouped_gated_mlp / ember.nn.GatedExperts: every expert's gated MLP over rows sorted by
expert, forward and backward, on the C++ CPU kernel, the Triton kernel (interpreted on CPU tensors; on
the GPU where there is one) and the reference, against float64 eager torch
(a loop over experts, as transformers' eager experts), with empty experts, rows past the last offset,
non-contiguous inputs, opcheck, gradcheck, torch.compile, and bad input.

Accuracy criterion (as tests/test_linear.py): the op's error against float64 is at most twice plain
PyTorch's error in the same dtype, plus a small floor.
"""
import pytest
import torch
import torch.nn.functional as F

import ember
from ember.ops.activation import act_reference

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16"), pytest.param(torch.float64, id="fp64")]
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
BACKENDS = ["cpu", "triton", "reference"]
# Test ids name the Triton kernel's device ("triton-cuda" on a GPU: what scripts/gpu_check.sh selects).
BACKEND_PARAMS = ["cpu", pytest.param("triton", id="triton-cuda" if torch.cuda.is_available() else "triton-cpu"),
                  "reference"]
# (experts, hidden, intermediate, rows per expert): one row, odd widths, an empty expert in the middle
# and at the ends, a wide one, and 1023 + 3074 = 4097 rows (past the kernels' work grain).
CASES = [(1, 7, 5, [1]), (3, 17, 9, [4, 0, 7]), (4, 16, 33, [0, 5, 1, 0]), (2, 64, 48, [70, 33]),
         (2, 7, 9, [1023, 3074])]


def _skip(backend, dtype=None):
    reason = ember.available_backends()[backend]
    if reason:
        pytest.skip(reason)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's tl.dot has no float64")
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's tl.dot returns garbage for bfloat16 inputs; bf16 is tested on GPU")


def _device(backend):
    """Where a backend's tensors live: the Triton kernels on the GPU when there is one."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def eager(x, w_gate_up, w_down, counts, act, tail=0):
    """What transformers' eager experts compute, expert by expert (rows already grouped)."""
    inter = w_gate_up.shape[1] // 2
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        gate, up = F.linear(xe, w_gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(act_reference(gate, act) * up, w_down[e]))
        start += n
    outs.append(x.new_zeros(tail, w_down.shape[1]))
    assert w_gate_up.shape[1] == 2 * inter
    return torch.cat(outs)


def check_close(name, got, want64, torch_lp):
    floor = FLOOR[got.dtype] * max(1.0, want64.abs().max().item())
    err = (got.double() - want64).abs().max().item()
    torch_err = (torch_lp.double() - want64).abs().max().item()
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} vs torch's {torch_err:.3g} (+{floor:.3g})"


def _inputs(experts, hidden, inter, counts, dtype, tail=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + tail
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    offsets = torch.tensor(counts).cumsum(0)
    grad = torch.randn(rows, hidden, generator=g).to(dtype)
    return x, w_gate_up, w_down, offsets, grad


def _run(fn, tensors, grad):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(grad)
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("act", ember.activations.GATED)
def test_forward_backward(backend, dtype, case, act):
    _skip(backend, dtype)
    experts, hidden, inter, counts = case
    if backend == "triton" and not torch.cuda.is_available() and sum(counts) > 1000 and (act, dtype) != ("silu",
                                                                                                      torch.float32):
        pytest.skip("the interpreter takes ~12 s for 4097 rows: one activation and dtype there (the others above)")
    tail = 2 if len(counts) == 3 else 0  # rows past the last offset: zero out, zero dx
    x, wgu, wd, offsets, grad = _inputs(experts, hidden, inter, counts, dtype, tail)
    dev = _device(backend)
    ours = _run(lambda x, a, b: ember.ops.grouped_gated_mlp(x, a, b, offsets.to(dev), activation=act, backend=backend),
                [t.to(dev) for t in (x, wgu, wd)], grad.to(dev))
    ours = (ours[0].cpu(), [g.cpu() for g in ours[1]])
    want = _run(lambda x, a, b: eager(x, a, b, counts, act, tail), [t.double() for t in (x, wgu, wd)], grad.double())
    lp = _run(lambda x, a, b: eager(x, a, b, counts, act, tail), [x, wgu, wd], grad)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    check_close("out", ours[0], want[0], lp[0])
    for name, g, g64, glp in zip(("dx", "dw_gate_up", "dw_down"), ours[1], want[1], lp[1]):
        assert g.shape == g64.shape and g.dtype == dtype, name
        check_close(name, g, g64, glp)
    if tail:
        assert (ours[0][-tail:] == 0).all() and (ours[1][0][-tail:] == 0).all()
    empty = [e for e, n in enumerate(counts) if n == 0]
    for e in empty:  # an expert with no rows gets exactly zero weight gradients
        assert (ours[1][1][e] == 0).all() and (ours[1][2][e] == 0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_non_contiguous_weights_int32_offsets_and_no_rows(backend):
    _skip(backend)
    if backend == "triton":  # the same layouts in fp32 (no fp64 tl.dot), on its own device
        return _non_contiguous_fp32_triton()
    x, wgu, wd, offsets, grad = _inputs(3, 12, 10, [3, 5, 2], torch.float64)
    # transposed storage for both weights, x as a column slice, offsets as int32
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)
    x_wide = torch.randn(x.shape[0], 30, dtype=torch.float64)
    x_wide[:, 5:17] = x
    x_view = x_wide[:, 5:17]
    out = ember.ops.grouped_gated_mlp(x_view, wgu_t, wd_t, offsets.int(), backend=backend)
    torch.testing.assert_close(out, eager(x, wgu, wd, [3, 5, 2], "silu"), atol=1e-12, rtol=1e-12)
    column_major = x.t().contiguous().t()  # stride (1, rows): the kernel reads it as it is
    torch.testing.assert_close(ember.ops.grouped_gated_mlp(column_major, wgu, wd, offsets, backend=backend),
                               eager(x, wgu, wd, [3, 5, 2], "silu"), atol=1e-12, rtol=1e-12)
    none = ember.ops.grouped_gated_mlp(torch.randn(0, 12, dtype=torch.float64), wgu, wd, torch.zeros(3, dtype=torch.long),
                                       backend=backend)
    assert none.shape == (0, 12)
    unrouted = ember.ops.grouped_gated_mlp(x, wgu, wd, torch.zeros(3, dtype=torch.long), backend=backend)
    assert (unrouted == 0).all()


def _non_contiguous_fp32_triton():
    dev = _device("triton")
    x, wgu, wd, offsets, grad = _inputs(3, 12, 10, [3, 5, 2], torch.float32)
    want = eager(x.double(), wgu.double(), wd.double(), [3, 5, 2], "silu")
    x, wgu, wd, grad = (t.to(dev) for t in (x, wgu, wd, grad))
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)
    x_wide = torch.randn(x.shape[0], 30, device=dev)
    x_wide[:, 5:17] = x
    for xv, a, b in ((x_wide[:, 5:17], wgu_t, wd_t), (x.t().contiguous().t(), wgu, wd)):
        xv, a, b = (t.detach().requires_grad_() for t in (xv, a, b))
        out = ember.ops.grouped_gated_mlp(xv, a, b, offsets.int(), backend="triton")  # CPU int32 offsets
        torch.testing.assert_close(out.double().cpu(), want, atol=2e-5, rtol=2e-5)
        out.backward(grad)
        ref = [t.detach().double().cpu().requires_grad_() for t in (x, wgu, wd)]
        eager(*ref, [3, 5, 2], "silu").backward(grad.double().cpu())
        for got, r in zip((xv.grad, a.grad, b.grad), ref):
            torch.testing.assert_close(got.double().cpu(), r.grad, atol=2e-5, rtol=2e-5)
    empty = torch.zeros(3, dtype=torch.long, device=dev)
    assert ember.ops.grouped_gated_mlp(torch.randn(0, 12, device=dev), wgu, wd, empty, backend="triton").shape == (0, 12)
    assert (ember.ops.grouped_gated_mlp(x, wgu, wd, empty, backend="triton") == 0).all()


def test_kernel_matches_reference_bitwise_close_and_threads():
    x, wgu, wd, offsets, _ = _inputs(8, 64, 96, [40, 0, 13, 77, 1, 9, 0, 60], torch.float32)
    ref = ember.ops.grouped_gated_mlp(x.double(), wgu.double(), wd.double(), offsets, backend="reference")
    threads = torch.get_num_threads()
    outs = []
    for n in (1, threads):
        torch.set_num_threads(n)
        try:
            outs.append(ember.ops.grouped_gated_mlp(x, wgu, wd, offsets, backend="cpu"))
        finally:
            torch.set_num_threads(threads)
    for out in outs:
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend):
    _skip(backend)
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("opcheck runs the CPU tensors below; test_forward_backward covers the GPU")
    x, wgu, wd, offsets, _ = _inputs(3, 8, 6, [2, 0, 3], torch.float32, tail=1)
    args = (x.requires_grad_(), wgu.requires_grad_(), wd.requires_grad_(), offsets)
    torch.library.opcheck(torch.ops.ember.grouped_gated_mlp.default, (*args, "silu", True, backend))
    torch.library.opcheck(torch.ops.ember.grouped_gated_mlp.default,
                          (x.detach(), wgu.detach(), wd.detach(), offsets, "gelu", False, backend))


def test_gradcheck_fp64():
    x, wgu, wd, offsets, _ = _inputs(3, 5, 4, [2, 0, 3], torch.float64, tail=1)
    for backend in ("cpu", "reference"):  # Triton: no float64 tl.dot
        torch.autograd.gradcheck(
            lambda x, a, b: ember.ops.grouped_gated_mlp(x, a, b, offsets, activation="gelu_tanh", backend=backend),
            (x.requires_grad_(), wgu.requires_grad_(), wd.requires_grad_()))


def test_gated_experts_module_matches_transformers_and_compiles():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    theirs = MixtralExperts(cfg)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = ember.nn.GatedExperts.from_module(theirs, "silu")
    assert ours.gate_up_proj is theirs.gate_up_proj and ours.down_proj is theirs.down_proj
    tokens = 23
    hidden = torch.randn(tokens, 32)
    top_k_index = torch.stack([torch.randperm(5)[:2] for _ in range(tokens)])
    top_k_index[:4] = 3  # one expert gets several (token, choice) rows of the same tokens
    top_k_index[:4, 1] = 1
    top_k_weights = torch.rand(tokens, 2).softmax(-1)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    want, got = theirs(h1, top_k_index, top_k_weights), ours(h2, top_k_index, top_k_weights)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    want.square().sum().backward()
    g_theirs = [p.grad.clone() for p in (theirs.gate_up_proj, theirs.down_proj)]
    for p in (theirs.gate_up_proj, theirs.down_proj):
        p.grad = None
    got.square().sum().backward()
    for g, p in zip(g_theirs, (ours.gate_up_proj, ours.down_proj)):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-5)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, top_k_index, top_k_weights), want.detach(), atol=1e-6, rtol=1e-5)


def test_errors():
    x, wgu, wd, offsets, _ = _inputs(3, 8, 6, [2, 1, 3], torch.float32)
    op = ember.ops.grouped_gated_mlp
    with pytest.raises(TypeError, match="w_gate_up must have x's dtype"):
        op(x, wgu.double(), wd, offsets)
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[None], wgu, wd, offsets)
    with pytest.raises(ValueError, match="w_gate_up must be"):
        op(x, wgu[:, :-1], wd, offsets)
    with pytest.raises(ValueError, match="w_down must be"):
        op(x, wgu, wd[:, :, :-1], offsets)
    with pytest.raises(TypeError, match="offsets must be an int32 or int64"):
        op(x, wgu, wd, offsets.float())
    with pytest.raises(ValueError, match="offsets must have shape"):
        op(x, wgu, wd, offsets[:2])
    with pytest.raises(ValueError, match="activation"):
        op(x, wgu, wd, offsets, activation="relu")
    for bad in ([2, 1, 3], [2, 3, 7]):  # decreasing; past the rows
        for backend in BACKENDS:
            if ember.available_backends()[backend] or (backend == "triton" and torch.cuda.is_available()):
                continue
            with pytest.raises((RuntimeError, ValueError), match="offsets must be non-decreasing"):
                op(x, wgu, wd, torch.tensor(bad), backend=backend)
    with pytest.raises(ember.BackendError, match="unavailable"):
        op(x, wgu, wd, offsets, backend="cuda")


@pytest.mark.parametrize("backend", BACKEND_PARAMS[:2])
def test_nan_stays_in_its_row(backend):
    _skip(backend)
    x, wgu, wd, offsets, _ = _inputs(2, 8, 6, [3, 4], torch.float32)
    x[1, 2] = float("nan")
    dev = _device(backend)
    out = ember.ops.grouped_gated_mlp(x.to(dev), wgu.to(dev), wd.to(dev), offsets, backend=backend).cpu()
    assert out[1].isnan().all() and not out[[0, 2, 3, 4, 5, 6]].isnan().any()
