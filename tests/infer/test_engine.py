"""The inference engine against plain decoding and against exact probabilities: speculative greedy output equals
plain greedy token for token; a rejection leaves the hybrid cache exactly where plain decoding would; speculative
sampling keeps the model's distribution; sampling filters equal a float64 reference; budget, stops, logprobs."""

import math

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.infer import Engine, Request, SamplingParams, target_probs
from nemotron3.infer.budget import BudgetState, ReasoningBudget
from nemotron3.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    return NemotronForCausalLM(from_preset("tiny", **kw)).eval()


PROMPTS = ["12+35=<think>", "The quick brown fox", "a"]


@pytest.mark.parametrize("K", [1, 3])
def test_speculative_greedy_equals_plain_greedy(trained, K):
    for model in (random_model(), trained):
        reqs = [Request(TOK.encode(p), max_tokens=24) for p in PROMPTS]
        plain = Engine(model, TOK).generate(reqs)
        engine = Engine(model, TOK, num_speculative_tokens=K)
        spec = engine.generate(reqs)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        single = [Engine(model, TOK, num_speculative_tokens=K).generate([r])[0].token_ids for r in reqs]
        assert single == [r.token_ids for r in plain]                  # batching changes nothing either
    assert engine.acceptance()[0] > 0.3                                 # the trained MTP head drafts usefully
    ids = torch.tensor([TOK.encode(PROMPTS[1])])
    assert torch.equal(trained.generate(ids, 30, num_speculative_tokens=K), trained.generate(ids, 30))


@pytest.mark.parametrize("draft_vocab", [None, torch.tensor([6, 0, 3, 5])])
def test_speculative_sampling_keeps_the_distribution(draft_vocab):
    """Also with a draft vocabulary: the drafter's q is 0 outside it, and the accept rule keeps p exactly."""
    model = random_model(3, vocab_size=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)                    # drafts get accepted and rejected
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        exact = torch.stack([p1[a] * model(torch.tensor([prompt + [a]])).logits[0, -1].softmax(-1) for a in range(8)])
    n, counts = 2000, torch.zeros(8, 8)
    engine = Engine(model, None, num_speculative_tokens=2, draft_vocab=draft_vocab)
    drafted = []
    model.draft_logits = lambda h, vocab=None: drafted.append(vocab) or type(model).draft_logits(model, h, vocab)
    for batch in range(n // 250):                   # batched rows with their own seeds: the batch rule is exact too
        for r in engine.generate([Request(prompt, 2, SamplingParams(temperature=1.0, seed=batch * 250 + s))
                                  for s in range(250)]):
            counts[r.token_ids[0], r.token_ids[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert drafted and all(v is draft_vocab or torch.equal(v, draft_vocab) for v in drafted)
    if draft_vocab is not None:                   # tokens outside it were sampled: only through the residual
        assert counts[[t for t in range(8) if t not in draft_vocab]].sum() > 0.1 * n
    assert 0.1 < engine.acceptance()[0] < 0.95                      # both branches of the accept rule ran
    assert tv < 0.08, f"total variation {tv:.3f} between speculative samples and the model's distribution"


def test_draft_vocabulary_changes_the_drafts_not_the_greedy_output(trained):
    """FR-Spec: the drafter picks among the draft vocabulary's tokens only (the argmax of the full LM head's logits
    restricted to them), and verification by the whole model keeps the greedy output token for token."""
    corpus = torch.tensor(TOK.encode(" ".join(PROMPTS) * 3 + "the and of to in is it that"))
    vocab = torch.bincount(corpus, minlength=256).argsort(descending=True)[:20]      # 20 frequent bytes
    reqs = [Request(TOK.encode(p), max_tokens=24) for p in PROMPTS]
    plain = [r.token_ids for r in Engine(trained, TOK).generate(reqs)]
    full = Engine(trained, TOK, num_speculative_tokens=2, draft_vocab=None)
    assert [r.token_ids for r in full.generate(reqs)] == plain
    drafts, inner = [], trained.mtp_draft
    trained.mtp_draft = lambda h, cache, K, v=None: drafts.append((h, inner(h, cache, K, v))) or drafts[-1][1]
    try:
        sub = Engine(trained, TOK, num_speculative_tokens=2, draft_vocab=vocab)
        assert [r.token_ids for r in sub.generate(reqs)] == plain
    finally:
        del trained.mtp_draft
    assert sub.acceptance() != full.acceptance()                         # the drafts changed
    for h, d in drafts:                  # the first draft: argmax of lm_head(h) over the vocabulary, in float64
        logits = h[:, -1].double() @ trained.lm_head.weight.double().T
        assert torch.equal(d[:, 0], vocab[logits[:, vocab].argmax(-1)])
        assert torch.isin(d, vocab).all()
    h = torch.randn(3, 2, trained.config.hidden_size)
    ref = (h.double() @ trained.lm_head.weight.double().T).masked_fill(~torch.isin(torch.arange(256), vocab),
                                                                        float("-inf"))
    torch.testing.assert_close(trained.draft_logits(h, vocab).double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="draft_vocab"):
        Engine(trained, TOK, 2, draft_vocab=torch.tensor([1, 1, 300]))


def test_frequent_tokens_are_the_most_frequent_seen_ids():
    from collections import Counter
    from nemotron3.infer.speculative import frequent_tokens
    g = torch.Generator().manual_seed(0)
    ids = (torch.randn(20_000, generator=g).abs() * 300).long().clamp(max=4095)        # skewed to small ids
    top = frequent_tokens(ids.numpy(), 4096, n=100)
    ranked = [t for t, _ in sorted(Counter(ids.tolist()).items(), key=lambda kv: (-kv[1], kv[0]))]
    assert top.tolist() == ranked[:100]
    assert len(ranked) < 2048 and frequent_tokens(ids, 4096, n=4000).tolist() == ranked     # unseen ids left out
    assert frequent_tokens(torch.arange(256), 256) is None                # a byte vocabulary: no draft vocabulary
    assert frequent_tokens(torch.arange(4096), 4096, n=3000) is None       # over half the vocabulary: no gain


def test_frequent_tokens_read_a_token_file_without_a_warning(tmp_path, monkeypatch):
    """A training corpus is a read-only uint16 memmap (train/data.py): counted in place, chunk by chunk, with no
    warning about non-writable arrays, and the same ranking as a plain count."""
    import warnings
    from collections import Counter
    import numpy as np
    from nemotron3.infer import speculative
    g = np.random.default_rng(0)
    ids = np.minimum(np.abs(g.standard_normal(30_000)) * 300, 4095).astype(np.uint16)
    ids.tofile(tmp_path / "tokens.bin")
    memmap = np.memmap(tmp_path / "tokens.bin", dtype=np.uint16, mode="r")
    ranked = [t for t, _ in sorted(Counter(ids.tolist()).items(), key=lambda kv: (-kv[1], kv[0]))]
    monkeypatch.setattr(speculative, "_COUNT_CHUNK", 7_000)                  # several chunks, the last partial
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert speculative.frequent_tokens(memmap, 4096, n=50).tolist() == ranked[:50]
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        speculative.frequent_tokens(np.array([3, 5000]), 4096)


def _reference_probs(logits, seen, p: SamplingParams):
    """float64, written from the definitions, one token at a time."""
    l = [float(v) for v in logits]
    for t in set(seen):
        l[t] = l[t] / p.repetition_penalty if l[t] > 0 else l[t] * p.repetition_penalty
    l = [v / p.temperature for v in l]
    order = sorted(range(len(l)), key=lambda i: -l[i])
    keep = set(order[:p.top_k] if p.top_k else order)
    z = sum(math.exp(l[i]) for i in range(len(l)) if i in keep)
    probs = {i: math.exp(l[i]) / z for i in keep}
    mass, nucleus = 0.0, set()
    for i in sorted(probs, key=lambda i: -probs[i]):
        if mass >= p.top_p:
            break
        nucleus.add(i)
        mass += probs[i]
    top = max(probs.values())
    final = {i: v for i, v in probs.items() if i in nucleus and v >= p.min_p * top}
    z = sum(final.values())
    return [final.get(i, 0.0) / z for i in range(len(l))]


@pytest.mark.parametrize("params", [SamplingParams(0.7, 5, 1.0, 0.0, 1.0), SamplingParams(1.3, 0, 0.8, 0.0, 1.0),
                                    SamplingParams(1.0, 0, 1.0, 0.2, 1.0), SamplingParams(0.9, 10, 0.9, 0.05, 1.5)])
def test_sampling_filters_match_a_reference(params):
    torch.manual_seed(0)
    logits, seen = torch.randn(40) * 2, torch.tensor([3, 7, 7, 11])
    ours = target_probs(logits, params, seen).double()
    assert torch.allclose(ours, torch.tensor(_reference_probs(logits, seen.tolist(), params), dtype=torch.float64),
                          atol=1e-6)


def test_stops_logprobs_streaming_and_seeds(trained):
    prompt = TOK.encode("The quick brown fox")
    base = Engine(trained, TOK).generate([Request(prompt, max_tokens=30)])[0]
    stop = base.text[5:8]
    r = Engine(trained, TOK).generate([Request(prompt, 30, stop=[stop])])[0]
    assert r.finish_reason == "stop" and r.text == base.text[:base.text.index(stop)]
    r = Engine(trained, TOK).generate([Request(prompt, 30, stop_token_ids=[base.token_ids[3]])])[0]
    assert r.token_ids == base.token_ids[:3] and r.finish_reason == "stop"
    assert base.finish_reason == "length" and len(base.token_ids) == 30
    r = Engine(trained, TOK).generate([Request(prompt, 6, logprobs=3)])[0]
    with torch.no_grad():
        full = trained(torch.tensor([prompt + r.token_ids])).logits[0].log_softmax(-1)
    for j, lp in enumerate(r.logprobs):
        assert abs(lp["logprob"] - float(full[len(prompt) - 1 + j, lp["token"]])) < 1e-4 and len(lp["top"]) == 3
    engine = Engine(trained, TOK, num_speculative_tokens=2)
    events = list(engine.stream([Request(prompt, 25, stop=["zz"])]))
    assert "".join(e.text for e in events) == engine.last_results[0].text
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    a, b = (Engine(trained, TOK).generate([Request(prompt, 20, sp)])[0].token_ids for _ in range(2))
    assert a == b


def test_reasoning_budget_closes_the_thought(trained):
    prompt = TOK.encode("Q: 3+4=?\n<think>\n")
    free = Engine(trained, TOK).generate([Request(prompt, 60, thinking=True)])[0]
    for K in (0, 2):
        reqs = [Request(prompt, 60, thinking=True, reasoning_budget=b) for b in (0, 6, 1000)]
        res = Engine(trained, TOK, num_speculative_tokens=K).generate(reqs)
        assert res[0].text.startswith(".\n</think>\n\n") and res[0].budget_forced
        assert res[0].reasoning == "." and res[0].content == res[0].text.split("</think>", 1)[1].strip()
        cut = res[1].text.index(".\n</think>\n\n")   # after >= 6 thinking tokens and a newline, or 6 + grace
        assert 6 <= len(TOK.encode(res[1].text[:cut])) <= 6 + 8 and res[1].budget_forced
        assert res[2].token_ids == free.token_ids and not res[2].budget_forced      # budget never reached
    b = ReasoningBudget(3, [9, 8], "</think>", lambda ids: "x\n" if ids == [1] else "a")
    s = BudgetState()
    for t in (2, 2, 2):
        assert b.forced(s) is None
        s = b.advance(s, t)
    assert b.forced(s) is None                      # budget reached, but no newline yet: grace window
    s1 = b.advance(s, 1)
    assert b.forced(s1) == 9 and b.forced(s1) == 9  # newline after the budget: close now; asking changes nothing
    s2 = b.advance(s1, 9)
    assert b.forced(s2) == 8 and s2.forced and s2.thinking
    assert not b.advance(s2, 8).thinking and b.forced(b.advance(s2, 8)) is None
    assert b.forced(s) is None and s.count == 3     # earlier states are untouched (pure)


@pytest.mark.parametrize("req, match", [
    (Request([], 5), "empty prompt"),
    (Request([1], 0), "max_tokens"),
    (Request([1] * 4090, 10), "exceeds the model's context"),
    (Request([300], 5), "prompt ids must be integers"),
    (Request([1], 5, reasoning_budget=5), "opens a thought"),
])
def test_bad_requests_are_clear_errors(req, match):
    with pytest.raises(ValueError, match=match):
        Engine(random_model(), TOK).generate([req])


@pytest.mark.parametrize("kw, match", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                       (dict(top_p=1.5), "top_p"), (dict(min_p=1), "min_p"),
                                       (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_sampling_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
    with pytest.raises(ValueError, match="MTP heads"):
        Engine(random_model(num_nextn_predict_layers=0), TOK, num_speculative_tokens=2)


def test_engine_with_the_compiled_decode_step(trained):
    """The compiled step (static shapes, whole-buffer attention) serves plain decoding, verify passes and MTP
    drafting: same tokens as eager."""
    reqs = [Request(TOK.encode(p), max_tokens=20) for p in PROMPTS]
    eager = [r.token_ids for r in Engine(trained, TOK).generate(reqs)]
    trained.compile_decode()
    try:
        for K in (0, 2):
            assert [r.token_ids for r in Engine(trained, TOK, K).generate(reqs)] == eager
    finally:
        trained.compile_decode(False)


def test_incremental_detokenization_keeps_multibyte_text():
    from nemotron3.infer.request import SequenceState
    text = "héllo wörld → ok 日本 \n<think>x</think>"
    row = SequenceState(0, 0, Request([1], 200), TOK, None)
    pieces = [row.emit(t, 0.0, 0.0, 0) for t in TOK.encode(text)]
    assert row.text == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)            # a half-made character is never shown


@pytest.mark.parametrize("K", [0, 2])
def test_chunked_prefill_changes_nothing(trained, K):
    reqs = [Request(TOK.encode("The quick brown fox jumps over the lazy dog. " * 2), 16), Request(TOK.encode("a"), 16)]
    whole = [r.token_ids for r in Engine(trained, TOK, K, prefill_chunk=512).generate(reqs)]
    assert [r.token_ids for r in Engine(trained, TOK, K, prefill_chunk=16).generate(reqs)] == whole


def test_draft_vocabulary_with_weights_made_under_inference_mode():
    """A model built (or loaded) under torch.inference_mode() has inference tensors as weights, which keep no
    version counter: drafting over a draft vocabulary still runs, greedy output equals plain decoding, and new
    weights pushed by update_weights reach the drafter's gathered LM-head rows (oracle: the new rows themselves)."""
    with torch.inference_mode():
        model = random_model(1)
    vocab = torch.tensor([3, 0, 7, 101, 32, 200])
    reqs = [Request(TOK.encode(p), max_tokens=12) for p in PROMPTS]
    plain = [r.token_ids for r in Engine(model, TOK).generate(reqs)]
    engine = Engine(model, TOK, num_speculative_tokens=2, draft_vocab=vocab)
    assert [r.token_ids for r in engine.generate(reqs)] == plain
    new_head = torch.randn_like(model.lm_head.weight)
    engine.update_weights([("lm_head.weight", new_head)])
    assert torch.equal(model.draft_head(vocab), new_head[vocab])
