"""MTP healing. Oracles: the MTP loss on the policy's generations as the shared trainer logged it at the first and
last healing step (it must fall); the backbone's tensors as they were before healing (they must not move); the
engine's own count of accepted drafts for the acceptance shares."""

import json
import os

import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.rl.heal import heal_mtp
from nemotron3.rl.train import GRPOConfig
from tests.rl.test_rollout import TOK, Words


def test_healing_fits_the_mtp_heads_to_the_policys_text_and_leaves_the_backbone(tmp_path):
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny"))
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("mtp.")}
    backbone |= {n: b.clone() for n, b in model.named_buffers()      # the routers' biases; not the load counters
                 if not n.startswith("mtp.") and not n.endswith("tokens_per_expert")}
    cfg = GRPOConfig(env="tests.rl.test_rollout:Words", group_size=4, max_tokens=16, heal_mtp_steps=8,
                     eval_samples=2, mtp_depths=1, stop="")
    out = str(tmp_path / "heal")
    result = heal_mtp(model, TOK, {"words": Words()}, cfg, out, log=lambda *_: None, prompts_per_env=8)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 8 and rows[-1]["mtp1_loss"] < rows[0]["mtp1_loss"] - 0.1
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    assert [n for n, t in backbone.items() if not torch.equal(params[n], t)] == []
    assert 0 < result["before"] <= 1 and 0 < result["after"] <= 1
    assert all(p.requires_grad for p in model.parameters())          # the caller's trainable flags come back
