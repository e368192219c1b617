"""NaturalReasoning's stages (Yuan et al., 2025, arXiv 2502.13124, Fig. 1), each a function from one list of records
to the next plus a report of its counts:

    annotate     documents -> documents the judge rates >= min_score on the four-criterion rubric
    synthesize   documents -> one backtranslated question each, with a reference answer or None
    dedup        questions -> questions (MinHash/LSH on word shingles, llmx.reasoning.dedup)
    decontaminate questions -> questions (13-gram overlap with named benchmarks, llmx.reasoning.decontaminate)
    respond      questions -> questions with teacher responses

Every LLM call goes through an llmx.bench.backends backend and `run_with_cache`, keyed by the document's (or
question's) id: a stage killed at any point reruns only the calls it had not finished, and since ids depend only on
text, the output does not depend on the order or the sharding of the input. A reply that does not parse is counted
(`unparsed`) and its item dropped; a stage whose replies never parse is an error, naming one reply, because that
is a judge or writer that does not follow the format, not data.

Records are plain dicts: documents {id, text, meta}; questions {id, doc_id, question, reference_answer, meta}, and
after `respond` also responses [{response_model, response}] (the published dataset's field names).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from llmx.bench.backends import Backend, GenRequest, run_with_cache
from llmx.reasoning import prompts
from llmx.reasoning.documents import Document, doc_id
from llmx.utils import LlmxError

Record = Dict[str, Any]
Report = Dict[str, Any]
Progress = Optional[Callable[[int, int], None]]


def clip(text: str, max_chars: int) -> str:
    """The document as the LLM sees it: the first max_chars characters, cut at a word boundary."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def _never_parsed(stage: str, replies: Dict[str, List[str]], parsed: int) -> None:
    if replies and parsed == 0:
        example = next(iter(replies.values()))[0]
        raise LlmxError(f"{stage}: none of the {len(replies)} replies parses in the format the prompt asks for; "
                        f"the model does not follow it (use a stronger model or check the backend). One reply: "
                        f"{example[:300]!r}")


def annotate(docs: Sequence[Document], backend: Backend, cache: Path, *, min_score: int,
             max_chars: int = 6000, progress: Progress = None) -> Tuple[List[Record], Report]:
    """Documents whose rubric total is >= min_score, each with its four scores."""
    t0 = time.perf_counter()
    requests = [GenRequest(d.id, prompts.annotate_prompt(clip(d.text, max_chars))) for d in docs]
    replies = run_with_cache(backend, requests, cache, progress=progress)
    kept, unparsed, below, totals = [], 0, 0, Counter()
    for d in docs:
        scores = prompts.parse_rubric(replies[d.id][0])
        if scores is None:
            unparsed += 1
            continue
        total = sum(scores.values())
        totals[total] += 1
        if total < min_score:
            below += 1
            continue
        kept.append({"id": d.id, "text": d.text, "meta": {**d.meta, "rubric": scores, "score": total}})
    _never_parsed("annotate", replies, len(docs) - unparsed)
    return kept, {"stage": "annotate", "input": len(docs), "unparsed": unparsed, "below_threshold": below,
                  "kept": len(kept), "min_score": min_score, "score_histogram": dict(sorted(totals.items())),
                  "seconds": round(time.perf_counter() - t0, 3)}


def synthesize(docs: Sequence[Record], backend: Backend, cache: Path, *, max_chars: int = 6000,
               progress: Progress = None) -> Tuple[List[Record], Report]:
    """One question per document; its reference answer when the writer found one in the document."""
    t0 = time.perf_counter()
    requests = [GenRequest(d["id"], prompts.synthesize_prompt(clip(d["text"], max_chars))) for d in docs]
    replies = run_with_cache(backend, requests, cache, progress=progress)
    out, unparsed = [], 0
    for d in docs:
        s = prompts.parse_synthesized(replies[d["id"]][0])
        if s is None:
            unparsed += 1
            continue
        out.append({"id": doc_id(s.question), "doc_id": d["id"], "question": s.question,
                    "reference_answer": s.reference_answer, "meta": d["meta"]})
    _never_parsed("synthesize", replies, len(docs) - unparsed)
    with_answer = sum(q["reference_answer"] is not None for q in out)
    return out, {"stage": "synthesize", "input": len(docs), "unparsed": unparsed, "kept": len(out),
                 "with_reference_answer": with_answer, "seconds": round(time.perf_counter() - t0, 3)}


def dedup(questions: Sequence[Record], *, threshold: float = 0.55, num_perm: int = 128,
          shingle: int = 3) -> Tuple[List[Record], Report]:
    """Near-duplicate questions removed; the first in id order is kept, so shards and order do not matter.
    Two documents that gave the same question text are exact duplicates (same id) and count as such."""
    from llmx.reasoning.dedup import near_duplicates

    t0 = time.perf_counter()
    by_id: Dict[str, Record] = {}
    for q in questions:
        by_id.setdefault(q["id"], q)
    ordered = [by_id[k] for k in sorted(by_id)]
    result = near_duplicates([q["question"] for q in ordered], threshold=threshold, num_perm=num_perm, shingle=shingle)
    kept = [ordered[i] for i in result.kept]
    report = result.report()
    report.update(input=len(questions), same_text=len(questions) - len(ordered),
                  removed=len(questions) - len(kept), seconds=round(time.perf_counter() - t0, 3))
    report["examples"] = [{"removed": ordered[e["item"]]["question"][:200],
                           "duplicate_of": ordered[e["duplicate_of"]]["question"][:200], "jaccard": e["jaccard"]}
                          for e in report["examples"][:5]]
    return kept, report


def decontaminate(questions: Sequence[Record], benchmark_paths: Sequence[str], *,
                  n: int = 13) -> Tuple[List[Record], Report]:
    """Questions sharing an n-gram with any named benchmark removed, and what was removed, per benchmark."""
    t0 = time.perf_counter()
    if not benchmark_paths:
        return list(questions), {"stage": "decontaminate", "input": len(questions), "kept": len(questions),
                                 "removed": 0, "benchmarks": [], "seconds": 0.0}
    from llmx.reasoning import decontaminate as dc

    benches = [dc.load_benchmark(p) for p in benchmark_paths]
    result = dc.decontaminate([q["question"] for q in questions], dc.NgramIndex(benches, n=n))
    kept = [questions[i] for i in result.kept]
    report = {"stage": "decontaminate", **result.report(), "input": len(questions), "kept": len(kept),
              "seconds": round(time.perf_counter() - t0, 3)}
    return kept, report


def respond(questions: Sequence[Record], backend: Backend, cache: Path, *, model_name: str, n: int = 1,
            progress: Progress = None) -> Tuple[List[Record], Report]:
    """Each question with n teacher responses (the dataset's `responses` field)."""
    t0 = time.perf_counter()
    requests = [GenRequest(q["id"], prompts.respond_prompt(q["question"]), n=n) for q in questions]
    replies = run_with_cache(backend, requests, cache, progress=progress)
    out = [{**q, "responses": [{"response_model": model_name, "response": r} for r in replies[q["id"]]]}
           for q in questions]
    empty = sum(not r["response"].strip() for q in out for r in q["responses"])
    return out, {"stage": "respond", "input": len(questions), "kept": len(out), "responses": len(out) * n,
                 "empty_responses": empty, "seconds": round(time.perf_counter() - t0, 3)}


def card_statistics(rows: Sequence[Record]) -> Dict[str, Any]:
    """The dataset card's statistics: reference-answer length buckets, question length, response length, and
    domain counts when documents carry a domain."""
    buckets = Counter(prompts.answer_bucket(r["reference_answer"]) for r in rows)
    q_words = [len(r["question"].split()) for r in rows]
    r_words = [len(x["response"].split()) for r in rows for x in r.get("responses", [])]
    stats: Dict[str, Any] = {
        "questions": len(rows),
        "reference_answer": {k: {"count": buckets.get(k, 0), "share": round(buckets.get(k, 0) / max(1, len(rows)), 4)}
                             for k in ("none", "single_word", "short", "long")},
        "question_words": {"mean": round(statistics.fmean(q_words), 2) if q_words else None,
                           "median": statistics.median(q_words) if q_words else None},
        "response_words": {"mean": round(statistics.fmean(r_words), 2) if r_words else None,
                           "median": statistics.median(r_words) if r_words else None},
    }
    domains = Counter(r["meta"].get("domain") for r in rows if r.get("meta", {}).get("domain"))
    if domains:
        stats["domains"] = dict(domains.most_common())
    return stats
