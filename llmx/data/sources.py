"""Documents: where the training text comes from and which documents are held out for validation.

Every source (`DataSource` in llmx.config.schema) is reduced to the same thing, a `Documents`: a
cache key and a function that yields the documents of one split as plain strings. Tokenizing and
packing (llmx.data.packing) and tokenizer training (llmx.data.tokenizer) never see the source again.

Sources:
* `pydoc`: the embedded snapshot of Python's documentation topics (79 documents, 465k characters).
* `pylib`: the docstrings and comments of the installed standard library and of data.pylib.packages,
  built on first use and cached (llmx.data.pylib; 44M training characters, 14M tokens at vocab 4096).
* `files`, `hub`: local files or a Hugging Face dataset; `synthetic`: a registered generator.

Design choices:
* The split rule (llmx.data.split, for pydoc, pylib, and files or non-streaming hub data without a
  validation file or split): paragraphs are deduplicated across the corpus, then each document is
  held out by a stable hash (sha256, not Python's salted `hash()`) of its key (the topic for pydoc, the
  module path for pylib, the text itself for files and hub data), then every validation paragraph
  that shares a data.overlap_window-character (64) substring with the training text is removed. The
  split is therefore the same in every process and on every machine, does not depend on document
  order, and no validation window occurs in the training text. Explicit validation files
  (data.val_paths), a hub validation split and synthetic generators are taken as they are; a
  streaming hub source without a validation split is held out by hash only (a stream cannot be
  compared with itself).
* The cache key of a source is cheap where reading is expensive: for local files it is each file's
  path, size and mtime (no reading on a cache hit); for the small pydoc corpus and synthetic
  generators it is the content itself, so editing a generator's code invalidates its cache.
* `hub` keeps the real `datasets.load_dataset` path. `data.paths`, when given, are passed as
  `data_files`, which also makes a builder name such as "json" or "parquet" work offline
  (that is how the streaming path is tested without network).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from llmx.config.schema import DataConfig, DataSource
from llmx.data.split import SPLIT_VERSION, split_documents
from llmx.utils import LlmxError, atomic_write_json, cache_dir, publish_dir, sha256_text

PYDOC_CORPUS = Path(__file__).parent / "corpus" / "pydoc_topics.jsonl.gz"
# Text formats may also be gzip-compressed (name ending in .gz); parquet compresses itself.
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
TRAIN, VALIDATION = "train", "validation"


@dataclass
class Documents:
    """The documents of one split. `key` names their content for caching (None: not cacheable)."""

    key: Optional[str]
    load: Callable[[], Iterable[str]]
    streaming: bool = False


def as_data_config(data_cfg: Any) -> DictConfig:
    """Accept the composed `data` node, a `DataConfig` dataclass or a plain dict; return a typed DictConfig."""
    if isinstance(data_cfg, DictConfig):
        return data_cfg
    if dataclasses.is_dataclass(data_cfg):
        return OmegaConf.structured(data_cfg)
    if isinstance(data_cfg, Mapping):
        return OmegaConf.merge(OmegaConf.structured(DataConfig), data_cfg)
    raise TypeError(f"expected a data config (DictConfig, DataConfig or dict), got {type(data_cfg).__name__}")


def stable_fraction(key: str) -> float:
    """Map a string to [0, 1) identically in every process (Python's hash() is salted per process)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


def validation_mask(keys: Sequence[str], val_fraction: float) -> List[bool]:
    """Which documents are held out: those whose stable hash falls below val_fraction.

    With few documents the hash may pick none; then the one with the smallest hash is held out, so
    that a positive val_fraction always yields a validation split (unless there is a single document).
    """
    fractions = [stable_fraction(k) for k in keys]
    mask = [f < val_fraction for f in fractions]
    if val_fraction > 0 and not any(mask) and len(keys) > 1:
        mask[min(range(len(keys)), key=fractions.__getitem__)] = True
    return mask


def documents(data_cfg: Any, split: str) -> Documents:
    """The documents of `split` ("train" or "validation") for data_cfg.source."""
    cfg = as_data_config(data_cfg)
    if split not in (TRAIN, VALIDATION):
        raise ValueError(f"split must be {TRAIN!r} or {VALIDATION!r}, got {split!r}")
    check_split_config(cfg)
    source = DataSource(cfg.source)
    if source is DataSource.pydoc:
        return _pydoc(cfg, split)
    if source is DataSource.pylib:
        return _pylib(cfg, split)
    if source is DataSource.files:
        return _files(cfg, split)
    if source is DataSource.hub:
        return _hub(cfg, split)
    if source is DataSource.synthetic:
        return _synthetic(cfg, split)
    raise LlmxError(f"data.source={source.value} is not supported")


def check_split_config(cfg: DictConfig) -> None:
    """Refuse split settings that cannot work, naming the value and the valid range."""
    if not 0 <= cfg.val_fraction < 1:
        raise LlmxError(f"data.val_fraction={cfg.val_fraction}: must be in [0, 1)")
    if cfg.overlap_window < 8:
        raise LlmxError(f"data.overlap_window={cfg.overlap_window}: must be >= 8 characters (64 is the default)")
    if cfg.dedup_min_chars < 0:
        raise LlmxError(f"data.dedup_min_chars={cfg.dedup_min_chars}: must be >= 0")


def _split_rule(cfg: DictConfig) -> str:
    return f"split-v{SPLIT_VERSION}:{cfg.val_fraction}:{cfg.overlap_window}:{cfg.dedup_min_chars}"


_SPLITS: dict = {}  # (source key, rule) -> (train, validation): the train and validation calls share one split


def release_splits() -> None:
    """Drop the split documents held for the train and validation calls (build_datasets does, when done),
    so that a large local corpus does not stay in memory for the whole run."""
    _SPLITS.clear()


def _held_out(cfg: DictConfig, key: str, load: Callable[[], Sequence[Tuple[str, str]]], split: str) -> List[str]:
    """The `split` documents of (key, text) pairs under the llmx.data.split rule, computed once per process."""
    cache_key = (key, _split_rule(cfg))
    if cache_key not in _SPLITS:
        docs = load()
        train, val, _ = split_documents([k for k, _ in docs], [t for _, t in docs], cfg.val_fraction,
                                        window=cfg.overlap_window, min_dedup_chars=cfg.dedup_min_chars)
        if len(_SPLITS) >= 4:
            _SPLITS.pop(next(iter(_SPLITS)))
        _SPLITS[cache_key] = (train, val)
    train, val = _SPLITS[cache_key]
    return val if split == VALIDATION else train


def _content_key(kind: str, docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return f"{kind}:{len(docs)}:{h.hexdigest()}"


# ---------------------------------------------------------------------------------------------- pydoc


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> tuple:
    """(topic, text) pairs of the embedded corpus, in file order."""
    with gzip.open(PYDOC_CORPUS, "rt", encoding="utf-8") as f:
        return tuple((r["topic"], r["text"]) for r in map(json.loads, f))


def _pydoc(cfg: DictConfig, split: str) -> Documents:
    docs = _held_out(cfg, "pydoc", pydoc_corpus, split)
    return Documents(_content_key("pydoc", docs), lambda: docs)


# ---------------------------------------------------------------------------------------------- pylib


def pylib_split_dir(cfg: DictConfig) -> Path:
    """The cached split of the pylib corpus for this config: {train,validation}.jsonl.gz and stats.json.

    Built once per installed versions (llmx.data.pylib.corpus_dir) and split rule. Training documents
    are stored in the order of their key's hash, so that a prefix (the tokenizer's training text) is a
    sample of every package rather than the alphabetically first ones.
    """
    from llmx.data import pylib

    corpus = pylib.corpus_dir(list(cfg.pylib.packages), cache_dir(cfg.cache_dir), pylib.default_num_proc())
    final = corpus / sha256_text(_split_rule(cfg))[:16]
    if not (final / "stats.json").exists():
        docs = sorted(pylib.load(corpus), key=lambda d: stable_fraction(d[0]))
        train, val, stats = split_documents([k for k, _ in docs], [t for _, t in docs], cfg.val_fraction,
                                            window=cfg.overlap_window, min_dedup_chars=cfg.dedup_min_chars)
        with publish_dir(final) as tmp:
            for name, texts in ((TRAIN, train), (VALIDATION, val)):
                with gzip.open(tmp / f"{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=6) as f:
                    f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
            atomic_write_json(tmp / "stats.json", {"rule": _split_rule(cfg), **stats.as_dict()})
        print(f"llmx: pylib split: {stats.train_chars / 1e6:.1f}M training characters ({stats.train_documents:,} "
              f"modules), {stats.val_chars / 1e6:.2f}M held out; removed {stats.duplicate_chars / 1e6:.1f}M of "
              f"duplicate paragraphs and {stats.leaked_chars / 1e6:.2f}M of held-out text shared with training",
              file=sys.stderr, flush=True)
    return final


def _pylib(cfg: DictConfig, split: str) -> Documents:
    path = pylib_split_dir(cfg) / f"{split}.jsonl.gz"

    def load() -> Iterator[str]:  # lazy: the tokenizer reads only a prefix
        with gzip.open(path, "rt", encoding="utf-8") as f:
            yield from map(json.loads, f)

    return Documents(f"pylib:{path.parent.parent.name}:{path.parent.name}", load)


# ---------------------------------------------------------------------------------------------- files


def _what_exists(pattern: str) -> str:
    """Describe the nearest existing directory above a pattern, for 'no file matches' errors."""
    parent = Path(pattern)
    while parent != parent.parent and (glob.has_magic(str(parent)) or not parent.exists()):
        parent = parent.parent
    if not parent.is_dir():
        return f"{str(parent)!r} is not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir())
    if not entries:
        return f"{str(parent)!r} is empty"
    shown = ", ".join(entries[:10]) + (f" (and {len(entries) - 10} more)" if len(entries) > 10 else "")
    return f"{str(parent)!r} contains: {shown}"


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_EXTENSIONS)


def resolve_paths(patterns: Sequence[str], key: str) -> List[Path]:
    """Expand files, directories (every supported file below) and globs; errors name `key` (e.g. data.paths)."""
    out: List[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
        elif os.path.isdir(pattern):
            matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and _supported(p))
        elif os.path.isfile(pattern):
            matches = [Path(pattern)]
        else:
            matches = []
        if not matches:
            raise LlmxError(f"{key}: no file matches {pattern!r}; {_what_exists(pattern)}")
        for p in matches:
            if not _supported(p):
                raise LlmxError(
                    f"{key}: {str(p)!r} has an unsupported extension; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
                )
            p = p.resolve()
            if p not in out:
                out.append(p)
    return out


def _field(record: Any, field: str, where: str) -> Optional[str]:
    if not isinstance(record, Mapping):
        raise LlmxError(f"{where}: expected a JSON object with field {field!r}, got {type(record).__name__}")
    if field not in record:
        raise LlmxError(f"{where}: no field {field!r} (data.text_field); fields present: {sorted(record)}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise LlmxError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one file, streamed: a .txt file is one document; .jsonl/.json/.parquet give one per record
    (.jsonl line by line and .parquet by record batch, so a multi-GB shard is never held whole).

    Empty and null texts are skipped: they would only add a lone EOS token to the stream.
    """
    for text in _texts(path, text_field):
        if isinstance(text, str) and text:
            yield text


def _texts(path: Path, text_field: str) -> Iterator[Optional[str]]:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    opener: Callable[..., Any] = gzip.open if name.endswith(".gz") else open
    try:
        if base.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            columns = pf.schema_arrow.names
            if text_field not in columns:
                raise LlmxError(f"{path}: no column {text_field!r} (data.text_field); columns present: {columns}")
            for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
                yield from batch.column(0).to_pylist()
        elif base.endswith(".txt"):
            with opener(path, "rt", encoding="utf-8") as f:
                yield f.read()
        elif base.endswith(".jsonl"):
            with opener(path, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise LlmxError(f"{path}:{i}: invalid JSON ({e})") from e
                        yield _field(record, text_field, f"{path}:{i}")
        elif base.endswith(".json"):
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            records = data if isinstance(data, list) else [data]
            yield from (_field(r, text_field, f"{path}[{i}]") for i, r in enumerate(records))
        else:
            raise LlmxError(f"{path}: unsupported extension; supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    except UnicodeDecodeError as e:
        raise LlmxError(f"{path}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise LlmxError(f"{path}: invalid JSON ({e})") from e


def _files(cfg: DictConfig, split: str) -> Documents:
    if not cfg.paths:
        raise LlmxError("data.paths is empty: data.source=files needs at least one file, directory or glob")
    train_files = resolve_paths(list(cfg.paths), "data.paths")
    val_files = resolve_paths(list(cfg.val_paths), "data.val_paths") if cfg.val_paths else []
    hash_split = not val_files
    files = val_files if (split == VALIDATION and val_files) else train_files

    # Stat, not content: a cache hit must not read a large corpus. Both file lists are in the key
    # because with hash splitting the train split depends on which documents went to validation.
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in train_files + val_files]
    split_rule = _split_rule(cfg) if hash_split else "val_paths"
    key = "files:" + sha256_text(json.dumps(stats), cfg.text_field, split_rule, str(len(train_files)))

    def read() -> List[Tuple[str, str]]:
        return [(d, d) for p in train_files for d in read_documents(p, cfg.text_field)]

    def load() -> List[str]:
        if hash_split:
            return _held_out(cfg, key, read, split)
        return [d for p in files for d in read_documents(p, cfg.text_field)]

    return Documents(key, load)


# ------------------------------------------------------------------------------------------------ hub


def _hub(cfg: DictConfig, split: str) -> Documents:
    if not cfg.hub_name:
        raise LlmxError("data.source=hub needs data.hub_name (a dataset on the Hugging Face hub, or a builder such as json)")
    data_files = None
    if cfg.paths:
        data_files = {cfg.hub_split: [str(p) for p in resolve_paths(list(cfg.paths), "data.paths")]}
        if cfg.val_paths and cfg.hub_val_split:
            data_files[cfg.hub_val_split] = [str(p) for p in resolve_paths(list(cfg.val_paths), "data.val_paths")]
    # No validation split on the hub (hub_val_split=null): hold out documents of the train split by hash.
    hash_split = not cfg.hub_val_split
    hub_split = cfg.hub_split if (split == TRAIN or hash_split) else cfg.hub_val_split
    want_val = split == VALIDATION

    def load_split():
        import datasets

        try:
            return datasets.load_dataset(
                cfg.hub_name, cfg.hub_config, data_files=data_files, split=hub_split, streaming=cfg.streaming
            )
        except (ValueError, OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
            raise LlmxError(
                f"data.hub_name={cfg.hub_name!r} (config {cfg.hub_config!r}): could not load split {hub_split!r}: {e}. "
                "Without network access use data.source=files or pydoc; without a validation split set data.hub_val_split=null."
            ) from e

    def texts(rows: Iterable[Mapping], hash_filter: bool) -> Iterator[str]:
        for i, row in enumerate(rows):
            text = _field(row, cfg.text_field, f"data.hub_name={cfg.hub_name!r} split {hub_split!r} row {i}")
            if text and (not hash_filter or (stable_fraction(text) < cfg.val_fraction) == want_val):
                yield text

    if cfg.streaming:
        # No cache key: a remote stream is read as it goes (see StreamingPackedDataset).
        return Documents(None, lambda: texts(load_split(), hash_split), streaming=True)

    ds = load_split()
    if cfg.text_field not in ds.column_names:
        raise LlmxError(
            f"data.hub_name={cfg.hub_name!r}: no column {cfg.text_field!r} (data.text_field); columns present: {ds.column_names}"
        )
    # datasets' own fingerprint identifies the prepared data (builder, files, revision).
    key = "hub:" + sha256_text(ds._fingerprint, cfg.text_field, _split_rule(cfg) if hash_split else "split")

    def load() -> List[str]:
        if hash_split:
            return _held_out(cfg, key, lambda: [(t, t) for t in texts(ds.select_columns([cfg.text_field]), False)], split)
        return list(texts(ds.select_columns([cfg.text_field]), False))

    return Documents(key, load)


# ------------------------------------------------------------------------------------------ synthetic


def _synthetic(cfg: DictConfig, split: str) -> Documents:
    from llmx.data.synthetic import generate

    if not cfg.generator:
        raise LlmxError("data.source=synthetic needs data.generator (a name registered with @register_generator)")
    args = OmegaConf.to_container(cfg.generator_args, resolve=True) if isinstance(cfg.generator_args, DictConfig) else dict(cfg.generator_args)
    seed = int(args.pop("seed", 0))
    docs = generate(cfg.generator, seed, split, args)
    return Documents(_content_key(f"synthetic:{cfg.generator}", docs), lambda: docs)
