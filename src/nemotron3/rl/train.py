"""GRPO training on the shared Trainer (Nemotron 3 Nano §3.2.5 / Super §3.2.4): RL brings only its data (rollout
batches, `RolloutBatches`) and its loss (`GRPOLoss`: grpo_loss over per-token log-probabilities the trainer's own
forward recomputes); AdamW, the schedule, clipping, the expert-bias updates, checkpoints with exact resume, metrics
and plots are the Trainer's.

    nemotron3 rl --model runs/sft/final --env math_short --out runs/rl --group-size 8 --prompts-per-step 4
    nemotron3 rl --model DIR --env math,tools --env-weights 3,1 --out RUN --async --max-age 1
    nemotron3 rl --model DIR --env my_envs:Capitals --out RUN --is-correction tis --is-bounds 0.5,5 --router-replay

One step s (the model has had s updates; Nano: one gradient step per rollout batch, so pi_old = pi_theta):
    1. push the weights, version s, to the rollout side (sync: the engine runs the trainer's own model, only the
       version moves; async: (name, tensor) pairs to the worker processes, AsyncRollouts)
    2. take prompts_per_step groups of G trajectories (sync: generated now; async: generated while the steps
       before trained, every token at most max_age versions old)
    3. recompute log pi_theta(o_t) of every sampled token with one forward (router replay: with the experts the
       engine routed each token to), advantages per group (leave-one-out, std-normalised), grpo_loss with the
       train/inference importance correction (none | tis | mask) and the sequence filter; one optimizer step.
Stability settings of §4.3: the MoE routers are frozen (their weights get no gradient), the aux-loss-free expert-bias
updates stay on, the sequence aux loss is off. MTP heads: "detached" trains them on the generated tokens with the
backbone's hidden states, the embeddings and the LM head detached (the policy gradient alone moves the policy), or
"frozen". After RL, `--heal-mtp-steps N` retrains the MTP heads alone on the final policy's generations (heal.py).
Batches come from the curriculum (curriculum.py): fixed environment ratios, tasks drawn by a Gaussian over pass rate
when --profile-samples > 0 profiles the starting model (else uniformly). The curriculum batch of step s is a function
of (seed, s), and seeded rollout streams are functions of (seed, group, sample, turn), so a sync run resumed from a
checkpoint is bit for bit the uninterrupted run (the pass rates travel in the checkpoint). So is an async run: by
default its rollouts run in lockstep waves (the batch of step s is generated whole by version max(0, s - max_age)
while the steps before it train, whatever the timing), and a checkpoint waits for the waves in flight and stores
them (the buffer) with the next task's number. --inflight-updates instead pushes weights under the sequences in
flight, as Super does (a sequence may mix versions, each token records its own): more overlap, but timing decides
which version made each token, so such a run is neither reproducible nor resumed bit for bit (its buffer is stored
all the same; staleness stays bounded by --max-age either way).
Left out: several gradient steps per rollout batch (pi_old != pi_theta), the k3 KL to a reference (no reference
model is kept; grpo_loss has it), micro-batching a step's rollouts (--grad-accum 1: advantages need whole groups).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F

from ..model.loss import fused_linear_cross_entropy
from ..model.moe import MoE
from ..model.nemotron import shifted_targets
from ..train.trainer import Trainer, TrainerConfig, build_model, config_flags, resolve_device
from .curriculum import Curriculum, CurriculumConfig, task_pool
from .environment import load_environment
from .grpo import group_advantages, grpo_loss
from .rollout import RolloutConfig, SyncRollouts, batch_tensors, policy_weights, rollout


@dataclass
class GRPOConfig(TrainerConfig):
    """RL's run settings: the trainer's plus rollouts, GRPO and the curriculum."""
    env: str = "math"
    """Environments, comma-separated: built-in names (math, math_short, code, structured, instructions, tools,
    tools_short) or module.path:ClassName for your own Environment subclass."""
    env_weights: str = ""
    """Share of every batch per environment, comma-separated in --env order, e.g. 3,1 (default: equal)."""
    out: str = "runs/rl"
    """Run directory: metrics.jsonl, checkpoints/step_N/, final/."""
    max_steps: int = 50
    """GRPO steps (one rollout batch and one optimizer step each)."""
    save_every: int = 10
    group_size: int = 16
    """G: samples per prompt (Nano / Super: 16)."""
    prompts_per_step: int = 8
    """Prompts per step (Nano 128, Super 256)."""
    max_tokens: int = 256
    """Model tokens per turn."""
    max_turns: int = 4
    """Model turns per episode (multi-turn environments)."""
    temperature: float = 1.0
    """Rollout sampling temperature (Nemotron 3: 1.0, top_p 1.0); the trainer's log-probs use the same."""
    thinking: bool = False
    """Prompts open a thought (chat template enable_thinking)."""
    stop: str = "<|im_end|>"
    """Stop strings ending a model turn besides the tokenizer's eos, comma-separated (default: the chat template's
    end of turn, which a byte-level model writes as text)."""
    async_rollouts: bool = False
    """--async: rollout workers generate the next batches while the trainer steps (Super); else sync (Nano)."""
    max_age: int = 1
    """Async: a trajectory is used only if its tokens are at most this many policy versions old."""
    inflight_updates: bool = False
    """Async: push new weights under the sequences in flight (Super; a sequence may mix versions). More overlap,
    but timing decides which version made each token: runs and resumes are not bit-exact. Default: lockstep (the
    rollouts of step s are generated whole by version max(0, s - max_age) while the steps before train)."""
    rollout_dtype: str = "float32"
    """Async: the rollout worker's weights, float32 or bfloat16 (a source of train/inference mismatch)."""
    is_correction: str = "mask"
    """Train/inference importance correction: none, tis (truncate at the upper bound) or mask (Nemotron 3's masked
    IS: tokens with weight outside the bounds get none)."""
    is_bounds: str = "0.5,5"
    """lo,hi of the importance weight exp(logp_train - logp_gen) (mask: keep lo <= w <= hi; tis: min(w, hi))."""
    seq_error_threshold: float = 2.0
    """Drop a sequence whose mean_t exp|logp_train - logp_gen| exceeds this (0 = off)."""
    eps_low: float = 0.2
    eps_high: float = 0.28
    """Clip-higher: the ratio is clipped to [1 - eps_low, 1 + eps_high]."""
    adv_clip: float = 50.0
    """Advantages clipped to [-c, c] (Super: 50)."""
    keep_overlong: bool = False
    """Train on truncated trajectories too (default: overlong filtering, they count for the baseline only)."""
    router_replay: bool = False
    """Recompute log-probs with the experts the engine routed each token to (instead of the router's own choice)."""
    mtp_train: str = "detached"
    """MTP heads during RL: detached (trained on the generated tokens, backbone input detached) or frozen."""
    heal_mtp_steps: int = 0
    """After RL: steps of MTP healing (backbone frozen, MTP heads retrained on the policy's generations)."""
    speculative_tokens: int = 0
    """MTP draft tokens per round during rollouts (0 = plain decoding; on CPU large batches gain nothing)."""
    profile_samples: int = 0
    """Curriculum: samples per task to profile pass rates with the starting model (0 = uniform sampling)."""
    task_pool: int = 256
    """Curriculum: training tasks per environment."""
    eval_tasks: int = 0
    """Held-out tasks per environment scored before and after the run (0 = none)."""
    eval_samples: int = 4
    """Samples per held-out task (mean reward = pass@1 at the rollout temperature)."""
    lr: float = 3e-6
    """Learning rate (Nemotron 3 RL: 3e-6 constant after 10 warmup steps; a tiny model needs ~1e-4)."""
    warmup_steps: int = 10
    decay_fraction: float = 0.0
    """RL keeps the learning rate constant."""
    weight_decay: float = 0.0
    aux_coeff: float = 0.0
    """The sequence aux loss stays off in RL (it makes logprob errors diverge in GRPO)."""
    eval_every: int = 10**9
    """Unused by RL (held-out reward is scored before and after: --eval-tasks)."""
    batch_size: int = 1
    """Unused by RL (a step is prompts_per_step x group_size trajectories)."""

    def validate(self) -> None:
        super().validate()
        for name in ("group_size", "prompts_per_step", "max_tokens", "max_turns", "max_age", "task_pool",
                     "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1.")
        if self.group_size < 2:
            raise ValueError(f"--group-size {self.group_size}: GRPO's leave-one-out baseline needs >= 2 samples.")
        for name in ("profile_samples", "eval_tasks", "heal_mtp_steps", "speculative_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0.")
        if self.is_correction not in ("none", "tis", "mask"):
            raise ValueError(f"--is-correction {self.is_correction}: use none, tis or mask.")
        if self.mtp_train not in ("detached", "frozen"):
            raise ValueError(f"--mtp-train {self.mtp_train}: use detached or frozen.")
        if self.grad_accum != 1:
            raise ValueError(f"--grad-accum {self.grad_accum}: RL takes one micro-batch per step (advantages need "
                             f"whole groups); lower --prompts-per-step instead.")
        if self.rollout_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--rollout-dtype {self.rollout_dtype}: use float32 or bfloat16.")
        if self.rollout_dtype != "float32" and not self.async_rollouts:
            raise ValueError("--rollout-dtype bfloat16 needs --async (sync rollouts run the trainer's own model).")
        if self.inflight_updates and not self.async_rollouts:
            raise ValueError("--inflight-updates needs --async (sync rollouts never overlap training).")
        if self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature}: RL samples; use a temperature > 0 (1.0).")
        if self.prompts_per_step > self.task_pool:
            raise ValueError(f"--prompts-per-step {self.prompts_per_step} exceeds --task-pool {self.task_pool}.")
        self.bounds(), self.weights()

    def bounds(self) -> tuple[float, float]:
        try:
            lo, hi = (float(x) for x in self.is_bounds.split(","))
        except ValueError:
            raise ValueError(f"--is-bounds {self.is_bounds}: write lo,hi, e.g. 0.5,5.") from None
        if not 0 <= lo < hi:
            raise ValueError(f"--is-bounds {self.is_bounds}: need 0 <= lo < hi, e.g. 0.5,5.")
        return lo, hi

    def env_specs(self) -> list[str]:
        specs = [s.strip() for s in self.env.split(",") if s.strip()]
        if not specs:
            raise ValueError("--env is empty; name at least one environment, e.g. --env math.")
        if len(set(specs)) != len(specs):
            raise ValueError(f"--env {self.env}: an environment is named twice.")
        return specs

    def weights(self) -> list[float]:
        n = len(self.env_specs())
        if not self.env_weights:
            return [1.0] * n
        try:
            w = [float(x) for x in self.env_weights.split(",")]
        except ValueError:
            raise ValueError(f"--env-weights {self.env_weights}: write numbers separated by commas, e.g. 3,1."
                             ) from None
        if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"--env-weights {self.env_weights}: give {n} non-negative numbers (one per --env "
                             f"entry) with a positive sum.")
        return w

    def stop_strings(self) -> list[str]:
        return [s for s in self.stop.split(",") if s]

    def episode(self) -> dict:
        """The keyword arguments of rollout() every rollout of this run shares (evaluation, profiling, healing)."""
        return dict(max_tokens=self.max_tokens, max_turns=self.max_turns, thinking=self.thinking,
                    stop=self.stop_strings())

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(group_size=self.group_size, batch_groups=self.prompts_per_step,
                             max_tokens=self.max_tokens, max_turns=self.max_turns, temperature=self.temperature,
                             seed=self.seed, thinking=self.thinking, stop=self.stop_strings(),
                             num_speculative_tokens=self.speculative_tokens,
                             max_batch=max(64, self.group_size), max_trajectory_age_steps=self.max_age,
                             return_routed_experts=self.router_replay, dtype=self.rollout_dtype,
                             inflight_updates=self.inflight_updates)


def load_envs(cfg: GRPOConfig) -> dict:
    """{environment name: Environment} from --env (a bad name fails here with the loader's message)."""
    envs = {}
    for spec in cfg.env_specs():
        env = load_environment(spec)
        if env.name in envs:
            raise ValueError(f"--env {cfg.env}: two entries build environments named {env.name!r}.")
        envs[env.name] = env
    return envs


def freeze_for_rl(model, mtp_train: str) -> None:
    """Routers frozen (their e_score_correction_bias buffers still move with the bias updates); MTP frozen on ask."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.gate.weight.requires_grad_(False)
    if model.mtp is not None and mtp_train == "frozen":
        model.mtp.requires_grad_(False)


def token_logprobs(model, input_ids: torch.Tensor, temperature: float = 1.0,
                   routed_experts: torch.Tensor | None = None):
    """(log pi(token t | tokens < t) aligned to t, with 0 at t = 0) as (B, L), and the model output. Rows are
    right-padded, so no mask is needed: a causal model never lets a token see the padding after it."""
    out = model(input_ids, routed_experts=routed_experts)
    logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, -1)              # (B, L-1, V)
    lp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                             # (B, L-1)
    return F.pad(lp, (1, 0)), out


class GRPOLoss:
    """The Trainer's loss for RL: grpo_loss of one rollout batch (see the module docstring), plus the MTP loss on
    the generated tokens when MTP trains detached. Batches carry stat_* scalars (rollout statistics), passed
    through as metrics."""

    def __init__(self, cfg: GRPOConfig, model):
        self.cfg = cfg
        self.mtp_depths = cfg.mtp_depths if model.mtp is not None and cfg.mtp_train == "detached" else 0

    def _mtp_targets(self, batch):
        labels = torch.where(batch["loss_mask"].bool(), batch["input_ids"], -100)   # the model's own tokens only
        return [shifted_targets(labels, None, k + 1) for k in range(1, self.mtp_depths + 1)]

    def count(self, batch) -> dict[str, torch.Tensor]:
        counts = {"micro_batches": torch.ones((), dtype=torch.float64)}
        for k, t in enumerate(self._mtp_targets(batch), start=1):
            counts[f"mtp{k}_targets"] = (t != -100).sum().double()
        return counts

    def __call__(self, model, batch, totals):
        cfg = self.cfg
        replay = batch.get("routed_experts") if cfg.router_replay else None
        logp, out = token_logprobs(model, batch["input_ids"], cfg.temperature, replay)
        adv = group_advantages(batch["rewards"]).reshape(-1)                             # (B,)
        loss, stats = grpo_loss(logp, logp.detach(), batch["gen_logprobs"], adv, batch["loss_mask"],
                                eps_low=cfg.eps_low, eps_high=cfg.eps_high, is_mode=cfg.is_correction,
                                is_bounds=cfg.bounds(), seq_error_threshold=cfg.seq_error_threshold or None,
                                adv_clip=cfg.adv_clip, truncated=None if cfg.keep_overlong else batch["truncated"])
        metrics = {k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items() if k != "tokens"}
        metrics["loss_tokens"] = torch.tensor(stats["tokens"], dtype=torch.float64)
        metrics["loss"] = loss.detach()
        if self.mtp_depths:
            embed = model.backbone.embeddings
            hs = model.mtp(out.hidden_states.detach(), batch["input_ids"], lambda ids: embed(ids).detach(),
                           self.mtp_depths)
            for k, (hk, target) in enumerate(zip(hs, self._mtp_targets(batch)), start=1):
                loss_k, acc_k = fused_linear_cross_entropy(hk, model.lm_head.weight.detach(), target,
                                                           reduction="sum")
                n = totals[f"mtp{k}_targets"].to(loss_k.device, loss_k.dtype).clamp(min=1)
                loss = loss + cfg.mtp_lambda / self.mtp_depths * loss_k / n
                metrics[f"mtp{k}_loss"] = (loss_k / n).detach()
                metrics[f"mtp{k}_accuracy"] = acc_k.detach() * (target != -100).sum() / n
        metrics["total_loss"] = loss.detach()
        per_batch = totals["micro_batches"].to(torch.float64)
        metrics.update({k[5:]: v.double() / per_batch for k, v in batch.items() if k.startswith("stat_")})
        return loss, metrics, out


class CurriculumTasks:
    """(environment name, Task) items: curriculum batch 0, 1, ... back to back, from task number `start` on (task
    g, the rollouts' group g, is item g % prompts of batch g // prompts)."""

    def __init__(self, curriculum: Curriculum, prompts: int, start: int = 0):
        self.curriculum, self.prompts, self.start = curriculum, prompts, start

    def __iter__(self):
        step, skip = divmod(self.start, self.prompts)
        while True:
            yield from self.curriculum.batch(step, self.prompts)[skip:]
            step, skip = step + 1, 0


class RolloutBatches:
    """The Trainer's data: one rollout batch per step as batch_tensors (plus routed_experts with router replay and
    stat_* scalars); before each batch it pushes the model's weights with their version. Resumable: state_dict
    holds the step, the curriculum's pass rates and the rollouts' state (the next task; async: the buffer, the
    groups generated for the next max_age steps, waited for and stored whole)."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, envs: dict, log=print):
        self.cfg, self.model, self.tok, self.envs, self.log = cfg, model, tokenizer, envs, log
        self.step, self.rollouts, self.pass_rates, self.rollouts_state = 0, None, None, None
        self.t_start = time.perf_counter()

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        rollouts = self.rollouts.state_dict() if self.rollouts is not None else self.rollouts_state
        return {"step": self.step, "pass_rates": self.pass_rates, "rollouts": rollouts}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.pass_rates = d["step"], d["pass_rates"]
        self.rollouts_state = d.get("rollouts")        # None from older runs: the tasks of `step` on, no buffer

    def _start(self) -> None:
        cfg = self.cfg
        pools = {name: task_pool(env, "train", cfg.seed, cfg.task_pool) for name, env in self.envs.items()}
        if self.pass_rates is None and cfg.profile_samples:
            self.pass_rates = {name: profile_pass_rates(self.model, self.tok, env, pools[name], cfg)
                               for name, env in self.envs.items()}
            self.log("curriculum pass rates (mean per environment): " + ", ".join(
                f"{k} {sum(v) / len(v):.2f}" for k, v in self.pass_rates.items()))
        ratios = dict(zip(self.envs, cfg.weights()))
        curriculum = Curriculum(pools, CurriculumConfig(ratios=ratios, total_steps=cfg.max_steps, seed=cfg.seed),
                                self.pass_rates)
        state = self.rollouts_state or {"next_group": self.step * cfg.prompts_per_step}
        if not cfg.async_rollouts and state.get("buffer"):     # an --async run's checkpoint: sync regenerates its
            state = {"next_group": self.step * cfg.prompts_per_step}      # buffer's groups instead of skipping them
        tasks = iter(CurriculumTasks(curriculum, cfg.prompts_per_step, state["next_group"]))
        rc = cfg.rollout_config()
        if cfg.async_rollouts:
            from .workers import AsyncRollouts
            self.rollouts = AsyncRollouts(self.model.config, self.tok, self.envs, rc, tasks)
        else:
            self.rollouts = SyncRollouts(self.model, self.tok, self.envs, rc, tasks)
        self.rollouts.load_state_dict(state)                   # seeded streams follow the group ids

    def __next__(self) -> dict:
        if self.rollouts is None:
            self._start()
        cfg, version = self.cfg, self.step
        t0 = time.perf_counter()
        if cfg.async_rollouts:
            self.rollouts.update_weights(policy_weights(self.model), version)
        else:
            self.rollouts.update_weights([], version)        # colocated: the engine runs the trainer's model
            self.rollouts.engine.reset_stats()
        groups = self.rollouts.get_batch(version)
        if not groups:
            raise RuntimeError("the rollout side returned no groups (its task iterator ran out).")
        batch = batch_tensors(groups)
        if cfg.router_replay:
            batch["routed_experts"] = replay_tensor(groups, batch["input_ids"].shape, self.model.config)
        batch.update(rollout_stats(groups, batch, version, time.perf_counter() - t0,
                                   time.perf_counter() - self.t_start,
                                   None if cfg.async_rollouts else self.rollouts.engine))
        self.step += 1
        return batch

    def close(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()


def replay_tensor(groups, shape, config) -> torch.Tensor:
    """(B, L, MoE layers, K) expert ids each position was routed to during generation (0 where none: padding, and
    the last token, which the engine never reads)."""
    n_moe = sum(k == "moe" for k in config.layers_block_type)
    out = torch.zeros(*shape, n_moe, config.num_experts_per_tok, dtype=torch.long)
    for i, t in enumerate(t for g in groups for t in g):
        if t.routed_experts is not None:
            out[i, :len(t.routed_experts)] = t.routed_experts
    return out


def rollout_stats(groups, batch, version: int, rollout_s: float, wall_s: float, engine) -> dict:
    """stat_* scalars of one batch: mean reward and pass rate (reward >= 1) per environment, response lengths,
    truncation share, the age of the oldest token and the oldest / newest version, MTP acceptance (sync), timings."""
    trajs = [t for g in groups for t in g]
    s: dict[str, float] = {}
    for env in sorted({t.env for t in trajs}):
        rewards = [t.reward for t in trajs if t.env == env]
        s[f"reward_{env}"] = sum(rewards) / len(rewards)
        s[f"pass_{env}"] = sum(r >= 1.0 for r in rewards) / len(rewards)
    lengths = [t.num_generated for t in trajs]
    s["reward"] = sum(t.reward for t in trajs) / len(trajs)
    s["response_len_mean"], s["response_len_max"] = sum(lengths) / len(lengths), float(max(lengths))
    s["truncated_frac"] = float(batch["truncated"].float().mean())
    versions = batch["versions"][batch["loss_mask"].bool()]
    s["max_age"] = float(version - versions.min()) if versions.numel() else 0.0
    s["oldest_version"] = float(versions.min()) if versions.numel() else float(version)
    s["newest_version"] = float(versions.max()) if versions.numel() else float(version)
    s["rollout_s"], s["wall_s"] = rollout_s, wall_s
    s["rollout_tokens_per_s"] = sum(lengths) / max(rollout_s, 1e-9)
    if engine is not None and engine.K_max:
        acc = engine.acceptance()
        s["mtp_acceptance"] = sum(acc) / len(acc)
    return {f"stat_{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in s.items()}


@torch.no_grad()
def profile_pass_rates(model, tokenizer, env, tasks, cfg: GRPOConfig) -> list[float]:
    """Each task's mean reward over profile_samples rollouts with `model` (the curriculum's pass rates)."""
    from ..infer import Engine
    engine = Engine(model, tokenizer, 0, max_batch=max(64, cfg.profile_samples))
    rates = []
    for i in range(0, len(tasks), 8):
        groups = rollout(engine, tokenizer, env, tasks[i:i + 8], cfg.profile_samples,
                         sampling=cfg.rollout_config().sampling, **cfg.episode())
        rates += [sum(t.reward for t in g) / len(g) for g in groups]
    return rates


@torch.no_grad()
def heldout_reward(model, tokenizer, envs: dict, cfg: GRPOConfig, tasks_per_env: int | None = None
                   ) -> dict[str, float]:
    """Mean reward per environment over held-out ('test' split) tasks, eval_samples each at the rollout
    temperature (seeded, so before / after compare the same draws of the same tasks)."""
    from ..infer import Engine, SamplingParams
    n = tasks_per_env or cfg.eval_tasks
    engine = Engine(model, tokenizer, 0, max_batch=max(64, cfg.eval_samples))
    sampling = SamplingParams(temperature=cfg.temperature, top_p=1.0, seed=cfg.seed + 12345)
    out = {}
    for name, env in envs.items():
        tasks = list(islice(env.tasks("test", cfg.seed + 1), n))
        groups = rollout(engine, tokenizer, env, tasks, cfg.eval_samples, sampling=sampling, **cfg.episode())
        out[name] = sum(t.reward for g in groups for t in g) / max(1, sum(len(g) for g in groups))
    return out


def train_rl(cfg: GRPOConfig, log=None) -> dict:
    """Run (or resume) GRPO; returns {"final": model dir, "before"/"after": held-out reward per environment (with
    --eval-tasks), "heal": MTP healing's acceptance before / after (with --heal-mtp-steps)}."""
    cfg.validate()
    envs = load_envs(cfg)
    say = log or print
    model, tok = build_model(cfg, device=resolve_device(cfg))
    freeze_for_rl(model, cfg.mtp_train)
    result = {}
    if cfg.eval_tasks and not cfg.resume:
        model.eval()
        result["before"] = heldout_reward(model, tok, envs, cfg)
        model.train()
        say(f"held-out reward before RL: {result['before']}")
    data = RolloutBatches(cfg, model, tok, envs, say)
    tokenizer_files = [os.path.join(cfg.model, f) for f in ("tokenizer.json", "tokenizer_config.json")
                       if cfg.model and os.path.exists(os.path.join(cfg.model, f))]
    trainer = Trainer(cfg, model, GRPOLoss(cfg, model), log)
    try:
        result["final"] = trainer.train(data, None, tokenizer_files)
    finally:
        data.close()
    model.eval()
    if cfg.eval_tasks:
        result["after"] = heldout_reward(model, tok, envs, cfg)
        say(f"held-out reward after RL: {result['after']}")
    if cfg.heal_mtp_steps:
        from .heal import heal_mtp
        result["heal"] = heal_mtp(model, tok, envs, cfg, os.path.join(cfg.out, "heal"), log=say)
        model.save_pretrained(result["final"])
        say(f"MTP healing: draft acceptance {result['heal']['before']:.3f} -> {result['heal']['after']:.3f}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 rl", description=__doc__.split("\n")[0])
    config_flags(p, GRPOConfig)
    p.add_argument("--async", dest="async_rollouts", action="store_true", help="same as --async-rollouts")
    args = vars(p.parse_args(argv))
    cfg = GRPOConfig(**args)
    result = train_rl(cfg)
    print(f"final model: {result['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
