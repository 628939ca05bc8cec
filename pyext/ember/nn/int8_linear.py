"""Int8Linear: an inference-only ``nn.Linear`` holding an int8 weight and fp32 scales.

    q = Int8Linear.from_linear(linear, mode="w8a8")            # or "w8a16", group_size=128
    y = q(x)                                                   # ember.ops.int8_linear

State (all buffers, so ``state_dict`` round-trips bit-exactly, through safetensors too):
    weight        int8 (out_features, in_features)
    weight_scale  fp32 (out_features,) or (out_features, in_features // group_size)
    bias          the float layer's bias in its dtype, or absent
    smooth        fp32 (in_features,), only for SmoothQuant-smoothed layers whose 1/s was not folded into a
                  preceding norm (see ember/smooth_fold.py): x is multiplied by it
                  inside the quantization pass (no extra pass over x)
Module ``.to(dtype)`` converts the bias only: scales stay fp32 (they are part of the int8 format).

Derived, not saved (a non-persistent buffer, absent from ``state_dict``):
    weight_packed ``ember.ops.int8_prepack(weight, weight_scale)``: the layout the device's own W8A8 kernel
                  reads (the C++ CPU kernel's VNNI tiles), or empty where it reads ``weight`` itself. Made by
                  ``from_linear``, after ``load_state_dict`` and when the module moves (``_apply``), and
                  remade by ``forward`` if ``weight`` was changed since (see ``_packing_is_current``).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _backend, activations
from ..ops import int8 as int8_ops
from . import _kept_call
from ._kept_call import needs_autograd, plain_cpu_input, rows_of, shaped_as_rows_of

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT8_LINEAR = torch.ops.ember.int8_linear.default


class Int8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        mode: str = "w8a8",
        group_size: int | None = None,
        activation: str | None = None,
        smooth: bool = False,
        device=None,
        dtype=torch.float32,
    ) -> None:
        """An empty layer (zeros) of the given format, to ``load_state_dict`` a quantized checkpoint into."""
        super().__init__()
        if mode not in int8_ops.MODES:
            raise ValueError(f"ember.nn.Int8Linear: mode must be one of {int8_ops.MODES}, got {mode!r}")
        activation = activations.check("ember.nn.Int8Linear", activation)
        g = int8_ops.check_group_size("Int8Linear", in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size = mode, group_size
        self.activation = None if activation == "none" else activation
        # Ordinary tensors even when the layer is made under torch.inference_mode(): inference tensors
        # keep no version counter, and the weight_packed staleness check reads weight's.
        with torch.inference_mode(False):
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            shape = (out_features,) if group_size is None else (out_features, in_features // g)
            self.register_buffer("weight_scale", torch.zeros(shape, dtype=torch.float32, device=device))
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)
        # Packed lazily (first forward) unless from_linear / load_state_dict / _apply pack first: packing
        # these zeros would be wasted work for a layer that is about to be loaded.
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.int8, device=device), persistent=False)
        self._packed_from: torch.Tensor | None = None  # the weight tensor weight_packed was made from,
        self._packed_version: int | None = None  # its _version then (None: an inference tensor)
        self._packed_ptr = 0  # and its data_ptr()
        self._cpu_call: _CpuCall | None = None  # the last eager CPU call, kept for the next (see forward)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        mode: str = "w8a8",
        *,
        group_size: int | None = None,
        activation: str | None = None,
        smooth: torch.Tensor | None = None,
    ) -> "Int8Linear":
        """Quantize ``linear``'s weight. ``smooth`` (fp32 (in_features,), SmoothQuant's s) is folded into the
        weight (W * s) and its inverse applied to x at run time, so the product is unchanged in exact math."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ember.nn.Int8Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode, group_size=group_size,
                  activation=activation, smooth=smooth is not None, device=w.device, dtype=w.dtype)
        wf = w.float()
        if smooth is not None:
            s = smooth.detach().to(device=w.device, dtype=torch.float32)
            if s.shape != (linear.in_features,) or not torch.isfinite(s).all() or (s <= 0).any():
                raise ValueError("ember.nn.Int8Linear.from_linear: smooth must be finite, positive, (in_features,)")
            wf = wf * s
            new.smooth.copy_(1.0 / s)
        q, scale = int8_ops.quantize_weight(wf, group_size)
        new.weight.copy_(q)
        new.weight_scale.copy_(scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        new.train(linear.training)
        new.repack()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.__dict__.get("_cpu_call")
        if call is not None and call.takes(self, x):
            return call.run(x)
        packed = self._packed_weight_for(x)
        w = self.weight
        if not (isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] == w.shape[1] and x.device == w.device
                and x.dtype in _FLOAT_DTYPES and w.is_contiguous() and self.weight_scale.is_contiguous()):
            # Something to say about the input (or a weight made non-contiguous in place): the op's checks.
            return int8_ops.int8_linear(x, w, self.weight_scale, self.bias, activation=self.activation,
                                        mode=self.mode, smooth=self.smooth, w_packed=packed)
        # The layer's own buffers were checked when it was built (load_state_dict keeps their shapes), so
        # the call goes straight to the op (or its CPU kernel, below): at decode a layer is tens of
        # microseconds.
        backend_state = None if torch.compiler.is_compiling() else _backend.ambient()
        backend = int8_ops.backend_for(None, x.device, self.mode, self.weight_scale, w.shape[1])
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if backend == "cpu" and x.numel() and not wants_grad and not torch.compiler.is_compiling():
            # Eager inference on the C++ CPU kernel: call it directly. The ember:: op around it (what
            # graphs record, and whose autograd kernel raises on a backward) costs ~20 us of dispatch a
            # call; at decode a 1024 x 256 layer took 49 us through it and 12.6 us in the kernel. The
            # call is kept for the next one (_CpuCall).
            call = self._cpu_call = _CpuCall(self, backend_state, packed)
            return call.run(x)
        return _INT8_LINEAR(x, w, self.weight_scale, self.bias, self.smooth, self.activation or "none", self.mode,
                            backend, packed)

    def _packed_weight_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """weight_packed, current, for an eager call on its device; None where the plain weight is read.

        Under torch.compile / torch.export the layer passes no packed weight (the traced graph reads
        ``weight`` only): the staleness check below is Python run per call, which a graph would not
        repeat, so a graph holding weight_packed could read a stale copy after an in-place weight edit."""
        if self.mode != "w8a8" or torch.compiler.is_compiling():
            return None
        if not self._packing_is_current():
            self.repack()
        packed = self._buffers["weight_packed"]
        return packed if packed.numel() and packed.device == x.device else None

    def _packing_is_current(self) -> bool:
        """Whether weight_packed was made from the weight as it is now.

        Every in-place write to a tensor through torch (``weight[0] += 1``, ``copy_``, ``load_state_dict``'s
        copy, writes through views or ``detach()``) bumps its ``_version``, the counter autograd itself
        relies on to detect modified saved tensors; replacing the buffer (``self.weight = t``, ``assign=True``
        loads, ``_apply``) makes ``weight`` another tensor object; ``weight.data = t`` keeps object and
        version but changes ``data_ptr()``. So one identity test and two int compares (well under a
        microsecond, against the N x K pass of a repack) catch every edit torch can see, and holding
        ``_packed_from`` keeps its storage alive, so no other tensor can take its address. Writes torch
        does not count are not seen, as autograd does not see them either: through ``weight.data`` (a new
        version counter), a NumPy view or the raw storage; call ``repack()`` after those."""
        w = self._buffers["weight"]
        if w is not self._packed_from:
            return False
        if self._packed_version is None:  # an inference tensor: nothing was packed from it (see repack)
            return True
        return w._version == self._packed_version and w.data_ptr() == self._packed_ptr

    def repack(self) -> None:
        """Remake weight_packed from weight (``ember.ops.int8_prepack``; empty where there is no packed form)."""
        w = self._buffers["weight"]
        if w.is_inference():
            # A weight made under inference_mode (a load or .to() there) has no version counter, so a
            # packed copy could not be kept current: none is made, and forward reads the weight itself.
            packed, version = torch.empty(0, dtype=torch.int8, device=w.device), None
        else:
            with torch.no_grad():
                # backend "auto": the packed form of the weight's device, whatever backend is chosen
                # around this call (a model quantized under ember.backend("reference") still runs packed
                # later); forward still honours each call's backend choice.
                packed = int8_ops.int8_prepack(w, self.weight_scale, mode=self.mode, backend="auto")
            version = w._version
        self._buffers["weight_packed"] = packed
        self._packed_from, self._packed_version, self._packed_ptr = w, version, w.data_ptr()
        self._cpu_call = None  # it holds the old tensors

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight this layer computes with (smoothing undone)."""
        w = int8_ops.dequantize_weight(self.weight, self.weight_scale, torch.float32)
        if self.smooth is not None:
            w = w * self.smooth
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes of the layer's saved buffers (what the state_dict holds; weight_packed is not among them)."""
        return sum(b.numel() * b.element_size() for name, b in self._buffers.items()
                   if b is not None and name not in self._non_persistent_buffers_set)

    def cpu_packed_nbytes(self) -> int:
        """Bytes of the packed weight copy the layer holds beside ``weight`` for the CPU W8A8 kernel
        (weight_packed), 0 where there is none."""
        if not self._packing_is_current():
            self.repack()
        packed = self.weight_packed
        return packed.numel() * packed.element_size() if packed.device.type == "cpu" else 0

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size else ""
        extra += f", activation={self.activation!r}" if self.activation else ""
        extra += ", smoothed" if self.smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}{extra}"

    def _apply(self, fn, recurse=True):
        self._cpu_call = None  # it holds the tensors the move replaces
        # Keep the fp32 scales fp32 when the model is cast (model.half(), .to(torch.bfloat16)).
        keep = {k: getattr(self, k) for k in ("weight_scale", "smooth") if getattr(self, k) is not None}
        # weight_packed is derived from weight, not converted with it: kept out of fn (which would copy it
        # along on a device move, only to be remade), then remade only if weight is now another tensor.
        packed = self._buffers["weight_packed"]
        self._buffers["weight_packed"] = None  # Module._apply skips None buffers
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_packed"] = packed
        for k, v in keep.items():
            moved = getattr(self, k)
            if moved.dtype != torch.float32:
                self._buffers[k] = v.to(device=moved.device)
        if not self._packing_is_current():
            self.repack()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A smoothed checkpoint loads into a layer made without smoothing (and back): the format follows
        # the checkpoint.
        key = prefix + "smooth"
        if key in state_dict and self.smooth is None:
            self.register_buffer("smooth", torch.ones(self.in_features, dtype=torch.float32, device=self.weight.device))
        elif key not in state_dict and self.smooth is not None:
            self.smooth = None
        skey = prefix + "weight_scale"
        if skey in state_dict and state_dict[skey].shape != self.weight_scale.shape:
            s = state_dict[skey]
            self.weight_scale = torch.zeros(s.shape, dtype=torch.float32, device=self.weight.device)
            self.group_size = None if s.dim() == 1 else self.in_features // s.shape[1]
        self._cpu_call = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # weight and weight_scale are the checkpoint's now (copied in, or assigned with assign=True).
        self.repack()


class _CpuCall:
    """An Int8Linear's eager CPU inference call, kept from one forward to the next.

    A decode step calls every layer once for a row or a few, where the kernel takes 10-100 us and the
    Python in front of it (the backend choice, the input checks, the packed-weight check, seven buffer
    lookups through ``nn.Module.__getattr__``) took another 15-20 us with the step's cold caches: 1.6 ms
    of a 13.2 ms step of a 12-layer, 1024-wide Llama, W8A8 on a 2-core Xeon. The first call takes the
    whole path and leaves this behind; later calls check only what could make it wrong (``takes``):
    the same buffer objects, the weight unchanged since it was packed, the same backend request, the
    same layer settings, an input the kernel takes as it is, nothing that needs autograd or a graph.
    Anything else takes the whole path again, which remakes the call. Cleared when the layer moves,
    loads or repacks, so it never keeps replaced tensors alive."""

    __slots__ = ("backend_state", "weight", "version", "ptr", "scale", "bias", "smooth", "packed", "mode",
                 "activation", "in_features", "out_features")

    def __init__(self, layer: Int8Linear, backend_state: tuple, packed: torch.Tensor | None) -> None:
        b = layer._buffers
        self.backend_state = backend_state
        self.weight, self.scale, self.bias, self.smooth = b["weight"], b["weight_scale"], b["bias"], b["smooth"]
        # an inference tensor keeps no version counter; no packed copy is made from one (see repack)
        self.version = None if self.weight.is_inference() else self.weight._version
        self.ptr = self.weight.data_ptr()
        self.packed = b["weight_packed"] if packed is not None else None
        self.mode, self.activation = layer.mode, layer.activation
        self.in_features, self.out_features = self.weight.shape[1], self.weight.shape[0]

    def takes(self, layer: Int8Linear, x) -> bool:
        b = layer._buffers
        w = self.weight
        return (plain_cpu_input(x, _FLOAT_DTYPES, self.in_features)
                and b["weight"] is w and w.data_ptr() == self.ptr
                and (self.version is None or w._version == self.version)
                and b["weight_scale"] is self.scale and b["bias"] is self.bias and b["smooth"] is self.smooth
                and (self.packed is None or b["weight_packed"] is self.packed)
                and layer.mode == self.mode and layer.activation == self.activation
                and _backend.ambient() == self.backend_state
                and not needs_autograd(x, (self.bias,)))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_ops.cpu_kernel(rows_of(x), self.weight, self.scale, self.bias, self.smooth, self.activation or "none",
                                self.mode, self.packed)
        return shaped_as_rows_of(y, x, self.out_features)

    def __reduce__(self):  # dropped by deepcopy and pickling, as _kept_call.KeptCall is
        return (_kept_call.dropped, ())
