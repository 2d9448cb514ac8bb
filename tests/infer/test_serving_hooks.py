"""The engine hooks the server uses: Request.grammar (a token mask per row, applied to target and draft
distributions), Event.logprob (streamed logprobs) and score_prompt (echo). Oracles: a hand-built grammar whose
allowed set is known at every position, plain decoding for speculative decoding under that grammar, the Result's
own logprob list, and a float64 log-softmax over one full forward."""

import torch

from nemotron3 import NemotronForCausalLM
from nemotron3.config import from_preset
from nemotron3.infer import Engine, Request, SamplingParams
from nemotron3.infer.scoring import score_prompt
from nemotron3.tokenizer import ByteTokenizer

DIGITS = list(range(48, 58)) + [32]


class Digits:
    """Free for 3 tokens, then digits or spaces until token 12, then only end of text (id 0)."""

    def __init__(self, n=0):
        self.n = n

    def fork(self):
        return Digits(self.n)

    def mask(self, ahead):
        k = self.n + len(ahead)
        if k < 3:
            return None
        m = torch.zeros(256, dtype=torch.bool)
        m[[0] if k >= 12 else DIGITS] = True
        return m

    def advance(self, token):
        self.n += 1


def _model():
    torch.manual_seed(0)
    return NemotronForCausalLM(from_preset("tiny")).eval()


def test_grammar_masks_every_row_and_speculation_changes_no_token():
    model, tok = _model(), ByteTokenizer()
    prompts = [[65, 66, 67, 68], [70, 71], [80] * 9]
    out = {}
    for K in (0, 3):
        reqs = [Request(p, 20, SamplingParams(0.0), grammar=Digits()) for p in prompts]
        reqs.append(Request([90, 91], 20, SamplingParams(0.0)))             # a row without a grammar, same batch
        out[K] = Engine(model, tok, K, max_batch=4).generate(reqs)
    assert [r.token_ids for r in out[0]] == [r.token_ids for r in out[3]]
    for r in out[3][:3]:
        assert len(r.token_ids) == 12 and r.finish_reason == "stop" and set(r.token_ids[3:]) <= set(DIGITS)
    sampled = [Request(p, 20, SamplingParams(1.0, seed=7), grammar=Digits(), n=2) for p in prompts[:2]]
    for r in Engine(model, tok, 3, max_batch=4).generate(sampled):
        assert len(r.token_ids) == 12 and set(r.token_ids[3:]) <= set(DIGITS)


def test_event_logprobs_are_the_results_and_score_prompt_matches_float64():
    model = _model()
    eng = Engine(model, None, 0)
    eng.add_request(Request([5, 17, 99, 3], 6, SamplingParams(0.0), logprobs=1))
    events = []
    while eng.has_unfinished():
        events += eng.step()
    assert [e.logprob for e in events if e.logprob] == events[-1].result.logprobs
    ids = [5, 17, 99, 3, 200, 42, 42, 7]
    scores = score_prompt(model, ids, top=2)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scores.token_logprobs, dtype=torch.float64), want, rtol=0, atol=1e-5)
    assert [t for t, _ in scores.top[0]] == ref[0].topk(2).indices.tolist()
