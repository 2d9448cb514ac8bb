"""Packed sequences (position_ids restarting at 0, transformers' DataCollatorWithFlattening convention). Oracle:
each sequence run alone through the same model: a packed row must give the same logits, losses (main and MTP,
summed over valid targets) and gradients, for a config with every layer kind (M * E -), LatentMoE and MTP."""

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from tests.hf_utils import randomize_

LENGTHS = [5, 11, 1, 7]   # across Mamba chunks of 4, a 1-token sequence, shorter than the conv window


def packed_model():
    torch.manual_seed(0)
    cfg = from_preset("tiny", chunk_size=4)
    assert set(cfg.layers_block_type) == {"linear_attention", "full_attention", "moe", "mlp"}
    assert cfg.moe_latent_size and cfg.num_nextn_predict_layers
    return randomize_(NemotronForCausalLM(cfg), scale=0.1)


def packed_row(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, torch.cat(seqs, dim=1), position_ids


def summed_losses(out):
    return torch.stack([out.loss] + out.mtp_losses)


def test_packed_row_equals_each_sequence_alone_logits_losses_and_gradients():
    model, depths = packed_model(), 2
    seqs, ids, position_ids = packed_row(LENGTHS, model.config.vocab_size)
    packed = model(ids, position_ids=position_ids, labels=ids, mtp_depths=depths, logits_to_keep=ids.shape[1],
                   loss_reduction="sum")
    packed_sums = summed_losses(packed)
    packed_sums.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    alone_sums, start = 0, 0
    for s, n in zip(seqs, LENGTHS):
        alone = model(s, labels=s, mtp_depths=depths, logits_to_keep=n, loss_reduction="sum")
        torch.testing.assert_close(packed.logits[:, start:start + n], alone.logits, rtol=1e-4, atol=1e-4)
        alone_sums = alone_sums + summed_losses(alone)
        start += n
    torch.testing.assert_close(packed_sums, alone_sums, rtol=1e-4, atol=1e-4)
    alone_sums.sum().backward()
    assert packed_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_packed_mtp_hidden_states_equal_each_sequence_alone():
    model = packed_model().eval()
    seqs, ids, position_ids = packed_row(LENGTHS, model.config.vocab_size, seed=1)
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, mtp_depths=2)
        start = 0
        for s, n in zip(seqs, LENGTHS):
            alone = model(s, mtp_depths=2)
            for k in range(2):
                torch.testing.assert_close(packed.mtp_logits[k][:, start:start + n], alone.mtp_logits[k],
                                           rtol=1e-4, atol=1e-4)
            start += n


def test_without_position_ids_the_sequences_do_see_each_other():
    model = packed_model().eval()
    seqs, ids, position_ids = packed_row(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids).logits[:, LENGTHS[0]:LENGTHS[0] + LENGTHS[1]]
        alone = model(seqs[1]).logits
    assert (plain - alone).abs().max() > 1e-2          # so the equality above is not vacuous


def test_one_sequence_per_row_position_ids_change_nothing():
    model = packed_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=torch.arange(9).expand(2, 9)).logits, model(ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("position_ids,match", [
    (torch.tensor([[0, 1, 3, 4]]), r"position_ids\[0, 2\] = 3 after 1"),
    (torch.tensor([[0.0, 1, 2, 3]]), "integer tensor shaped like input_ids"),
    (torch.tensor([[0, 1, 2]]), "integer tensor shaped like input_ids"),
])
def test_bad_position_ids_are_rejected_with_the_rule(position_ids, match):
    model = packed_model()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 4, dtype=torch.long), position_ids=position_ids)
