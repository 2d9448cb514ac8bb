"""nemotron3: an open, hackable PyTorch implementation of NVIDIA Nemotron 3 (arXiv 2512.20856).

    from nemotron3 import NemotronConfig, NemotronForCausalLM, from_preset
    model = NemotronForCausalLM(from_preset("tiny"))
    ids = model.generate(input_ids, max_new_tokens=32)
"""

from .config import PRESETS, NemotronConfig, from_preset
from .infer.generate import generate as _generate
from .model import HybridCache, NemotronForCausalLM, count_parameters

# model/ holds no generation loop and imports nothing from infer/; generate is the engine's, bound here (the way
# transformers mixes GenerationMixin into its models, without the model files depending on it).
NemotronForCausalLM.generate = _generate

__all__ = ["NemotronConfig", "NemotronForCausalLM", "HybridCache", "PRESETS", "from_preset", "count_parameters"]
__version__ = "0.1.0"
