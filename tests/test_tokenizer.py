"""Tokenizers. Oracle: transformers' PreTrainedTokenizerFast on the same tokenizer.json / tokenizer_config.json
(test-only dependency), for encoding, offsets, and the chat template with enable_thinking on and off and with
tools (NVIDIA's Nano 3 template, tests/reference/nano3_template.py); hand-written strings for the byte template."""

import json

import pytest

from nemotron3.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

# A ChatML template with Nemotron 3's thinking switch (nemotron3_spec.md §3.1), written for this test.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>\n{% endif %}"
            "{% endif %}")


@pytest.fixture
def hf_dir(tmp_path):
    return write_test_tokenizer(tmp_path)


def write_test_tokenizer(tmp_path):
    """A small byte-level BPE tokenizer.json with a ChatML + thinking template, written into tmp_path."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Q: 12+30=? A: 42", "The red fox sees the old tree."] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tmp_path


def test_hf_tokenizer_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), eos_token="<|im_end|>")
    ours = load_tokenizer(str(hf_dir), vocab_size=10**6)
    assert isinstance(ours, HFTokenizer) and ours.eos_token_id == ref.eos_token_id
    text = "The old fox: 12+30=?"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_template_matches_transformers(hf_dir, thinking):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+30?"}]
    ours = HFTokenizer(str(hf_dir / "tokenizer.json")).apply_chat_template(messages, enable_thinking=thinking)
    assert ours == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=thinking)
    assert ours.endswith("<think>\n" if thinking else "<think></think>")


def test_byte_tokenizer_round_trip_and_eos():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("naïve ∑") + [tok.eos_token_id]) == "naïve ∑"


def test_missing_template_is_a_clear_error(hf_dir):
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat_template"):
        HFTokenizer(str(hf_dir / "tokenizer.json")).apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_template_with_tools_and_offsets_match_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    from tests.reference.nano3_template import NANO3_TEMPLATE
    from tests.test_chat_format import CALC, TOOL_LOOP
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = NANO3_TEMPLATE
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ours = HFTokenizer(str(hf_dir / "tokenizer.json"))
    messages = TOOL_LOOP[:4] + [{"role": "assistant", "content": "ok", "reasoning_content": "<b> & \"q\""}]
    args = {"expression": "1<2", "o": {"b": 1, "a": [2]}}
    messages[2] = {**messages[2], "tool_calls": [{"name": "calculator", "arguments": args}]}
    text = ours.apply_chat_template(messages, tools=[CALC], add_generation_prompt=True, enable_thinking=False)
    assert text == ref.apply_chat_template(messages, tools=[CALC], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    assert '{"b": 1, "a": [2]}' in text                            # transformers' tojson: key order, no escaping
    ids, starts = ours.encode_with_offsets(text)
    enc = ref(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == enc["input_ids"] and starts == [s for s, _ in enc["offset_mapping"]]


def test_byte_template_is_nemotron3_format_with_offsets_per_character():
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "hé?"}, {"role": "assistant", "content": "<think>x</think>\ny"},
                {"role": "user", "content": "z"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhé?<|im_end|>\n<|im_start|>assistant\n<think></think>\n"
        "y<|im_end|>\n<|im_start|>user\nz<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert tok.apply_chat_template(messages[:1], enable_thinking=False).endswith("assistant\n<think></think>")
    ids, starts = tok.encode_with_offsets("hé?")
    assert ids == list("hé?".encode()) and starts == [0, 1, 1, 2]
    with pytest.raises(ValueError, match=r"messages\[0\]\.role: unknown role 'bot'"):
        tok.apply_chat_template([{"role": "bot", "content": "x"}])
