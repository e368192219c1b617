"""Train/validation splits that the model never trained on: paragraph dedup, document split, window filter.

Every in-memory source with a held-out fraction (the embedded `pydoc` and `pylib` corpora, `files`
and non-streaming `hub` data without a validation file or split) goes through `split_documents`:

1. Deduplicate at paragraph level. A paragraph is a run of text between blank lines; its identity is
   its text with whitespace runs collapsed. Visiting documents in order, a paragraph seen before is
   removed, except paragraphs shorter than `min_dedup_chars` (headings such as "Examples", which carry
   no window of their own and whose removal would garble the text). Documents are rebuilt with one
   blank line between paragraphs; a document left empty disappears.
2. Split by document: a document is held out when the stable hash of its key falls below
   val_fraction (llmx.data.sources.validation_mask).
3. Remove what still leaks. The overlap measure is the `window`-character substring (64 by default):
   a validation window leaks when it occurs in any training document. Every validation paragraph
   touched by a leaking window is removed, and the validation document is cut at each removed
   paragraph into separate documents, so that no text is joined that was not adjacent before: every
   window of the result was a window of a checked document, and none leaks. Windows are compared by a
   64-bit polynomial hash (mod 2^64); a collision can only remove a paragraph that did not leak, never
   keep one that does. The validation windows' hashes are held in memory (8 bytes per character of
   validation text); the training text is scanned in chunks.

The guarantee, tested in tests/test_data.py for every embedded source and for `data=files`: no
`window`-character substring of any validation document occurs in any training document.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, List, Sequence, Tuple

import numpy as np

SPLIT_VERSION = 1  # part of every cache key that depends on the split
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_CHUNK_CHARS = 1 << 22
_BITMAP_SIZE = 1 << 26


@dataclass
class SplitStats:
    documents: int = 0
    paragraphs: int = 0
    duplicate_paragraphs: int = 0
    duplicate_chars: int = 0
    train_documents: int = 0
    train_chars: int = 0
    val_documents: int = 0  # after cutting at removed paragraphs
    val_chars: int = 0
    leaked_paragraphs: int = 0  # validation paragraphs removed by the window filter
    leaked_chars: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def paragraphs(text: str) -> List[str]:
    return [p for p in (q.strip("\n") for q in _PARAGRAPH_BREAK.split(text)) if p.strip()]


def dedup_paragraphs(docs: Sequence[List[str]], min_chars: int, stats: SplitStats) -> List[List[str]]:
    """Drop every paragraph (of at least min_chars) whose normalised text appeared earlier."""
    seen = set()
    out = []
    for paras in docs:
        kept = []
        for p in paras:
            stats.paragraphs += 1
            norm = " ".join(p.split())
            if len(norm) >= min_chars:
                if norm in seen:
                    stats.duplicate_paragraphs += 1
                    stats.duplicate_chars += len(p)
                    continue
                seen.add(norm)
            kept.append(p)
        out.append(kept)
    return out


# ------------------------------------------------------------------------------------------ windows


def _powers(base: np.uint64, n: int) -> np.ndarray:
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)  # wraps mod 2^64


def window_hashes(text: str, window: int) -> np.ndarray:
    """Hash of text[i:i+window] for every i, as uint64 (empty if the text is shorter than window).

    h(i) = sum_k c[i+k] B^(window-1-k) mod 2^64, from prefix sums of c[k] B^-k: a few vectorised
    passes over the text, whatever the window.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(codes)
    if n < window:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(codes * _powers(_INV, n), dtype=np.uint64, out=prefix[1:])
        return (prefix[window:] - prefix[:-window]) * _powers(_BASE, n)[window - 1:]


def _chunks(texts: Iterable[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    total = 0
    for t in texts:
        batch.append(t)
        total += len(t)
        if total >= size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def hits_in(texts: Iterable[str], wanted: np.ndarray, window: int) -> np.ndarray:
    """The hashes of `wanted` (sorted, unique) that occur as a window inside any of `texts`.

    Texts are hashed in chunks joined by one separator character; windows that span a separator are
    discarded by position, so a window never crosses from one text into the next.
    """
    found = []
    if len(wanted) == 0:
        return np.zeros(0, dtype=np.uint64)
    mask = np.uint64(_BITMAP_SIZE - 1)
    bitmap = np.zeros(_BITMAP_SIZE, dtype=bool)
    bitmap[wanted & mask] = True
    for batch in _chunks(texts, _CHUNK_CHARS):
        h = window_hashes("\0".join(batch), window)
        if len(h) == 0:
            continue
        # Start of each text in the joined string; a window is valid if it stays inside one text.
        starts = np.cumsum([0] + [len(t) + 1 for t in batch[:-1]])
        ends = starts + np.array([len(t) for t in batch])
        valid = np.zeros(len(h), dtype=bool)
        for s, e in zip(starts, ends):
            if e - s >= window:
                valid[s:e - window + 1] = True
        h = h[valid]
        # A bitmap on the low hash bits rejects most windows with one memory access each; only the
        # survivors pay for the binary search.
        h = h[bitmap[h & mask]]
        found.append(h[_member(h, wanted)])
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.uint64)


def shares_window(text: str, sorted_unique: np.ndarray, window: int) -> bool:
    """Whether any window of one short text is among the given hashes (no bitmap: one text, few windows)."""
    return bool(_member(window_hashes(text, window), sorted_unique).any())


def _member(h: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """Which elements of h are in sorted_unique."""
    if len(sorted_unique) == 0:
        return np.zeros(len(h), dtype=bool)
    idx = np.searchsorted(sorted_unique, h)
    idx[idx == len(sorted_unique)] = 0
    return sorted_unique[idx] == h


def _leak_filter(val: List[List[str]], train_texts: Sequence[str], window: int, stats: SplitStats) -> List[str]:
    """Validation documents with every leaking paragraph removed, cut where paragraphs were removed."""
    joined = ["\n\n".join(paras) for paras in val]
    hashes = [window_hashes(t, window) for t in joined]
    wanted = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)
    leaked = hits_in(train_texts, wanted, window)
    out: List[str] = []
    for paras, h in zip(val, hashes):
        bad = _member(h, leaked)
        # Paragraph p spans [lo, hi) of the joined text; it leaks if a bad window starts in (lo - window, hi).
        bad_starts = np.concatenate([[0], np.cumsum(bad)])
        run: List[str] = []
        lo = 0
        for p in paras:
            hi = lo + len(p)
            a, b = max(lo - window + 1, 0), min(hi, len(h))
            if a < b and bad_starts[b] - bad_starts[a] > 0:
                stats.leaked_paragraphs += 1
                stats.leaked_chars += len(p)
                if run:
                    out.append("\n\n".join(run))
                run = []
            else:
                run.append(p)
            lo = hi + 2
        if run:
            out.append("\n\n".join(run))
    return out


def split_documents(keys: Sequence[str], texts: Sequence[str], val_fraction: float, *, window: int = 64,
                    min_dedup_chars: int = 32) -> Tuple[List[str], List[str], SplitStats]:
    """(train documents, validation documents, stats); see the module docstring."""
    from llmx.data.sources import validation_mask

    if len(keys) != len(texts):
        raise ValueError(f"{len(keys)} keys for {len(texts)} texts")
    stats = SplitStats(documents=len(texts))
    deduped = dedup_paragraphs([paragraphs(t) for t in texts], min_dedup_chars, stats)
    kept = [(k, paras) for k, paras in zip(keys, deduped) if paras]
    mask = validation_mask([k for k, _ in kept], val_fraction) if kept else []
    train = ["\n\n".join(paras) for (_, paras), is_val in zip(kept, mask) if not is_val]
    val_paras = [paras for (_, paras), is_val in zip(kept, mask) if is_val]
    val = _leak_filter(val_paras, train, window, stats) if val_paras else []
    stats.train_documents, stats.train_chars = len(train), sum(map(len, train))
    stats.val_documents, stats.val_chars = len(val), sum(map(len, val))
    return train, val, stats
