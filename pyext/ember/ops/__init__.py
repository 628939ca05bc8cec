"""ember's ops. Each is an ``ember::`` op declared once in ``_schemas.py`` (schema and fake kernel),
with its backends (reference, C++ CPU, CUDA, Triton) registered by its module here and its autograd in
ember._C (csrc/autograd.cpp); see ``ember.backend`` for how a backend is chosen."""
from . import _schemas  # noqa: F401  (first: the modules below register kernels against these names)
from .. import _backend

if _backend.extension() is None:  # ember._C holds the ember_C kernels and the ops' autograd (csrc/autograd.cpp)
    _schemas.guard_without_extension()

from .activation import gelu, relu, relu2, silu  # noqa: E402
from .gated import geglu, swiglu  # noqa: E402
from .int8 import dequantize_weight, int8_linear, int8_prepack, quantize_per_token, quantize_weight  # noqa: E402
from .linear import gated_linear, linear  # noqa: E402
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .moe import grouped_gated_mlp  # noqa: E402
__all__ = ["gelu", "silu", "relu", "relu2", "swiglu", "geglu", "linear", "gated_linear", "grouped_gated_mlp", "linear_cross_entropy", "int8_linear", "int8_prepack",
           "quantize_per_token", "quantize_weight", "dequantize_weight"]
