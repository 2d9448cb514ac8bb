"""Batch-1 greedy decode: ours vs llama.cpp (the strongest CPU engine) vs transformers, same weights, one run.

    # llama.cpp is not a dependency: point at a source tree that has llama-bench built, e.g. the one vendored in
    # the llama-cpp-python sdist:  pip download --no-binary :all: --no-deps llama-cpp-python; tar xzf ...;
    # cd .../vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build
    # --target llama-bench -j2
    python bench/llamacpp_decode.py --llama-cpp /path/to/llama.cpp            # small and medium, ~5 min
    python bench/llamacpp_decode.py --llama-cpp /path/to/llama.cpp --configs small

Our checkpoint is converted to an fp32 GGUF with llama.cpp's own convert_hf_to_gguf.py (run in a subprocess). Its
NemotronH converter wants a Hugging Face tokenizer; our benchmark models have none, so the driver replaces only the
vocabulary step with a placeholder byte-free vocabulary of the right size (decode speed does not depend on it).
llama-bench's tg128 (128 tokens after an empty prompt, 2 threads) is compared with ours and transformers'
generate (prompt 16, 128 new tokens). Writes bench/results/llamacpp_decode.json and .png.
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
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32"]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def llama_bench(src: str, gguf_path: str, threads: int, n: int, repeats: int) -> float:
    exe = os.path.join(src, "build", "bin", "llama-bench")
    out = subprocess.run([exe, "-m", gguf_path, "-p", "0", "-n", str(n), "-t", str(threads), "-r", str(repeats),
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree with build/bin/llama-bench")
    p.add_argument("--configs", nargs="+", default=["small", "medium"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.llama_cpp, "build", "bin", "llama-bench")):
        sys.exit(f"--llama-cpp {args.llama_cpp}: no build/bin/llama-bench there; build it first (see this file's "
                 f"docstring).")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        cfg = from_preset(name)
        torch.manual_seed(0)
        ours = NemotronForCausalLM(cfg).eval()
        tmp = tempfile.mkdtemp()
        ours.save_pretrained(os.path.join(tmp, "hf"))
        gguf_path = os.path.join(tmp, "model-f32.gguf")
        subprocess.run([sys.executable, "-c", CONVERT_DRIVER, args.llama_cpp, os.path.join(tmp, "hf"), gguf_path],
                       check=True, capture_output=True)
        llama = llama_bench(args.llama_cpp, gguf_path, args.threads, args.new_tokens, args.repeats)
        hf = load_hf(os.path.join(tmp, "hf"))
        prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        n = args.new_tokens
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        t_hf = best_time(lambda: hf.generate(prompt, max_new_tokens=n, **gen), args.repeats)
        t_eager = best_time(lambda: ours.generate(prompt, max_new_tokens=n), args.repeats)
        ours.compile_decode()
        t_comp = best_time(lambda: ours.generate(prompt, max_new_tokens=n), args.repeats)
        for engine, tps in (("llama.cpp (fp32, llama-bench tg)", llama), ("transformers", n / t_hf),
                            ("nemotron3 eager", n / t_eager), ("nemotron3 compiled", n / t_comp)):
            rows.append(dict(config=name, engine=engine, tok_s=tps, vs_llama_cpp=tps / llama,
                             vs_transformers=tps * t_hf / n))
    print("batch-1 greedy decode, float32, tokens/s; ratios from the same run")
    print_table(rows, ["config", "engine", "tok_s", "vs_llama_cpp", "vs_transformers"])
    save("llamacpp_decode", dict(rows=rows))
    plot(rows, os.path.join(RESULTS, "llamacpp_decode.png"))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({r["config"] for r in rows}, key=[r["config"] for r in rows].index)
    engines = sorted({r["engine"] for r in rows}, key=[r["engine"] for r in rows].index)
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.6), squeeze=False)
    for ax, c in zip(axes[0], configs):
        vals = [next(r["tok_s"] for r in rows if r["config"] == c and r["engine"] == e) for e in engines]
        ax.bar(range(len(engines)), vals, color=["#999999", "#cc7a00", "#8fbf40", "#76b900"])
        ax.set_xticks(range(len(engines)), [e.split(" (")[0] for e in engines], rotation=20, fontsize=8)
        ax.set_title(f"{c}: batch-1 decode tok/s", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
