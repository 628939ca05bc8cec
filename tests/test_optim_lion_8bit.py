"""Lion (no torch counterpart) against ember's reference on every backend, and AdamW8bit: quantizer
round trips and a small model's training loss within 1% of fp32 AdamW."""
import pytest
import torch

import ember
from ember.optim import adamw8bit as q8


@pytest.mark.parametrize("kw", [dict(lr=1e-3), dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1, maximize=True)])
def test_lion_matches_reference(kw, backend_device):
    backend, device = backend_device
    shapes = [(), (7,), (33, 129)] + ([] if backend == "triton" else [(65536 + 37,)])
    ps = [torch.randn(s, device=device) for s in shapes]
    qs = [p.clone() for p in ps]
    a = ember.optim.Lion(ps, backend="reference", **kw)
    b = ember.optim.Lion(qs, backend=backend, **kw)
    for _ in range(8 if backend == "triton" else 50):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, atol=1e-6 * max(1.0, p.abs().max().item()), rtol=0)
    assert set(b.state[qs[1]]) == {"exp_avg"}


def test_lion_update_rule():
    p = torch.tensor([1.0, -1.0, 0.5])
    p.grad = torch.tensor([0.3, -0.2, 0.0])
    ember.optim.Lion([p], lr=0.1, weight_decay=0.5, backend="reference").step()
    # m = 0: u = 0.1 g, sign(u) = sign(g); p (1 - 0.05) - 0.1 sign(g)
    torch.testing.assert_close(p, torch.tensor([0.95 - 0.1, -0.95 + 0.1, 0.475]))


def test_quantizers_round_trip():
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    q, s = q8.quantize_signed(x)
    assert q.dtype == torch.int8 and s.numel() == 4
    err = (q8.dequantize_signed(q, s) - x).abs() / s.repeat_interleave(q8.BLOCK)[:1000]
    assert err.max() < 1.0 / 127
    v = x.square()
    q, s = q8.quantize_unsigned(v)
    back = q8.dequantize_unsigned(q, s)
    assert q.dtype == torch.uint8 and (back >= 0).all()
    assert ((back.sqrt() - v.sqrt()).abs() / s.sqrt().repeat_interleave(q8.BLOCK)[:1000]).max() < 2.0 / 255


def test_adamw8bit_state_size_and_layout():
    big, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(10))
    opt = q8.AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    st = opt.state[big]
    nbytes = sum(v.numel() * v.element_size() for k, v in st.items() if k != "step")
    assert nbytes <= 2 * big.numel() + 8 * (big.numel() // q8.BLOCK + 1)
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    opt2 = q8.AdamW8bit([big, small])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[big]["exp_avg"].dtype == torch.int8


def test_adamw8bit_training_loss_within_1pct():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    w_true = torch.randn(32, 1)
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(512, 1)

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 64),
                                   torch.nn.GELU(), torch.nn.Linear(64, 1))

    losses = {}
    for name, cls in (("fp32", torch.optim.AdamW), ("8bit", q8.AdamW8bit)):
        m = model()
        opt = cls(m.parameters(), lr=2e-3, weight_decay=0.01) if name == "fp32" else cls(
            m.parameters(), lr=2e-3, weight_decay=0.01, min_8bit_size=4096)
        tail = []
        for step in range(300):
            idx = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(step))
            loss = (m(x[idx]) - y[idx]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = (m(x) - y).square().mean().item()
    assert any(st["exp_avg"].dtype == torch.int8 for st in opt.state.values())
    assert abs(losses["8bit"] - losses["fp32"]) <= 0.01 * losses["fp32"] + 1e-4, losses
