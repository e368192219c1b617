"""GSM-Infinite graders (Zhou et al., 2025, arXiv 2502.05252; reference `pred/eval_symbolic.py`,
`pred/eval_realistic.py`).

Realistic (medium, hard): the gold integer follows "Answer: " in the reference solution; the reply is
lower-cased and searched for a list of markers in a fixed order ("answer: ", "solution: ", "oxed{",
"**answer:** ", ..., "is "), each with its own end marker; the first marker whose span parses as an
integer wins. "oxed{" and "is " are searched from the end of the reply, the others from the start. That is
`mode="reference"`, kept exact because leaderboard numbers depend on it (one deviation: for the marker
with no end marker, the reference scans the digits of the FIRST sample of a problem for every sample, a
bug; we scan the reply being graded). `mode="lenient"` also accepts what the reference rejects for
formatting alone: thousands separators, markdown or LaTeX around the number, a unit after it
("Answer: 42 animals"), and falls back to the last integer of the reply.

Symbolic: the reference asks a second LLM (Qwen2.5-7B-Instruct) to rewrite the reply as a list of
variable names, then compares the SET of `V\\d+` names with the answer. Here a rule-based extractor does
that rewriting: it takes the text after a closing </think>, then the span after the last answer marker
("answer:", "final answer", \\boxed{...}, "therefore", "thus", "so the variables"), else the last line
that names a variable, and collects the V-names in it; "none"/"no variable" there is the empty set.
`evaluator.symbolic_extractor=llm` uses the reference's method instead: an LLM served behind an
OpenAI-compatible endpoint (the reference: Qwen2.5-7B-Instruct) rewrites each reply as a list of variables
(`llm_extract_symbolic`), with our own wording of the extraction prompt.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Set

THINK_END = "</think>"

# (marker, end marker or None, search from the end?) in the reference's order.
REALISTIC_MARKERS = (
    ("answer: ", ".", False),
    ("solution: ", ".", False),
    ("oxed{", "}", True),
    ("**answer:** ", ".", False),
    ("**answer: ", "**", False),
    ("final answer: answer: ", ".", False),
    ("\nanswer: ", ".", False),
    ("\\text{answer: } ", None, False),
    ("is ", ".", True),
    ("answer: ", "\n", False),
)


def strip_thinking(reply: str) -> str:
    """The part of a reply after the last </think>, where reasoning models put their answer."""
    i = reply.rfind(THINK_END)
    return reply if i < 0 else reply[i + len(THINK_END):]


def gold_realistic(solution: str) -> int:
    start = solution.find("Answer: ")
    if start < 0:
        raise ValueError("the reference solution has no 'Answer: ' marker")
    end = solution.find(".", start)
    return int(solution[start + len("Answer: "): end if end >= 0 else None])


def _as_int(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def extract_realistic(reply: str, mode: str = "reference") -> Optional[int]:
    if mode not in ("reference", "lenient"):
        raise ValueError(f"realistic grader mode {mode!r}; valid: 'reference', 'lenient'")
    # The reference turns a backspace (a JSON-unescaped "\b" of "\boxed") and the character before it into "b".
    text = re.sub(".\x08", "b", reply).lower()
    for marker, end_marker, from_end in REALISTIC_MARKERS:
        begin = text.rfind(marker) if from_end else text.find(marker)
        if begin < 0:
            continue
        start = begin + len(marker)
        if end_marker is None:
            end = start
            while end < len(text) and text[end].isdigit():
                end += 1
        else:
            end = text.find(end_marker, start)
            if end < 0:
                end = len(text)
        value = _as_int(text[start:end])
        if value is not None:
            return value
        if mode == "lenient":
            value = _first_number(text[start:end if end_marker != "." else len(text)])
            if value is not None:
                return value
    if mode == "lenient":
        numbers = NUMBER.findall(_unformat(text))
        return int(numbers[-1].replace(",", "")) if numbers else None
    return None


NUMBER = re.compile(r"-?\d[\d,]*")


def _unformat(text: str) -> str:
    return re.sub(r"\\text\{[^}]*\}|\\\(|\\\)|\$|\*\*|\\,", " ", text)


def _first_number(span: str) -> Optional[int]:
    m = NUMBER.search(_unformat(span)[:80])
    if not m:
        return None
    digits = m.group(0).rstrip(",")
    return _as_int(digits.replace(",", ""))


def realistic_correct(reply: str, gold: int, mode: str = "reference") -> bool:
    value = extract_realistic(strip_thinking(reply), mode)
    return value is not None and value == gold


VAR = re.compile(r"\bV\d+\b")
SYMBOLIC_MARKERS = re.compile(
    r"(final answer|answer\s*:|answer is|\\boxed\{|therefore|thus|so the variables|in conclusion|the variables? (?:that |which )?(?:are |is )?equal)",
    re.IGNORECASE,
)
NONE_WORDS = re.compile(r"\b(none|no variables?|no such variables?|nothing)\b", re.IGNORECASE)


def extract_symbolic(reply: str) -> Set[str]:
    text = strip_thinking(reply)
    spans = list(SYMBOLIC_MARKERS.finditer(text))
    if spans:
        region = text[spans[-1].start():]
    else:
        lines = [ln for ln in text.splitlines() if VAR.search(ln) or NONE_WORDS.search(ln)]
        region = lines[-1] if lines else ""
    found = set(VAR.findall(region))
    return found


def symbolic_correct(reply: str, answer: Sequence[str]) -> bool:
    return extract_symbolic(reply) == set(answer)


# ---- optional: an LLM extractor for symbolic replies (the reference's way) ----------------------------------

EXTRACT_PROMPT = (
    "Below is a reply to a question asking which variables are equal to a given value. Read the reply's final "
    "conclusion and list the variables it gives as its answer, separated by commas, and nothing else. If it "
    "gives no variable, write NONE.\n\nReply:\n{reply}"
)


def llm_extract_symbolic(backend, items, cache_path):
    """The reference's symbolic grading: an LLM rewrites each reply as a list of variables (temperature 0),
    and the V-names in that list are the extracted set. `items` is {(problem id, sample index): reply};
    the extractor's replies go through the same resumable cache as the model's. Returns {item key: set}."""
    from llmx.bench.backends import GenRequest, run_with_cache

    keys = {f"{pid}#{i}": (pid, i) for pid, i in items}
    requests = [GenRequest(key=k, prompt=EXTRACT_PROMPT.format(reply=strip_thinking(items[keys[k]])), n=1)
                for k in keys]
    replies = run_with_cache(backend, requests, cache_path)
    return {keys[k]: set(VAR.findall(replies[k][0])) for k in keys}
