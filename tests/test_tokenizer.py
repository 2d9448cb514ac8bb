"""Tokenizers. Oracle: transformers' PreTrainedTokenizerFast on the same tokenizer.json / tokenizer_config.json
(test-only dependency), for encoding and for the chat template with enable_thinking on and off."""

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
