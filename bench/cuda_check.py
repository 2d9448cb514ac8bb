"""CUDA checks that the CPU test suite cannot make: the same numbers on a GPU as on the CPU.

    python bench/cuda_check.py            # needs a CUDA device; ~1 min; writes bench/results/cuda_check.json

1. NVFP4 / MXFP8 quantization on CUDA is bit-identical to the CPU (the format arithmetic is exact fp32).
2. The quantized linear layer's three GEMMs agree with the CPU (stochastic rounding off).
3. The model in fp32 on CUDA matches the CPU (logits, cached decode, greedy generate, compile_decode); bf16 tracks.
4. Training steps on CUDA in bf16 and in the NVFP4 recipe run and lower the loss.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, from_preset  # noqa: E402
from nemotron3.quant import GemmFormat, mxfp8_fake_quantize, nvfp4_fake_quantize, nvfp4_quantize, quantized_linear  # noqa: E402


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return dict(name=name, ok=bool(ok), detail=detail)


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    dev, res = torch.device("cuda"), []
    torch.manual_seed(0)
    x = torch.randn(512, 1024) * torch.rand(512, 1) * 10
    for tile in ((1, 16), (16, 16)):
        res.append(check(f"nvfp4 {tile} bit-exact CPU == CUDA",
                         torch.equal(nvfp4_fake_quantize(x, tile), nvfp4_fake_quantize(x.to(dev), tile).cpu())))
    fused = nvfp4_quantize(x.to(dev), (1, 16), fused=True).dequantize().cpu()
    res.append(check("nvfp4 fused (torch.compile) == eager, bit-exact", torch.equal(fused, nvfp4_fake_quantize(x))))
    res.append(check("mxfp8 bit-exact CPU == CUDA", torch.equal(mxfp8_fake_quantize(x), mxfp8_fake_quantize(x.to(dev)).cpu())))
    xb = x.bfloat16()
    res.append(check("nvfp4 bf16 input CPU == CUDA",
                     torch.equal(nvfp4_fake_quantize(xb), nvfp4_fake_quantize(xb.to(dev)).cpu())))

    w, dy = torch.randn(256, 1024) * 0.05, torch.randn(512, 256)
    grads = {}
    for d in ("cpu", "cuda"):
        xi, wi = x.to(d).clone().requires_grad_(), w.to(d).clone().requires_grad_()
        y = quantized_linear(xi, wi, fmt=GemmFormat(stochastic_rounding=False))
        y.backward(dy.to(d))
        grads[d] = [t.detach().cpu() for t in (y, xi.grad, wi.grad)]
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(grads["cuda"], grads["cpu"])]
    res.append(check("quantized linear fprop/dgrad/wgrad CUDA vs CPU", max(rel) < 1e-5, f"rel err {rel}"))

    config = from_preset("small")
    cpu_model = NemotronForCausalLM(config).eval()
    gpu_model = NemotronForCausalLM(config).to(dev).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 200))
    with torch.no_grad():
        a, b = cpu_model(ids).logits, gpu_model(ids.to(dev)).logits.cpu()
        res.append(check("fp32 logits CUDA vs CPU", (a - b).abs().max() < 1e-3, f"max diff {(a - b).abs().max():.2e}"))
        bf = gpu_model.to(torch.bfloat16)(ids.to(dev)).logits.float().cpu()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), bf.flatten(), 0)
        res.append(check("bf16 logits track fp32 (cosine)", cos > 0.99, f"{cos:.5f}"))
        gpu_model.float().load_state_dict(cpu_model.state_dict())     # undo the bf16 rounding of the weights
        prompt = ids[:, :16]
        g_gpu = gpu_model.generate(prompt.to(dev), max_new_tokens=24).cpu()
        # random weights give near-tied logits, so devices may break ties differently: every token CUDA chose must
        # be the CPU model's argmax on the same prefix, up to a 1e-4 logit margin
        cpu_logits = cpu_model(g_gpu).logits[:, 15:-1]
        chosen = cpu_logits.gather(-1, g_gpu[:, 16:, None]).squeeze(-1)
        margin = float((cpu_logits.max(-1).values - chosen).max())
        res.append(check("greedy generate on CUDA = CPU argmax", margin < 1e-4, f"max margin {margin:.1e}"))
        t0 = time.perf_counter()
        g_comp = gpu_model.generate(prompt.to(dev), max_new_tokens=24, compile=True).cpu()
        res.append(check("compile_decode generate == eager", torch.equal(g_comp, g_gpu),
                         f"first call incl. compile {time.perf_counter() - t0:.1f}s"))

    from nemotron3.train.pretrain import TrainConfig, train
    import json
    for precision in ("bf16", "nvfp4"):
        with tempfile.TemporaryDirectory() as d:
            cfg = TrainConfig(preset="tiny", out=d, precision=precision, max_steps=30, save_every=30, eval_every=30,
                              seq_len=128, batch_size=8, train_tokens=60_000, device="cuda")
            train(cfg, log=lambda *_: None)
            rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
            res.append(check(f"train 30 steps on CUDA, {precision}", rows[-1]["eval_loss"] < 0.8 * rows[0]["loss"],
                             f"loss {rows[0]['loss']:.3f} -> held-out {rows[-1]['eval_loss']:.3f}"))
    payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=res)
    print(f"wrote {save('cuda_check', payload)}")
    if os.environ.get("OUT"):
        save_path = os.path.join(os.environ["OUT"], "cuda_check.json")
        with open(save_path, "w") as f:
            json.dump(payload, f, indent=2)
    sys.exit(0 if all(r["ok"] for r in res) else 1)


if __name__ == "__main__":
    main()
