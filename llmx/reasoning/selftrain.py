"""NaturalReasoning's unsupervised self-training scorers (Yuan et al., 2025, arXiv 2502.13124; §3.3 of the notes):
k responses are sampled per question from the model being trained, scored without any reference answer, and the
best (RFT) or the best and the worst (DPO) are trained on.

* self-consistency: the most frequent extracted final answer wins (ties: the answer that appears first); the best
  response is the first one giving it, the worst a response giving another answer or none, drawn at random with
  the caller's RNG (the paper: "random = worst"); a question where no response has an extractable answer is
  dropped, and one where every extractable answer agrees and every response has one gives no DPO pair.
* self-score: reward = log p("yes") - log p("no"), the model's next-token probabilities when asked whether its own
  response is correct (llmx.reasoning.prompts.judge_prompt, with the chat template); best = highest, worst =
  lowest. "yes" and "no" are the first token of each word as the tokenizer encodes it at the start of the
  assistant turn.
* self-score filtering: a question whose best response self-scores below 0 is dropped (either scorer).
* random (llmx's control, not in the paper): the best response is drawn at random among those with an extractable
  final answer, the worst among the others; questions are dropped exactly as self-consistency drops them. It
  keeps what RFT on any answered sample teaches (the reply format, the model's own style) and removes the
  selection by agreement, so self-consistency's gain over it is the part the scorer is responsible for.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from llmx.reasoning.prompts import extract_final_answer, judge_prompt, normalize_answer
from llmx.utils import LlmxError


@dataclass
class Choice:
    best: Optional[int]  # index of the chosen response; None: the question is dropped
    worst: Optional[int]  # index of the rejected response; None: no preference pair
    majority: Optional[str] = None  # self-consistency: the winning normalised answer
    votes: int = 0


def self_consistency(responses: Sequence[str], rng: random.Random) -> Choice:
    answers = [extract_final_answer(r) for r in responses]
    norm = [normalize_answer(a) if a is not None else None for a in answers]
    counts = Counter(a for a in norm if a)
    if not counts:
        return Choice(None, None)
    top = max(counts.values())
    majority = next(a for a in norm if a and counts[a] == top)
    best = norm.index(majority)
    others = [i for i, a in enumerate(norm) if a != majority]
    return Choice(best, rng.choice(others) if others else None, majority, top)


def random_choice(responses: Sequence[str], rng: random.Random) -> Choice:
    answered = [i for i, r in enumerate(responses) if extract_final_answer(r) is not None]
    if not answered:
        return Choice(None, None)
    best = rng.choice(answered)
    others = [i for i in range(len(responses)) if i != best]
    return Choice(best, rng.choice(others) if others else None)


def by_score(scores: Sequence[float]) -> Choice:
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return Choice(best, worst if scores[worst] < scores[best] else None)


def yes_no_ids(tok) -> tuple:
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")]
    if ids[0] == ids[1]:
        raise LlmxError("the tokenizer gives 'yes' and 'no' the same first token")
    return tuple(ids)


@torch.no_grad()
def self_scores(model, tok, question: str, responses: Sequence[str], device, batch_size: int = 8) -> List[float]:
    """log p(yes) - log p(no) of the model judging each of its responses to `question`."""
    yes, no = yes_no_ids(tok)
    texts = [tok.apply_chat_template([{"role": "user", "content": judge_prompt(question, r)}], tokenize=False,
                                     add_generation_prompt=True) for r in responses]
    out: List[float] = []
    model = model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for lo in range(0, len(texts), batch_size):
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[lo: lo + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].double(), -1)
        out += (logp[:, yes] - logp[:, no]).tolist()
    return out
