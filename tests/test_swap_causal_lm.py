"""ember.swap on transformers' causal LMs (issue #13 part 2): with labels in training mode the loss goes
through ember.ops.linear_cross_entropy (no logits stored) and equals transformers' own ForCausalLMLoss,
gradients included; without labels, in eval mode or with skip_logits=False the model computes exactly
what it did; models whose head or loss ember does not know (soft-capping, MoE auxiliary losses, a custom
loss_function, hooks) are reported and left alone; unswap removes the patch."""
import pytest
import torch

tf = pytest.importorskip("transformers")

import ember  # noqa: E402
from ember.swap import causal_lm  # noqa: E402

VOCAB = 211  # odd, so no vocabulary chunk lines up with a power of two
SMALL = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _build(name):
    torch.manual_seed(0)
    if name == "GPT2LMHeadModel":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=1, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        return tf.GPT2LMHeadModel(cfg)
    if name in ("GPTJForCausalLM", "CodeGenForCausalLM"):
        cfg_cls = getattr(tf, name.replace("ForCausalLM", "Config"))
        return getattr(tf, name)(cfg_cls(vocab_size=VOCAB, n_embd=48, n_layer=1, n_head=4, rotary_dim=8,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                         eos_token_id=None))
    cfg_cls = getattr(tf, name.replace("ForCausalLM", "Config"))
    extra = {"head_dim": 12} if name.startswith("Gemma") or name.startswith("Qwen3") else {}
    return getattr(tf, name)(cfg_cls(**SMALL, **extra))


FUSED = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
         "GPT2LMHeadModel", "GPTJForCausalLM", "CodeGenForCausalLM"]


def _data(batch=2, seq=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt the loss ignores
    return ids, labels


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(kw.pop("ids"), **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FUSED)
def test_fused_loss_equals_transformers_loss(name):
    model = _build(name).train()
    ids, labels = _data()
    ref, ref_grads = _loss_and_grads(model, ids=ids, labels=labels)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = ember.swap(model)
    assert [r.name for r in report.replaced if r.rule == causal_lm.RULE] == [""]
    out, grads = _loss_and_grads(model, ids=ids, labels=labels)
    assert out.logits is None  # the point: no (tokens x vocab) logits
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the trainer's num_items_in_batch (sum / count) and a given shift_labels
    n = torch.tensor(7)
    ember.unswap(model)
    want = model(ids, labels=labels, num_items_in_batch=n).loss
    shifted = torch.randint(0, VOCAB, ids.shape)
    want_shift = model(ids, labels=labels, shift_labels=shifted).loss
    ember.swap(model)
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=n).loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(ids, labels=labels, shift_labels=shifted).loss, want_shift, rtol=1e-5, atol=1e-6)


def test_logits_come_back_when_asked_for():
    model = _build("LlamaForCausalLM").train()
    ids, labels = _data()
    ref = model(ids, labels=labels)
    ember.swap(model)
    kept = model(ids, labels=labels, skip_logits=False)
    torch.testing.assert_close(kept.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert model(ids).logits.shape == (2, 13, VOCAB)  # no labels: logits, no loss
    model.eval()
    ev = model(ids, labels=labels)  # eval mode: logits and loss, as before
    assert ev.logits is not None and torch.isfinite(ev.loss)
    model.train()
    assert model(ids, labels=labels, skip_logits=True).logits is None
    # return_dict=False: a tuple, the loss first
    tup = model(ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], model(ids, labels=labels).loss)


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPT2LMHeadModel", "GPTJForCausalLM"])
def test_generate_after_swap_matches(name):
    model = _build(name).eval()
    ids, _ = _data(1, 6)
    want = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ember.swap(model)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), want)


def test_unswap_restores_the_class_forward():
    model = _build("Qwen2ForCausalLM").train()
    ids, labels = _data()
    ember.swap(model)
    assert "forward" in model.__dict__
    report = ember.unswap(model)
    assert causal_lm.RULE in {r.rule for r in report.replaced}
    assert "forward" not in model.__dict__ and model(ids, labels=labels).logits is not None
    # swapping twice patches once
    ember.swap(model)
    again = ember.swap(model)
    assert not [r for r in again.replaced if r.rule == causal_lm.RULE]


@pytest.mark.parametrize("name, why", [("Gemma2ForCausalLM", "soft-capping"), ("MixtralForCausalLM", "auxiliary")])
def test_unknown_heads_are_left_alone(name, why):
    model = _build(name).train()
    report = ember.swap(model)
    assert not [r for r in report.replaced if r.rule == causal_lm.RULE]
    assert any(s.name == "" and why in s.reason for s in report.skipped), report
    assert "forward" not in model.__dict__


def test_declines_custom_loss_hooks_and_filter():
    model = _build("LlamaForCausalLM")
    model.loss_function = lambda logits, labels, **kw: logits.sum()
    assert "loss_function" in causal_lm.problem(model)
    model = _build("LlamaForCausalLM")
    h = model.register_forward_hook(lambda *a: None)
    assert "hooks" in causal_lm.problem(model)
    h.remove()
    model.lm_head.register_forward_hook(lambda *a: None)
    assert "lm_head" in causal_lm.problem(model)
    model = _build("LlamaForCausalLM")
    report = ember.swap(model, filter=lambda name, m: name != "")
    assert any(s.name == "" and "filter" in s.reason for s in report.skipped)
    model = _build("LlamaForCausalLM")
    assert not [r for r in ember.swap(model, fused_loss=False).replaced if r.rule == causal_lm.RULE]


def test_compiles_fullgraph():
    model = _build("LlamaForCausalLM").train()
    ids, labels = _data()
    want = model(ids, labels=labels).loss
    ember.swap(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, labels=labels).loss, want, rtol=1e-5, atol=1e-6)
