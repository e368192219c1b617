"""Small helpers shared across llmx: cache location, rank queries, atomic file writes.

Imports only the standard library so that any module (the CLI included) can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional


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
