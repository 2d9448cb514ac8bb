"""Long-context evaluation: `nemotron3 eval ruler|nll`.

    nemotron3 eval ruler --model runs/long/final --lengths 1k,4k,16k --samples 20 --out runs/long/ruler
    nemotron3 eval nll --model runs/long/final --data builtin --max-len 16k --out runs/long/nll

ruler.py makes and scores RULER's synthetic tasks (haystack.py supplies their text); nll.py owns teacher-forced
log-probabilities (per-token NLL vs position, candidate answers after one shared prefill) and the power-law fit.
This file dispatches the subcommands and holds the small helpers both share (lengths like "16k", the --model
check and model loading, writing a plot).
"""

from __future__ import annotations

import os
import re

SUBCOMMANDS = ("ruler", "nll")


def parse_length(text: str, flag: str) -> int:
    """Tokens in a length written 4096, 4k (x1024) or 1m (x1048576)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{flag}: {text!r} is not a length; write a positive number with an optional k (x1024) or "
                         f"m (x1048576) suffix, e.g. 4k,16k,1m.")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def require_model_dir(args) -> None:
    """--model must name a checkpoint directory; one of --model / --preset must be given."""
    if args.model and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: no such directory; pass a checkpoint directory (config.json + "
                         f"weights), e.g. runs/demo/final, or --preset tiny for random weights.")
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model {args.model}: no config.json there; pass the checkpoint directory itself "
                         f"(e.g. runs/demo/final).")


def load_model(args):
    """The model of --model / --preset (as `nemotron3 generate` loads it), on --device (auto: CUDA if present)."""
    import torch

    from ..__main__ import _load_model
    require_model_dir(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {args.device}: not usable here ({str(e).splitlines()[0]}); use cpu or auto.") \
            from None
    return _load_model(args).to(device).eval()


def save_plot(path: str, draw) -> None:
    """draw(plt) -> figure, saved to path with the non-interactive backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv) -> None:
    if not argv or argv[0] not in SUBCOMMANDS:
        got = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand"
        raise ValueError(f"eval: {got}; use `nemotron3 eval ruler ...` or `nemotron3 eval nll ...` (--help on each).")
    if argv[0] == "ruler":
        from .ruler import main as sub
    else:
        from .nll import main as sub
    sub(argv[1:])
