"""`shortest_path`: the Spectral Journey task (arXiv 2502.08794) as a benchmark generator.

Subsets are the two sides of the isomorphism split of llmx.graphs.paths ("train", "test"); `op` is the number
of nodes; there is no context padding (length 0 only). A record carries the graph (edges), the query and
the reference path, and a prompt in words for any LLM backend:

    Graph edges: 3-7, 7-1, 1-0, 0-3
    Find a shortest path from 3 to 1. Answer with the nodes of the path separated by spaces, on a line
    starting with "Answer:".

Options: the fields of llmx.graphs.paths.GraphTask (node_tokens, sampler, edge_prob, target, query,
test_fraction, split_salt; `nodes` is set from the ops asked for) and `grading`: "any" (any shortest path
is correct, the default) or "canonical" (only the lexicographically smallest).
"""

from __future__ import annotations

import random
import re
from dataclasses import fields
from typing import Any, Dict, List

from llmx.bench.base import BenchError, BenchGenerator, register_bench
from llmx.graphs.paths import GRADINGS, GraphTask, grade, sample_example, shortest_paths

TASK_FIELDS = tuple(f.name for f in fields(GraphTask) if f.name != "nodes")


@register_bench("shortest_path")
class ShortestPath(BenchGenerator):
    subsets = ("train", "test")

    def __init__(self, grading: str = "any", **options: Any):
        super().__init__(grading=grading, **options)
        unknown = sorted(set(options) - set(TASK_FIELDS))
        if unknown:
            raise BenchError(f"shortest_path: unknown option(s) {unknown}; valid: {['grading', *TASK_FIELDS]}")
        if grading not in GRADINGS:
            raise BenchError(f"shortest_path: grading={grading!r}; valid: {list(GRADINGS)}")
        self.grading = grading
        for key in ("edge_prob",):
            if key in options:
                options[key] = tuple(options[key])
        self.task_options = options
        GraphTask(nodes=(2, int(options.get("node_tokens", 10))), **options)  # refuse bad options up front

    def _task(self, n: int) -> GraphTask:
        return GraphTask(nodes=(n, n), **self.task_options)

    def check_request(self, subset: str, op: int, length: int) -> None:
        super().check_request(subset, op, length)
        if length != 0:
            raise BenchError(f"shortest_path: length={length}; the task has no context padding (use lengths: ['0'])")
        node_tokens = int(self.task_options.get("node_tokens", 10))
        if not 2 <= op <= node_tokens:
            raise BenchError(f"shortest_path: op={op} nodes is outside 2-{node_tokens} (node_tokens={node_tokens} "
                             f"label tokens)")

    def generate(self, subset: str, op: int, length: int, rng: random.Random, count_tokens) -> Dict[str, Any]:
        ex = sample_example(self._task(op), op, subset, rng)
        question = f"Find a shortest path from {ex['source']} to {ex['target']}."
        prompt = ("Graph edges: " + ", ".join(f"{u}-{v}" for u, v in ex["edges"]) + "\n" + question +
                  ' Answer with the nodes of the path separated by spaces, on a line starting with "Answer:".')
        path = " ".join(map(str, ex["path"]))
        solution = "\n".join(f"Step {i + 1}: {u} -> {v}" for i, (u, v) in enumerate(zip(ex["path"], ex["path"][1:])))
        ex.update(op=op, length=length, prompt=prompt, question=question, answer=path,
                  solution=f"{solution}\nAnswer: {path}", n_tokens=count_tokens(prompt) if count_tokens else 0)
        return ex

    def verify(self, record: Dict[str, Any]) -> None:
        paths = shortest_paths([tuple(e) for e in record["edges"]], record["source"], record["target"])
        if not paths or record["canonical"] != paths[0] or record["path"] not in paths:
            raise BenchError(f"{record.get('id', '?')}: BFS disputes the reference path {record['path']}")

    def grade(self, reply: str, record: Dict[str, Any]) -> bool:
        return grade(record, parse_path(reply), self.grading)

    def group_keys(self, record: Dict[str, Any]) -> List[str]:
        return [f"distance={record['distance']}"]


def parse_path(reply: str) -> List[int]:
    """The integers of the last line that starts with "Answer:" (else of the last non-empty line)."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    answers = [ln for ln in lines if ln.lower().startswith("answer:")]
    line = answers[-1] if answers else (lines[-1] if lines else "")
    return [int(x) for x in re.findall(r"-?\d+", line.split(":", 1)[-1] if answers else line)]
