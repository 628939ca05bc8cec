"""ONNX export of models that use ember's ops: each ``ember::`` op written in standard ONNX ops.

    import ember, ember.onnx
    ember.swap(model)                                        # or ember.quantize(model, mode="w8a8")
    ember.onnx.export(model, (input_ids,), "model.onnx")     # torch.onnx.export(dynamo=True) + the table
    # or, by hand:
    torch.onnx.export(model, args, dynamo=True, custom_translation_table=ember.onnx.translation_table())

What each op becomes (ai.onnx domain only, so any ONNX runtime runs the file; no ember code is needed):

  linear_act     MatMul(x, W^T) + bias -> activation -> + residual; the second output (preact) is the
                 pre-activation (rows, N) when save_preact and act != "none", else an empty (0,) tensor,
                 as the fake kernel says
  gated_linear   two MatMuls (+ biases), act(gate) * up; preact [gate | up] (rows, 2N) or empty
  grouped_gated_mlp   the MoE experts: every expert on every row (batched MatMuls, E x the op's FLOPs:
                 ONNX has no grouped GEMM), each row keeping its own expert's result (Where), rows past
                 the last offset zero
  unary_act      the activation;  gated_act: act(gate) * up
  int8_linear    w8a8: per-token dynamic quantization (ReduceMax(Abs) per row, scale = amax / 127, Round,
                 Clip, Cast to int8), MatMulInteger (int8 x int8 -> int32), Cast, * sx * sw, + bias, act.
                 Per-group weight scales (N, G): both operands are reshaped into G groups, one batched
                 MatMulInteger, each group's int32 sum scaled by its own scale, the groups summed.
                 w8a16: the int8 weight is dequantized in the graph (Cast * scale) and a float MatMul.
                 ``smooth`` is a Mul of x first, in both modes.
  quantize_per_token   the w8a8 quantization alone: (q int8 (M, K), scale fp32 (M,))

Activations: relu -> Relu; silu -> x * Sigmoid(x); gelu -> 0.5 x (1 + Erf(x / sqrt 2)); gelu_tanh -> the
tanh formula; relu2 -> Relu then Mul. GELU is written as its formula rather than ONNX's Gelu op because
torch's exporter builds every graph at opset 18 (Gelu is opset 20) and converts to the requested opset
afterwards; the formula is also exactly torch's own aten.gelu translation, so an ember GELU and a torch
one export alike.

Not translated (an export that meets one fails naming it): the ``_backward`` ops, ``int8_prepack`` and the
optimizer steps, which inference graphs do not contain. ``Int8Linear`` passes no packed weight when traced,
and ``w_packed`` is ignored here: the plain int8 weight holds the same numbers.

Rounding: ONNX Round is round-half-to-even like torch.round, the scale is amax / 127 and the multiplier
127 / amax, each a correctly rounded fp32 division as in ``quantize_per_token_reference``, so the int8
activations agree bit for bit with ember's. The int32 products are converted to fp32 before scaling
(the reference scales in fp64), a difference of at most a few fp32 ulps.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .activations import TABLE as _ACTIVATIONS

QMAX = 127.0


def _require():
    try:
        import onnxscript  # noqa: F401
        from onnxscript import ir, opset18
    except ImportError as e:  # pragma: no cover - exercised only without onnxscript
        raise ImportError("ember.onnx needs onnxscript and onnx (pip install onnx onnxscript onnxruntime)") from e
    return ir, opset18


# ---------------------------------------------------------------------------------------------
# The translations. They are plain Python: torch's exporter calls them with an onnxscript tracer as the
# evaluator, so every op.X call records one node, tensors arrive as ir.Values (None for an absent
# optional) and the str/bool arguments as Python values, so branching on them is resolved at export time.
# ---------------------------------------------------------------------------------------------
def _build() -> dict[Any, Callable]:
    ir, op = _require()

    def const(value: float, like):
        # A scalar of the tensor's own dtype (fp16/bf16/fp32 graphs alike).
        return ir.tensor(value, dtype=like.dtype)

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    def act_onnx(x, act: str):
        if act not in _ACTIVATIONS:
            raise ValueError(f"ember.onnx: unknown activation {act!r}")
        if act == "none":
            return x
        if act == "relu":
            return op.Relu(x)
        if act == "silu":
            return op.Mul(x, op.Sigmoid(x))
        if act == "gelu":
            erf = op.Erf(op.Mul(x, const(1.0 / math.sqrt(2.0), x)))
            return op.Mul(op.Mul(x, const(0.5, x)), op.Add(erf, const(1.0, x)))
        if act == "gelu_tanh":
            inner = op.Add(x, op.Mul(const(0.044715, x), op.Mul(op.Mul(x, x), x)))
            t = op.Tanh(op.Mul(const(math.sqrt(2.0 / math.pi), x), inner))
            return op.Mul(op.Mul(x, const(0.5, x)), op.Add(t, const(1.0, x)))
        if act == "relu2":
            r = op.Relu(x)
            return op.Mul(r, r)
        raise NotImplementedError(f"ember.onnx: activation {act!r} has no ONNX form yet")

    def empty_like(x):
        # The (0,) tensor the fake kernels return for an unsaved preact, in x's dtype.
        return op.ConstantOfShape(ints(0), value=ir.tensor([0], dtype=x.dtype))

    def rows(t, n: int | None = None):
        # (..., C) -> (rows, C); C from the last dim, read at run time unless given.
        last = ints(n) if n is not None else op.Shape(t, start=-1)
        return op.Reshape(t, op.Concat(ints(-1), last, axis=0))

    def lead_shape(x):
        return op.Shape(x, start=0, end=-1)

    def linear(x, w, b):
        y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))  # MatMul broadcasts over x's leading dims
        return y if b is None else op.Add(y, b)

    def linear_act(x, weight, bias=None, residual=None, act="none", save_preact=False, backend="auto"):
        pre = linear(x, weight, bias)
        out = act_onnx(pre, act)
        if residual is not None:
            out = op.Add(out, residual)
        keep = save_preact and act != "none"
        return out, (rows(pre) if keep else empty_like(x))

    def gated_linear(x, w_gate, w_up, b_gate=None, b_up=None, act="silu", save_preact=False, backend="auto"):
        g = linear(x, w_gate, b_gate)
        u = linear(x, w_up, b_up)
        h = op.Mul(act_onnx(g, act), u)
        return h, (op.Concat(rows(g), rows(u), axis=1) if save_preact else empty_like(x))

    def unary_act(x, act="relu", backend="auto"):
        return act_onnx(x, act)

    def gated_act(gate, up, act="silu", backend="auto"):
        return op.Mul(act_onnx(gate, act), up)

    def quantize_rows(x2, smooth):
        """(q int8 (M, K), scale fp32 (M, 1)) of fp32 rows, as quantize_per_token_reference computes them."""
        if smooth is not None:
            x2 = op.Mul(x2, op.Cast(smooth, to=ir.DataType.FLOAT))
        amax = op.ReduceMax(op.Abs(x2), ints(-1), keepdims=1)
        # A row holding NaN/Inf gets q = 0 and scale NaN (its outputs NaN, the other rows untouched), as the
        # reference; x - x is NaN exactly where x is NaN or +-Inf.
        bad = op.ReduceMax(op.Cast(op.IsNaN(op.Sub(x2, x2)), to=ir.DataType.FLOAT), ints(-1), keepdims=1)
        finite = op.Equal(bad, const(0.0, amax))
        positive = op.Greater(amax, const(0.0, amax))
        inv = op.Where(positive, op.Div(const(QMAX, amax), op.Where(positive, amax, const(1.0, amax))),
                       const(0.0, amax))
        scaled = op.Where(finite, op.Mul(x2, inv), const(0.0, amax))
        q = op.Cast(op.Clip(op.Round(scaled), const(-QMAX, amax), const(QMAX, amax)), to=ir.DataType.INT8)
        scale = op.Where(finite, op.Div(amax, const(QMAX, amax)), const(math.nan, amax))
        return q, scale

    def quantize_per_token(x, smooth=None, backend="auto"):
        q, scale = quantize_rows(rows(op.Cast(x, to=ir.DataType.FLOAT)), smooth)
        return q, op.Reshape(scale, ints(-1))

    def int8_linear(x, w, w_scale, bias=None, smooth=None, act="none", mode="w8a8", backend="auto", w_packed=None):
        N, K = (int(d) for d in w.shape)
        G = 1 if len(w_scale.shape) == 1 else int(w_scale.shape[1])
        x2 = rows(op.Cast(x, to=ir.DataType.FLOAT), K)
        sw = op.Reshape(w_scale, ints(N, G))
        if mode == "w8a16":
            if smooth is not None:
                x2 = op.Mul(x2, op.Cast(smooth, to=ir.DataType.FLOAT))
            # Dequantized in the graph: the file keeps the int8 weight and its scales.
            wg = op.Reshape(op.Cast(w, to=ir.DataType.FLOAT), ints(N, G, K // G))
            wd = op.Reshape(op.Mul(wg, op.Unsqueeze(sw, ints(2))), ints(N, K))
            y = op.MatMul(x2, op.Transpose(wd, perm=[1, 0]))
        elif mode == "w8a8":
            q, sx = quantize_rows(x2, smooth)
            if G == 1:
                acc = op.MatMulInteger(q, op.Transpose(w, perm=[1, 0]))  # (M, N) int32
                y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Reshape(sw, ints(N))), sx)
            else:
                # One int32 sum per weight group, each scaled by its own scale, then the groups added:
                # q (M, K) -> (G, M, K/G); w (N, K) -> (G, K/G, N); batched MatMulInteger -> (G, M, N).
                qg = op.Transpose(op.Reshape(q, ints(-1, G, K // G)), perm=[1, 0, 2])
                wg = op.Transpose(op.Reshape(w, ints(N, G, K // G)), perm=[1, 2, 0])
                acc = op.Cast(op.MatMulInteger(qg, wg), to=ir.DataType.FLOAT)
                swg = op.Unsqueeze(op.Transpose(sw, perm=[1, 0]), ints(1))  # (G, 1, N)
                y = op.Mul(op.ReduceSum(op.Mul(acc, swg), ints(0), keepdims=0), sx)
        else:
            raise ValueError(f"ember.onnx: int8_linear mode must be 'w8a8' or 'w8a16', got {mode!r}")
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=ir.DataType.FLOAT))
        y = op.CastLike(act_onnx(y, act), x)
        return op.Reshape(y, op.Concat(lead_shape(x), ints(N), axis=0))

    def grouped_gated_mlp(x, w_gate_up, w_down, offsets, act="silu", save_preact=False, backend="auto"):
        # ONNX has no grouped GEMM, and a Loop over the experts would take data-dependent slices; so every
        # expert runs on every row (batched MatMuls, E x the FLOPs of the op) and each row keeps its own
        # expert's result. Row r's expert is the number of offsets <= r; rows past the last offset
        # match no expert and come out zero. Where (not a Mul by the mask) keeps other experts' Inf/NaN
        # out of a row.
        experts, two_inter = int(w_gate_up.shape[0]), int(w_gate_up.shape[1])
        inter = two_inter // 2
        n_rows = op.Shape(x, start=0, end=1)
        row = op.Range(op.Constant(value_int=0), op.Squeeze(n_rows), op.Constant(value_int=1))  # (S,)
        ends = op.Cast(offsets, to=ir.DataType.INT64)
        expert_of_row = op.ReduceSum(op.Cast(op.LessOrEqual(op.Unsqueeze(ends, ints(0)), op.Unsqueeze(row, ints(1))),
                                             to=ir.DataType.INT64), ints(1), keepdims=0)  # (S,)
        mine = op.Unsqueeze(op.Equal(op.Unsqueeze(expert_of_row, ints(0)),
                                     op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=experts),
                                                           op.Constant(value_int=1)), ints(1))), ints(2))  # (E, S, 1)
        pre_all = op.MatMul(op.Unsqueeze(x, ints(0)), op.Transpose(w_gate_up, perm=[0, 2, 1]))  # (E, S, 2I)
        gate = op.Slice(pre_all, ints(0), ints(inter), ints(2))
        up = op.Slice(pre_all, ints(inter), ints(two_inter), ints(2))
        out_all = op.MatMul(op.Mul(act_onnx(gate, act), up), op.Transpose(w_down, perm=[0, 2, 1]))  # (E, S, H)
        zero = const(0.0, x)
        out = op.ReduceSum(op.Where(mine, out_all, zero), ints(0), keepdims=0)
        if not save_preact:
            return out, empty_like(x)
        return out, op.ReduceSum(op.Where(mine, pre_all, zero), ints(0), keepdims=0)

    ops = torch.ops.ember
    return {
        ops.grouped_gated_mlp.default: grouped_gated_mlp,
        ops.linear_act.default: linear_act,
        ops.gated_linear.default: gated_linear,
        ops.unary_act.default: unary_act,
        ops.gated_act.default: gated_act,
        ops.int8_linear.default: int8_linear,
        ops.quantize_per_token.default: quantize_per_token,
    }


def translation_table() -> dict[Any, Callable]:
    """``{torch.ops.ember.<op>.default: translation}`` for ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``. A fresh dict each call, so a caller may add its own entries."""
    return dict(_build())


def export(model: torch.nn.Module, args: tuple, path=None, *, custom_translation_table: dict | None = None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True, custom_translation_table=...)`` with ember's
    translations (a caller's own ``custom_translation_table`` entries are added and win). Returns the
    ONNXProgram. Other keyword arguments go to torch.onnx.export unchanged."""
    if kwargs.pop("dynamo", True) is not True:
        raise ValueError("ember.onnx.export: ember's translations are for the dynamo exporter (dynamo=True)")
    table = translation_table()
    table.update(custom_translation_table or {})
    return torch.onnx.export(model, args, path, dynamo=True, custom_translation_table=table, **kwargs)
