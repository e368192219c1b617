"""Reading and writing Hugging Face checkpoints one tensor at a time.

Reading. A model directory holds `model.safetensors`, or `model.safetensors.index.json` and the shards
its weight map names (`model-00001-of-00003.safetensors`, ...), or, only with allow_pickle=True,
`pytorch_model.bin[.index.json]`. The safetensors format is an 8-byte little-endian header length N, N
bytes of JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the
tensor bytes, offsets relative to the end of the header. `open_checkpoint` parses every header and checks
each file before any tensor is read: a shard named by the index but absent, a header that describes more
bytes than the file has (a truncated download), or fewer (trailing bytes), a tensor whose byte range does
not match its dtype and shape, an unknown dtype. Problems are collected, not raised, so that the caller
can report every input's problems in one error.

A tensor is read with one positioned read (os.preadv) of exactly its bytes into a fresh buffer. The files
are not memory-mapped (as safetensors.safe_open does): the pages of a mapped file that a merge has touched
stay in the process's resident set until the mapping is closed, so a streaming merge through mappings
shows a resident size that grows with the model; plain reads leave those pages in the kernel's page cache,
outside the process.

Hashing (`FileHashes`). Each file's SHA-256 is computed on background threads (one per core, up to 4:
hashlib and file reads release the GIL), each thread reading the file itself in order, so that hashing
runs beside the merge's arithmetic and never sees a buffer the arithmetic changes. Inputs are queued in the
order the merge reads them, so both read the same pages of the page cache at about the same time; output
shards are fsynced and hashed as soon as each is complete. A hash is not computed when it is already known:
  - a file in a Hugging Face hub cache is a link to `blobs/<sha256 of the file>` (LFS files): that name;
  - the hash cache ($LLMX_CACHE/merge_sha256.json) holds each file hashed before, keyed by its real path,
    size, modification time (ns), inode and device; a file changed since has another size or time. Pass
    hash_cache=False to recompute (a file rewritten with its old size and time restored would fool it).
The manifest records where each hash came from ("computed", "cache", "hf_blob").

Pickle weights (`pytorch_model.bin`) are refused unless allow_pickle=True; then each file is loaded with
torch.load(weights_only=True, mmap=True), which unpickles only tensors and plain containers, never
arbitrary objects, and maps the tensor data instead of reading it.

Writing. `ShardedWriter` takes the complete list of output tensors (names, dtypes, shapes) up front, so
the shard boundaries and every shard's header are known before the first tensor arrives: each tensor's
bytes are written straight to their final place and nothing is buffered beyond the tensor in hand. A new
shard starts when the next tensor would take the current one past the byte limit (a tensor larger than the
limit gets a shard of its own). Names follow Hugging Face: `model.safetensors` when there is one shard,
else `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` ({"metadata": {"total_size":
bytes of tensor data}, "weight_map": {name: file}}).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers

# safetensors dtype codes <-> torch dtypes
DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
CODES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes in `size`: an int, or a string like "5GB" (powers of 10, as Hugging Face) or "500MiB"."""
    if isinstance(size, bool):
        raise ValueError(f"not a size: {size!r}")
    if isinstance(size, (int, float)):
        n = int(size)
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ValueError(f"not a size: {size!r}; valid: a number of bytes or a number with a unit "
                             "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 5GB, 500MB)")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise ValueError(f"size must be positive: {size!r}")
    return n


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range (safetensors), or a loaded state dict."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    file: Path
    start: int = 0  # absolute offsets in `file` (safetensors only)
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_SHA_NAME = re.compile(r"^[0-9a-f]{64}$")


def _file_key(path: Path) -> Tuple[str, Dict[str, int]]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


class Growing:
    """A file being written: how many bytes of it are final, and whether it is complete (for FileHashes to
    hash it while it is written)."""

    def __init__(self):
        self._cond = threading.Condition()
        self.size, self.done = 0, False

    def advance(self, size: int, done: bool = False) -> None:
        with self._cond:
            self.size, self.done = size, self.done or done
            self._cond.notify_all()

    def wait_beyond(self, pos: int) -> Tuple[int, bool]:
        with self._cond:
            while self.size <= pos and not self.done:
                self._cond.wait()
            return self.size, self.done


class FileHashes:
    """SHA-256 of whole files on `threads` background threads, reusing hashes already known (see the module
    docstring). submit(path) queues a file (optionally fsyncing it first); result(path) waits for its hash."""

    def __init__(self, threads: Optional[int] = None, cache: Optional[Path] = None, reuse: bool = True):
        self.reuse = reuse  # False: compute every hash (neither hub blob names nor the cache are read)
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llmx-merge-hash")
        self._futures: Dict[Path, Future] = {}
        self.sources: Dict[Path, str] = {}
        self.cache_path = cache
        self._cache: Dict[str, dict] = {}
        if reuse and cache is not None and cache.is_file():
            try:
                self._cache = json.loads(cache.read_text())
            except (OSError, ValueError):  # a damaged cache is only a cache
                self._cache = {}
        self._local = threading.local()

    def _known(self, path: Path) -> Optional[Tuple[str, str]]:
        target = path.resolve()
        if path.is_symlink() and target.parent.name == "blobs" and _SHA_NAME.match(target.name):
            return target.name, "hf_blob"
        key, stat = _file_key(path)
        entry = self._cache.get(key)
        if entry and all(entry.get(k) == v for k, v in stat.items()) and _SHA_NAME.match(str(entry.get("sha256"))):
            return entry["sha256"], "cache"
        return None

    def submit(self, path: Path, *, fsync: bool = False, reuse: bool = True,
               growing: Optional[Growing] = None) -> None:
        """Queue `path`'s hash. fsync: fsync it once hashed. growing: the file is being written; hash its
        bytes as they become final (the thread follows the writer), and finish when it is complete."""
        known = self._known(path) if self.reuse and reuse and not fsync and growing is None else None
        if known is not None:
            fut: Future = Future()
            fut.set_result(known[0])
            self._futures[path], self.sources[path] = fut, known[1]
        else:
            self._futures[path] = self._pool.submit(self._hash, path, fsync, growing)
            self.sources[path] = "computed"

    def _hash(self, path: Path, fsync: bool, growing: Optional[Growing]) -> str:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(2**20)  # reused: fresh memory per block would fault pages
        h, mv = hashlib.sha256(), memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            pos, done = 0, growing is None
            while True:
                limit = None
                if not done:
                    limit, done = growing.wait_beyond(pos)
                n = f.readinto(mv if limit is None else mv[:min(len(buf), limit - pos)])
                if not n:
                    if done:
                        break
                    continue
                h.update(mv[:n])
                pos += n
            if fsync:
                os.fsync(f.fileno())
        return h.hexdigest()

    def result(self, path: Path) -> str:
        return self._futures[path].result()

    def remember(self, items: Iterable[Tuple[Path, str]]) -> None:
        """Add (file, sha256) pairs to the hash cache file (merged with what other processes wrote)."""
        if self.cache_path is None:
            return
        try:
            current = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        except (OSError, ValueError):
            current = {}
        current = {k: v for k, v in current.items() if os.path.exists(k)}  # files since deleted
        for path, digest in items:
            key, stat = _file_key(path)
            current[key] = {**stat, "sha256": digest}
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(current))
            os.replace(tmp, self.cache_path)
        except OSError:  # a read-only cache directory costs only the reuse
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _FileState:
    """An open safetensors file: its descriptor, opened on first read."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done, n = 0, buf.nbytes
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (the file changed or is "
                          "truncated)")
        done += got


def read_safetensors_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str], int, List[str]]:
    """Parse and check one safetensors file's header: (tensors, metadata, data start, problems)."""
    problems: List[str] = []
    size = path.stat().st_size
    if size < 8:
        return {}, {}, 0, [f"{path}: {size} bytes, too short to be a safetensors file (truncated?)"]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            return {}, {}, 0, [f"{path}: header length {n} does not fit the file's {size} bytes "
                               "(truncated, or not a safetensors file)"]
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return {}, {}, 0, [f"{path}: unreadable safetensors header ({e}); the file is damaged or not safetensors"]
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    tensors: Dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            code, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: tensor {name!r} has a malformed header entry {entry!r}")
            continue
        if code not in DTYPES:
            problems.append(f"{path}: tensor {name!r} has dtype {code}, which llmx.merge does not handle "
                            f"(handled: {', '.join(sorted(DTYPES))})")
            continue
        info = TensorInfo(name, DTYPES[code], shape, path, base + int(b), base + int(e))
        if info.end - info.start != info.nbytes or b < 0:
            problems.append(f"{path}: tensor {name!r} spans bytes [{b}, {e}) but {code} {list(shape)} needs "
                            f"{info.nbytes}")
            continue
        tensors[name] = info
        data_end = max(data_end, int(e))
    if base + data_end > size:
        problems.append(f"{path}: truncated: the header describes {base + data_end} bytes but the file has "
                        f"{size} (an interrupted download or copy?)")
    elif base + data_end < size:
        problems.append(f"{path}: {size - base - data_end} bytes after the last tensor that the header does "
                        "not describe (a damaged file)")
    return tensors, metadata, base, problems


@dataclass
class Checkpoint:
    """One input model directory: its tensors (name -> TensorInfo) and config, read lazily.

    `problems` lists what is wrong with it (missing files, truncation, ...); a checkpoint with problems
    must not be read. Use as a context manager or call close()."""

    path: Path
    role: str
    kind: str = "safetensors"  # or "pickle"
    files: List[Path] = field(default_factory=list)
    tensors: Dict[str, TensorInfo] = field(default_factory=dict)
    config: Optional[dict] = None
    problems: List[str] = field(default_factory=list)
    aliases: Dict[str, str] = field(default_factory=dict)  # virtual name -> stored name (tied lm_head)
    weight_map: Optional[Dict[str, str]] = None  # the index's, when there is one
    _states: Dict[Path, _FileState] = field(default_factory=dict)
    _pickled: Dict[Path, dict] = field(default_factory=dict)

    # ---- reading
    def info(self, name: str) -> TensorInfo:
        return self.tensors[self.aliases.get(name, name)]

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`name` (or only its rows [a, b) along dim 0) as a tensor safe to modify in place: a fresh one,
        or a view of `out` (a flat uint8 buffer of at least the bytes needed, reused between calls)."""
        info = self.info(name)
        shape, lo, hi = info.shape, 0, info.nbytes  # byte range within the tensor
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            lo, hi = rows[0] * row_bytes, rows[1] * row_bytes
            shape = (rows[1] - rows[0],) + tuple(shape[1:])
        start, end = info.start + lo, info.start + hi
        buf = out[:hi - lo] if out is not None else torch.empty(hi - lo, dtype=torch.uint8)
        if self.kind == "pickle":
            t = self._pickled[info.file][info.name]
            t = t[rows[0]:rows[1]] if rows else t
            view = buf.view(info.dtype).reshape(shape)
            view.copy_(t)
            return view
        if end > start:
            _pread_into(self._state(info.file).open(), memoryview(buf.numpy()), start, info.file)
        return buf.view(info.dtype).reshape(shape)

    def _state(self, path: Path) -> _FileState:
        st = self._states.get(path)
        if st is None:
            st = self._states[path] = _FileState(path)
        return st

    def close(self) -> None:
        for st in self._states.values():
            st.close()
        self._pickled.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def open_checkpoint(path, role: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Find and check the weights of the model directory `path` (see the module docstring).

    Never raises for bad input: the returned Checkpoint's `problems` says what is wrong."""
    p = Path(path).expanduser()
    ck = Checkpoint(path=p.resolve() if p.exists() else p, role=role)
    label = f"{role} ({p})"
    valid = (f"a Hugging Face model directory with {SAFE_SINGLE}, or {SAFE_INDEX} and its shards "
             f"(or {PICKLE_SINGLE} / {PICKLE_INDEX} with allow_pickle=True)")
    if not p.exists():
        ck.problems.append(f"{label}: no such directory; expected {valid}")
        return ck
    if not p.is_dir():
        ck.problems.append(f"{label}: not a directory; expected {valid}")
        return ck
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            ck.config = json.loads(cfg.read_text())
        except ValueError as e:
            ck.problems.append(f"{label}: config.json is not valid JSON ({e})")
    else:
        ck.problems.append(f"{label}: no config.json (needed to check the architecture and to write the "
                           "output's config)")

    if (p / SAFE_INDEX).is_file():
        _open_indexed(ck, p / SAFE_INDEX, label, pickle=False)
    elif (p / SAFE_SINGLE).is_file():
        ck.files = [p / SAFE_SINGLE]
    elif (p / PICKLE_INDEX).is_file() or (p / PICKLE_SINGLE).is_file():
        found = PICKLE_INDEX if (p / PICKLE_INDEX).is_file() else PICKLE_SINGLE
        if not allow_pickle:
            ck.problems.append(f"{label}: has only pickle weights ({found}); pickle files can run code when "
                               "loaded, so they are refused. Convert them to safetensors, or pass "
                               "allow_pickle=True (config: merge.allow_pickle=true) to load them with "
                               "torch.load(weights_only=True)")
            return ck
        ck.kind = "pickle"
        if found == PICKLE_INDEX:
            _open_indexed(ck, p / PICKLE_INDEX, label, pickle=True)
        else:
            ck.files = [p / PICKLE_SINGLE]
    else:
        others = sorted(f.name for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(others)}, but no {SAFE_SINGLE} or {SAFE_INDEX})" if others else ""
        ck.problems.append(f"{label}: no model weights{hint}; expected {valid}")
        return ck
    if ck.problems:
        return ck

    for f in ck.files:
        if ck.kind == "safetensors":
            tensors, _, _, problems = read_safetensors_header(f)
            ck.problems += [f"{role}: {m}" for m in problems]
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # unpickling errors, legacy (non-zip) format, truncation
                ck.problems.append(f"{label}: could not load {f.name} with torch.load(weights_only=True, "
                                   f"mmap=True): {type(e).__name__}: {e}")
                continue
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                ck.problems.append(f"{label}: {f.name} is not a flat state dict of tensors")
                continue
            ck._pickled[f] = sd
            tensors = {k: TensorInfo(k, v.dtype, tuple(v.shape), f) for k, v in sd.items()}
        for name, info in tensors.items():
            if name in ck.tensors:
                ck.problems.append(f"{label}: tensor {name!r} is stored twice ({ck.tensors[name].file.name} and "
                                   f"{f.name})")
            ck.tensors[name] = info
    if ck.kind == "safetensors" and not ck.problems and not ck.tensors:
        ck.problems.append(f"{label}: the weight files hold no tensors")
    if ck.weight_map is not None and not ck.problems:
        wm = ck.weight_map
        missing = [n for n in wm if n not in ck.tensors]
        wrong = [n for n, f in wm.items() if n in ck.tensors and ck.tensors[n].file.name != Path(f).name]
        unlisted = [n for n in ck.tensors if n not in wm]
        if missing:
            ck.problems.append(f"{label}: the index names tensors that are in none of its files: {_list(missing)}")
        if wrong:
            ck.problems.append(f"{label}: the index puts tensors in the wrong files: {_list(wrong)}")
        if unlisted:
            ck.problems.append(f"{label}: tensors in the shards but not in the index: {_list(unlisted)}")
    return ck


def _open_indexed(ck: Checkpoint, index: Path, label: str, *, pickle: bool) -> None:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if not isinstance(wm, dict):
            raise ValueError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        ck.problems.append(f"{label}: {index.name} is not a valid index ({type(e).__name__}: {e})")
        return
    files = sorted(set(wm.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        ck.problems.append(f"{label}: {index.name} names {len(files)} shard(s); missing: {', '.join(missing)}")
        return
    ck.files = [index.parent / f for f in files]
    ck.weight_map = wm  # checked against the shards' contents once they are read


def ordered_names(ck: Checkpoint) -> List[str]:
    """Tensor names in the order their bytes lie on disk (file order, then offset)."""
    order = {f: i for i, f in enumerate(ck.files)}
    return sorted(ck.tensors, key=lambda n: (order.get(ck.tensors[n].file, 0), ck.tensors[n].start, n))


# ---------------------------------------------------------------------------------------------- writing


WRITEBACK_BYTES = 64 * 2**20
GROWING_STEP = 8 * 2**20


def _sync_file_range() -> Optional[Callable[[int, int, int], None]]:
    """Linux sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): start writeback of a range, without
    waiting for it. None where unavailable (then the final fsync does all the work)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, n: fn(fd, offset, n, 2)


@dataclass
class _Shard:
    name: str
    entries: List[Tuple[str, str, Tuple[int, ...], int, int]]  # name, code, shape, begin, end (data offsets)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return self.entries[-1][4] if self.entries else 0


class ShardedWriter:
    """Write safetensors shards for a fixed plan [(name, dtype, shape), ...], tensor by tensor, in order."""

    def __init__(self, out_dir: Path, plan: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], shard_size: int,
                 *, on_open: Optional[Callable[[Path], Optional[Growing]]] = None, writeback: bool = False):
        self.out_dir, self.on_open = Path(out_dir), on_open
        self._growing: Optional[Growing] = None
        self._announced = 0
        self._writeback = _sync_file_range() if writeback else None
        self._flushed = self._pos = 0  # bytes of the current shard handed to the disk / written
        shards: List[List[Tuple[str, str, Tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            n = math.prod(shape) * _itemsize(dtype)
            if shards[-1] and used + n > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, CODES[dtype], tuple(shape), n))
            used += n
        total = len(shards)
        self.shards: List[_Shard] = []
        for k, entries in enumerate(shards):
            fname = SAFE_SINGLE if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            off, rows = 0, []
            for name, code, shape, n in entries:
                rows.append((name, code, shape, off, off + n))
                off += n
            header = {"__metadata__": {"format": "pt"}}
            header.update({name: {"dtype": code, "shape": list(shape), "data_offsets": [b, e]}
                           for name, code, shape, b, e in rows})
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned, as the safetensors library does
            self.shards.append(_Shard(fname, rows, raw))
        self.total_size = sum(s.data_bytes for s in self.shards)
        self._k, self._i, self._rows = 0, 0, 0  # current shard, next entry in it, its rows written
        self._f = None
        self.sizes: Dict[str, int] = {}

    def _open_next(self) -> None:
        shard = self.shards[self._k]
        self._f = open(self.out_dir / shard.name, "wb", buffering=0)
        if self.on_open is not None:  # e.g. hash it on another thread while it is written
            self._growing = self.on_open(self.out_dir / shard.name)
        self._write(struct.pack("<Q", len(shard.header)) + shard.header)

    def _write(self, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            done += self._f.write(mv[done:])
        self._pos += done
        if self._growing is not None and self._pos - self._announced >= GROWING_STEP:
            self._growing.advance(self._pos)
            self._announced = self._pos
        if self._writeback is not None and self._pos - self._flushed >= WRITEBACK_BYTES:
            # Start writing this range to disk now (without waiting), so that the fsync at the end has little
            # left to wait for and the kernel never throttles the writes for too many dirty pages.
            self._writeback(self._f.fileno(), self._flushed, self._pos - self._flushed)
            self._flushed = self._pos

    def _close_current(self) -> None:
        shard = self.shards[self._k]
        self._f.close()
        self._f = None
        if self._growing is not None:
            self._growing.advance(self._pos, done=True)
        self._growing, self._flushed, self._pos, self._announced = None, 0, 0, 0
        self.sizes[shard.name] = 8 + len(shard.header) + shard.data_bytes
        self._k += 1
        self._i = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan, whole or in consecutive pieces along dim 0 (rows)."""
        if self._k >= len(self.shards):
            raise RuntimeError(f"ShardedWriter: {name!r} is beyond the plan")
        if self._f is None:
            self._open_next()
        ename, code, shape, b, e = self.shards[self._k].entries[self._i]
        whole = tuple(tensor.shape) == shape
        piece = (len(shape) >= 1 and tensor.dim() == len(shape) and tuple(tensor.shape[1:]) == shape[1:]
                 and self._rows + tensor.shape[0] <= shape[0])
        if name != ename or CODES.get(tensor.dtype) != code or not (whole and self._rows == 0 or piece):
            raise RuntimeError(f"ShardedWriter: got {name!r} {tensor.dtype} {list(tensor.shape)} (after "
                               f"{self._rows} rows), the plan expects {ename!r} {code} {list(shape)} next")
        t = tensor.contiguous()
        if t.numel():
            self._write(t.reshape(-1).view(torch.uint8).numpy())
        self._rows += tensor.shape[0] if len(shape) else 1
        if self._rows >= (shape[0] if len(shape) else 1):
            self._rows = 0
            self._i += 1
            if self._i == len(self.shards[self._k].entries):
                self._close_current()

    def close(self) -> Dict[str, object]:
        """Check that the whole plan was written; write the index (several shards). Returns the layout."""
        if self._f is not None or self._k != len(self.shards):
            raise RuntimeError(f"ShardedWriter: closed after {self._k} of {len(self.shards)} shards")
        files = [s.name for s in self.shards]
        if len(files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: s.name for s in self.shards for name, *_ in s.entries}}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return {"files": [{"name": f, "bytes": self.sizes[f]} for f in files],
                "total_size": self.total_size, "index": SAFE_INDEX if len(files) > 1 else None}

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._growing is not None:  # let a thread following the file finish
            self._growing.advance(self._pos, done=True)
