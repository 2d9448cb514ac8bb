"""Which tasks go into each RL batch: fixed environment ratios and a pass-rate curriculum (Nemotron 3 Nano §3.2.2).

1. Profile: every task's pass rate p under the starting (SFT) model = mean reward over a few samples (`profile`).
2. Drop tasks the model always solves (p = 1): they give zero advantage to every sample.
3. Each batch holds a fixed share of prompts per environment (largest-remainder rounding of ratios * prompts).
4. Within an environment, tasks are drawn without replacement with weight
       w(p) = exp(-(p - mu_t)^2 / (2 sigma^2)),    mu_t = mu_start + (mu_end - mu_start) * min(step / total, 1)
   so the target pass rate moves linearly from easy (high p) to hard (low p) over training.
5. The batch is shuffled across environments.
Nemotron 3 re-profiles with the best RL checkpoint when progress plateaus; `set_pass_rates` takes the new numbers.
sigma, mu_start, mu_end and the ratios of the production runs are unpublished: the defaults here (0.15, 0.8, 0.2)
are our choice, with the mean kept off the ends of [0, 1] so tasks of pass rate 0 and 1 never dominate.
Without pass rates the sampling is uniform (the random-sampling baseline Nemotron 3 found worse).
Left out: running the model (profile takes a `complete` callable; the rollout builds one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from nemotron3.rl.environment import Environment, Task, reward_of


@dataclass
class CurriculumConfig:
    ratios: dict[str, float] = field(default_factory=dict)
    """Environment name -> share of every batch (normalized to sum 1); e.g. {"math": 0.5, "code": 0.5}."""
    sigma: float = 0.15
    """Width of the Gaussian over pass rate."""
    mu_start: float = 0.8
    """Pass rate the sampling centres on at step 0 (easy)."""
    mu_end: float = 0.2
    """Pass rate it centres on at total_steps and after (hard)."""
    total_steps: int = 1000
    """Steps over which the mean moves linearly from mu_start to mu_end."""
    seed: int = 0
    """Batch b of a run is a function of (seed, step) alone, so a resumed run draws the same batches."""

    def __post_init__(self):
        if not self.ratios or any(r < 0 for r in self.ratios.values()) or sum(self.ratios.values()) <= 0:
            raise ValueError(f"ratios={self.ratios} must map environment names to non-negative shares with a "
                             f"positive sum, e.g. {{'math': 0.5, 'code': 0.5}}.")
        if self.sigma <= 0:
            raise ValueError(f"sigma={self.sigma} must be > 0 (try 0.15).")
        if not (0 <= self.mu_start <= 1 and 0 <= self.mu_end <= 1):
            raise ValueError(f"mu_start={self.mu_start} and mu_end={self.mu_end} are pass rates: keep them in [0, 1].")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1.")


def task_pool(env: Environment, split: str, seed: int, size: int, max_draws: int | None = None) -> list[Task]:
    """Up to `size` distinct tasks (by prompt) from env.tasks(split, seed), looking at most max_draws (10 * size)."""
    seen, pool = set(), []
    for task in islice(env.tasks(split, seed), max_draws or 10 * size):
        key = json.dumps(task.messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            pool.append(task)
            if len(pool) == size:
                break
    return pool


def profile(env: Environment, tasks: list[Task], complete: Callable[[list[Task]], list[str]],
            samples: int = 8) -> list[float]:
    """Pass rate of each task = mean reward of `samples` completions. complete(tasks) returns one completion per
    task; it receives copies, so a multi-turn rollout may run its episode on them before `score` reads the state."""
    totals = np.zeros(len(tasks))
    for _ in range(samples):
        copies = [t.copy() for t in tasks]
        totals += [reward_of(env.score(t, c)) for t, c in zip(copies, complete(copies), strict=True)]
    return (totals / samples).tolist()


def batch_counts(ratios: dict[str, float], prompts: int) -> dict[str, int]:
    """Prompts per environment: ratios * prompts rounded by largest remainder (ties to the earlier name)."""
    total = sum(ratios.values())
    exact = {name: prompts * r / total for name, r in ratios.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda n: -(exact[n] - counts[n]))
    for name in by_remainder[:prompts - sum(counts.values())]:
        counts[name] += 1
    return counts


class Curriculum:
    """Batches of (environment name, task) drawn as the module docstring says."""

    def __init__(self, pools: dict[str, list[Task]], config: CurriculumConfig,
                 pass_rates: dict[str, list[float]] | None = None):
        if set(pools) != set(config.ratios):
            raise ValueError(f"task pools {sorted(pools)} and ratios {sorted(config.ratios)} must name the same "
                             f"environments.")
        self.config = config
        self.pools: dict[str, list[Task]] = {}
        self.pass_rates: dict[str, np.ndarray | None] = {}
        for name, tasks in pools.items():
            self._set(name, tasks, None if pass_rates is None else pass_rates[name])

    def _set(self, name: str, tasks: list[Task], rates: list[float] | None) -> None:
        if rates is not None:
            if len(rates) != len(tasks):
                raise ValueError(f"{name}: {len(rates)} pass rates for {len(tasks)} tasks; profile every task.")
            keep = [i for i, p in enumerate(rates) if p < 1.0]            # drop the always-solved
            tasks, rates = [tasks[i] for i in keep], np.asarray([rates[i] for i in keep], dtype=np.float64)
        if not tasks and self.config.ratios[name] > 0:
            raise ValueError(f"{name}: no task left to sample (all solved, or an empty pool); re-profile with "
                             f"harder tasks or set its ratio to 0.")
        self.pools[name], self.pass_rates[name] = tasks, rates

    def set_pass_rates(self, name: str, rates: list[float]) -> None:
        """Re-profiled pass rates for the current pool of `name` (e.g. with the best RL checkpoint)."""
        self._set(name, self.pools[name], rates)

    def mean_at(self, step: int) -> float:
        c = self.config
        return c.mu_start + (c.mu_end - c.mu_start) * min(step / c.total_steps, 1.0)

    def weights(self, name: str, step: int) -> np.ndarray:
        """Sampling probabilities over the pool of `name` at `step`."""
        rates = self.pass_rates[name]
        if rates is None:
            return np.full(len(self.pools[name]), 1.0 / len(self.pools[name]))
        logw = -((rates - self.mean_at(step)) ** 2) / (2 * self.config.sigma ** 2)
        w = np.exp(logw - logw.max())                                     # never all zero
        return w / w.sum()

    def batch(self, step: int, prompts: int) -> list[tuple[str, Task]]:
        rng = np.random.default_rng([self.config.seed, step])
        out = []
        for name, k in batch_counts(self.config.ratios, prompts).items():
            if k > len(self.pools[name]):
                raise ValueError(f"{name}: a batch needs {k} distinct tasks but the pool has "
                                 f"{len(self.pools[name])}; grow the pool or lower prompts per batch.")
            picks = rng.choice(len(self.pools[name]), size=k, replace=False, p=self.weights(name, step))
            out += [(name, self.pools[name][i]) for i in picks]
        return [out[i] for i in rng.permutation(len(out))]
