"""Environment loading from 'module:Class' strings and built-in names. Oracle: user modules written to a temp dir
and the expected messages, word for word where they tell the user what to do."""

import sys

import pytest

from nemotron3.rl import Environment, Task, load_environment
from nemotron3.rl.environment import last_fenced_block, reward_of
from nemotron3.rl.envs.math import MathEnv

USER_MODULE = '''
from nemotron3.rl import Environment, Task

class Capitals(Environment):
    name = "capitals"
    def __init__(self, answer="Paris"):
        self.answer = answer
    def tasks(self, split, seed):
        yield Task([{"role": "user", "content": "Capital of France?"}], {"answer": self.answer})
    def score(self, task, completion):
        return float(task.data["answer"] in completion)

class DuckTyped:
    name = "duck"
    def tasks(self, split, seed):
        return iter(())
    def score(self, task, completion):
        return {"reward": 0.5, "length": float(len(completion))}

class Nameless(Environment):
    def tasks(self, split, seed):
        return iter(())
    def score(self, task, completion):
        return 0.0

class HalfTool(Environment):
    name = "half"
    multi_turn = True
    respond = None

NOT_A_CLASS = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_envs"
    sys.modules.pop("my_envs", None)


def test_user_class_loads_from_module_colon_class_with_kwargs(user_module):
    env = load_environment("my_envs:Capitals", answer="Rome")
    task = next(env.tasks("train", 0))
    assert env.name == "capitals" and task.data == {"answer": "Rome"}
    assert reward_of(env.score(task, "It is Rome.")) == 1.0
    duck = load_environment("my_envs:DuckTyped")                     # no subclassing needed
    assert reward_of(duck.score(task, "abc")) == 0.5


@pytest.mark.parametrize("spec,message", [
    ("my_envs:Missing", "module 'my_envs' has no 'Missing'; classes with a score method there: "),
    ("my_envs:NOT_A_CLASS", "'NOT_A_CLASS' is a int, not a class"),
    ("my_envs:Nameless", "lacks name (a non-empty str); subclass nemotron3.rl.Environment"),
    ("my_envs:HalfTool", "lacks tasks, score, respond, done;"),
    ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
    ("my_envs:", "write it as 'module.path:ClassName'"),
    ("mathh", "neither a built-in (math, math_short, code, structured, instructions, tools, tools_short) nor "
              "'module.path:ClassName'"),
])
def test_bad_environment_specs_get_one_clear_message(user_module, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_environment(spec)


def test_bad_constructor_arguments_name_the_class(user_module):
    with pytest.raises(ValueError, match=r"constructing Capitals\(\*\*\{'colour': 1\}\) failed"):
        load_environment("my_envs:Capitals", colour=1)


def test_builtin_names_and_instances_load():
    env = load_environment("math")
    assert isinstance(env, MathEnv) and isinstance(env, Environment)
    assert load_environment(env) is env
    assert load_environment("tools").multi_turn


def test_task_copy_is_deep_and_fenced_blocks_are_found():
    task = Task([{"role": "user", "content": "hi"}], {"db": {"a": 1}})
    twin = task.copy()
    twin.data["db"]["a"] = 2
    twin.messages[0]["content"] = "changed"
    assert task.data["db"] == {"a": 1} and task.messages[0]["content"] == "hi"
    text = "first\n```python\nx = 1\n```\nthen\n```\ny = 2\n```\nand ```json\n{}\n```"
    assert last_fenced_block(text, ("python",)) == "y = 2"                # unlabelled blocks count too
    assert last_fenced_block(text) == "{}"
    assert last_fenced_block("  no fence  ") == "no fence"
