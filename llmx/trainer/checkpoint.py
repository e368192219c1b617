"""Checkpoints: torch.distributed.checkpoint (DCP) for model and optimizer, plus per-rank train state.

Layout of one checkpoint, `<run_dir>/checkpoints/step_00000100/`:
    .metadata, __<rank>_0.distcp   DCP shards of {"model": ..., "optim": ...} (resharded on load, so a
                                   checkpoint written by N ranks loads on M ranks)
    train_state_rank<r>.pt         step, data-loader position, RNG states of rank r (torch.save of
                                   tensors and ints only: loaded with weights_only=True)
    llmx_checkpoint.json           written last by rank 0: step, world size, every file's size. Its
                                   presence is what makes the checkpoint "complete".

Atomicity: everything is written into `.tmp-step_00000100/`, and rank 0 renames it into place only
after every rank has finished and the manifest is on disk. A crash mid-write leaves a `.tmp-*` directory
that is never loaded (and is removed by the next save), so a failed run never overwrites or shadows a
good checkpoint. Old checkpoints are pruned only after the new one is complete.

Before loading, every file is checked against the manifest's sizes, so a truncated file gives one clear
error naming the file instead of a traceback from deep inside DCP.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from llmx.utils import LlmxError, atomic_write_json

MANIFEST = "llmx_checkpoint.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every single-process save/load that it "assumes" single-process intent; it is ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(TMP_PREFIX) and (path / MANIFEST).is_file()


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Complete checkpoints under ckpt_root, oldest step first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_manifest(path: Path) -> Dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise LlmxError(f"checkpoint {path}: unreadable manifest {MANIFEST} ({e})") from e


def verify(path: Path) -> Dict[str, Any]:
    """Check that every file listed in the manifest exists with its recorded size."""
    manifest = read_manifest(path)
    problems = []
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, expected {size} (truncated or overwritten)")
    if problems:
        raise LlmxError(
            f"checkpoint {path} is corrupt: " + "; ".join(problems)
            + ". Resume from another checkpoint with resume=<path>, or start fresh without resume."
        )
    return manifest


def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: List[torch.optim.Optimizer],
    train_state: Dict[str, Any],
    *,
    rank: int,
    world_size: int,
    keep_last: int,
    extra_manifest: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a complete checkpoint for `step` (collective: every rank calls it). Returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from llmx.trainer.distributed import barrier

    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()

    model_sd, optim_sd = get_state_dict(model, optimizers)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({**train_state, "rng": rng_state()}, tmp / f"train_state_rank{rank}.pt")
    barrier()

    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "step": step,
            "world_size": world_size,
            "time": time.time(),
            "files": files,
            **(extra_manifest or {}),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        if final.exists():  # same step saved before (a resumed run re-reaching it): replace whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(
    path: Path,
    model: torch.nn.Module,
    optimizers: List[torch.optim.Optimizer],
    *,
    rank: int,
    world_size: int,
) -> Dict[str, Any]:
    """Restore model, optimizer and RNG in place; returns the train state saved by this rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    manifest = verify(path)
    if manifest["world_size"] != world_size:
        # Model and optimizer reshard fine; the data order and RNG streams are per rank and would not.
        raise LlmxError(
            f"checkpoint {path} was written by {manifest['world_size']} process(es) but this run has {world_size}; "
            "an exact resume needs the same process count (launcher.nproc_per_node / launcher.nnodes)."
        )
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP's errors on a damaged file are deep and unhelpful
        raise LlmxError(f"checkpoint {path} could not be read: {type(e).__name__}: {e}") from e
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"train_state_rank{rank}.pt"
    try:
        train_state = torch.load(rank_file, weights_only=True)
    except Exception as e:
        raise LlmxError(f"checkpoint {path}: cannot read {rank_file.name}: {e}") from e
    set_rng_state(train_state.pop("rng"))
    return train_state


def find_newest(run_dirs: List[Path]) -> Optional[Path]:
    """The most recently completed checkpoint among the given run directories."""
    best, best_time = None, -1.0
    for run_dir in run_dirs:
        for ck in list_checkpoints(run_dir / "checkpoints"):
            t = float(read_manifest(ck).get("time", ck.stat().st_mtime))
            if t > best_time:
                best, best_time = ck, t
    return best


# Settings a resume may change: how long the run goes, how often it logs, evaluates and saves, where and how it
# runs. Any other difference changes the trajectory, so a resume that differs in one is refused unless the user
# says resume_force=true.
RESUMABLE = ("trainer.max_steps", "trainer.eval_every", "trainer.eval_batches", "trainer.log_every",
             "trainer.ckpt_every", "trainer.keep_last", "trainer.save_final", "trainer.export_hf", "trainer.device",
             "trainer.compile", "trainer.activation_checkpointing", "trainer.reshard_after_forward",
             "trainer.meta_init_threshold", "trainer.detect_nan", "trainer.max_seconds", "logger", "launcher",
             "resume", "resume_force", "run_dir", "output_root", "description", "cpu_time", "fits_cpu", "paper")


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_changes(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """The settings, outside RESUMABLE, that differ between a checkpoint's config and this run's, one line each."""
    a, b = _flatten(saved), _flatten(now)
    missing = "(unset)"
    return [f"{k}: {a.get(k, missing)!r} in the checkpoint, {b.get(k, missing)!r} now"
            for k in sorted(set(a) | set(b))
            if not any(k == r or k.startswith(r + ".") for r in RESUMABLE) and a.get(k, missing) != b.get(k, missing)]


def resolve_resume(spec: Optional[str], run_dir: Path) -> Optional[Path]:
    """Turn the `resume` setting into a checkpoint path (or None for a fresh start).

    auto:   the newest complete checkpoint of this run directory; None when there is none (the caller
            says so loudly). This is what a requeued Slurm job or a sweep job needs: its own directory,
            never another run's. (`llmx run ... resume=auto` first points the run directory at the
            recipe's newest run with a checkpoint: see llmx.cli.)
    latest: the same, but an error when there is none.
    a path: a checkpoint directory, or a run directory (its newest checkpoint).
    """
    if spec in (None, "", "none", "null"):
        return None
    if spec in ("auto", "latest"):
        found = find_newest([run_dir])
        if found is None and spec == "latest":
            raise LlmxError(
                f"resume=latest: no complete checkpoint in {run_dir / 'checkpoints'}; "
                "use resume=auto to start fresh when none exists"
            )
        return found
    path = Path(spec).expanduser()
    if not path.exists():
        raise LlmxError(f"resume={spec}: no such file or directory")
    if (path / MANIFEST).is_file():
        return path
    if path.name.startswith(TMP_PREFIX) or path.name.startswith(PREFIX):
        raise LlmxError(f"resume={spec}: this checkpoint is incomplete (no {MANIFEST}); it was never finished")
    found = find_newest([path])
    if found is None:
        raise LlmxError(f"resume={spec}: not a checkpoint, and no complete checkpoint under {path / 'checkpoints'}")
    return found
