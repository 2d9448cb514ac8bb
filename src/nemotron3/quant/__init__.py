"""Low-precision training, emulated exactly: NVFP4 and MXFP8 formats, the random Hadamard transform, a quantized
linear layer (fprop/dgrad/wgrad), and the Nemotron 3 per-layer recipe. Files: nvfp4, mxfp8, hadamard, linear, recipe."""

from .hadamard import TE_SIGNS, hadamard_matrix, random_hadamard_transform, random_signs
from .linear import GemmFormat, QuantExpertLinear, QuantLinear, QuantStats, quantized_linear
from .mxfp8 import mxfp8_fake_quantize, mxfp8_quantize
from .nvfp4 import NVFP4Tensor, nvfp4_fake_quantize, nvfp4_quantize, round_e2m1, round_e4m3
from .recipe import NVFP4Recipe, Quantization, apply_recipe, explain, plan

__all__ = ["GemmFormat", "NVFP4Recipe", "NVFP4Tensor", "QuantExpertLinear", "QuantLinear", "QuantStats",
           "Quantization", "TE_SIGNS", "apply_recipe", "explain", "hadamard_matrix", "mxfp8_fake_quantize",
           "mxfp8_quantize", "nvfp4_fake_quantize", "nvfp4_quantize", "plan", "quantized_linear",
           "random_hadamard_transform", "random_signs", "round_e2m1", "round_e4m3"]
