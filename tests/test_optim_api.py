"""ember.optim as a drop-in for torch.optim: checkpoints both ways, schedulers, tensor lr, param
groups, closures, skipped None grads, clear errors, AMP (grad_scale / found_inf, GradScaler),
capturable step counts and torch.compile."""
import copy

import pytest
import torch

import ember

NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"]
KW = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adam": dict(lr=1e-2, amsgrad=True),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
    "RMSprop": dict(lr=1e-2, momentum=0.9, centered=True),
}


def params(device="cpu"):
    return [torch.randn(s, device=device) for s in [(), (5,), (17, 9)]]


def feed(*groups):
    grads = [torch.randn_like(p) for p in groups[0]]
    for ps in groups:
        for p, g in zip(ps, grads):
            p.grad = g.clone()


def close(xs, ys, rel=1e-6):
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, atol=rel * max(1.0, y.abs().max().item()), rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["torch_to_ember", "ember_to_torch"])
def test_checkpoint_interchange(name, direction):
    ps = params()
    qs = [p.clone() for p in ps]
    first = (getattr(torch.optim, name) if direction == "torch_to_ember" else getattr(ember.optim, name))(ps, **KW[name])
    for _ in range(5):
        feed(ps)
        first.step()
    sd = copy.deepcopy(first.state_dict())  # load_state_dict may alias tensors it does not need to move
    for p, q in zip(ps, qs):
        q.copy_(p)
    second = (getattr(ember.optim, name) if direction == "torch_to_ember" else getattr(torch.optim, name))(qs, **KW[name])
    second.load_state_dict(sd)
    # layouts are identical: same group keys, same state keys / dtypes / shapes
    sd2 = second.state_dict()
    assert sd2["param_groups"][0].keys() == sd["param_groups"][0].keys()
    for k, st in sd["state"].items():
        assert {n: (v.dtype, v.shape) for n, v in st.items()} == {n: (v.dtype, v.shape) for n, v in sd2["state"][k].items()}
    for _ in range(5):
        feed(ps, qs)
        first.step()
        second.step()
    close(qs, ps)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_matches_torch(name):
    ps, qs = params(), params()
    a = getattr(torch.optim, name)(ps, **KW[name])
    b = getattr(ember.optim, name)(qs, **KW[name])
    feed(ps)
    feed(qs)
    a.step()
    b.step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert {n: (v.dtype, v.shape, v.device) for n, v in sa["state"][k].items()} == {
            n: (v.dtype, v.shape, v.device) for n, v in sb["state"][k].items()}


def test_scheduler_tensor_lr_groups_closure_none_grads():
    ps = params()
    qs = [p.clone() for p in ps]
    extra_p, extra_q = torch.randn(4), torch.zeros(4)
    extra_q.copy_(extra_p)
    a = torch.optim.AdamW([ps[0]], lr=torch.tensor(1e-2))
    b = ember.optim.AdamW([qs[0]], lr=torch.tensor(1e-2))
    a.add_param_group({"params": ps[1:], "lr": 3e-2, "weight_decay": 0.5})
    b.add_param_group({"params": qs[1:], "lr": 3e-2, "weight_decay": 0.5})
    a.add_param_group({"params": [extra_p]})
    b.add_param_group({"params": [extra_q]})
    sa, sb = torch.optim.lr_scheduler.StepLR(a, 2, 0.5), torch.optim.lr_scheduler.StepLR(b, 2, 0.5)
    for i in range(6):
        feed(ps, qs)  # extra params never get a grad: skipped, no state
        def closure_a():
            return torch.tensor(1.0)
        assert b.step(lambda: torch.tensor(2.0)).item() == 2.0
        a.step(closure_a)
        sa.step()
        sb.step()
        b.zero_grad()
        assert all(q.grad is None for q in qs)
    close(qs, ps)
    assert torch.equal(extra_q, extra_p) and extra_q not in b.state
    assert b.param_groups[1]["lr"] == a.param_groups[1]["lr"]


def test_errors():
    p = torch.randn(3, requires_grad=True)
    opt = ember.optim.Adam([p])
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    c = torch.randn(3, dtype=torch.complex64)
    c.grad = torch.randn_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        ember.optim.SGD([c], lr=0.1).step()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ember.optim.AdamW([p], lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        ember.optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="unknown backend"):
        ember.optim.SGD([p], backend="gpu")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop"])
def test_grad_scale_and_found_inf(backend, name):
    """Scaled gradients are unscaled in the kernel; found_inf skips everything, step counts too."""
    if ember._backend.why_unavailable(backend, torch.device("cpu")):
        pytest.skip(ember._backend.why_unavailable(backend, torch.device("cpu")))
    ps = params()
    qs = [p.clone() for p in ps]
    a = getattr(torch.optim, name)(ps, **KW[name])
    b = getattr(ember.optim, name)(qs, backend=backend, **KW[name])
    for i in range(4):
        feed(ps, qs)
        for q in qs:
            q.grad *= 1024.0
        b.grad_scale = torch.tensor(1024.0)
        b.found_inf = torch.tensor(1.0 if i == 2 else 0.0)
        before = [q.clone() for q in qs]
        state_before = {k: v.clone() for k, v in b.state[qs[1]].items()} if b.state else {}
        b.step()
        if i == 2:
            assert all(torch.equal(x, y) for x, y in zip(before, qs))
            for k, v in state_before.items():
                assert torch.equal(v, b.state[qs[1]][k]), k
        else:
            a.step()
    close(qs, ps)


def test_grad_scaler_end_to_end():
    """torch.amp.GradScaler drives ember.optim like torch's fused AdamW (CPU)."""
    torch.manual_seed(0)
    m1 = torch.nn.Linear(8, 4)
    m2 = torch.nn.Linear(8, 4)
    m2.load_state_dict(m1.state_dict())
    a = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    b = ember.optim.AdamW(m2.parameters(), lr=1e-2)
    s1, s2 = torch.amp.GradScaler("cpu", init_scale=2.0**8), torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(6):
        x = torch.randn(16, 8)
        for m, opt, s in ((m1, a, s1), (m2, b, s2)):
            opt.zero_grad()
            loss = m(x).square().mean() * (float("inf") if i == 3 else 1.0)
            s.scale(loss).backward()
            s.step(opt)
            s.update()
    assert s1.get_scale() == s2.get_scale()
    close(list(m2.parameters()), list(m1.parameters()))


def test_capturable_steps_on_device():
    ps = params()
    qs = [p.clone() for p in ps]
    a = torch.optim.Adam(ps, lr=1e-2)
    b = ember.optim.Adam(qs, lr=1e-2, capturable=True)
    for _ in range(5):
        feed(ps, qs)
        a.step()
        b.step()
    assert b.state[qs[0]]["step"].device == qs[0].device and b.state[qs[0]]["step"].item() == 5
    close(qs, ps)


def test_torch_compile_training_step():
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    m2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    m2.load_state_dict(m1.state_dict())
    a = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    b = ember.optim.AdamW(m2.parameters(), lr=1e-2)

    @torch.compile(backend="aot_eager")
    def train_step(x, y):
        loss = (m2(x) - y).square().mean()
        loss.backward()
        b.step()
        b.zero_grad()
        return loss

    for _ in range(3):
        x, y = torch.randn(4, 8), torch.randn(4, 1)
        (m1(x) - y).square().mean().backward()
        a.step()
        a.zero_grad()
        train_step(x, y)
    close(list(m2.parameters()), list(m1.parameters()), rel=1e-5)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Lion", "AdamW8bit"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_tensor_lr_is_never_read_on_the_host(name, backend, monkeypatch):
    # On a GPU, lr.item() would be a device sync every step and breaks CUDA-graph capture; the kernels
    # read a tensor lr through its pointer. Counting .item() calls on the lr shows it here on the CPU.
    if ember._backend.why_unavailable(backend, torch.device("cpu")):
        pytest.skip(ember._backend.why_unavailable(backend, torch.device("cpu")))
    lr = torch.tensor(1e-2)
    kw = {"momentum": 0.9} if name == "SGD" else {}
    p = torch.randn(300, requires_grad=True)
    ref = p.detach().clone().requires_grad_()
    opt = getattr(ember.optim, name)([p], lr=lr, backend=backend, **kw)
    want = getattr(ember.optim, name)([ref], lr=1e-2, backend="reference", **kw)
    calls = []
    real_item = torch.Tensor.item

    def item(t):
        if t is lr:
            calls.append(t)
        return real_item(t)

    monkeypatch.setattr(torch.Tensor, "item", item)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        ref.grad = p.grad.clone()
        opt.step()
        want.step()
    assert calls == []
    torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-6)


def test_float64_parameters_with_float32_state_are_refused():
    # The C++ kernel updates float64 parameters in float64, state included: float32 state buffers were
    # read and written as float64 past their end (heap corruption, found by tests/test_fuzz.py).
    if ember._backend.extension() is None:
        pytest.skip("needs ember._C")
    p, g = torch.randn(300, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    m, v = torch.zeros(300), torch.zeros(300)
    with pytest.raises(TypeError, match="float64 parameters need float64 state"):
        torch.ops.ember_C.optim_step("adam", [p], [g], [m], [v], [], [], [torch.tensor(0.0)],
                                     [1e-3, 0.9, 0.999, 1e-8, 0.0], 0, None, None, None)
