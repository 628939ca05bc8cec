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
"""
from __future__ import annotations

import torch
from torch import nn

from .. import activations
from ..ops import int8 as int8_ops


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
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        shape = (out_features,) if group_size is None else (out_features, in_features // g)
        self.register_buffer("weight_scale", torch.zeros(shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)

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
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._cpu_packing(x)
        if packed is not None:
            y = int8_ops.cpu_w8a8_eager(x, self.weight, self.weight_scale, self.bias, self.smooth, self.activation or "none", packed)
            if y is not None:
                return y
        return int8_ops.int8_linear(x, self.weight, self.weight_scale, self.bias, activation=self.activation, mode=self.mode,
                                    smooth=self.smooth, w_packed=packed)

    def _cpu_packing(self, x: torch.Tensor) -> torch.Tensor | None:
        """CPU W8A8 reads the weight in the packed VNNI layout (see ``ops.int8.pack_weight_cpu``): made on
        the first CPU call and cached beside the module (not a buffer, not in the state_dict; N x K bytes
        more), remade if the weight changes."""
        if self.mode != "w8a8" or x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        key = (self.weight.data_ptr(), self.weight._version)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            cached = (key, int8_ops.pack_weight_cpu(self.weight, self.group_size))
            self.__dict__["_packed"] = cached
        return cached[1]

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight this layer computes with (smoothing undone)."""
        w = int8_ops.dequantize_weight(self.weight, self.weight_scale, torch.float32)
        if self.smooth is not None:
            w = w * self.smooth
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes of the layer's buffers (what the state_dict holds)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def cpu_packed_nbytes(self) -> int:
        """Bytes of the packed weight copy the CPU W8A8 kernel makes at this layer's first CPU call (see
        ``_cpu_packing``), 0 where none is made: N x K int8 tiles plus N int32 column sums."""
        N, K = self.weight.shape
        g = self.group_size or K
        if self.mode != "w8a8" or self.weight.device.type != "cpu" or N % 16 or K % 4 or g % 4 or K % g:
            return 0
        return N * K + 4 * N * (K // g)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size else ""
        extra += f", activation={self.activation!r}" if self.activation else ""
        extra += ", smoothed" if self.smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}{extra}"

    def _apply(self, fn, recurse=True):
        # Keep the fp32 scales fp32 when the model is cast (model.half(), .to(torch.bfloat16)).
        keep = {k: getattr(self, k) for k in ("weight_scale", "smooth") if getattr(self, k) is not None}
        super()._apply(fn, recurse)
        for k, v in keep.items():
            moved = getattr(self, k)
            if moved.dtype != torch.float32:
                self._buffers[k] = v.to(device=moved.device)
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
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
