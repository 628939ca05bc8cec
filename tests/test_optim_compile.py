"""ember.optim inside torch.compile and under CUDA graph capture.

Compiled steps are compared with eager ember (same backend: must match to rounding, the kernel is
the same) and with torch.optim (to the usual fp32 tolerance). ``aot_eager`` keeps the test fast: the
optimizer step is one opaque custom op either way, so inductor would compile only the model around it.
The CUDA-graph test captures ``opt.step()`` with ``capturable=True`` (step counts on the device) and
replays it with new gradients copied into the captured gradient tensors; it needs a GPU and is
skipped without one.
"""
import pytest
import torch

import ember

# (name, kwargs); torch has no Lion: eager ember is its only comparison.
CASES = [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]
IDS = [c[0] for c in CASES]
SHAPES = [(), (7,), (33, 65)]


def _backend_or_skip(backend, device):
    reason = ember._backend.why_unavailable(backend, torch.device(device))
    if reason:
        pytest.skip(reason)


def _close(xs, ys, rel):
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, atol=rel * max(1.0, y.abs().max().item()), rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_step_fullgraph(case, backend):
    """torch.compile(opt.step, fullgraph=True): one graph, no breaks, same results as eager."""
    _backend_or_skip(backend, "cpu")
    name, kw = case
    torch._dynamo.reset()
    ps = [torch.randn(s) for s in SHAPES]
    eager_ps, torch_ps = [p.clone() for p in ps], [p.clone() for p in ps]
    compiled = getattr(ember.optim, name)(ps, backend=backend, **kw)
    eager = getattr(ember.optim, name)(eager_ps, backend=backend, **kw)
    ref = getattr(torch.optim, name)(torch_ps, **kw) if hasattr(torch.optim, name) else None
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ps]
        for group in (ps, eager_ps, torch_ps):
            for p, g in zip(group, grads):
                p.grad = g.clone()
        step()
        eager.step()
        if ref is not None:
            ref.step()
    _close(ps, eager_ps, 1e-7)
    for p, q in zip(ps, eager_ps):
        for k, v in eager.state[q].items():
            _close([compiled.state[p][k]], [v], 1e-7)
    if ref is not None:
        _close(ps, torch_ps, 1e-6)


@pytest.mark.parametrize("name,compiler", [("AdamW", "aot_eager"), ("SGD", "aot_eager"), ("Lion", "aot_eager"),
                                           ("AdamW", "inductor")])
def test_compiled_training_step(name, compiler):
    """forward + backward + opt.step() + zero_grad() in one compiled function (graph breaks allowed
    around backward), against the same model trained eagerly with ember and with torch. One inductor
    case (~10 s: it generates and compiles C++ for the model) checks that inductor leaves the step's
    custom op and its in-place state updates intact; its fused model code rounds differently, hence
    the looser tolerance there."""
    kw = dict(CASES[IDS.index(name)][1])
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    compiled_opt = getattr(ember.optim, name)(models[0].parameters(), **kw)
    eager_opt = getattr(ember.optim, name)(models[1].parameters(), **kw)
    torch_opt = getattr(torch.optim, name)(models[2].parameters(), **kw) if hasattr(torch.optim, name) else None

    def train_step(model, opt, x, y):
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled_step = torch.compile(train_step, backend=compiler)
    tol = 1e-6 if compiler == "aot_eager" else 1e-5
    for _ in range(4):
        x, y = torch.randn(5, 8), torch.randn(5, 1)
        l0 = compiled_step(models[0], compiled_opt, x, y)
        l1 = train_step(models[1], eager_opt, x, y)
        torch.testing.assert_close(l0, l1, rtol=tol, atol=tol / 10)
        if torch_opt is not None:
            train_step(models[2], torch_opt, x, y)
    _close(list(models[0].parameters()), list(models[1].parameters()), tol)
    if torch_opt is not None:
        _close(list(models[0].parameters()), list(models[2].parameters()), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("name", ["AdamW", "Adam", "RMSprop", "SGD", "Lion"])
def test_cuda_graph_capture(name):
    """opt.step() captured once in a torch.cuda.graph and replayed with fresh gradients equals eager
    steps. Adam / AdamW / RMSprop need capturable=True (step counts on the device, advanced by the
    kernel on every replay); SGD and Lion keep no step count."""
    _backend_or_skip("cuda", "cuda")
    kw = dict(CASES[IDS.index(name)][1])
    if name in ("Adam", "AdamW", "RMSprop"):
        kw["capturable"] = True
    device = "cuda"
    shapes = SHAPES + [(4097,), (65536 + 37,)]
    ps = [torch.randn(s, device=device) for s in shapes]
    qs = [p.clone() for p in ps]
    eager = getattr(ember.optim, name)(ps, backend="cuda", **kw)
    graphed = getattr(ember.optim, name)(qs, backend="cuda", **kw)
    for q in qs:  # the captured step reads these very tensors on every replay
        q.grad = torch.zeros_like(q)

    def new_grads():
        grads = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, qs, grads):
            p.grad = g.clone()
            q.grad.copy_(g)

    # Warm-up on a side stream (creates the state, SGD's first momentum step), as torch.cuda.graphs
    # asks for, then capture one step.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            new_grads()
            eager.step()
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    # Capture records the step without running it: eager is still in step with the graphed copy.
    for _ in range(6):
        new_grads()
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    _close(qs, ps, 1e-6)
    for p, q in zip(ps, qs):
        for k, v in eager.state[p].items():
            _close([graphed.state[q][k].float()], [v.float()], 1e-5)
