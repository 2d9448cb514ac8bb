"""RULER-style tasks. Oracles: the prompt's own bytes (the byte tokenizer's definition: a token is a UTF-8 byte), the
`tokenizers` library encoding the prompt directly for a BPE vocabulary trained here, word counts made with
collections.Counter on the prompt text, and hand-made predictions with known RULER scores."""

import json
import random
import re
from collections import Counter

import pytest

from nemotron3.eval.haystack import essay_sentences
from nemotron3.eval.ruler import TASKS, make_sample, make_samples, string_match_all
from nemotron3.tokenizer import ByteTokenizer, HFTokenizer
from nemotron3.train.long_docs import long_document

BYTES = ByteTokenizer()


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [700, 1537])
def test_prompt_has_exactly_the_requested_bytes(task, length):
    s = make_sample(task, length, 0, BYTES)
    assert len(s.prompt.encode("utf-8")) == length
    assert s.candidates[0].strip().startswith(s.answers[0])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE of 600 tokens trained on the essay filler, so merges cross the haystack's boundaries."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    gen = essay_sentences(random.Random(0))
    tok.train_from_iterator([next(gen) for _ in range(2000)], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"])
def test_prompt_has_exactly_the_requested_bpe_tokens(task, bpe):
    import tokenizers
    s = make_sample(task, 900, 3, HFTokenizer(bpe))
    assert len(tokenizers.Tokenizer.from_file(bpe).encode(s.prompt, add_special_tokens=False).ids) == 900


def _haystack_fraction(prompt: str, needle: str, start: str, end: str) -> float:
    """Where `needle` begins within the haystack (between the end of `start` and the beginning of `end`), 0..1."""
    lo, hi = prompt.index(start) + len(start), prompt.rindex(end)
    assert prompt.count(needle) == 1
    return (prompt.index(needle) - lo) / (hi - lo)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_single_needles_sit_at_evenly_spaced_depths(task):
    samples = make_samples(task, 3000, 5, BYTES)
    for i, s in enumerate(samples):
        assert s.depth == i / 4
        key = re.search(r"for (\S+) mentioned in the provided text\? ", s.prompt).group(1)
        needle = f"One of the special magic numbers for {key} is: {s.answers[0]}."
        frac = _haystack_fraction(s.prompt, needle, "afterwards.\n", "\nWhat are all")
        # one unit of filler (a sentence, the noise passage or a needle: <= 130 of ~2700 characters) of slack
        assert abs(frac - s.depth) < 0.05 + (0.06 if s.depth == 1 else 0), (i, frac)


def test_multi_needles_spread_evenly_after_the_queried_one():
    s = make_samples("niah_multivalue", 4000, 3, BYTES)[1]           # depth 0.5: values at 0.5, 0.75, 0, 0.25
    key = re.search(r"for (\S+) mentioned in the provided text\? ", s.prompt).group(1)
    fracs = [_haystack_fraction(s.prompt, f"for {key} is: {v}.", "afterwards.\n", "\nWhat are all")
             for v in s.answers]
    for frac, want in zip(fracs, [0.5, 0.75, 0.0, 0.25]):
        assert abs(frac - want) < 0.04


def test_variable_chain_appears_in_order_and_resolves_to_the_answers():
    s = make_sample("vt", 2500, 0, BYTES, depth=0.9)
    statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.prompt)
    value = {}
    for name, rhs in statements:                                     # executing the program in text order
        value[name] = value[rhs[4:]] if rhs.startswith("VAR ") else rhs
    query = re.search(r"assigned the value (\d+) in the text", s.prompt).group(1)
    assert sorted(n for n, v in value.items() if v == query) == sorted(s.answers) and len(s.answers) == 5


def test_cwe_answers_are_the_ten_most_common_words():
    s = make_sample("cwe", 3000, 0, BYTES)
    items = re.findall(r"\d+\. ([a-z]+)", s.prompt.split("most often.\n")[1].split("\nQuestion")[0])
    counts = Counter(items).most_common()
    assert {w for w, _ in counts[:10]} == set(s.answers)
    assert counts[9][1] > counts[10][1]


@pytest.mark.parametrize("length", [520, 600, 2000])               # 600 holds ~50 words: a tie to step around
def test_fwe_answers_are_the_three_most_frequent_coded_words(length):
    s = make_sample("fwe", length, 0, BYTES)
    words = s.prompt.split("coded words. ")[1].split("\nQuestion")[0].split()
    counts = Counter(w for w in words if set(w) != {"."}).most_common()      # dots are noise, padding included
    assert {w for w, _ in counts[:3]} == set(s.answers) and (len(counts) == 3 or counts[2][1] > counts[3][1])
    assert Counter(words).most_common(1)[0][0] == "...."               # the noise word is the most frequent


def test_same_seed_same_sample_other_seed_or_index_another():
    a = make_sample("niah_multikey_1", 1200, 4, BYTES, depth=0.3, seed=7)
    b = make_sample("niah_multikey_1", 1200, 4, BYTES, depth=0.3, seed=7)
    assert a == b
    assert make_sample("niah_multikey_1", 1200, 4, BYTES, depth=0.3, seed=8).answers != a.answers
    assert make_sample("niah_multikey_1", 1200, 5, BYTES, depth=0.3, seed=7).answers != a.answers


def _needle_pairs(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r"special magic \w+ for (\S+) is: ([\w-]+)\.", text))


def test_evaluation_needles_never_occur_in_training_documents():
    """Same task names, lengths, seeds and indices on both sides: only the seed namespace differs."""
    train = set()
    for i in range(40):
        train |= _needle_pairs(long_document(BYTES, 1200, i, seed=0))
        train |= _needle_pairs(long_document(BYTES, 1200, i, seed=0, split="heldout"))
    evals = set()
    for task in ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2", "niah_multivalue"):
        for s in make_samples(task, 1200, 8, BYTES):
            evals |= _needle_pairs(s.prompt)
    assert len(train) > 200 and len(evals) > 100
    assert not train & evals


@pytest.mark.parametrize("prediction, answers, score", [
    (" 1234567.", ["1234567"], 1.0),
    (" 7654321", ["1234567"], 0.0),
    (" 1234567, 2222222 and 9999999", ["1234567", "2222222", "3333333", "9999999"], 0.75),
    (" ABCDE FGHIJ\x00klmno", ["abcde", "KLMNO", "PQRST"], 2 / 3),      # case-insensitive; NUL is a line break
    ("", ["x"], 0.0),
])
def test_string_match_all_scores_hand_made_predictions(prediction, answers, score):
    assert string_match_all(prediction, answers) == pytest.approx(score)


def test_unknown_task_and_too_short_length_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="unknown RULER task 'niah'; choose from niah_single_1"):
        make_sample("niah", 1000, 0, BYTES)
    with pytest.raises(ValueError, match=r"niah_single_2 at length 100: .* ask for a length >= \d+"):
        make_sample("niah_single_2", 100, 0, BYTES)


# ---- the command line (oracles: HF-style greedy decoding by model.generate, and a full uncached forward) ----
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from nemotron3 import NemotronForCausalLM, from_preset
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ruler") / "m"
    NemotronForCausalLM(from_preset("tiny")).eval().save_pretrained(path)
    return str(path)


def test_cli_prints_tables_and_writes_json_and_png(model_dir, tmp_path, capsys):
    import torch

    from nemotron3 import NemotronForCausalLM
    from nemotron3.__main__ import main
    assert main(["eval", "ruler", "--model", model_dir, "--lengths", "600", "--tasks", "niah_single_1,vt",
                 "--samples", "2", "--distractors", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "score (%)" in out and "tf_accuracy (%)" in out and "vt" in out and "average" in out
    saved = json.loads((tmp_path / "ruler.json").read_text())
    assert [(r["task"], r["index"]) for r in saved["samples"]] == [("niah_single_1", 0), ("niah_single_1", 1),
                                                                  ("vt", 0), ("vt", 1)]
    assert (tmp_path / "ruler.png").stat().st_size > 0
    model = NemotronForCausalLM.from_pretrained(model_dir).eval()
    rec = saved["samples"][2]
    s = make_sample("vt", 600, 0, BYTES, depth=0.0, distractors=3)
    ids = torch.tensor([BYTES.encode(s.prompt)])
    greedy = model.generate(ids, s.max_new_tokens, eos_token_id=BYTES.eos_token_id)[0, 600:].tolist()
    assert rec["prediction"] == BYTES.decode(greedy)
    assert rec["score"] == string_match_all(rec["prediction"], s.answers)
    with torch.no_grad():
        full = torch.tensor([BYTES.encode(s.prompt + c) for c in s.candidates])
        logp = torch.log_softmax(model(full).logits.double(), -1)
    gold = BYTES.encode(s.candidates[0])
    want = sum(float(logp[0, 599 + j, tok]) for j, tok in enumerate(gold))
    assert abs(rec["gold_logprob"] - want) <= 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single_1,needle"], "--tasks 'niah_single_1,needle': unknown task(s) needle; choose from"),
    (["--lengths", "4k,4q"], "--lengths: '4q' is not a length; write a positive number with an optional k"),
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory; pass a checkpoint directory"),
    (["--samples", "0"], "--samples 0 must be >= 1."),
    (["--device", "gpu0"], "--device gpu0: not usable here"),
])
def test_bad_cli_input_gets_one_line_naming_the_flag_and_the_fix(argv, message, capsys):
    from nemotron3.__main__ import main
    base = [] if "--model" in argv else ["--preset", "tiny"]
    assert main(["eval", "ruler", *base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unknown_eval_subcommand_names_the_choices(capsys):
    from nemotron3.__main__ import main
    assert main(["eval", "rular"]) == 2
    assert "unknown subcommand 'rular'; use `nemotron3 eval ruler ...` or `nemotron3 eval nll ...`" in \
        capsys.readouterr().err
