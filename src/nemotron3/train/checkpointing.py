"""Training checkpoints: the model in the Hugging Face layout plus the trainer state, written atomically, last K kept.

    RUN_DIR/checkpoints/step_N/   config.json, model.safetensors (loads with from_pretrained / transformers)
                                  trainer_state.safetensors  optimizer moments + RNG states (tensors, no pickle)
                                  trainer_state.json         step, sampler position, optimizer scalars, config
A checkpoint directory is complete or absent: everything is written into a temporary sibling and renamed.
Resume loads the newest complete step_N; with the same data, seed and thread count the rest of the run is bit for
bit the run that was interrupted (tested with a real SIGKILL).

A sharded run (FSDP2 / expert parallel under torchrun) writes torch.distributed.checkpoint (DCP) shards instead,
every rank its own pieces, into the same kind of temporary directory that rank 0 renames once all have finished:
    RUN_DIR/checkpoints/step_N/   .metadata + __R_0.distcp   {"model": ..., "optimizer": ...} by parameter name
                                  config.json, trainer_state.json (step, sampler position, RNG states, config)
DCP stores global tensors by name and offset, so a run resumes on any number of ranks and any (dp, ep) layout,
or in one process (resharding); `nemotron3 export step_N OUT` turns one into the Hugging Face layout. With
--async-save the shards are written in the background (dcp.async_save) and the rename to step_N happens once every
rank has finished, at the next save or the end of the run: a run killed before then resumes from the step before.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m[1]), os.path.join(root, name)) for name in os.listdir(root) if (m := STEP_DIR.match(name))]
    return sorted(f for f in found if os.path.exists(os.path.join(f[1], "trainer_state.json")))


def save_checkpoint(run_dir: str, step: int, model, optimizer, extra: dict, keep_last: int) -> str:
    from safetensors.torch import save_file

    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".step_{step}.tmp-", dir=root)
    try:
        model.save_pretrained(os.path.join(tmp, "model"))
        for name in os.listdir(os.path.join(tmp, "model")):
            os.replace(os.path.join(tmp, "model", name), os.path.join(tmp, name))
        os.rmdir(os.path.join(tmp, "model"))
        tensors, scalars = _optimizer_to_flat(model, optimizer)
        tensors["rng.torch"] = torch.get_rng_state()          # CPU RNG; training draws no GPU random numbers
        save_file(tensors, os.path.join(tmp, "trainer_state.safetensors"))
        state = dict(extra, step=step, optimizer=scalars, python_random=_jsonable(random.getstate()),
                     numpy_random=_jsonable(np.random.get_state()))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        final = os.path.join(root, f"step_{step}")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded(path: str) -> bool:
    return os.path.exists(os.path.join(path, ".metadata"))


def save_sharded_checkpoint(run_dir: str, step: int, model, optimizer, extra: dict, keep_last: int,
                            extra_files=(), async_save: bool = False):
    """DCP checkpoint of a sharded model + optimizer; a collective (every rank calls it). Atomic: the shards go to
    a temporary directory that rank 0 renames to step_N after every rank has written (and then prunes).
    async_save: dcp.async_save copies the state into host memory and writes it in a background thread on its own
    gloo process group while training goes on; returns a PendingSave whose finish() (called before the next save
    and at the end of the run) waits for the writes and then does the rename. Otherwise returns step_N."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(run_dir, "checkpoints")
    tmp = os.path.join(root, f".step_{step}.tmp")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)           # left by a run killed while saving
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    pending = PendingSave(run_dir, step, keep_last, tmp, model.config, list(extra_files),
                          dict(extra, step=step, **_rng_states()))           # this step's RNG and data position
    if not async_save:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        return pending.finish()
    pending.future = dcp.async_save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp,
                                    process_group=_async_group())
    return pending


class PendingSave:
    """A sharded checkpoint whose shards may still be being written; finish() completes it (a collective)."""

    def __init__(self, run_dir, step, keep_last, tmp, config, extra_files, trainer_state):
        self.run_dir, self.step, self.keep_last, self.tmp = run_dir, step, keep_last, tmp
        self.config, self.extra_files, self.trainer_state = config, extra_files, trainer_state
        self.future = None

    def finish(self) -> str:
        import torch.distributed as dist
        if self.future is not None:
            self.future.result()                         # this rank's shards are on disk
        dist.barrier()                                   # ... and every other rank's
        final = os.path.join(self.run_dir, "checkpoints", f"step_{self.step}")
        if dist.get_rank() == 0:
            self.config.save_json(os.path.join(self.tmp, "config.json"))
            for p in self.extra_files:
                shutil.copy(p, os.path.join(self.tmp, os.path.basename(p)))
            with open(os.path.join(self.tmp, "trainer_state.json"), "w") as f:
                json.dump(self.trainer_state, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(self.tmp, final)
            for _, old in list_checkpoints(self.run_dir)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final


_ASYNC_GROUP = []


def _async_group():
    """A gloo process group of all ranks for the background writer, so that its collectives never interleave with
    the training's on the default group (created once, by every rank)."""
    import torch.distributed as dist
    if not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo"))
    return _ASYNC_GROUP[0]


def _rng_states() -> dict:
    return dict(torch_random=torch.get_rng_state().tolist(), python_random=_jsonable(random.getstate()),
                numpy_random=_jsonable(np.random.get_state()))


def _load_sharded_checkpoint(path: str, model, optimizer) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)                 # each rank reads the pieces of its own shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    torch.set_rng_state(torch.tensor(trainer_state["torch_random"], dtype=torch.uint8))
    random.setstate(_tuples(trainer_state["python_random"]))
    np.random.set_state(tuple(_tuples(trainer_state["numpy_random"])))
    return trainer_state


def export_checkpoint(path: str, out_dir: str) -> str:
    """A DCP training checkpoint (step_N/) -> a Hugging Face-layout model directory (config.json +
    *.safetensors + the tokenizer files kept with it), in one process."""
    import torch.distributed.checkpoint as dcp

    from ..config import NemotronConfig
    from ..model import NemotronForCausalLM
    if not is_sharded(path):
        raise ValueError(f"{path} is not a sharded (DCP) checkpoint (no .metadata); a single-process run's step_N "
                         f"is already in the Hugging Face layout: load it with from_pretrained as it is.")
    model = NemotronForCausalLM(NemotronConfig.from_json_file(path))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():             # DCP warns that it runs in one process: that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
    model.save_pretrained(out_dir)
    for name in os.listdir(path):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(path, name), os.path.join(out_dir, name))
    return out_dir


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restore model weights, optimizer state and RNG states in place; returns trainer_state.json. A sharded (DCP)
    checkpoint loads into any layout (resharding); a Hugging Face-layout one (an unsharded run's) too, each rank of a
    sharded model reading only its shards of the weights and optimizer moments."""
    from safetensors.torch import load_file

    from ..checkpoint import load_into_shards
    from ..model import NemotronForCausalLM
    from .parallelize import is_sharded_model
    if is_sharded(path):
        return _load_sharded_checkpoint(path, model, optimizer)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if is_sharded_model(model):          # an unsharded run's checkpoint: each rank reads its shards of it
        load_into_shards(model, path)
        tensors = _sharded_optimizer_from_file(model, optimizer, os.path.join(path, "trainer_state.safetensors"),
                                               state["optimizer"])
    else:
        model.load_state_dict(NemotronForCausalLM.from_pretrained(path).state_dict())   # copies into the tensors
        tensors = load_file(os.path.join(path, "trainer_state.safetensors"))
        _optimizer_from_flat(model, optimizer, tensors, state["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tuples(state["python_random"]))
    np.random.set_state(tuple(_tuples(state["numpy_random"])))
    return state


def _optimizer_to_flat(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = {}, {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                             for g in optimizer.param_groups], "state": {}}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{names[id(p)]}.{k}"] = v.contiguous()
            else:
                scalars["state"].setdefault(names[id(p)], {})[k] = v
    return tensors, scalars


def _optimizer_from_flat(model, optimizer, tensors, scalars):
    params = dict(model.named_parameters())
    _restore_groups(optimizer, scalars)
    for key, v in tensors.items():
        if key.startswith("opt."):
            pname, k = key[4:].rsplit(".", 1)
            optimizer.state[params[pname]][k] = v.to(params[pname].device, copy=True)
    for pname, st in scalars["state"].items():
        optimizer.state[params[pname]].update(st)


def _sharded_optimizer_from_file(model, optimizer, file: str, scalars) -> dict:
    """_optimizer_from_flat for a sharded model reading an unsharded run's trainer_state.safetensors: a moment
    tensor of a sharded parameter is read as the rank's box of it only. Returns {"rng.torch": ...}."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from ..checkpoint import local_box, read_box
    params = dict(model.named_parameters())
    _restore_groups(optimizer, scalars)
    f = safe_open(file, "pt")
    for key in f.keys():
        if key.startswith("opt."):
            pname, k = key[4:].rsplit(".", 1)
            p = params[pname]
            if isinstance(p, DTensor) and tuple(f.get_slice(key).get_shape()) == tuple(p.shape):
                local, box = local_box(p)
                v = DTensor.from_local(read_box(f, key, box).to(local.device), p.device_mesh, p.placements,
                                       run_check=False, shape=p.shape, stride=p.stride())
            else:                                           # Adam's step count, a replicated parameter's moments
                v = f.get_tensor(key).to(p.device)
            optimizer.state[p][k] = v
    for pname, st in scalars["state"].items():
        optimizer.state[params[pname]].update(st)
    return {"rng.torch": f.get_tensor("rng.torch")}


def _restore_groups(optimizer, scalars) -> None:
    for g, saved in zip(optimizer.param_groups, scalars["param_groups"]):
        g.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    optimizer.state.clear()


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    if isinstance(x, dict) and "__ndarray__" in x:
        return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def main(argv=None):
    """`nemotron3 export RUN/checkpoints/step_N OUT`."""
    import argparse
    p = argparse.ArgumentParser(prog="nemotron3 export", description="Write a sharded (DCP) training checkpoint "
                                "as a Hugging Face-layout model directory (from_pretrained / transformers).")
    p.add_argument("checkpoint", help="RUN/checkpoints/step_N of a multi-process run")
    p.add_argument("out", help="output model directory")
    args = p.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"{args.checkpoint} is not a directory; give RUN/checkpoints/step_N.")
    print(f"model: {export_checkpoint(args.checkpoint, args.out)}")
    return 0
