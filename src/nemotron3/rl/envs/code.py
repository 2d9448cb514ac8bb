"""The `code` environment: the model writes a small Python function; its outputs on hidden inputs, computed in the
sandbox, must equal the reference outputs (NeMo-Gym code_gen for Nemotron 3 competitive coding: reward 1 iff all
unit tests pass, each run in a sandboxed process).

    Write a Python function `f(x)` that returns x * 3 + 2.      -> ```python\\ndef f(x):\\n    return x * 3 + 2\\n```

The expected outputs never enter the sandbox: it prints the function's outputs on a line tagged with a random
marker, and the comparison happens here, so code that prints a fake "all passed" gains nothing.
Any sandbox failure (timeout, memory, crash, escape attempt) is reward 0 with its reason in `check(...).reason`.
Left out: stdin/stdout-style problems and real datasets (pass your own Environment); floats are compared exactly.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from nemotron3.rl.environment import Environment, Task, check_split, last_fenced_block, split_of
from nemotron3.rl.sandbox import run_python


def _families(rng: random.Random):
    """(prompt, function name, reference implementation, list of argument tuples) for one random problem."""
    a, b = rng.randint(2, 9), rng.randint(0, 9)
    ch = rng.choice("aeiorst")
    lo, hi = rng.randint(-5, 0), rng.randint(1, 9)
    k = rng.randint(2, 5)
    words = ["rat", "tea", "star", "eats", "stir", "oat", "sea", "rest", "iris", "tarot"]
    strings = [" ".join(rng.sample(words, 3)) for _ in range(5)] + [""]
    family = rng.randrange(5)
    if family == 0:
        return (f"returns x * {a} + {b}", "f", lambda x: x * a + b, [(x,) for x in (-3, 0, 1, 7, 12)])
    if family == 1:
        return (f"returns the number of times the letter '{ch}' occurs in the string s", "count_letter",
                lambda s: s.count(ch), [(s,) for s in strings])
    if family == 2:
        return (f"returns x clamped to the range [{lo}, {hi}]", "clamp", lambda x: min(max(x, lo), hi),
                [(x,) for x in (-9, lo, 0, hi, 15)])
    if family == 3:
        return (f"returns the sum of the multiples of {k} that are below n", "sum_multiples",
                lambda n: sum(range(0, n, k)), [(n,) for n in (0, 1, k, 10, 23)])
    return (f"returns the list xs with every element multiplied by {a}", "scale",
            lambda xs: [x * a for x in xs], [(xs,) for xs in ([], [1], [2, -3], [0, 5, 7])])


@dataclass
class CodeCheck:
    reward: float
    """1.0 iff every test input gave the expected output."""
    passed: int
    """Test inputs whose output matched."""
    total: int
    """Test inputs."""
    reason: str
    """Why not all passed: the sandbox's reason, 'no output', 'k of n outputs wrong'; '' when reward is 1."""


class CodeEnv(Environment):
    name = "code"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(seed)
        while True:
            what, name, reference, inputs = _families(rng)
            signature = f"{name}({', '.join(reference.__code__.co_varnames[:reference.__code__.co_argcount])})"
            prompt = (f"Write a Python function `{signature}` that {what}. Reply with the function in a "
                      f"```python code block.")
            if split_of(prompt) != split:
                continue
            yield Task([{"role": "user", "content": prompt}],
                       {"function": name, "inputs": [list(args) for args in inputs],
                        "expected": [reference(*args) for args in inputs]})

    def check(self, task: Task, completion: str) -> CodeCheck:
        code = last_fenced_block(completion, ("python", "py", "python3"))
        marker = f"__outputs_{secrets.token_hex(8)}__"
        name, inputs, expected = task.data["function"], task.data["inputs"], task.data["expected"]
        harness = (f"\n\nimport json as _json\n_outs = []\nfor _args in _json.loads({json.dumps(inputs)!r}):\n"
                   f"    try:\n        _outs.append({name}(*_args))\n    except BaseException:\n"
                   f"        _outs.append(None)\nprint({marker!r} + _json.dumps(_outs, default=repr))\n")
        result = run_python(code + harness, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        total = len(expected)
        lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
        if not result.ok or not lines:
            return CodeCheck(0.0, 0, total, result.reason or "no output")
        try:
            outputs = json.loads(lines[-1][len(marker):])
        except json.JSONDecodeError:
            return CodeCheck(0.0, 0, total, "malformed output")
        # compare through JSON so tuples/lists and ints/floats are judged as the tests were written
        passed = sum(out == json.loads(json.dumps(exp)) for out, exp in zip(outputs, expected))
        reason = "" if passed == total else f"{total - passed} of {total} outputs wrong"
        return CodeCheck(float(passed == total), passed, total, reason)

    def score(self, task: Task, completion: str) -> dict[str, float]:
        c = self.check(task, completion)
        return {"reward": c.reward, "pass_fraction": c.passed / max(c.total, 1)}
