"""Mamba-2 mixer. Oracles: the float64 per-token recurrence and float64 mixer in tests/reference/ssd.py."""

import math

import pytest
import torch

from nemotron3 import from_preset
from nemotron3.model.mamba2 import Mamba2Mixer, ssd_chunked, ssd_states
from tests.reference.ssd import mamba_mixer_ref, ssd_recurrence_ref


def random_ssd_inputs(b, L, H=4, P=3, G=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=g, dtype=torch.float64))
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.1
    B = torch.randn(b, L, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(b, L, G, N, generator=g, dtype=torch.float64)
    return x, dt, A, B, C


@pytest.mark.parametrize("seq_len", [1, 7, 16, 37, 64])   # shorter than, equal to, across and multiples of Q=16
def test_chunked_scan_matches_float64_recurrence(seq_len):
    x, dt, A, B, C = random_ssd_inputs(2, seq_len)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=16)
    y_ref, final_ref = ssd_recurrence_ref(x, dt, A, B, C)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)           # float64: a gap is a bug
    torch.testing.assert_close(final, final_ref, rtol=1e-9, atol=1e-9)


def test_chunked_scan_continues_from_initial_state():
    x, dt, A, B, C = random_ssd_inputs(2, 23, seed=1)
    S0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=8, initial_state=S0)
    y_ref, final_ref = ssd_recurrence_ref(x, dt, A, B, C, initial_state=S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final, final_ref, rtol=1e-9, atol=1e-9)


def test_chunked_scan_float32_within_1e5_relative():
    x, dt, A, B, C = random_ssd_inputs(1, 300, H=8, P=16, G=2, N=16, seed=2)
    y, _ = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), chunk_size=128)
    y_ref, _ = ssd_recurrence_ref(x, dt, A, B, C)
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("seq_len", [1, 5, 16, 21])
@pytest.mark.parametrize("use_bias", [False, True])
def test_mixer_matches_float64_reference(seq_len, use_bias):
    torch.manual_seed(0)
    cfg = from_preset("tiny", chunk_size=8, use_bias=use_bias)
    mixer = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        mixer.A_log.copy_(torch.rand(cfg.mamba_num_heads, dtype=torch.float64))
    x = torch.randn(2, seq_len, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(mixer(x), mamba_mixer_ref(mixer, x), rtol=1e-9, atol=1e-9)


def test_time_step_limit_is_applied_in_prefill_and_decode():
    torch.manual_seed(0)
    limit = (0.05, 0.2)
    cfg = from_preset("tiny", chunk_size=8, time_step_limit=limit)
    mixer = Mamba2Mixer(cfg).double()
    x = torch.randn(1, 9, cfg.hidden_size, dtype=torch.float64)
    ref = mamba_mixer_ref(mixer, x, time_step_limit=limit)
    torch.testing.assert_close(mixer(x), ref, rtol=1e-9, atol=1e-9)
    conv = torch.zeros(1, cfg.conv_kernel - 1, mixer.conv_dim, dtype=torch.float64)
    ssm = torch.zeros(1, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, dtype=torch.float64)
    steps = torch.cat([mixer(x[:, t:t + 1], None, conv, ssm) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, ref, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ref, mamba_mixer_ref(mixer, x, time_step_limit=(0.0, math.inf)))


def test_decode_steps_and_chunked_prefill_match_full_forward():
    torch.manual_seed(0)
    cfg = from_preset("tiny", chunk_size=4)
    mixer = Mamba2Mixer(cfg).double()
    x = torch.randn(2, 19, cfg.hidden_size, dtype=torch.float64)
    full = mixer(x)
    conv = torch.zeros(2, cfg.conv_kernel - 1, mixer.conv_dim, dtype=torch.float64)
    ssm = torch.zeros(2, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, dtype=torch.float64)
    parts = [mixer(x[:, :6], None, conv, ssm), mixer(x[:, 6:7], None, conv, ssm),   # prefill, step, prefill
             mixer(x[:, 7:18], None, conv, ssm), mixer(x[:, 18:], None, conv, ssm)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seq_len", [1, 4, 9])
def test_verify_form_gives_the_state_after_every_token_like_the_recurrence(seq_len):
    """ssd_states (the speculative verifier's unrolled recurrence) == the float64 loop run on every prefix."""
    x, dt, A, B, C = random_ssd_inputs(2, seq_len, seed=5)
    S0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    state = S0.clone()
    y, states = ssd_states(x, dt, A, B, C, state)
    y_ref, final_ref = ssd_recurrence_ref(x, dt, A, B, C, initial_state=S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for t in range(seq_len):
        torch.testing.assert_close(states[:, t], ssd_recurrence_ref(x[:, :t + 1], dt[:, :t + 1], A, B[:, :t + 1],
                                                                    C[:, :t + 1], initial_state=S0)[1],
                                   rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state, final_ref, rtol=1e-9, atol=1e-9)    # the cache ends after the last token


def test_verify_pass_keeps_states_any_prefix_can_resume_from():
    """A keep_states pass over 5 tokens: its output equals the float64 mixer, and resuming a fresh decode from the
    recorded (conv, SSM) state after token t gives the float64 output of the remaining tokens."""
    torch.manual_seed(1)
    cfg = from_preset("tiny")
    mixer = Mamba2Mixer(cfg).double()
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    ref = mamba_mixer_ref(mixer, x, time_step_limit=tuple(cfg.time_step_limit))
    conv = torch.zeros(2, cfg.conv_kernel - 1, mixer.conv_dim, dtype=torch.float64)
    ssm = torch.zeros(2, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, dtype=torch.float64)
    mixer(x[:, :4], None, conv, ssm)                                          # prefill 4 tokens
    out, (convs, ssms) = mixer(x[:, 4:9], None, conv, ssm, keep_states=True)  # verify 5
    torch.testing.assert_close(out, ref[:, 4:9], rtol=1e-9, atol=1e-9)
    for t in range(5):
        c, s = convs[:, t].clone(), ssms[:, t].clone()
        rest = [mixer(x[:, j:j + 1], None, c, s) for j in range(5 + t, 9)]
        if rest:
            torch.testing.assert_close(torch.cat(rest, 1), ref[:, 5 + t:9], rtol=1e-9, atol=1e-9)


def test_chunked_scan_has_gradients_equal_to_the_recurrence():
    x, dt, A, B, C = random_ssd_inputs(1, 11, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    ssd_chunked(*leaves, chunk_size=4)[0].square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    ssd_recurrence_ref(*ref_leaves)[0].square().sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_silu_gradients_match_numerical(bias):
    from nemotron3.model.mamba2 import causal_conv_silu
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64) if bias else None,
            torch.randn(2, 3, 3, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() if a is not None else None for a in args]
    assert torch.autograd.gradcheck(causal_conv_silu, args)


def test_segsum_exp_gradients_match_numerical():
    from nemotron3.model.mamba2 import segsum_exp
    a = (-torch.rand(2, 3, 7, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(segsum_exp, (a,))


def packed_seq_idx(b, lengths):
    """(b, sum(lengths)) sequence numbers; row i packs `lengths` rotated left by i, so rows differ."""
    rows = []
    for i in range(b):
        order = lengths[i % len(lengths):] + lengths[:i % len(lengths)]
        rows.append(torch.cat([torch.full((n,), j) for j, n in enumerate(order)]))
    return torch.stack(rows)


# Q = 8 (row 0): boundaries inside chunks (3, 11, 22, 23), on chunk edges (8, 16, 24), 1-token sequences, a sequence
# longer than two chunks, and a padded last chunk
@pytest.mark.parametrize("lengths", [[3, 8, 11, 1, 20], [8, 8, 8, 1], [1, 1, 1, 30], [17, 8]])
def test_chunked_scan_restarts_at_packed_boundaries_like_the_recurrence(lengths):
    x, dt, A, B, C = random_ssd_inputs(2, sum(lengths), seed=4)
    seq = packed_seq_idx(2, lengths)
    S0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=8, initial_state=S0, seq_idx=seq)
    y_ref, final_ref = ssd_recurrence_ref(x, dt, A, B, C, initial_state=S0, seq_idx=seq)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final, final_ref, rtol=1e-9, atol=1e-9)


def test_packed_scan_equals_each_sequence_alone():
    lengths = [5, 12, 9]
    x, dt, A, B, C = random_ssd_inputs(1, sum(lengths), seed=5)
    y, _ = ssd_chunked(x, dt, A, B, C, chunk_size=4, seq_idx=packed_seq_idx(1, lengths))
    start = 0
    for n in lengths:
        part = [t[:, start:start + n] for t in (x, dt, B, C)]
        alone, _ = ssd_chunked(part[0], part[1], A, part[2], part[3], chunk_size=4)
        torch.testing.assert_close(y[:, start:start + n], alone, rtol=1e-9, atol=1e-9)
        start += n


def test_packed_scan_gradients_equal_the_recurrence():
    x, dt, A, B, C = random_ssd_inputs(2, 19, seed=6)
    seq = packed_seq_idx(2, [4, 7, 8])
    S0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, S0)]
    y, final = ssd_chunked(*leaves[:5], chunk_size=4, initial_state=leaves[5], seq_idx=seq)
    (y.square().sum() + final.sum()).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, S0)]
    y, final = ssd_recurrence_ref(*ref_leaves[:5], initial_state=ref_leaves[5], seq_idx=seq)
    (y.square().sum() + final.sum()).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("use_bias", [False, True])
def test_packed_mixer_matches_float64_reference(use_bias):
    torch.manual_seed(0)
    cfg = from_preset("tiny", chunk_size=8, use_bias=use_bias)
    mixer = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        mixer.A_log.copy_(torch.rand(cfg.mamba_num_heads, dtype=torch.float64))
    seq = packed_seq_idx(2, [2, 9, 1, 6])                     # sequences shorter than the conv window too
    x = torch.randn(2, 18, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(mixer(x, seq_idx=seq), mamba_mixer_ref(mixer, x, seq_idx=seq), rtol=1e-9, atol=1e-9)


def test_packed_conv_silu_gradients_match_numerical():
    from nemotron3.model.mamba2 import causal_conv_silu
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(2, 7, 3, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64), torch.randn(2, 3, 3, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    seq = packed_seq_idx(2, [2, 1, 4])
    assert torch.autograd.gradcheck(lambda *a: causal_conv_silu(*a, seq_idx=seq), args)


@pytest.mark.parametrize("last_len", [1, 2, 6])              # shorter than, and longer than, the conv window (K-1=3)
def test_packed_prefill_leaves_the_state_of_the_last_sequence_alone(last_len):
    torch.manual_seed(0)
    cfg = from_preset("tiny", chunk_size=4)
    mixer = Mamba2Mixer(cfg).double()
    K1, H, P, N = cfg.conv_kernel - 1, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
    x = torch.randn(1, 9 + last_len + 3, cfg.hidden_size, dtype=torch.float64)
    packed_part, last, after = x[:, :9 + last_len], x[:, 9:9 + last_len], x[:, 9 + last_len:]
    seq = torch.tensor([[0] * 9 + [1] * last_len])

    def states():
        return torch.zeros(1, K1, mixer.conv_dim, dtype=torch.float64), torch.zeros(1, H, P, N, dtype=torch.float64)
    conv, ssm = states()
    mixer(packed_part, None, conv, ssm, seq_idx=seq)
    packed_next = torch.cat([mixer(after[:, t:t + 1], None, conv, ssm) for t in range(3)], dim=1)
    conv, ssm = states()
    mixer(last, None, conv, ssm)
    alone_next = torch.cat([mixer(after[:, t:t + 1], None, conv, ssm) for t in range(3)], dim=1)
    torch.testing.assert_close(packed_next, alone_next, rtol=1e-9, atol=1e-9)
