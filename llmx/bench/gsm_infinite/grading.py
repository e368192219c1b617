"""GSM-Infinite graders (Zhou et al., 2025, arXiv 2502.05252; reference `pred/eval_symbolic.py`,
`pred/eval_realistic.py`).

Realistic (medium, hard): the gold integer follows "Answer: " in the reference solution; the reply is
lower-cased and searched for a list of markers in a fixed order ("answer: ", "solution: ", "oxed{",
"**answer:** ", ..., "is "), each with its own end marker; the first marker whose span parses as an
integer wins. "oxed{" and "is " are searched from the end of the reply, the others from the start. That is
`mode="reference"`, kept exact because leaderboard numbers depend on it (one deviation: for the marker
with no end marker, the reference scans the digits of the FIRST sample of a problem for every sample, a
bug; we scan the reply being graded). `mode="lenient"` returns the reference mode's reading whenever it has
one (a strict pass over every marker comes first), and only where it has none also accepts what the
reference rejects for formatting alone: thousands separators, markdown or LaTeX around the number, a unit
after it ("Answer: 42 animals"), the result of an equation ("Answer: 3 + 4 = 7" reads 7), and at last the
last integer of the reply.

Symbolic: the reference asks a second LLM (Qwen2.5-7B-Instruct) to rewrite the reply as a list of
variable names, then compares the SET of `V\\d+` names with the answer. Here a rule-based extractor does
that rewriting: it takes the text after a closing </think>, then the answer stated after the last explicit
answer marker ("answer:", "answer is", "final answer", \\boxed{...}), else after the last conclusion word
("therefore", "thus", "in conclusion", "so the variables"), skipping markers that state no variable, else
the last line that names a variable, and collects the V-names in it; "none"/"no variable" there is the
empty set. The stated answer is the rest of the marker's sentence, or the list lines right after a marker
line that names none ("... are:" then "- V1", "- V2" on lines of their own), so a check after the answer
("Check: V1 = V3 + 1 = 5") is not read, as the reference's LLM extractor, which reads the reply's final
answer, would not read it.
`evaluator.symbolic_extractor=llm` uses the reference's method instead: an LLM served behind an
OpenAI-compatible endpoint (the reference: Qwen2.5-7B-Instruct) rewrites each reply as a list of variables
(`llm_extract_symbolic`), with our own wording of the extraction prompt.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Set

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


def _marker_spans(text: str):
    """(strict span, lenient span) after each of the reference's markers in `text`, in the reference's order."""
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
        # The lenient reading of a span ending at "." looks past that "." (a decimal or "1,234." is not the end).
        yield text[start:end], text[start:] if end_marker == "." else text[start:end]


def extract_realistic(reply: str, mode: str = "reference") -> Optional[int]:
    if mode not in ("reference", "lenient"):
        raise ValueError(f"realistic grader mode {mode!r}; valid: 'reference', 'lenient'")
    # The reference turns a backspace (a JSON-unescaped "\b" of "\boxed") and the character before it into "b".
    text = re.sub(".\x08", "b", reply).lower()
    spans = list(_marker_spans(text))
    # The strict pass over EVERY marker first: lenient mode may only add readings where the reference has none,
    # never replace one (a lenient parse of an earlier marker would read 3 from "answer: 3 + 4 = 7").
    for strict, _ in spans:
        value = _as_int(strict)
        if value is not None:
            return value
    if mode == "reference":
        return None
    for _, loose in spans:
        value = _span_number(loose)
        if value is not None:
            return value
    numbers = NUMBER.findall(_unformat(text))
    return int(numbers[-1].replace(",", "")) if numbers else None


NUMBER = re.compile(r"-?\d[\d,]*")


def _unformat(text: str) -> str:
    return re.sub(r"\\text\{[^}]*\}|\\\(|\\\)|\$|\*\*|\\,", " ", text)


def _span_number(span: str) -> Optional[int]:
    """The number a marker's span states: the first number, or the result of an equation on its first line
    ("3 + 4 = 7" states 7)."""
    head = _unformat(span)[:80]
    line = head.split("\n", 1)[0]
    if "=" in line:
        head = line.rsplit("=", 1)[1]
    m = NUMBER.search(head)
    if not m:
        return None
    return _as_int(m.group(0).rstrip(",").replace(",", ""))


def realistic_correct(reply: str, gold: int, mode: str = "reference") -> bool:
    value = extract_realistic(strip_thinking(reply), mode)
    return value is not None and value == gold


VAR = re.compile(r"\bV\d+\b")
# An explicit answer outranks a conclusion word: "ANSWER: V1, V2" followed by "Thus V1 = V3 + 1 = 5" (a check)
# answers V1, V2. Among markers of one rank the last wins.
STRONG_MARKERS = re.compile(r"final answer|answer\s*:|answer is|\\boxed\{", re.IGNORECASE)
WEAK_MARKERS = re.compile(
    r"therefore|thus|so the variables|in conclusion|the variables? (?:that |which )?(?:are |is )?equal",
    re.IGNORECASE,
)
NONE_WORDS = re.compile(r"\b(none|no variables?|no such variables?|nothing)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"\.(?:\s|$)")
_SEP = r"[\s,;.*$\\{}]*(?:(?:and|or)\s+)?"
# A line that only lists variables: "- V1", "V1, V2 and V3", "**V1**".
LIST_LINE = re.compile(r"^[\s\-*•\d.)(:]*" + _SEP + r"V\d+\b(?:" + _SEP + r"V\d+\b)*[\s,;.*$\\{}]*$")


def _answer_span(text: str, start: int) -> str:
    """What the marker at `start` states: the rest of its sentence on its line, or, when that names no variable
    (\"the variables equal to 5 are:\"), the list lines right after it. A check after the answer is not part
    of it."""
    line_end = text.find("\n", start)
    line = text[start: None if line_end < 0 else line_end]
    end = SENTENCE_END.search(line, 1)
    head = line if end is None else line[: end.start() + 1]
    if VAR.search(head) or NONE_WORDS.search(head) or line_end < 0:
        return head
    items: List[str] = []
    for nxt in text[line_end + 1:].split("\n"):
        if LIST_LINE.match(nxt):
            items.append(nxt)
        elif nxt.strip() or items:
            break
    return "\n".join([head] + items)


def extract_symbolic(reply: str) -> Set[str]:
    text = strip_thinking(reply)
    for markers in (STRONG_MARKERS, WEAK_MARKERS):
        for m in reversed(list(markers.finditer(text))):
            span = _answer_span(text, m.start())
            if VAR.search(span) or NONE_WORDS.search(span):
                return set(VAR.findall(span))
    lines = [ln for ln in text.splitlines() if VAR.search(ln) or NONE_WORDS.search(ln)]
    return set(VAR.findall(lines[-1])) if lines else set()


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
