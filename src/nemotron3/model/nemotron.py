"""The hybrid Nemotron-H / Nemotron 3 model: pre-norm residual blocks (one mixer each) from `layers_block_type`,
final norm, LM head, optional MTP heads, and the cached forward that generation builds on.

    h_0 = Embed(ids);   h_i = h_{i-1} + Mixer_i(RMSNorm_i(h_{i-1}));   logits = lm_head(norm_f(h_n))
Mixers: Mamba-2 ('M', linear_attention), GQA without RoPE ('*', full_attention), MoE / LatentMoE ('E'), relu² MLP
('-'). Module names are the HF checkpoint names (backbone.embeddings, backbone.layers.N.mixer..., backbone.norm_f,
lm_head), so loading needs only the expert-layout map in checkpoint.py. Logits come back in float32.

Left to other parts of the package: the training losses (train/), quantized linears swapped in from outside
(quant/), every generation loop (infer/: the engine; `model.generate` is infer.generate, attached to this class by
the package's __init__ so that this file imports nothing from infer/).
"""

from __future__ import annotations

import functools
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
from .moe import Experts, RouterOutput, Routing, TopKRouter, decode_schedule
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
    mamba_states: dict = field(default_factory=dict)    # keep_mamba_states: layer -> states after every token


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


    def forward(self, h, mask=None, cache: HybridCache | None = None, pos=None, span=None,
                mamba_states: dict | None = None, seq_idx=None, routing=None):
        """h (b, L, d). With a cache: pos (b,) the rows' positions, span the host-side (min, max) of pos. A dict
        `mamba_states` asks Mamba layers to store their states after every token in it
        (layer index -> (conv (b, L, K-1, C), ssm (b, L, H, P, N))), for a speculative verifier. seq_idx (b, L):
        packed-sequence numbers (cache-less); routing: a dict receiving MoE layers' RouterOutputs, or None."""
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "linear_attention":
            states = (cache.conv[self.layer_idx], cache.ssm[self.layer_idx]) if cache is not None else ()
            if mamba_states is not None and cache is not None:
                x, mamba_states[self.layer_idx] = self.mixer(x, None, *states, keep_states=True)
            else:
                x = self.mixer(x, mask if x.shape[1] > 1 else None, *states, seq_idx=seq_idx)
        elif self.kind == "full_attention":
            x = self.mixer(x, mask, cache.layer_state(self.layer_idx) if cache is not None else None, pos, span,
                           seq_idx)
        elif self.kind == "moe":      # a cached call is inference: the MoE schedule follows from the token count
            x = self.mixer(x, routing, "sorted" if cache is None else self.moe_schedule(x, compiled=False))
        else:
            x = self.mixer(x)
        residual = h.float() if self.residual_in_fp32 else h
        return residual + x

    def moe_schedule(self, x, compiled: bool) -> str:
        """The routed experts' schedule for an inference call on x (b, L, d) (moe.decode_schedule)."""
        gate = self.mixer.gate
        return decode_schedule(x.shape[0] * x.shape[1], gate.top_k, gate.num_experts, x.device.type, compiled)

    def step(self, h, state: tuple, pos: torch.Tensor, mamba_states: dict | None = None, compiled: bool = True):
        """L tokens per row at positions pos (b,), tensors only, static shapes (what compile_decode compiles).
        state is this layer's HybridCache.layer_state: (conv, ssm) for Mamba, (k, v, valid) for attention, ().
        compiled: whether the call runs inside torch.compile (False: an eager draft), for the MoE schedule."""
        x = self.norm(h.to(self.norm.weight.dtype))
        if self.kind == "linear_attention":
            if mamba_states is not None:
                x, mamba_states[self.layer_idx] = self.mixer(x, None, *state, keep_states=True)
            else:
                x = self.mixer(x, None, *state)
        elif self.kind == "full_attention":
            x = self.mixer.step_static(x, *state, pos)
        elif self.kind == "moe":
            x = self.mixer(x, None, self.moe_schedule(x, compiled))
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

    def forward(self, input_ids, mask=None, cache=None, pos=None, span=None, mamba_states=None, seq_idx=None,
                routing=None):
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, mask, cache, pos, span, mamba_states, seq_idx, routing)
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
        self._compiled_decode = self._compiled_mtp = self._compiled_draft = None
        self._cpp_wrapper = False
        self.draft_vocab: torch.Tensor | None = None   # the MTP drafter's default vocabulary (checkpoint.py saves it)
        self._draft_head: tuple | None = None          # (key, lm_head rows of a draft vocabulary), gathered once

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
                return_router: bool = False, keep_mamba_states: bool = False,
                routed_experts: torch.Tensor | None = None, seq_shard=None) -> NemotronOutput:
        """input_ids (b, L). attention_mask (b, L), or (b, cached + L) as HF generate passes it; 1 = token,
        0 = left padding. With `cache`, row r's tokens continue its cached sequence at position cache.pos[r] and the
        cache is advanced. logits_to_keep=n computes logits for the last n positions only (0 = all). mtp_depths=D
        also returns the MTP logits of depths 1..D (teacher-forced on input_ids). labels (b, L), as in HF (the inputs
        themselves; shifted here, -100 ignored), adds .loss and .accuracy (and with mtp_depths, .mtp_losses /
        .mtp_accuracies per depth), computed fused with the LM head (loss.py) without materialising logits: then
        .logits and .mtp_logits stay empty unless logits_to_keep asks for some. Combining them (L + lambda/D sum
        L_k) is the trainer's choice. loss_weights (b, L), aligned with labels, weighs the loss of predicting each
        label (for every depth); loss_reduction "mean" (weighted mean over valid targets), "sum" (a trainer then
        divides by its global count) or "none" ((b, L) per-position losses = minus the targets' log-probabilities),
        as in loss.py. position_ids (b, L) packs several sequences into a row (transformers'
        DataCollatorWithFlattening convention: positions restart at 0 at each sequence): attention is block-diagonal
        causal, every Mamba layer restarts its conv window and state, MTP and the loss never cross a boundary, so
        each sequence comes out as if run alone (no cache; the model has no positional encoding to feed).
        keep_mamba_states=True (with a cache): .mamba_states holds the Mamba layers' states after every token, so a
        speculative verifier can keep any prefix (HybridCache.keep_prefix).
        routed_experts (b, L, MoE layers, K) integer (router replay, RL): the experts each position is sent to in the
        main model's MoE layers (in layer order, as the engine's Result.routed_experts records them) instead of the
        routers' own top-K choice; the combine weights still come from the router scores of those experts.
        seq_shard (context parallelism, installed from outside by train/context_parallel.py): a function taking a
        whole-row (b, L, ...) tensor to this rank's slice of the sequence. Row-level facts (the packed-sequence
        index, the shifted targets, MTP's next tokens) come from the whole rows; the layers, logits and losses cover
        the slice (the attention and Mamba mixers, wrapped from outside, reach the whole sequence by all-to-all and
        are given seq_idx whole). Cache-less and unpadded only."""
        b, L = self._check_inputs(input_ids, cache)
        mask = self._new_token_mask(attention_mask, b, L)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; it must match input_ids "
                             f"{tuple(input_ids.shape)} (pass the input ids; they are shifted here).")
        if loss_weights is not None and (labels is None or loss_weights.shape != labels.shape):
            raise ValueError("loss_weights must come with labels and have their shape (one weight per label).")
        if mtp_depths and self.mtp is None:
            raise ValueError("mtp_depths > 0 but this model has no MTP heads (num_nextn_predict_layers=0).")
        if keep_mamba_states and (cache is None or mask is not None):
            raise ValueError("keep_mamba_states needs a cache and unpadded input_ids (it serves speculative "
                             "verification).")
        seq_idx = None
        if position_ids is not None:
            if cache is not None:
                raise ValueError("position_ids (packed sequences) is for cache-less forwards; run each sequence with "
                                 "its own cache row instead.")
            if position_ids.shape != input_ids.shape or position_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"position_ids must be an integer tensor shaped like input_ids "
                                 f"{tuple(input_ids.shape)}; got {position_ids.dtype} {tuple(position_ids.shape)}.")
            seq_idx = packed_sequence_index(position_ids)
        if seq_shard is not None and (cache is not None or mask is not None):
            raise ValueError("context parallelism runs cache-less forwards without padding; mark padding with "
                             "labels -100 or pack the rows (position_ids) instead of an attention_mask.")
        local = seq_shard or (lambda t: t)                       # whole row -> this rank's slice (or itself)
        pos = span = None
        if cache is not None:
            pos = cache.reserve(L, mask)
            if (self._compiled_decode is not None and L <= self.COMPILED_MAX_TOKENS and mask is None
                    and cache.valid is None and labels is None and not mtp_depths and not return_router
                    and routed_experts is None
                    and logits_to_keep in (0, L)):
                states = [cache.layer_state(i) for i in range(self.config.num_hidden_layers)]
                logits, h, mamba = self._compiled_decode(input_ids, pos, states, keep_mamba_states)
                cache.advance(L)
                return NemotronOutput(logits=logits, hidden_states=h, mamba_states=mamba)
            lo, hi = pos.aminmax()
            span = (int(lo), int(hi))                                               # one host sync per forward

        routing = Routing() if return_router else None    # MoE layer index -> RouterOutput (MTP: index >= n)
        if routed_experts is not None:
            routing = Routing(self._replay(local(routed_experts), b, local(input_ids).shape[1]))
        mamba_states = {} if keep_mamba_states else None
        h = self.backbone(local(input_ids), mask, cache, pos, span, mamba_states, seq_idx, routing)
        if cache is not None:
            cache.advance(L)
        out = NemotronOutput(logits=None, hidden_states=h, mamba_states=mamba_states or {})
        if labels is not None:
            def head_loss(hk, shift):                  # the LM head's loss against the labels `shift` ahead
                w = None if loss_weights is None else F.pad(loss_weights[:, shift:], (0, min(shift, L)))
                return fused_linear_cross_entropy(hk, self.lm_head.weight, local(shifted_targets(labels, mask, shift,
                                                  seq_idx)), weights=w if w is None else local(w),
                                                  reduction=loss_reduction)
            out.loss, out.accuracy = head_loss(h, 1)
        if labels is None or logits_to_keep:
            out.logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
        if mtp_depths:
            out.mtp_hidden_states = self.mtp(h, input_ids, self.backbone.embeddings, mtp_depths, mask, seq_idx,
                                             routing, seq_shard)
            if labels is None:
                out.mtp_logits = [self.lm_head(hk).float() for hk in out.mtp_hidden_states]
            else:   # depth k at position t predicts token t+k+1
                for k, hk in enumerate(out.mtp_hidden_states, start=1):
                    loss_k, acc_k = head_loss(hk, k + 1)
                    out.mtp_losses.append(loss_k)
                    out.mtp_accuracies.append(acc_k)
        out.router = dict(routing or {}) if return_router else {}
        return out

    def _replay(self, routed_experts: torch.Tensor, b: int, L: int) -> dict[int, torch.Tensor]:
        """{MoE layer index: (b*L, K) forced expert ids} from (b, L, MoE layers, K)."""
        layers = [i for i, kind in enumerate(self.config.layers_block_type) if kind == "moe"]
        K = self.config.num_experts_per_tok
        if routed_experts.shape != (b, L, len(layers), K) or routed_experts.is_floating_point():
            raise ValueError(f"routed_experts must be an integer tensor (batch, tokens, MoE layers, top-k) = "
                             f"{(b, L, len(layers), K)}; got {routed_experts.dtype} {tuple(routed_experts.shape)}.")
        return {layer: routed_experts[:, :, j].reshape(b * L, K) for j, layer in enumerate(layers)}

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

    COMPILED_MAX_TOKENS = 8     # forward() uses the compiled step for up to this many tokens per row (verify passes)

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, states: list[tuple], keep_mamba_states: bool = False):
        """L (small) tokens per row at positions pos (b,) with static shapes: attention reads its whole KV buffer
        under a position mask (gpt-fast's scheme), Mamba layers step their state (ssd_states for a verify pass,
        the chunked scan otherwise; no token loop), so the step is one graph that
        compile_decode compiles once per (batch, L, cache size). Returns (logits (b, L, V) float32, hidden (b, L, d),
        Mamba states after every token or {}); the caller advances the cache."""
        h = self.backbone.embeddings(ids)
        mamba_states = {} if keep_mamba_states else None
        for layer, state in zip(self.backbone.layers, states):
            h = layer.step(h, state, pos, mamba_states)
        h = self.backbone.norm_f(h)
        return self.lm_head(h).float(), h, mamba_states or {}

    def compile_decode(self, enable: bool = True, cpp_wrapper: bool = False) -> "NemotronForCausalLM":
        """torch.compile decode_step (one graph per batch size, token count, cache size; a few seconds each): fuses
        the step's hundreds of small ops. forward() then uses it for every cached call of up to COMPILED_MAX_TOKENS
        unpadded tokens (decode steps and speculative verify passes), mtp_step its MTP twin (the MTP cache's
        catch-up) and mtp_draft the K greedy drafts of a speculative round (one graph per K).
        cpp_wrapper: inductor's C++ wrapper around the generated kernels (opt-in: less Python per call, a few
        percent faster per step on CPU, but a cold compile takes about a minute instead of seconds).
        Idempotent; enable=False goes back to eager (and a call with another cpp_wrapper recompiles).
        Returns self."""
        if not enable or self._cpp_wrapper != cpp_wrapper:
            self._compiled_decode = self._compiled_mtp = self._compiled_draft = None
        if enable and self._compiled_decode is None:
            self._cpp_wrapper = cpp_wrapper
            compile_fn = self.compile_like_decode
            # one graph per (model, batch size, tokens per step, cache length, MTP depth): far more than dynamo's
            # default of 8 per function, past which it silently runs the step eagerly (slower than no compile)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self._compiled_decode = compile_fn(self.decode_step)
            if self.mtp is not None:
                self._compiled_mtp = compile_fn(self.mtp_decode_step)
                self._compiled_draft = compile_fn(functools.partial(self.mtp_draft_step, compiled=True))
        return self

    def compile_like_decode(self, fn):
        """torch.compile fn with compile_decode's settings (static shapes, cpp_wrapper as chosen there): for a
        caller's step built on decode_step, e.g. the engine's one-graph greedy speculative round."""
        return torch.compile(fn, dynamic=False, options={"cpp_wrapper": True} if self._cpp_wrapper else None)

    @property
    def decode_is_compiled(self) -> bool:
        return self._compiled_decode is not None

    @property
    def decode_compilation(self):
        """An object that changes whenever compile_decode compiles anew or is switched off (None when off): a
        caller that compiled its own step with compile_like_decode compiles it again when this changes."""
        return self._compiled_decode

    # ---- caches for generation (the generation loop itself is nemotron3.infer's engine) ----
    def new_cache(self, batch_size: int, max_len: int, include_mtp: bool = False, include_main: bool = True
                  ) -> HybridCache:
        p = self.lm_head.weight
        return HybridCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype, include_mtp=include_mtp,
                           include_main=include_main)

    def mtp_step(self, depth: int, h: torch.Tensor, next_ids: torch.Tensor, cache: HybridCache,
                 keep_mamba_states: bool = False) -> tuple[torch.Tensor, dict]:
        """MTP depth `depth` over L positions per row continuing `cache` (an include_mtp cache): h (b, L, d) the
        previous depth's hidden states (the main model's for depth 1), next_ids (b, L) the token after each
        position. Returns (h^depth (b, L, d), Mamba states after every token if asked) and advances the cache.
        What drafts speculative tokens (logits = lm_head(h^depth))."""
        b, L = next_ids.shape
        pos = cache.reserve(L)
        if self._compiled_mtp is not None and L <= self.COMPILED_MAX_TOKENS and cache.valid is None:
            states = {layer.layer_idx: cache.layer_state(layer.layer_idx) for layer in self.mtp.layers}
            out, mamba_states = self._compiled_mtp(depth, h, next_ids, pos, states, keep_mamba_states)
        else:
            lo, hi = pos.aminmax()
            mamba_states = {} if keep_mamba_states else None
            out = self.mtp.step(depth, h, self.backbone.embeddings(next_ids), None, cache, pos, (int(lo), int(hi)),
                                mamba_states)
        cache.advance(L)
        return out, mamba_states or {}

    def mtp_decode_step(self, depth: int, h: torch.Tensor, next_ids: torch.Tensor, pos: torch.Tensor, states: dict,
                        keep_mamba_states: bool = False):
        """mtp_step's static-shape body (what compile_decode compiles for drafting)."""
        mamba_states = {} if keep_mamba_states else None
        out = self.mtp.step_static(depth, h, self.backbone.embeddings(next_ids), states, pos, mamba_states)
        return out, mamba_states or {}

    def mtp_draft(self, h: torch.Tensor, cache: HybridCache, K: int, vocab: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """K greedy drafts in one call: h (b, 1, d) is MTP depth 1's output at each row's last verified position
        (it predicts the token after the next), `cache` the include_mtp cache holding that position. vocab: a
        draft vocabulary (LongTensor of token ids) to draft from, or None for the whole vocabulary. Returns drafts
        (b, K) (full token ids); the cache keeps its state and positions (the verify pass decides what the MTP cache
        keeps)."""
        pos = cache.reserve(K - 1)                                    # room for the K-1 draft steps' K/V
        states = {layer.layer_idx: cache.layer_state(layer.layer_idx) for layer in self.mtp.layers}
        use_compiled = self._compiled_draft is not None and cache.valid is None
        head = None if vocab is None else self.draft_head(vocab)
        return (self._compiled_draft if use_compiled else self.mtp_draft_step)(h, pos, states, K, head, vocab)

    def draft_head(self, vocab: torch.Tensor, refresh: bool = False) -> torch.Tensor:
        """The LM head's rows of a draft vocabulary (N, d), gathered once per vocabulary and weight version (an
        in-place weight update, e.g. an optimizer step, gathers them again). Weights made under inference mode keep
        no version counter: whoever updates them in place passes refresh=True (Engine.update_weights does)."""
        w = self.lm_head.weight
        key = (id(vocab), vocab.data_ptr(), len(vocab), w.data_ptr(), None if w.is_inference() else w._version)
        if refresh or self._draft_head is None or self._draft_head[0] != key:
            self._draft_head = (key, w[vocab].contiguous())
        return self._draft_head[1]

    def draft_logits(self, h: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """The drafter's logits (..., V) float32 at hidden states h (an MTP depth's output); with a draft vocabulary
        only its tokens are scored and every other token gets -inf (probability 0 after any sampling processor)."""
        if vocab is None:
            return self.lm_head(h).float()
        sub = F.linear(h, self.draft_head(vocab)).float()
        out = sub.new_full((*sub.shape[:-1], self.config.vocab_size), float("-inf"))
        return out.index_copy_(-1, vocab, sub)

    def mtp_draft_step(self, h: torch.Tensor, pos: torch.Tensor, states: dict, K: int,
                       head: torch.Tensor | None = None, vocab: torch.Tensor | None = None, compiled: bool = False
                       ) -> torch.Tensor:
        """mtp_draft's static-shape body (what compile_decode compiles): LM head, argmax and the MTP steps of all
        K drafts in one graph, so a round pays one call instead of 2K - 1:
            d_1 = argmax lm_head(h^1);   h^j = MTP_j(h^{j-1}, d_{j-1}) at pos + j - 2,   d_j = argmax lm_head(h^j)
        head: None (the LM head), or its rows of the draft vocabulary `vocab` (the argmax over those rows is mapped
        back to a token id). Mamba layers step copies of their states; attention writes K/V past the
        verified prefix, which is never read (masked by position) and is overwritten by the MTP cache's catch-up
        on the same positions."""
        states = {i: tuple(t.clone() for t in s) if len(s) == 2 else s for i, s in states.items()}   # Mamba: copies

        def pick(h):                                                                              # (b,) token ids
            if head is None:
                return self.lm_head(h[:, -1]).float().argmax(-1)
            return vocab[F.linear(h[:, -1], head).float().argmax(-1)]
        drafts = [pick(h)]
        for j in range(2, K + 1):
            h = self.mtp.step_static(j, h, self.backbone.embeddings(drafts[-1][:, None]), states, pos + (j - 2),
                                     compiled=compiled)
            drafts.append(pick(h))
        return torch.stack(drafts, 1)                                                             # (b, K)

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
