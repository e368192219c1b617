"""Generate a benchmark to disk: parallel, verified, deterministic, published atomically.

Layout of an output directory (the published Hugging Face layout, one dataset per subset and length with
one split per op, so `load_from_disk(out / "symbolic_8k")["ops_5"]` is the 8k, op-5 symbolic set):

    out/manifest.json              seed, generator options, plan, tokenizer, counts, token-length stats, speed
    out/<subset>_<length>/         a datasets.DatasetDict saved with save_to_disk, splits ops_<op>
    out/jsonl/<subset>_<length>/ops_<op>.jsonl   (formats=[..., jsonl])

Every problem comes from its own seeded RNG (`base.problem_rng`), so the output depends only on (seed,
plan, generator options, tokenizer): not on the number of worker processes nor on the order work is done.
With verify=True (default) each problem is re-solved by the generator's independent solver before it is
kept; a disagreement stops the run with the problem's id (it is a generator bug, never data).
Everything is written into a temporary directory renamed into place at the end, so an interrupted run
leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from llmx.bench.base import BenchError, get_bench, length_name, parse_length, problem_id, problem_rng
from llmx.utils import LlmxError, atomic_write_json, publish_dir


@dataclass(frozen=True)
class Cell:
    subset: str
    length: int
    op: int
    count: int


def parse_ops(spec: Any) -> List[int]:
    """[1, 2, 5] | "1-8" | "2-30:2" (step) | "1,2,5" | 7 -> sorted unique ops."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, str)):
        out = []
        for item in spec:
            out.extend(parse_ops(item))
        return sorted(set(out))
    text = str(spec).strip()
    ops: List[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                rng_part, _, step = part.partition(":")
                lo, hi = (int(x) for x in rng_part.split("-"))
                ops.extend(range(lo, hi + 1, int(step) if step else 1))
            elif part:
                ops.append(int(part))
    except ValueError:
        raise LlmxError(f"bench ops {spec!r}: expected a list of ints, 'a-b', 'a-b:step' or 'a,b,c'") from None
    if not ops:
        raise LlmxError(f"bench ops {spec!r} selects no op")
    return sorted(set(ops))


def build_plan(subsets: Sequence[str], lengths: Sequence[Any], ops: Any, per_op: int,
               ops_by_subset: Optional[Dict[str, Any]] = None) -> List[Cell]:
    if per_op < 1:
        raise LlmxError(f"bench.per_op={per_op} must be >= 1")
    ops_by_subset = dict(ops_by_subset or {})
    unknown = set(ops_by_subset) - set(subsets)
    if unknown:
        raise LlmxError(f"bench.ops_by_subset names {sorted(unknown)}, which are not in bench.subsets={list(subsets)}")
    cells = []
    for subset in subsets:
        spec = ops_by_subset.get(subset, ops)
        by_length = None
        if hasattr(spec, "items"):  # {length: ops}
            by_length = {parse_length(k): v for k, v in spec.items()}
        for length in lengths:
            tokens = parse_length(length)
            if by_length is not None:
                if tokens not in by_length:
                    raise LlmxError(f"bench.ops_by_subset.{subset} gives ops for lengths "
                                    f"{sorted(length_name(t) for t in by_length)} but not for {length_name(tokens)}")
                length_spec = by_length[tokens]
            else:
                length_spec = spec
            for op in parse_ops(length_spec):
                cells.append(Cell(subset, tokens, op, per_op))
    return cells


def dataset_name(subset: str, length: int) -> str:
    return f"{subset}_{length_name(length)}"


# ---- worker side -------------------------------------------------------------------------------------

_WORKER: Dict[str, Any] = {}


def load_counter(tokenizer_path: Optional[str]) -> Optional[Callable[[str], int]]:
    """A token counter for a tokenizer directory, a hub id, or a tokenizer.json file (read with the
    `tokenizers` library: no hub access, e.g. a downloaded Llama-3 tokenizer.json)."""
    if not tokenizer_path:
        return None
    if Path(tokenizer_path).expanduser().is_file():
        from tokenizers import Tokenizer

        file_tok = Tokenizer.from_file(str(Path(tokenizer_path).expanduser()))
        return lambda text: len(file_tok.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _init_worker(generator: str, options: Dict[str, Any], tokenizer_path: Optional[str]) -> None:
    _WORKER["bench"] = get_bench(generator, **options)
    _WORKER["count"] = load_counter(tokenizer_path)


def _work(job: Tuple[int, str, int, int, int, int, bool]) -> List[Dict[str, Any]]:
    seed, subset, length, op, start, stop, verify = job
    bench, count = _WORKER["bench"], _WORKER["count"]
    out = []
    for index in range(start, stop):
        rng = problem_rng(seed, bench.name, subset, length, op, index)
        record = bench.generate(subset, op, length, rng, count)
        record.update(id=problem_id(subset, length, op, index), subset=subset, index=index, seed=seed)
        if record["op"] != op:
            raise BenchError(f"{record['id']}: generated op {record['op']}, asked for {op}")
        if verify:
            bench.verify(record)
        out.append(record)
    return out


def _jobs(cells: Sequence[Cell], seed: int, verify: bool) -> List[Tuple]:
    jobs = []
    for c in cells:
        # Long contexts cost a tokenizer pass per search step: one problem per job balances the workers.
        chunk = 1 if c.length >= 4000 else 8 if c.length > 0 else 64
        for start in range(0, c.count, chunk):
            jobs.append((seed, c.subset, c.length, c.op, start, min(c.count, start + chunk), verify))
    return jobs


# ---- driver ------------------------------------------------------------------------------------------


def generate_dataset(
    generator: str,
    cells: Sequence[Cell],
    out_dir: os.PathLike | str,
    *,
    seed: int = 0,
    options: Optional[Dict[str, Any]] = None,
    tokenizer_path: Optional[str] = None,
    workers: int = 1,
    verify: bool = True,
    formats: Sequence[str] = ("arrow",),
    progress: bool = True,
    extra_manifest: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Generate every cell, verify, write the layout above to `out_dir` (atomically) and return the manifest."""
    options = dict(options or {})
    bench = get_bench(generator, **options)  # bad options fail here, before any process starts
    bad_formats = set(formats) - {"arrow", "jsonl"}
    if bad_formats or not formats:
        raise LlmxError(f"bench.formats={list(formats)}: valid formats are 'arrow' and 'jsonl'")
    for c in cells:
        bench.check_request(c.subset, c.op, c.length)
        if c.length > 0 and not tokenizer_path:
            raise LlmxError(f"context length {length_name(c.length)} needs a tokenizer to measure it (bench.tokenizer)")
    if workers < 1:
        raise LlmxError(f"bench.workers={workers} must be >= 1")
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists():
        raise LlmxError(f"{out_dir} already holds a generated benchmark; choose another bench.out_dir or delete it")

    jobs = _jobs(cells, seed, verify)
    total = sum(c.count for c in cells)
    results: Dict[Tuple[str, int, int], List[Dict[str, Any]]] = {}
    t0 = time.perf_counter()
    bar = _Bar(total, enabled=progress)
    if workers == 1:
        _init_worker(generator, options, tokenizer_path)
        stream: Iterable[List[Dict[str, Any]]] = map(_work, jobs)
        pool = None
    else:
        # spawn, not fork: the parent may hold torch/tokenizer threads, which fork does not copy safely.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                   initargs=(generator, options, tokenizer_path))
        stream = pool.map(_work, jobs, chunksize=1)
    try:
        for records in stream:
            for r in records:
                results.setdefault((r["subset"], r["length"], r["op"]), []).append(r)
            bar.advance(len(records))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    seconds = time.perf_counter() - t0

    manifest = {
        "generator": generator,
        "options": options,
        "seed": seed,
        "plan": [{"subset": c.subset, "length": c.length, "op": c.op, "count": c.count} for c in cells],
        "tokenizer": tokenizer_path,
        "verified": verify,
        "workers": workers,
        "problems": total,
        "seconds": round(seconds, 3),
        "problems_per_s": round(total / seconds, 2) if seconds > 0 else None,
        "datasets": {},
        **(extra_manifest or {}),
    }
    with publish_dir(out_dir) as tmp:
        from datasets import Dataset, DatasetDict
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # one "Saving the dataset" bar per split drowns our own progress lines

        by_dataset: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
        for (subset, length, op), records in sorted(results.items()):
            records.sort(key=lambda r: r["index"])
            by_dataset.setdefault(dataset_name(subset, length), {})[f"ops_{op}"] = records
        for name, splits in by_dataset.items():
            if "arrow" in formats:
                DatasetDict({s: Dataset.from_list(rs) for s, rs in splits.items()}).save_to_disk(str(tmp / name))
            if "jsonl" in formats:
                (tmp / "jsonl" / name).mkdir(parents=True, exist_ok=True)
                for s, rs in splits.items():
                    with open(tmp / "jsonl" / name / f"{s}.jsonl", "w") as f:
                        for r in rs:
                            f.write(json.dumps(r) + "\n")
            tokens = sorted(r["n_tokens"] for rs in splits.values() for r in rs)
            manifest["datasets"][name] = {
                "splits": {s: len(rs) for s, rs in splits.items()},
                "n_tokens": {"min": tokens[0], "median": tokens[len(tokens) // 2], "max": tokens[-1],
                             "mean": round(sum(tokens) / len(tokens), 1)},
            }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def load_bench(path: os.PathLike | str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(manifest, {dataset name: DatasetDict}) of a directory written by generate_dataset."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise LlmxError(f"{path} is not a generated benchmark (no manifest.json); generate one with a "
                        "generate-bench recipe or point bench.dataset_dir at one")
    manifest = json.loads(manifest_path.read_text())
    from datasets import load_from_disk

    sets = {}
    for name in manifest["datasets"]:
        where = path / name
        if not where.is_dir():
            raise LlmxError(f"{path}: manifest lists {name} but {where} is missing (generated with formats without arrow?)")
        sets[name] = load_from_disk(str(where))
    return manifest, sets


class _Bar:
    """A rich progress bar on a terminal; otherwise a plain line every 10% (logs stay readable)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.next_report = total, 0, 0.1
        self.t0 = time.perf_counter()
        self.rich = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.rich = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 transient=True)
            self.task = self.rich.add_task("generate", total=total)
            self.rich.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self.rich is not None:
            self.rich.update(self.task, completed=self.done)
        elif self.enabled and self.total and self.done / self.total >= self.next_report:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"generate: {self.done}/{self.total} problems ({rate:.0f}/s)", file=sys.stderr, flush=True)
            while self.next_report <= self.done / self.total:
                self.next_report += 0.1

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()
