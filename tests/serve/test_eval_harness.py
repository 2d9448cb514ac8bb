"""Completions as evaluation harnesses use them, through the openai client and lm-evaluation-harness
(`local-completions`, remote tokenizer) on local tasks. Oracle: the model's own log-probabilities computed directly
(one float64 log-softmax over a full forward of prompt + continuation, in this process) and its greedy generation
through the Engine; lm-eval's accuracy is then checked against the answers those imply."""

import json
import math

import pytest
import torch

from nemotron3 import NemotronForCausalLM
from nemotron3.infer import Engine, Request, SamplingParams
from nemotron3.tokenizer import ByteTokenizer

from .helpers import Server

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def server(trained_dir):
    s = Server(trained_dir, "--max-batch", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(trained_dir):
    return NemotronForCausalLM.from_pretrained(trained_dir).eval()


def direct_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, float64 log-softmax of one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_scores_prompts_given_as_strings_lists_and_token_ids(server, model):
    c = server.client()
    prompts = ["Q: 2+3=?\n", "ab cd"]
    ids = [TOK.encode(p) for p in prompts]
    for prompt in (prompts, ids):                              # list of strings, list of token-id lists
        r = c.completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
        assert [ch.index for ch in r.choices] == [0, 1] and [ch.text for ch in r.choices] == prompts
        for ch, x in zip(r.choices, ids):
            lp = ch.logprobs.token_logprobs
            assert lp[0] is None and len(lp) == len(x)
            assert max(abs(a - b) for a, b in zip(lp[1:], direct_logprobs(model, x))) <= 1e-4
            best = [max(t.values()) for t in ch.logprobs.top_logprobs[1:]]
            assert all(b >= a - 1e-6 for a, b in zip(lp[1:], best))
    one = c.completions.create(model="m", prompt=ids[0], max_tokens=4, echo=True, logprobs=0, temperature=0)
    text = one.choices[0].text
    assert text.startswith(prompts[0]) and len(one.choices[0].logprobs.tokens) >= len(ids[0]) + 1
    out = TOK.encode(text)
    full = out + ([0] if one.choices[0].finish_reason == "stop" and len(out) < len(ids[0]) + 4 else [])
    assert max(abs(a - b) for a, b in zip(one.choices[0].logprobs.token_logprobs[1:], direct_logprobs(model, full))) \
        <= 1e-4


def test_streamed_logprobs_match_unstreamed(server):
    c = server.client()
    kw = dict(model="m", prompt="Q: 4+4=?\n<think>", max_tokens=12, temperature=0, logprobs=2)
    whole = c.completions.create(**kw).choices[0]
    parts = [ch.choices[0] for ch in c.completions.create(stream=True, **kw) if ch.choices]
    streamed = [v for p in parts if p.logprobs for v in p.logprobs.token_logprobs]
    assert "".join(p.text for p in parts) == whole.text
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    chat = dict(model="m", messages=[{"role": "user", "content": "1+2=?"}], max_tokens=12, temperature=0,
                logprobs=True, top_logprobs=1)
    w = c.chat.completions.create(**chat).choices[0]
    s = [e.logprob for ch in c.chat.completions.create(stream=True, **chat) if ch.choices and ch.choices[0].logprobs
         for e in ch.choices[0].logprobs.content]
    assert s == pytest.approx([e.logprob for e in w.logprobs.content], abs=1e-6)


def test_tokenize_detokenize_and_tokenizer_info(server):
    status, body = server.raw("POST", "/tokenize", {"prompt": "héllo"})
    assert status == 200 and json.loads(body)["tokens"] == TOK.encode("héllo")
    status, body = server.raw("POST", "/detokenize", {"tokens": TOK.encode("héllo")})
    assert json.loads(body)["prompt"] == "héllo"
    assert server.raw("POST", "/detokenize", {"tokens": [999]})[0] == 400
    info = json.loads(server.raw("GET", "/tokenizer_info")[1])
    assert TOK.encode(info["eos_token"]) == [TOK.eos_token_id]


MC = [{"question": f"{a}+{b}=?", "choices": [f"{a + b}", f"{a + b + 1}", f"{a * b + 7}"], "answer": k % 3}
      for k, (a, b) in enumerate([(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (4, 4)])]


def _tasks(tmp_path):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: n3_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "gen.yaml").write_text(
        "task: n3_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\n<think>\"\n"
        "doc_to_target: \"{{choices[0]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 24\n"
        "  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_lm_eval_loglikelihood_and_generation_match_the_model(server, model, trained_dir, tmp_path, batch_size,
                                                              monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    _tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["n3_mc", "n3_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=dict(base_url=f"{server.url}/completions", model="m", tokenizer_backend="remote",
                        tokenized_requests=True, max_retries=1, num_concurrent=1),
        batch_size=batch_size, log_samples=True)
    correct = []
    for s in out["samples"]["n3_mc"]:
        doc = s["doc"]
        ctx = TOK.encode(f"Q: {doc['question']}\nA:")
        ours = [sum(direct_logprobs(model, ctx + TOK.encode(" " + ch))[len(ctx) - 1:]) for ch in doc["choices"]]
        theirs = [r[0] for r in s["filtered_resps"]]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4
        correct.append(max(range(3), key=ours.__getitem__) == doc["answer"])
    assert math.isclose(out["results"]["n3_mc"]["acc,none"], sum(correct) / len(correct))
    engine = Engine(model, TOK)
    docs = [s["doc"] for s in out["samples"]["n3_gen"]]
    want = engine.generate([Request(TOK.encode(f"Q: {d['question']}\n<think>"), 24, SamplingParams(0.0),
                                    stop=["\n"]) for d in docs])
    got = [s["filtered_resps"][0] for s in out["samples"]["n3_gen"]]
    assert got == [w.text for w in want]
    exact = sum(w.text == d["choices"][0] for w, d in zip(want, docs)) / len(docs)
    assert math.isclose(out["results"]["n3_gen"]["exact_match,none"], exact)
