"""A deterministic, rule-based stand-in for the judge and the question writer (the `rules` backend).

It answers the annotate and synthesize prompts of llmx.reasoning.prompts in their exact reply formats, from surface
features of the document, so the whole pipeline (caching, resumption, sharding, filtering, statistics) can be run and
tested in seconds without a model, as the rule simulator serves SWEET-RL. It is not a judge of reasoning: its scores
count what a worked solution shows (numbers, equations, "so"/"therefore" steps, a stated answer), and its question is
the document's own problem statement when it has one. Recipes that report dataset statistics name the backend.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from llmx.bench.backends import Backend, GenRequest, OnResult
from llmx.reasoning import prompts
from llmx.utils import LlmxError

_STEP = re.compile(r"\b(so|therefore|thus|hence|because|then|define|=)\b|=", re.IGNORECASE)


def _document(prompt: str) -> Optional[str]:
    m = re.search(r"<<<\n(.*)\n>>>", prompt, re.DOTALL)
    return m.group(1) if m else None


def rubric_reply(doc: str) -> str:
    steps = len(_STEP.findall(doc))
    numbers = len(re.findall(r"\d+", doc))
    answered = re.search(r"answer\s*:", doc, re.IGNORECASE) is not None
    scores = {
        "completeness": int(answered) + int("?" in doc),
        "complexity": min(2, steps // 3),
        "correctness": 1 if answered else 0,
        "reasoning": 1 if steps >= 3 and numbers >= 3 else (0 if steps else -1),
    }
    return "\n".join(f"{k}: {v}" for k, v in scores.items())


def synthesis_reply(doc: str) -> str:
    head, _, solution = doc.partition("\n\nSolution.")
    question = " ".join(head.split())
    m = re.findall(r"answer\s*:\s*([^\n]+?)\.?\s*$", solution.strip(), re.IGNORECASE | re.MULTILINE)
    answer = m[-1].strip() if m else "none"
    return f"Question: {question}\nAnswer: {answer}"


class RuleBackend(Backend):
    """Replies to annotate and synthesize prompts by rule (see the module docstring); any other prompt is an
    error naming it, since a rule judge that silently answered a teacher prompt would fabricate responses."""

    def fingerprint(self) -> Dict[str, Any]:
        return {"backend": "rules", "version": 1}

    def reply(self, prompt: Any) -> str:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        doc = _document(text)
        if doc is not None and text.startswith(prompts.ANNOTATE_TEMPLATE[:40]):
            return rubric_reply(doc)
        if doc is not None and text.startswith(prompts.SYNTHESIZE_TEMPLATE[:40]):
            return synthesis_reply(doc)
        raise LlmxError(f"the rules backend answers only annotate and synthesize prompts, not {text[:80]!r}")

    def generate(self, requests: Sequence[GenRequest], on_result: OnResult) -> None:
        for r in requests:
            on_result(r.key, [self.reply(r.prompt)] * r.n)


__all__: List[str] = ["RuleBackend", "rubric_reply", "synthesis_reply"]
