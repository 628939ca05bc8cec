"""ember.ops.gated_linear and the upgraded ember.nn.GatedMLP (gate and up projections in one GEMM
pass, gating in the epilogue), the Linear -> activation swap rules, and swap() on real transformers
model classes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ember
from ember.nn import GatedMLP
from ember.ops.activation import act_reference

from test_linear import DTYPES, _run, _skip_unsupported, check_close

GATED_ACTS = ["silu", "gelu", "gelu_tanh"]


def eager_gated(x, wg, wu, bg, bu, act):
    return act_reference(F.linear(x, wg, bg), act) * F.linear(x, wu, bu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((1, 17), 9), ((33, 64), 48), ((2, 3, 17), 9)], ids=str)
@pytest.mark.parametrize("act", GATED_ACTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gated_linear_forward_backward(backend_device, dtype, shape, act, bias):
    backend, device = backend_device
    _skip_unsupported(backend, dtype)
    xs, n = shape
    k = xs[-1]
    x = torch.randn(xs, device=device, dtype=dtype)
    wg, wu = (torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(2))
    bg, bu = (torch.randn(n, device=device, dtype=dtype) if bias else None for _ in range(2))
    grad = torch.randn(*xs[:-1], n, device=device, dtype=dtype)
    inputs = [x, wg, wu, bg, bu]
    ours = _run(lambda *a: ember.ops.gated_linear(*a, activation=act, backend=backend), inputs, grad)
    want = _run(lambda *a: eager_gated(*a, act), [t.double() if t is not None else None for t in inputs], grad.double())
    lp = _run(lambda *a: eager_gated(*a, act), inputs, grad)
    check_close("h", ours[0], want[0], lp[0])
    for name, g, g64, glp in zip(("dx", "dwg", "dwu", "dbg", "dbu"), ours[1], want[1], lp[1]):
        if g64 is not None:
            assert g.shape == g64.shape and g.dtype == dtype, name
            check_close(name, g, g64, glp)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_gated_opcheck(backend):
    if ember.available_backends()[backend]:
        pytest.skip(ember.available_backends()[backend])
    x = torch.randn(2, 3, 8, requires_grad=True)
    wg, wu = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    bg, bu = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.ember.gated_linear.default, (x, wg, wu, bg, bu, "silu", True, backend))
    torch.library.opcheck(torch.ops.ember.gated_linear.default, (x, wg, wu, None, None, "gelu", True, backend))


def test_gated_errors():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="same shape"):
        ember.ops.gated_linear(x, w, torch.randn(6, 8))
    with pytest.raises(ValueError, match="both b_gate and b_up or neither"):
        ember.ops.gated_linear(x, w, w, torch.randn(5), None)
    with pytest.raises(ValueError, match="activation must be one of"):
        ember.ops.gated_linear(x, w, w, activation="relu")


def test_gated_mlp_uses_the_fused_op_and_sees_optimizer_updates():
    torch.manual_seed(0)
    mlp = GatedMLP(16, 24, activation="silu")
    assert mlp._fusable()
    x = torch.randn(3, 5, 16)

    def ref():
        return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    for _ in range(2):  # after a step the next forward must read the updated weights
        out = mlp(x)
        torch.testing.assert_close(out, ref(), atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
    # A hooked projection falls back to the two-call path, which runs the hook.
    seen = []
    mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not mlp._fusable()
    torch.testing.assert_close(mlp(x), ref(), atol=1e-5, rtol=1e-5)
    assert seen


def test_gated_mlp_compile_fullgraph():
    mlp = GatedMLP(16, 24, activation="gelu_tanh", bias=True)
    x = torch.randn(4, 16, requires_grad=True)
    out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    ref = mlp.down_proj(F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Swap rules: nn.Sequential Linear -> activation pairs, BERT intermediate, GPT-2 MLP.
# ---------------------------------------------------------------------------------------------
def test_sequential_pairs_fused_and_unswapped():
    torch.manual_seed(0)
    lin1, act1, lin2, act2, lin3 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)
    inner = nn.Sequential(lin1, act1, lin2, act2, lin3)
    model = nn.Sequential(inner, nn.SiLU())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 8)
    ref = model(x)
    report = ember.swap(model)
    fused = model[0]
    assert type(fused[0]) is ember.nn.Linear and fused[0].activation == "gelu" and fused[0].weight is lin1.weight
    assert type(fused[1]) is nn.Identity and fused[2].activation == "relu" and fused[4] is lin3
    assert model.state_dict().keys() == sd.keys()
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert ("nn.Sequential", "nn.Sequential") in report.counts()
    ember.unswap(model)
    assert list(model[0]) == [lin1, act1, lin2, act2, lin3]


def _tiny(kind):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=64, max_position_embeddings=64)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=32, intermediate_size=44, **common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    gated = dict(common, hidden_size=32, intermediate_size=44, num_key_value_heads=2)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**gated))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**gated))
    raise ValueError(kind)


EXPECTED = {
    "bert": ("transformers.BertIntermediate", "ember.nn.FusedIntermediate"),
    "gpt2": ("transformers.GPT2MLP", "ember.nn.FusedConv1DMLP"),
    "llama": ("transformers.LlamaMLP", "ember.nn.GatedMLP"),
    "qwen2": ("transformers.Qwen2MLP", "ember.nn.GatedMLP"),
}


def _forward_backward(model, ids, weight):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_hf_models_swap_same_outputs_and_grads(kind):
    model = _tiny(kind).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    out0 = model(input_ids=ids)
    out0 = out0.logits if hasattr(out0, "logits") else out0.last_hidden_state
    weight = torch.randn(out0.shape, generator=torch.Generator().manual_seed(2))
    ref, ref_grads = _forward_backward(model, ids, weight)
    report = ember.swap(model)
    assert report.counts().get(EXPECTED[kind]) == 2, str(report)
    assert model.state_dict().keys() == sd.keys()
    out, grads = _forward_backward(model, ids, weight)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    ember.unswap(model)
    out2, _ = _forward_backward(model, ids, weight)
    torch.testing.assert_close(out2, ref, atol=0, rtol=0)
    names = {type(m).__name__ for m in model.modules()}
    assert not names & {"FusedIntermediate", "FusedConv1DMLP", "GatedMLP", "Identity"}
