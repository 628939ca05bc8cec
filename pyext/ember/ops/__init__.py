"""ember's ops. Each is a ``torch.library`` custom op in namespace ``ember`` (schema, fake kernel,
autograd) with reference, C++ CPU, Triton and CUDA implementations chosen per call; see
``ember.backend``."""
from .activation import gelu, relu, relu2, silu
from .gated import geglu, swiglu
from .int8 import dequantize_weight, int8_linear, int8_prepack, quantize_per_token, quantize_weight
from .linear import gated_linear, linear

__all__ = ["gelu", "silu", "relu", "relu2", "swiglu", "geglu", "linear", "gated_linear", "int8_linear", "int8_prepack",
           "quantize_per_token", "quantize_weight", "dequantize_weight"]
