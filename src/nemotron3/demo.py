"""`nemotron3 demo` (what `make demo` runs): the Nemotron 3 recipe end to end at toy scale on 2 CPU cores, in a few
minutes: pretraining -> supervised fine-tuning -> reinforcement learning (GRPO) -> evaluation.

    pretrain  the tiny hybrid LatentMoE + MTP model on the built-in corpus, half of whose documents are
              conversations of the built-in SFT set in the chat format (arithmetic with <think> steps, lookups,
              tool calls), so that pretraining already teaches the format and the tasks
    SFT       `nemotron3 sft` on the built-in set: loss on assistant turns only, conversations packed into rows,
              reasoning stripped from 10% (thinking off) and cut at a random budget in 3% (budget control)
    RL        a short GRPO run (nemotron3.rl.demo_phase) on the math environment, held-out reward before / after
    evaluate  held-out conversations through the inference engine (train/chat_eval.py): accuracy of the reasoning
              tasks with thinking on, off, and under two reasoning budgets; the share of tool-use conversations
              whose first reply is a well-formed tool call with the right arguments; one transcript of each
Measured (seed 0, fresh clone, 2 otherwise idle cores): with 900 pretraining + 150 SFT steps the demo took 3.0 min
and answered 20% of the held-out reasoning tasks (thinking on) and 18% of the tool calls; with the defaults, 1500 +
300 steps, about 5 min (350 s with a test run sharing the cores for a minute): held-out next-byte accuracy 95.0%,
SFT assistant-token accuracy 98.6%; reasoning tasks 65.7% thinking on, 14.3% off, 11.4% / 8.6% at budgets 4 / 8;
tool calls 92.9% well-formed with the right arguments. More pretraining buys more than more SFT for the same time
(copying operands from the prompt starts to work only after ~1000 steps). The 30 RL steps move the math reward by
less than its noise at this size (0.391 -> 0.383 in that run; bench/rl_curve.py measures the gain over seeds).
bench/sft_budget.py has the budget curve over 3 SFT seeds.
Run layout under --out: pretrain/, sft/ and rl/ (each a training run: metrics.jsonl, training.png, final/), and
final/, the demo's chat model (what `nemotron3 chat / serve --model runs/demo/final` load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

PHASES = ("pretrain", "sft")


def _clear(out: str) -> None:
    """Remove a previous demo run at `out`; refuse anything else."""
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    is_run = any(os.path.exists(os.path.join(out, p, "metrics.jsonl")) for p in PHASES + ("",))
    if not is_run:
        raise ValueError(f"--out {out} exists and is not a demo run; choose another directory.")
    shutil.rmtree(out)


def pretrain_config(out: str, steps: int, preset: str = "tiny", seed: int = 0):
    """The demo's pretraining recipe (8 x 256 tokens a step, lr 3e-3, half the documents conversations)."""
    from .train.pretrain import TrainConfig
    return TrainConfig(preset=preset, out=out, max_steps=steps, save_every=steps, seq_len=256, batch_size=8,
                       eval_every=max(1, steps // 3), lr=3e-3, chat_share=0.5, train_tokens=steps * 8 * 256 + 10_000,
                       seed=seed)


def sft_config(model_dir: str, out: str, steps: int, seed: int = 0):
    """The demo's SFT recipe (8 packed rows of 576 tokens a step, lr 3e-3, the Nano budget-control shares)."""
    from .train.sft import SFTConfig
    return SFTConfig(model=model_dir, out=out, max_steps=steps, seq_len=576, batch_size=8, lr=3e-3, warmup_steps=5,
                     builtin_size=max(400, steps * 8 * 3), heldout=32, eval_batches=1, save_every=steps,
                     eval_every=steps, seed=seed)


def pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def evaluate(model_dir: str, conversations: int, budgets: tuple[int, int], log=print) -> dict:
    """The demo's evaluation of a chat model (module docstring); prints it and returns the numbers."""
    from . import NemotronForCausalLM
    from .infer import Engine
    from .tokenizer import load_tokenizer
    from .train import chat_eval as ce
    model = NemotronForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    engine = Engine(model, tok)
    items = ce.eval_items(conversations, seed=0)
    reasoning = [i for i in items if i.task in ce.REASONING_TASKS and i.kind == "answer"]
    on = ce.run_items(engine, tok, items)
    runs = {"thinking on": [r for r in on if r.item in reasoning],
            "thinking off": ce.run_items(engine, tok, reasoning, thinking=False)}
    for b in budgets:
        runs[f"budget {b}"] = ce.run_items(engine, tok, reasoning, budget=b)
    calls = [r for r in on if r.item.kind == "call"]
    numbers = {name: ce.accuracy(rs) for name, rs in runs.items()} | {"tool calls": ce.accuracy(calls)}
    log(f"\nheld-out reasoning tasks ({len(reasoning)} multi-step additions and follow-ups, greedy):")
    for name, rs in runs.items():
        log(f"  {name:<13} {pct(numbers[name]):>6}   ({ce.thinking_tokens(rs, tok):.1f} thinking tokens on average)")
    log(f"tool use: {pct(numbers['tool calls'])} of {len(calls)} tool conversations open with a well-formed call "
        f"with the right arguments; answers from the tool's result "
        f"{pct(ce.accuracy(on, ('calculator', 'key_lookup'), 'answer'))}")
    log(f"all {len(on)} held-out items with thinking on: {pct(ce.accuracy(on))} (in-context key lookups "
        f"{pct(ce.accuracy(on, ('lookup',)))}: associative recall is hard at this size)")
    log("transcripts (prompt's last message -> the model's turn):")
    for name, rs in [*runs.items(), ("tool call", calls)]:
        if not rs:
            continue
        pick = next((r for r in rs if r.right), rs[0])
        log(f"  {name}:\n  {ce.transcript(pick)}")
    return numbers


def main(argv=None):
    from .__main__ import describe
    from .config import from_preset
    from .train.pretrain import read_last_metrics, train
    from .train.sft import train_sft
    p = argparse.ArgumentParser(prog="nemotron3 demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="architecture to train (default tiny)")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="run directory (replaced if it is a demo run)")
    p.add_argument("--max-steps", type=int, default=1500, help="pretraining steps of 8 x 256 tokens (default 1500)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps of 8 packed rows (default 300)")
    p.add_argument("--rl-steps", type=int, default=30, help="GRPO steps after SFT (default 30; 0 skips RL)")
    p.add_argument("--eval-conversations", type=int, default=80, help="held-out conversations evaluated")
    p.add_argument("--budgets", type=int, nargs=2, default=(4, 8), help="the two reasoning budgets evaluated")
    args = p.parse_args(argv)
    for name in ("max_steps", "sft_steps", "eval_conversations"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1.")
    if args.rl_steps < 0:
        raise ValueError(f"--rl-steps {args.rl_steps} must be >= 0 (0 skips the RL phase).")
    if min(args.budgets) < 0:
        raise ValueError(f"--budgets {args.budgets} must be >= 0 (thinking tokens).")
    print(describe(from_preset(args.preset), args.preset), "\n")
    _clear(args.out)
    t0 = time.perf_counter()
    pre = pretrain_config(os.path.join(args.out, "pretrain"), args.max_steps, args.preset)
    print(f"1. pretraining {pre.max_steps} steps x {pre.batch_size * pre.seq_len} tokens on the built-in corpus (half "
          f"of it chat-format conversations: arithmetic with <think> steps, lookups, tool calls; the rest retrieval "
          f"and prose), MTP loss on, expert balancing on")
    base = train(pre)
    last = read_last_metrics(pre.out)
    print(f"held-out loss {last['eval_loss']:.3f} nats/byte; next-byte accuracy {last['eval_accuracy']:.1%}" + "".join(
        f", MTP depth {k} accuracy {last[f'eval_mtp{k}_accuracy']:.1%}" for k in (1, 2)
        if f"eval_mtp{k}_accuracy" in last) + f"   [{time.perf_counter() - t0:.0f}s]")
    t1 = time.perf_counter()
    sft = sft_config(base, os.path.join(args.out, "sft"), args.sft_steps)
    print(f"\n2. SFT {sft.max_steps} steps x {sft.batch_size} packed rows of {sft.seq_len} tokens on the built-in chat "
          f"set: loss on assistant turns, {sft.reasoning_off_share:.0%} with reasoning off, {sft.truncate_share:.0%} "
          f"with reasoning cut at a random budget")
    tuned = train_sft(sft)
    last = read_last_metrics(sft.out)
    print(f"held-out assistant-token loss {last['eval_loss']:.3f}, accuracy {last['eval_accuracy']:.1%}   "
          f"[{time.perf_counter() - t1:.0f}s]")
    final = os.path.join(args.out, "final")
    shutil.copytree(tuned, final)
    if args.rl_steps:
        from .rl import demo_phase
        t_rl = time.perf_counter()
        print(f"\n3. RL: {args.rl_steps} GRPO steps on the math environment in the SFT set's form (8 samples of 4 "
              f"prompts a step, leave-one-out advantages, masked importance sampling, routers frozen)")
        rl = demo_phase(final, os.path.join(args.out, "rl"), steps=args.rl_steps, seed=0)
        for env, before in rl["before"].items():
            print(f"held-out reward {env}: {before:.3f} before -> {rl['after'][env]:.3f} after "
                  f"(32 problems x 4 samples, temperature 1)   [{time.perf_counter() - t_rl:.0f}s]")
        shutil.rmtree(final)
        shutil.copytree(rl["final"], final)
    t2 = time.perf_counter()
    print(f"\n{4 if args.rl_steps else 3}. evaluation (inference engine, held-out conversations)")
    evaluate(final, args.eval_conversations, tuple(args.budgets))
    print(f"[evaluation {time.perf_counter() - t2:.0f}s; whole demo {time.perf_counter() - t0:.0f}s]")
    print(f"model: {final}   plots: {os.path.join(pre.out, 'training.png')}, {os.path.join(sft.out, 'training.png')}")
    print(f"next: nemotron3 chat --model {final}   or   nemotron3 serve --model {final}")
    return 0
