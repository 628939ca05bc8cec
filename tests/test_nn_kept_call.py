"""The eager CPU inference call that ember.nn's fused float modules keep from one forward to the next
(nn/_kept_call.py): it is taken only while nothing it was made from has changed, and every change sends
the next forward through the whole path again. Int8Linear's own kept call is tested in
test_int8_model.py."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ember
from ember.nn import GatedMLP, Linear
from ember.nn.gated_mlp import PackedGatedMLP
from ember.nn.linear import FusedConv1DMLP

from backend_routes import under_each_backend_route

pytestmark = pytest.mark.skipif(ember._backend.extension() is None, reason="the kept call is the C++ CPU kernels'")

ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
H, I = 24, 40


def _linear():
    m = Linear(H, I, activation="gelu")
    return m, lambda x: ACT[m.activation](F.linear(x, m.weight, m.bias)), lambda: m.weight, "relu"


def _linear_without_bias():
    m = Linear.from_linear(nn.Linear(H, I, bias=False), activation="relu")
    return m, lambda x: ACT[m.activation](F.linear(x, m.weight)), lambda: m.weight, "silu"


def _gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    m = FusedConv1DMLP(GPT2MLP(I, GPT2Config(n_embd=H)), "gelu_tanh")
    return (m, lambda x: m.c_proj(ACT[m.activation](x @ m.c_fc.weight + m.c_fc.bias)), lambda: m.c_fc.weight,
            "gelu")


def _gated():
    m = GatedMLP(H, I, activation="silu")
    return m, lambda x: m.down_proj(ACT[m.activation](m.gate_proj(x)) * m.up_proj(x)), lambda: m.up_proj.weight, "gelu"


def _packed_gated():
    m = PackedGatedMLP(nn.Linear(H, 2 * I), nn.Linear(I, H), activation="silu")

    def ref(x):
        gate, up = m.gate_up_proj(x).chunk(2, dim=-1)
        return m.down_proj(ACT[m.activation](gate) * up)
    return m, ref, lambda: m.gate_up_proj.weight, "gelu_tanh"


def _t5_gated():
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    from ember.swap.gated import T5GatedDense

    m = T5GatedDense(T5DenseGatedActDense(T5Config(d_model=H, d_ff=I, feed_forward_proj="gated-gelu")), "gelu_tanh")
    return m, lambda x: m.wo(ACT[m.activation](m.wi_0(x)) * m.wi_1(x)), lambda: m.wi_0.weight, "silu"


MODULES = {"linear": _linear, "linear-no-bias": _linear_without_bias, "gpt2-mlp": _gpt2_mlp, "gated": _gated,
           "packed-gated": _packed_gated, "t5-gated": _t5_gated}


def _close(got, want, why=""):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=why or None)


@pytest.mark.parametrize("name", MODULES)
def test_the_kept_call_is_taken_only_while_nothing_it_depends_on_changed(name, monkeypatch):
    torch.manual_seed(0)
    m, ref, weight, other_activation = MODULES[name]()
    m.eval()
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        _close(m(x), ref(x))
        kept = m._kept
        assert kept is not None
        for why, xi in {"again": x, "2-D": x[0], "rows not contiguous": torch.randn(H, 7).t(),
                        "storage offset": torch.randn(40 * H)[H:].view(39, H)}.items():
            _close(m(xi), ref(xi), why)
            assert m._kept is kept, why

        weight().mul_(-1)  # an in-place update (an optimizer step): the kept call reads the weight live
        _close(m(x), ref(x), "weight edited in place")
        assert m._kept is kept
        weight().data = torch.randn_like(weight())  # another tensor behind the same Parameter
        _close(m(x), ref(x), "weight.data replaced")
        assert m._kept is not kept and m._kept is not None
        kept = m._kept
        if name == "linear-no-bias":  # a view of its first rows: the same address, another shape
            weight().data = weight().data[: I // 2]
            _close(m(x), ref(x), "weight.data replaced by a prefix view")
            assert m._kept is not kept and m(x).shape == (3, 5, I // 2)
            kept = m._kept
        m.activation = other_activation
        _close(m(x), ref(x), "activation set")
        assert m._kept is not kept

        def whole_path(why):
            _close(m(x), ref(x), why)
            assert m._kept is None, why  # the reference backend ran, and keeps no call

        under_each_backend_route("reference", monkeypatch, whole_path)
        _close(m(x), ref(x))
        assert m._kept is not None

        with pytest.raises(TypeError, match="dtype"):  # the op's own check, as without a kept call
            m(x.double())
        assert m(x[:0]).shape == ref(x[:0]).shape

        # copies and pickles drop it: it holds the original's tensors
        assert copy.deepcopy(m).__dict__.get("_kept") is None
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded.__dict__.get("_kept") is None
        _close(loaded(x), ref(x), "loaded")

    # autograd needed: the whole path, recorded, and no call kept
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    assert y.requires_grad and m._kept is None
    y.square().sum().backward()
    assert xg.grad is not None and weight().grad is not None


def test_a_hook_added_after_the_call_was_kept_still_runs():
    torch.manual_seed(0)
    m = GatedMLP(H, I)
    x = torch.randn(4, H)
    with torch.no_grad():
        m(x)
        assert m._kept is not None
        seen = []
        m.up_proj.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        _close(m(x), m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x)))
        assert seen


def test_compile_traces_the_whole_path_of_a_module_with_a_kept_call():
    torch.manual_seed(0)
    m = GatedMLP(H, I, activation="gelu")
    x = torch.randn(4, H)
    with torch.no_grad():
        want = m(x)
        assert m._kept is not None
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    _close(got, want)
