"""The hybrid Nemotron-H / Nemotron 3 model: pre-norm residual blocks (one mixer each) from `layers_block_type`,
final norm, LM head, optional MTP heads, and a minimal cached `generate`.

    h_0 = Embed(ids);   h_i = h_{i-1} + Mixer_i(RMSNorm_i(h_{i-1}));   logits = lm_head(norm_f(h_n))
Mixers: Mamba-2 ('M', linear_attention), GQA without RoPE ('*', full_attention), MoE / LatentMoE ('E'), relu² MLP
('-'). Module names are the HF checkpoint names (backbone.embeddings, backbone.layers.N.mixer..., backbone.norm_f,
lm_head), so loading needs only the expert-layout map in checkpoint.py. Logits come back in float32.

Left to other parts of the package: the training losses (train/), quantized linears swapped in from outside
(quant/), the full inference engine with speculative decoding and budgets (infer/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronConfig
from .attention import Attention
from .cache import HybridCache
from .latent_moe import build_moe
from .loss import fused_linear_cross_entropy
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .moe import Experts, RouterOutput, TopKRouter
from .mtp import MultiTokenPrediction
from .norm import RMSNorm


@dataclass
class NemotronOutput:
    logits: torch.Tensor | None                        # (b, L or logits_to_keep, V) float32
    hidden_states: torch.Tensor                        # (b, L, d) after norm_f: the input of MTP and of RL heads
    mtp_logits: list[torch.Tensor] = field(default_factory=list)   # per depth k: predicts x_{t+k+1} at position t
    mtp_hidden_states: list[torch.Tensor] = field(default_factory=list)
    router: dict[int, RouterOutput] = field(default_factory=dict)  # MoE layer index -> routing of this forward
    loss: torch.Tensor | None = None                   # next-token cross-entropy when labels were given
    accuracy: torch.Tensor | None = None               # its top-1 accuracy
    mtp_losses: list[torch.Tensor] = field(default_factory=list)      # per MTP depth k: CE against token t+k+1
    mtp_accuracies: list[torch.Tensor] = field(default_factory=list)


def shifted_targets(labels: torch.Tensor, mask: torch.Tensor | None, shift: int,
                    seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """targets[t] = labels[t + shift]; -100 (ignored) past the end, where position t or t + shift is padding, and
    where t + shift lies in the next packed sequence (seq_idx)."""
    shift = min(shift, labels.shape[1])                                      # rows shorter than the shift: no target
    targets = F.pad(labels[:, shift:], (0, shift), value=-100)
    if mask is not None:
        real = mask.bool() & F.pad(mask[:, shift:].bool(), (0, shift), value=False)
        targets = targets.masked_fill(~real, -100)
    if seq_idx is not None:
        targets = targets.masked_fill(F.pad(seq_idx[:, shift:], (0, shift), value=-1) != seq_idx, -100)
    return targets


def packed_sequence_index(position_ids: torch.Tensor) -> torch.Tensor | None:
    """seq_idx (b, L): the packed sequence each position belongs to, from position_ids that restart at 0 at every
    packed sequence (transformers' DataCollatorWithFlattening); None when no row restarts (one sequence per row)."""
    restarts = position_ids[:, 1:] == 0
    steps = (position_ids[:, 1:] == position_ids[:, :-1] + 1) | restarts
    if not bool(steps.all()):
        r, t = (~steps).nonzero()[0].tolist()
        raise ValueError(f"position_ids[{r}, {t + 1}] = {int(position_ids[r, t + 1])} after {int(position_ids[r, t])}: "
                         f"positions count 0, 1, 2, ... within each packed sequence and restart at 0 at the next.")
    if not bool(restarts.any()):
        return None
    return F.pad(restarts.long(), (1, 0)).cumsum(1)                         # (b, L)


class Block(nn.Module):
    """h + mixer(norm(h)); `kind` defaults to the layer's entry in layers_block_type."""

    def __init__(self, config: NemotronConfig, layer_idx: int, kind: str | None = None):
        super().__init__()
        self.layer_idx = layer_idx                     # also this layer's index in a HybridCache
        self.kind = kind or config.layers_block_type[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if self.kind == "linear_attention":
            self.mixer = Mamba2Mixer(config, layer_idx)
        elif self.kind == "full_attention":
            self.mixer = Attention(config, layer_idx)
        elif self.kind == "moe":
            self.mixer = build_moe(config, layer_idx)
        else:
            self.mixer = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)


    def forward(self, h, mask=None, cache: HybridCache | None = None, pos: int = 0, seq_idx=None, routing=None):
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "linear_attention":
            states = (cache.conv[self.layer_idx], cache.ssm[self.layer_idx]) if cache is not None else ()
            history = cache.history.setdefault(self.layer_idx, []) if cache is not None and cache.history is not None \
                else None
            x = self.mixer(x, mask if x.shape[1] > 1 else None, *states, history=history, seq_idx=seq_idx)
        elif self.kind == "full_attention":
            x = self.mixer(x, mask, cache.attention_kv(self.layer_idx) if cache is not None else None, pos, seq_idx)
        elif self.kind == "moe":
            x = self.mixer(x, routing)
        else:
            x = self.mixer(x)
        residual = h.float() if self.residual_in_fp32 else h
        return residual + x

    def step(self, h, state: tuple, pos_t: torch.Tensor):
        """One token, tensors only, static shapes (what compile_decode compiles). state is this layer's
        HybridCache.layer_state: (conv, ssm) for Mamba, (k, v, valid) for attention, () otherwise."""
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "linear_attention":
            x = self.mixer(x, None, *state)
        elif self.kind == "full_attention":
            x = self.mixer.step_static(x, *state, pos_t)
        else:
            x = self.mixer(x)
        residual = h.float() if self.residual_in_fp32 else h
        return residual + x


class NemotronModel(nn.Module):
    """The backbone: embeddings, the hybrid block stack, norm_f (HF `backbone.*`)."""

    def __init__(self, config: NemotronConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, mask=None, cache=None, pos: int = 0, seq_idx=None, routing=None):
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, mask, cache, pos, seq_idx, routing)
        return self.norm_f(h)


class NemotronForCausalLM(nn.Module):
    def __init__(self, config: NemotronConfig):
        super().__init__()
        if not isinstance(config, NemotronConfig):
            raise TypeError(f"NemotronForCausalLM takes a NemotronConfig, got {type(config).__name__}; "
                            f"use NemotronConfig(...), from_preset(name) or NemotronConfig.from_json_file(path).")
        self.config = config
        self.backbone = NemotronModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MultiTokenPrediction(config, Block) if config.num_nextn_predict_layers > 0 else None
        if self.lm_head.weight.device.type != "meta":
            self.apply(self._init_weights)
            self._rescale_mamba_out_proj()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self._compiled_decode = None

    # ---- initialisation, as transformers' NemotronHPreTrainedModel._init_weights ----
    def _init_weights(self, module):
        std, cfg = self.config.initializer_range, self.config
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, TopKRouter):
            nn.init.normal_(module.weight, std=std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, Experts):
            nn.init.normal_(module.up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, Mamba2Mixer):
            with torch.no_grad():
                H = cfg.mamba_num_heads
                module.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                # dt ~ logUniform[time_step_min, time_step_max], floored; dt_bias = softplus^-1(dt)
                lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
                dt = torch.exp(torch.rand(H) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
    def _rescale_mamba_out_proj(self):
        """GPT-2 scheme as HF: Mamba out_proj ~ kaiming_uniform(a=sqrt 5) / sqrt(n_layers)."""
        if not self.config.rescale_prenorm_residual:
            return
        for m in self.modules():
            if isinstance(m, Mamba2Mixer):
                nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
                m.out_proj.weight /= math.sqrt(self.config.num_hidden_layers)

    # ---- forward ----
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: HybridCache | None = None, *, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None,
                loss_reduction: str = "mean", logits_to_keep: int = 0, mtp_depths: int = 0,
                return_router: bool = False) -> NemotronOutput:
        """input_ids (b, L). attention_mask (b, L), or (b, cache.pos + L) as HF generate passes it; 1 = token,
        0 = left padding. With `cache`, the tokens continue the cached sequence and the cache is advanced.
        logits_to_keep=n computes logits for the last n positions only (0 = all). mtp_depths=D also returns the
        MTP logits of depths 1..D (teacher-forced on input_ids). labels (b, L), as in HF (the inputs themselves;
        shifted here, -100 ignored), adds .loss and .accuracy (and with mtp_depths, .mtp_losses / .mtp_accuracies
        per depth), computed fused with the LM head (loss.py) without materialising logits: then .logits and
        .mtp_logits stay empty unless logits_to_keep asks for some. Combining them (L + lambda/D sum L_k) is the
        trainer's choice. loss_weights (b, L), aligned with labels, weighs the loss of predicting each label (for
        every depth); loss_reduction "mean" (weighted mean over valid targets), "sum" (a trainer then divides by
        its global count) or "none" ((b, L) per-position losses = minus the targets' log-probabilities), as in
        loss.py. position_ids (b, L) packs several sequences into a row (transformers'
        DataCollatorWithFlattening convention: positions restart at 0 at each sequence): attention is block-diagonal
        causal, every Mamba layer restarts its conv window and state, MTP and the loss never cross a boundary, so
        each sequence comes out as if run alone (no cache; the model has no positional encoding to feed)."""
        b, L = self._check_inputs(input_ids, cache)
        mask = self._new_token_mask(attention_mask, b, L)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; it must match input_ids "
                             f"{tuple(input_ids.shape)} (pass the input ids; they are shifted here).")
        if loss_weights is not None and (labels is None or loss_weights.shape != labels.shape):
            raise ValueError("loss_weights must come with labels and have their shape (one weight per label).")
        if mtp_depths and self.mtp is None:
            raise ValueError("mtp_depths > 0 but this model has no MTP heads (num_nextn_predict_layers=0).")
        seq_idx = None
        if position_ids is not None:
            if cache is not None:
                raise ValueError("position_ids (packed sequences) is for cache-less forwards; run each sequence with "
                                 "its own cache row instead.")
            if position_ids.shape != input_ids.shape or position_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"position_ids must be an integer tensor shaped like input_ids "
                                 f"{tuple(input_ids.shape)}; got {position_ids.dtype} {tuple(position_ids.shape)}.")
            seq_idx = packed_sequence_index(position_ids)
        pos = 0
        if cache is not None:
            pos = cache.pos
            cache.record_padding(mask, L)
        if (self._compiled_decode is not None and cache is not None and L == 1 and labels is None
                and not mtp_depths and not return_router and logits_to_keep in (0, 1)):
            logits, h = self._compiled_decode(input_ids, torch.tensor(pos, device=input_ids.device),
                                              [cache.layer_state(i) for i in range(self.config.num_hidden_layers)])
            cache.pos += 1
            return NemotronOutput(logits=logits, hidden_states=h)

        routing = {} if return_router else None    # MoE layer index -> RouterOutput (MTP layers: index >= n)
        h = self.backbone(input_ids, mask, cache, pos, seq_idx, routing)
        if cache is not None:
            cache.pos += L
        out = NemotronOutput(logits=None, hidden_states=h)
        if labels is not None:
            def head_loss(hk, shift):                  # the LM head's loss against the labels `shift` ahead
                w = None if loss_weights is None else F.pad(loss_weights[:, shift:], (0, min(shift, L)))
                return fused_linear_cross_entropy(hk, self.lm_head.weight, shifted_targets(labels, mask, shift,
                                                  seq_idx), weights=w, reduction=loss_reduction)
            out.loss, out.accuracy = head_loss(h, 1)
        if labels is None or logits_to_keep:
            out.logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
        if mtp_depths:
            out.mtp_hidden_states = self.mtp(h, input_ids, self.backbone.embeddings, mtp_depths, mask, seq_idx,
                                             routing)
            if labels is None:
                out.mtp_logits = [self.lm_head(hk).float() for hk in out.mtp_hidden_states]
            else:   # depth k at position t predicts token t+k+1 (nemotron3_spec.md §2.2)
                for k, hk in enumerate(out.mtp_hidden_states, start=1):
                    loss_k, acc_k = head_loss(hk, k + 1)
                    out.mtp_losses.append(loss_k)
                    out.mtp_accuracies.append(acc_k)
        out.router = routing or {}
        return out

    @staticmethod
    def _new_token_mask(attention_mask, b: int, L: int):
        """The (b, L) padding mask of the new tokens, or None when there is no padding."""
        if attention_mask is None:
            return None
        mask = attention_mask[:, -L:]
        if mask.shape != (b, L):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {L}) or "
                             f"({b}, cached + {L}) to match input_ids.")
        return None if bool(mask.all()) else mask

    def _check_inputs(self, input_ids, cache):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len); "
                             "wrap a single sequence as ids[None].")
        b, L = input_ids.shape
        if L == 0:
            raise ValueError("input_ids is empty (seq_len 0); give at least one token.")
        if cache is None or L > 1:   # skipped on the one-token decode step: it costs a device sync per token
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids holds ids in [{lo}, {hi}] but vocab_size is {self.config.vocab_size}; "
                                 f"tokenize with this model's tokenizer.")
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"the cache was allocated for batch {cache.batch_size}, input_ids has batch {b}.")
        return b, L

    def decode_step(self, ids: torch.Tensor, pos_t: torch.Tensor, states: list[tuple]):
        """One token per row at position pos_t (0-d tensor) with static shapes: attention reads its whole KV buffer
        under a position mask (gpt-fast's scheme), so the step is one graph that compile_decode compiles once.
        Returns (logits (b, 1, V) float32, hidden (b, 1, d)); the caller advances the cache."""
        h = self.backbone.embeddings(ids)
        for layer, state in zip(self.backbone.layers, states):
            h = layer.step(h, state, pos_t)
        h = self.backbone.norm_f(h)
        return self.lm_head(h).float(), h

    def compile_decode(self, enable: bool = True) -> "NemotronForCausalLM":
        """torch.compile decode_step (one graph per batch size, cache size and padding; a few seconds): fuses the
        step's hundreds of small ops. forward() then uses it for every one-token step with a cache. Measured in
        bench/model_speed.py. Idempotent; enable=False goes back to eager. Returns self."""
        if not enable:
            self._compiled_decode = None
        elif self._compiled_decode is None:
            self._compiled_decode = torch.compile(self.decode_step, dynamic=False)
        return self

    @property
    def decode_is_compiled(self) -> bool:
        return self._compiled_decode is not None

    # ---- generation (minimal; the engine with speculative decoding lives in infer/) ----
    def new_cache(self, batch_size: int, max_len: int, include_mtp: bool = False) -> HybridCache:
        p = self.lm_head.weight
        return HybridCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype, include_mtp=include_mtp)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, attention_mask=None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 seed: int | None = None, compile: bool = False, num_speculative_tokens: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0) -> torch.Tensor:
        """Prefill then one cached step per token. Returns (b, prompt + new) ids like HF generate; rows that hit
        eos are padded with eos afterwards. Prompts of different lengths: left-pad and pass attention_mask.
        compile=True compiles the decode step first (see compile_decode). num_speculative_tokens=K > 0 drafts K
        tokens per step with the MTP heads and verifies them in one pass (greedy output is identical; sampling keeps
        the model's distribution); it, min_p and repetition_penalty run through nemotron3.infer.Engine."""
        from .sampling import sample_next_token, check_sampling_args
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        b, L = self._check_inputs(input_ids, None)
        if num_speculative_tokens or min_p or repetition_penalty != 1.0:
            return self._generate_with_engine(input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                              top_k, top_p, min_p, repetition_penalty, eos_token_id, seed,
                                              num_speculative_tokens)
        if L + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}; shorten the prompt or ask for fewer tokens.")
        if compile:
            self.compile_decode()
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        max_len = L + max_new_tokens
        if self._compiled_decode is not None:   # power-of-two cache lengths, so the compiled step is reused, not
            max_len = min(max(256, 1 << (max_len - 1).bit_length()), max(max_len, self.config.max_position_embeddings))
        cache = self.new_cache(b, max_len)      # recompiled, across calls with other lengths
        logits = self(input_ids, attention_mask, cache, logits_to_keep=1).logits[:, -1]
        out = torch.empty(b, max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        eos_t = torch.tensor(sorted(eos), device=input_ids.device) if eos else None
        n = 0
        for n in range(max_new_tokens):
            nxt = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_t is not None:
                nxt = torch.where(done, eos_t[0], nxt)
                done |= torch.isin(nxt, eos_t)
            out[:, n] = nxt
            if n + 1 == max_new_tokens or (eos_t is not None and bool(done.all())):
                break
            logits = self(nxt[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
        return torch.cat([input_ids, out[:, :n + 1]], dim=1)

    def _generate_with_engine(self, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                              min_p, repetition_penalty, eos_token_id, seed, num_speculative_tokens):
        from ..infer import Engine, Request, SamplingParams
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        reqs = []
        for i, row in enumerate(input_ids.tolist()):
            if attention_mask is not None:
                row = [t for t, m in zip(row, attention_mask[i, -len(row):].tolist()) if m]
            params = SamplingParams(temperature if do_sample else 0.0, top_k or 0, top_p or 1.0, min_p,
                                    repetition_penalty, None if seed is None else seed + i)
            reqs.append(Request(row, max_new_tokens, params, stop_token_ids=eos))
        results = Engine(self, None, num_speculative_tokens).generate(reqs)
        n = max(len(r.token_ids) + (r.finish_reason == "stop") for r in results)
        pad = eos[0] if eos else 0
        out = torch.full((len(results), n), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, r in enumerate(results):
            out[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, out], dim=1)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path_or_dir, dtype: torch.dtype | None = None, device=None) -> "NemotronForCausalLM":
        from ..checkpoint import load_pretrained
        return load_pretrained(cls, path_or_dir, dtype=dtype, device=device)

    def save_pretrained(self, save_dir, max_shard_size: int | str = "5GB") -> None:
        from ..checkpoint import save_pretrained
        save_pretrained(self, save_dir, max_shard_size=max_shard_size)


def count_parameters(config: NemotronConfig) -> dict:
    """Total and per-token active parameter counts, without allocating weights (meta device)."""
    with torch.device("meta"):
        model = NemotronForCausalLM(config)
    per_expert = config.moe_intermediate_size * config.expert_input_size * 2
    inactive = (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    n_moe = config.layers_block_type.count("moe")
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    n_mtp_moe = config.mtp_layers_block_type.count("moe") * config.num_nextn_predict_layers
    embed = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return dict(total=main, active=main - n_moe * inactive, embedding_and_head=embed,
                mtp_total=mtp, mtp_active=mtp - n_mtp_moe * inactive)
