"""Rollouts: a batch of tasks x G samples through one inference engine at once, multi-turn tool use included,
into Trajectories that carry what GRPO needs (Nemotron 3 Nano §3.2.5, Super §3.2.4: G samples per prompt at
temperature 1, top_p 1, MTP speculative decoding on; generation log-probs and the policy version of every token).

    groups = rollout(engine, tokenizer, env, tasks, group_size=16, max_tokens=512)   # per task, G Trajectories
    batch = batch_tensors(groups)        # input_ids, loss_mask, gen_logprobs, versions, rewards (P, G), truncated
    runner = RolloutRunner(engine, tokenizer, max_tokens=512)     # the same, step by step: add_group / step

All requests join the engine's running batch; each task's first turn is one request with n = G (one prefill,
forked into G samples). A multi-turn environment's episode continues while the model calls tools:
    1. the model's turn ends (stop token / string); its tool calls are parsed from the answer (reasoning removed)
    2. env.respond executes them on the trajectory's own task.copy() and returns tool messages
    3. the chat template renders the tool turn; only the rendered *suffix* is tokenized and appended, so every id
       already generated stays as it was (token-in, token-out: no re-tokenisation drift)
    4. a new request continues from the contiguous ids (ids are only ever appended; the template's prefix-stability
       is checked at every tool turn, and tests check each turn's prompt extends the previous one)
Only the model's own tokens carry loss (loss_mask 1); the appended template / tool tokens have mask 0, logprob 0
and version -1. A turn that ends on a stop token (eos, e.g. a BPE tokenizer's special <|im_end|>) keeps it, with
its generation logprob, its version and loss mask 1: the model learns to stop. The end-of-turn text the template
writes after an assistant message (e.g. "<|im_end|>\n") is then appended only for what the model did not write
itself (here "\n"; decoded with skip_special_tokens=False, the special token counts as written). A byte-level model
writes "<|im_end|>" as text (a stop string): those bytes are its tokens already.
Episodes end when the environment says done, at `max_turns` model turns, or when the next turn would not fit the
engine's context (finish_reason "length"); then env.score gives the reward.

Where rollouts run (SyncRollouts here; AsyncRollouts in workers.py, with the same calls): Nemotron 3 Nano trains
synchronously, colocated: generate the whole batch with the current weights, then one update.

    rollouts = SyncRollouts(model, tokenizer, {"math": "math"}, RolloutConfig(group_size=16), tasks)
    for step in range(steps):
        groups = rollouts.get_batch(version=step)     # batch_groups groups; tasks yields (env name, Task)
        ... one GRPO step on groups ...
        rollouts.update_weights([], version=step + 1) # colocated: the engine runs the trainer's model itself

The SSM state stays float32 during rollouts: HybridCache allocates it so whatever the model's dtype.
Left out: partial rewards per turn, and a token budget across turns (max_tokens is per model turn).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from itertools import islice
from dataclasses import dataclass, field, fields, replace

import torch

from nemotron3.chat_format import ToolCallError, parse_tool_calls
from nemotron3.infer import Engine, Request, SamplingParams
from nemotron3.rl.environment import Environment, Task, load_environment, reward_of

_PROBE = "<\x1dprobe\x1d>"   # no real message holds it; no whitespace at its ends (\x1d is, to str.strip)


@dataclass
class Trajectory:
    """One sampled episode, token by token."""
    prompt_ids: list[int]
    """The first turn's prompt: the task's messages through the chat template, with the generation prompt."""
    completion_ids: list[int]
    """Every token after the prompt: the model's turns (each with the stop token that ended it, if one did) and,
    between them, the rendered tool turns. Decode with skip_special_tokens=False to see special tokens."""
    loss_mask: list[int]
    """Per completion token: 1 where the model generated it (it carries loss), 0 for template / tool tokens."""
    gen_logprobs: list[float]
    """Per completion token: its log-probability under the distribution the engine sampled it from; 0 where
    loss_mask is 0."""
    versions: list[int]
    """Per completion token: the policy version that generated it (in-flight weight updates mix them); -1 where
    loss_mask is 0."""
    reward: float
    reward_components: dict
    """What the environment's score returned when it was a dict (its "reward" key included); else {}."""
    env: str
    task: Task
    """This trajectory's own copy of the task (a multi-turn episode's final state is in task.data)."""
    group: int
    """Trajectories of the same prompt share a group id (GRPO's baseline is over the group)."""
    sample: int
    finish_reason: str
    """The last model turn's: stop | length | abort | error; length also when the next turn would not fit."""
    num_turns: int
    """Model turns (1 for a single-turn environment)."""
    messages: list[dict]
    """The conversation as the environment saw it (task messages, assistant turns, tool replies)."""
    routed_experts: torch.Tensor | None = None
    """With return_routed_experts: (len(ids) - 1, MoE layers, K) the experts the engine routed each token it read
    to (the last turn's request covers every earlier one: its prompt is the whole episode so far)."""

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)

    @property
    def oldest_version(self) -> int | None:
        """The oldest policy version among its tokens (what the async staleness bound is checked on); None when
        the model generated no token (an aborted or failed request; an immediate stop keeps its stop token)."""
        return min((v for v in self.versions if v >= 0), default=None)

    def to_dict(self) -> dict:
        """JSON-able, for a checkpoint's rollout buffer (float logprobs survive JSON exactly); task data or messages
        that are not JSON come back as their repr (training never reads them)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["task"] = {"messages": self.task.messages, "data": self.task.data}
        d["routed_experts"] = None if self.routed_experts is None else self.routed_experts.tolist()
        return json.loads(json.dumps(d, default=repr))

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        d = dict(d, task=Task(**d["task"]))
        if d["routed_experts"] is not None:
            d["routed_experts"] = torch.tensor(d["routed_experts"], dtype=torch.long)
        return cls(**d)


class _Episode:
    """A trajectory in progress: ids so far, whose they are, the conversation."""

    def __init__(self, env: Environment, task: Task, group: int, sample: int, prompt_ids: list[int]):
        self.env, self.task, self.group, self.sample = env, task, group, sample
        self.messages = list(task.messages)
        self.prompt_ids = prompt_ids
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.turns = 0
        self.finish: str | None = None
        self.completion, self.score = "", None
        self.routed_experts = None

    def append(self, ids: list[int], generated: bool, logprobs=None, versions=None) -> None:
        self.ids += ids
        self.mask += [int(generated)] * len(ids)
        self.logprobs += list(logprobs) if generated else [0.0] * len(ids)
        self.versions += list(versions) if generated else [-1] * len(ids)

    def trajectory(self, score) -> Trajectory:
        return Trajectory(self.prompt_ids, self.ids, self.mask, self.logprobs, self.versions, reward_of(score),
                          dict(score) if isinstance(score, dict) else {}, self.env.name, self.task, self.group,
                          self.sample, self.finish, self.turns, self.messages,
                          self.routed_experts)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, thinking: bool, tools) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=thinking, **kwargs)


def tool_turn_text(tokenizer, messages: list[dict], replies: list[dict], generated_text: str, thinking: bool,
                   tools=None) -> str:
    """The text between the model's turn as generated and its next turn: the rest of the template's end-of-turn
    after an assistant message, then the tool replies and the generation prompt as the template renders them.
    messages ends with the assistant turn (its tool_calls included); generated_text is that turn decoded."""
    before = render(tokenizer, messages, False, thinking, tools)
    after = render(tokenizer, messages + replies, True, thinking, tools)
    if not after.startswith(before):
        raise ValueError("the chat template renders earlier turns differently once a tool turn follows (the "
                         "rendering without the tool turn is not a prefix of the rendering with it); multi-turn "
                         "rollouts need a prefix-stable template.")
    probe = render(tokenizer, messages[:-1] + [{"role": "assistant", "content": _PROBE}], False, thinking, tools)
    close = probe[probe.rindex(_PROBE) + len(_PROBE):]                  # e.g. "<|im_end|>\n"
    written = max(k for k in range(len(close) + 1) if generated_text.endswith(close[:k]))
    return close[written:] + after[len(before):]


class RolloutRunner:
    """Drives episodes through one engine: `add_group` queues a task's G samples, `step` runs one engine step
    and returns the groups that finished (each a list of G Trajectories, by sample). Sync rollouts run it to the
    end; an async rollout worker keeps feeding it while weights change underneath (engine.update_weights)."""

    def __init__(self, engine, tokenizer, *, sampling: SamplingParams | None = None, max_tokens: int = 512,
                 max_turns: int = 8, thinking: bool = False, stop: list[str] | tuple = (),
                 stop_token_ids: list[int] | tuple = (), return_routed_experts: bool = False):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer (model tokens per turn).")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns={max_turns!r} must be a positive integer (model turns per episode).")
        self.engine, self.tok = engine, tokenizer
        self.sampling = sampling or SamplingParams(temperature=1.0, top_p=1.0)
        self.max_tokens, self.max_turns, self.thinking = max_tokens, max_turns, thinking
        self.stop, self.stop_token_ids = list(stop), list(stop_token_ids)
        self.return_routed_experts = return_routed_experts
        self.requests: dict[int, tuple] = {}      # engine request id -> (its episodes by sample, results still due)
        self.groups: dict[int, list[_Episode]] = {}
        self._next_group = 0

    def busy(self) -> bool:
        return bool(self.groups)

    def add_group(self, env: Environment, task: Task, group_size: int, group: int | None = None) -> int:
        """Queue group_size samples of this task (one request, forked after its prefill); returns the group id."""
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} must be a positive integer (samples per prompt).")
        group = self._next_group if group is None else group
        self._next_group = max(self._next_group, group + 1)
        prompt = self.tok.encode(render(self.tok, task.messages, True, self.thinking, task.data.get("tools")))
        episodes = [_Episode(env, task.copy(), group, i, prompt) for i in range(group_size)]
        self._request(episodes, prompt, group_size)             # the engine rejects a prompt too long first
        self.groups[group] = episodes
        return group

    def step(self) -> list[list[Trajectory]]:
        finished = []
        for ev in self.engine.step():
            if ev.result is None or ev.request_id not in self.requests:
                continue
            episodes, left = self.requests[ev.request_id]
            if left == 1:
                del self.requests[ev.request_id]
            else:
                self.requests[ev.request_id] = (episodes, left - 1)
            ep = episodes[ev.sample]
            self._turn_done(ep, ev.result)
            if all(e.finish is not None for e in self.groups[ep.group]):
                finished.append([e.trajectory(e.score) for e in self.groups.pop(ep.group)])
        return finished

    def run(self, envs: list[Environment], tasks: list[Task], group_size: int, first_group: int = 0
            ) -> list[list[Trajectory]]:
        """Add a group per task (group ids first_group, first_group + 1, ...), step until all finish; the groups
        in task order."""
        for i, (env, task) in enumerate(zip(envs, tasks)):
            self.add_group(env, task, group_size, first_group + i)
        done: dict[int, list[Trajectory]] = {}
        while self.busy():
            for group in self.step():
                done[group[0].group] = group
        return [done[first_group + i] for i in range(len(tasks))]

    def abort(self) -> None:
        """Drop every episode in flight (the engine's requests too)."""
        for rid in list(self.requests):
            self.engine.abort(rid)
        self.requests.clear()
        self.groups.clear()

    # ---- one turn -------------------------------------------------------------------------------------------------
    def _request(self, episodes: list[_Episode], prompt: list[int], n: int) -> None:
        ep = episodes[0]
        max_tokens = max(1, min(self.max_tokens, self.engine.max_model_len - len(prompt)))   # a turn fits the context
        sampling = self.sampling
        if sampling.seed is not None:       # a seeded batch replays exactly: each (group, sample, turn) its stream
            sampling = replace(sampling, seed=hash((sampling.seed, ep.group, ep.sample, ep.turns)) & (2 ** 63 - 1))
        rid = self.engine.add_request(Request(prompt, max_tokens, sampling, stop=self.stop, logprobs=0,
                                              stop_token_ids=self.stop_token_ids, thinking=self.thinking, n=n,
                                              return_routed_experts=self.return_routed_experts))
        self.requests[rid] = (episodes, n)

    def _turn_done(self, ep: _Episode, result) -> None:
        ep.turns += 1
        ids, logprobs, versions = list(result.token_ids), result.sampled_logprobs.tolist(), list(result.versions)
        if result.stop_token is not None:      # the model chose to stop: that choice is trained like any other token
            token, _, lp_sampled, version = result.stop_token
            ids, logprobs, versions = ids + [token], logprobs + [lp_sampled], versions + [version]
        ep.append(ids, True, logprobs, versions)
        ep.finish = result.finish_reason
        ep.routed_experts = result.routed_experts
        content, calls = result.content, []
        if ep.env.multi_turn:
            try:
                content, parsed = parse_tool_calls(result.content, ep.task.data.get("tools"))
                calls = [{"name": c.name, "arguments": c.arguments} for c in parsed]
            except ToolCallError:         # malformed markup ends the episode; the environment scores what it has
                pass
        ep.completion = content
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        ep.messages.append(message)
        if (ep.env.multi_turn and calls and result.finish_reason == "stop" and ep.turns < self.max_turns
                and not ep.env.done(ep.task, ep.messages)):
            replies = ep.env.respond(ep.task, calls)
            written = self.tok.decode(ids, skip_special_tokens=False)       # an end-of-turn token included
            text = tool_turn_text(self.tok, ep.messages, replies, written, self.thinking, ep.task.data.get("tools"))
            ep.messages += replies
            ep.append(self.tok.encode(text), False)
            prompt = ep.prompt_ids + ep.ids             # contiguous: every earlier id kept, the tool turn appended
            if len(prompt) < self.engine.max_model_len:
                ep.finish = None
                self._request([ep], prompt, 1)
                return
            ep.finish = "length"                                  # the next turn would not fit the context
        ep.score = ep.env.score(ep.task, ep.completion)


def rollout(engine, tokenizer, env: Environment | list[Environment], tasks: list[Task], group_size: int, *,
            sampling: SamplingParams | None = None, max_tokens: int = 512, max_turns: int = 8,
            thinking: bool = False, stop: list[str] | tuple = (), stop_token_ids: list[int] | tuple = ()
            ) -> list[list[Trajectory]]:
    """Sample group_size episodes of every task concurrently through one engine; returns one group (a list of
    group_size Trajectories) per task, in task order. env: one environment, or one per task (mixed batches)."""
    envs = env if isinstance(env, list) else [env] * len(tasks)
    if len(envs) != len(tasks):
        raise ValueError(f"got {len(envs)} environments for {len(tasks)} tasks; pass one environment, or one per task.")
    if engine.has_unfinished():
        raise ValueError("this engine is running other requests; rollout needs an idle engine (or use RolloutRunner "
                         "on the shared one).")
    runner = RolloutRunner(engine, tokenizer, sampling=sampling, max_tokens=max_tokens, max_turns=max_turns,
                           thinking=thinking, stop=stop, stop_token_ids=stop_token_ids)
    return runner.run(envs, tasks, group_size)


# ---- synchronous rollouts: the trainer's batch, generated at once ------------------------------------------------
@dataclass
class RolloutConfig:
    """How rollouts are sampled and where they run (sync: SyncRollouts here; async: AsyncRollouts in workers.py)."""
    group_size: int = 16
    """G: samples per prompt (GRPO's group)."""
    batch_groups: int = 128
    """Prompts per training step (Nano 128 x 16 = 2048 rollouts; Super 256 x 16)."""
    max_tokens: int = 1024
    """Model tokens per turn."""
    max_turns: int = 8
    """Model turns per episode (multi-turn environments)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (Nemotron 3: 1.0)."""
    top_p: float = 1.0
    """Nucleus of rollouts (Nemotron 3: 1.0, i.e. the full distribution)."""
    seed: int | None = None
    """Seed of the rollout streams (None: fresh randomness)."""
    thinking: bool = False
    """Prompts open a thought (chat template enable_thinking)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings ending a model turn (besides the tokenizer's eos), e.g. the template's end-of-turn text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop tokens ending a model turn."""
    num_speculative_tokens: int | dict = 3
    """MTP draft tokens per round, or {max live batch: K} (0 = plain decoding)."""
    max_batch: int = 64
    """Sequences the engine decodes at once."""
    max_trajectory_age_steps: int = 1
    """Async: a group is used only if all its tokens come from versions >= the trainer's version minus this."""
    buffer_groups: int | None = None
    """Async: groups handed out but not yet consumed, in [batch_groups, max_trajectory_age_steps x batch_groups]
    (the default, the most overlap that can never make a group stale)."""
    device: str = "cpu"
    """Async: the rollout worker's device."""
    dtype: str = "float32"
    """Async: the rollout worker's weights, float32 or bfloat16 (the SSM state stays float32 either way)."""
    threads: int = 1
    """Async: torch threads of each rollout worker on CPU."""
    return_routed_experts: bool = False
    """Record the experts each token was routed to (Trajectory.routed_experts), for router replay in training."""
    num_workers: int = 1
    """Async: rollout workers (processes or Ray actors), each with its own model copy and engine; task g goes to
    worker g % num_workers (with inflight_updates: to the one with the fewest in hand)."""
    inflight_updates: bool = False
    """Async: apply new weights as soon as they arrive, under the sequences in flight (Super: a sequence may mix
    versions), and start tasks at once. More overlap, but which version made each token depends on timing, so a
    run is not reproducible bit for bit. Default (lockstep): a wave of tasks runs alone, start to end, with the
    weights it was handed out behind."""

    def __post_init__(self):
        for name in ("group_size", "batch_groups", "max_tokens", "max_turns", "max_batch", "threads", "num_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer.")
        if not isinstance(self.max_trajectory_age_steps, int) or self.max_trajectory_age_steps < 1:
            raise ValueError(f"max_trajectory_age_steps={self.max_trajectory_age_steps!r} must be an integer >= 1 "
                             f"(async rollouts are at least one step behind); use SyncRollouts for on-policy.")
        most = self.max_trajectory_age_steps * self.batch_groups
        if self.buffer_groups is not None and not self.batch_groups <= self.buffer_groups <= most:
            raise ValueError(f"buffer_groups={self.buffer_groups} must lie in [batch_groups, max_trajectory_age_steps "
                             f"x batch_groups] = [{self.batch_groups}, {most}] (fewer never fills a batch; more lets "
                             f"groups grow stale); or None for {most}.")
        if self.group_size > self.max_batch:
            raise ValueError(f"group_size={self.group_size} exceeds max_batch={self.max_batch}: one prompt's samples "
                             f"decode together; raise max_batch.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'.")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)     # its own checks

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    @property
    def buffer(self) -> int:
        return self.buffer_groups or self.max_trajectory_age_steps * self.batch_groups


def policy_weights(model) -> list[tuple[str, torch.Tensor]]:
    """What a weight update sends: every parameter and buffer (the MoE routers' e_score_correction_bias keeps
    moving during RL), as (name, detached tensor) pairs."""
    return [(n, t.detach()) for n, t in list(model.named_parameters()) + list(model.named_buffers())]


def runner_for(engine, tokenizer, config: RolloutConfig) -> RolloutRunner:
    return RolloutRunner(engine, tokenizer, sampling=config.sampling, max_tokens=config.max_tokens,
                         max_turns=config.max_turns, thinking=config.thinking, stop=config.stop,
                         stop_token_ids=config.stop_token_ids, return_routed_experts=config.return_routed_experts)


def environments(envs: dict) -> dict[str, Environment]:
    if not isinstance(envs, dict) or not envs:
        raise ValueError("envs must be a non-empty dict {name: Environment or 'module:Class' / built-in name}.")
    return {name: load_environment(spec) for name, spec in envs.items()}


def env_for(envs: dict[str, Environment], name: str) -> Environment:
    if name not in envs:
        raise ValueError(f"a task names environment {name!r}, but envs has only {sorted(envs)}; the task iterator "
                         f"yields (environment name, Task) with names from envs.")
    return envs[name]


class SyncRollouts:
    """Synchronous (Nano): get_batch generates batch_groups groups with the current weights, all at once through
    one engine, and returns when the last one finishes. Colocated: `model` may be the trainer's own model, and then
    update_weights([], version) only records the new version."""

    def __init__(self, model, tokenizer, envs: dict, config: RolloutConfig, tasks: Iterator[tuple[str, Task]]):
        self.envs, self.config, self.tasks = environments(envs), config, iter(tasks)
        self.tok = tokenizer
        self.engine = Engine(model, tokenizer, config.num_speculative_tokens, max_batch=config.max_batch)
        self.stats = {"tokens": 0, "seconds": 0.0, "groups": 0, "stale_dropped": 0}
        self._group = 0

    def state_dict(self) -> dict:
        """Where the task stream stands (the group id of the next task; seeded streams follow group ids)."""
        return {"next_group": self._group}

    def load_state_dict(self, d: dict) -> None:
        """Continue at d["next_group"]; the tasks iterator must continue at that task too."""
        self._group = d["next_group"]

    def get_batch(self, version: int) -> list[list[Trajectory]]:
        t0 = time.perf_counter()
        if version != self.engine.version:
            raise ValueError(f"get_batch(version={version}) but the engine holds version {self.engine.version}; call "
                             f"update_weights(named_tensors, version) after each training step.")
        items = list(islice(self.tasks, self.config.batch_groups))
        envs = [env_for(self.envs, name) for name, _ in items]
        groups = runner_for(self.engine, self.tok, self.config).run(envs, [task for _, task in items],
                                                                   self.config.group_size, self._group)
        self._group += len(groups)
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["tokens"] += sum(t.num_generated for g in groups for t in g)
        self.stats["groups"] += len(groups)
        return groups

    def update_weights(self, named_tensors, version: int) -> None:
        self.engine.update_weights(named_tensors, version)

    def close(self) -> None:
        pass


def batch_tensors(groups: list[list[Trajectory]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """What a GRPO step reads, right-padded to the longest episode (B = groups x G rows, in group order):
    input_ids (B, L) prompt + completion; attention_mask (B, L); and, aligned to the token they describe (the
    logits that predict token t sit at position t - 1), loss_mask (B, L), gen_logprobs (B, L) float32 and
    versions (B, L) (-1 off the model's tokens); rewards (P, G) float32; truncated (B,) bool."""
    trajs = [t for g in groups for t in g]
    if not trajs or len({len(g) for g in groups}) != 1:
        raise ValueError("batch_tensors needs a non-empty list of groups of equal size (G samples each).")
    L = max(len(t.ids) for t in trajs)
    out = {"input_ids": torch.full((len(trajs), L), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(len(trajs), L, dtype=torch.long),
           "loss_mask": torch.zeros(len(trajs), L, dtype=torch.long),
           "gen_logprobs": torch.zeros(len(trajs), L),
           "versions": torch.full((len(trajs), L), -1, dtype=torch.long)}
    for i, t in enumerate(trajs):
        P, n = len(t.prompt_ids), len(t.ids)
        out["input_ids"][i, :n] = torch.tensor(t.ids)
        out["attention_mask"][i, :n] = 1
        out["loss_mask"][i, P:n] = torch.tensor(t.loss_mask, dtype=torch.long)
        out["gen_logprobs"][i, P:n] = torch.tensor(t.gen_logprobs)
        out["versions"][i, P:n] = torch.tensor(t.versions, dtype=torch.long)
    out["rewards"] = torch.tensor([[t.reward for t in g] for g in groups])
    out["truncated"] = torch.tensor([t.truncated for t in trajs])
    return out

