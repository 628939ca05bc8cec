"""Folding SmoothQuant's 1/s into the preceding norm (ember/smooth_fold.py via ember.quantize): the fold
keeps the float model's function, folded Int8Linears do no run-time smoothing, accuracy matches the
per-layer smoothing, reload works, and models whose norm output feeds anything else are left alone."""
import os

import pytest
import torch

import ember
from ember.metrics import min_cosine as _min_cos, sqnr_db  # _min_cos: the worst token's logits cosine
from ember.nn import Int8Linear
from ember.smooth_fold import find_groups, fold

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tf = pytest.importorskip("transformers")

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def _decoder(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **common))
    elif kind == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common))
    elif kind in ("opt", "opt-post-ln"):
        m = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=160, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=64,
                                           word_embed_proj_dim=64, do_layer_norm_before=kind == "opt"))
    elif kind == "phi":
        m = tf.PhiForCausalLM(tf.PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    else:
        m = tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=16, **common))
    # Random weights have no outlier channels, so smoothing would have nothing to do: give a few
    # channels of every norm a large gain (as in real LLMs, where outliers come out of the norms).
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("layernorm.weight", "layer_norm.weight")):
                p[torch.tensor([3, 17, 40])] += 25.0
            elif name.endswith(("layernorm.bias", "layer_norm.bias")):
                p.normal_(0.0, 0.5)  # a LayerNorm's bias is folded too: make it matter
    return m.eval()


def _logits(m):
    with torch.inference_mode():
        return m(IDS).logits.float()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_fold_keeps_float_function(kind):
    m = _decoder(kind)
    ref = _logits(m)
    groups = find_groups(m)
    assert [g.norm_name for g in groups] == [f"model.layers.{i}.{n}" for i in range(2)
                                             for n in ("input_layernorm", "post_attention_layernorm")]
    assert groups[0].names[-1] == "model.layers.0.self_attn.v_proj" and len(groups[1].names) == 2
    gen = torch.Generator().manual_seed(2)
    for g in groups:  # arbitrary positive s spanning two decades: the function must not move
        fold(g, torch.rand(g.norm.weight.numel(), generator=gen).mul(4).sub(2).exp())
    torch.testing.assert_close(_logits(m), ref, rtol=1e-4, atol=1e-4)


def _quantized(kind, calibrate: bool, mode="w8a8", **kw):
    m = _decoder(kind)
    if calibrate:
        with ember.quant.calibrate(m), torch.inference_mode():
            m(IDS)
    return m, ember.quantize(m, mode=mode, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_folded_accuracy_and_no_runtime_multiply(kind):
    ref = _logits(_decoder(kind))
    plain, _ = _quantized(kind, calibrate=False)
    unfolded, rep_u = _quantized(kind, calibrate=True, fold_smoothing=False)
    folded, rep_f = _quantized(kind, calibrate=True)
    outs = {k: _logits(m) for k, m in (("plain", plain), ("smooth", unfolded), ("folded", folded))}
    cos = {k: _min_cos(ref, o) for k, o in outs.items()}
    db = {k: sqnr_db(ref, o) for k, o in outs.items()}
    print(f"\ntiny {kind} (outlier norms) logits min cosine / SQNR dB vs float:",
          {k: (round(cos[k], 5), round(db[k], 1)) for k in outs})
    # One s shared by q/k/v (gate/up) instead of one per Linear costs at most a little accuracy.
    assert cos["folded"] >= cos["smooth"] - 2e-3 and db["folded"] >= db["smooth"] - 1.0, (cos, db)
    assert cos["folded"] > cos["plain"] and db["folded"] > db["plain"] + 2.0, (cos, db)
    assert not rep_u.folded and len(rep_u.smoothed) == len(rep_f.smoothed) == 2 * 7 + 1
    assert list(rep_f.folded) == [f"model.layers.{i}.{n}" for i in range(2)
                                  for n in ("input_layernorm", "post_attention_layernorm")]
    assert "10 of them folded into 4 norms" in str(rep_f)
    for i, layer in enumerate(folded.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj):
            assert isinstance(lin, Int8Linear) and lin.smooth is None
        # o_proj / down_proj read attention / activation outputs: run-time smoothing stays
        assert a.o_proj.smooth is not None and mlp.down_proj.smooth is not None
        assert unfolded.model.layers[i].self_attn.q_proj.smooth is not None


def test_folded_checkpoint_reloads_into_fresh_skeleton():
    m, _ = _quantized("llama", calibrate=True)
    sd = m.state_dict()
    assert "model.layers.0.self_attn.q_proj.smooth" not in sd and "model.layers.0.self_attn.o_proj.smooth" in sd
    fresh = _decoder("llama", seed=5)
    ember.quantize(fresh, mode="w8a8")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(_logits(fresh), _logits(m), atol=0, rtol=0)


def test_not_folded_when_structure_unknown_or_excluded():
    # post-LN encoder (BERT/MiniLM): the LayerNorm output is also the residual -> per-layer smoothing
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64)).eval()
    assert find_groups(bert) == []
    with ember.quant.calibrate(bert), torch.inference_mode():
        bert(IDS % 128)
    rep = ember.quantize(bert, mode="w8a8")
    assert not rep.folded and len(rep.smoothed) == len(rep) > 0
    # a filter that keeps k_proj float: its group (layer 0 input_layernorm) must not be folded
    _, rep = _quantized("llama", calibrate=True, filter=lambda n, m: n != "model.layers.0.self_attn.k_proj")
    assert "model.layers.0.input_layernorm" not in rep.folded and "model.layers.1.input_layernorm" in rep.folded
    # a hook on the norm could read its output: not folded
    m = _decoder("llama")
    m.model.layers[1].post_attention_layernorm.register_forward_hook(lambda *a: None)
    assert "model.layers.1.post_attention_layernorm" not in [g.norm_name for g in find_groups(m)]
    # weight-only quantization never smooths, so never folds, even when calibrated
    _, rep = _quantized("llama", calibrate=True, mode="w8a16")
    assert not rep.folded and not rep.smoothed


# LayerNorm with bias (OPT, Phi): the fold divides weight and bias by s.
_LN_GROUPS = {
    "opt": [(f"model.decoder.layers.{i}.{n}", k) for i in range(2)
            for n, k in (("self_attn_layer_norm", 3), ("final_layer_norm", 1))],
    "phi": [(f"model.layers.{i}.input_layernorm", 4) for i in range(2)],  # q/k/v and fc1 in parallel
}


@pytest.mark.parametrize("kind", ["opt", "phi"])
def test_layernorm_fold_keeps_float_function(kind):
    m = _decoder(kind)
    ref = _logits(m)
    groups = find_groups(m)
    assert [(g.norm_name, len(g.names)) for g in groups] == _LN_GROUPS[kind]
    gen = torch.Generator().manual_seed(2)
    for g in groups:
        fold(g, torch.rand(g.norm.weight.numel(), generator=gen).mul(4).sub(2).exp())
    torch.testing.assert_close(_logits(m), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["opt", "phi"])
def test_layernorm_folded_quantization(kind):
    ref = _logits(_decoder(kind))
    plain, _ = _quantized(kind, calibrate=False)
    unfolded, _ = _quantized(kind, calibrate=True, fold_smoothing=False)
    folded, rep = _quantized(kind, calibrate=True)
    cos = {k: _min_cos(ref, _logits(m)) for k, m in (("plain", plain), ("smooth", unfolded), ("folded", folded))}
    print(f"\ntiny {kind} (outlier LayerNorms) logits min cosine vs float:", {k: round(v, 5) for k, v in cos.items()})
    assert cos["folded"] >= cos["smooth"] - 2e-3 and cos["folded"] > cos["plain"], cos
    assert list(rep.folded) == [n for n, _ in _LN_GROUPS[kind]]
    for name in (n for names in rep.folded.values() for n in names):
        assert folded.get_submodule(name).smooth is None
    # reload into a fresh skeleton: the folded norms travel in the state_dict
    fresh = _decoder(kind, seed=5)
    ember.quantize(fresh, mode="w8a8")
    fresh.load_state_dict(folded.state_dict())
    torch.testing.assert_close(_logits(fresh), _logits(folded), atol=0, rtol=0)


def test_post_ln_opt_is_not_folded():
    m = _decoder("opt-post-ln")
    assert find_groups(m) == []
