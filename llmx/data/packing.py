"""Tokenize documents and pack them into fixed-length blocks; cache the result as Arrow.

Packing: every document is tokenized without special tokens, followed by one EOS token, and the
documents are concatenated in order into a single stream that is cut into blocks of data.seq_len
tokens. Only the final partial block is dropped (not one remainder per document or per map batch),
so the blocks are exactly a prefix of the token stream. Attention crosses document boundaries inside
a block, as in GPT-2/nanoGPT-style pretraining; the EOS token marks where a new document starts.

Caching (non-streaming sources): the packed blocks of each split are saved with
`Dataset.save_to_disk` under `cache_dir/datasets/<key>/`, where the key hashes the documents' key
(content, or file paths + sizes + mtimes: see llmx.data.sources), the tokenizer's fingerprint,
seq_len, the split and FORMAT_VERSION. The directory is written under a temporary name and renamed,
so it is complete whenever it exists, and concurrent builders (several ranks) at worst duplicate
work. The whole split is tokenized in memory (about 4 bytes per token after packing); corpora that
do not fit belong on the streaming path. The validation cap (data.val_max_sequences) is applied
when loading, so changing it does not re-tokenize.

Streaming (`data.source=hub` with `data.streaming=true`): the train split is an iterable that
tokenizes and packs as it reads. Its state is the number of blocks consumed in the current pass;
resuming re-reads and re-tokenizes the stream up to that point and skips those blocks, which is
exact (the stream is deterministic) but costs time proportional to the position. The validation
split is the first val_max_sequences blocks of its stream, held in memory.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch

from llmx.config.schema import DataSource
from llmx.data.sources import TRAIN, VALIDATION, as_data_config, documents, release_splits
from llmx.data.tokenizer import tokenizer_fingerprint
from llmx.utils import LlmxError, atomic_write_json, cache_dir, publish_dir, sha256_text

FORMAT_VERSION = 1
COLUMN = "input_ids"


class PackedDataset(torch.utils.data.Dataset):
    """Map-style view of packed blocks: `ds[i]` is a LongTensor of shape [seq_len].

    Wraps a (memory-mapped) `datasets.Dataset` with one fixed-size list column; `hf` is that dataset.
    `cache_path` is where it lives on disk (None when in memory) and `from_cache` says whether the
    build found it there. `limit` caps the number of blocks visible: the first `limit` (the validation cap), or with
    `spread` `limit` blocks evenly spaced over the whole set (the training cap, so that a subset still covers every
    part of a corpus stored document by document).
    """

    def __init__(self, hf, seq_len: int, limit: Optional[int] = None, cache_path: Optional[Path] = None,
                 from_cache: bool = False, meta: Optional[Dict[str, Any]] = None, spread: bool = False):
        self.hf = hf
        self._rows = hf.with_format("numpy")
        self.seq_len = seq_len
        self._len = len(hf) if limit is None else min(len(hf), max(limit, 0))
        self.spread = spread and self._len < len(hf)
        self.cache_path = cache_path
        self.from_cache = from_cache
        self.meta = meta or {}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"block {i} out of range for {self._len} blocks")
        if self.spread:
            i = i * len(self.hf) // self._len
        return torch.from_numpy(np.asarray(self._rows[i][COLUMN], dtype=np.int64))

    def __repr__(self) -> str:
        return f"PackedDataset({self._len} blocks x {self.seq_len} tokens, cache={self.cache_path})"


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Iterable of packed LongTensor blocks [seq_len] over a document stream, resumable by block count.

    `state_dict()` is {"blocks": n}, the blocks consumed in the current pass; after
    `load_state_dict`, the next `iter()` skips (re-tokenizing) the first n blocks. Iterate from one
    consumer at a time (no DataLoader workers): the count is kept on this object.
    """

    def __init__(self, load_docs: Callable[[], Iterable[str]], tokenizer, seq_len: int, docs_per_batch: int = 64):
        self._load_docs = load_docs
        self._encode = _encoder(tokenizer)
        self.seq_len = seq_len
        self._docs_per_batch = docs_per_batch
        self._start = 0
        self._position = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, self._start, self._position = self._start, 0, 0
        for block in _stream_blocks(self._load_docs(), self._encode, self.seq_len, self._docs_per_batch):
            self._position += 1
            if self._position > start:
                yield torch.from_numpy(block)

    def state_dict(self) -> Dict[str, int]:
        return {"blocks": self._position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._start = self._position = int(state["blocks"])


def _encoder(tokenizer) -> Callable[[List[str]], List[List[int]]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LlmxError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token, needed to separate documents")

    def encode(texts: List[str]) -> List[List[int]]:
        # verbose=False: pretrained tokenizers warn about documents longer than model_max_length,
        # which is irrelevant here since documents are cut into blocks.
        ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [x + [eos] for x in ids]

    return encode


def _stream_blocks(docs: Iterable[str], encode, seq_len: int, docs_per_batch: int) -> Iterator[np.ndarray]:
    buf: List[int] = []
    it = iter(docs)
    while batch := list(islice(it, docs_per_batch)):
        for ids in encode(batch):
            buf.extend(ids)
        # One slice per block and one compaction per batch keeps long documents linear-time.
        n = len(buf) // seq_len
        for b in range(n):
            yield np.asarray(buf[b * seq_len:(b + 1) * seq_len], dtype=np.int64)
        buf = buf[n * seq_len:]


def _blocks_dataset(flat: np.ndarray, seq_len: int):
    """An in-memory datasets.Dataset with one fixed-size list column from a flat token array."""
    import pyarrow as pa
    from datasets import Dataset

    n = len(flat) // seq_len
    values = pa.array(np.ascontiguousarray(flat[: n * seq_len], dtype=np.int32))
    return Dataset.from_dict({COLUMN: pa.FixedSizeListArray.from_arrays(values, seq_len)})


def _tokenize_and_pack(docs: List[str], tokenizer, seq_len: int, num_proc: int, desc: str):
    import pyarrow.compute as pc
    from datasets import Dataset

    encode = _encoder(tokenizer)
    if not docs:
        return _blocks_dataset(np.zeros(0, np.int32), seq_len), 0
    tokenized = Dataset.from_dict({"text": docs}).map(
        lambda batch: {COLUMN: encode(batch["text"])},
        batched=True,
        batch_size=256,
        remove_columns=["text"],
        num_proc=num_proc if num_proc > 1 else None,
        desc=desc,
    )
    # Flatten the whole split with Arrow (no Python loop), then cut: this drops only the final remainder.
    flat = pc.list_flatten(tokenized.data.column(COLUMN)).to_numpy()
    return _blocks_dataset(flat, seq_len), len(flat)


def _build_split(cfg, split: str, tokenizer, tok_sha: str, limit: Optional[int], spread: bool = False) -> PackedDataset:
    docs = documents(cfg, split)
    key = sha256_text(f"packed-v{FORMAT_VERSION}", docs.key, tok_sha, str(cfg.seq_len), split)[:24]
    root = cache_dir(cfg.cache_dir) / "datasets"
    final = root / key
    from_cache = final.is_dir()
    if not from_cache:
        texts = list(docs.load())
        ds, num_tokens = _tokenize_and_pack(texts, tokenizer, cfg.seq_len, cfg.num_proc, f"tokenizing {split}")
        root.mkdir(parents=True, exist_ok=True)
        with publish_dir(final) as tmp:  # a concurrent builder of the same key may win: same content
            ds.save_to_disk(str(tmp))
            atomic_write_json(
                Path(tmp) / "llmx_meta.json",
                {
                    "format_version": FORMAT_VERSION,
                    "split": split,
                    "seq_len": cfg.seq_len,
                    "documents": len(texts),
                    "tokens": num_tokens,
                    "blocks": len(ds),
                    "dropped_tokens": num_tokens - len(ds) * cfg.seq_len,
                    "source_key": docs.key,
                    "tokenizer_sha256": tok_sha,
                },
            )
    from datasets import load_from_disk

    meta = json.loads((final / "llmx_meta.json").read_text())
    return PackedDataset(load_from_disk(str(final)), cfg.seq_len, limit, final, from_cache, meta, spread=spread)


def build_datasets(data_cfg: Any, tokenizer):
    """(train, validation) packed blocks for data_cfg; see the module docstring.

    Non-streaming: two PackedDataset. Hub streaming: a StreamingPackedDataset and an in-memory
    PackedDataset. Validation holds at most data.val_max_sequences blocks.
    """
    cfg = as_data_config(data_cfg)
    if cfg.seq_len < 1:
        raise LlmxError(f"data.seq_len={cfg.seq_len} must be >= 1")
    if cfg.train_max_sequences is not None and cfg.train_max_sequences < 1:
        raise LlmxError(f"data.train_max_sequences={cfg.train_max_sequences} must be >= 1 (null: every block)")
    if DataSource(cfg.source) is DataSource.hub and cfg.streaming:
        if cfg.train_max_sequences is not None:
            raise LlmxError("data.train_max_sequences needs map-style data; a streamed hub dataset is read in order "
                            "(cap the run with trainer.max_steps instead)")
        train = StreamingPackedDataset(documents(cfg, TRAIN).load, tokenizer, cfg.seq_len)
        val_stream = StreamingPackedDataset(documents(cfg, VALIDATION).load, tokenizer, cfg.seq_len)
        blocks = [b.numpy() for b in islice(val_stream, max(cfg.val_max_sequences, 0))]
        flat = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
        return train, PackedDataset(_blocks_dataset(flat, cfg.seq_len), cfg.seq_len)
    tok_sha = tokenizer_fingerprint(tokenizer)
    train = _build_split(cfg, TRAIN, tokenizer, tok_sha, cfg.train_max_sequences, spread=True)
    val = _build_split(cfg, VALIDATION, tokenizer, tok_sha, cfg.val_max_sequences)
    release_splits()
    return train, val
