"""Documents for the NaturalReasoning pipeline: local files, a hub dataset (DCLM, FineMath), or llmx's offline set,
streamed one document at a time, each with a stable id and a deterministic shard.

A document's id is the first 16 hex digits of the SHA-256 of its text, so the id (and therefore its shard, the
cache keys of every LLM call about it, and the held-out evaluation split) depends only on the text: the same
documents give the same dataset in any order, on any number of shards, and an exact duplicate is one document.

The offline set (`source: builtin`) is what the CPU recipe runs on: worked solutions of GSM-Infinite medium problems
(llmx.bench.gsm_infinite: a problem, its question, a step-by-step solution ending "Answer: N"), documents with
reasoning in them, mixed with sections of the embedded Python documentation, which have none; the judge should keep
the first kind and drop the second.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

from llmx.utils import LlmxError


@dataclass
class Document:
    id: str
    text: str
    meta: Dict[str, Any]  # where it came from; builtin worked problems also carry their answer


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def shard_of(item_id: str, count: int) -> int:
    return int(item_id, 16) % count


def iter_documents(source: str, *, paths: Sequence[str] = (), text_field: str = "text", hub_name: Optional[str] = None,
                   hub_config: Optional[str] = None, split: str = "train", builtin_worked: int = 200,
                   builtin_docs: int = 200, seed: int = 0) -> Iterator[Document]:
    """Every document of the source once (exact duplicates dropped), in the source's order."""
    if source == "files":
        texts = _files(paths, text_field)
    elif source == "hub":
        texts = _hub(hub_name, hub_config, split, text_field, paths)
    elif source == "builtin":
        texts = builtin_documents(builtin_worked, builtin_docs, seed)
    else:
        raise LlmxError(f"synth.docs.source={source!r}; valid: files, hub, builtin")
    seen = set()
    for text, meta in texts:
        i = doc_id(text)
        if i not in seen:
            seen.add(i)
            yield Document(i, text, meta)


def check_source(source: str, paths: Sequence[str], hub_name: Optional[str]) -> None:
    """Fail before any work on a source that cannot give a document."""
    from llmx.data.sources import resolve_paths

    if source == "files":
        if not paths:
            raise LlmxError("synth.docs.paths is empty: source=files needs files, directories or globs")
        resolve_paths(list(paths), "synth.docs.paths")
    elif source == "hub" and not hub_name:
        raise LlmxError("synth.docs.hub_name is required with source=hub (e.g. mlfoundations/dclm-baseline-1.0)")
    elif source not in ("files", "hub", "builtin"):
        raise LlmxError(f"synth.docs.source={source!r}; valid: files, hub, builtin")


def _files(paths: Sequence[str], text_field: str):
    from llmx.data.sources import read_documents, resolve_paths

    files = resolve_paths(list(paths), "synth.docs.paths")
    n = 0
    for p in files:
        for k, text in enumerate(read_documents(p, text_field)):
            n += 1
            yield text, {"source": f"{p.name}:{k}"}
    if n == 0:
        raise LlmxError(f"synth.docs.paths: {len(files)} file(s) matched but hold no non-empty document "
                        f"(text field {text_field!r}): {[str(p) for p in files[:5]]}")


def _hub(name: str, config: Optional[str], split: str, text_field: str, paths: Sequence[str] = ()):
    """A hub dataset, streamed (paths, when given, are its data_files: a builder name such as "json" or
    "parquet" then reads local shards the same way)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, data_files=list(paths) or None)
    except Exception as e:  # the hub raises many types (connection, missing config, auth)
        raise LlmxError(f"synth.docs.hub_name={name!r} (config {config!r}, split {split!r}) could not be opened: {e}") from e
    for k, row in enumerate(ds):
        text = row.get(text_field)
        if k == 0 and text_field not in row:
            raise LlmxError(f"{name}: no field {text_field!r} (synth.docs.text_field); fields: {sorted(row)}")
        if isinstance(text, str) and text.strip():
            yield text, {"source": f"{name}:{k}"}


def builtin_documents(n_worked: int, n_docs: int, seed: int = 0):
    """(text, meta) of n_worked GSM-Infinite worked solutions (medium, ops 2-4) interleaved with n_docs sections of
    the embedded Python documentation."""
    worked = _worked(n_worked, seed)
    docs = _pydoc(n_docs)
    for a, b in itertools.zip_longest(worked, docs):
        for x in (a, b):
            if x is not None:
                yield x


def _worked(n: int, seed: int) -> List[Any]:
    from llmx.bench.gsm_infinite import GSMInfinite

    gen, rng, out = GSMInfinite(), random.Random(f"natural-reasoning/{seed}"), []
    for k in range(n):
        r = gen.generate("medium", 2 + k % 3, 0, rng, None)
        text = f"{r['problem']} {r['question']}\n\nSolution. {r['solution']}"
        out.append((text, {"source": "gsm_infinite/medium", "op": r["op"], "answer": r["answer"],
                           "problem": f"{r['problem']} {r['question']}", "solution": r["solution"]}))
    return out


def _pydoc(n: int) -> List[Any]:
    from llmx.data.instruct import _clip_words, _pydoc_sections
    from llmx.data.sources import pydoc_corpus

    out = []
    for topic, text in pydoc_corpus():
        for title, body in _pydoc_sections(text):
            if len(out) < n and len(body.split()) >= 40:
                out.append((f"{title}\n\n{_clip_words(body, 180)}", {"source": f"pydoc/{topic}"}))
    return out
