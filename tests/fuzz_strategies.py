"""Hypothesis strategies and the error rule for tests/test_fuzz.py (a plain module, not a test file).

The strategies draw *descriptions* (shape, layout, dtype, value class, a seed); the tensors are then
made by torch from the seed, which is far quicker than drawing every element through Hypothesis and
still shrinks well (a failing case shrinks to a small shape and the simplest value class).

The rule (flash-attention's, applied to every result):

    err(a) = max_i |a_i - exact_i| / scale_i          over the positions judged (below)
    pass   if err(ember) <= 2 * err(torch) + floor,   floor = c * eps(dtype) * sqrt(reduction length)

with c = 2 (64 in float64, see floor_ulps)

``exact`` is torch's own function run in float64 on the same (already rounded) inputs, ``torch`` is
torch's own function run in the tested dtype, never ember's reference. ``scale_i`` is 1 + |exact_i|
for elementwise results (an absolute error below 1, a relative one above), and for a reduction the
magnitude it was summed from (1 + |exact| + sum_k |x_k| |w_k| ...), the quantity a correct summation's
error is proportional to. The floor lets a result that is exact up to a couple of ulps pass where
torch happens to be exact (relu, K = 1).

Non-finite values: each element is classed finite / NaN / +Inf / -Inf, float64's result rounded to the
dtype (so a true overflow counts as Inf). Where torch's dtype result has the same class as float64's,
ember's must have it too; where torch itself departs (an intermediate overflowing in fp16, say), ember
may side with either. Results within a few ulps of the dtype's largest finite value may round either
way and are not judged. Errors are measured where all three agree on "finite".
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# sizes of one dimension: empty, 1, primes, a power of two and one past it
SIZES = (0, 1, 2, 3, 5, 7, 13, 31, 64, 65, 127)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
# value classes: what the elements look like before specials are sprinkled in
VALUES = ("normal", "small", "large", "tiny", "huge")
SPECIALS = (math.nan, math.inf, -math.inf, 0.0, -0.0)


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def floor_ulps(dtype) -> float:
    """The floor in units of eps(dtype). In float64 the "exact" result is torch's own float64 one, so
    torch's error is 0 by construction and the floor is the whole budget: 64 eps (1.4e-14) lets two
    correct formulas of the same function (ember's gelu_tanh derivative vs autograd's) differ by a few
    ulps, as they do."""
    return 64.0 if dtype == torch.float64 else 2.0


# ---------------------------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------------------------
@st.composite
def shapes(draw, min_dims=0, max_dims=4, max_numel=4096, sizes=SIZES):
    """A shape of min_dims..max_dims sizes from SIZES, at most max_numel elements (an empty shape is
    always allowed)."""
    nd = draw(st.integers(min_dims, max_dims))
    shape = []
    for _ in range(nd):
        cap = max_numel // max(1, math.prod(shape))
        shape.append(draw(st.sampled_from([s for s in sizes if s <= max(cap, 1)])))
    return tuple(shape)


@st.composite
def tensor_specs(draw, values=VALUES, specials=True):
    """How a tensor's elements and memory look: (layout, value class, fraction of specials, seed)."""
    layout = draw(st.sampled_from(LAYOUTS))
    kind = draw(st.sampled_from(values))
    frac = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3])) if specials else 0.0
    seed = draw(st.integers(0, 2**31 - 1))
    return layout, kind, frac, seed


def make_tensor(shape, dtype, spec, huge=None) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` laid out and filled as ``spec`` says.

    Layouts: contiguous; transposed (the last two dims swapped in memory); strided (every other element
    of a buffer twice as wide); offset (a nonzero storage offset). The memory around a strided or
    offset view is NaN, so a kernel that reads outside the view shows up as a NaN in its result.
    ``huge`` overrides the "huge" value class's magnitude (GEMMs use about sqrt(max) / K, so that
    products stay near, not far past, the overflow threshold)."""
    layout, kind, frac, seed = spec
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    mag = {
        "normal": 1.0,
        "small": 1e-3,
        "large": 1e3 if dtype != torch.float16 else 1e2,
        "tiny": fi.tiny * 4,  # with the 2^-k spread below: normals near the bottom and subnormals
        "huge": huge if huge is not None else fi.max / 8,
    }[kind]
    vals = torch.randn(shape, generator=g, dtype=torch.float64) * mag
    if kind == "tiny":
        vals = vals * torch.exp2(-torch.randint(0, 12, shape, generator=g).double())
    if kind == "huge":
        vals = vals.clamp(-fi.max / 2, fi.max / 2)
    if frac and vals.numel():
        pick = torch.rand(shape, generator=g) < frac
        which = torch.randint(0, len(SPECIALS), shape, generator=g)
        special = torch.tensor(SPECIALS, dtype=torch.float64)[which]
        vals = torch.where(pick, special, vals)
    vals = vals.to(dtype)
    return lay_out(vals, layout)


def lay_out(vals: torch.Tensor, layout: str) -> torch.Tensor:
    shape = tuple(vals.shape)
    if layout == "transposed" and len(shape) >= 2:
        out = torch.full((*shape[:-2], shape[-1], shape[-2]), math.nan, dtype=vals.dtype).transpose(-1, -2)
    elif layout == "strided" and len(shape) >= 1:
        out = torch.full((*shape[:-1], 2 * shape[-1]), math.nan, dtype=vals.dtype)[..., ::2]
    elif layout == "offset":
        out = torch.full((vals.numel() + 3,), math.nan, dtype=vals.dtype)[3:].view(shape)
    else:
        return vals.clone()
    out.copy_(vals)
    return out


# ---------------------------------------------------------------------------------------------
# The rule.
# ---------------------------------------------------------------------------------------------
def _classes(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isnan(t)] = 1
    c[t == math.inf] = 2
    c[t == -math.inf] = 3
    return c


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()
    return f"{idx.shape[0]} positions, first at {tuple(idx[0].tolist())}" if idx.numel() else "none"


def judge(what: str, got: torch.Tensor, exact: torch.Tensor, twin: torch.Tensor, dtype, scale=None,
          reduction: int = 1, exempt=None, slack=None) -> None:
    """Asserts the rule above for ember's ``got`` against float64 ``exact`` and torch's ``twin``.

    ``scale``: per-element magnitude (float64, broadcastable), default 1 + |exact|; ``reduction``:
    the length of the longest sum behind one element (for the floor); ``exempt``: a bool mask of
    positions not judged at all; ``slack``: a per-element error allowed on top (the bound of a
    quantization step ember takes by contract and torch's float math does not)."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == tuple(exact.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    g, e, t = got.detach().double(), exact.detach().double(), twin.detach().double()
    rounded = e.to(dtype).double()
    big = torch.finfo(dtype).max
    edge = torch.isfinite(e) & (e.abs() > big * (1 - 4 * eps(dtype)))
    if exempt is not None:
        edge = edge | exempt
    cg, ce, ct = _classes(g), _classes(rounded), _classes(t)
    agree = (ct == ce) & ~edge
    wrong = agree & (cg != ce)
    assert not wrong.any(), (
        f"{what}: non-finite pattern differs from float64 where torch's {DTYPE_IDS[dtype]} agrees with it "
        f"({_where(wrong)}; ember {g[wrong][:4].tolist()}, float64 {e[wrong][:4].tolist()})")
    # where torch departs from float64, ember may side with either
    odd = ~agree & ~edge & (cg != ce) & (cg != ct)
    assert not odd.any(), f"{what}: non-finite pattern matches neither float64 nor torch ({_where(odd)})"
    judged = agree & (ce == 0)
    if not judged.any():
        return
    s = (1.0 + e.abs()) if scale is None else torch.broadcast_to(scale, e.shape)
    s = torch.nan_to_num(s, nan=math.inf)  # a magnitude summed over non-finite inputs: not judgeable
    d = (g - e).abs() if slack is None else ((g - e).abs() - slack).clamp(min=0)
    err_e = (d / s)[judged].max().item()
    err_t = ((t - e).abs() / s)[judged].max().item()
    floor = floor_ulps(dtype) * eps(dtype) * math.sqrt(max(1, reduction))
    if not err_e <= 2 * err_t + floor:
        rel = (d / s).masked_fill(~judged, 0)
        worst = tuple(int(i) for i in torch.unravel_index(rel.argmax(), rel.shape)) if rel.dim() else ()
        raise AssertionError(
            f"{what}: ember's error {err_e:.3g} > 2 x torch's {err_t:.3g} + floor {floor:.3g} "
            f"(worst at {worst}: ember {g[worst].item()!r}, float64 {e[worst].item()!r}, torch {t[worst].item()!r})")
