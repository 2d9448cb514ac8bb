"""Batch-1 greedy decode: ours (plain and MTP self-speculative) vs llama.cpp (the strongest CPU engine) vs
transformers, same weights, one run.

    # llama.cpp is not a dependency: point at a source tree that has llama-bench built, e.g. the one vendored in
    # the llama-cpp-python sdist:  pip download --no-binary :all: --no-deps llama-cpp-python; tar xzf ...;
    # cd .../vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build
    # --target llama-bench -j2
    python bench/llamacpp_decode.py --llama-cpp /path/to/llama.cpp            # trains small / medium + MTP first
    python bench/llamacpp_decode.py --llama-cpp /path/to/llama.cpp --models small=DIR medium=DIR

The models are the `small` and `medium` presets with one "*E" MTP block, trained briefly on the built-in corpus
(MTP loss on), so the MTP head drafts real text: speculation needs a drafter that has learned something. Our
checkpoint is converted to an fp32 GGUF with llama.cpp's own convert_hf_to_gguf.py (run in a subprocess, `--no-mtp`:
llama-bench decodes plainly). Its NemotronH converter wants a Hugging Face tokenizer; our benchmark models have none,
so the driver replaces only the vocabulary step with a placeholder vocabulary of the right size (decode speed does
not depend on it). llama-bench's tg128 (128 tokens after an empty prompt, 2 threads) is compared with ours and
transformers' generate (a 16-token held-out prompt, 128 new tokens, greedy). Writes bench/results/llamacpp_decode.json
and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, best_time, print_table, save  # noqa: E402
from model_speed import load_hf  # noqa: E402

from nemotron3 import NemotronForCausalLM, from_preset  # noqa: E402

# Runs inside the subprocess: llama.cpp's converter with a placeholder vocabulary.
CONVERT_DRIVER = r"""
import sys
src, model_dir, out = sys.argv[1:4]
sys.path[:0] = [src, src + "/gguf-py"]
import gguf
import conversion.nemotron as nemotron

def placeholder_vocab(self):
    n = self.hparams["vocab_size"]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([f"<t{i}>" for i in range(n)])
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * n)
    self.gguf_writer.add_token_merges(["<t0> <t1>"])     # llama.cpp refuses a gpt2 vocab without merges
    self.gguf_writer.add_bos_token_id(1)
    self.gguf_writer.add_eos_token_id(2)

nemotron.NemotronHModel.set_vocab = placeholder_vocab
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32", "--no-mtp"]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def llama_bench(src: str, gguf_path: str, threads: int, n: int, repeats: int) -> float:
    exe = os.path.join(src, "build", "bin", "llama-bench")
    out = subprocess.run([exe, "-m", gguf_path, "-p", "0", "-n", str(n), "-t", str(threads), "-r", str(repeats),
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def trained(workdir: str, preset: str, steps: int, batch: int) -> str:
    from nemotron3.train.pretrain import TrainConfig, train
    cfg = from_preset(preset, num_nextn_predict_layers=1, mtp_layers_block_type="*E")
    return train(TrainConfig(preset=preset, out=os.path.join(workdir, preset), max_steps=steps, save_every=steps,
                             eval_every=steps, seq_len=256, batch_size=batch, lr=1e-3,
                             train_tokens=steps * batch * 256 + 10_000), log=lambda *_: None, model_config=cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree with build/bin/llama-bench")
    p.add_argument("--configs", nargs="+", default=["small", "medium"])
    p.add_argument("--models", nargs="*", default=[], help="CONFIG=DIR trained checkpoints (default: train here)")
    p.add_argument("--train-steps", nargs="+", type=int, default=[450, 120], help="steps per config when training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.llama_cpp, "build", "bin", "llama-bench")):
        sys.exit(f"--llama-cpp {args.llama_cpp}: no build/bin/llama-bench there; build it first (see this file's "
                 f"docstring).")
    torch.set_num_threads(args.threads)
    given = dict(m.split("=", 1) for m in args.models)
    rows = []
    from nemotron3.infer.engine import SPECULATION_BY_BATCH
    from nemotron3.tokenizer import ByteTokenizer
    from nemotron3.train.data import builtin_tokens
    prompt = torch.tensor([builtin_tokens(ByteTokenizer(), 4000, seed=123, split="heldout")[:16].tolist()])
    for name, steps in zip(args.configs, args.train_steps):
        tmp = tempfile.mkdtemp()
        path = given.get(name) or trained(tmp, name, steps, 8 if name == "small" else 4)
        ours = NemotronForCausalLM.from_pretrained(path).eval()
        gguf_path = os.path.join(tmp, "model-f32.gguf")
        subprocess.run([sys.executable, "-c", CONVERT_DRIVER, args.llama_cpp, path, gguf_path],
                       check=True, capture_output=True)
        llama = llama_bench(args.llama_cpp, gguf_path, args.threads, args.new_tokens, args.repeats)
        hf = load_hf(path)
        n = args.new_tokens
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        t_hf = best_time(lambda: hf.generate(prompt, max_new_tokens=n, **gen), args.repeats)
        t_eager = best_time(lambda: ours.generate(prompt, max_new_tokens=n), args.repeats)
        ours.compile_decode()
        plain = ours.generate(prompt, max_new_tokens=n)
        t_comp = best_time(lambda: ours.generate(prompt, max_new_tokens=n), args.repeats)
        from nemotron3.infer import Engine, Request
        engine = Engine(ours, None, SPECULATION_BY_BATCH, max_batch=1)          # the default rule at batch 1
        K = engine.K_for(1)
        spec = lambda: engine.generate([Request(prompt[0].tolist(), n)])       # noqa: E731
        same = spec()[0].token_ids == plain[0, prompt.shape[1]:].tolist()
        engine.reset_stats()
        t_spec = best_time(spec, args.repeats)
        acc = [round(a, 3) for a in engine.acceptance()]
        ours.compile_decode(False)
        for label, tps in (("llama.cpp (fp32, llama-bench tg)", llama), ("transformers", n / t_hf),
                           ("nemotron3 eager", n / t_eager), ("nemotron3 compiled", n / t_comp),
                           (f"nemotron3 compiled + MTP speculative K={K}", n / t_spec)):
            rows.append(dict(config=name, engine=label, tok_s=tps, vs_llama_cpp=tps / llama,
                             vs_transformers=tps * t_hf / n))
        rows[-1].update(acceptance=acc, same_tokens_as_plain=same)
        print(rows[-5:], flush=True)
    print("batch-1 greedy decode, float32, tokens/s; ratios from the same run")
    print_table(rows, ["config", "engine", "tok_s", "vs_llama_cpp", "vs_transformers", "acceptance",
                       "same_tokens_as_plain"])
    save("llamacpp_decode", dict(config=vars(args), rows=rows))
    plot(rows, os.path.join(RESULTS, "llamacpp_decode.png"))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({r["config"] for r in rows}, key=[r["config"] for r in rows].index)
    engines = sorted({r["engine"] for r in rows}, key=[r["engine"] for r in rows].index)
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 3.8), squeeze=False)
    for ax, c in zip(axes[0], configs):
        vals = [next(r["tok_s"] for r in rows if r["config"] == c and r["engine"] == e) for e in engines]
        ax.bar(range(len(engines)), vals, color=["#999999", "#cc7a00", "#8fbf40", "#76b900", "#3a7d00"])
        ax.set_xticks(range(len(engines)), [e.split(" (")[0].replace("nemotron3 ", "ours ").replace(
            " + MTP speculative", "\n+ MTP spec") for e in engines], rotation=20, fontsize=7)
        ax.set_title(f"{c}: batch-1 decode tok/s", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
