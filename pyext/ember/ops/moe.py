"""grouped_gated_mlp: the experts of a mixture-of-experts layer, every expert's gated MLP in one op
(``ember::grouped_gated_mlp``), forward and backward.

    out[r] = down_e(act(gate_e(x[r])) * up_e(x[r]))     for the rows r of expert e

``x`` holds the routed token rows sorted by expert, and ``offsets[e]`` is the end row of expert e's
group (cumulative counts, as ``torch.nn.functional.grouped_mm`` takes them); rows past the last
offset belong to no expert and come out zero. The weights are laid out as transformers stores its
experts (MixtralExperts, Qwen2MoeExperts, ...): ``w_gate_up`` (E, 2I, H) holds each expert's gate rows
then its up rows, ``w_down`` (E, H, I).

Why one op: eager runs a grouped GEMM into (rows, 2I), splits it, runs the activation (a new tensor),
the product (another) and a second grouped GEMM, and in backward one pass per elementwise op. Here the
CPU kernel runs the two GEMMs of each expert from one call and everything between them as one pass
over all rows (the experts share the activation); no (rows, I) activation tensor is kept for backward:
it is recomputed from the pre-activations, which eager keeps too.

Backends: "cpu" (csrc/cpu/linear.cpp), "triton" (kernels/moe.py: GPU, and CPU tensors under
TRITON_INTERPRET=1) and "reference" (pure torch: the float64 oracle).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backend, activations
from ._common import check_float, plain_reference
from ._schemas import impl
from .activation import act_backward_reference, act_reference

ACTIVATIONS = activations.GATED
grouped_gated_mlp_op = torch.ops.ember.grouped_gated_mlp.default


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference. Low precision: the GEMMs round to the dtype, the gating computes in fp32.
# ---------------------------------------------------------------------------------------------
def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def group_ranges(offsets: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert with rows; checks that offsets are valid end rows."""
    ends = [int(v) for v in offsets.tolist()]
    ranges, start = [], 0
    for e, end in enumerate(ends):
        if end < start or end > rows:
            raise ValueError(f"ember.ops.grouped_gated_mlp: offsets must be non-decreasing end rows within "
                             f"[0, {rows}], got {ends}")
        if end > start:
            ranges.append((e, start, end))
        start = end
    return ranges


def _gated(pre: torch.Tensor, act: str) -> torch.Tensor:
    gate, up = pre.chunk(2, dim=1)
    return (act_reference(_wide(gate), act) * _wide(up)).to(pre.dtype)


def _per_group(fn, rows: torch.Tensor, weight: torch.Tensor, ranges, width: int) -> torch.Tensor:
    """fn(rows of expert e, weight[e]) for every group, in row order (the groups tile the rows from 0
    to the last offset), then zero rows for those past it. Out of place, so torch differentiates it."""
    parts = [fn(rows[s:t], weight[e]) for e, s, t in ranges]
    used = ranges[-1][2] if ranges else 0
    return torch.cat([*parts, rows.new_zeros((rows.shape[0] - used, width))])


def grouped_gated_mlp_reference(x, w_gate_up, w_down, offsets, act: str):
    ranges = group_ranges(offsets, x.shape[0])
    pre = _per_group(F.linear, x, w_gate_up, ranges, w_gate_up.shape[1])
    out = _per_group(F.linear, _gated(pre, act), w_down, ranges, w_down.shape[1])
    return out, pre


def grouped_gated_mlp_backward_reference(grad, x, w_gate_up, w_down, offsets, pre, act: str):
    inter = w_gate_up.shape[1] // 2
    gate, up = (_wide(t) for t in pre.chunk(2, dim=1))
    h = _gated(pre, act)
    dx, dwgu, dwd = torch.zeros_like(x), torch.zeros_like(w_gate_up), torch.zeros_like(w_down)
    dh = torch.zeros_like(h)
    ranges = group_ranges(offsets, x.shape[0])
    for e, s, t in ranges:
        dh[s:t] = grad[s:t] @ w_down[e]
        dwd[e] = grad[s:t].t() @ h[s:t]
    dgate = act_backward_reference(_wide(dh) * up, gate, act).to(x.dtype)
    dup = (_wide(dh) * act_reference(gate, act)).to(x.dtype)
    for e, s, t in ranges:
        dx[s:t] = dgate[s:t] @ w_gate_up[e, :inter] + dup[s:t] @ w_gate_up[e, inter:]
        dwgu[e, :inter] = dgate[s:t].t() @ x[s:t]
        dwgu[e, inter:] = dup[s:t].t() @ x[s:t]
    return dx, dwgu, dwd


# ---------------------------------------------------------------------------------------------
# ember::grouped_gated_mlp (schema in _schemas.py; its autograd is csrc/autograd.cpp's)
# ---------------------------------------------------------------------------------------------
def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


@impl("grouped_gated_mlp")
def _(x, w_gate_up, w_down, offsets, act, save_preact, backend):
    backend = _backend.choose(backend, x.device, "grouped_gated_mlp", dtype=x.dtype)
    if backend == "reference":
        out, pre = grouped_gated_mlp_reference(x, w_gate_up, w_down, offsets, act)
    elif backend == "triton":
        from ember.kernels import moe as tk

        out, pre = tk.grouped_gated_mlp(x, w_gate_up, w_down, offsets, act, save_preact)
    else:
        out, pre = torch.ops.ember_C.grouped_gated_mlp(x, w_gate_up, w_down, offsets, act, save_preact)
    return out, (pre if save_preact else _empty(x))


@impl("grouped_gated_mlp_backward")
def _(grad_out, x, w_gate_up, w_down, offsets, preact, act, need_dx, need_dw, backend):
    backend = _backend.choose(backend, x.device, "grouped_gated_mlp", dtype=x.dtype)
    if preact.numel() == 0 and grad_out.numel():  # forward ran without keeping it: recompute
        preact = grouped_gated_mlp_reference(x, w_gate_up, w_down, offsets, act)[1]
    if backend == "reference":
        dx, dwgu, dwd = grouped_gated_mlp_backward_reference(grad_out, x, w_gate_up, w_down, offsets, preact, act)
    elif backend == "triton":
        from ember.kernels import moe as tk

        dx, dwgu, dwd = tk.grouped_gated_mlp_backward(grad_out.contiguous(), x, w_gate_up, w_down, offsets, preact,
                                                      act, need_dx, need_dw)
    else:
        dx, dwgu, dwd = torch.ops.ember_C.grouped_gated_mlp_backward(grad_out, x, w_gate_up, w_down, offsets, preact,
                                                                    act, need_dx, need_dw)
    e = _empty(x)
    return dx if need_dx else e, dwgu if need_dw else e.clone(), dwd if need_dw else e.clone()


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def grouped_gated_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    *,
    activation: str = "silu",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Every expert's ``down(act(gate(x)) * up(x))`` over ``x``'s rows sorted by expert, as one op.

    x: (rows, H), the routed rows grouped by expert; offsets: (E,) int32/int64, expert e's end row
    (rows past offsets[-1] come out zero); w_gate_up: (E, 2I, H), each expert's gate rows then its up
    rows; w_down: (E, H, I). activation: "silu" (SwiGLU experts), "gelu" or "gelu_tanh".
    """
    act = activations.check("ember.ops.grouped_gated_mlp", activation, ACTIVATIONS)
    op = "grouped_gated_mlp"
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_float(op, name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"ember.ops.{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"ember.ops.{op}: {name} must be on x's device {x.device}, got {t.device}")
    if x.dim() != 2:
        raise ValueError(f"ember.ops.{op}: x must be 2-D (rows sorted by expert, hidden), got shape {tuple(x.shape)}")
    hidden = x.shape[1]
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2 or w_gate_up.shape[2] != hidden:
        raise ValueError(f"ember.ops.{op}: w_gate_up must be (experts, 2 * intermediate, {hidden}), got shape "
                         f"{tuple(w_gate_up.shape)}")
    experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (experts, hidden, inter):
        raise ValueError(f"ember.ops.{op}: w_down must be {(experts, hidden, inter)}, got shape {tuple(w_down.shape)}")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ember.ops.{op}: offsets must be an int32 or int64 tensor, got "
                        f"{getattr(offsets, 'dtype', type(offsets).__name__)}")
    if tuple(offsets.shape) != (experts,):
        raise ValueError(f"ember.ops.{op}: offsets must have shape ({experts},) (one end row per expert), got "
                         f"{tuple(offsets.shape)}")
    if offsets.device.type != "cpu" and offsets.device != x.device:
        raise ValueError(f"ember.ops.{op}: offsets must be on the CPU or on x's device {x.device}, got {offsets.device}")
    name = _backend.for_call(backend, x.device, op, dtype=x.dtype)
    if plain_reference(name):
        return grouped_gated_mlp_reference(x, w_gate_up, w_down, offsets, act)[0]
    return grouped_gated_mlp_op(x, w_gate_up, w_down, offsets, act, False, name)[0]
