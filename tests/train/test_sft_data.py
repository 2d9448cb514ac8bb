"""The built-in SFT set and its evaluation. Oracles: Python's own arithmetic and dict lookups for every answer and
tool result; completions written by hand (right, wrong argument, malformed call) for the grader."""

import re

from nemotron3.chat_format import ToolCall
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.chat import encode_conversation
from nemotron3.infer.reasoning import split_reasoning
from nemotron3.train.chat_eval import eval_items, grade, tool_call_matches
from nemotron3.train.sft_data import builtin_conversations, builtin_records


def score_reply(item, completion):
    """Grade a completion generated after "<think>\n", parsed as the engine parses it (stop string: <|im_end|>)."""
    return grade(item, split_reasoning(completion.split("<|im_end|>")[0], thinking=True)[1])


def test_builtin_set_is_deterministic_with_a_distinct_heldout_split():
    assert builtin_records(50, seed=0) == builtin_records(50, seed=0)
    assert builtin_records(50, seed=0) != builtin_records(50, seed=1)
    assert builtin_records(50, split="train") != builtin_records(50, split="heldout")


def test_every_answer_and_tool_result_is_right():
    seen = set()
    for conv in builtin_conversations(1000, seed=2):
        msgs = conv.messages
        user, final = msgs[0]["content"], msgs[-1]["content"]
        if conv.tools:
            call, result = msgs[1]["tool_calls"][0], msgs[2]["content"]
            if call["name"] == "calc":
                a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=\?", user).groups())
                assert call["arguments"] == {"expr": f"{a}*{b}"} and result == final == str(a * b)
            else:
                assert call == {"name": "lookup", "arguments": {"key": user[:-1]}} and final == result
            seen.add(call["name"])
        elif user.startswith("k"):
            pairs = dict(p.split("=") for p in user.split(". ")[0].split())
            assert final == pairs[user.split(". ")[1][:-1]]
            seen.add("kv")
        elif len(msgs) == 4:
            a, b = map(int, re.fullmatch(r"(\d)\+(\d)=\?", user).groups())
            assert msgs[1]["content"] == str(a + b) and final == str(a + b + int(msgs[2]["content"][5:-1]))
            seen.add("follow-up")
        else:
            expr = re.fullmatch(r"([\d+\-]+)=\?", user).group(1)
            assert final == str(eval(expr)) and int(final) >= 0         # Python evaluates the question
            assert msgs[1]["reasoning_content"].endswith(f"={final}.")
            seen.add("arithmetic")
    assert seen == {"calc", "lookup", "kv", "follow-up", "arithmetic"}


def test_conversations_fit_the_tiny_demo_context():
    lengths = [len(encode_conversation(c, ByteTokenizer()).input_ids) for c in builtin_conversations(500)]
    assert max(lengths) <= 576 and sum(lengths) / len(lengths) < 300


def test_grader_accepts_the_reference_turn_and_rejects_wrong_or_malformed_calls():
    items = eval_items(40, seed=0)
    assert {i.task for i in items} == {"arithmetic", "follow_up", "lookup", "calculator", "key_lookup"}
    calls = [i for i in items if i.kind == "call"]
    answers = [i for i in items if i.kind == "answer"]
    assert calls and answers
    item = calls[0]
    arg = next(iter(item.call.arguments))
    good = (f"Use {item.call.name}: {item.call.arguments[arg]}.\n</think>\n<tool_call>\n<function={item.call.name}>\n"
            f"<parameter={arg}>\n{item.call.arguments[arg]}\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n")
    assert score_reply(item, good)
    assert not score_reply(item, good.replace(f"\n{item.call.arguments[arg]}\n", "\n0\n"))         # wrong argument
    assert not score_reply(item, good.replace("</function>\n", ""))                                 # malformed
    assert not score_reply(item, "no thought closed " + good.split("</think>")[1])
    a = answers[0]
    assert score_reply(a, f"whatever.\n</think>\n{a.answer}<|im_end|>\n<|im_start|>user")
    assert not score_reply(a, f"whatever.\n</think>\n{a.answer}0<|im_end|>")
    assert tool_call_matches("<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>",
                             ToolCall("f", {"n": 3}),
                             [{"name": "f", "parameters": {"properties": {"n": {"type": "integer"}}}}])
