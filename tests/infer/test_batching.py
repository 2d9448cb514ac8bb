"""The engine as a scheduler: requests that join a running batch at any step, leave it, are forked into n samples
or speculate get exactly what they get alone. Oracles: each request run alone (greedy and seeded sampling), a
float64 product of exact conditional distributions (the accept rule at every draft position), direct forwards
(logprobs)."""

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.infer import Engine, Request, SamplingParams
from nemotron3.infer.speculative import accept_drafts
from nemotron3.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = ["Q: 3+4=?\n<think>", "The cat", "Q: 8+9=?\n<think>", "hello there, this is a longer prompt than most"]


def _solo(model, req, K=0):
    return Engine(model, TOK, K).generate([req])[0].token_ids


def _run_joining(engine, reqs, join_at):
    """Add reqs[i] at step join_at[i]; returns token ids per request."""
    out, step, ids = {}, 0, {}
    while len(out) < len(reqs):
        for i, s in enumerate(join_at):
            if s == step:
                ids[engine.add_request(reqs[i])] = i
        for ev in engine.step():
            if ev.result is not None:
                out[ids[ev.request_id]] = ev.result.token_ids
        step += 1
    return [out[i] for i in range(len(reqs))]


@pytest.mark.parametrize("K", [0, 3])
def test_joining_leaving_and_chunked_prefill_change_no_output(trained, K):
    greedy = [Request(TOK.encode(p), 30 - 4 * i) for i, p in enumerate(PROMPTS)]
    seeded = [Request(TOK.encode(p), 20, SamplingParams(temperature=1.0, top_p=0.9, seed=i))
              for i, p in enumerate(PROMPTS)]
    for reqs in (greedy, seeded):
        ref = [_solo(trained, r, K) for r in reqs]
        engine = Engine(trained, TOK, K, max_batch=3, prefill_chunk=8)     # 4 requests, 3 rows: one waits
        assert _run_joining(engine, reqs, [0, 3, 4, 9]) == ref
        assert not engine.has_unfinished() and engine.num_running() == 0


def test_speculative_greedy_with_per_row_acceptance_matches_plain(trained):
    reqs = [Request(TOK.encode(p), 40) for p in PROMPTS]
    plain = [r.token_ids for r in Engine(trained, TOK).generate(reqs)]
    engine = Engine(trained, TOK, num_speculative_tokens=3)
    assert [r.token_ids for r in engine.generate(reqs)] == plain
    acc = engine.acceptance()
    assert acc[0] > 0.3 and engine.stats["rounds"] < sum(map(len, plain))   # rows advanced by their own counts


def test_rows_prefilled_into_a_batch_too_large_to_speculate_skip_the_mtp_prompt_pass(trained, monkeypatch):
    """4 requests queued at once with speculation only at batch 1: the MTP head never runs over their prompts
    (only the one-token step that makes each row's first draft state); once the batch shrinks to one row it
    speculates from that poor MTP cache, and the tokens are still plain greedy's."""
    reqs = [Request(TOK.encode(p), n) for p, n in zip(PROMPTS, (40, 6, 6, 6))]
    plain = [r.token_ids for r in Engine(trained, TOK).generate(reqs)]
    lengths, mtp_step = [], trained.mtp_step
    monkeypatch.setattr(trained, "mtp_step", lambda depth, h, *a, **kw: lengths.append(h.shape[1]) or
                        mtp_step(depth, h, *a, **kw))
    engine = Engine(trained, TOK, {1: 3, 8: 0}, max_batch=4, prefill_chunk=8)
    assert [r.token_ids for r in engine.generate(reqs)] == plain
    assert lengths and set(lengths) == {1} and engine.stats["rounds"] > 0
    lengths.clear()                                  # control: alone, the row runs the MTP head over its prompt
    Engine(trained, TOK, {1: 3, 8: 0}, max_batch=4, prefill_chunk=8).generate(reqs[:1])
    assert max(lengths) > 1


def test_fork_into_n_samples_equals_separate_requests(trained):
    prompt = TOK.encode(PROMPTS[0])
    sp = SamplingParams(temperature=1.0, seed=5)
    for K in (0, 2):
        forked = Engine(trained, TOK, K).generate([Request(prompt, 16, sp, n=4)])
        assert [r.sample for r in forked] == [0, 1, 2, 3]
        assert forked[0].token_ids == _solo(trained, Request(prompt, 16, sp), K)   # sample 0 = the plain request
        assert len({tuple(r.token_ids) for r in forked}) > 1                        # the samples differ
        again = Engine(trained, TOK, K, max_batch=4).generate([Request(prompt, 16, sp, n=4)])
        assert [r.token_ids for r in again] == [r.token_ids for r in forked]
    g = Engine(trained, TOK).generate([Request(prompt, 12, n=3)])
    assert g[0].token_ids == g[1].token_ids == g[2].token_ids


def test_accept_rule_is_exact_at_every_draft_position():
    """Three tokens over a 3-letter vocabulary with context-dependent target P and drafter Q: the spec round's
    emitted prefix, completed by plain sampling from P where it stopped short, is distributed as P exactly."""
    g = torch.Generator().manual_seed(0)
    V, K, N = 3, 2, 200_000
    P = torch.rand(V + 1, V + 1, V + 1, V, generator=g) ** 3   # P[a, b, c] = p(next | a, b, c); 0 = no token yet
    P = P / P.sum(-1, keepdim=True)
    Q = torch.rand(V + 1, V + 1, V + 1, V, generator=g) ** 3
    Q = Q / Q.sum(-1, keepdim=True)

    def sample(D, ctx):                                # ctx (N, 3) of token ids + 1 (0 = empty)
        return torch.multinomial(D[ctx[:, 0], ctx[:, 1], ctx[:, 2]], 1, generator=g).squeeze(-1)
    z = torch.zeros(N, dtype=torch.long)
    d1 = sample(Q, torch.stack([z, z, z], 1))
    d2 = sample(Q, torch.stack([z, z, d1 + 1], 1))
    q = torch.stack([Q[0, 0, 0].expand(N, V), Q[0, 0, d1 + 1]], 1)            # (N, K, V)
    p = torch.stack([P[0, 0, 0].expand(N, V), P[0, 0, d1 + 1], P[0, d1 + 1, d2 + 1]], 1)
    emitted, n = accept_drafts(p, q, torch.stack([d1, d2], 1), torch.rand(N, K, generator=g, dtype=torch.float64),
                               torch.rand(N, generator=g, dtype=torch.float64))
    x = emitted.clone()
    for j in range(1, 3):                              # continue with plain samples where the round stopped
        ctx = torch.stack([z] * (3 - j) + [x[:, t] + 1 for t in range(j)], 1)
        x[:, j] = torch.where(n >= j, x[:, j], sample(P, ctx))
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    counts.index_put_((x[:, 0], x[:, 1], x[:, 2]), torch.ones(N, dtype=torch.float64), accumulate=True)
    exact = (P[0, 0, 0][:, None, None] * P[0, 0, 1:][:, :, None] * P[0, 1:, 1:]).double()
    assert 0.5 * (counts / N - exact).abs().sum() < 0.01
    assert (n == 0).any() and (n == 1).any() and (n == 2).any()                 # every branch ran


def test_greedy_drafts_are_accepted_while_they_match_the_argmax():
    p = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0, 1]]), 3).float()
    q = torch.nn.functional.one_hot(torch.tensor([[1, 2, 2]]), 3).float()
    emitted, n = accept_drafts(p, q, torch.tensor([[1, 2, 2]]), torch.full((1, 3), 0.99, dtype=torch.float64),
                               torch.tensor([0.5], dtype=torch.float64))
    assert n.tolist() == [2] and emitted[0, :3].tolist() == [1, 2, 0]


def test_logprobs_are_tensors_of_the_raw_and_the_sampled_distribution(trained):
    prompt = TOK.encode("The quick brown fox")
    r = Engine(trained, TOK).generate([Request(prompt, 8, SamplingParams(temperature=0.7, seed=3), logprobs=2)])[0]
    with torch.no_grad():
        logits = trained(torch.tensor([prompt + r.token_ids])).logits[0, len(prompt) - 1:-1]
    idx = torch.tensor(r.token_ids)[:, None]
    torch.testing.assert_close(r.token_logprobs, logits.log_softmax(-1).gather(1, idx)[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.sampled_logprobs, (logits / 0.7).log_softmax(-1).gather(1, idx)[:, 0],
                               atol=1e-4, rtol=0)
    assert len(r.logprobs) == len(r.token_ids) and len(r.logprobs[0]["top"]) == 2
    g = Engine(trained, TOK).generate([Request(prompt, 20, logprobs=0)])[0]              # greedy
    i = next(k for k in range(1, 20) if g.token_ids[k] not in g.token_ids[:k])
    stop = Engine(trained, TOK).generate([Request(prompt, 20, stop_token_ids=[g.token_ids[i]], logprobs=0)])[0]
    assert stop.token_ids == g.token_ids[:i] and len(stop.logprobs) == len(stop.token_logprobs) == i  # none for it
    assert stop.stop_token[0] == g.token_ids[i] and abs(stop.stop_token[1] - float(g.token_logprobs[i])) < 1e-5
    assert stop.stop_token[2] == 0.0                                   # greedy: the sampled distribution is one-hot


def test_update_weights_between_steps_records_versions():
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny")).eval()
    other = NemotronForCausalLM(from_preset("tiny")).eval()
    engine = Engine(model, TOK)
    engine.add_request(Request([1, 2, 3], 6))
    events = engine.step() + engine.step()
    engine.update_weights(other.named_parameters(), version=7)
    while engine.has_unfinished():
        events += engine.step()
    res = [e.result for e in events if e.result is not None][0]
    assert res.versions == [0, 0, 0, 7, 7, 7]        # step 1: prefill + first token + a decode round
    assert torch.equal(model.lm_head.weight, other.lm_head.weight)
    with pytest.raises(ValueError, match="no parameter"):
        engine.update_weights([("nope", torch.zeros(1))])


def test_a_failing_row_ends_alone(trained, monkeypatch):
    """A row whose probabilities turn non-finite finishes with an error; the others give their solo tokens."""
    from nemotron3.infer import engine as engine_mod
    real = engine_mod.target_probs_rows

    def poisoned(logits, rp, seen=None):
        p = real(logits, rp, seen)
        bad = (rp.temperature == 0.77)[:, None, None]
        return torch.where(bad, torch.full_like(p, float("nan")), p)
    monkeypatch.setattr(engine_mod, "target_probs_rows", poisoned)
    reqs = [Request(TOK.encode(p), 16) for p in PROMPTS[:3]]
    ref = [_solo(trained, r) for r in reqs]
    mixed = reqs[:1] + [Request(TOK.encode("x"), 16, SamplingParams(temperature=0.77))] + reqs[1:]
    for K in (0, 2):
        res = Engine(trained, TOK, K).generate(mixed)
        assert res[1].finish_reason == "error" and "non-finite" in res[1].error
        assert [r.token_ids for r in res[:1] + res[2:]] == ref


def test_abort_frees_the_row(trained):
    engine = Engine(trained, TOK, max_batch=1)
    a = engine.add_request(Request(TOK.encode("abc"), 50))
    b = engine.add_request(Request(TOK.encode("xyz"), 5))
    engine.step()
    engine.step()
    res = engine.abort(a)
    assert res[0].finish_reason == "abort" and 0 < len(res[0].token_ids) < 50
    out = []
    while engine.has_unfinished():
        out += [e.result for e in engine.step() if e.result is not None]
    assert out[0].request_id == b and out[0].token_ids == _solo(trained, Request(TOK.encode("xyz"), 5))


def test_speculation_by_batch_size():
    torch.manual_seed(0)
    engine = Engine(NemotronForCausalLM(from_preset("tiny")).eval(), TOK, {1: 3, 4: 2, 8: 0}, max_batch=8)
    assert [engine.K_for(b) for b in (1, 2, 4, 5, 8)] == [3, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine(engine.model, TOK, {0: 2})


def test_routed_experts_are_those_of_a_full_forward(trained):
    """Routing per token read (prompt, then outputs) equals the routing of one forward over the whole sequence,
    plain and speculative (kept verify positions only)."""
    prompt = TOK.encode(PROMPTS[1])
    for K in (0, 2):
        r = Engine(trained, TOK, K, prefill_chunk=4).generate([Request(prompt, 10, return_routed_experts=True)])[0]
        with torch.no_grad():
            out = trained(torch.tensor([prompt + r.token_ids[:-1]]), return_router=True)
        moe = sorted(i for i in out.router if i < trained.config.num_hidden_layers)
        ref = torch.stack([out.router[i].ids_TK for i in moe], 1)                      # (T, layers, K)
        assert r.routed_experts.shape == ref.shape
        assert torch.equal(r.routed_experts.sort(-1).values, ref.sort(-1).values)
