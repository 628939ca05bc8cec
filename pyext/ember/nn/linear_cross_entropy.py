"""ember.nn.LinearCrossEntropy: an LM head and its cross-entropy loss as one module that never stores
the logits (``ember.ops.linear_cross_entropy``).

    head = ember.nn.LinearCrossEntropy(hidden, vocab, bias=False)
    loss = head(hidden_states, labels)                       # = F.cross_entropy(lm_head(h).float(), labels)
    head = ember.nn.LinearCrossEntropy.from_linear(model.lm_head)   # sharing the head's Parameters

Its parameters and state_dict keys are ``nn.Linear``'s (``weight``, ``bias``), so a checkpoint of the
Linear loads into it and back.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.linear_cross_entropy import REDUCTIONS


class LinearCrossEntropy(nn.Module):
    """``cross_entropy(x @ weight^T + bias, target)``: forward(x (..., in_features), target (...))."""

    def __init__(self, in_features: int, vocab: int, bias: bool = True, *, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"ember.nn.LinearCrossEntropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        lin = nn.Linear(in_features, vocab, bias=bias, device=device, dtype=dtype)  # nn.Linear's init
        self.in_features, self.vocab = in_features, vocab
        self.weight = lin.weight
        self.bias = lin.bias
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, ignore_index: int = -100, reduction: str = "mean",
                    label_smoothing: float = 0.0) -> "LinearCrossEntropy":
        """A LinearCrossEntropy sharing ``linear``'s weight and bias Parameters (no copies)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ember.nn.LinearCrossEntropy.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"ember.nn.LinearCrossEntropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.vocab = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.ignore_index, new.reduction, new.label_smoothing = ignore_index, reduction, label_smoothing
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, vocab={self.vocab}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}")

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(x, self.weight, target, self.bias, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing)
