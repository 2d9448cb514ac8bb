"""Checkpoint I/O. Oracles: the tensor names/shapes HF NemotronH and NVIDIA use on disk (hf_nemotronh.md §7, MTP
names nemotron3_spec.md §2.1), and transformers loading what we write (tests/model/test_parity_hf.py)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.checkpoint import CheckpointError, load_into_shards
from nemotron3.config import NemotronConfig


def load_box_by_box(path):
    """The sharded runs' loader in one process: a meta-device model filled by load_into_shards (whole boxes)."""
    with torch.device("meta"):
        model = NemotronForCausalLM(NemotronConfig.from_json_file(path))
    load_into_shards(model, path, "cpu")
    return model


LOADERS = [NemotronForCausalLM.from_pretrained, load_box_by_box]


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny")).eval()
    model.save_pretrained(tmp_path / "ck")
    return model, tmp_path / "ck"


def test_disk_names_are_hf_and_nvidia_names(tiny):
    _, path = tiny
    names = set(load_file(path / "model.safetensors"))
    assert "backbone.embeddings.weight" in names and "lm_head.weight" in names and "backbone.norm_f.weight" in names
    assert "backbone.layers.3.mixer.experts.7.up_proj.weight" in names           # per expert on disk
    assert "backbone.layers.3.mixer.experts.up_proj" not in names
    assert load_file(path / "model.safetensors")["backbone.layers.3.mixer.experts.0.up_proj.weight"].shape == (32, 32)
    for n in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
              "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.1.mixer.gate.e_score_correction_bias",
              "mtp.layers.1.mixer.experts.3.down_proj.weight", "mtp.layers.1.final_layernorm.weight",
              "backbone.layers.0.mixer.A_log", "backbone.layers.3.mixer.fc1_latent_proj.weight"):
        assert n in names, n
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and cfg["architectures"] == ["NemotronHForCausalLM"]


def test_round_trip_is_exact_including_mtp(tiny):
    model, path = tiny
    again = NemotronForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        a, b = model(ids, mtp_depths=2), again(ids, mtp_depths=2)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.mtp_logits, b.mtp_logits))


def test_sharded_save_writes_an_index_and_loads(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    again = NemotronForCausalLM.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_dtype_is_preserved_and_router_bias_stays_float32(tiny, tmp_path):
    model, path = tiny
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    again = NemotronForCausalLM.from_pretrained(tmp_path / "bf16")
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert again.backbone.layers[3].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert NemotronForCausalLM.from_pretrained(path, dtype=torch.bfloat16).backbone.embeddings.weight.dtype == \
        torch.bfloat16


def test_tied_embeddings_are_written_for_transformers(tmp_path):
    model = NemotronForCausalLM(from_preset("tiny", tie_word_embeddings=True))
    assert model.lm_head.weight is model.backbone.embeddings.weight
    model.save_pretrained(tmp_path / "t")
    again = NemotronForCausalLM.from_pretrained(tmp_path / "t")
    assert again.lm_head.weight is again.backbone.embeddings.weight
    assert "lm_head.weight" in load_file(tmp_path / "t" / "model.safetensors")


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_box_by_box_loader_reads_what_from_pretrained_reads_from_sharded_files(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    got, want = load_box_by_box(tmp_path / "sharded").state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]) or k.endswith("tokens_per_expert"), k
    assert all(not got[k].any() for k in got if k.endswith("tokens_per_expert"))      # buffers start at zero


@pytest.mark.parametrize("load", LOADERS)
def test_missing_unexpected_and_misshapen_tensors_are_listed(tiny, load):
    _, path = tiny

    def damage(t):
        del t["backbone.layers.0.mixer.D"]
        t["backbone.layers.0.mixer.extra"] = torch.zeros(1)
        t["backbone.norm_f.weight"] = torch.zeros(3)
    _rewrite(path, damage)
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert "missing (1): backbone.layers.0.mixer.D" in msg
    assert "unexpected (1): backbone.layers.0.mixer.extra" in msg
    assert "backbone.norm_f.weight: checkpoint (3,) vs model (64,)" in msg


@pytest.mark.parametrize("load", LOADERS)
def test_missing_expert_is_named(tiny, load):
    _, path = tiny
    _rewrite(path, lambda t: t.pop("backbone.layers.7.mixer.experts.5.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.\*\.down_proj.*missing \[5\]"):
        load(path)


def test_truncated_file_fails_clearly(tiny):
    _, path = tiny
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        NemotronForCausalLM.from_pretrained(path)


def test_pickle_weights_are_refused(tmp_path):
    from_preset("tiny").save_json(tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loaded"):
        NemotronForCausalLM.from_pretrained(tmp_path)


def test_save_over_existing_dir_keeps_other_files_and_leaves_no_temp(tiny):
    model, path = tiny
    (path / "tokenizer.json").write_text("{}")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    model.save_pretrained(path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [f for f in os.listdir(path.parent) if ".tmp-" in f or ".old-" in f]


def test_failed_save_leaves_the_previous_checkpoint_intact(tiny, monkeypatch):
    model, path = tiny
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert not [f for f in os.listdir(path.parent) if ".tmp-" in f]


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        NemotronForCausalLM.from_pretrained(tmp_path / "nope")


def test_draft_vocabulary_is_saved_loaded_and_used_by_default(tiny, tmp_path):
    from nemotron3.infer import Engine
    tiny, _ = tiny
    tiny.draft_vocab = torch.tensor([5, 1, 9])
    try:
        tiny.save_pretrained(tmp_path / "m")
    finally:
        tiny.draft_vocab = None
    assert json.load(open(tmp_path / "m" / "draft_vocab.json")) == [5, 1, 9]
    back = NemotronForCausalLM.from_pretrained(tmp_path / "m")
    assert back.draft_vocab.tolist() == [5, 1, 9]
    assert Engine(back).draft_vocab.tolist() == [5, 1, 9] and Engine(back, draft_vocab=None).draft_vocab is None
    tiny.save_pretrained(tmp_path / "m")                  # saved again without one: the old file does not linger
    assert NemotronForCausalLM.from_pretrained(tmp_path / "m").draft_vocab is None
    for bad in ("[1, 9999]", "[4, 2, 4]", "[1.5]", "{", "[]", "[99999999999999999999999]"):   # range, repeat, type
        (tmp_path / "m" / "draft_vocab.json").write_text(bad)
        with pytest.raises(CheckpointError, match="draft_vocab.json"):
            NemotronForCausalLM.from_pretrained(tmp_path / "m")


def test_training_saves_the_most_frequent_tokens_as_the_draft_vocabulary(tmp_path):
    from nemotron3.train.pretrain import TrainConfig, train
    from nemotron3.train.data import builtin_tokens
    from nemotron3.tokenizer import ByteTokenizer
    cfg = from_preset("tiny", vocab_size=2048)                 # a vocabulary large enough for a draft vocabulary
    out = train(TrainConfig(out=str(tmp_path), max_steps=2, save_every=2, eval_every=2, seq_len=32, batch_size=2,
                            train_tokens=5_000), log=lambda *_: None, model_config=cfg)
    saved = json.load(open(os.path.join(out, "draft_vocab.json")))
    counts = torch.bincount(torch.as_tensor(builtin_tokens(ByteTokenizer(), 5_000, 0, "train")), minlength=2048)
    assert sorted(saved) == sorted(torch.nonzero(counts).flatten().tolist())         # every seen byte, none other
    assert [int(counts[t]) for t in saved] == sorted(counts[counts > 0].tolist(), reverse=True)
