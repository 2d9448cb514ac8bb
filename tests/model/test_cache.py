"""HybridCache and cached decoding. Invariants (mamba_ssm / HF style): teacher-forced decode == full forward;
multi-token prefill with a cache == token by token; batched with left padding == one by one."""

import pytest
import torch

from nemotron3 import HybridCache, NemotronForCausalLM, from_preset
from tests.hf_utils import randomize_


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(NemotronForCausalLM(from_preset("tiny", chunk_size=4))).eval()


def test_decode_token_by_token_matches_full_forward(model):
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 23)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(23)], dim=1)
    assert cache.pos.tolist() == [23, 23]
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", [[5, 1, 9, 8], [1, 22], [11, 12], [2, 2, 19]])   # 2 < K-1: window carries over
def test_chunked_prefill_with_cache_matches_full_forward(model, split):
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache, parts, start = model.new_cache(2, 23), [], 0
        for n in split:
            parts.append(model(ids[:, start:start + n], cache=cache).logits)
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-4)


def test_batched_generation_with_left_padding_equals_one_by_one(model):
    prompts = [[5, 9, 200, 17, 3, 44, 90], [12, 7], [100, 101, 102, 103]]
    L = max(map(len, prompts))
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    batched = model.generate(ids, max_new_tokens=10, attention_mask=mask)[:, L:]
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=10)[0, len(p):]
        assert torch.equal(batched[i], alone), i


def test_sampling_is_reproducible_with_a_seed(model):
    ids = torch.tensor([[1, 2, 3]])
    a = model.generate(ids, 16, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    b = model.generate(ids, 16, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    c = model.generate(ids, 16, do_sample=True, temperature=1.5, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_and_pads(model):
    ids = torch.tensor([[1, 2, 3]])
    first = model.generate(ids, 1)[0, -1].item()
    out = model.generate(ids, 8, eos_token_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


def test_mamba_state_is_constant_in_sequence_length():
    cfg = from_preset("tiny")
    short, long = HybridCache(cfg, 1, 128), HybridCache(cfg, 1, 1024)
    kv_per_token = 2 * cfg.layers_block_type.count("full_attention") * cfg.num_key_value_heads * cfg.head_dim * 4
    assert long.nbytes() - short.nbytes() == kv_per_token * (1024 - 128)


def test_cache_overflow_and_bad_inputs_are_clear(model):
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="vocab_size is 256"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="shape \\(batch, seq_len\\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([[1]]), 4, do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[1]]), 4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.generate(torch.tensor([[1]]), 10**6)


def test_generate_runs_past_max_position_embeddings_when_allowed():
    """No positional encoding: max_position_embeddings (the trained length) is only the default limit. Past it,
    with max_model_len raised, greedy generation equals the argmax of full cache-less forwards."""
    torch.manual_seed(0)
    short = randomize_(NemotronForCausalLM(from_preset("tiny", chunk_size=4, max_position_embeddings=32))).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="raise the limit"):
        short.generate(ids, 5)
    out = short.generate(ids, 5, max_model_len=45)
    want = ids
    with torch.no_grad():
        for _ in range(5):
            want = torch.cat([want, short(want).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == want.tolist()


def test_static_decode_step_matches_cached_forward(model):
    """decode_step (whole KV buffer under a position mask, what compile_decode compiles) == forward's decode."""
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        a, b = model.new_cache(2, 20), model.new_cache(2, 20)
        model(ids, attention_mask=mask, cache=a)
        model(ids, attention_mask=mask, cache=b)
        for t in range(5):
            nxt = torch.tensor([[7 + t], [40 + t]])
            ref = model(nxt, cache=a).logits
            got, _, _ = model.decode_step(nxt, b.pos, [b.layer_state(i) for i in range(8)])
            b.advance(1)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_rows_at_different_positions_decode_as_if_alone(model):
    """Per-row positions: rows prefilled to different lengths (no padding) and then decoded together, with one
    or several tokens per step, give each row exactly the logits of the row decoded alone."""
    prompts = [[5, 9, 200, 17, 3, 44, 90], [12, 7], [100, 101, 102, 103]]
    steps = [torch.tensor([[7], [8], [9]]), torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])]
    with torch.no_grad():
        batch = model.new_cache(3, 32)
        for i, p in enumerate(prompts):
            model(torch.tensor([p]), cache=batch.rows(i, i + 1))
        assert batch.pos.tolist() == [7, 2, 4]
        got = [model(x, cache=batch).logits for x in steps]
        for i, p in enumerate(prompts):
            alone = model.new_cache(1, 32)
            model(torch.tensor([p]), cache=alone)
            for x, g in zip(steps, got):
                torch.testing.assert_close(g[i:i + 1], model(x[i:i + 1], cache=alone).logits, rtol=0, atol=1e-5)
        static = model.new_cache(3, 32)                       # the static (compilable) step reads the same cache
        for i, p in enumerate(prompts):
            model(torch.tensor([p]), cache=static.rows(i, i + 1))
        for x, g in zip(steps, got):
            out, _, _ = model.decode_step(x, static.pos, [static.layer_state(i) for i in range(8)])
            static.advance(x.shape[1])
            torch.testing.assert_close(out, g, rtol=0, atol=1e-5)


def test_keep_prefix_restores_the_state_of_any_accepted_prefix(model):
    """A verify pass over 4 tokens keeping 1, 2 or 4 of them per row leaves each row exactly as if only the kept
    tokens had been fed (Mamba states recorded per token; attention just moves back)."""
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    new = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    keep = torch.tensor([1, 3])
    with torch.no_grad():
        spec = model.new_cache(2, 16)
        model(prompt, cache=spec)
        start = spec.pos.clone()
        out = model(new, cache=spec, keep_mamba_states=True)
        spec.keep_prefix(start, keep, out.mamba_states)
        assert spec.pos.tolist() == [6, 8]
        nxt = torch.tensor([[42], [43]])
        got = model(nxt, cache=spec).logits
        for r in range(2):
            plain = model.new_cache(1, 16)
            model(torch.cat([prompt[r:r + 1], new[r:r + 1, :int(keep[r])]], 1), cache=plain)
            torch.testing.assert_close(got[r:r + 1], model(nxt[r:r + 1], cache=plain).logits, rtol=0, atol=1e-5)


def test_copy_row_forks_a_sequence(model):
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache.rows(0, 1))
        cache.copy_row(0, [1, 2])
        out = model(torch.tensor([[5], [6], [5]]), cache=cache).logits
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)
    assert not torch.equal(out[0], out[1]) and cache.pos.tolist() == [5, 5, 5]


def test_compiled_decode_generates_the_same_tokens(model):
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    eager = model.generate(ids, 12, attention_mask=mask)
    torch.manual_seed(0)
    compiled = model.generate(ids, 12, attention_mask=mask, compile=True)
    model.compile_decode(False)
    assert torch.equal(eager, compiled)


def test_bfloat16_forward_and_cached_decode_track_float32():
    torch.manual_seed(0)
    fp32 = NemotronForCausalLM(from_preset("tiny")).eval()
    bf16 = NemotronForCausalLM(from_preset("tiny")).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got = fp32(ids).logits, bf16(ids).logits
        cache = bf16.new_cache(2, 20)
        steps = torch.cat([bf16(ids[:, :8], cache=cache).logits] +
                          [bf16(ids[:, t:t + 1], cache=cache).logits for t in range(8, 20)], 1)
    assert got.dtype == torch.float32 and cache.ssm[0].dtype == torch.float32 and cache.kv[1][0].dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 0.05 * scale            # bf16 keeps ~3 significant digits
    assert (steps - got).abs().max() < 0.05 * scale


def test_router_statistics_are_returned_per_moe_layer(model):
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        out = model(ids, return_router=True)
    assert sorted(out.router) == [3, 7]                       # the 'E' layers of M*ME-M*E
    r = out.router[3]
    assert r.ids_TK.shape == (18, 2) and r.scores_TE.shape == (18, 8) and r.weights_TK.dtype == torch.float32
    assert model(ids).router == {}                             # off by default, and nothing left recorded


def test_labels_loss_matches_logits_cross_entropy_in_value_and_gradient():
    """Oracle: F.cross_entropy on the materialised float64 logits (the fused loss never builds them)."""
    torch.manual_seed(0)
    model = randomize_(NemotronForCausalLM(from_preset("tiny"))).double()
    ids = torch.randint(0, 256, (3, 11))
    labels = ids.clone()
    labels[0, 4] = -100
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[2, :3] = 0
    from nemotron3.model import loss as loss_mod
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids, attention_mask=mask).hidden_states @ model.lm_head.weight.T       # float64 throughout
    # the first real token is not a target for the last padding position: its context is empty
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).masked_fill(
        (torch.nn.functional.pad(mask[:, 1:], (0, 1)) == 0) | (mask == 0), -100)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    small_chunks, _ = loss_mod.fused_linear_cross_entropy(
        model(ids).hidden_states, model.lm_head.weight, torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100),
        chunk_rows=4)
    assert torch.isclose(small_chunks, model(ids, labels=ids).loss)


def test_bf16_autocast_training_step_runs_and_tracks_float32():
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny")).train()
    ids = torch.randint(0, 256, (2, 37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    ref = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.02
    for name, p in model.named_parameters():
        if not name.startswith("mtp."):
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name
