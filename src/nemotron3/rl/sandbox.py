"""Run model-written Python as hostile input: one fresh process per execution, isolated, limited and killed whole.

    from nemotron3.rl.sandbox import run_python
    run_python("print(input()[::-1])", stdin="abc", timeout_s=5.0).stdout      # 'cba\\n'

Each run (isolation "bwrap", the default) gets:
- bubblewrap namespaces: no network (a new, empty network namespace), its own PID namespace (when the sandbox's
  first process ends, or this process dies, the kernel kills everything left inside), IPC and UTS namespaces; a
  filesystem of read-only /usr (+ /lib, /bin links) and the interpreter's prefix, a fresh /proc and /dev, and a
  size-capped tmpfs /tmp as the working directory. Nothing else of the host is visible, so reading or writing
  files outside the temp dir fails;
- an unprivileged user: as root (where RLIMIT_NPROC is ignored) the code runs under a fresh uid of its own, so the
  process cap binds, a fork bomb stops at `max_processes`, and the leftovers are killed by uid at the end;
- rlimits: CPU seconds, address space (`memory_mb`), processes, file size, open files;
- a new session / process group, a wall-clock timeout, then SIGKILL of the group (and of the fresh uid);
- stdout + stderr capped at `max_output_bytes` (the run is killed when it prints more).
Everything that goes wrong inside comes back as `SandboxResult(ok=False, reason=...)`; run_python raises only when
the isolation itself is unavailable (SandboxUnavailable, naming `apt-get install bubblewrap`) unless the caller opts
out with isolation="none" (or NEMOTRON3_SANDBOX=none): rlimits and the group kill still apply, but the code keeps
the caller's uid and sees the network and the file system (and as root nothing caps its process count).
Left out: seccomp filters and cgroup memory accounting (RLIMIT_AS bounds each process; max_processes bounds their
number). Without root, the run keeps the caller's uid, and RLIMIT_NPROC counts the caller's other processes too.
"""

from __future__ import annotations

import itertools
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ISOLATIONS = ("bwrap", "none")
_INSTALL_HINT = ("install it (Debian/Ubuntu: `apt-get install bubblewrap util-linux`; Fedora: `dnf install bubblewrap "
                 "util-linux`), or opt out of isolation with run_python(..., isolation='none') or "
                 "NEMOTRON3_SANDBOX=none (unsafe: model-written code then reaches the network and the file system)")
_UID_BASE = 1_200_000_000          # fresh uids for sandboxed runs: far above any real account
_uid_counter = itertools.count()
_PATH = "/usr/bin:/bin"                      # the only PATH the sandboxed processes get


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine."""


@dataclass
class SandboxResult:
    ok: bool
    """True when the code exited with status 0 inside every limit."""
    stdout: str
    """Standard output (decoded as UTF-8, invalid bytes replaced), at most max_output_bytes."""
    stderr: str
    """Standard error, same cap."""
    reason: str
    """Why ok is False ('timeout after 5.0 s', 'memory limit 512 MB exceeded', 'exit status 1: ...'); '' if ok."""


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 8,
               max_output_bytes: int = 1 << 20, max_file_mb: int = 16, isolation: str | None = None) -> SandboxResult:
    """Run `code` with a fresh `python -I -S` (stdlib only) under the limits of the module docstring."""
    isolation = isolation or os.environ.get("NEMOTRON3_SANDBOX", "bwrap")
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r} is unknown; use one of {ISOLATIONS} (NEMOTRON3_SANDBOX too).")
    tools = _find_tools(isolation)
    is_root = os.geteuid() == 0
    uid = _UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uid_counter) % 1000 if is_root else None
    host_dir = tempfile.mkdtemp(prefix="nemotron3-sandbox-")
    try:
        with open(os.path.join(host_dir, "main.py"), "w") as f:
            f.write(code)
        os.chmod(host_dir, 0o755)
        os.chmod(os.path.join(host_dir, "main.py"), 0o644)                # readable by the fresh uid
        python = os.path.realpath(sys.executable)
        if isolation == "bwrap":
            argv = _bwrap_argv(tools, host_dir, python, uid, max_file_mb)
            cwd = "/"
        else:
            argv = [python, "-I", "-S", os.path.join(host_dir, "main.py")]
            cwd = os.path.join(host_dir, "work")
            os.mkdir(cwd)
            uid = None                      # the caller's interpreter may not be readable by a fresh uid
        limits = dict(cpu_s=math.ceil(timeout_s) + 1, memory_mb=memory_mb, max_processes=max_processes,
                      max_file_mb=max_file_mb)
        return _supervise([tools["prlimit"], *_prlimit_args(**limits), *argv], cwd, stdin, timeout_s,
                          max_output_bytes, memory_mb, uid, tools.get("setpriv"))
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


_bwrap_works: set[str] = set()


def _find_tools(isolation: str) -> dict[str, str]:
    """Absolute paths of the OS tools a run needs (found on PATH); SandboxUnavailable naming the package if one is
    missing or bubblewrap cannot create namespaces here (probed once per bwrap binary)."""
    needed = ["prlimit"]
    if isolation == "bwrap":
        needed += ["bwrap", "setpriv"] if os.geteuid() == 0 else ["bwrap"]
    tools = {}
    for name in needed:
        if (path := shutil.which(name)) is None:
            package = "bubblewrap" if name == "bwrap" else "util-linux"
            raise SandboxUnavailable(f"the code sandbox needs `{name}` (package {package}), which is not on PATH: "
                                     f"{_INSTALL_HINT}.")
        tools[name] = path
    if "bwrap" in tools and tools["bwrap"] not in _bwrap_works:
        probe = subprocess.run([tools["bwrap"], "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/", "true"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            raise SandboxUnavailable(f"bubblewrap cannot create namespaces here ({probe.stderr.strip()}); allow "
                                     f"user namespaces (sysctl kernel.unprivileged_userns_clone=1) or run as root, "
                                     f"or {_INSTALL_HINT.split(', or ', 1)[1]}.")
        _bwrap_works.add(tools["bwrap"])
    return tools


def _bwrap_argv(tools: dict[str, str], host_dir: str, python: str, uid: int | None, max_file_mb: int) -> list[str]:
    argv = [tools["bwrap"], "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]                             # e.g. a pyenv or conda interpreter
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(4 * max_file_mb << 20), "--tmpfs", "/tmp",
             "--ro-bind", host_dir, "/sandbox", "--chdir", "/tmp",
             "--setenv", "HOME", "/tmp"]
    if uid is None:
        argv += ["--unshare-user"]
        return argv + ["--", python, "-I", "-S", "/sandbox/main.py"]
    # root: bwrap keeps just enough capability to switch to the fresh uid, which setpriv does before exec
    argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP", "--",
             tools["setpriv"],
             f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    return argv + [python, "-I", "-S", "/sandbox/main.py"]


def _prlimit_args(cpu_s: int, memory_mb: int, max_processes: int, max_file_mb: int) -> list[str]:
    """util-linux prlimit sets the rlimits and execs the rest: no preexec_fn, which is unsafe in a threaded caller
    (a rollout scoring from a thread pool)."""
    # RLIMIT_NPROC counts the processes of the real uid: the fresh uid's own count as root, else the caller's
    nproc = max_processes if os.geteuid() == 0 else len(_pids_of(os.getuid())) + max_processes
    return [f"--cpu={cpu_s}:{cpu_s + 1}", f"--as={memory_mb << 20}", f"--fsize={max_file_mb << 20}",
            "--nofile=64", "--core=0", f"--nproc={nproc}", "--"]


def _pids_of(uid: int) -> list[int]:
    """Processes of uid that still run (zombies, dead and waiting to be reaped, do not count), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry))
        except (OSError, IndexError):
            pass
    return pids


def _supervise(argv, cwd, stdin, timeout_s, max_output_bytes, memory_mb, uid, setpriv) -> SandboxResult:
    env = {"PATH": _PATH, "LANG": "C.UTF-8"}
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    pending = stdin.encode()
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    deadline = time.monotonic() + timeout_s
    reason = ""
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"timeout after {timeout_s} s"
            break
        for key, _ in sel.select(timeout=min(left, 0.1)):
            if key.fileobj is proc.stdin:
                try:
                    pending = pending[os.write(key.fd, pending[:65536]):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:                                  # the code stopped reading: fine
                    pending = b""
                if not pending:
                    sel.unregister(proc.stdin)
                    proc.stdin.close()
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            out[key.fd] += chunk
        if sum(len(b) for b in out.values()) > max_output_bytes:
            reason = f"output exceeded {max_output_bytes} bytes"
            break
    if reason:
        _kill(proc, uid, setpriv)
    try:
        status = proc.wait(timeout=max(0.5, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:                                    # streams closed, process lingering
        reason = f"timeout after {timeout_s} s"
        _kill(proc, uid, setpriv)
        status = proc.wait()
    _kill(proc, uid, setpriv)                                            # leftovers of a detached grandchild
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if not f.closed:
            f.close()
    sel.close()
    stdout, stderr = (bytes(b[:max_output_bytes]).decode("utf-8", "replace") for b in out.values())
    if not reason and status != 0:
        reason = _explain(status, stderr, memory_mb)
    return SandboxResult(ok=not reason, stdout=stdout, stderr=stderr, reason=reason)


def _explain(status: int, stderr: str, memory_mb: int) -> str:
    """Exit status -> reason. bwrap reports a child killed by signal s as 128 + s; Popen as -s."""
    sig = -status if status < 0 else status - 128 if status > 128 else None
    last = stderr.strip().splitlines()[-1][:200] if stderr.strip() else ""
    if "MemoryError" in stderr or sig == signal.SIGSEGV and "memory" in stderr.lower():
        return f"memory limit {memory_mb} MB exceeded"
    if sig == signal.SIGXCPU:
        return "CPU time limit exceeded"
    if sig == signal.SIGXFSZ or "File too large" in stderr:
        return "file size limit exceeded"
    if sig is not None and sig in signal.valid_signals():
        return f"killed by {signal.Signals(sig).name}" + (f": {last}" if last else "")
    return f"exit status {status}" + (f": {last}" if last else "")


def _kill(proc: subprocess.Popen, uid: int | None, setpriv: str | None) -> None:
    """SIGKILL the run's process group, and as root every process of its fresh uid (a child that called setsid
    has left the group; under bwrap, the PID namespace dies with its first process anyway)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 2.0
    while uid is not None and _pids_of(uid) and time.monotonic() < deadline:
        # kill(-1) sent as uid reaches every process of uid (and nothing else); repeat until they are gone
        subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/bin/sh", "-c",
                        "kill -KILL -1"], env={"PATH": _PATH}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.01)
