"""Asynchronous rollouts (Nemotron 3 Super §3.2.4): rollout workers generate the next batches while the trainer
steps; a trajectory is used only if its tokens are at most `max_trajectory_age_steps` policy versions old. The same
calls as SyncRollouts (rl/rollout.py):

    rollouts = AsyncRollouts(model.config, tokenizer, envs, config, tasks)      # workers start (spawned processes)
    rollouts.update_weights(policy_weights(model), version=0)
    for step in range(steps):
        groups = rollouts.get_batch(version=step)      # generated while the previous step trained
        ... one GRPO step on groups ...
        rollouts.update_weights(policy_weights(model), version=step + 1)
    rollouts.close()

Protocol. The trainer talks to a worker over two FIFO queues. To the worker: ("weights", version, packed (name,
tensor) pairs: one flat CPU tensor per dtype, see pack_weights), ("tasks", [(group, env, task), ...]): a wave of
at most batch_groups tasks, ("stop",). From it: ("group", [Trajectory]), ("error", traceback), ("stopped", stats).
The buffer is bounded by credits: the trainer hands out at most buffer_groups tasks it has not consumed yet, and
one more for each group it takes. Groups are consumed in task order; one that finishes early waits in the buffer.

Two schedules, both within the staleness bound:
- lockstep (default): the worker starts a wave only when it is idle and applies weights only between waves, so a
  wave runs alone through the engine, start to end, with the last weights queued before it. The trainer hands out
  the tasks of step s + max_age in get_batch(s), right behind the weights of version s: with the default buffer
  every token of the batch of step s comes from version max(0, s - max_age), whatever the timing. Seeded rollout
  streams then make a run reproducible bit for bit, and state_dict (which waits for the waves in flight and
  returns them) makes a resumed run equal the uninterrupted one.
- in-flight updates (config.inflight_updates, as Super does): every message is applied between two engine steps,
  so weights change under sequences in flight (each token records the version that produced it; caches are not
  recomputed) and tasks join the running batch. More overlap; which version made which token depends on timing.
Staleness by construction: a task handed out by get_batch(s) travels behind the weights of version s (one FIFO
queue), so all its tokens have version >= s; with buffer_groups <= max_age * batch_groups and batch_groups taken
per step in task order, it is consumed by step s + max_age at the latest. So no group is ever too old and no
rollout is wasted, as long as the trainer pushes one version per get_batch. If it pushes more (several updates
per batch), get_batch drops a group that got too old, counts it (stats["stale_dropped"]) and hands out a new task
for it; it never trains on it.

The Ray backend runs the same worker loop inside a Ray actor (one machine or many); `pip install nemotron3[ray]`.
With num_workers > 1 every worker gets every weights message, task g goes to worker g % num_workers (in-flight:
to the worker with the fewest in hand), and the argument above holds per queue unchanged.
Left out: placing workers on different GPUs (all use config.device), NCCL weight broadcast (weights travel as CPU
tensors through shared memory), partial groups.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from itertools import islice

import torch

from nemotron3.infer import Engine
from nemotron3.rl.environment import Task
from nemotron3.rl.rollout import RolloutConfig, Trajectory, env_for, environments, runner_for


def pack_weights(named_tensors) -> list[tuple[torch.Tensor, list[tuple[str, tuple]]]]:
    """(name, tensor) pairs -> one flat CPU tensor per dtype with the (name, shape) of each slice: one shared-memory
    segment per dtype crosses the process boundary instead of one per tensor."""
    by_dtype: dict[torch.dtype, list] = {}
    for name, t in named_tensors:
        by_dtype.setdefault(t.dtype, []).append((name, t.detach()))
    return [(torch.cat([t.reshape(-1).cpu() for _, t in items]), [(n, tuple(t.shape)) for n, t in items])
            for items in by_dtype.values()]


def unpack_weights(packed) -> list[tuple[str, torch.Tensor]]:
    out = []
    for flat, entries in packed:
        offset = 0
        for name, shape in entries:
            n = torch.Size(shape).numel()
            out.append((name, flat[offset:offset + n].view(shape)))
            offset += n
    return out


# ---- the async worker ---------------------------------------------------------------------------------------------
def worker_loop(model_config, tokenizer, envs: dict, config: RolloutConfig, get, put) -> None:
    """The rollout worker: builds its own model and engine on the first weights message, then alternates between
    control messages (get(block) -> message or None) and engine steps, putting finished groups (put). Lockstep:
    messages that arrive while a wave is in flight wait in `pending` until it is done (a stop never waits)."""
    torch.set_num_threads(config.threads)
    try:
        from nemotron3 import NemotronForCausalLM
        envs = environments(envs)
        engine = runner = None
        pending: deque = deque()
        while True:
            busy = runner is not None and runner.busy()
            msg = get(not busy and not pending)
            while msg is not None:
                pending.append(msg)
                msg = get(False)
            if any(m[0] == "stop" for m in pending):
                if runner is not None:
                    runner.abort()
                put(("stopped", {"version": engine.version if engine else None}))
                return
            while pending and (config.inflight_updates or runner is None or not runner.busy()):
                msg = pending.popleft()
                if msg[0] == "weights":
                    if engine is None:
                        model = NemotronForCausalLM(model_config).to(config.device, getattr(torch, config.dtype))
                        model.eval()
                        engine = Engine(model, tokenizer, config.num_speculative_tokens, max_batch=config.max_batch)
                        runner = runner_for(engine, tokenizer, config)
                    engine.update_weights(unpack_weights(msg[2]), msg[1])
                elif msg[0] == "tasks":
                    for group, env_name, task in msg[1]:
                        runner.add_group(env_for(envs, env_name), task, config.group_size, group)
            if runner is not None and runner.busy():
                for group in runner.step():
                    put(("group", group))
    except Exception:
        put(("error", traceback.format_exc()))


def _process_main(model_config, tokenizer, envs, config, control, out) -> None:
    import multiprocessing
    parent = multiprocessing.parent_process()

    def get(block):
        while True:
            try:
                return control.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                if not block:
                    return None
                if parent is not None and not parent.is_alive():     # the trainer was killed: nobody will read
                    out.cancel_join_thread()
                    os._exit(0)
    worker_loop(model_config, tokenizer, envs, config, get, out.put)


class _ProcessWorkers:
    """The workers as child processes (spawned: a fresh interpreter, no forked torch state); one control queue
    each, one shared queue back."""

    def __init__(self, n: int, model_config, tokenizer, envs, config):
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.out = ctx.Queue()
        self.controls = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_process_main, args=(model_config, tokenizer, envs, config, c, self.out),
                                  daemon=True, name=f"nemotron3-rollout-{i}") for i, c in enumerate(self.controls)]
        for p in self.procs:
            p.start()

    def send(self, i: int, msg) -> None:
        self.controls[i].put(msg)

    def recv(self, timeout: float):
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            return None

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def any_alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def describe(self) -> str:
        return f"process exit codes {[p.exitcode for p in self.procs]}"

    def join(self, timeout: float) -> int | None:
        for p, c in zip(self.procs, self.controls):
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(5)
            c.cancel_join_thread()           # unread messages need not be flushed to a process that is gone
        return next((p.exitcode for p in self.procs if p.exitcode != 0), 0)


class _RayWorkers:
    """The same worker loop inside Ray actors (a thread runs the loop; the actor's methods move messages)."""

    def __init__(self, n: int, model_config, tokenizer, envs, config, ray_init: dict | None):
        try:
            import ray
        except ImportError:
            raise ImportError("the Ray backend needs ray: pip install nemotron3[ray]  (or pip install ray)") from None
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(**(ray_init or {}))
        self.ray = ray
        actor = ray.remote(_RayActor).options(num_cpus=config.threads)
        self.actors = [actor.remote(model_config, tokenizer, envs, config) for _ in range(n)]
        self._pending: list = []

    def send(self, i: int, msg) -> None:
        self.actors[i].send.remote(msg)          # calls of one caller run in order on a (non-async) actor

    def recv(self, timeout: float):
        if not self._pending:                    # each actor waits at most this long; sends queue behind it
            wait = min(timeout, 0.2)
            self._pending = [m for ms in self.ray.get([a.recv.remote(wait) for a in self.actors]) for m in ms]
        return self._pending.pop(0) if self._pending else None

    def alive(self) -> bool:
        return True                              # a dead actor raises in ray.get

    any_alive = alive

    def describe(self) -> str:
        return "Ray actors"

    def join(self, timeout: float) -> int | None:
        for a in self.actors:
            self.ray.kill(a)
        if self.owns_ray:
            self.ray.shutdown()
        return 0


class _RayActor:
    def __init__(self, model_config, tokenizer, envs, config):
        self.control, self.out = queue.Queue(), queue.Queue()

        def get(block):
            try:
                return self.control.get(block=block)
            except queue.Empty:
                return None
        self.thread = threading.Thread(target=worker_loop, daemon=True,
                                       args=(model_config, tokenizer, envs, config, get, self.out.put))
        self.thread.start()

    def send(self, msg) -> None:
        self.control.put(msg)

    def recv(self, timeout: float) -> list:
        try:
            items = [self.out.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.out.empty():
            items.append(self.out.get_nowait())
        return items


class AsyncRollouts:
    """Asynchronous (Super): a rollout worker generates continuously into a bounded buffer while the trainer
    steps (see the module docstring for the protocol and the staleness argument). model_config: the policy's
    NemotronConfig (the worker builds its own copy); the first update_weights (version 0) must come before
    get_batch. backend: "process" (default) or "ray": the worker becomes a Ray actor, on a running Ray cluster if
    one is initialized, else on a local instance started with ray.init(**ray_init) and shut down by close (pass
    _temp_dir=<run dir>/ray so Ray writes there; keep it short: Ray's socket paths must fit 107 bytes)."""

    def __init__(self, model_config, tokenizer, envs: dict, config: RolloutConfig, tasks: Iterator[tuple[str, Task]],
                 backend: str = "process", ray_init: dict | None = None, timeout_s: float = 600.0):
        if backend not in ("process", "ray"):
            raise ValueError(f"backend={backend!r} is unknown; use 'process' or 'ray'.")
        self.envs = environments(envs)                      # a bad spec fails here, not in the worker
        self.config, self.tasks, self.timeout_s = config, iter(tasks), timeout_s
        n = config.num_workers
        self.workers = (_ProcessWorkers(n, model_config, tokenizer, envs, config) if backend == "process"
                        else _RayWorkers(n, model_config, tokenizer, envs, config, ray_init))
        self.in_hand = [0] * n                     # per worker: tasks sent, groups not yet back
        self.owner: dict[int, int] = {}            # group -> the worker generating it
        self.sent: deque[int] = deque()           # groups handed out and not yet consumed, in task order
        self.done: dict[int, list[Trajectory]] = {}   # the buffer: finished groups waiting for their turn
        self.version = None
        self._group = 0
        self._credits_given = False
        self._closed = False
        self._t0 = time.perf_counter()
        self.stats = {"tokens": 0, "groups": 0, "stale_dropped": 0, "max_age_seen": 0, "mixed_version": 0,
                      "seconds_waiting": 0.0}

    def update_weights(self, named_tensors, version: int) -> None:
        """Push new weights (all of them, as (name, tensor) pairs; see policy_weights) tagged with their version.
        They travel as CPU copies (shared memory), so the trainer may change its own tensors at once."""
        if self.version is not None and version <= self.version:
            raise ValueError(f"update_weights(version={version}) after version {self.version}: versions must grow.")
        packed = pack_weights(named_tensors)
        for i in range(self.config.num_workers):
            self.workers.send(i, ("weights", version, packed))
        self.version = version

    def _send_tasks(self, n: int) -> None:
        """Hand out the next n tasks (fewer when the iterator runs out) in waves of at most batch_groups."""
        items = []
        for item in islice(self.tasks, n):
            env_for(self.envs, item[0])
            items.append((self._group, *item))
            self._group += 1
        workers = len(self.in_hand)
        for start in range(0, len(items), self.config.batch_groups):
            waves = [[] for _ in range(workers)]
            for task in items[start:start + self.config.batch_groups]:
                i = (min(range(workers), key=self.in_hand.__getitem__) if self.config.inflight_updates
                     else task[0] % workers)              # lockstep: not the timing of replies, the group id
                waves[i].append(task)
                self.in_hand[i] += 1
                self.owner[task[0]] = i
                self.sent.append(task[0])
            for i, wave in enumerate(waves):
                if wave:
                    self.workers.send(i, ("tasks", wave))

    def _receive(self, timeout: float) -> None:
        msg = self.workers.recv(timeout)
        if msg is None:
            if not self.workers.alive():
                raise RuntimeError(f"a rollout worker exited without a word ({self.workers.describe()}). A script "
                                   f"that starts AsyncRollouts at module level must do it under `if __name__ == "
                                   f"'__main__':` (the spawned worker re-imports the main module); else: out of "
                                   f"memory?")
            return
        if msg[0] == "error":
            raise RuntimeError(f"a rollout worker failed:\n{msg[1]}")
        if msg[0] == "group":
            group = msg[1][0].group
            self.done[group] = msg[1]
            self.in_hand[self.owner.pop(group)] -= 1

    def get_batch(self, version: int) -> list[list[Trajectory]]:
        """The next batch_groups groups in task order, each with every token of version >= version -
        max_trajectory_age_steps; fewer only when the task iterator has run out (an empty list: nothing left)."""
        if self.version is None:
            raise ValueError("push the initial weights first: update_weights(policy_weights(model), version=0).")
        if not self._credits_given:
            self._send_tasks(self.config.buffer)
            self._credits_given = True
        B, floor = self.config.batch_groups, version - self.config.max_trajectory_age_steps
        t0 = time.perf_counter()
        batch = []
        while len(batch) < B and self.sent:
            if self.sent[0] not in self.done:
                if time.perf_counter() - t0 > self.timeout_s:
                    raise RuntimeError(f"no batch after {self.timeout_s:.0f} s ({len(batch)} of {B} groups); raise "
                                       f"timeout_s or lower max_tokens / batch_groups.")
                self._receive(timeout=1.0)
                continue
            group = self.done.pop(self.sent.popleft())
            if _oldest(group, version) < floor:      # never trained on; its slot goes to a new task
                self.stats["stale_dropped"] += 1
                self._send_tasks(1)
                continue
            batch.append(group)
        self.stats["seconds_waiting"] += time.perf_counter() - t0
        self._send_tasks(len(batch))
        for g in batch:
            self.stats["max_age_seen"] = max(self.stats["max_age_seen"], version - _oldest(g, version))
            self.stats["mixed_version"] += sum(len({v for v in t.versions if v >= 0}) > 1 for t in g)
            self.stats["tokens"] += sum(t.num_generated for t in g)
        self.stats["groups"] += len(batch)
        return batch

    def state_dict(self) -> dict:
        """JSON-able state for exact resume: waits for every group handed out (they need no newer weights than
        those already pushed), then returns them with the count of tasks handed out. A fresh AsyncRollouts whose
        tasks iterator continues at task `next_group` and that loads it returns the same batches as this one."""
        t0 = time.perf_counter()
        while any(g not in self.done for g in self.sent):
            if time.perf_counter() - t0 > self.timeout_s:
                raise RuntimeError(f"the rollout buffer did not finish within {self.timeout_s:.0f} s; raise "
                                   f"timeout_s or lower max_tokens / batch_groups.")
            self._receive(timeout=1.0)
        return {"next_group": self._group, "handed_out": self._credits_given,
                "buffer": [[t.to_dict() for t in self.done[g]] for g in self.sent]}

    def load_state_dict(self, d: dict) -> None:
        """Before the first get_batch: continue from a state_dict (a state without "buffer", as SyncRollouts
        writes, starts at its next_group with an empty buffer)."""
        if self.sent or self._credits_given:
            raise ValueError("load_state_dict must come before the first get_batch.")
        groups = [[Trajectory.from_dict(t) for t in g] for g in d.get("buffer", [])]
        self._group, self._credits_given = d["next_group"], d.get("handed_out", False)
        self.sent = deque(g[0].group for g in groups)
        self.done = {g[0].group: g for g in groups}

    def close(self, timeout: float = 30.0) -> int | None:
        """Stop the workers (their sequences in flight are aborted) and wait for them; returns 0 when all exited
        cleanly, else the first other exit code (None when already closed)."""
        if self._closed:
            return None
        self._closed = True
        for i in range(self.config.num_workers):
            self.workers.send(i, ("stop",))
        t0, finished = time.perf_counter(), 0
        while finished < self.config.num_workers and time.perf_counter() - t0 < timeout:
            msg = self.workers.recv(0.5)        # drain, so each worker's queue can flush and it can exit
            if msg is not None and msg[0] in ("stopped", "error"):
                finished += 1
            elif msg is None and not self.workers.any_alive():
                break
        return self.workers.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _oldest(group: list[Trajectory], default: int) -> int:
    """The oldest version of any token of the group; default when the group generated no token at all."""
    return min((t.oldest_version for t in group if t.oldest_version is not None), default=default)
