"""From a composed config to a running recipe: the run directory, launchers, and error reporting.

`run_job(cfg, run_dir)` is what every Hydra job calls (local, multirun, Slurm through submitit):
1. pin cfg.run_dir and save the resolved config, the git commit and the command in the run directory,
   so that every process that later reads it (torchrun ranks, a resumed run) sees the same values
   (resolvers like ${now:} must not be evaluated again per rank);
2. launcher=local: import `llmx.recipes.<kind>` and call its `main(cfg)` in this process (under an
   outer torchrun, each rank does this);
   launcher=torchrun / slurm: start `torchrun ... -m llmx.worker <run_dir>`, whose ranks read the
   saved config;
3. turn failures into a status record instead of an exception, so that in a sweep one failing job is
   reported and the others still run. Errors caused by the input (LlmxError) are one clear line; other
   exceptions keep their traceback in <run_dir>/error.txt.
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from llmx.utils import LlmxError, atomic_write_json, atomic_write_text


@dataclass
class JobResult:
    run_dir: str
    status: str  # ok | failed | interrupted
    exit_code: int
    message: str = ""


# Results of the jobs run in this process, read by the CLI after Hydra returns.
RESULTS: List[JobResult] = []


def kind_module(kind: str) -> str:
    return f"llmx.recipes.{kind}"


def git_info() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def save_run_files(cfg, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    import socket

    atomic_write_json(
        run_dir / "run_info.json",
        {
            "argv": sys.argv,
            "git": git_info(),
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def load_run_config(run_dir: Path):
    """The resolved config saved by save_run_files, validated against the schema again."""
    from omegaconf import OmegaConf

    from llmx.config.schema import typed

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise LlmxError(f"{path}: no saved config (is {run_dir} an llmx run directory?)")
    return typed(OmegaConf.load(path))


def quiet_library_progress_bars() -> None:
    # llmx draws its own progress; the per-call bars of datasets (map, save) and transformers
    # (weight loading and saving) would interleave with it in every run's log.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def run_recipe(cfg) -> dict:
    quiet_library_progress_bars()
    kind = cfg.kind.value if hasattr(cfg.kind, "value") else str(cfg.kind)
    module = importlib.import_module(kind_module(kind))
    return module.main(cfg)


def check_before_run(cfg) -> None:
    """The recipe kind's own checks (its module's check_config: ranges, paths, combinations) on a composed config,
    so that the CLI refuses a bad value before Hydra makes a run directory or torchrun starts a process."""
    kind = cfg.kind.value if hasattr(cfg.kind, "value") else str(cfg.kind)
    if "model" in cfg and cfg.model.get("path"):
        from llmx.models.runs import check_fits

        check_fits(cfg.model)
    check = getattr(importlib.import_module(kind_module(kind)), "check_config", None)
    if check is not None:
        check(cfg)


def torchrun_command(cfg, run_dir: Path, node_rank_host: Optional[str] = None) -> List[str]:
    lc = cfg.launcher
    # torchrun through llmx.worker --torchrun: the same launcher, without its traceback after a rank's error.
    cmd = [sys.executable, "-m", "llmx.worker", "--torchrun", f"--nproc_per_node={lc.nproc_per_node}",
           f"--nnodes={lc.nnodes}"]
    endpoint = lc.rdzv_endpoint or (f"{node_rank_host}:29500" if node_rank_host else None)
    if lc.nnodes > 1:
        if not endpoint:
            raise LlmxError("launcher.nnodes > 1 needs launcher.rdzv_endpoint=<host:port of the first node>")
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={Path(run_dir).name}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "llmx.worker", str(run_dir)]


def _spawn(cmd: List[str]) -> int:
    """Run a child (torchrun) in the foreground. Ctrl-C reaches the whole process group, so the
    children already get it; this process just waits for them to checkpoint and exit."""
    print("llmx: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, 1))))
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _rank_error(run_dir: Path, code: int) -> str:
    """What the failing rank said (its error.txt, first line), else torchrun's exit code."""
    path = run_dir / "error.txt"
    if path.is_file():
        lines = path.read_text().strip().splitlines()
        if lines:
            return lines[0] + (f" (details in {path})" if len(lines) > 1 else "")
    return f"torchrun exited with code {code}"


def slurm_head_host() -> Optional[str]:
    try:
        import submitit

        return submitit.JobEnvironment().hostnames[0]
    except Exception:
        return None


def run_job(cfg, run_dir: Path) -> JobResult:
    from omegaconf import open_dict

    from llmx.trainer.trainer import RunInterrupted

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").unlink(missing_ok=True)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        local = Path(cfg.model.path).expanduser() if "model" in cfg and cfg.model.get("path") else None
        if local is not None and local.exists():
            # Absolute in config.yaml: a later run that chains from this one reads it from another directory.
            cfg.model.path = str(local.resolve())
    launcher = cfg.launcher.name.value if hasattr(cfg.launcher.name, "value") else str(cfg.launcher.name)
    try:
        save_run_files(cfg, run_dir)
        in_torchrun = "LOCAL_RANK" in os.environ
        if launcher == "local" or in_torchrun:
            run_recipe(cfg)
            code = 0
        else:
            head = slurm_head_host() if launcher == "slurm" else None
            code = _spawn(torchrun_command(cfg, run_dir, head))
        result = JobResult(str(run_dir), "ok" if code == 0 else "failed", code,
                           "" if code == 0 else _rank_error(run_dir, code))
    except RunInterrupted as e:
        result = JobResult(str(run_dir), "interrupted", e.exit_code, str(e))
    except LlmxError as e:
        result = JobResult(str(run_dir), "failed", 1, str(e))
    except KeyboardInterrupt:
        result = JobResult(str(run_dir), "interrupted", 130, "aborted by a second Ctrl-C; no checkpoint written")
    except Exception as e:  # keep the sweep going; the traceback goes to error.txt and stderr
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        result = JobResult(str(run_dir), "failed", 1, f"{type(e).__name__}: {e} (traceback in {run_dir / 'error.txt'})")
        atomic_write_text(run_dir / "error.txt", tb)
    if result.status != "ok":
        if not (run_dir / "error.txt").exists():
            atomic_write_text(run_dir / "error.txt", result.message + "\n")
        print(f"llmx: error: {result.message}", file=sys.stderr, flush=True)
    print(f"llmx: run directory: {run_dir}", flush=True)
    atomic_write_json(run_dir / "status.json", result.__dict__)
    RESULTS.append(result)
    return result
