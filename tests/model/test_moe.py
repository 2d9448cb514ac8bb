"""MoE routing and experts. Oracle: the float64 per-token loops in tests/reference/moe.py."""

import pytest
import torch

from nemotron3 import from_preset
from nemotron3.model.latent_moe import LatentMoE, build_moe
from nemotron3.model.moe import MoE, TopKRouter, decode_schedule, routed_experts
from tests.reference.moe import experts_ref, route_ref


@pytest.mark.parametrize("n_group,topk_group,K,norm,scale", [(1, 1, 2, True, 2.5), (4, 2, 3, True, 1.0),
                                                              (2, 1, 2, False, 5.0), (1, 1, 8, True, 1.0)])
def test_router_matches_per_token_reference(n_group, topk_group, K, norm, scale):
    torch.manual_seed(0)
    cfg = from_preset("tiny", n_group=n_group, topk_group=topk_group, num_experts_per_tok=K, norm_topk_prob=norm,
                      routed_scaling_factor=scale)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(40, cfg.hidden_size)
    r = router(x)
    ref = route_ref(x, router.weight, router.e_score_correction_bias, K, n_group, topk_group, norm, scale)
    for t in range(40):
        ids = r.ids_TK[t].tolist()
        assert set(ids) == set(ref[t]), (t, ids, ref[t])
        for e, w in zip(ids, r.weights_TK[t].tolist()):
            assert w == pytest.approx(ref[t][e], rel=1e-5)


def test_bias_changes_choice_but_not_weights():
    cfg = from_preset("tiny")
    router = TopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(16, cfg.hidden_size)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0          # expert 3 always chosen, weight from its raw score
    r = router(x)
    assert (r.ids_TK == 3).any(-1).all()
    s3 = torch.sigmoid(x @ router.weight[3])
    w3 = r.weights_TK[r.ids_TK == 3]
    others = r.weights_TK[r.ids_TK != 3].view(16, -1)
    s_other = r.scores_TE.gather(1, r.ids_TK[r.ids_TK != 3].view(16, -1))
    expected = s3 / (s3 + s_other.sum(-1)) * cfg.routed_scaling_factor
    torch.testing.assert_close(w3, expected)
    assert others.shape == (16, cfg.num_experts_per_tok - 1)


@pytest.mark.parametrize("T,schedule", [(1, "one token in place"), (3, "sorted"), (50, "sorted"),
                                         (2, "gathered, under torch.compile")])
def test_routed_experts_match_per_token_reference(T, schedule):
    torch.manual_seed(T)
    E, m, L, K = 8, 12, 10, 3
    up, down = torch.randn(E, m, L), torch.randn(E, L, m)
    x = torch.randn(T, L)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    routing = [{int(e): float(v) for e, v in zip(ids[t], w[t])} for t in range(T)]
    fn = torch.compile(routed_experts, dynamic=False) if "compile" in schedule else routed_experts
    with torch.no_grad():
        y = fn(x, ids, w, up, down, decode_schedule(T, K, E, "cpu", compiled="compile" in schedule))
    torch.testing.assert_close(y.double(), experts_ref(x, routing, up, down), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T,schedule", [(1, "one_token"), (1, "gathered"), (5, "gathered"), (1, "sorted"),
                                         (5, "sorted")])
def test_each_schedule_chosen_by_argument_matches_the_reference_with_and_without_gradients(T, schedule):
    torch.manual_seed(T)
    E, m, L, K = 8, 12, 10, 3
    up, down = torch.randn(E, m, L, requires_grad=True), torch.randn(E, L, m)
    x = torch.randn(T, L)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)          # a training call: grad mode on, yet the argument decides
    routing = [{int(e): float(v) for e, v in zip(ids[t], w[t].detach())} for t in range(T)]
    y = routed_experts(x, ids, w, up, down, schedule)
    torch.testing.assert_close(y.double(), experts_ref(x, routing, up.detach(), down), rtol=1e-5, atol=1e-4)
    y.sum().backward()
    assert up.grad[ids.unique()].abs().sum() > 0


def test_decode_schedule_picks_by_token_count_device_and_compilation_and_bad_schedules_are_rejected():
    assert decode_schedule(1, 6, 128, "cpu", compiled=False) == "one_token"
    assert decode_schedule(1, 6, 128, "cpu", compiled=True) == "gathered"
    assert decode_schedule(24, 4, 16, "cpu", compiled=True) == "gathered"         # compiled: never a graph break
    assert decode_schedule(4, 6, 128, "cuda", compiled=False) == "gathered"       # verification: T*K <= E
    assert decode_schedule(4, 6, 128, "cpu", compiled=False) == "sorted"
    assert decode_schedule(512, 6, 128, "cuda", compiled=False) == "sorted"        # prefill
    x, ids, w, up, down = torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), \
        torch.randn(2, 3, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="one_token is for a single token"):
        routed_experts(x, ids, w, up, down, "one_token")
    with pytest.raises(ValueError, match="'grouped' is not one of"):
        routed_experts(x, ids, w, up, down, "grouped")


@pytest.mark.parametrize("latent", [None, 24])
def test_moe_layer_matches_reference(latent):
    torch.manual_seed(0)
    cfg = from_preset("tiny", moe_latent_size=latent)
    moe = build_moe(cfg)
    assert isinstance(moe, LatentMoE if latent else MoE) and (type(moe) is MoE) == (latent is None)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
    x = torch.randn(2, 9, cfg.hidden_size)
    y = moe(x)
    g = moe.gate
    xd = x.reshape(-1, cfg.hidden_size).double()
    routing = route_ref(xd, g.weight, g.e_score_correction_bias, cfg.num_experts_per_tok, 1, 1, True,
                        cfg.routed_scaling_factor)
    z = xd @ moe.fc1_latent_proj.weight.double().T if latent else xd         # router and shared expert stay in d
    r = experts_ref(z, routing, moe.experts.up_proj, moe.experts.down_proj)
    if latent:
        r = r @ moe.fc2_latent_proj.weight.double().T
    sh = moe.shared_experts
    r = r + torch.relu(xd @ sh.up_proj.weight.double().T) ** 2 @ sh.down_proj.weight.double().T
    torch.testing.assert_close(y.reshape(-1, cfg.hidden_size).double(), r, rtol=1e-4, atol=1e-4)


def test_moe_backward_reaches_all_used_experts():
    cfg = from_preset("tiny")
    moe = build_moe(cfg)
    x = torch.randn(4, 8, cfg.hidden_size, requires_grad=True)
    routing = {}
    moe(x, routing).sum().backward()
    used = routing[moe.layer_idx].ids_TK.unique()
    grads = moe.experts.up_proj.grad.abs().sum((1, 2))
    assert (grads[used] > 0).all() and x.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_training_forwards_count_tokens_per_expert_and_evaluation_does_not():
    cfg = from_preset("tiny")
    moe = build_moe(cfg, layer_idx=3)
    x = torch.randn(4, 8, cfg.hidden_size)
    routing = {}
    moe(x, routing)
    moe(x[:1])
    ids = torch.cat([routing[3].ids_TK.reshape(-1), routing[3].ids_TK[:8].reshape(-1)])   # row 0 = the first 8
    assert moe.tokens_per_expert.tolist() == torch.bincount(ids, minlength=cfg.n_routed_experts).tolist()
    assert moe.tokens_per_expert.sum() == (32 + 8) * cfg.num_experts_per_tok
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == (32 + 8) * cfg.num_experts_per_tok
    assert "tokens_per_expert" not in moe.state_dict()                    # never saved in checkpoints
