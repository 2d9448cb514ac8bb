"""The `math` environment: arithmetic word-free problems with a \\boxed{} answer, checked by math-verify (the verifier
of NeMo-Gym's math_with_judge used for Nemotron 3 math RLVR: last \\boxed{} against the reference, reward 1/0).

    What is 7 + 12 * 3? Put the final answer in \\boxed{}.          -> reward 1 for '... \\boxed{43}'

Difficulty grows with the number of operands (2..4) and their size, so a tiny model starts with some solved and
some unsolved problems: what the pass-rate curriculum needs.
style="short" asks in the built-in SFT set's own form instead ("3+8-4=?", three one-digit operands, the whole final
answer is the number, no \\boxed{}): what the byte-level demo model was fine-tuned on, so RL has a signal to start
from (the demo's RL phase and bench/rl_curve.py).
math-verify runs in a worker process, never in the caller: its parse/verify timeouts use SIGALRM, which works
only on a process's main thread; elsewhere older releases silently returned False (a reported math-verify issue)
and 0.9 raises ValueError, so a rollout scoring from a thread pool would read every right answer as wrong. The
worker is started on first use, runs each call on its own main thread, and is replaced when a call hangs past
`timeout_s`. Inside a daemonic process (an async rollout worker, which may not start children) the call runs on
that process's own main thread instead, where the timeouts work.
Left out: the LLM-judge fallback (off in the Nano recipe) and datasets (DAPO, Skywork): pass your own Environment.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import random
import threading
from collections.abc import Iterator

from nemotron3.rl.environment import Environment, Task, check_split, split_of


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} in text (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _import_in_worker() -> None:
    import math_verify  # noqa: F401  (the slow part of the worker's start)


def _verify_in_worker(gold: str, answer: str, timeout_s: int) -> bool:
    from math_verify import parse, verify
    return bool(verify(parse(f"${gold}$", parsing_timeout=timeout_s),
                       parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s), timeout_seconds=timeout_s))


class MathVerifier:
    """math-verify in a single worker process (spawned, so no torch state is forked into it)."""

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self._pool: cf.ProcessPoolExecutor | None = None

    def __call__(self, gold: str, answer: str) -> bool:
        if self._pool is None:
            try:
                import math_verify  # noqa: F401  (fail here, in the caller, with the install line)
            except ImportError:
                raise ImportError("the math environment needs math-verify: pip install 'nemotron3[rl]' "
                                  "(or pip install math-verify)") from None
            if multiprocessing.current_process().daemon:    # an async rollout worker: it may not have children
                if threading.current_thread() is not threading.main_thread():
                    raise RuntimeError("math-verify needs a process's main thread (SIGALRM timeouts) or a child "
                                       "process; this daemonic process offers neither. Score on its main thread.")
                return _verify_in_worker(gold, answer, max(1, round(self.timeout_s)))   # its main thread: safe
            self._pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            # the worker's start (interpreter + sympy import) takes seconds, minutes on a loaded machine: wait for
            # it apart from the per-call timeout, or every call would time out and restart the worker
            self._pool.submit(_import_in_worker).result(timeout=600)
        future = self._pool.submit(_verify_in_worker, gold, answer, max(1, round(self.timeout_s)))
        try:
            return future.result(timeout=self.timeout_s + 10)
        except (cf.TimeoutError, cf.process.BrokenProcessPool):
            self.close()                                      # a hung or dead worker: start afresh next call
            return False

    def __getstate__(self):
        return {"timeout_s": self.timeout_s, "_pool": None}     # a copy (e.g. sent to a rollout worker) starts its own

    def close(self) -> None:
        if self._pool is not None:
            for p in list(self._pool._processes.values()):   # a hung worker would block shutdown(wait=True)
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _short_problem(rng: random.Random, operands: int) -> tuple[str, int]:
    """The SFT set's forms: two operands "a+b=?" (its follow-up conversations), three "a+b-c=?" (its arithmetic)."""
    if operands == 2:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a}+{b}=?", a + b
    from nemotron3.train.sft_data import _arithmetic
    question, _, value = _arithmetic(rng)
    return question, value


class MathEnv(Environment):
    name = "math"

    def __init__(self, max_operands: int = 4, max_value: int = 30, timeout_s: float = 5.0, style: str = "boxed"):
        if max_operands < 2 or max_value < 2:
            raise ValueError(f"MathEnv needs max_operands >= 2 and max_value >= 2, got {max_operands}, {max_value}.")
        if style == "short" and max_operands not in (2, 3):
            raise ValueError(f"MathEnv style='short' has 2 or 3 operands (the SFT set's forms), got {max_operands}.")
        if style not in ("boxed", "short"):
            raise ValueError(f"MathEnv style={style!r}: use 'boxed' (\\boxed{{}} answers) or 'short' (the SFT set's "
                             f"'3+8-4=?' form).")
        self.max_operands, self.max_value, self.style = max_operands, max_value, style
        self.verifier = MathVerifier(timeout_s)

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(seed)
        while True:
            if self.style == "short":
                question, value = _short_problem(rng, self.max_operands)
                if split_of(question) == split:
                    yield Task([{"role": "user", "content": question}], {"answer": str(value),
                                                                         "operands": self.max_operands})
                continue
            n = rng.randint(2, self.max_operands)
            terms = [str(rng.randint(1, self.max_value))]
            for _ in range(n - 1):
                terms += [rng.choice("+-*"), str(rng.randint(1, self.max_value if n == 2 else 9))]
            expr = " ".join(terms)
            if split_of(expr) != split:
                continue
            question = f"What is {expr}? Put the final answer in \\boxed{{}}."
            yield Task([{"role": "user", "content": question}],
                       {"answer": str(eval(expr, {"__builtins__": {}})), "operands": n})   # our own digits and ops

    def score(self, task: Task, completion: str) -> float:
        answer = last_boxed(completion) if self.style == "boxed" else completion.strip()
        if answer is None or not answer.strip():
            return 0.0
        return float(self.verifier(task.data["answer"], answer))


class ShortMathEnv(MathEnv):
    """`math_short`: the math environment in the built-in SFT set's forms (style="short"), "a+b=?" or "a+b-c=?"."""
    name = "math_short"

    def __init__(self, operands: int = 3, timeout_s: float = 5.0):
        super().__init__(max_operands=operands, timeout_s=timeout_s, style="short")
