"""Benchmark decontamination for NaturalReasoning's synthesized questions (Yuan et al., 2025, arXiv 2502.13124).

The paper decontaminates against MATH, GPQA, MMLU-Pro and MMLU-STEM with "standard 13-gram decontamination":
a question is removed when it shares a run of 13 consecutive words with a benchmark item. Words come from the
same normaliser as deduplication (llmx.reasoning.dedup.normalize), so case, punctuation and spacing never hide
an overlap.

Benchmark files are read in their released formats (`load_benchmark`); the text of a benchmark item is what a
model is shown when tested, never the answer key or a worked solution (a generated question that quotes a
solution is not a copy of the test item, and long solutions would add spurious overlaps):
  math          the problem                                   (hendrycks MATH: one .json per problem, a directory
                                                               of them, or jsonl/json/parquet with "problem")
  gpqa          the question and its four answers             (the released CSV: "Question", "Correct Answer",
                                                               "Incorrect Answer 1..3")
  mmlu_pro      the question and its options                  (parquet or jsonl: "question", "options")
  mmlu          the question and its choices (e.g. MMLU-STEM) (parquet or jsonl: "question", "choices")
  gsm_infinite  the problem and the question                  (a directory written by llmx's generate-bench
                                                               recipe for gsm_infinite: manifest.json + data)

Texts shorter than n words: such a text is a single n-gram of its own length, on both sides, so it is caught
only by an identical (normalised) short benchmark item, never by appearing inside a longer one: a phrase of a
few words inside a long text is too common to call contamination.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from llmx.reasoning.dedup import normalize, word_ngrams
from llmx.utils import LlmxError

DEFAULT_N = 13  # the paper's "standard 13-gram decontamination"

FORMATS = {
    "math": "MATH (hendrycks .json per problem, a directory of them, or jsonl/json/parquet with 'problem')",
    "gpqa": "GPQA (released .csv with 'Question', 'Correct Answer', 'Incorrect Answer 1..3')",
    "mmlu_pro": "MMLU-Pro (parquet or jsonl with 'question', 'options')",
    "mmlu": "MMLU (parquet or jsonl with 'question', 'choices')",
    "gsm_infinite": "GSM-Infinite (a directory written by llmx's generate-bench recipe, with manifest.json)",
}


@dataclass
class Benchmark:
    name: str
    texts: List[str]
    ids: List[str]  # the benchmark's own item names where it has them (file, question_id, id), else positions
    format: str
    path: str


def _formats_line() -> str:
    return "; ".join(FORMATS.values())


def _bad(path: Path, why: str) -> LlmxError:
    return LlmxError(f"benchmark file {path}: {why}. Valid formats: {_formats_line()}")


def _read_records(path: Path) -> List[Dict[str, Any]]:
    """The records of one file, by extension; anything unreadable is an LlmxError naming the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else [data]
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise _bad(path, f"cannot be read as {suffix[1:]} ({type(e).__name__}: {e})") from None
    except Exception as e:  # pyarrow's own errors (ArrowInvalid) are not ValueErrors in every version
        if type(e).__module__.startswith("pyarrow"):
            raise _bad(path, f"cannot be read as parquet ({e})") from None
        raise
    raise _bad(path, f"unknown file type {suffix or '(no extension)'!r}; expected .json, .jsonl, .csv or .parquet")


def _choices_text(question: Any, choices: Any) -> str:
    return "\n".join([str(question)] + [str(c) for c in (choices or [])])


def _detect(path: Path, records: List[Dict[str, Any]]) -> Tuple[str, List[str], List[str]]:
    """(format, texts, ids) from the columns of the records."""
    if not records:
        raise _bad(path, "holds no items")
    if not all(isinstance(r, dict) for r in records):
        raise _bad(path, "items are not objects with named fields")
    keys = set(records[0])

    def ids(*names: str) -> List[str]:
        name = next((n for n in names if n in keys), None)
        return [str(r.get(name, i)) if name else str(i) for i, r in enumerate(records)]

    if {"Question", "Correct Answer"} <= keys:
        answers = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
        texts = [_choices_text(r["Question"], [r.get(a) for a in answers if r.get(a)]) for r in records]
        return "gpqa", texts, ids("Record ID")
    if {"question", "options"} <= keys:
        return "mmlu_pro", [_choices_text(r["question"], r["options"]) for r in records], ids("question_id")
    if {"question", "choices"} <= keys:
        return "mmlu", [_choices_text(r["question"], r["choices"]) for r in records], ids("id")
    if "problem" in keys:
        return "math", [str(r["problem"]) for r in records], ids("unique_id", "id")
    raise _bad(path, f"unknown format: fields {sorted(keys)[:12]} match none of the known formats")


def _math_directory(path: Path) -> Tuple[str, List[str], List[str]]:
    files = sorted(path.rglob("*.json"))
    if not files:
        raise _bad(path, "is a directory with neither manifest.json (GSM-Infinite) nor MATH .json files")
    texts, ids = [], []
    for f in files:
        records = _read_records(f)
        fmt, t, _ = _detect(f, records)
        if fmt != "math":
            raise _bad(f, f"is {fmt}, but a directory of .json files must hold MATH problems")
        texts.extend(t)
        ids.extend([str(f.relative_to(path))] * len(t))
    return "math", texts, ids


def _op_order(split: str) -> Tuple[int, str]:
    return len(split), split  # ops_2 before ops_10


def _gsm_infinite_records(path: Path, manifest: Dict[str, Any]) -> Iterable[Dict[str, Any]]:
    """Every problem of a generated benchmark directory: jsonl where written, else the arrow datasets."""
    arrow = None
    for name in sorted(manifest.get("datasets", {})):
        jsonl = path / "jsonl" / name
        if jsonl.is_dir():
            for f in sorted(jsonl.glob("*.jsonl"), key=lambda p: _op_order(p.stem)):
                yield from _read_records(f)
            continue
        if arrow is None:
            from llmx.bench.dataset import load_bench

            arrow = load_bench(path)[1]
        for split in sorted(arrow[name], key=_op_order):
            yield from arrow[name][split]


def _gsm_infinite(path: Path) -> Tuple[str, List[str], List[str]]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise _bad(path, f"manifest.json cannot be read ({e})") from None
    if manifest.get("generator") != "gsm_infinite":
        raise _bad(path, f"manifest.json names generator {manifest.get('generator')!r}, not 'gsm_infinite'")
    records = list(_gsm_infinite_records(path, manifest))
    if not records:
        raise _bad(path, "holds no problems")
    texts = [f"{r['problem']}\n{r['question']}" for r in records]
    return "gsm_infinite", texts, [str(r.get("id", i)) for i, r in enumerate(records)]


def load_benchmark(path: str | Path, name: Optional[str] = None) -> Benchmark:
    """Read a benchmark in one of FORMATS; `name` (default: the format) labels it in reports."""
    path = Path(path).expanduser()
    if path.is_dir():
        fmt, texts, ids = _gsm_infinite(path) if (path / "manifest.json").exists() else _math_directory(path)
    elif path.is_file():
        fmt, texts, ids = _detect(path, _read_records(path))
    else:
        raise _bad(path, "does not exist")
    if not any(t.strip() for t in texts):
        raise _bad(path, "holds only empty texts")
    return Benchmark(name or fmt, texts, ids, fmt, str(path))


def _hashes(grams: Sequence[str]) -> np.ndarray:
    # A stable 64-bit hash (the index may be built in one process and used in another); every hit is checked
    # against the benchmark text, so a collision can never remove an item.
    return np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                     for g in grams], dtype=np.uint64)


class NgramIndex:
    """The word n-grams of benchmark items: a sorted array of their hashes, each with the first item it is in."""

    def __init__(self, benchmarks: Sequence[Benchmark], n: int = DEFAULT_N):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LlmxError(f"decontamination n={n!r}: must be an int >= 1 (words per n-gram), default {DEFAULT_N}")
        names = [b.name for b in benchmarks]
        if len(set(names)) != len(names):
            twice = sorted({x for x in names if names.count(x) > 1})
            raise LlmxError(f"benchmarks named {twice} more than once; pass name= to load_benchmark to tell them apart")
        self.n = n
        self.benchmarks = list(benchmarks)
        self._items = [(b, j) for b, bench in enumerate(self.benchmarks) for j in range(len(bench.texts))]
        keys, owners = [], []
        for k, (b, j) in enumerate(self._items):
            grams = word_ngrams(normalize(self.benchmarks[b].texts[j]).split(), n)
            keys.append(_hashes(grams))
            owners.append(np.full(len(grams), k, dtype=np.int64))
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        owners_all = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        order = np.lexsort((owners_all, keys_all))  # by hash, then earliest item: keep that one per hash
        keys_all, owners_all = keys_all[order], owners_all[order]
        first = np.ones(len(keys_all), dtype=bool)
        first[1:] = keys_all[1:] != keys_all[:-1]
        self.keys, self.owners = keys_all[first], owners_all[first]

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, text: str) -> Optional[Tuple[int, int, str]]:
        """(benchmark position, item position, n-gram) of the text's first n-gram found in a benchmark, or None."""
        grams = word_ngrams(normalize(text).split(), self.n)
        if not grams or not len(self.keys):
            return None
        hashes = _hashes(grams)
        at = np.minimum(np.searchsorted(self.keys, hashes), len(self.keys) - 1)
        for g in np.flatnonzero(self.keys[at] == hashes):
            b, j = self._items[int(self.owners[at[g]])]
            if grams[g] in word_ngrams(normalize(self.benchmarks[b].texts[j]).split(), self.n):
                return b, j, grams[g]
        return None


@dataclass
class Contamination:
    item: int  # position of the removed text
    benchmark: str
    benchmark_item: int  # position in Benchmark.texts
    benchmark_id: str
    ngram: str  # the first of the text's n-grams found in the benchmark item (normalised words)


@dataclass
class DecontamResult:
    kept: List[int]
    removed: List[Contamination]
    n_input: int
    n: int
    benchmarks: Dict[str, int] = field(default_factory=dict)  # name -> items indexed

    def removed_per_benchmark(self) -> Dict[str, int]:
        counts = {name: 0 for name in self.benchmarks}
        for c in self.removed:
            counts[c.benchmark] += 1
        return counts

    def report(self) -> Dict[str, Any]:
        """Counts per benchmark and every removal (contamination is rare, so the list stays short), JSON-ready."""
        return {
            "stage": "decontaminate",
            "n": self.n,
            "input": self.n_input,
            "kept": len(self.kept),
            "removed": len(self.removed),
            "removed_fraction": round(len(self.removed) / self.n_input, 6) if self.n_input else 0.0,
            "benchmark_items": dict(self.benchmarks),
            "removed_per_benchmark": self.removed_per_benchmark(),
            "removals": [vars(c) for c in self.removed],
        }


def decontaminate(texts: Sequence[str], index: NgramIndex) -> DecontamResult:
    """Keep the texts that share no word n-gram with any benchmark item in `index`."""
    if isinstance(texts, (str, bytes)):
        raise LlmxError("decontaminate expects a list of texts, got a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise LlmxError(f"decontaminate: item {i} is a {type(t).__name__}, not a str")
    kept: List[int] = []
    removed: List[Contamination] = []
    for i, t in enumerate(texts):
        hit = index.find(t)
        if hit is None:
            kept.append(i)
            continue
        b, j, gram = hit
        bench = index.benchmarks[b]
        removed.append(Contamination(i, bench.name, j, bench.ids[j], gram))
    sizes = {b.name: len(b.texts) for b in index.benchmarks}
    return DecontamResult(kept, removed, len(texts), index.n, sizes)
