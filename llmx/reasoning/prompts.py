"""The prompts of NaturalReasoning's LLM stages and their strict parsers.

Yuan et al. (2025, arXiv 2502.13124), Fig. 1: an LLM annotates the reasoning content of each document, a second
call backtranslates a self-contained question from a document with reasoning and returns a reference answer when
the document supports one, and a teacher answers the questions. The paper's prompts are not public; the rubric's
four criteria and point scales follow the secondary sources in ../shared/notes/rl-and-natural-reasoning.md §3.1:

    Problem Completeness                     0..2   (0, +1, +1)
    Problem Complexity and Technical Depth   0..2   (0, +1, +1)
    Technical Correctness and Accuracy      -1..1
    Thinking and Reasoning                  -1..1

so a document scores -2..6; the kept threshold is a config (`synth.annotate.min_score`, 4 by default, the only
threshold a reproduction states; a secondary summary says only full marks were used: set 6).

Parsing is strict on purpose: a reply is accepted only if it has exactly the requested fields with values in range.
A reply that does not parse is recorded as unparsed (and the item dropped and counted), never guessed at: a judge
that drifts from the format shows up as a parse rate, not as silently invented scores.

The final-answer extractor (self-consistency, evaluation) takes, in order, the last \\boxed{...}, the text after the
last "final answer:" / "answer:" marker, or nothing: a reply with no extractable answer is not counted as a vote.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

CRITERIA: Tuple[Tuple[str, str, int, int], ...] = (
    # (field in the reply, what it asks, lowest, highest)
    ("completeness", "Problem Completeness: does the text state a problem and contain everything needed to solve it?", 0, 2),
    ("complexity", "Problem Complexity and Technical Depth: does solving it take several non-trivial steps?", 0, 2),
    ("correctness", "Technical Correctness and Accuracy: is the content correct (-1 wrong, 0 unsure, 1 correct)?", -1, 1),
    ("reasoning", "Thinking and Reasoning: does the text show step-by-step reasoning (-1 none, 0 some, 1 clear)?", -1, 1),
)
MAX_SCORE = sum(hi for *_, hi in CRITERIA)
MIN_SCORE = sum(lo for *_, lo, _ in CRITERIA)

ANNOTATE_TEMPLATE = """Rate the reasoning content of the document below on four criteria.

{criteria}

Document:
<<<
{document}
>>>

Reply with exactly four lines and nothing else, each "name: score" with an integer score:
completeness: <0-2>
complexity: <0-2>
correctness: <-1-1>
reasoning: <-1-1>"""

SYNTHESIZE_TEMPLATE = """Read the document below. Write one new, self-contained question that requires thinking and reasoning \
to answer, built on the document's content (do not copy a question from it; the question must make sense without the \
document). Then, if the document lets you derive a correct answer, give it briefly; if it does not, write none.

Document:
<<<
{document}
>>>

Reply in exactly this format:
Question: <the question>
Answer: <the short answer, or none>"""

RESPOND_TEMPLATE = "{question}\n\nThink step by step, then end with a line \"Final answer: <answer>\"."

JUDGE_TEMPLATE = """Question: {question}

Proposed answer:
{response}

Is the proposed answer correct? Reply yes or no."""


def annotate_prompt(document: str) -> str:
    criteria = "\n".join(f"- {name}: {what}" for name, what, _, _ in CRITERIA)
    return ANNOTATE_TEMPLATE.format(criteria=criteria, document=document)


def synthesize_prompt(document: str) -> str:
    return SYNTHESIZE_TEMPLATE.format(document=document)


def respond_prompt(question: str) -> str:
    return RESPOND_TEMPLATE.format(question=question)


def judge_prompt(question: str, response: str) -> str:
    return JUDGE_TEMPLATE.format(question=question, response=response)


_SCORE_LINE = re.compile(r"^\s*\**\s*([a-z ]+?)\s*\**\s*:\s*\**\s*([+-]?\d+)\s*\**\s*$", re.IGNORECASE)


def parse_rubric(reply: str) -> Optional[Dict[str, int]]:
    """The four scores of a judge reply, or None when it does not parse: every criterion exactly once, an
    integer in its range, and no other non-empty line."""
    scores: Dict[str, int] = {}
    ranges = {name: (lo, hi) for name, _, lo, hi in CRITERIA}
    for line in reply.strip().splitlines():
        if not line.strip():
            continue
        m = _SCORE_LINE.match(line)
        if not m:
            return None
        name, value = m.group(1).strip().lower(), int(m.group(2))
        if name not in ranges or name in scores or not ranges[name][0] <= value <= ranges[name][1]:
            return None
        scores[name] = value
    return scores if len(scores) == len(CRITERIA) else None


NO_ANSWER = {"none", "n/a", "no answer", "not available", "none."}


@dataclass
class Synthesized:
    question: str
    reference_answer: Optional[str]  # None: the document does not support an answer


def parse_synthesized(reply: str) -> Optional[Synthesized]:
    """Question and reference answer of a synthesis reply, or None when it does not parse: one "Question:" and
    one later "Answer:" field, the question non-empty (it may span lines; the answer is the rest of the reply)."""
    text = reply.strip()
    q = [m.start() for m in re.finditer(r"(?im)^\s*\**question\**\s*:", text)]
    a = [m.start() for m in re.finditer(r"(?im)^\s*\**answer\**\s*:", text)]
    if len(q) != 1 or len(a) != 1 or a[0] < q[0] or text[: q[0]].strip():
        return None
    question = text[q[0]: a[0]].split(":", 1)[1].strip()
    answer = text[a[0]:].split(":", 1)[1].strip()
    if not question or not answer:
        return None
    return Synthesized(question, None if answer.lower().strip(" .*") in NO_ANSWER else answer)


def extract_final_answer(reply: str) -> Optional[str]:
    """The final answer of a response: the last \\boxed{...} (braces balanced), else the text after the last
    "final answer:" or "answer:" marker (its first line), else None."""
    boxed = _last_boxed(reply)
    if boxed is not None:
        return boxed.strip() or None
    for marker in (r"final answer\s*[:：]", r"answer\s*(?:is)?\s*[:：]"):
        hits = list(re.finditer(marker, reply, re.IGNORECASE))
        if hits:
            rest = reply[hits[-1].end():].strip().splitlines()
            return rest[0].strip().strip("*").strip() or None if rest else None
    return None


def _last_boxed(text: str) -> Optional[str]:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def normalize_answer(answer: str) -> str:
    """The form two answers are compared in: a number's value when the answer's first token is a number
    ("12 apples" -> "12", "1,000.0" -> "1000"), else lowercased words without punctuation."""
    a = answer.strip().strip("$").strip()
    m = _NUMBER.match(a)
    if m:
        value = float(m.group(0).replace(",", ""))
        if math.isfinite(value):
            return str(int(value)) if value == int(value) else repr(value)
    return " ".join(re.sub(r"[^\w\s]", " ", a.lower()).split())


def answers_match(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and normalize_answer(a) == normalize_answer(b) != ""


def answer_bucket(answer: Optional[str]) -> str:
    """The dataset card's reference-answer length buckets: none, single word, short (2-9 words), long (>= 10)."""
    if answer is None:
        return "none"
    n = len(answer.split())
    return "single_word" if n <= 1 else "short" if n < 10 else "long"
