"""Curriculum sampling. Oracles: the Gaussian-over-pass-rate formula evaluated by hand in the test, hand-rounded
batch counts, and sampling statistics (empirical frequencies over many seeds against those probabilities)."""

import math

import numpy as np
import pytest

from nemotron3.rl import Task
from nemotron3.rl.curriculum import Curriculum, CurriculumConfig, batch_counts, profile, task_pool
from nemotron3.rl.envs.instructions import InstructionsEnv
from nemotron3.rl.envs.tools import ToolsEnv


def _pool(n, tag):
    return [Task([{"role": "user", "content": f"{tag} {i}"}], {"i": i}) for i in range(n)]


RATES = [i / 20 for i in range(20)] + [1.0, 1.0]                   # 0, 0.05, ..., 0.95, then two always-solved


def test_batch_counts_follow_ratios_by_largest_remainder():
    assert batch_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 10) == {"a": 5, "b": 3, "c": 2}
    assert batch_counts({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}     # 3.5, 2.1, 1.4
    assert batch_counts({"a": 2, "b": 1}, 4) == {"a": 3, "b": 1}                          # 2.67, 1.33


def test_every_batch_has_the_fixed_environment_shares_and_is_shuffled():
    cur = Curriculum({"a": _pool(30, "a"), "b": _pool(30, "b")}, CurriculumConfig(ratios={"a": 0.75, "b": 0.25}))
    firsts = set()
    for step in range(20):
        batch = cur.batch(step, 8)
        names = [name for name, _ in batch]
        assert names.count("a") == 6 and names.count("b") == 2
        assert len({id(t) for _, t in batch}) == 8                             # no task twice in a batch
        assert all(t.messages[0]["content"].startswith(name) for name, t in batch)
        firsts.add(names[0])
    assert firsts == {"a", "b"}                                                # environments interleave
    assert [t.data for _, t in cur.batch(5, 8)] == [t.data for _, t in cur.batch(5, 8)]   # (seed, step) -> batch


def test_always_solved_tasks_are_dropped():
    cur = Curriculum({"a": _pool(22, "a")}, CurriculumConfig(ratios={"a": 1.0}), {"a": RATES})
    assert len(cur.pools["a"]) == 20 and all(t.data["i"] < 20 for t in cur.pools["a"])
    with pytest.raises(ValueError, match="no task left to sample"):
        Curriculum({"a": _pool(2, "a")}, CurriculumConfig(ratios={"a": 1.0}), {"a": [1.0, 1.0]})


@pytest.mark.parametrize("step", [0, 500, 1000, 3000])
def test_weights_are_the_gaussian_over_pass_rate_with_a_linearly_moving_mean(step):
    cfg = CurriculumConfig(ratios={"a": 1.0}, sigma=0.15, mu_start=0.8, mu_end=0.2, total_steps=1000)
    cur = Curriculum({"a": _pool(22, "a")}, cfg, {"a": RATES})
    mu = {0: 0.8, 500: 0.5, 1000: 0.2, 3000: 0.2}[step]
    raw = [math.exp(-(p - mu) ** 2 / (2 * 0.15 ** 2)) for p in RATES[:20]]
    np.testing.assert_allclose(cur.weights("a", step), np.array(raw) / sum(raw), rtol=1e-12)


def test_sampled_frequencies_match_the_weights_and_move_from_easy_to_hard():
    cfg = dict(ratios={"a": 1.0}, sigma=0.15, total_steps=100)
    draws = 4000
    for step, mu in ((0, 0.8), (100, 0.2)):
        counts = np.zeros(20)
        for seed in range(draws):
            cur = Curriculum({"a": _pool(22, "a")}, CurriculumConfig(**cfg, seed=seed), {"a": RATES})
            (_, task), = cur.batch(step, 1)
            counts[task.data["i"]] += 1
        p = cur.weights("a", step)
        # chi-square over the cells with expected count >= 5; 19 dof would give ~43 at p = 0.001
        big = p * draws >= 5
        chi2 = (((counts - p * draws) ** 2) / (p * draws))[big].sum()
        assert chi2 < 45
        mean_rate = (counts * np.array(RATES[:20])).sum() / draws
        assert abs(mean_rate - mu) < 0.05                              # centred on mu_t (clipped a little at 0/1)


def test_uniform_without_pass_rates_and_config_errors():
    cur = Curriculum({"a": _pool(4, "a")}, CurriculumConfig(ratios={"a": 1.0}))
    np.testing.assert_allclose(cur.weights("a", 0), [0.25] * 4)
    with pytest.raises(ValueError, match="needs 5 distinct tasks but the pool has 4"):
        cur.batch(0, 5)
    with pytest.raises(ValueError, match="must map environment names"):
        CurriculumConfig(ratios={})
    with pytest.raises(ValueError, match="must name the same environments"):
        Curriculum({"a": _pool(2, "a")}, CurriculumConfig(ratios={"b": 1.0}))
    with pytest.raises(ValueError, match="3 pass rates for 4 tasks"):
        Curriculum({"a": _pool(4, "a")}, CurriculumConfig(ratios={"a": 1.0}), {"a": [0.1, 0.2, 0.3]})


def test_profile_averages_rewards_and_multi_turn_completions_act_on_copies():
    env = InstructionsEnv(reward="fraction")
    tasks = task_pool(env, "train", 0, 6)
    assert len({t.messages[0]["content"] for t in tasks}) == 6
    rounds = iter(range(1000))
    # a "model" answering "X" in even sampling rounds and "" in odd ones: each pass rate is the mean of the two
    rates = profile(env, tasks, lambda ts: ["" if next(rounds) % 2 else "X"] * len(ts), samples=4)
    blank = [env.score(t, "")["reward"] for t in tasks]
    x = [env.score(t, "X")["reward"] for t in tasks]
    assert rates == pytest.approx([(a + b) / 2 for a, b in zip(blank, x)])
    assert x != blank                                                  # the two answers differ in reward
    tools = ToolsEnv()
    pool = task_pool(tools, "train", 0, 3)

    def solve(ts):                                                     # an agent that writes the target directly
        for t in ts:
            t.data["db"] = dict(t.data["target"])
        return ["done"] * len(ts)

    before = [t.copy().data for t in pool]
    assert profile(tools, pool, solve, samples=2) == [1.0, 1.0, 1.0]
    assert [t.data for t in pool] == before                            # the episodes ran on copies
    assert profile(tools, pool, lambda ts: ["nothing"] * len(ts), samples=2) == [0.0, 0.0, 0.0]
