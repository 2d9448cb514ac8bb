"""Load test of `nemotron3 serve` on loopback: N concurrent streaming clients for a fixed time against, in the same
run, (1) this server (FastAPI + uvicorn), (2) the previous server (http.server, a thread per connection, backlog 5:
the source tree of git revision --old-rev, run from a temporary export), and (3) this server with a structured-output
mix (every other request carries a json_schema response_format, decoded under its grammar).

    python bench/serve_load.py --model runs/demo/final            # ~2 min
    python bench/serve_load.py --model DIR --clients 64 --seconds 60 --max-batch 8

Each client loops: a chat request (streaming, random max_tokens in [16, 96], temperature 0.8) and reads the
stream to [DONE]. Reported per mode: completed requests/s, output tokens/s, p50/p99 time to first token, failed
requests; the grammar mix's output tokens/s as a ratio of the free-text run's (the cost of structured output).
Writes bench/results/serve_load.json and .png.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"],
          "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}, "sure": {"type": "boolean"}}}


def start_server(model, flags, src=None):
    cmd = [sys.executable, "-m", "nemotron3", "serve", "--model", model, "--port", "0", *flags]
    env = dict(os.environ, PYTHONPATH=src) if src else None
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, port


def client_loop(port, stop_at, seed, out, grammar):
    rng = random.Random(seed)
    while time.time() < stop_at:
        body = {"messages": [{"role": "user", "content": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=?"}],
                "max_tokens": rng.randint(16, 96), "temperature": 0.8, "stream": True}
        if grammar and rng.random() < 0.5:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
        t0, ttft, tokens = time.perf_counter(), None, 0
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                out.append(dict(ok=False, status=resp.status))
                conn.close()
                continue
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk or (chunk["choices"] and chunk["choices"][0]["finish_reason"] == "error"):
                    raise ValueError(f"the stream reported an error: {line[:200]}")
                if not chunk["choices"]:
                    continue
                delta = chunk["choices"][0]["delta"]
                if delta.get("content") or delta.get("reasoning_content"):
                    ttft = ttft or time.perf_counter() - t0
                    tokens += 1
            conn.close()
            out.append(dict(ok=True, ttft=ttft or time.perf_counter() - t0, chunks=tokens,
                            latency=time.perf_counter() - t0))
        except (OSError, ValueError) as e:
            out.append(dict(ok=False, error=str(e)))


def old_source(rev: str) -> str:
    """The src/ tree of git revision `rev`, exported to a temporary directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="nemotron3_old_")
    archive = subprocess.run(["git", "-C", root, "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return os.path.join(tmp, "src")


def run_mode(model, args, mode: str) -> dict:
    flags = ["--max-batch", str(args.max_batch), "--max-queue", str(4 * args.clients)]
    proc, port = start_server(model, flags, old_source(args.old_rev) if mode == "old server" else None)
    try:
        results, threads = [], []
        t_start = time.time()
        stop_at = t_start + args.seconds
        for i in range(args.clients):
            t = threading.Thread(target=client_loop, args=(port, stop_at, i, results, mode == "new + grammar mix"))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        elapsed = time.time() - t_start
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        tokens = int(float(re.search(r"^nemotron3_completion_tokens_total (\S+)$", metrics, re.M).group(1)))
    finally:
        proc.terminate()
        proc.wait(10)
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    reasons = sorted({str(r.get("error") or r.get("status"))[:80] for r in results if not r["ok"]})
    return dict(mode=mode, failure_kinds=reasons[:5], requests=len(ok),
                failed=len(results) - len(ok), requests_per_s=len(ok) / elapsed, output_tok_s=tokens / elapsed,
                ttft_p50=statistics.median(ttft) if ttft else None,
                ttft_p99=ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir (e.g. runs/demo/final after make demo)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--old-rev", default="06af347", help="git revision of the previous server (http.server)")
    args = p.parse_args()
    rows = [run_mode(args.model, args, m) for m in ("new server", "old server", "new + grammar mix")]
    for r in rows:
        r["tok_s_vs_new"] = r["output_tok_s"] / rows[0]["output_tok_s"]      # grammar mix: structured-output cost
    print_table(rows, ["mode", "requests", "failed", "requests_per_s", "output_tok_s", "ttft_p50", "ttft_p99",
                       "tok_s_vs_new"])
    out = save("serve_load", dict(config=vars(args), rows=rows))
    fig, (a, b) = new_figure(2, (12, 4))
    names = ["new", "old", "grammar"]
    a.bar(names, [r["output_tok_s"] for r in rows], color=["C0", "C1", "C2"])
    a.set(ylabel="output tokens / s", title=f"{args.clients} streaming clients, {args.max_batch} slots")
    b.bar([f"{n} p50" for n in names] + [f"{n} p99" for n in names],
          [r["ttft_p50"] or 0 for r in rows] + [r["ttft_p99"] or 0 for r in rows],
          color=["C0", "C1", "C2"] * 2)
    b.set(ylabel="time to first token (s)", title="TTFT")
    save_figure(fig, "serve_load")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
