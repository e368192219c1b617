"""Trajectory files, the pairs built from them, and tokenized training items.

Trajectory file (JSONL, one episode per line, the SWEET-RL reference's layout plus a key):
    {"key": "...", "task": {...Task...}, "dialogue_history": [{"role", "content"}, ...],
     "answer": "...", "reward": passed/total, "success": bool}
Files are appended to as episodes finish and read back on a rerun, so an interrupted stage continues with the
episodes it has not written yet (`JsonlLog`).

Pairs follow the reference (scripts/evaluate_code.py): for each task whose best copy succeeded, the best copy
is chosen against every copy with a strictly lower reward. Per-turn pairs (SWEET-RL §4.3): for each sampled
turn, candidates sorted by the critic's advantage, `per_turn` pairs each of one random candidate from the top
half (chosen) and one from the bottom half (rejected).

Training items are dicts of token lists; `ItemLoader` batches them for the trainer core (resumable: its state
is the inner StepLoader's), padding each micro-batch to its longest item.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llmx.utils import LlmxError

TRAJECTORY_FIELDS = ("task", "dialogue_history", "reward")


class JsonlLog:
    """An append-only JSONL file of records with a unique "key": `done` holds the keys already written (a
    torn last line from a killed run is dropped and rewritten), `write` appends and flushes."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.records: List[Dict[str, Any]] = []
        if self.path.exists():
            good = 0
            with open(self.path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # torn write: the process died mid-line
                    self.records.append(json.loads(line))
                    good += len(line)
            if good != self.path.stat().st_size:
                with open(self.path, "r+b") as f:
                    f.truncate(good)
        self.done = {r["key"] for r in self.records}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.records.append(record)
        self.done.add(record["key"])

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def jsonl_records(path: os.PathLike | str) -> Iterator[Tuple[str, Any]]:
    """("file:line", parsed object) for each non-blank line; a line that is not JSON raises LlmxError naming it."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlmxError(f"{path}:{n}: not valid JSON ({e.msg}); the file holds one JSON object per line") from None


def read_trajectories(path: os.PathLike | str) -> List[Dict[str, Any]]:
    """Trajectory records, validated: a file of another format is refused naming the file, line and field."""
    from llmx.rl.chat import check_messages

    out = []
    for where, r in jsonl_records(path):
        missing = [k for k in TRAJECTORY_FIELDS if not isinstance(r, dict) or k not in r]
        if missing:
            raise LlmxError(f"{where}: not a trajectory record: missing {missing}; expected the fields "
                            f"{list(TRAJECTORY_FIELDS)} (+ answer, key) of the SWEET-RL reference's layout")
        check_messages(r["dialogue_history"], where)
        if not isinstance(r["reward"], (int, float)):
            raise LlmxError(f"{where}: reward must be a number, got {r['reward']!r}")
        r.setdefault("key", f"{Path(path).name}:{where.rsplit(':', 1)[1]}")
        out.append(r)
    return out


def read_jsonl(path: os.PathLike | str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def task_id(record: Dict[str, Any]) -> str:
    t = record["task"]
    return str(t.get("task_id") or t.get("problem_description"))


def trajectory_pairs(records: Sequence[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(chosen, rejected) trajectories of the same task: the best copy of each task that has a success, against
    every copy with a strictly lower reward."""
    by_task: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[task_id(r)].append(r)
    pairs = []
    for copies in by_task.values():
        best = max(copies, key=lambda r: r["reward"])
        if best["reward"] < 1.0:
            continue
        pairs += [(best, r) for r in copies if r["reward"] < best["reward"]]
    return pairs


def turn_pairs(scores: Sequence[float], per_turn: int, rng: random.Random) -> List[Tuple[int, int]]:
    """`per_turn` (chosen, rejected) candidate indices: a random one of the top half against a random one of
    the bottom half of the scores (ties broken by index, as argsort does). Fewer than two candidates: none."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    half = len(order) // 2
    if half == 0:
        return []
    bottom, top = order[:half], order[len(order) - half:]
    return [(rng.choice(top), rng.choice(bottom)) for _ in range(per_turn)]


def agent_turn_indices(messages: Sequence[Dict[str, str]]) -> List[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


# --- tokenized items and their loader ---------------------------------------------------------------


def pad_to(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def collate_sequences(items: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and segments of single-sequence items (keys ids, segments)."""
    ids = pad_to([it["ids"] for it in items], pad_id)
    mask = pad_to([[1] * len(it["ids"]) for it in items], 0)
    segments = pad_to([it["segments"] for it in items], 0)
    # n_targets: the agent tokens, what an SFT loss is a mean over (a pair loss overrides it with pairs).
    return {"input_ids": ids, "attention_mask": mask, "segments": segments, "n_targets": int((segments[:, 1:] > 0).sum())}


def collate_pairs(items: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, one padded batch; reference per-turn sums and counts (computed
    once by `reference_logps`) ride along, padded to the batch's most turns."""
    rows = [{"ids": it["chosen_ids"], "segments": it["chosen_segments"]} for it in items] + \
           [{"ids": it["rejected_ids"], "segments": it["rejected_segments"]} for it in items]
    batch = collate_sequences(rows, pad_id)
    batch["n_targets"] = len(items)
    refs = [it["ref_chosen"] for it in items] + [it["ref_rejected"] for it in items]
    turns = max(len(r) for r in refs)
    ref = torch.zeros(len(refs), turns, dtype=torch.float64)
    for i, r in enumerate(refs):
        ref[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    batch["ref_sums"] = ref
    return batch


class _Indices:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i])


class ItemLoader:
    """The trainer's loader over a list of items: a StepLoader over their indices (exact under resume and
    data parallelism, see llmx.data.loader), collated by `collate(items, pad_id)`."""

    def __init__(self, items: Sequence[Dict[str, Any]], collate, pad_id: int, **kw):
        from llmx.data import StepLoader

        self.items, self.collate, self.pad_id = items, collate, pad_id
        self.inner = StepLoader(_Indices(len(items)), **kw)

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        return [self.collate([self.items[int(i)] for i in mb[:, 0]], self.pad_id) for mb in self.inner.next_step()]

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def item_eval_batches(items, collate, pad_id: int):
    """eval_batches_fn for the trainer: this rank's micro-batches of held-out items."""

    def batches(val, micro_batch_size: int, rank: int = 0, world_size: int = 1, max_batches: Optional[int] = None
                ) -> Iterator[Dict[str, torch.Tensor]]:
        # As llmx.data.eval_batches: max_batches counts micro-batches of all ranks, items strided over ranks.
        head = items if max_batches is None else items[:max_batches * micro_batch_size]
        mine = head[rank::world_size]
        for j in range(0, len(mine), micro_batch_size):
            yield collate(mine[j: j + micro_batch_size], pad_id)

    return batches
