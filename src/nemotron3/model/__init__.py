"""The Nemotron-H / Nemotron 3 model. Files: norm, mamba2, attention, mlp, moe, latent_moe, mtp, cache, nemotron."""

from .cache import HybridCache
from .nemotron import Block, NemotronForCausalLM, NemotronModel, NemotronOutput, count_parameters

__all__ = ["Block", "HybridCache", "NemotronForCausalLM", "NemotronModel", "NemotronOutput", "count_parameters"]
