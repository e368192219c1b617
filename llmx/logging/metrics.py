"""Metrics for a run: an append-only metrics.jsonl in the run directory, plus an optional tracker.

metrics.jsonl is the source of truth (reports and plots read it, it survives a killed job line by
line, and it needs no service); W&B and TensorBoard are mirrors of it. Only rank 0 logs: on other
ranks the logger has no sinks, so training code calls it unconditionally.

Metric names used across llmx (the report and the plots look for these first):
    loss, val_loss, val_ppl, tokens_per_s, lr, grad_norm
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Optional

from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, is_rank0

METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
WANDB_ID_FILE = "wandb_id.txt"

TRAIN_LOSS = "loss"
VAL_LOSS = "val_loss"
VAL_PPL = "val_ppl"
TOKENS_PER_S = "tokens_per_s"


def _scalar(value: Any) -> Any:
    # Tensors and numpy scalars become plain Python numbers so json and the trackers accept them.
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return value


def _plain(metrics: Mapping[str, Any]) -> dict:
    return {str(k): _scalar(v) for k, v in metrics.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for a dict, DictConfig or dataclass; `default` when absent."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    try:
        return getattr(cfg, key)
    except AttributeError:  # includes OmegaConf's ConfigAttributeError in struct mode
        return default


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = _field(cfg, key, default)
    return value.value if isinstance(value, Enum) else value


def plain_config(cfg: Any) -> dict:
    """A resolved, JSON-friendly dict from a DictConfig, a schema dataclass or a dict."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except ImportError:
        pass
    import dataclasses

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    return json.loads(json.dumps(cfg, default=lambda o: getattr(o, "value", str(o))))


def read_metrics(run_dir: os.PathLike | str) -> list[dict]:
    """The parsed lines of run_dir/metrics.jsonl ([] when absent). A line cut short by a killed
    job is skipped rather than failing the whole read."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def truncate_after(run_dir: os.PathLike | str, step: int) -> int:
    """Drop metrics.jsonl lines with step > `step`: a run resumed from that step re-logs them.
    Returns the number of lines dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a half-written line from the interrupted job
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class _JsonlSink:
    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self._open()

    def _open(self) -> None:
        path = self.run_dir / METRICS_FILE
        self._f = open(path, "a", buffering=1)
        # A job killed mid-write leaves a line without its newline; start ours on a fresh line.
        if path.stat().st_size and _last_byte(path) != b"\n":
            self._f.write("\n")

    def truncate_after(self, step: int) -> int:
        # The rewrite replaces the file; an append handle kept open would write to the old inode.
        self._f.close()
        try:
            return truncate_after(self.run_dir, step)
        finally:
            self._open()

    def log(self, step: int, metrics: dict) -> None:
        line = {"step": step, "time": round(time.time(), 3), **metrics}
        self._f.write(json.dumps(line, default=str) + "\n")
        self._f.flush()

    def log_final(self, metrics: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self._f.close()


class _WandbSink:
    def __init__(self, run_dir: Path, cfg_dict: dict, logger_cfg: Any):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file() and id_file.read_text().strip():
            run_id = id_file.read_text().strip()
        else:
            # W&B ids are short lowercase alphanumerics; generated here so the id is on disk before
            # init and a job killed during init resumes the same run.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
            atomic_write_text(id_file, run_id + "\n")

        name = run_dir.name
        if name.isdigit():  # a multirun job dir ("0", "1", ...): keep the sweep's name in view
            name = f"{run_dir.parent.name}/{name}"
        kwargs = dict(
            project=_get(logger_cfg, "project", None) or None,
            entity=_get(logger_cfg, "entity", None),
            group=_get(logger_cfg, "group", None),
            tags=list(_get(logger_cfg, "tags", None) or []) or None,
            name=name,
            dir=str(run_dir),
            config=cfg_dict,
            id=run_id,
            resume="allow",
        )
        mode = _get(logger_cfg, "mode", None)
        if mode:
            # Only when set: an explicit argument would override WANDB_MODE (e.g. offline on a
            # cluster, disabled in CI).
            kwargs["mode"] = mode
        try:
            self._run = wandb.init(**kwargs)
        except Exception as exc:
            raise LlmxError(
                f"W&B could not start ({type(exc).__name__}: {exc}). Log in with `wandb login`, or "
                "set WANDB_MODE=offline (sync later with `wandb sync`) or logger=default."
            ) from exc

    def log(self, step: int, metrics: dict) -> None:
        self._run.log(metrics, step=step)

    def log_final(self, metrics: dict) -> None:
        self._run.summary.update(metrics)

    def close(self, failed: bool = False) -> None:
        import wandb

        try:
            self._run.finish(exit_code=1 if failed else 0)
        finally:
            # wandb caches its settings (WANDB_MODE and friends) process-wide at the first init;
            # tearing down lets the next run in this process (a multirun job, a test) read its own.
            wandb.teardown()


class _TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if _is_number(value) and math.isfinite(value):
                self._w.add_scalar(key, value, global_step=step)

    def log_final(self, metrics: dict) -> None:
        step = metrics.get("step", 0)
        for key, value in metrics.items():
            if key != "step" and _is_number(value) and math.isfinite(value):
                self._w.add_scalar(f"final/{key}", value, global_step=int(step))

    def close(self, failed: bool = False) -> None:
        self._w.flush()
        self._w.close()


class MetricsLogger:
    """Logs step metrics to run_dir/metrics.jsonl and, on request, to W&B or TensorBoard.

    `enabled` defaults to "this is rank 0"; a disabled logger has no sinks and every method returns
    at once, so callers never branch on rank. `logger_cfg` None takes cfg_dict's `logger` node, and
    `backend` None takes logger_cfg.backend. Use it as a context manager, or call close() in a
    `finally`, so a W&B run is always finished (a multirun would otherwise attach later jobs to the
    first job's run). A resumed run calls .truncate_after(resumed_step) (or the module function
    before creating the logger) so its metrics.jsonl has no duplicate steps.
    """

    def __init__(
        self,
        run_dir: os.PathLike | str,
        cfg_dict: Any = None,
        backend: Optional[str] = None,
        enabled: Optional[bool] = None,
        logger_cfg: Any = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = is_rank0() if enabled is None else bool(enabled)
        if logger_cfg is None:
            logger_cfg = _field(cfg_dict, "logger", None)
        if isinstance(backend, Enum):
            backend = backend.value
        backend = backend or _get(logger_cfg, "backend", None) or "none"
        if backend not in ("none", "wandb", "tensorboard"):
            raise LlmxError(f"unknown logger backend {backend!r}; valid: none, wandb, tensorboard")
        self.backend = backend
        self._sinks: list = []
        self._closed = False
        if not self.enabled:
            return
        self._sinks.append(_JsonlSink(self.run_dir))
        try:
            if backend == "wandb":
                self._sinks.append(_WandbSink(self.run_dir, plain_config(cfg_dict), logger_cfg))
            elif backend == "tensorboard":
                self._sinks.append(_TensorBoardSink(self.run_dir))
        except BaseException:
            self.close(failed=True)
            raise

    def truncate_after(self, step: int) -> int:
        """Drop logged lines with step > `step` (on resume); the number dropped, 0 off rank 0."""
        for sink in self._sinks:
            if isinstance(sink, _JsonlSink):
                return sink.truncate_after(step)
        return 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self._sinks:
            return
        metrics = _plain(metrics)
        for sink in self._sinks:
            sink.log(int(step), metrics)

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        """Write run_dir/final.json (atomically: a report never sees half of it) and put the
        numbers in the tracker's summary."""
        if not self._sinks:
            return
        metrics = _plain(metrics)
        atomic_write_json(self.run_dir / FINAL_FILE, metrics)
        for sink in self._sinks:
            sink.log_final(metrics)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        # Close every sink even if one fails, so W&B is finished whatever happened before.
        for sink in reversed(self._sinks):
            try:
                sink.close(failed=failed)
            except Exception as exc:  # noqa: PERF203
                errors.append(exc)
        self._sinks = []
        if errors:
            raise errors[0]

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None)
        return False
