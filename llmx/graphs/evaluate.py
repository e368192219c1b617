"""A shortest-path model at work: greedy decoding of paths, teacher-forced per-step accuracy, and the hidden
states of the edge tokens (what the spectral probe of llmx.graphs.spectral reads).

Any causal LM that maps input_ids [B, T] to `.logits` (and `.hidden_states` with output_hidden_states=True)
works: the llmx Llama presets, or a transformers model loaded from a run's `hf/` export. Examples are the
dicts of llmx.graphs.paths; token ids come from `paths.encode`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np
import torch

from llmx.graphs.paths import GraphTask, decode_path, encode, step_correct


def _by_prompt_length(examples: Sequence[Dict], task: GraphTask, batch_size: int):
    """Batches of equal prompt length (no padding: causal attention then needs no mask)."""
    groups: Dict[int, List[int]] = defaultdict(list)
    prompts = [encode(ex, task)[0] for ex in examples]
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            yield chunk, torch.tensor([prompts[i] for i in chunk])


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_paths(model, examples: Sequence[Dict], task: GraphTask, batch_size: int = 256) -> List[List[int]]:
    """The model's path for each example: argmax decoding after <p> until <eos> (at most n + 1 tokens)."""
    was_training = model.training
    model.eval()
    out: List[List[int]] = [[] for _ in examples]
    dev = _device(model)
    for idx, ids in _by_prompt_length(examples, task, batch_size):
        ids = ids.to(dev)
        steps = max(examples[i]["n"] for i in idx) + 1
        new = []
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            new.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
        gen = torch.cat(new, dim=1).tolist()
        for i, g in zip(idx, gen):
            out[i] = decode_path(g[: examples[i]["n"] + 1], task)
    model.train(was_training)
    return out


@torch.no_grad()
def step_accuracy(model, examples: Sequence[Dict], task: GraphTask, batch_size: int = 256) -> Dict[str, float]:
    """Teacher-forced: after each correct prefix of the example's path, is the argmax next node correct?
    "any": a neighbour one step closer to the target; "canonical": the canonical path's next node, scored on
    the steps whose prefix is canonical. Predicting the source (a copy of the query) is not a step; a path of
    d edges has d steps."""
    was_training = model.training
    model.eval()
    hits = {"any": 0, "canonical": 0}
    n_steps = canon_steps = 0
    dev = _device(model)
    full = [sum(encode(ex, task), []) for ex in examples]
    groups: Dict[int, List[int]] = defaultdict(list)
    for i, f in enumerate(full):
        groups[len(f)].append(i)
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            logits = model(input_ids=torch.tensor([full[i] for i in chunk], device=dev)).logits
            pred = logits.argmax(-1).tolist()
            for row, i in enumerate(chunk):
                ex = examples[i]
                start = len(encode(ex, task)[0])  # position of the source token in the path
                for j in range(1, len(ex["path"])):
                    guess = pred[row][start + j - 1]
                    prefix = ex["path"][:j]
                    n_steps += 1
                    hits["any"] += guess < task.node_tokens and step_correct(ex, prefix, guess, "any")
                    if prefix == ex["canonical"][:j]:  # the canonical step is defined after a canonical prefix
                        canon_steps += 1
                        hits["canonical"] += guess == ex["canonical"][j]
    model.train(was_training)
    return {"step_acc_any": hits["any"] / max(n_steps, 1),
            "step_acc_canonical": hits["canonical"] / max(canon_steps, 1),
            "steps": n_steps}


@torch.no_grad()
def edge_representations(model, examples: Sequence[Dict], task: GraphTask, position: str = "second",
                         batch_size: int = 256) -> List[List[np.ndarray]]:
    """Per example, per layer (0 = token embeddings, then each block's output; the last is after the final
    norm, as transformers returns it), the [m, d] hidden states of its m edges in prompt order: at the
    edge's second token ("second": it has attended to both endpoints) or the mean of its two tokens."""
    if position not in ("second", "mean"):
        raise ValueError(f"edge_position={position!r}; valid: ['second', 'mean']")
    was_training = model.training
    model.eval()
    out: List[List[np.ndarray]] = [[] for _ in examples]
    dev = _device(model)
    for idx, ids in _by_prompt_length(examples, task, batch_size):
        states = model(input_ids=ids.to(dev), output_hidden_states=True).hidden_states
        m = len(examples[idx[0]]["edges"])
        second = torch.arange(m, device=dev) * 2 + 2  # <bos> u1 v1 u2 v2 ...: v_i at 2i + 2
        for h in states:
            reps = h[:, second] if position == "second" else (h[:, second] + h[:, second - 1]) / 2
            for row, i in enumerate(idx):
                out[i].append(reps[row].float().cpu().numpy())
    model.train(was_training)
    return out
