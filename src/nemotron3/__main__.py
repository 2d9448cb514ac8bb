"""`nemotron3 <command>` (or `python -m nemotron3 <command>`).

    nemotron3 info --preset nano-30b-a3b                  # layer plan and total / active parameters, no weights
    nemotron3 generate --preset tiny --prompt "Hello"     # random weights; --model DIR for a checkpoint
    nemotron3 chat --model runs/demo/final                # interactive, streaming, thinking shown dimmed
    nemotron3 serve --model runs/demo/final --port 8000   # OpenAI-compatible server (continuous batching)
    nemotron3 demo                                        # what `make demo` runs: pretrain -> SFT -> eval
    nemotron3 train --preset tiny --out runs/tiny --max-steps 300 --save-every 100 [--resume]
    nemotron3 sft --model runs/demo/final --data builtin --out runs/sft   # fine-tune on conversations
    torchrun --nproc_per_node 4 -m nemotron3 train --preset tiny --ep 2   # FSDP2 + expert parallel (dp 2 x ep 2)
    nemotron3 plan --preset nano-30b-a3b --gpus 64 --dp 8 --ep 8 --seq-len 8192   # per-GPU memory of a layout
    nemotron3 export runs/x/checkpoints/step_100 runs/x/hf   # a sharded checkpoint -> Hugging Face layout

Each command is a `main(argv)`; a bad flag value ends with one line naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

COMMANDS = ("info", "generate", "chat", "serve", "demo", "train", "sft", "rl", "plot", "eval", "plan", "export")


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, no traceback."""


def _load_model(args):
    import torch

    from . import NemotronForCausalLM, from_preset
    if bool(args.model) == bool(args.preset):
        raise UserError("give exactly one of --model DIR (a checkpoint) or --preset NAME (random weights).")
    if args.model:
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        return NemotronForCausalLM.from_pretrained(args.model, dtype=dtype)
    torch.manual_seed(args.seed)
    return NemotronForCausalLM(from_preset(args.preset)).eval()


def _config_for_info(args):
    from . import NemotronConfig, from_preset
    if bool(args.model) == bool(args.preset):
        raise UserError("give exactly one of --model DIR or --preset NAME.")
    return NemotronConfig.from_json_file(args.model) if args.model else from_preset(args.preset)


def describe(config, name: str = "") -> str:
    """The layer plan and the parameter counts of a config, computed on the meta device (no weights allocated)."""
    from collections import Counter

    from .model import count_parameters
    kinds = {"linear_attention": "Mamba-2", "full_attention": "attention", "moe": "MoE", "mlp": "MLP"}
    if config.moe_latent_size:
        kinds["moe"] = f"LatentMoE(l={config.moe_latent_size})"
    counts = Counter(config.layers_block_type)
    n = count_parameters(config)
    lines = [f"{name or 'model'}: {config.num_hidden_layers} layers, d={config.hidden_size}, "
             f"vocab {config.vocab_size}",
             f"layer plan: {config.hybrid_override_pattern}",
             "  " + ", ".join(f"{counts[k]} x {kinds[k]}" for k in kinds if counts[k]),
             f"  Mamba-2: {config.mamba_num_heads} heads x {config.mamba_head_dim}, state {config.ssm_state_size}, "
             f"{config.n_groups} groups, chunk {config.chunk_size}",
             f"  attention: {config.num_attention_heads} q / {config.num_key_value_heads} kv heads x "
             f"{config.head_dim}, no positional encoding",
             f"  MoE: {config.n_routed_experts} experts (m={config.moe_intermediate_size}) top-"
             f"{config.num_experts_per_tok} in width {config.expert_input_size}, shared expert "
             f"{config.moe_shared_expert_intermediate_size}, scale {config.routed_scaling_factor}"]
    if config.num_nextn_predict_layers:
        from .config import layers_to_pattern
        lines.append(f"  MTP: {config.num_nextn_predict_layers} block(s) '{layers_to_pattern(config.mtp_layers_block_type)}'"
                     f", shared embedding and head, applied recursively for more depths")
    fmt = lambda v: f"{v:,} ({v / 1e9:.2f}B)" if v >= 1e9 else f"{v:,} ({v / 1e6:.2f}M)"  # noqa: E731
    lines += [f"parameters total:            {fmt(n['total'])}",
              f"parameters active per token: {fmt(n['active'])}  "
              f"({fmt(n['active'] - config.vocab_size * config.hidden_size)} without the input embedding)"]
    if n["mtp_total"]:
        lines.append(f"MTP parameters:              {fmt(n['mtp_total'])} (active {fmt(n['mtp_active'])})")
    return "\n".join(lines)


def info_main(argv):
    p = argparse.ArgumentParser(prog="nemotron3 info", description="Print the layer plan and parameter counts.")
    p.add_argument("--preset", help="a built-in architecture (see --list)")
    p.add_argument("--model", help="a checkpoint directory with config.json")
    p.add_argument("--list", action="store_true", help="list the presets")
    args = p.parse_args(argv)
    if args.list:
        from .config import PRESETS
        print("\n".join(PRESETS))
        return
    print(describe(_config_for_info(args), args.preset or args.model))


def _generate_args(prog):
    p = argparse.ArgumentParser(prog=prog, description="Generate text from a checkpoint or a random preset.")
    p.add_argument("--model", help="checkpoint directory (ours or any Hugging Face NemotronH directory)")
    p.add_argument("--preset", help="random weights of a built-in architecture")
    p.add_argument("--prompt", default=None, help="text prompt (byte tokenizer unless tokenizer.json is present)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights dtype when loading --model (auto = as saved)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step first (a few seconds once; ~2x faster decoding on CPU)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="MTP drafts per step (default: the engine's measured choice, 2 at batch 1, when the model has "
                        "MTP heads; 0 = plain decoding)")
    p.add_argument("--reasoning-budget", type=int, default=None,
                   help="thinking tokens allowed before the thought is closed (chat / a prompt that opens <think>)")
    p.add_argument("--max-len", type=int, default=None,
                   help="longest prompt + new tokens accepted (default: the model's max_position_embeddings, the "
                        "length it was trained for; it has no positional encoding, so longer contexts run, with K/V "
                        "memory growing linearly)")
    return p


def generate_main(argv):
    from .tokenizer import load_tokenizer
    args = _generate_args("nemotron3 generate").parse_args(argv)
    model = _load_model(args)
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers.") from None
        tok = None
    else:
        if not args.prompt:
            raise UserError("the prompt is empty; pass --prompt TEXT or --prompt-ids 1,2,3.")
        tok = load_tokenizer(args.model, model.config.vocab_size)
        ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("the prompt has no tokens; give a non-empty --prompt or --prompt-ids.")
    engine = _engine(model, tok, args)
    req = _request(ids, args, args.max_new_tokens, thinking=tok is not None and tok.decode(ids).rstrip().endswith(
        "<think>"))
    t0 = time.perf_counter()
    res = engine.generate([req])[0]
    dt = time.perf_counter() - t0
    print(res.text if tok else ",".join(map(str, res.token_ids)))
    n = len(res.token_ids)
    spec = f", draft acceptance {[round(a, 2) for a in engine.acceptance()]}" if engine.K_max else ""
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s{spec}]", file=sys.stderr)


def _engine(model, tok, args):
    from .infer import Engine
    from .infer.engine import SPECULATION_BY_BATCH
    K = args.num_speculative_tokens
    if K is not None and K < 0:
        raise UserError(f"--num-speculative-tokens {K} must be >= 0.")
    if K is None:                                  # the measured K for a single stream (generate / chat: batch 1)
        K = SPECULATION_BY_BATCH if model.mtp is not None else 0
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 1.")
    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise UserError(f"--reasoning-budget {args.reasoning_budget} must be >= 0 (thinking tokens).")
    if args.max_len is not None and args.max_len < 2:
        raise UserError(f"--max-len {args.max_len} must be >= 2 (prompt + new tokens).")
    _sampling(args)
    if args.compile:
        model.compile_decode()
    return Engine(model, tok, num_speculative_tokens=K, max_model_len=args.max_len)


def _sampling(args):
    """The run's SamplingParams (their validation is the one check of these flags; errors name the flag)."""
    from .infer import SamplingParams
    try:
        top_p = 1.0 if args.top_p is None else args.top_p
        return SamplingParams(args.temperature, args.top_k or 0, top_p, args.min_p, args.repetition_penalty, args.seed)
    except ValueError as e:                        # "field=value must ...": name the flag instead
        field, rest = str(e).split("=", 1)
        raise UserError(f"--{field.replace('_', '-')} {rest}") from None


def _request(ids, args, max_tokens, thinking):
    from .infer import Request
    return Request(ids, max_tokens, _sampling(args), stop=args.stop, thinking=thinking,
                   reasoning_budget=args.reasoning_budget if thinking else None)


def chat_main(argv):
    """Interactive chat: the model's chat template (enable_thinking), streamed output, thinking shown dimmed."""
    from .tokenizer import load_tokenizer
    p = _generate_args("nemotron3 chat")
    p.add_argument("--no-think", action="store_true", help="reasoning off (enable_thinking=False)")
    p.add_argument("--system", default=None, help="system message")
    args = p.parse_args(argv)
    model = _load_model(args)
    tok = load_tokenizer(args.model, model.config.vocab_size)
    engine = _engine(model, tok, args)
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("nemotron3 chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=not args.no_think)
        thinking = prompt.rstrip().endswith("<think>")
        req = _request(tok.encode(prompt), args, args.max_new_tokens, thinking)
        if getattr(tok, "end_of_turn", None):          # the template's turn end is text: stop there
            req.stop = [*req.stop, tok.end_of_turn]
        in_thought = thinking
        sys.stdout.write(dim if in_thought else "")
        for ev in engine.stream([req]):
            text = ev.text
            if in_thought and "</think>" in text:
                head, tail = text.split("</think>", 1)
                text, in_thought = head + "</think>" + reset + tail, False
            sys.stdout.write(text)
            sys.stdout.flush()
        res = engine.last_results[0]
        print(reset)
        messages.append({"role": "assistant", "content": res.content})
    return 0


def serve_main(argv):
    """`nemotron3 serve`: the OpenAI-compatible server (serve/server.py)."""
    from .serve import ServeConfig, make_server
    from .tokenizer import load_tokenizer
    p = argparse.ArgumentParser(prog="nemotron3 serve", description=serve_main.__doc__)
    p.add_argument("--model", help="checkpoint directory (Hugging Face layout; tokenizer.json used if present)")
    p.add_argument("--preset", help="random weights of a built-in architecture (for trying the API)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NEMOTRON3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $NEMOTRON3_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory)")
    p.add_argument("--max-len", type=int, default=None, help="context per request (default: the model's)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="MTP drafts per step when the model has them (default: by live batch size, measured: "
                        "2 up to 2 rows, 1 up to 4, none beyond)")
    p.add_argument("--no-speculative", action="store_true", help="plain decoding even with MTP heads")
    p.add_argument("--no-continuous-batching", action="store_true",
                   help="a batch runs to completion before waiting requests join (the baseline of bench/serve_load.py)")
    defaults = ServeConfig()
    limits = ("max_batch", "max_queue", "max_queue_time", "max_n", "max_request_tokens", "max_body_bytes",
              "header_timeout", "body_timeout", "keep_alive", "backlog", "max_connections", "shutdown_timeout")
    for name in limits:
        v = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(v), default=v, help=f"(default {v})")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must lie in [0, 65535] (0 = any free port).")
    for name in limits:
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be > 0.")
    if args.num_speculative_tokens is not None and args.num_speculative_tokens < 0:
        raise UserError(f"--num-speculative-tokens {args.num_speculative_tokens} must be >= 0.")
    model = _load_model(args)
    tok = load_tokenizer(args.model, model.config.vocab_size)
    from .infer.engine import SPECULATION_BY_BATCH
    K = 0 if args.no_speculative or model.mtp is None else (
        SPECULATION_BY_BATCH if args.num_speculative_tokens is None else args.num_speculative_tokens)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else args.preset)
    cfg = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, num_speculative_tokens=K, name=name,
                      continuous=not args.no_continuous_batching, max_len=args.max_len,
                      **{k: getattr(args, k) for k in limits})
    try:
        server = make_server(model, tok, cfg)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; choose another --port.") from None
    print(f"serving {name} on http://{args.host}:{server.server_port}/v1 (speculative tokens {K}, "
          f"{args.max_batch} slots, auth {'on' if args.api_key else 'off'})", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


def _lazy(module: str):
    """A command's main(argv), imported only when that command runs (`generate` does not pay for the trainer)."""
    def run(argv):
        import importlib
        return importlib.import_module(f"{__package__}.{module}").main(argv)
    return run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\ncommands: " + ", ".join(COMMANDS))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    handler = {"info": info_main, "generate": generate_main, "chat": chat_main, "serve": serve_main,
               "demo": _lazy("demo"), "train": _lazy("train.pretrain"), "sft": _lazy("train.sft"),
               "rl": _lazy("rl.train"), "plot": _lazy("train.plot"), "eval": _lazy("eval"),
               "plan": _lazy("train.plan"), "export": _lazy("train.checkpointing")}[argv[0]]
    from .checkpoint import CheckpointError
    try:
        handler(argv[1:])
    except (UserError, ValueError, FileNotFoundError, CheckpointError, ImportError,
            FloatingPointError) as e:                    # DataError and RequestError are ValueErrors
        print(f"nemotron3 {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
