"""Small helpers shared across llmx: cache location, rank queries, atomic file writes.

Imports only the standard library so that any module (the CLI included) can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional


class LlmxError(Exception):
    """An error caused by the user's input or environment: printed as one clear message, no traceback."""


def cache_dir(override: Optional[str] = None) -> Path:
    """Where llmx caches tokenizers, tokenized datasets and converted models."""
    root = override or os.environ.get("LLMX_CACHE") or os.path.join(Path.home(), ".cache", "llmx")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: os.PathLike | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def add_to_final(run_dir: os.PathLike | str, final: Dict[str, Any], headline: Dict[str, Any]) -> None:
    """Merge a recipe's headline figures into the run's final.json (the trainer's summary, `final` if it wrote
    none), so that `llmx report` tabulates them beside the training figures."""
    path = Path(run_dir) / "final.json"
    merged = json.loads(path.read_text()) if path.is_file() else dict(final)
    atomic_write_json(path, {**merged, **headline})


def enum_value(x: Any) -> Any:
    """A config enum's value (`sparsify.method` -> "sharp"); anything else as it is."""
    return getattr(x, "value", x)


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved, enums as strings); anything else as it is."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def read_format_json(path: os.PathLike | str, fmt: str, missing: str) -> Any:
    """The JSON document at `path`, whose "format" must be `fmt` (an error names both); `missing`: the error
    when there is no such file (what the directory is not)."""
    path = Path(path)
    if not path.is_file():
        raise LlmxError(missing)
    doc = json.loads(path.read_text())
    if doc.get("format") != fmt:
        raise LlmxError(f"{path}: format {doc.get('format')!r}; this llmx reads {fmt!r}")
    return doc


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def publish_dir(final: os.PathLike | str, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory beside `final`; when the block succeeds, rename it to `final`.

    Readers therefore see no directory or a complete one, never a half-written one. A failure inside
    the block removes the temporary directory and leaves any existing `final` untouched.
    replace=False (caches keyed by content): when another process published `final` first, its copy
    is kept and ours dropped. replace=True (exports): an existing `final` is swapped out only once the
    new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() and replace:
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def cached_stage(d: Path, upstream: Dict[str, Any], fn: Callable[[Path], Dict[str, Any]], *,
                 say: Callable[[str], None] = print, is_main: bool = True, all_ranks: bool = False) -> Dict[str, Any]:
    """Run `fn(d)` unless d/stage.json says it ran with the same inputs (`upstream`); returns its summary.

    A rerun in the same directory skips every finished stage; a stage whose inputs changed is refused rather than
    mixed with the new ones. Under torchrun only training stages (all_ranks) run on every rank; data stages run
    on rank 0 while the others wait at the barrier."""
    from llmx.trainer.distributed import barrier

    key = sha256_text(json.dumps(upstream, sort_keys=True, default=str))
    marker = d / "stage.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["key"] != key:
            raise LlmxError(f"{d}: stage {d.name} was produced by a different config; use a new run directory")
        say(f"{d.name}: done in an earlier run")
        return done["summary"]
    d.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {}
    if all_ranks or is_main:
        t0 = time.perf_counter()
        say(f"{d.name} ...")
        summary = fn(d)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        if is_main:
            atomic_write_json(marker, {"key": key, "summary": summary})
        say(f"{d.name}: {json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})}")
    barrier()
    return summary if summary else json.loads(marker.read_text())["summary"]


def save_weights_dir(module, out_dir: os.PathLike | str, fmt: str, config: Dict[str, Any],
                     extra: Optional[Dict[str, Any]] = None) -> Path:
    """A small model as a directory: model.safetensors (every parameter and buffer) and config.json ({"format",
    "config", "extra"}), published atomically as a whole (used by the VQ-VAE and the SAE)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with publish_dir(out, replace=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "config.json", {"format": fmt, "config": config, "extra": dict(extra or {})})
    return out


def load_weights_dir(path: os.PathLike | str, fmt: str, what: str,
                     expect: Optional[Dict[str, Any]] = None) -> tuple:
    """(config, state dict) of a directory written by save_weights_dir, checked before the tensors are read: the
    format, and `expect` (keys of the config or of extra that must have these values). `what` names the kind in
    errors ("vqvae", "sae")."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise LlmxError(f"{what}: {path} is not a saved {what}: {name} missing")
    doc = json.loads((path / "config.json").read_text())
    if doc.get("format") != fmt:
        raise LlmxError(f"{what}: {path}: format {doc.get('format')!r}; this llmx reads {fmt!r}")
    saved = {**doc.get("extra", {}), **doc["config"]}
    for key, want in (expect or {}).items():
        if key not in saved:
            raise LlmxError(f"{what}: {path} records no {key!r} (expected {want!r})")
        if saved[key] != want:
            raise LlmxError(f"{what}: {path} has {key}={saved[key]!r}, expected {want!r}")
    return doc["config"], load_file(str(path / "model.safetensors"))
