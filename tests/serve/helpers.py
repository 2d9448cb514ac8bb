"""A real `nemotron3 serve` process on loopback for the serving tests: start, clients, raw HTTP, stop."""

import http.client
import json
import os
import re
import subprocess
import sys
import threading

import openai


class Server:
    def __init__(self, model_dir, *flags):
        cmd = [sys.executable, "-m", "nemotron3", "serve", "--model", model_dir, "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, f"server did not start: {line}{self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else "none"
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()   # drain

    def client(self, key=None):
        return openai.OpenAI(base_url=self.url, api_key=key or self.key, max_retries=0, timeout=120)

    def raw(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json",
                                          "Authorization": f"Bearer {self.key}", **(headers or {})})
        r = conn.getresponse()
        out = r.status, r.read().decode()
        conn.close()
        return out

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def metric(self, name) -> float:
        text = self.raw("GET", "/metrics")[1]
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
