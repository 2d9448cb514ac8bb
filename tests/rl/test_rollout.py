"""Rollouts through the engine. Oracles: the model's own full forward (log-softmax at temperature 1) for the
generation log-probs; a test-local chat template (ChatBytes, plain string formatting) rendering the whole
conversation for multi-turn contiguity; the tools environment's database for the reward; the steps at which the
test itself pushed weights for the per-token versions; hand-written expected dicts for the tool-call parser."""

import copy
import json
from itertools import islice

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.infer import Engine, Result, SamplingParams
from nemotron3.infer.engine import Event
from nemotron3.rl.environment import Environment, Task
from nemotron3.rl.envs.tools import ToolsEnv
from nemotron3.rl.rollout import RolloutRunner, Trajectory, batch_tensors, rollout, tool_turn_text
from nemotron3.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, seed=1234)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return NemotronForCausalLM(from_preset("tiny")).eval()


class Words(Environment):
    """Single-turn: reward = number of words in the answer (any completion scores)."""
    name = "words"

    def tasks(self, split, seed):
        for i in range(1000):
            yield Task([{"role": "user", "content": f"Say something about {i}."}], {})

    def score(self, task, completion):
        return {"reward": float(len(completion.split())), "chars": float(len(completion))}


class ChatBytes(ByteTokenizer):
    """Bytes with a Nemotron-3-like chat template that renders tool calls and tool turns (the byte tokenizer's own
    template has no tool turns): <|im_start|>role\\n...<|im_end|>\\n, tool replies grouped in one user turn."""

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=False, tools=None):
        out, i = [], 0
        if tools:
            out.append("<|im_start|>system\n# Tools\n" + json.dumps(tools)[:40] + "<|im_end|>\n")
        while i < len(messages):
            m = messages[i]
            if m["role"] == "tool":
                replies = []
                while i < len(messages) and messages[i]["role"] == "tool":
                    replies.append(f"<tool_response>\n{messages[i]['content']}\n</tool_response>\n")
                    i += 1
                out.append("<|im_start|>user\n" + "".join(replies) + "<|im_end|>\n")
                continue
            body = m["content"]
            for call in m.get("tool_calls", []):
                f = call["function"]
                params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                                 for k, v in f["arguments"].items())
                body += f"<tool_call>\n<function={f['name']}>\n{params}</function>\n</tool_call>\n"
            out.append(f"<|im_start|>{m['role']}\n{body}<|im_end|>\n")
            i += 1
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


def call_text(name, **arguments):
    msg = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": arguments}}]}
    text = ChatBytes().apply_chat_template([msg], add_generation_prompt=False)
    return text[len("<|im_start|>assistant\n"):-len("<|im_end|>\n")]


# ---- generation log-probs, forked groups, versions ---------------------------------------------------------------
def test_forked_group_logprobs_equal_a_full_forward_at_temperature_1():
    model = tiny_model()
    engine = Engine(model, TOK, num_speculative_tokens=2, max_batch=8)     # MTP speculative decoding on
    tasks = list(islice(Words().tasks("train", 0), 2))
    groups = rollout(engine, TOK, Words(), tasks, group_size=4, sampling=SAMPLING, max_tokens=16)
    assert [len(g) for g in groups] == [4, 4] and engine.stats["rounds"] > 0
    for task, group in zip(tasks, groups):
        assert len({tuple(t.completion_ids) for t in group}) == 4              # G distinct samples of one prefill
        for t in group:
            assert t.prompt_ids == TOK.encode(TOK.apply_chat_template(task.messages, enable_thinking=False))
            assert t.loss_mask == [1] * len(t.completion_ids) and t.versions == [0] * len(t.completion_ids)
            with torch.no_grad():
                logits = model(torch.tensor([t.ids])).logits[0].double()
            P = len(t.prompt_ids)
            ref = logits[P - 1:-1].log_softmax(-1).gather(-1, torch.tensor(t.completion_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(t.gen_logprobs, dtype=torch.float64), ref, rtol=0, atol=1e-4)
            answer = t.messages[-1]["content"]                          # the engine holds back a torn UTF-8 tail
            assert TOK.decode(t.completion_ids).strip().startswith(answer)
            assert t.reward == len(answer.split()) and t.reward_components["chars"] == len(answer)
            assert t.env == "words" and t.num_turns == 1 and t.finish_reason in ("stop", "length")


def test_stop_token_is_in_the_trajectory_with_its_generation_logprob_version_and_loss(chat_bpe):
    """A BPE tokenizer whose end of turn is one special token, its eos (<|im_end|>): a sample that stops on it keeps
    it as its last completion token, with loss mask 1, the version that sampled it and its logprob, and the routing
    of the token before it (router replay). Oracles: the log-softmax of a full forward of the float64 model, the
    routing of a full forward. Text decoding leaves the special token out."""
    tok, eos = chat_bpe, chat_bpe.eos_token_id
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight[eos] *= 12             # the random model now stops after a few tokens, or not at all
    engine = Engine(model, tok, num_speculative_tokens=2, max_batch=8)
    engine.update_weights([], version=5)
    tasks = list(islice(Words().tasks("train", 0), 2))
    runner = RolloutRunner(engine, tok, sampling=SAMPLING, max_tokens=12, return_routed_experts=True)
    trajs = [t for g in runner.run([Words()] * 2, tasks, 4) for t in g]
    stopped = [t for t in trajs if t.finish_reason == "stop"]
    assert 0 < len(stopped) < len(trajs)
    ref_model = copy.deepcopy(model).double()
    for t in trajs:
        n = len(t.completion_ids)
        assert t.loss_mask == [1] * n and t.versions == [5] * n
        assert eos not in t.completion_ids[:-1] and (t.completion_ids[-1] == eos) == (t in stopped)
        assert t in stopped or n == 12                          # max_tokens counts the output, not the stop
        with torch.no_grad():
            logits = ref_model(torch.tensor([t.ids])).logits[0].double()
        ref = logits[len(t.prompt_ids) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(t.completion_ids)[:, None])
        torch.testing.assert_close(torch.tensor(t.gen_logprobs, dtype=torch.float64), ref[:, 0], rtol=0, atol=1e-4)
        with torch.no_grad():             # router replay: the routing of every token read, the stop's predecessor too
            router = model(torch.tensor([t.ids[:-1]]), return_router=True).router
        own = torch.stack([router[i].ids_TK for i in sorted(router) if i < model.config.num_hidden_layers], 1)
        assert torch.equal(t.routed_experts.sort(-1).values, own.sort(-1).values)
        text = tok.decode(t.completion_ids)
        assert "<|im_end|>" not in text and text.strip().startswith(t.messages[-1]["content"])   # (torn UTF-8)
        assert tok.decode(t.completion_ids, skip_special_tokens=False) == text + "<|im_end|>" * (t in stopped)


def test_bf16_policy_rolls_out_with_a_float32_ssm_state():
    model = tiny_model().to(torch.bfloat16)
    engine = Engine(model, TOK, num_speculative_tokens=2, max_batch=4)
    [group] = rollout(engine, TOK, Words(), [Task([{"role": "user", "content": "hi"}])], 2, sampling=SAMPLING,
                      max_tokens=8)
    assert len(group) == 2 and engine.cache.ssm and engine.mtp_cache is not None
    assert {s.dtype for c in (engine.cache, engine.mtp_cache) for s in c.ssm.values()} == {torch.float32}
    assert {k.dtype for k, _ in engine.cache.kv.values()} == {torch.bfloat16}


def test_versions_switch_at_the_weight_update_made_mid_generation():
    model = tiny_model()
    engine = Engine(model, TOK, num_speculative_tokens=2, max_batch=8)
    runner = RolloutRunner(engine, TOK, sampling=SAMPLING, max_tokens=24)
    for task in islice(Words().tasks("train", 0), 2):
        runner.add_group(Words(), task, 3)
    made: dict[tuple[int, int], int] = {}                   # (request, sample) -> tokens made before the update
    real_step = engine.step

    def counting_step():
        events = real_step()
        for ev in events:
            if ev.token_id is not None:                    # a stop token too: it is in the trajectory
                made[ev.request_id, ev.sample] = made.get((ev.request_id, ev.sample), 0) + 1
        return events
    engine.step = counting_step
    done = []
    for _ in range(6):
        done += runner.step()
    before = dict(made)
    new = {n: p + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    engine.update_weights(new.items(), version=7)
    while runner.busy():
        done += runner.step()
    assert sum(len(g) for g in done) == 6
    mixed = 0
    for t in (t for g in done for t in g):
        k = before.get((t.group, t.sample), 0)                 # first-turn request ids are the group ids here
        assert t.versions == [0] * k + [7] * (len(t.completion_ids) - k)
        mixed += 0 < k < len(t.completion_ids)
    assert mixed > 0


# ---- multi-turn tool use -------------------------------------------------------------------------------------------
class ScriptedEngine:
    """Stands in for Engine: answers each request with a scripted assistant turn, fixed per-token logprobs and the
    current version; records every prompt it was given. The turn ends as the model writes "<|im_end|>": as text
    (a stop string, bytes) or, with stop_token, as that special token, which the engine reports apart
    (Result.stop_token) and leaves out of token_ids and text."""

    def __init__(self, script, tok, stop_token=None):
        self.script, self.tok, self.stop_token = script, tok, stop_token
        self.max_model_len, self.version = 4096, 3
        self.prompts, self.queue, self.ids = [], [], 0

    def add_request(self, req):
        self.prompts.append(list(req.prompt_ids))
        self.queue.append((self.ids, req))
        self.ids += 1
        return self.ids - 1

    def has_unfinished(self):
        return bool(self.queue)

    def step(self):
        events = []
        for rid, req in self.queue:
            prompt = self.tok.decode(req.prompt_ids, skip_special_tokens=False)
            for sample in range(req.n):
                content = self.script(prompt, sample)
                ids = self.tok.encode(content if self.stop_token else content + "<|im_end|>")
                lps = torch.tensor([-0.25 - 0.001 * j for j in range(len(ids))])
                stop = (self.stop_token, -0.5, -0.125, self.version) if self.stop_token else None
                result = Result(ids, content, None, content.strip(), "stop", len(req.prompt_ids), request_id=rid,
                                sample=sample, token_logprobs=lps, sampled_logprobs=lps,
                                versions=[self.version] * len(ids), stop_token=stop)
                events.append(Event(rid, sample, ids[-1], "", result))
        self.queue = []
        return events


def tools_script(prompt, sample):
    """Turn 1: list the items (sample 1 instead answers at once, wrongly); turn 2: the calls that reach the
    target; turn 3: a confirmation."""
    turn = prompt.count("<tool_response>")
    request = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    if turn == 0:
        return "Done." if sample == 1 else call_text("list_items")
    if turn == 1:
        db = json.loads(prompt.split("<tool_response>\n")[1].split("\n</tool_response>")[0])["items"]
        calls = []
        for sentence in request.split(". "):
            words = sentence.rstrip(".").split()
            if sentence.startswith("Set the quantity of"):
                calls.append(call_text("set_quantity", item=words[4], quantity=int(words[6])))
            elif sentence.startswith("Add"):
                calls.append(call_text("add_item", item=words[2], quantity=int(words[1])))
            elif sentence.startswith("Remove"):
                calls.append(call_text("remove_item", item=words[1]))
            elif sentence.startswith("We received"):
                item = words[4].rstrip(";")
                db[item] += int(words[2])
                calls.append(call_text("set_quantity", item=item, quantity=db[item]))
        return "Updating." + "".join(calls)
    return "All done."


@pytest.fixture(scope="module")
def chat_bpe(tmp_path_factory):
    """The test BPE tokenizer (<|im_start|>, <|im_end|> special; <|im_end|> its eos) with ChatBytes' template."""
    from nemotron3.tokenizer import HFTokenizer
    from tests.test_tokenizer import write_test_tokenizer

    class ChatBPE(HFTokenizer):
        apply_chat_template = ChatBytes.apply_chat_template
    return ChatBPE(str(write_test_tokenizer(tmp_path_factory.mktemp("bpe")) / "tokenizer.json"))


@pytest.mark.parametrize("end", ["stop string", "special stop token"])
def test_multi_turn_ids_stay_contiguous_and_only_model_tokens_carry_loss(end, chat_bpe):
    """Bytes: the model writes <|im_end|> as text. BPE: it is one special token, the engine's stop token: the
    trajectory keeps it (as the model's, loss mask 1) and appends only the template's "\n" after it."""
    tok, env = (ChatBytes(), ToolsEnv()) if end == "stop string" else (chat_bpe, ToolsEnv())
    tasks = list(islice(env.tasks("train", 3), 3))
    engine = ScriptedEngine(tools_script, tok, None if end == "stop string" else tok.eos_token_id)
    groups = rollout(engine, tok, env, tasks, group_size=2, max_tokens=1000, stop=["<|im_end|>"])
    for task, (good, lazy) in zip(tasks, groups):
        assert (good.reward, good.num_turns, lazy.reward, lazy.num_turns) == (1.0, 3, 0.0, 1)
        assert good.task.data["db"] == task.data["target"] and task.data["db"] != task.data["target"]
        for t in (good, lazy):
            # the ids are exactly the template's rendering of the whole conversation (the closing "\n" after the
            # model's <|im_end|> included), with nothing re-tokenised
            assert tok.decode(t.ids, skip_special_tokens=False) == tok.apply_chat_template(
                t.messages, add_generation_prompt=False, tools=task.data["tools"]).removesuffix("\n")
            model_text = "".join(tok.decode([i], skip_special_tokens=False)
                                 for i, m in zip(t.completion_ids, t.loss_mask) if m)
            turns = [m for m in t.messages if m["role"] == "assistant"]
            assert model_text == "".join(tok.apply_chat_template([m], False)[len("<|im_start|>assistant\n"):-1]
                                         for m in turns)
            runs = [(m, lp, v) for m, lp, v in zip(t.loss_mask, t.gen_logprobs, t.versions)]
            assert all((lp, v) == (0.0, -1) for m, lp, v in runs if not m)
            assert all(lp < 0 and v == 3 for m, lp, v in runs if m)
            assert t.oldest_version == 3
            if end == "special stop token":        # each model turn ends on it, with the logprob the engine gave
                ends = [k for k, (i, m) in enumerate(zip(t.completion_ids, t.loss_mask)) if i == tok.eos_token_id
                        and m]                                        # (the tool turns' own <|im_end|> have mask 0)
                assert len(ends) == t.num_turns and all(t.gen_logprobs[k] == -0.125 for k in ends)
                assert ends[-1] == len(t.completion_ids) - 1
                assert "<|im_end|>" not in tok.decode(t.completion_ids)       # skipped as the special token it is
    # each turn's prompt extends the previous turn's prompt plus what the model generated
    by_prompt = {tuple(p): p for p in engine.prompts}
    for t in (t for g in groups for t in g):
        prompts = [p for p in by_prompt.values() if t.ids[:len(p)] == p]
        assert len(prompts) == t.num_turns
    assert len(engine.prompts) == 3 * (1 + 2)               # a first request per task (n=2), two more for `good`


def test_tool_turn_text_appends_only_what_the_template_adds():
    tok = ChatBytes()
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    replies = [{"role": "tool", "content": "{}"}]
    suffix = "<|im_start|>user\n<tool_response>\n{}\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n"
    assert tool_turn_text(tok, messages, replies, call_text("f") + "<|im_end|>", False) == "\n" + suffix
    assert tool_turn_text(tok, messages, replies, call_text("f"), False) == "<|im_end|>\n" + suffix  # stop token

    class Unstable(ChatBytes):               # drops the assistant's calls once a reply follows: not prefix-stable
        def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
            if messages[-1]["role"] == "tool":
                messages = [dict(m, tool_calls=[]) for m in messages]
            return super().apply_chat_template(messages, add_generation_prompt, **kw)
    with pytest.raises(ValueError, match="prefix-stable template"):
        tool_turn_text(Unstable(), messages, replies, "", False)


def test_tool_turn_text_with_the_builtin_template_that_strips_message_content():
    # the built-in chat template strips each message's content: the end-of-turn probe must survive that. Oracle:
    # the template's own rendering of the conversation with the tool turn, after its rendering without it
    from nemotron3.train.sft_data import CALCULATOR
    call = {"type": "function", "function": {"name": "calc", "arguments": {"expr": "12*34"}}}
    messages = [{"role": "user", "content": "12*34=?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    replies = [{"role": "tool", "content": "408"}]
    for thinking in (False, True):
        without = TOK.apply_chat_template(messages, add_generation_prompt=False, tools=[CALCULATOR],
                                          enable_thinking=thinking)
        full = TOK.apply_chat_template(messages + replies, tools=[CALCULATOR], enable_thinking=thinking)
        assert without.endswith("<|im_end|>\n") and full.startswith(without)
        turn = "</tool_call>\n"                                 # the end of what the model wrote
        for written in (turn + "<|im_end|>", turn):               # the stop token kept as text, or swallowed
            assert written + tool_turn_text(TOK, messages, replies, written, thinking, [CALCULATOR]) == \
                turn + "<|im_end|>\n" + full[len(without):]


def test_batch_tensors_align_masks_logprobs_and_versions_to_their_tokens():
    def traj(prompt, completion, mask, lps, versions, reward, finish="stop"):
        return Trajectory(prompt, completion, mask, lps, versions, reward, {}, "e", Task([]), 0, 0, finish, 1, [])
    a = traj([5, 6], [7, 8, 9], [1, 0, 1], [-0.5, 0.0, -1.5], [2, -1, 3], 1.0)
    b = traj([5], [4], [1], [-0.25], [3], 0.0, finish="length")
    t = batch_tensors([[a, b]], pad_id=99)
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 99, 99, 99]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert t["loss_mask"].tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]
    assert t["gen_logprobs"].tolist() == [[0, 0, -0.5, 0, -1.5], [0, -0.25, 0, 0, 0]]
    assert t["versions"].tolist() == [[-1, -1, 2, -1, 3], [-1, 3, -1, -1, -1]]
    assert t["rewards"].tolist() == [[1.0, 0.0]] and t["truncated"].tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of equal size"):
        batch_tensors([[a, b], [a]])


def test_bad_rollout_arguments_are_rejected_with_the_fix():
    engine = ScriptedEngine(lambda p, s: "", TOK)
    with pytest.raises(ValueError, match="one environment, or one per task"):
        rollout(engine, TOK, [Words(), Words()], [Task([{"role": "user", "content": "x"}])], 2)
    with pytest.raises(ValueError, match="max_turns=0 must be a positive integer"):
        RolloutRunner(engine, TOK, max_turns=0)
    with pytest.raises(ValueError, match="group_size=0 must be a positive integer"):
        RolloutRunner(engine, TOK).add_group(Words(), Task([{"role": "user", "content": "x"}]), 0)
