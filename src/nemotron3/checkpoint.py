"""Hugging Face-layout checkpoints: config.json + sharded *.safetensors + model.safetensors.index.json.

The on-disk names are NVIDIA's and transformers' (`backbone.layers.N.mixer...`, `lm_head.weight`, `mtp.layers.*`);
the only difference from our module names is the expert layout: in memory the experts are fused 3-D parameters
`mixer.experts.up_proj (E, m, l)`, on disk they are per expert `mixer.experts.{e}.up_proj.weight (m, l)` (HF
conversion_mapping does the same). Both layouts, and a `model.` prefix instead of `backbone.`, are accepted on load.

Saving writes every file into a temporary sibling directory and then swaps it in with renames, so a crash never
leaves a half-written checkpoint. Loading never unpickles: safetensors only. A checkpoint with missing, unexpected
or wrongly shaped tensors fails with the list of offending names; a truncated or corrupt file fails naming the file.
A sharded model (FSDP2 / expert / tensor parallel under torchrun) is filled by load_into_shards instead: every rank
reads only the boxes of the tensors its shards cover (safetensors get_slice), never the whole model.

Next to the weights, draft_vocab.json (optional) holds the model's draft vocabulary for speculative decoding: the
ids of the most frequent tokens of its training data, most frequent first (training writes it; the inference
engine's MTP drafter then scores only those tokens). Saved from and loaded into `model.draft_vocab`.
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
DRAFT_VOCAB_NAME = "draft_vocab.json"
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
        if getattr(model, "draft_vocab", None) is not None:
            with open(os.path.join(tmp, DRAFT_VOCAB_NAME), "w") as f:
                json.dump(model.draft_vocab.tolist(), f)
        _swap_in(tmp, save_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: str, save_dir: str) -> None:
    """Move the finished tmp dir to save_dir. Files of an existing save_dir that are not model files (a tokenizer,
    a README) are carried over; the old weights are removed only after the new ones are in place."""
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            is_model_file = name.endswith(".safetensors") or name in (INDEX_NAME, "config.json", DRAFT_VOCAB_NAME)
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
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); re-save the "
                                  f"checkpoint.") from None
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


def _our_name(disk_name: str) -> tuple[str, int | None]:
    """A disk name -> (our name, expert index or None): `model.` -> `backbone.`, per-expert tensors -> the fused one."""
    if disk_name.startswith("model."):
        disk_name = "backbone." + disk_name[len("model."):]
    if m := _PER_EXPERT.match(disk_name):
        return f"{m[1]}.{m[3]}", int(m[2])
    return disk_name, None


def _check_experts(name: str, found, num_experts: int) -> None:
    want = set(range(num_experts))
    if set(found) != want:
        prefix, proj = name.rsplit(".", 1)
        raise CheckpointError(f"{prefix}.*.{proj}.weight: expected experts 0..{num_experts - 1}, found "
                              f"missing {sorted(want - set(found))} / unexpected {sorted(set(found) - want)} "
                              f"(have {len(set(found))}); does n_routed_experts in config.json match the weights?")


def from_disk_names(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Rename to our module names: `model.` -> `backbone.`, per-expert tensors stacked into fused 3-D ones."""
    out, experts = {}, defaultdict(dict)
    for disk_name, t in tensors.items():
        name, e = _our_name(disk_name)
        if e is None:
            out[name] = t
        else:
            experts[name][e] = t
    for name, per in experts.items():
        _check_experts(name, per, num_experts)
        out[name] = torch.stack([per[e] for e in range(num_experts)])
    return out


def _check_names(ckpt_dir: str, expected: dict, found: dict) -> None:
    """expected / found: {name: shape}. Raises one CheckpointError listing every missing, unexpected and wrongly
    shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if names]
        raise CheckpointError(f"{ckpt_dir} does not match its config.json:\n  " + "\n  ".join(parts) +
                              "\nCheck that config.json belongs to these weights (layer pattern, sizes, experts).")


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
    draft_vocab = read_draft_vocab(ckpt_dir, config.vocab_size)          # a bad file fails before the weights load
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
    _check_names(ckpt_dir, {k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in tensors.items()})
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
    model.draft_vocab = draft_vocab
    return model.eval()


def draft_vocab_problem(ids: torch.Tensor, vocab_size: int) -> str | None:
    """What makes `ids` unusable as a draft vocabulary (a 1-D integer tensor of distinct token ids in
    [0, vocab_size), at least one), as the end of a sentence "... must be <that>"; None when it is fine."""
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex()
            or not len(ids) or int(ids.min()) < 0 or int(ids.max()) >= vocab_size
            or len(ids.unique()) != len(ids)):
        return f"a non-empty list of distinct integer token ids in [0, {vocab_size}) (vocab_size)"
    return None


def read_draft_vocab(ckpt_dir: str, vocab_size: int) -> torch.Tensor | None:
    """The draft vocabulary saved in ckpt_dir (draft_vocab.json: distinct token ids in [0, vocab_size)), or None
    when there is none; a malformed file fails naming it."""
    path = os.path.join(ckpt_dir, DRAFT_VOCAB_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            ids = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a JSON list of token ids ({e}); delete it (drafting then scores the "
                              f"whole vocabulary) or rewrite it.") from None
    problem = (draft_vocab_problem(torch.tensor(ids, dtype=torch.long), vocab_size)
               if isinstance(ids, list) and all(type(i) is int and abs(i) < 2**62 for i in ids)
               else "a JSON list of integer token ids")
    if problem:
        raise CheckpointError(f"{path} must be {problem}; delete it (drafting then scores the whole vocabulary) or "
                              f"rewrite it.")
    return torch.tensor(ids, dtype=torch.long)


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(the rank's local tensor, the box of the global tensor it holds): for a DTensor (sharded by FSDP2, expert or
    tensor parallelism, on any mesh) its local shard and the offsets its placements give it; a plain tensor is its
    own whole box."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if not isinstance(t, DTensor):
        return t, tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def read_box(f, name: str, box: tuple[slice, ...]) -> torch.Tensor:
    """One box of tensor `name` of an open safetensors file: only those bytes are read."""
    return f.get_slice(name)[box] if box else f.get_tensor(name)


def load_into_shards(model, ckpt_dir, device=None) -> None:
    """Fill a sharded model (FSDP2 / expert / tensor parallel DTensors) from a Hugging Face-layout checkpoint, each
    rank reading only its own shards: for every tensor the rank's box of the global tensor (local_box) is read with
    safetensors' get_slice, which copies just those bytes from the file. No rank ever holds the whole model;
    replicated tensors (norms, biases, the routing bias) are read whole. Collective-free. device: a model built on
    the meta device gets its local shards allocated there first (to_empty); None copies into the existing ones."""
    from safetensors import SafetensorError, safe_open

    config = model.config
    where: dict[str, dict] = {}         # our name -> {expert index or None: (open file, disk name)}
    for path in _shard_files(os.fspath(ckpt_dir)):
        try:
            f = safe_open(path, "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is probably truncated or "
                                  f"corrupt: download or copy it again.") from None
        for disk in f.keys():
            name, e = _our_name(disk)
            if not (config.num_nextn_predict_layers == 0 and name.startswith("mtp.")):   # as load_pretrained
                where.setdefault(name, {})[e] = (f, disk)
    if config.tie_word_embeddings and "backbone.embeddings.weight" in where:
        where["lm_head.weight"] = where["backbone.embeddings.weight"]
    found = {}
    for name, per in where.items():
        if None in per:
            found[name] = per[None][0].get_slice(per[None][1]).get_shape()
        else:
            _check_experts(name, per, config.n_routed_experts)
            found[name] = [len(per), *per[0][0].get_slice(per[0][1]).get_shape()]
    _check_names(os.fspath(ckpt_dir), {k: v.shape for k, v in model.state_dict().items()}, found)

    if device is not None:
        model.to_empty(device=device)             # allocates only the local shards
    with torch.no_grad():
        for name, t in model.state_dict().items():
            local, box = local_box(t)
            if local.numel() == 0:                # an uneven split left this rank no rows
                continue
            per = where[name]
            if None in per:
                piece = read_box(*per[None], box)
            else:                                  # fused experts: the rank's experts, each one's box
                piece = torch.stack([read_box(*per[e], box[1:]) for e in range(box[0].start, box[0].stop)])
            local.copy_(piece.view_as(local))
    for module in model.modules():                # buffers that checkpoints never hold (MoE token counts)
        for name, buf in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                buf.zero_()
