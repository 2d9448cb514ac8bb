"""nemotron3: an open, hackable PyTorch implementation of NVIDIA Nemotron 3 (arXiv 2512.20856).

    from nemotron3 import NemotronConfig, NemotronForCausalLM, from_preset
    model = NemotronForCausalLM(from_preset("tiny"))
"""

from .config import PRESETS, NemotronConfig, from_preset
from .model import HybridCache, NemotronForCausalLM, count_parameters

__all__ = ["NemotronConfig", "NemotronForCausalLM", "HybridCache", "PRESETS", "from_preset", "count_parameters"]
__version__ = "0.1.0"
