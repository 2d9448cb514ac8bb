"""What an RL environment is: tasks in, verifiable rewards out (the role NeMo-Gym's resource servers play for
Nemotron 3 RLVR, Nano §3.2.1), and the loader that turns 'my_module:MyEnv' or a built-in name into one.

    class MyEnv(Environment):
        name = "capitals"
        def tasks(self, split, seed):             # -> Iterator[Task]; may be endless, callers islice it
            yield Task([{"role": "user", "content": "Capital of France?"}], {"answer": "Paris"})
        def score(self, task, completion):        # completion: the final answer, reasoning already removed
            return float(task.data["answer"] in completion)

    env = load_environment("my_module:MyEnv")     # or a built-in: math, code, structured, instructions, tools

Single-turn environments need `tasks` and `score`. Multi-turn ones also implement `respond(task, tool_calls)`,
which executes parsed tool calls ({"name": ..., "arguments": {...}}) and returns OpenAI-style tool messages, and
`done(task, messages)`. A multi-turn episode keeps its state in `task.data`, so each sampled trajectory runs on its
own `task.copy()`; `score` then reads the final state from there.
`score` returns a float reward, or a dict of floats holding a "reward" key plus anything worth logging.

Splits: built-in generators put each problem in "train" or "test" by a hash of its text (`split_of`), so the
held-out split never shares a problem with training whatever the seeds.
Left out: remote (HTTP) environments and LLM judges; a judge is a user environment whose score calls a model.
"""

from __future__ import annotations

import copy
import importlib
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

SPLITS = ("train", "test")


@dataclass
class Task:
    messages: list[dict]
    """The prompt in OpenAI chat form: dicts with role (system / user / assistant / tool) and content."""
    data: dict = field(default_factory=dict)
    """Whatever the environment needs to score (answer, tests, schema, constraints, tools, episode state)."""

    def copy(self) -> "Task":
        """A deep copy: one per sampled trajectory of a multi-turn environment, whose episode state lives in data."""
        return Task(copy.deepcopy(self.messages), copy.deepcopy(self.data))


class Environment:
    """Base class of RL environments; subclass it and set `name`, `tasks`, `score` (see the module docstring)."""

    name: str = ""
    multi_turn: bool = False
    """True when the environment implements respond/done (tool use); the rollout then loops until done."""

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        raise NotImplementedError(f"{type(self).__name__}.tasks(split, seed) must yield Task objects.")

    def score(self, task: Task, completion: str) -> float | dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__}.score(task, completion) must return a reward.")

    def respond(self, task: Task, tool_calls: list[dict]) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} is single-turn: it has no tools to respond with.")

    def done(self, task: Task, messages: list[dict]) -> bool:
        return True


def reward_of(score: float | dict[str, float]) -> float:
    """The scalar reward of what `score` returned."""
    return float(score["reward"]) if isinstance(score, dict) else float(score)


def split_of(key: str, test_share: int = 10) -> str:
    """'test' for about 1 in `test_share` problems, chosen by a stable hash of the problem text, else 'train'."""
    return "test" if zlib.crc32(key.encode()) % test_share == 0 else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}.")


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def last_fenced_block(text: str, languages: tuple[str, ...] = ()) -> str:
    """The body of the last ``` fenced block (of one of `languages`, or unlabelled) in text; the whole text,
    stripped, when there is none."""
    blocks = [body for lang, body in _FENCE.findall(text) if not languages or lang.lower() in languages or not lang]
    return blocks[-1].strip() if blocks else text.strip()


def load_environment(spec: str | Environment, **kwargs) -> Environment:
    """A built-in name ('math', 'code', 'structured', 'instructions', 'tools') or 'module.path:ClassName' (the module
    must be importable, e.g. on PYTHONPATH) -> an instance built with kwargs; an instance passes through."""
    if not isinstance(spec, str):
        _check_environment(spec, repr(spec))
        return spec
    from nemotron3.rl.envs import BUILTIN
    if spec in BUILTIN:
        module_name, class_name = BUILTIN[spec]
    elif ":" in spec:
        module_name, _, class_name = spec.partition(":")
        if not module_name or not class_name:
            raise ValueError(f"environment {spec!r}: write it as 'module.path:ClassName', e.g. 'my_envs:Capitals'.")
    else:
        raise ValueError(f"environment {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor "
                         f"'module.path:ClassName'; e.g. 'my_envs:Capitals' for class Capitals in my_envs.py.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"environment {spec!r}: cannot import module {module_name!r} ({e}); put its directory on "
                         f"PYTHONPATH or install it.") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and hasattr(v, "score"))
        raise ValueError(f"environment {spec!r}: module {module_name!r} has no {class_name!r}"
                         + (f"; classes with a score method there: {found}." if found else "."))
    if not isinstance(cls, type):
        raise ValueError(f"environment {spec!r}: {class_name!r} is a {type(cls).__name__}, not a class.")
    try:
        env = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"environment {spec!r}: constructing {class_name}(**{kwargs}) failed: {e}.") from None
    _check_environment(env, spec)
    return env


def _check_environment(env, spec: str) -> None:
    needed = ("tasks", "score", "respond", "done") if getattr(env, "multi_turn", False) else ("tasks", "score")
    # missing: absent, not callable, or the base class's placeholder left un-overridden
    missing = [m for m in needed if not callable(getattr(env, m, None))
               or getattr(type(env), m, None) is getattr(Environment, m)]
    if not isinstance(getattr(env, "name", None), str) or not env.name:
        missing.insert(0, "name (a non-empty str)")
    if missing:
        raise ValueError(f"environment {spec!r} lacks {', '.join(missing)}; subclass nemotron3.rl.Environment and "
                         f"define them.")
