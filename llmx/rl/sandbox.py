"""STAND-IN for helper A's sandbox (to be replaced at merge): the design's API, minimal isolation.

Runs code and call expressions in a `python -I -c` child with explicit namespaces, a per-call
SIGALRM timeout, a wall-clock kill and JSON (tagged) results. No OS isolation beyond a child process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

CHILD = r"""
import json, signal, sys
job = json.loads(sys.stdin.read())
def enc(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"t": type(v).__name__, "v": v}
    if isinstance(v, (list, tuple, set, frozenset)):
        return {"t": type(v).__name__, "v": [enc(x) for x in v]}
    if isinstance(v, dict):
        return {"t": "dict", "v": [[enc(k), enc(x)] for k, x in v.items()]}
    return {"t": "str", "v": "<unserializable %s>" % type(v).__name__}
def alarm(*a):
    raise TimeoutError("timeout")
signal.signal(signal.SIGALRM, alarm)
ns = {"__name__": "__main__"}
out = {"defined": True, "error": None, "calls": []}
try:
    exec(job["code"], ns)
except BaseException as e:
    out["defined"] = False
    out["error"] = "%s: %s" % (type(e).__name__, e)
if out["defined"]:
    for c in job["calls"]:
        try:
            signal.setitimer(signal.ITIMER_REAL, job["timeout"])
            v = eval(c, ns)
            signal.setitimer(signal.ITIMER_REAL, 0)
            out["calls"].append({"ok": True, "value": enc(v), "error": None})
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            err = "timeout" if isinstance(e, TimeoutError) else ("%s: %s" % (type(e).__name__, e))[:200]
            out["calls"].append({"ok": False, "value": None, "error": err})
sys.__stdout__.write("\n@@RESULT@@" + json.dumps(out))
"""


@dataclass(frozen=True)
class Limits:
    call_timeout_s: float = 1.0
    cpu_s: float = 10.0
    wall_s: float = 20.0
    memory_mb: int = 512
    nproc: int = 0
    fsize_mb: float = 1.0
    output_kb: int = 64
    nofile: int = 64


@dataclass
class CallResult:
    ok: bool
    value: Any
    error: Optional[str]


@dataclass
class RunResult:
    calls: List[CallResult]
    defined: bool
    error: Optional[str]
    output: str
    seconds: float


def _dec(t: Dict[str, Any]) -> Any:
    kind, v = t["t"], t["v"]
    if kind in ("list", "tuple", "set", "frozenset"):
        items = [_dec(x) for x in v]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
    if kind == "dict":
        return {_dec(k): _dec(x) for k, x in v}
    return v


def _failed(calls: Sequence[str], error: str, output: str, seconds: float) -> RunResult:
    return RunResult([CallResult(False, None, error) for _ in calls], False, error, output, seconds)


def run_calls(code: str, calls: Sequence[str], limits: Limits = Limits()) -> RunResult:
    t0 = time.perf_counter()
    job = json.dumps({"code": code, "calls": list(calls), "timeout": limits.call_timeout_s})
    try:
        p = subprocess.run([sys.executable, "-I", "-c", CHILD], input=job, capture_output=True, text=True,
                           timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        return _failed(calls, "killed: wall time", "", time.perf_counter() - t0)
    head, sep, tail = p.stdout.rpartition("\n@@RESULT@@")
    output = (head + p.stderr)[: limits.output_kb * 1024]
    if not sep:
        return _failed(calls, f"child died (rc {p.returncode})", output, time.perf_counter() - t0)
    out = json.loads(tail)
    if not out["defined"]:
        return _failed(calls, out["error"], output, time.perf_counter() - t0)
    results = [CallResult(c["ok"], _dec(c["value"]) if c["ok"] else None, c["error"]) for c in out["calls"]]
    return RunResult(results, True, None, output, time.perf_counter() - t0)


def run_many(jobs: Sequence[Tuple[str, Sequence[str]]], limits: Limits = Limits(), workers: int = 2) -> List[RunResult]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda j: run_calls(j[0], j[1], limits), jobs))


def isolation() -> Dict[str, Any]:
    return {"stand_in": True}


def run_calls_in_process(code: str, calls: Sequence[str], timeout_s: float = 1.0) -> List[Any]:
    ns: Dict[str, Any] = {}
    exec(code, ns)
    out = []
    for c in calls:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            out.append(eval(c, ns))
        except BaseException:
            out.append(None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return out
