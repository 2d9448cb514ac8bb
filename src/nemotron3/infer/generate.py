"""`model.generate(input_ids, ...)`: Hugging Face's calling convention on top of the engine (the one generation
loop). Tensors in, tensors out: (b, prompt + new) ids, rows that stopped early padded with eos (or 0).

    ids = model.generate(input_ids, max_new_tokens=32, do_sample=False)
    ids = model.generate(input_ids, 32, attention_mask=mask)                  # left-padded prompts
    ids = model.generate(input_ids, 64, num_speculative_tokens=3)             # MTP drafts; same greedy tokens

The package's __init__ binds this function as NemotronForCausalLM.generate, so the model files hold no generation
code and import nothing from infer/.
"""

from __future__ import annotations

import torch

from .engine import Engine, Request
from .sampling import SamplingParams


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, *, attention_mask=None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float = 0.0, repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
             seed: int | None = None, compile: bool = False, num_speculative_tokens: int = 0,
             max_model_len: int | None = None) -> torch.Tensor:
    """Greedy (do_sample=False) or sampled continuation of each row. attention_mask marks left padding (0).
    compile=True compiles the decode step first (model.compile_decode). seed: row i uses seed + i.
    max_model_len: the longest prompt + new tokens accepted (default config.max_position_embeddings, the trained
    length; the model has no positional encoding, so any length runs, with K/V memory growing linearly)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len) with seq_len >= 1; "
                         "wrap a single sequence as ids[None].")
    if attention_mask is not None and attention_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows; input_ids has {input_ids.shape[0]}.")
    if compile:
        model.compile_decode()
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    requests = []
    for i, row in enumerate(input_ids.tolist()):
        if attention_mask is not None:
            row = [t for t, m in zip(row, attention_mask[i, -len(row):].tolist()) if m]
        params = SamplingParams(temperature if do_sample else 0.0, top_k or 0, 1.0 if top_p is None else top_p, min_p,
                                repetition_penalty, None if seed is None else seed + i)
        requests.append(Request(row, max_new_tokens, params, stop_token_ids=eos))
    engine = Engine(model, None, num_speculative_tokens, max_batch=max(len(requests), 1), max_model_len=max_model_len)
    results = engine.generate(requests)
    n = max(len(r.token_ids) + (r.finish_reason == "stop") for r in results)
    out = torch.full((len(results), n), eos[0] if eos else 0, dtype=input_ids.dtype, device=input_ids.device)
    for i, r in enumerate(results):
        out[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=input_ids.dtype)
    return torch.cat([input_ids, out], dim=1)
