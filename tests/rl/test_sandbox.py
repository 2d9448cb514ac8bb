"""The code sandbox against hostile programs. Oracle: the host itself (a listening socket, files, a sentinel process,
/proc), checked after each run; where an attack is harmless to the host, a control run with isolation="none" shows
the same program succeeding unsandboxed, so the contained outcome is the sandbox's doing."""

import os
import shutil
import socket
import subprocess
import time

import pytest

from nemotron3.rl import sandbox
from nemotron3.rl.sandbox import SandboxUnavailable, run_python


def _sandbox_processes():
    """Host pids owned by a sandbox uid that are not zombies (a zombie is dead, waiting for its reaper)."""
    left = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid >= sandbox._UID_BASE:
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
                left += [int(pid)] if state != "Z" else []
        except OSError:
            pass
    return left


def test_runs_code_with_stdin_and_an_empty_environment(monkeypatch):
    monkeypatch.setenv("NEMOTRON3_TEST_SECRET", "hunter2")
    r = run_python("import os, sys\nprint(input()[::-1]); print(sorted(os.environ)); print(os.getcwd())", stdin="abc")
    assert r.ok and r.reason == ""
    lines = r.stdout.splitlines()
    assert lines[0] == "cba"
    assert "NEMOTRON3_TEST_SECRET" not in lines[1] and "hunter2" not in r.stdout
    assert lines[2] == "/tmp"


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('CONNECTED')"
    try:
        r = run_python(code)
        assert not r.ok and "CONNECTED" not in r.stdout
        assert "OSError" in r.reason or "ConnectionRefused" in r.reason or "unreachable" in r.reason.lower()
        control = run_python(code, isolation="none")
        assert control.ok and "CONNECTED" in control.stdout
    finally:
        server.close()


def test_files_outside_the_temp_dir_can_be_neither_read_nor_written(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    target = tmp_path / "pwned.txt"
    read = f"print(open({str(secret)!r}).read())"
    write = f"open({str(target)!r}, 'w').write('x')\nopen('/usr/pwned', 'w')"
    r = run_python(read)
    assert not r.ok and "top secret" not in r.stdout and "FileNotFoundError" in r.reason
    r = run_python(write)
    assert not r.ok and not target.exists() and not os.path.exists("/usr/pwned")
    assert run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())").stdout == "ok\n"
    assert "top secret" in run_python(read, isolation="none").stdout                # control: the attack is real
    run_python(f"open({str(target)!r}, 'w').write('x')", isolation="none")
    assert target.exists()


def test_fork_bomb_stops_at_the_process_cap_and_leaves_nothing_behind():
    code = ("import os, time\nn = 0\nfor _ in range(10000):\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(60); os._exit(0)\n        n += 1\n    except OSError:\n        break\n"
            "print('forked', n, flush=True)\nos.setsid()\ntime.sleep(60)")
    t0 = time.monotonic()
    r = run_python(code, timeout_s=1.0, max_processes=8)
    assert time.monotonic() - t0 < 3.0
    assert r.reason == "timeout after 1.0 s"
    assert r.stdout.startswith("forked ") and int(r.stdout.split()[1]) < 8
    assert _sandbox_processes() == []


def test_relentless_fork_bomb_is_killed_on_time():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    r = run_python(code, timeout_s=1.0)
    assert time.monotonic() - t0 < 3.0 and not r.ok
    assert _sandbox_processes() == []


def test_memory_bomb_hits_the_address_space_limit():
    r = run_python("x = bytearray(2 << 30)", memory_mb=256)
    assert not r.ok and r.reason == "memory limit 256 MB exceeded"


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=0.5)
    assert time.monotonic() - t0 < 2.0
    assert not r.ok and r.reason == "timeout after 0.5 s"


def test_huge_print_is_cut_at_the_output_cap():
    r = run_python("while True:\n    print('x' * 10000)", max_output_bytes=100_000)
    assert not r.ok and r.reason == "output exceeded 100000 bytes"
    assert 0 < len(r.stdout) <= 100_000


def test_killing_the_parent_or_a_host_process_fails():
    sentinel = subprocess.Popen(["sleep", "30"])
    try:
        code = (f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, {sentinel.pid}):\n    try:\n"
                f"        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n"
                f"        print(type(e).__name__, flush=True)\nos.killpg(0, signal.SIGKILL)")
        r = run_python(code)
        assert not r.ok and r.reason.startswith("killed by SIGKILL")      # it could only kill its own group
        assert sentinel.poll() is None                                       # the host process lives on
        assert r.stdout.count("Error") >= 2                                  # parent (init) and host pids refused
    finally:
        sentinel.kill()
        sentinel.wait()


def test_missing_bubblewrap_is_a_clear_error_unless_opted_out(monkeypatch, tmp_path):
    (tmp_path / "prlimit").symlink_to(shutil.which("prlimit"))          # a machine with util-linux, no bubblewrap
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_python("print(1)")
    with pytest.raises(ValueError, match="isolation='docker' is unknown"):
        run_python("print(1)", isolation="docker")
    monkeypatch.setenv("NEMOTRON3_SANDBOX", "none")
    assert run_python("print(1)").stdout == "1\n"                          # explicit opt-out works without bwrap
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match=r"needs `prlimit` \(package util-linux\)"):
        run_python("print(1)")


def test_concurrent_runs_from_threads_are_independent():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * {i})"), range(8)))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]
