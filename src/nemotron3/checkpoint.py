"""Hugging Face-layout checkpoints: config.json + sharded *.safetensors + model.safetensors.index.json.

The on-disk names are NVIDIA's and transformers' (`backbone.layers.N.mixer...`, `lm_head.weight`, `mtp.layers.*`);
the only difference from our module names is the expert layout: in memory the experts are fused 3-D parameters
`mixer.experts.up_proj (E, m, l)`, on disk they are per expert `mixer.experts.{e}.up_proj.weight (m, l)` (HF
conversion_mapping does the same). Both layouts, and a `model.` prefix instead of `backbone.`, are accepted on load.

Saving writes every file into a temporary sibling directory and then swaps it in with renames, so a crash never
leaves a half-written checkpoint. Loading never unpickles: safetensors only. A checkpoint with missing, unexpected
or wrongly shaped tensors fails with the list of offending names; a truncated or corrupt file fails naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict

import torch

from .config import NemotronConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FUSED = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint on disk does not match the model it should fill; the message says what and how to fix it."""


def to_disk_state_dict(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (the model's own, or `state_dict` with its names, e.g. gathered from shards) with fused
    experts split into HF's per-expert tensors (views, no copy)."""
    out = {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        if m := _FUSED.match(name):
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = t[e]
        else:
            out[name] = t
    if model.config.tie_word_embeddings:          # write the head too, so transformers (which never ties) loads it
        out["lm_head.weight"] = out["backbone.embeddings.weight"]
    return out


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes or a string like '5GB' or '500MB'.")
    return int(float(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]])


def save_pretrained(model, save_dir, max_shard_size="5GB", state_dict: dict | None = None) -> None:
    """model's weights (or `state_dict`, the whole model's, when the model itself holds only shards) and config."""
    from safetensors.torch import save_file

    save_dir = os.path.abspath(os.fspath(save_dir))
    tensors = to_disk_state_dict(model, state_dict)
    limit = parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(save_dir) + ".tmp-", dir=parent)
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = SINGLE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            # safetensors wants contiguous, unshared storage: clone the per-expert views and the tied head
            save_file({k: v.detach().contiguous().clone() for k, v in shard.items()}, os.path.join(tmp, fname),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
        model.config.save_json(os.path.join(tmp, "config.json"), dtype=dtype, torch_dtype=dtype)
        _swap_in(tmp, save_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: str, save_dir: str) -> None:
    """Move the finished tmp dir to save_dir. Files of an existing save_dir that are not model files (a tokenizer,
    a README) are carried over; the old weights are removed only after the new ones are in place."""
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            is_model_file = name.endswith(".safetensors") or name in (INDEX_NAME, "config.json")
            if not is_model_file and not os.path.exists(os.path.join(tmp, name)):
                src = os.path.join(save_dir, name)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
        old = tempfile.mkdtemp(prefix=os.path.basename(save_dir) + ".old-", dir=os.path.dirname(save_dir))
        os.rmdir(old)
        os.replace(save_dir, old)
        os.replace(tmp, save_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, save_dir)


def _shard_files(ckpt_dir: str) -> list[str]:
    index = os.path.join(ckpt_dir, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); re-save the checkpoint.") from None
        missing = [f for f in files if not os.path.exists(os.path.join(ckpt_dir, f))]
        if missing:
            raise CheckpointError(f"{ckpt_dir}: the index names shard files that are not there: {missing}. "
                                  f"Copy the whole checkpoint directory.")
        return [os.path.join(ckpt_dir, f) for f in files]
    single = os.path.join(ckpt_dir, SINGLE_NAME)
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(ckpt_dir, f) for f in found]
    pickles = [f for f in os.listdir(ckpt_dir) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" It has pickle files {pickles}, which are never loaded (unsafe); convert them to safetensors first."
            if pickles else "")
    raise CheckpointError(f"{ckpt_dir} has no *.safetensors weights.{hint}")


def _read_tensors(files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is probably truncated or "
                                  f"corrupt: download or copy it again.") from None
    return tensors


def from_disk_names(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Rename to our module names: `model.` -> `backbone.`, per-expert tensors stacked into fused 3-D ones."""
    out, experts = {}, defaultdict(dict)
    for name, t in tensors.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        if m := _PER_EXPERT.match(name):
            experts[(m[1], m[3])][int(m[2])] = t
        else:
            out[name] = t
    for (prefix, proj), per in experts.items():
        want = set(range(num_experts))
        if set(per) != want:
            got = sorted(per)
            raise CheckpointError(f"{prefix}.*.{proj}.weight: expected experts 0..{num_experts - 1}, found "
                                  f"missing {sorted(want - set(per))} / unexpected {sorted(set(per) - want)} "
                                  f"(have {len(got)}); does n_routed_experts in config.json match the weights?")
        out[f"{prefix}.{proj}"] = torch.stack([per[e] for e in range(num_experts)])
    return out


SMALL_MODEL_BYTES = 1 << 30


@contextlib.contextmanager
def _skip_init():
    """No random initialisation while a model is built to be loaded (transformers' no_init_weights does the same):
    the checkpoint overwrites every weight."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def load_pretrained(cls, path_or_dir, dtype: torch.dtype | None = None, device=None):
    """Build the model without initialising it, then assign the checkpoint's tensors (no double allocation)."""
    ckpt_dir = os.fspath(path_or_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a directory. Pass a directory holding config.json and "
                                f"*.safetensors (weights cannot be downloaded here: copy them locally first).")
    config = NemotronConfig.from_json_file(ckpt_dir)
    tensors = from_disk_names(_read_tensors(_shard_files(ckpt_dir)), config.n_routed_experts)
    # Small models are built on the CPU with initialisation skipped (uninitialised memory that the checkpoint then
    # replaces): the meta device's first use imports torch's decompositions, seconds of a CLI's start-up. Large ones
    # are built on the meta device, so their weights are never allocated twice.
    small = sum(t.numel() * t.element_size() for t in tensors.values()) < SMALL_MODEL_BYTES
    with torch.device("cpu" if small else "meta"), _skip_init():
        model = cls(config)
    expected = model.state_dict()
    if config.tie_word_embeddings and "backbone.embeddings.weight" in tensors:   # the head is the embedding
        tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"]
    if config.num_nextn_predict_layers == 0:     # an MTP-less config ignores MTP weights, as transformers does
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if names]
        raise CheckpointError(f"{ckpt_dir} does not match its config.json:\n  " + "\n  ".join(parts) +
                              "\nCheck that config.json belongs to these weights (layer pattern, sizes, experts).")
    for k, t in tensors.items():
        if k.endswith("e_score_correction_bias"):
            tensors[k] = t.float()                              # routing bias stays float32 (as HF)
        elif dtype is not None and t.is_floating_point():
            tensors[k] = t.to(dtype)
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    model.load_state_dict(tensors, assign=True, strict=True)
    for module in model.modules():       # buffers that checkpoints never hold (MoE token counts) start at zero
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module.register_buffer(name, torch.zeros_like(buf, device=device or "cpu"), persistent=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()
