"""Run untrusted Python (agent answers, ColBench reference functions) in an isolated, limited child process.

Reference: SWEET-RL / ColBench (Zhou et al. 2025, "SWEET-RL: Training Multi-Turn LLM Agents on Collaborative
Reasoning Tasks"), sweet_rl/utils/code_utils.py: the backend-programming reward is the fraction of the hidden
test calls whose output equals the reference function's (a test counts only when the reference output is not
None). The reference runs `exec(code)` then `eval(test_case)` *in the evaluator's own process*, each candidate
call guarded by `signal.alarm(1)`, with a string blacklist (`import os`, `exit(`, ...) as its only protection.
`run_calls_in_process` keeps that way for the benchmark only ("the price of safety"); it is unsafe.

What `run_calls` does instead, per evaluation (one child process runs the code once, then every call):

* `python -I -S -B` (no site, no user paths, no environment variables honoured), an empty environment, a new
  session (the parent kills the whole process group), stdin from /dev/null, exec(code, ns) / eval(call, ns)
  with ONE explicit globals dict, so helper functions defined by the code resolve on Python 3.13 too (PEP 667
  broke the reference's exec-in-a-function on 3.13).
* Operating-system isolation when the machine allows unprivileged user namespaces (probed once, cached; see
  `isolation()`): new user, mount, network, PID, IPC and UTS namespaces, made by the child itself with ctypes
  `unshare(2)` (the `unshare` binary costs +2.0 ms per start for the namespaces alone, measured, but cannot make
  the mounts below, which need ctypes anyway: +~4.5 ms in the child for everything). In them: every top-level
  entry of / that is not in `Limits.visible_dirs` (/usr, /bin, /lib*, /sbin, /dev, /proc, /tmp) is hidden under
  an empty tmpfs (files under /dev/null), so /root, /home, /work, /etc, /var, /opt, ... are empty; the Python
  installation is bound back so the standard library still imports; then every reachable mount is re-mounted
  read-only (nosuid, nodev); private tmpfs on /tmp (the cwd, `Limits.tmp_kb`), /dev/shm, gone with the
  namespace; no network but a down loopback; the code runs as pid 1 of its own PID namespace with a fresh
  /proc (it cannot see or signal host processes; the parent's SIGKILL of the child takes the namespace).
* rlimits: RLIMIT_CPU (`cpu_s`; SIGXCPU fails the running call with "cpu time limit", since pid 1 of a PID
  namespace would ignore its default action; the hard limit one second later kills the child), RLIMIT_AS
  (`memory_mb`: address space, not RSS, so a memory bomb gets MemoryError before it touches the pages),
  RLIMIT_NPROC (`nproc` extra processes; the kernel does NOT apply it
  when the child's uid outside the namespace is root, see below), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0.
* An audit hook (PEP 578) installed before the code runs: refuses sockets, subprocess/exec/fork/spawn, os.kill,
  ctypes, the import of ctypes/socket/subprocess/threading/..., and file access outside the temp dir (reads are
  also allowed inside the Python installation). A second layer only: audit hooks can be bypassed by code that
  corrupts the interpreter.
* Limits the parent enforces: `call_timeout_s` per call (SIGALRM in the child raises a BaseException the code's
  `except Exception` cannot swallow; if the code still does not return within `grace_s` more, the parent kills
  the child, marks that call "timeout" and starts a new child for the remaining calls), `wall_s` for the whole
  evaluation, restarts included; output kept to `output_kb` (the rest read and dropped, so the child never
  blocks on a full pipe); each returned value to `value_kb`.
* Results come back as one line of ASCII JSON per call, tagged plain values (never pickle): int, float, bool,
  str, bytes, None, list, tuple, dict, set, frozenset, nested; anything else becomes `Unserializable("<...>")`,
  a str that compares unequal to everything, so an unserializable answer never passes a test.
* A call that kills its child (os._exit, a C stack overflow, SIGXCPU) fails alone: the other calls run in a
  fresh child. The reference would have lost the whole evaluation (its process) instead.

What is contained on this machine (Linux 6.18, util-linux 2.38, Python 3.11.7, running as root, 2026-12-06):
every layer above is active (`isolation()["layers"]`). tests/test_rl_sandbox.py runs the file, network,
signal, exit/crash and fork attacks three times: with the namespaces alone (hook off), with the hook alone (no
namespaces) and with both; each configuration contains each of them by itself, except the fork bomb with the
namespaces alone (as root nothing but the hook refuses fork; the test skips that case). Not contained, or
weaker, here:

* The caller is root (uid 0) and the code's uid maps to it, so the kernel ignores RLIMIT_NPROC: a fork bomb is
  stopped by the audit hook (os.fork/subprocess/_posixsubprocess refused) and killed with the PID namespace,
  not by the rlimit. For an unprivileged caller RLIMIT_NPROC applies as well (`isolation()["nproc_enforced"]`).
* As mapped root the code may read whatever the visible part of the tree holds (/usr, the bound-back Python
  installation) regardless of file permissions, when the hook is off or bypassed; nothing visible is writable
  (read-only mounts) and no device node can be opened (nodev; /dev/null included).
* No cgroup limits (CPU share, RSS, pids.max): RLIMIT_AS bounds each process's address space only, and two
  children running at once compete for the cores.
* The code runs in the same interpreter as the harness, so it can forge its own results (write a fake result
  line); that is no more than returning those values, and it cannot see other evaluations.
* Without user namespaces (`Limits(namespaces=False)`, or a machine that refuses them, e.g. Ubuntu 24.04's
  AppArmor restriction, containers without CLONE_NEWUSER): rlimits, setsid, an empty environment, a private
  temp directory as cwd (deleted after) and the audit hook only; no network or filesystem isolation beyond the
  hook, which code that corrupts the interpreter can bypass.
"""

from __future__ import annotations

import json
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmx.utils import LlmxError

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")


@dataclass(frozen=True)
class Limits:
    call_timeout_s: float = 1.0  # per call (wall), the reference's signal.alarm(1); also bounds exec(code)
    cpu_s: float = 10.0  # RLIMIT_CPU for each child process
    wall_s: float = 20.0  # the whole evaluation, restarts included; then the parent kills the child's group
    memory_mb: int = 512  # RLIMIT_AS (virtual address space)
    nproc: int = 0  # extra processes the code may start (RLIMIT_NPROC = nproc + 1; ignored for root, see above)
    fsize_mb: float = 1.0  # RLIMIT_FSIZE: largest file the code may write
    output_kb: int = 64  # stdout+stderr kept; the rest is read and dropped
    nofile: int = 64  # RLIMIT_NOFILE
    value_kb: int = 256  # largest encoded return value; larger ones come back Unserializable
    tmp_kb: int = 4096  # size of the private tmpfs (namespaces only)
    grace_s: float = 0.5  # after a call's timeout, how long the parent waits before killing the child
    startup_s: float = 2.0  # allowance for the child's start (interpreter, namespaces) on a loaded machine
    namespaces: bool = True  # use Linux namespaces where the machine has them
    audit_hook: bool = True  # the second layer; off only to test the other layers alone
    # namespaces only: the top-level entries the code may see; every other one is hidden (empty tmpfs)
    visible_dirs: Tuple[str, ...] = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/dev", "/proc",
                                     "/tmp")
    python: Optional[str] = None  # the child's interpreter; None: this one (sys.executable)

    def __post_init__(self):
        for name in ("call_timeout_s", "cpu_s", "wall_s", "memory_mb", "fsize_mb", "output_kb", "nofile",
                     "value_kb", "tmp_kb", "grace_s", "startup_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise LlmxError(f"sandbox Limits.{name}={value!r}: must be a positive number")
        if not isinstance(self.nproc, int) or self.nproc < 0:
            raise LlmxError(f"sandbox Limits.nproc={self.nproc!r}: must be an integer >= 0")
        if self.memory_mb < 64:
            raise LlmxError(f"sandbox Limits.memory_mb={self.memory_mb}: the interpreter needs at least 64")
        if self.python is not None and not os.access(self.python, os.X_OK):
            raise LlmxError(f"sandbox Limits.python={self.python!r}: not an executable file")
        if self.nofile < 16:
            raise LlmxError(f"sandbox Limits.nofile={self.nofile}: the interpreter needs at least 16")


@dataclass
class CallResult:
    ok: bool  # the call returned (no exception, no timeout)
    value: Any  # the decoded value (None when not ok)
    error: Optional[str]  # "timeout", "MemoryError", "NameError: ...", "killed: SIGXCPU", ...


@dataclass
class RunResult:
    calls: List[CallResult]
    defined: bool  # the code itself ran without error
    error: Optional[str]  # why the whole evaluation failed ("syntax error: ...", "killed: wall time", ...)
    output: str  # captured (truncated) stdout/stderr
    seconds: float
    layers: List[str] = field(default_factory=list)  # the isolation layers the (first) child reported


class Unserializable(str):
    """A value that could not travel as plain data: its text names the type; equal to nothing, itself included."""

    def __eq__(self, other):
        return False

    def __ne__(self, other):
        return True

    __hash__ = str.__hash__


# ---------------------------------------------------------------- decoding (untrusted JSON, bounded size)


def _decode(x: Any) -> Any:
    if x is None or x is True or x is False:
        return x
    tag, p = x
    if tag == "i":
        return int(p, 16)
    if tag == "f":
        return float.fromhex(p)
    if tag == "s":
        return bytes.fromhex(p).decode("utf-8", "surrogatepass")
    if tag == "y":
        return bytes.fromhex(p)
    if tag == "l":
        return [_decode(v) for v in p]
    if tag == "t":
        return tuple(_decode(v) for v in p)
    if tag == "S":
        return {_decode(v) for v in p}
    if tag == "F":
        return frozenset(_decode(v) for v in p)
    if tag == "d":
        return {_decode(k): _decode(v) for k, v in p}
    if tag == "u":
        return Unserializable(f"<unserializable {bytes.fromhex(p).decode('utf-8', 'replace')}>")
    raise ValueError(f"unknown tag {tag!r}")


def _parse_line(line: bytes) -> Optional[dict]:
    try:
        msg = json.loads(line)
        if not isinstance(msg, dict):
            return None
        if "v" in msg:
            msg["v"] = _decode(msg["v"])
        if "e" in msg:
            msg["e"] = bytes.fromhex(msg["e"]).decode("utf-8", "replace")
        if "layers" in msg:
            msg["layers"] = [bytes.fromhex(s).decode() for s in msg["layers"]]
        return msg
    except (ValueError, TypeError, RecursionError, MemoryError, AttributeError):
        return None


# ---------------------------------------------------------------- one child


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = {"SIGXCPU": " (cpu time)", "SIGSEGV": " (crash, e.g. C stack overflow)", "SIGXFSZ": " (file size)"}
        return f"killed: {name}{why.get(name, '')}"
    return f"exited with code {returncode}"


def _kill(proc: subprocess.Popen) -> None:
    # Before wait(): the group id stays ours while the (zombie) leader is unreaped, so it cannot hit a reused id.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@dataclass
class _Child:
    layers: List[str]
    defined: Optional[bool]  # None: the child died or was killed before finishing the definition
    define_error: Optional[str]
    results: Dict[int, CallResult]
    failure: Optional[str]  # why the child stopped early (timeout, signal, wall time, ...)
    output: bytes


def _run_child(code: str, calls: Sequence[str], indices: Sequence[int], limits: Limits, deadline: float,
               namespaces: bool, output_left: int) -> _Child:
    req = {"code": code, "calls": list(calls), "indices": list(indices), "namespaces": namespaces,
           "visible": list(limits.visible_dirs),
           "limits": {k: v for k, v in asdict(limits).items() if k not in ("visible_dirs", "python")}}
    tmp = None if namespaces else tempfile.mkdtemp(prefix="llmx-sandbox-")
    child = _Child([], None, None, {}, None, b"")
    try:
        stdin = _request_file(marshal.dumps(req))
        try:
            proc = subprocess.Popen([limits.python or sys.executable, "-I", "-S", "-B", CHILD], stdin=stdin,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=tmp or "/",
                                    start_new_session=True, close_fds=True)
        except OSError as e:  # not the code's fault: every evaluation would silently score 0
            raise LlmxError(f"sandbox: cannot start the child process: {e}") from e
        finally:
            os.close(stdin)
        try:
            _talk(proc, child, indices, limits, deadline, output_left)
        finally:
            _kill(proc)
            proc.stdout.close()
            proc.stderr.close()
        if child.failure is None and (child.defined is None or (child.defined and len(child.results) < len(indices))):
            child.failure = _death(proc.returncode)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return child


def _request_file(request: bytes) -> int:
    """The request as an in-memory file for the child's stdin: writing it can never block on a stuck child."""
    try:
        fd = os.memfd_create("llmx-sandbox-request")
    except (AttributeError, OSError):  # not Linux: an unlinked temporary file does the same
        fd, path = tempfile.mkstemp(prefix="llmx-sandbox-")
        os.unlink(path)
    view = memoryview(request)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _talk(proc, child: _Child, indices, limits: Limits, deadline: float, output_left: int):
    step = limits.call_timeout_s + limits.grace_s
    next_due = time.monotonic() + limits.startup_s + step
    result_cap = (len(indices) + 3) * (limits.value_kb * 1024 + 4096)
    buf, got, out = b"", 0, []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    open_fds = 2
    try:
        while open_fds:
            now = time.monotonic()
            if now >= deadline:
                child.failure = "killed: wall time"
                return
            if now >= next_due:
                child.failure = "timeout"
                return
            for key, _ in sel.select(min(deadline, next_due) - now):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_fds -= 1
                    continue
                if key.fileobj is proc.stderr:
                    if output_left > 0:
                        out.append(data[:output_left])
                        output_left -= len(out[-1])
                    continue
                got += len(data)
                if got > result_cap:
                    child.failure = "result too large"
                    return
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if _take(line, child, indices):
                        next_due = time.monotonic() + step
                if child.defined is False or (child.defined and len(child.results) == len(indices)):
                    # Done. A process the code left behind may hold the pipes open: take what is there.
                    while output_left > 0 and any(k.fileobj is proc.stderr for k, _ in sel.select(0)):
                        more = os.read(proc.stderr.fileno(), 65536)
                        if not more:
                            break
                        out.append(more[:output_left])
                        output_left -= len(out[-1])
                    return
    finally:
        sel.close()
        child.output = b"".join(out)


def _take(line: bytes, child: _Child, indices) -> bool:
    """Record one result line; True when it marks progress (a step finished)."""
    msg = _parse_line(line)
    if msg is None:
        return False
    if "layers" in msg and not child.layers:
        child.layers = msg["layers"]
        return True
    if "defined" in msg and child.defined is None:
        child.defined = msg["defined"] is True
        child.define_error = None if child.defined else str(msg.get("e", "error"))
        return True
    i = msg.get("i")
    if child.defined and isinstance(i, int) and i in indices and i not in child.results:
        if msg.get("ok") is True:
            child.results[i] = CallResult(True, msg.get("v"), None)
        else:
            child.results[i] = CallResult(False, None, str(msg.get("e", "error")))
        return True
    return False


# ---------------------------------------------------------------- public API


def run_calls(code: str, calls: Sequence[str], limits: Limits = Limits()) -> RunResult:
    """Run `code` once, then eval each call in its namespace, in an isolated child; never raises for bad code."""
    if not isinstance(code, str):
        raise LlmxError(f"sandbox: code must be a str, got {type(code).__name__}")
    if isinstance(calls, str) or not all(isinstance(c, str) for c in calls):
        raise LlmxError(f"sandbox: calls must be a sequence of str, got {calls!r:.200}")
    start = time.monotonic()
    deadline = start + limits.wall_s
    namespaces = limits.namespaces and _probe()["namespaces"]
    results: Dict[int, CallResult] = {}
    pending = list(range(len(calls)))
    output, layers, error, defined = b"", [], None, True
    while True:
        child = _run_child(code, [calls[i] for i in pending], pending, limits, deadline, namespaces,
                           limits.output_kb * 1024 - len(output))
        output += child.output
        layers = layers or child.layers
        results.update(child.results)
        pending = [i for i in pending if i not in results]
        if child.defined is not True:
            defined = False
            error = child.define_error or child.failure or "the child stopped"
            break
        if not pending:
            break
        # The first pending call is the one the child was running when it stopped: it alone fails.
        results[pending.pop(0)] = CallResult(False, None, child.failure)
        if child.failure == "killed: wall time":
            error = child.failure
            break
        if not pending:
            break
    why = error if not defined else error or "killed: wall time"
    calls_out = [results.get(i) or CallResult(False, None, why) for i in range(len(calls))]
    return RunResult(calls_out, defined, error, output.decode("utf-8", "replace"), time.monotonic() - start,
                     layers)


def run_many(jobs: Sequence[Tuple[str, Sequence[str]]], limits: Limits = Limits(), workers: int = 2
             ) -> List[RunResult]:
    """run_calls for each (code, calls), `workers` children at a time; results in the order of `jobs`."""
    if not isinstance(workers, int) or workers < 1:
        raise LlmxError(f"sandbox run_many: workers={workers!r}: must be an integer >= 1")
    jobs = list(jobs)
    if workers == 1 or len(jobs) <= 1:
        return [run_calls(code, calls, limits) for code, calls in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_calls(job[0], job[1], limits), jobs))


_PROBE: Optional[Dict[str, Any]] = None
_PROBE_LOCK = threading.Lock()


def _probe() -> Dict[str, Any]:
    """Start one child with namespaces; if it cannot isolate itself, fall back to the plain child. Cached."""
    global _PROBE
    with _PROBE_LOCK:
        if _PROBE is None:
            limits = Limits()
            deadline = time.monotonic() + limits.wall_s
            child = _run_child("", [], [], limits, deadline, True, 4096)
            ok = child.defined is True and "pid_namespace" in child.layers
            if not ok:
                child = _run_child("", [], [], limits, deadline, False, 4096)
            _PROBE = {"namespaces": ok, "layers": child.layers,
                      "probe_error": None if ok else (child.output.decode("utf-8", "replace")[-500:] or child.failure)}
    return _PROBE


def isolation() -> Dict[str, Any]:
    """What this machine gives the sandbox: the layers a child reported, plus what weakens them."""
    probe = _probe()
    return {
        "namespaces": probe["namespaces"],
        "layers": list(probe["layers"]),
        "nproc_enforced": os.geteuid() != 0,  # the kernel skips RLIMIT_NPROC for (mapped) root
        "uid": os.geteuid(),
        "python": sys.version.split()[0],
        "probe_error": probe["probe_error"],
    }


def run_calls_in_process(code: str, calls: Sequence[str], timeout_s: float = 1.0) -> List[Any]:
    """The reference's way, for the benchmark only: exec + eval in THIS process, SIGALRM per call, exceptions ->
    None. UNSAFE: the code can do anything this process can. Explicit namespace so Python 3.13 works."""
    if threading.current_thread() is not threading.main_thread():
        raise LlmxError("run_calls_in_process needs the main thread (signal.setitimer)")

    def on_alarm(signum, frame):
        raise TimeoutError("call timed out")

    ns: Dict[str, Any] = {"__name__": "__sandbox__"}
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        try:
            exec(compile(code, "<code>", "exec"), ns)
        except Exception:
            return [None] * len(calls)
        values = []
        for call in calls:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                values.append(eval(call, ns))
            except Exception:
                values.append(None)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return values
    finally:
        signal.signal(signal.SIGALRM, old)
