"""Router replay: the MoE forward can be told which experts each token goes to. Oracles: the float64 per-token loop
of tests/reference/moe.py (replay_ref + experts_ref) for the layer's output with forced experts; the engine's own
reported log-probabilities and routing for the claim that replay brings the trainer's log-probs closer to the
engine's (a bfloat16 engine against the float32 trainer, the usual source of routing flips)."""

import copy

import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.infer import Engine, Request, SamplingParams
from nemotron3.model.moe import MoE, Routing
from nemotron3.rl.train import token_logprobs
from tests.reference.moe import experts_ref, replay_ref
from tests.rl.test_rollout import TOK


def decisive_model(seed=0):
    """The tiny preset with random (not zero) router weights, so routing depends on the input."""
    torch.manual_seed(seed)
    model = NemotronForCausalLM(from_preset("tiny")).eval()
    for m in model.modules():
        if isinstance(m, MoE):
            torch.nn.init.normal_(m.gate.weight, std=0.5)
    return model


def test_forced_experts_match_the_float64_loop_and_keep_router_gradients():
    model = decisive_model()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    torch.manual_seed(1)
    x = torch.randn(7, model.config.hidden_size)
    E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
    forced = torch.stack([torch.randperm(E)[:K] for _ in range(7)])                 # (T, K) any experts
    routing = Routing({moe.layer_idx: forced})
    y = moe.route_and_run(x, routing)
    r = replay_ref(x, moe.gate.weight, forced, model.config.norm_topk_prob, model.config.routed_scaling_factor)
    z = moe.fc1_latent_proj(x) if hasattr(moe, "fc1_latent_proj") else x
    ref = experts_ref(z, r, moe.experts.up_proj, moe.experts.down_proj)
    if hasattr(moe, "fc2_latent_proj"):
        ref = moe.fc2_latent_proj(ref.float()).double()
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(routing[moe.layer_idx].ids_TK, forced)
    y.sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0   # weights stay differentiable


def test_replaying_the_engines_routing_brings_trainer_logprobs_closer_to_the_engines():
    model = decisive_model(seed=2)
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), TOK, 0, max_batch=8)
    req = Request(TOK.encode("<|im_start|>user\nHello there<|im_end|>\n"), 40,
                  SamplingParams(temperature=1.0, seed=5), n=8, logprobs=0, return_routed_experts=True)
    results = engine.generate([req])
    plain, replay, flips, total = [], [], 0, 0
    for res in results:
        ids = torch.tensor(req.prompt_ids + res.token_ids)[None]
        P, n = len(req.prompt_ids), len(res.token_ids)
        routed = res.routed_experts                                                       # (P + n - 1, layers, K)
        forced = torch.cat([routed, routed[-1:]])[None]                                   # last token: never read
        with torch.no_grad():
            lp_plain, out = token_logprobs(model, ids)
            lp_replay, _ = token_logprobs(model, ids, routed_experts=forced)
            router = model(ids, return_router=True).router
            own = torch.stack([router[i].ids_TK for i in sorted(router) if i < model.config.num_hidden_layers],
                              1)                                                        # (L, layers, K)
        gen = res.sampled_logprobs
        plain.append((lp_plain[0, P:P + n] - gen).abs())
        replay.append((lp_replay[0, P:P + n] - gen).abs())
        same = own[:-1].sort(-1).values == routed.sort(-1).values
        flips += int((~same.all(-1)).sum())
        total += same.shape[0] * same.shape[1]
    plain, replay = torch.cat(plain), torch.cat(replay)
    assert flips > 0, "the bfloat16 engine routed every token as the float32 model does: nothing to replay"
    assert replay.mean() < plain.mean()


def test_replaying_a_models_own_routing_changes_nothing():
    model = decisive_model(seed=4)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        out = model(ids, return_router=True)
        own = torch.stack([r.ids_TK.view(2, 12, -1) for i, r in sorted(out.router.items())
                           if i < model.config.num_hidden_layers], 2)                    # (b, L, layers, K)
        again = model(ids, routed_experts=own)
    assert torch.allclose(again.logits, out.logits, atol=1e-6)
