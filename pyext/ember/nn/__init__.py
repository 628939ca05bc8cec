"""Drop-in ``torch.nn`` modules backed by ember's fused ops."""
from .activation import GELU, GeGLU, ReLU, ReLU2, SiLU, SwiGLU
from .gated_mlp import GatedExperts, GatedMLP, PackedGatedMLP
from .int8_linear import Int8Linear
from .linear import FusedConv1DMLP, FusedIntermediate, Linear
from .linear_cross_entropy import LinearCrossEntropy

__all__ = ["GELU", "SiLU", "ReLU", "ReLU2", "SwiGLU", "GeGLU", "GatedMLP", "PackedGatedMLP", "GatedExperts", "Linear", "FusedIntermediate", "FusedConv1DMLP", "Int8Linear", "LinearCrossEntropy"]
