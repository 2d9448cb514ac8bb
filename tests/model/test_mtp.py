"""MTP heads. Oracle: the formula of nemotron3_spec.md §2.1 written out by hand in float64, with transformers'
NemotronHBlock (attention and MoE blocks, same weights) for the inner layers."""

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from tests.hf_utils import randomize_

transformers = pytest.importorskip("transformers")


def rms(x, w, eps=1e-5):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def hf_blocks(model):
    """HF blocks of the MTP pattern carrying our MTP block's weights."""
    cfg = model.config
    hf_cfg = transformers.NemotronHConfig(**{k: v for k, v in cfg.to_dict().items() if k not in (
        "architectures", "model_type", "num_hidden_layers", "time_step_limit")} | {
        "layers_block_type": cfg.mtp_layers_block_type})
    hf_cfg._attn_implementation = "sdpa"            # causal when no mask is given (standalone blocks default to eager)
    blocks = []
    for i, layer in enumerate(model.mtp.layers[:len(cfg.mtp_layers_block_type)]):
        blk = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHBlock(hf_cfg, i).double().eval()
        state = {k: v for k, v in layer.state_dict().items() if k.startswith(("norm.", "mixer."))}
        blk.load_state_dict({k: v.double() for k, v in state.items()})
        blocks.append(blk)
    return blocks


def test_mtp_depths_match_hand_written_formula():
    torch.manual_seed(0)
    model = randomize_(NemotronForCausalLM(from_preset("tiny"))).double().eval()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, mtp_depths=2)
        blocks = hf_blocks(model)
        first, last = model.mtp.layers[0], model.mtp.layers[1]
        E, W_head = model.backbone.embeddings.weight, model.lm_head.weight
        h = out.hidden_states
        for k in (1, 2):                             # one physical block applied recursively (shared weights)
            nxt = torch.cat([ids[:, k:], torch.zeros(2, k, dtype=torch.long)], dim=1)     # x_{t+k}
            u = torch.cat([rms(E[nxt], first.enorm.weight), rms(h, first.hnorm.weight)], -1) @ first.eh_proj.weight.T
            for blk in blocks:
                u = blk(u)
            h = rms(u, last.final_layernorm.weight)
            # HF routes in float32 even in a float64 model, so the MoE block agrees to ~1e-7, not 1e-12
            torch.testing.assert_close(out.mtp_hidden_states[k - 1], h, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.mtp_logits[k - 1], (h @ W_head.T).float(), rtol=1e-4, atol=1e-4)


def test_eh_proj_takes_the_embedding_half_first():
    model = NemotronForCausalLM(from_preset("tiny")).eval()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        model.mtp.layers[0].eh_proj.weight[:, 64:] = 0           # hidden half off: only x_{t+1} matters
        a = model(ids, mtp_depths=1).mtp_logits[0]
        ids2 = ids.clone()
        ids2[0, 0] = (ids[0, 0] + 1) % 256                          # changes h_t, not x_{t+1}
        b = model(ids2, mtp_depths=1).mtp_logits[0]
    torch.testing.assert_close(a[0, 0], b[0, 0])


def test_each_depth_uses_its_own_block_when_there_are_several():
    model = NemotronForCausalLM(from_preset("tiny", num_nextn_predict_layers=2))
    assert len(model.mtp.layers) == 4 and hasattr(model.mtp.layers[2], "eh_proj")
    assert model.mtp.block_layers(1)[0] is model.mtp.layers[0]
    assert model.mtp.block_layers(2)[0] is model.mtp.layers[2]
    assert model.mtp.block_layers(5)[0] is model.mtp.layers[2]      # deeper than the blocks: reuse the last


def test_mtp_request_without_heads_is_an_error():
    model = NemotronForCausalLM(from_preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="no MTP heads"):
        model(torch.tensor([[1, 2]]), mtp_depths=1)


def test_mtp_losses_and_accuracies_match_materialised_logits():
    """Oracle: F.cross_entropy on lm_head(h^k) against x_{t+k+1} (nemotron3_spec.md §2.2), float64."""
    torch.manual_seed(0)
    model = randomize_(NemotronForCausalLM(from_preset("tiny"))).double()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, mtp_depths=2)
    assert out.mtp_logits == [] and len(out.mtp_losses) == 2
    ref = model(ids, mtp_depths=2)
    for k, (loss_k, acc_k, logits_k) in enumerate(zip(out.mtp_losses, out.mtp_accuracies, ref.mtp_hidden_states), 1):
        logits = logits_k @ model.lm_head.weight.T
        target = torch.nn.functional.pad(ids[:, k + 1:], (0, k + 1), value=-100)
        torch.testing.assert_close(loss_k, torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()))
        valid = target != -100
        assert acc_k.item() == pytest.approx((logits.argmax(-1) == target)[valid].double().mean().item())
    (out.loss + 0.3 / 2 * sum(out.mtp_losses)).backward()      # Super's combination trains the shared MTP block
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
