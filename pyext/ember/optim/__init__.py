"""ember.optim: fused multi-tensor optimizers, drop-in for torch.optim.

    opt = ember.optim.AdamW(model.parameters(), lr=3e-4)   # same arguments and state_dict as torch

One kernel launch per (device, dtype) group of parameters on every backend (C++ CPU, Triton, CUDA,
and the pure-PyTorch reference); see ember.ops.optim for the op and csrc/optim.h for the math.
"""
from .adamw8bit import AdamW8bit
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Lion", "AdamW8bit"]
