"""Tool calling and structured output. Oracles: hand-written tool-call texts and their expected parse; the openai
client (tools round trip, streamed tool-call deltas, `.parse` into a pydantic model) and langchain-openai
(`bind_tools`, `with_structured_output`) against a real server; pydantic / json validating what comes back; and the
engine without a grammar or without speculation (a constrained greedy run is the same with and without MTP drafts)."""

import json

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from nemotron3 import NemotronForCausalLM
from nemotron3.infer import Engine, Request, SamplingParams
from nemotron3.serve.grammar import Constraint, json_grammar
from nemotron3.serve.tools import ToolCallStream, parse_tool_calls
from nemotron3.tokenizer import ByteTokenizer

from .helpers import Server

CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n" \
       "</function>\n</tool_call>"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "forecast", "strict": True,
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}},
                                                "required": ["city", "days"]}}}


@pytest.mark.parametrize("text,content,calls", [
    (f"Let me check.\n{CALL}", "Let me check.", [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]),
    (f"{CALL}\n{CALL}", "", [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}] * 2),
    ("no calls <tool here", "no calls <tool here", []),
    ("cut <tool_call>\n<function=get_weather>\n<parameter=city>\nPa", "cut <tool_call>\n<function=get_weather>\n"
                                                                    "<parameter=city>\nPa", []),
])
def test_tool_call_parser_and_its_stream_agree_with_hand_written_answers(text, content, calls):
    tools = [dict(WEATHER["function"])]
    assert parse_tool_calls(text, tools) == (content, calls)
    for step in (1, 3, 7):                                     # any split of the text into deltas
        stream, got, deltas = ToolCallStream(tools), "", []
        for i in range(0, len(text), step):
            c, d = stream.feed(text[i:i + step])
            got, deltas = got + c, deltas + d
        c, d = stream.finish()
        got, deltas = got + c, deltas + d
        assert got == content
        names = [d["function"]["name"] for d in deltas if "id" in d]
        args = [json.loads(d["function"]["arguments"]) for d in deltas if "id" not in d]
        assert [{"name": n, "arguments": a} for n, a in zip(names, args)] == calls


@pytest.fixture(scope="module")
def server(trained_dir):
    s = Server(trained_dir, "--max-batch", "4")
    yield s
    s.stop()


NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def test_tools_round_trip_with_a_named_tool_choice_streamed_and_not(server):
    c = server.client()
    msgs = [{"role": "user", "content": "weather in Paris for 3 days?"}]
    kw = dict(model="m", messages=msgs, tools=[WEATHER], max_tokens=300, temperature=0, extra_body=NO_THINK,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = c.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.tool_calls[0].function.name == "get_weather"
    args = json.loads(r.message.tool_calls[0].function.arguments)
    assert set(args) == {"city", "days"} and isinstance(args["city"], str) and isinstance(args["days"], int)
    calls, finish = {}, None
    for ch in c.chat.completions.create(stream=True, **kw):
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = (ch.choices[0].finish_reason if ch.choices else None) or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == args
    history = msgs + [r.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": r.message.tool_calls[0].id, "content": "sunny, 21 C"}]
    again = c.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=10, extra_body=NO_THINK)
    assert again.choices[0].message is not None
    status, body = server.raw("POST", "/tokenize", {"messages": history, "tools": [WEATHER]})
    prompt = ByteTokenizer().decode(json.loads(body)["tokens"])
    assert status == 200 and "<tools>" in prompt and "<function=get_weather>" in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    none = c.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert none.choices[0].message.tool_calls is None


class Person(BaseModel):                      # bounded, so that a tiny model's looping text still ends
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=150)


def test_response_format_json_schema_and_json_object_through_openai_parse(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Describe a person."}]
    parsed = c.chat.completions.parse(model="m", messages=msgs, response_format=Person, max_tokens=200, temperature=0,
                                      extra_body={"max_thinking_tokens": 8})   # the tiny model needs its thought cut
    assert isinstance(parsed.choices[0].message.parsed, Person)            # with reasoning on: JSON after </think>
    obj = c.chat.completions.create(model="m", messages=msgs, response_format={"type": "json_object"},
                                    max_tokens=200, temperature=0.8, seed=1, extra_body=NO_THINK)
    text, finish = obj.choices[0].message.content, obj.choices[0].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))   # unbounded keys


def test_langchain_bind_tools_and_with_structured_output(server):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=server.url, api_key="none", model="m", temperature=0, max_tokens=300,
                     max_retries=0, extra_body=NO_THINK)

    def get_weather(city: str, days: int) -> str:
        """Forecast for a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke("weather in Rome?")
    assert msg.tool_calls[0]["name"] == "get_weather" and isinstance(msg.tool_calls[0]["args"]["days"], int)
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


def test_constrained_greedy_output_is_the_same_with_and_without_speculation(trained_dir):
    model = NemotronForCausalLM.from_pretrained(trained_dir).eval()
    tok = ByteTokenizer()
    schema = Person.model_json_schema()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Describe a person."}]))

    def run(K):
        req = Request(ids, 120, SamplingParams(0.0), thinking=True, reasoning_budget=8,   # the tiny model needs
                      grammar=Constraint(tok, json_grammar(schema), model.config.vocab_size, thinking=True))  # a cut
        return Engine(model, tok, K).generate([req])[0]

    plain, spec = run(0), run(3)
    assert plain.token_ids == spec.token_ids
    Person.model_validate_json(plain.content)


def test_responses_api_text_stream_and_function_call_round_trip(server):
    c = server.client()
    r = c.responses.create(model="m", input="3+4=?", max_output_tokens=40, temperature=0)
    kinds = [item.type for item in r.output]
    assert "reasoning" in kinds and r.usage.output_tokens > 0
    events = list(c.responses.create(model="m", input="3+4=?", max_output_tokens=40, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    tool = {"type": "function", "name": "get_weather", "strict": True,
            "parameters": WEATHER["function"]["parameters"]}
    call = c.responses.create(model="m", input="weather in Oslo?", tools=[tool], max_output_tokens=300,
                              temperature=0, tool_choice={"type": "function", "name": "get_weather"},
                              reasoning={"effort": "none"})
    fc = next(item for item in call.output if item.type == "function_call")
    assert fc.name == "get_weather" and set(json.loads(fc.arguments)) == {"city", "days"}
    follow = c.responses.create(model="m", tools=[tool], max_output_tokens=10, reasoning={"effort": "none"}, input=[
        {"role": "user", "content": "weather in Oslo?"}, fc.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": fc.call_id, "output": "rain"}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > call.usage.input_tokens


def test_strict_tool_under_auto_gives_plain_text_or_typed_calls(server):
    c = server.client()
    for seed in range(3):
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather in Paris?"}],
                                      tools=[WEATHER], max_tokens=300, temperature=1.0, seed=seed,
                                      extra_body=NO_THINK).choices[0]
        assert r.finish_reason in ("stop", "tool_calls")
        if r.finish_reason == "stop":
            assert "<" not in r.message.content
        for call in r.message.tool_calls or []:
            assert isinstance(json.loads(call.function.arguments)["days"], int)


def test_json_schema_with_a_hugging_face_tokenizer(tmp_path):
    """Structured output over a byte-level BPE tokenizer.json (llguidance takes it whole): the output parses and
    validates (oracle: json + jsonschema), speculative or not."""
    import jsonschema
    import tokenizers

    from nemotron3 import from_preset
    from nemotron3.tokenizer import HFTokenizer
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(['{"age": 31, "name": "Ada"}', "Describe a person.", "hello world"] * 20,
                            tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|end|>"],
                                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel
                                                           .alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    tok = HFTokenizer(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    outs = []
    for K in (0, 2):
        req = Request(tok.encode("Describe a person."), 80, SamplingParams(0.0),
                      grammar=Constraint(tok, json_grammar(schema), model.config.vocab_size, thinking=False))
        outs.append(Engine(model, tok, K).generate([req])[0])
        jsonschema.validate(json.loads(outs[-1].text), schema)
    assert outs[0].token_ids == outs[1].token_ids
