"""Nemotron 3 chat format. Oracles: transformers' apply_chat_template rendering a Jinja transcription of NVIDIA's
Nano 3 template (tests/reference/nano3_template.py), hand-written expected strings for the spec's fixed pieces, and
hand-written conversations with known defects (each must name its field)."""

import json

import pytest

from nemotron3.chat_format import (ToolCall, ToolCallError, normalize_messages, parse_tool_calls, render_chat,
                                   render_tool_call)
from tests.reference.nano3_template import NANO3_TEMPLATE

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "  Evaluate an arithmetic expression. ",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "description": "e.g. 12*7"},
        "precision": {"type": "integer", "enum": [0, 2, 4], "minimum": 0},
        "mode": {"type": ["string", "null"], "examples": ["exact"]}},
        "required": ["expression"], "additionalProperties": False}}}
LOOKUP = {"name": "lookup", "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}

SIMPLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3=?"},
          {"role": "assistant", "content": "5", "reasoning_content": "2+3=5."}]
MULTI_TURN = [{"role": "user", "content": "2+3=?"},
              {"role": "assistant", "content": "<think>\n2+3=5.\n</think>\n5"},
              {"role": "user", "content": "and plus 4?"},
              {"role": "assistant", "content": "9", "reasoning_content": "5+4=9."}]
TOOL_LOOP = [{"role": "system", "content": "You can use tools."}, {"role": "user", "content": "What is 37*45?"},
             {"role": "assistant", "content": None, "reasoning_content": "Use the calculator.",
              "tool_calls": [{"type": "function", "function": {"name": "calculator",
                              "arguments": json.dumps({"expression": "37*45", "precision": 0,
                                                       "opts": {"exact": True}, "tags": ["a", 1]})}},
                             {"type": "function", "function": {"name": "lookup", "arguments": {"key": "k7"}}}]},
             {"role": "tool", "content": "1665"}, {"role": "tool", "content": "v3"},
             {"role": "assistant", "content": "1665", "reasoning_content": "The tool says 1665."},
             {"role": "user", "content": "Thanks. Now 2+2?"},
             {"role": "assistant", "content": "Checking.", "reasoning_content": "Easy, but check.",
              "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2", "flag": False}}]},
             {"role": "tool", "content": "4"},
             {"role": "assistant", "content": "4"}]
EARLY_CALL = TOOL_LOOP[:6] + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "Bye."}]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tests.test_tokenizer import write_test_tokenizer
    d = write_test_tokenizer(tmp_path_factory.mktemp("nano3"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = NANO3_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return transformers.AutoTokenizer.from_pretrained(str(d))


CASES = [(SIMPLE, None), (MULTI_TURN, None), (TOOL_LOOP, [CALC, LOOKUP]), (EARLY_CALL, [CALC]),
         (MULTI_TURN, [LOOKUP]), (TOOL_LOOP[1:], [LOOKUP])]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("gen,thinking,truncate", [(False, True, True), (True, True, True), (True, False, True),
                                                   (False, True, False)])
def test_renderer_matches_nvidia_template_through_transformers(oracle, case, gen, thinking, truncate):
    messages, tools = CASES[case]
    msgs, tls = normalize_messages(messages, tools)
    ours = render_chat(msgs, tls, add_generation_prompt=gen, enable_thinking=thinking,
                       truncate_history_thinking=truncate)
    ref = oracle.apply_chat_template(msgs, tools=tls, tokenize=False, add_generation_prompt=gen,
                                     enable_thinking=thinking, truncate_history_thinking=truncate)
    assert ours == ref


def test_format_pieces_by_hand():
    msgs, _ = normalize_messages(SIMPLE)
    assert render_chat(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3=?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2+3=5.\n</think>\n5<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert render_chat(msgs[1:2], add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+3=?<|im_end|>\n<|im_start|>assistant\n<think></think>")
    text = render_chat(*normalize_messages(MULTI_TURN))
    assert "<|im_start|>assistant\n<think></think>\n5<|im_end|>" in text          # earlier thought dropped
    assert "<think>\n5+4=9.\n</think>\n9<|im_end|>" in text
    assert render_tool_call({"name": "f", "arguments": {"x": 1, "y": [1, 2]}}) == (
        "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n<parameter=y>\n[1, 2]\n</parameter>\n"
        "</function>\n</tool_call>\n")


def test_parser_inverts_the_renderer_with_schema_types():
    msgs, tools = normalize_messages(TOOL_LOOP, [CALC, LOOKUP])
    content = "Let me compute.\n" + "".join(render_tool_call(c) for c in msgs[2]["tool_calls"])
    text, calls = parse_tool_calls(content, tools)
    assert text == "Let me compute."
    assert calls == [ToolCall("calculator", {"expression": "37*45", "precision": 0, "opts": '{"exact": true}',
                                             "tags": '["a", 1]'}), ToolCall("lookup", {"key": "k7"})]
    assert parse_tool_calls("no calls here ") == ("no calls here", [])
    multiline = "<tool_call>\n<function=f>\n<parameter=code>\na\n\nb\n</parameter>\n</function>\n</tool_call>"
    assert parse_tool_calls(multiline)[1] == [ToolCall("f", {"code": "a\n\nb"})]
    schema = [{"name": "f", "parameters": {"properties": {"n": {"type": "number"}, "ok": {"type": "boolean"},
                                                           "xs": {"type": "array"}}}}]
    assert parse_tool_calls(render_tool_call({"name": "f", "arguments": {"n": 2.5, "ok": True, "xs": [1]}}),
                            schema)[1] == [ToolCall("f", {"n": 2.5, "ok": True, "xs": [1]})]
    assert json.loads(calls[1].to_openai("call_1")["function"]["arguments"]) == {"key": "k7"}


@pytest.mark.parametrize("text,match", [
    ("<tool_call>\n<function=f>\n</function>\n", "without a matching '</tool_call>'"),
    ("<tool_call>\nf(1)\n</tool_call>", "expected '<function=NAME>'"),
    ("<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\noops\n</function>\n</tool_call>", "unexpected text"),
    ("<tool_call>\n<function=f>\n</function>\n</tool_call>\nand more", "text after tool call 0"),
    ("<tool_call>\n<function=calculator>\n<parameter=precision>\ntwo\n</parameter>\n</function>\n</tool_call>",
     r"calculator\)\.precision: 'two' is not a valid integer"),
    ("stray </tool_call>", "without an opening"),
])
def test_malformed_tool_calls_are_named(text, match):
    with pytest.raises(ToolCallError, match=match):
        parse_tool_calls(text, [CALC])


@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role: unknown role 'robot'"),
    ([{"role": "user", "content": "x"}], "assistant turn missing"),
    ([{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}],
     r"messages\[0\]\.content: must be a string, got list"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": ["f()"]}],
     r"messages\[1\]\.tool_calls\[0\]: a tool call must be an object, got str"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                          "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: invalid JSON"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "y"}],
     r"messages\[1\]: a tool result must follow an assistant turn with tool_calls"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "a</think>b"}],
     r"messages\[1\]\.content: malformed reasoning"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "content": "<think>r</think>b", "reasoning_content": "r"}],
     "reasoning given twice"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}, {"role": "assistant", "content": "y"}],
     r"messages\[1\]: a system message may only come first"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}],
     r"messages\[1\]: the first turn \(after an optional system message\) must be the user's"),
])
def test_bad_conversations_name_the_field(messages, match):
    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)
