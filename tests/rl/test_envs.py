"""Built-in environments on fixed right / wrong answers. Oracles: hand-written answers and solutions (built in the
test from the prompt text, not from the task's stored answer), math-verify's and jsonschema's own verdicts on fixed
strings, scripted tool-using agents that read only the user's request (tools_short: products computed in the test),
and the built-in SFT set's own generators for the form tools_short asks in."""

import json
import random
import re
import threading
from itertools import islice

import pytest

from nemotron3.rl import Task, load_environment
from nemotron3.rl.envs.code import CodeEnv
from nemotron3.rl.envs.instructions import InstructionsEnv, holds
from nemotron3.rl.envs.math import MathEnv, last_boxed
from nemotron3.rl.envs.structured import StructuredEnv
from nemotron3.rl.envs.tools import ShortToolsEnv, ToolsEnv
from nemotron3.train.sft_data import CALCULATOR, LOOKUP, calculator_chat, key_lookup_chat


@pytest.fixture(scope="module")
def math_env():
    env = MathEnv()
    yield env
    env.verifier.close()


def _prompts(env, split, n, seed=0):
    return [t.messages[-1]["content"] for t in islice(env.tasks(split, seed), n)]


@pytest.mark.parametrize("name", ["math", "code", "structured", "instructions", "tools", "tools_short"])
def test_generators_are_deterministic_and_the_test_split_is_held_out(name):
    env = load_environment(name)
    train = _prompts(env, "train", 150)
    assert train == _prompts(env, "train", 150)                    # same seed, same tasks
    assert train != _prompts(env, "train", 150, seed=1)
    test = _prompts(env, "test", 20)
    assert not set(test) & set(_prompts(env, "train", 400, seed=7))
    with pytest.raises(ValueError, match="split='dev' is unknown"):
        next(env.tasks("dev", 0))


def _arith(expr):
    """Independent evaluation of 'a op b op c' with * before + and -."""
    tokens = expr.split()
    terms, signs, cur = [], [1], int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            cur *= int(num)
        else:
            terms.append(cur)
            signs.append(1 if op == "+" else -1)
            cur = int(num)
    terms.append(cur)
    return sum(s * t for s, t in zip(signs, terms))


def test_math_generated_answers_are_right_and_verified(math_env):
    for task in islice(math_env.tasks("train", 3), 5):
        expr = re.match(r"What is (.*)\?", task.messages[0]["content"]).group(1)
        value = _arith(expr)
        assert task.data["answer"] == str(value)
        assert math_env.score(task, f"So the result is \\boxed{{{value}}}.") == 1.0
        assert math_env.score(task, f"\\boxed{{{value + 1}}}") == 0.0


@pytest.mark.parametrize("completion,reward", [
    ("\\boxed{43}", 1.0), ("first \\boxed{7}, then \\boxed{43}", 1.0), ("\\boxed{43.0}", 1.0),
    ("\\boxed{\\frac{86}{2}}", 1.0), ("\\boxed{42}", 0.0), ("43", 0.0), ("\\boxed{}", 0.0), ("\\boxed{43", 0.0),
])
def test_math_reward_on_fixed_answers(math_env, completion, reward):
    assert math_env.score(Task([], {"answer": "43"}), completion) == reward


def test_math_fraction_equivalence_and_scoring_off_the_main_thread(math_env):
    task = Task([], {"answer": "\\frac{1}{2}"})
    rewards = []
    thread = threading.Thread(target=lambda: rewards.extend(math_env.score(task, s) for s in
                                                          ("\\boxed{0.5}", "\\boxed{2/4}", "\\boxed{1/3}")))
    thread.start()
    thread.join()
    assert rewards == [1.0, 1.0, 0.0]              # math-verify called in this thread raises (0.9) or gives False
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"


def _solution(prompt):
    """A right solution written from the prompt's words."""
    nums = [int(n) for n in re.findall(r"-?\d+", prompt)]
    if "`f(x)`" in prompt:
        return f"def f(x):\n    return x * {nums[0]} + {nums[1]}"
    if "count_letter" in prompt:
        letter = re.search(r"letter '(.)'", prompt).group(1)
        return f"def count_letter(s):\n    return sum(1 for c in s if c == {letter!r})"
    if "clamp" in prompt:
        return f"def clamp(x):\n    if x < {nums[0]}:\n        return {nums[0]}\n    return min(x, {nums[1]})"
    if "sum_multiples" in prompt:
        return f"def sum_multiples(n):\n    return sum(i for i in range(n) if i % {nums[0]} == 0)"
    return f"def scale(xs):\n    out = []\n    for x in xs:\n        out.append({nums[0]} * x)\n    return out"


def test_code_right_solutions_pass_and_wrong_ones_fail():
    env = CodeEnv()
    seen = set()
    for task in islice(env.tasks("train", 0), 40):
        name = task.data["function"]
        if name in seen:
            continue
        seen.add(name)
        prompt = task.messages[0]["content"]
        right = _solution(prompt)
        assert env.score(task, f"Here it is:\n```python\n{right}\n```") == {"reward": 1.0, "pass_fraction": 1.0}
        wrong = env.check(task, f"```python\n{right.replace('return ', 'return 1 + ', 1)}\n```")
        assert wrong.reward == 0.0 and wrong.reason.endswith("outputs wrong") and wrong.passed < wrong.total
    assert seen == {"f", "count_letter", "clamp", "sum_multiples", "scale"}


@pytest.mark.parametrize("code,reason", [
    ("def f(x) return x", "SyntaxError"),
    ("import os\nprint('__outputs_0__[5, 5]')\nos._exit(0)", "no output"),        # a forged result line
    ("def f(x):\n    while True:\n        pass", "timeout"),
    ("import os\ndef f(x):\n    os.kill(os.getppid(), 9)\n    return 0", "outputs wrong"),
    ("print(open('/etc/hostname').read())\ndef f(x):\n    return x", "FileNotFoundError"),
    ("x = bytearray(1 << 31)\ndef f(x):\n    return x", "memory limit"),
])
def test_code_hostile_or_broken_answers_get_zero_with_the_reason(code, reason):
    env = CodeEnv(timeout_s=1.0, memory_mb=256)
    task = Task([], {"function": "f", "inputs": [[1], [2]], "expected": [3, 5]})
    check = env.check(task, code)
    assert check.reward == 0.0 and reason in check.reason


SCHEMA = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "name": {"type": "string", "minLength": 1}},
          "required": ["age"], "additionalProperties": False}


@pytest.mark.parametrize("completion,reward", [
    ('{"age": 31, "name": "Ann"}', 1.0), ('```json\n{"age": 0}\n```', 1.0), ('{"age": 121}', 0.0),
    ('{"name": "Ann"}', 0.0), ('{"age": 3, "extra": 1}', 0.0), ('{"age": "31"}', 0.0), ("age: 31", 0.0),
])
def test_structured_reward_on_fixed_outputs(completion, reward):
    assert StructuredEnv().score(Task([], {"schema": SCHEMA}), completion) == reward


def _instance(schema):
    """The smallest value for each property kind of the generator."""
    out = {}
    for name, p in schema["properties"].items():
        if "enum" in p:
            out[name] = p["enum"][0]
        elif p["type"] == "integer":
            out[name] = p["minimum"]
        elif p["type"] == "string":
            out[name] = "x" * p["minLength"]
        elif p["type"] == "boolean":
            out[name] = True
        else:
            out[name] = [0] * p["minItems"]
    return out


def test_structured_generated_schemas_accept_a_valid_instance_and_reject_an_extra_key():
    env = StructuredEnv()
    for task in islice(env.tasks("train", 0), 20):
        schema = json.loads(task.messages[0]["content"].split("\n", 1)[1])       # the schema the model sees
        assert env.score(task, json.dumps(_instance(schema))) == 1.0
        assert env.score(task, json.dumps({**_instance(schema), "zzz": 1})) == 0.0


@pytest.mark.parametrize("constraint,right,wrong", [
    ({"kind": "min_words", "n": 3}, "one two three", "one two"),
    ({"kind": "max_words", "n": 2}, "one two", "one two three"),
    ({"kind": "include", "word": "blue"}, "The sky is Blue.", "The sky is bluer"),
    ({"kind": "exclude", "word": "old"}, "a bold move", "an old move"),
    ({"kind": "lowercase"}, "all small here", "Not all small"),
    ({"kind": "uppercase"}, "LOUD NOTE", "LOUD note"),
    ({"kind": "end_with", "phrase": "The end."}, "Story. The end.\n", "The end. Story."),
    ({"kind": "bullets", "n": 2}, "- a\n- b", "- a\n- b\n- c"),
    ({"kind": "no_commas"}, "no commas here", "one, two"),
    ({"kind": "quoted"}, '"quoted text"', 'not "quoted"'),
])
def test_each_instruction_constraint_on_right_and_wrong_text(constraint, right, wrong):
    assert holds(constraint, right) and not holds(constraint, wrong)


def test_instructions_all_or_fraction_reward():
    task = Task([], {"constraints": [{"kind": "include", "word": "sea"}, {"kind": "max_words", "n": 3},
                                     {"kind": "lowercase"}]})
    text = "The sea is calm"                                        # only the first holds
    assert InstructionsEnv().score(task, text)["reward"] == 0.0
    assert InstructionsEnv(reward="fraction").score(task, text)["reward"] == pytest.approx(1 / 3)
    assert InstructionsEnv().score(task, "calm sea")["reward"] == 1.0
    with pytest.raises(ValueError, match="use 'all'"):
        InstructionsEnv(reward="mean")


def _agent_calls(request, db):
    """A scripted agent that reads the user's request (never the target) and issues the right calls."""
    calls = []
    for sentence in re.findall(r"[^.]+\.", request):
        if m := re.match(r"\s*Set the quantity of (\w+) to (\d+)\.", sentence):
            calls.append({"name": "set_quantity", "arguments": {"item": m[1], "quantity": int(m[2])}})
        elif m := re.match(r"\s*Add (\d+) (\w+)\.", sentence):
            calls.append({"name": "add_item", "arguments": {"item": m[2], "quantity": int(m[1])}})
        elif m := re.match(r"\s*Remove (\w+)\.", sentence):
            calls.append({"name": "remove_item", "arguments": {"item": m[1]}})
        elif m := re.match(r"\s*We received (\d+) more (\w+); update the stock\.", sentence):
            calls.append(("increase", m[2], int(m[1])))
    return calls


def _play(env, task, wrong=False):
    messages = list(task.messages)
    for call in _agent_calls(task.messages[-1]["content"], task.data["db"]):
        if isinstance(call, tuple):                                  # read, then write: two turns
            _, item, n = call
            reply = env.respond(task, [{"name": "get_quantity", "arguments": {"item": item}}])
            have = json.loads(reply[0]["content"])["quantity"]
            call = {"name": "set_quantity", "arguments": {"item": item, "quantity": have + n + wrong}}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        assert not env.done(task, messages)
        messages += env.respond(task, [call])
    messages.append({"role": "assistant", "content": "Done."})
    assert env.done(task, messages)
    return env.score(task, "Done.")


def test_tools_scripted_agent_reaches_the_target_and_a_wrong_one_does_not():
    env = ToolsEnv()
    tasks = list(islice(env.tasks("train", 0), 30))
    assert all(_play(env, t.copy()) == 1.0 for t in tasks)
    increase = [t for t in tasks if "more" in t.messages[-1]["content"]]
    assert increase and all(_play(env, t.copy(), wrong=True) == 0.0 for t in increase)
    assert env.score(tasks[0], "I did nothing.") == 0.0           # copies left the original untouched


def test_tools_bad_calls_get_error_messages_and_turns_are_capped():
    env = ToolsEnv(max_turns=2)
    task = Task([], {"db": {"figs": 2}, "target": {"figs": 2}})
    replies = env.respond(task, [{"name": "drop_table", "arguments": {}},
                                 {"name": "set_quantity", "arguments": {"item": "figs", "quantity": -1}},
                                 {"name": "set_quantity", "arguments": '{"item": "figs"'},
                                 {"name": "get_quantity", "arguments": {"item": "kiwis"}},
                                 {"name": "add_item", "arguments": {"item": "figs", "quantity": 1}}])
    errors = [json.loads(r["content"])["error"] for r in replies]
    assert "unknown tool 'drop_table'" in errors[0] and "-1 is less than the minimum" in errors[1]
    assert "expected a JSON object" in errors[2] and "no item named 'kiwis'" in errors[3]
    assert "already exists" in errors[4] and task.data["db"] == {"figs": 2}
    assert all(r["role"] == "tool" for r in replies)
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "list_items", "arguments": {}}]}
    assert not env.done(task, [call]) and env.done(task, [call, {"role": "tool", "content": "{}"}, call])


def test_math_short_asks_in_the_sft_sets_form_and_survives_pickling():
    import pickle
    from nemotron3.rl.envs.math import ShortMathEnv
    env = ShortMathEnv()
    for task in islice(env.tasks("train", 1), 5):
        q = task.messages[0]["content"]
        assert re.fullmatch(r"\d[+-]\d[+-]\d=\?", q) and task.data["answer"] == str(_arith(" ".join(q[:-2])))
        assert env.score(task, f" {task.data['answer']}\n") == 1.0
        assert env.score(task, str(int(task.data["answer"]) + 1)) == 0.0
    copy = pickle.loads(pickle.dumps(env))          # what an async rollout worker receives, its verifier started
    assert copy.score(Task([], {"answer": "7"}), "7") == 1.0
    env.verifier.close()
    copy.verifier.close()


def _short_agent_call(question):
    """The call a right agent makes, read off the question alone: calc for 'a*b=?', lookup for 'kN?'."""
    if m := re.fullmatch(r"(\d+)\*(\d+)=\?", question):
        return {"name": "calc", "arguments": {"expr": f"{m[1]}*{m[2]}"}}, str(int(m[1]) * int(m[2]))
    m = re.fullmatch(r"(k\d+)\?", question)
    return {"name": "lookup", "arguments": {"key": m[1]}}, None


def test_tools_short_right_call_and_answer_score_1_and_wrong_ones_less():
    env = ShortToolsEnv()
    tasks = list(islice(env.tasks("train", 2), 40))
    assert {t.data["tools"][0]["function"]["name"] for t in tasks} == {"calc", "lookup"}
    for task in tasks:
        call, product = _short_agent_call(task.messages[-1]["content"])
        right, wrong_answer, no_call = task.copy(), task.copy(), task.copy()
        messages = list(task.messages) + [{"role": "assistant", "content": "", "tool_calls": [call]}]
        assert not env.done(right, messages)
        (reply,) = env.respond(right, [call])
        assert reply["role"] == "tool" and (product is None or reply["content"] == product)   # calc: a*b by hand
        assert env.done(right, messages + [reply, {"role": "assistant", "content": reply["content"]}])
        assert env.score(right, f"{reply['content']}\n") == {"reward": 1.0, "call": 1.0, "answer": 1.0}
        env.respond(wrong_answer, [call])
        assert env.score(wrong_answer, reply["content"] + "0")["reward"] == 0.5      # right call, answer miscopied
        assert env.score(no_call, reply["content"])["reward"] == 0.5                 # right answer without a call
        assert env.score(no_call, "7")["reward"] == 0.0
        assert env.score(task, reply["content"])["call"] == 0.0       # the copies left the original untouched


def test_tools_short_asks_in_the_sft_sets_form():
    env = ShortToolsEnv()
    sft = [calculator_chat(random.Random(i)) for i in range(3)] + [key_lookup_chat(random.Random(i)) for i in range(3)]
    for task in islice(env.tasks("train", 0), 20):
        tool = CALCULATOR if "*" in task.messages[0]["content"] else LOOKUP
        assert task.data["tools"] == [tool]
        same = [r for r in sft if r["tools"] == [tool]]
        assert all(re.sub(r"\d+", "N", r["messages"][0]["content"]) == re.sub(r"\d+", "N", task.messages[0]["content"])
                   and r["messages"][0]["role"] == task.messages[0]["role"] for r in same)
        assert len(task.messages) == 1


def test_tools_short_bad_calls_get_errors_and_no_credit():
    env = ShortToolsEnv(max_turns=2)
    calc = Task([{"role": "user", "content": "12*34=?"}], {"tools": [CALCULATOR], "answer": "408", "table": {}})
    replies = env.respond(calc, [{"name": "lookup", "arguments": {"key": "k1"}},
                                 {"name": "calc", "arguments": {"x": "12*34"}},
                                 {"name": "calc", "arguments": {"expr": "9**9**9"}},
                                 {"name": "calc", "arguments": {"expr": "__import__('os')"}},
                                 {"name": "calc", "arguments": '{"expr": "12*3'}])
    texts = [r["content"] for r in replies]
    assert "unknown tool 'lookup'" in texts[0] and "takes one argument, expr" in texts[1]
    assert all("calc takes integers" in t for t in texts[2:4]) and "takes one argument" in texts[4]
    assert env.score(calc, "408") == {"reward": 0.5, "call": 0.0, "answer": 1.0}
    assert env.respond(calc, [{"name": "calc", "arguments": {"expr": "12 * 34"}}])[0]["content"] == "408"
    for expr, value in (("05*77", "385"), ("3+4*2-1", "10"), ("2*3*4-30", "-6")):            # by hand
        assert env.respond(calc, [{"name": "calc", "arguments": {"expr": expr}}])[0]["content"] == value
    lookup = Task([], {"tools": [LOOKUP], "answer": "v5", "table": {"k3": "v5"}})
    assert "no key 'k4'" in env.respond(lookup, [{"name": "lookup", "arguments": {"key": "k4"}}])[0]["content"]
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "arguments": {}}]}
    assert not env.done(calc, [call]) and env.done(calc, [call, {"role": "tool", "content": "1"}, call])
    with pytest.raises(ValueError, match="max_turns >= 2"):
        ShortToolsEnv(max_turns=1)
