"""GSM-Infinite symbolic subset (Zhou et al., 2025, arXiv 2502.05252, Sec. 3; reference generator
`data/symbolic/generate_payload.py` of Infini-AI-Lab/gsm_infinite).

A problem is a set of assignment statements over variables V000000..V999999:

* the core graph: `op` variables on a random tree (node i's parent is uniform among nodes < i); the root
  is assigned a constant in [0, max_value], every edge is a copy, `+ 1` or `- 1` chosen uniformly;
* distractors (only when a context length is asked for): a second tree whose root is never assigned,
  so none of its variables can be derived, however many statements it has;
* the query: a value taken by some core variable; the answer is the SET of core variables equal to it.

`op` is the number of core variables, i.e. the number of assignments a solver must evaluate, as in the
reference. All statements are shuffled together.

Choices where the reference differs or is silent (all documented, none changes the task):
* Context length. The reference adds `int(length * 828 / 9668)` distractor variables (its estimate of
  ~11.7 Llama-3 tokens per statement). We measure the rendered prompt with the configured tokenizer and
  add distractors until it is within 3% of the target (`base.fill_to_length`), so "8k" means 8k tokens of
  the tokenizer named in the manifest. `length_measure="reference"` (bench.options.length_measure) adds the
  reference's count instead, whatever the tokenizer; n_tokens still records the prompt's real length.
* Randomness. The reference draws every problem from one `random.Random(42)` in generation order; each
  problem here has its own seeded RNG (see `llmx.bench.base`), so a problem does not depend on the others.
* The prompt is our paraphrase of the reference's instruction (context in <context> tags, the equations
  hold simultaneously, reason step by step, conclude in a sentence).
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from llmx.bench.base import BenchError, Unsatisfiable, fill_to_length, interleave

POOL = 1_000_000  # variable names V000000..V999999
TOL = 0.03  # base.fill_to_length's default tolerance on the length target

INSTRUCTION = (
    "The context above lists relationships between variables. Each relationship is an equation, and all of "
    "them hold at the same time. Using only these relationships, find every variable whose value can be "
    "derived and equals {value}. Reason step by step, showing each calculation, and finish with one sentence "
    "that states your final answer."
)


def var_name(i: int) -> str:
    return f"V{i:06d}"


def render_prompt(statements: List[str], value: int) -> str:
    return "<context>\n" + "\n".join(statements) + "\n</context>\n\n" + INSTRUCTION.format(value=value)


def _statement(child: str, parent: Optional[str], edge: str, constant: Optional[int] = None) -> str:
    if parent is None:
        return f"assign {child} = {constant}."
    return f"assign {child} = {parent}{edge}."


EDGES = ("", " + 1", " - 1")
EDGE_DELTA = {"": 0, " + 1": 1, " - 1": -1}


def _distractor_stream(rng: random.Random, taken: set) -> Callable[[int], List[str]]:
    """A prefix-stable stream of distractor statements: a tree under a root that is never assigned."""
    names: List[str] = []
    stmts: List[str] = []

    def fresh() -> str:
        while True:
            name = var_name(rng.randrange(POOL))
            if name not in taken:
                taken.add(name)
                return name

    def noise(k: int) -> List[str]:
        if not names:
            names.append(fresh())  # the unassigned root: no statement of its own
        while len(stmts) < k:
            parent = names[rng.randrange(len(names))]
            child = fresh()
            names.append(child)
            stmts.append(_statement(child, parent, EDGES[rng.randrange(3)]))
        return stmts[:k]

    return noise


# The reference's length measure: int(length * 828 / 9668) filler variables (its estimate of Llama-3 tokens per
# statement), the first of them the unassigned root of the filler tree, so one statement fewer.
REFERENCE_FILLER_PER_TOKEN = 828 / 9668


def generate_symbolic(op: int, length: int, rng: random.Random, count_tokens, *, max_value: int = 10,
                      length_measure: str = "tokens") -> Dict[str, Any]:
    if op < 1:
        raise BenchError(f"symbolic: op={op} must be >= 1")
    names = [var_name(i) for i in rng.sample(range(POOL), op)]
    parents: List[Optional[int]] = [None] + [rng.randrange(i) for i in range(1, op)]
    edges = [""] + [EDGES[rng.randrange(3)] for _ in range(1, op)]
    values = [rng.randint(0, max_value)]
    for i in range(1, op):
        values.append(values[parents[i]] + EDGE_DELTA[edges[i]])
    core = [
        _statement(names[i], None if parents[i] is None else names[parents[i]], edges[i], values[0] if i == 0 else None)
        for i in range(op)
    ]
    value = values[rng.randrange(op)]
    answer = sorted(n for n, v in zip(names, values) if v == value)

    noise_rng = random.Random(rng.getrandbits(64))
    noise = _distractor_stream(noise_rng, set(names))
    if length > 0 and length_measure == "reference":
        n_noise = max(0, int(length * REFERENCE_FILLER_PER_TOKEN) - 1)
        prompt = render_prompt(interleave(core, noise(n_noise), rng), value)
        n_tokens = count_tokens(prompt) if count_tokens else 0
    elif length > 0:
        if count_tokens is None:
            raise BenchError("symbolic: a context length needs a tokenizer to measure it")
        try:
            prompt, n_tokens, n_noise = fill_to_length(lambda s: render_prompt(s, value), core, noise, length,
                                                       count_tokens, rng, tol=TOL)
        except Unsatisfiable:
            raise _too_long(op, length, core, value, count_tokens) from None
    else:
        order = core[:]
        rng.shuffle(order)
        prompt, n_noise = render_prompt(order, value), 0
        n_tokens = count_tokens(prompt) if count_tokens else 0
    question = INSTRUCTION.format(value=value)
    return {
        "prompt": prompt,
        "problem": prompt[len("<context>\n"): prompt.index("\n</context>")],
        "question": question,
        "solution": _solution(names, parents, edges, values, value, answer),
        "answer": ", ".join(answer),
        "answer_list": answer,
        "answer_value": value,
        "op": op,
        "length": length,
        "n_tokens": n_tokens,
        "n_noise": n_noise,
    }


def _too_long(op: int, length: int, core: List[str], value: int, count_tokens) -> BenchError:
    """Every symbolic problem of this op is about as long (one statement per op): no retry helps, so say
    which lengths and ops are possible with this tokenizer."""
    empty = count_tokens(render_prompt([], value))
    per = (count_tokens(render_prompt(core, value)) - empty) / op
    alone = empty + per * op
    fits = max(0, int((length * (1 + TOL) - empty) / per))
    return BenchError(
        f"gsm_infinite: a symbolic op={op} problem has {alone:.0f} tokens before any distractor, more than its "
        f"length target of {length} tokens (+{TOL:.0%}); valid: a length of at least {math.ceil(alone / (1 + TOL))} "
        f"tokens for op={op}, or op <= about {fits} at this length ({per:.1f} tokens per statement with this "
        "tokenizer)")


def _solution(names, parents, edges, values, value, answer) -> str:
    """Depth-first derivation from the one assigned root, as the reference's reference solutions do."""
    children: Dict[int, List[int]] = {}
    for i, p in enumerate(parents):
        if p is not None:
            children.setdefault(p, []).append(i)
    lines = [f"The only direct assignment is {names[0]} = {values[0]}."]
    stack = [0]
    while stack:
        i = stack.pop()
        for c in reversed(children.get(i, [])):
            delta = EDGE_DELTA[edges[c]]
            expr = names[i] if delta == 0 else f"{names[i]} {'+' if delta > 0 else '-'} 1"
            lines.append(f"{names[c]} = {expr} = {values[c]}.")
            stack.append(c)
    found = ", ".join(answer)
    lines.append(f"The variables equal to {value} are {found}.")
    lines.append(f"ANSWER: {found}")
    return "\n".join(lines)


STATEMENT = re.compile(r"^assign (V\d{6}) = (?:(-?\d+)|(V\d{6})(?: ([+-]) (\d+))?)\.$")
VALUE = re.compile(r"equals (-?\d+)\. Reason step by step")


def solve_symbolic(record: Dict[str, Any]) -> Tuple[List[str], int]:
    """An independent solver from the prompt text alone: (sorted answer variables, op count).

    Parses every statement, refuses a variable assigned twice, propagates values from the constant
    assignments, and returns the derivable variables equal to the queried value; op is the number of
    derivable variables (each is one assignment evaluated)."""
    prompt = record["prompt"]
    try:
        context = prompt[prompt.index("<context>\n") + len("<context>\n"): prompt.index("\n</context>")]
    except ValueError:
        raise BenchError(f"{record.get('id', '?')}: no <context> block in the prompt") from None
    m = VALUE.search(prompt)
    if not m:
        raise BenchError(f"{record.get('id', '?')}: the queried value is not in the prompt")
    value = int(m.group(1))
    defs: Dict[str, Tuple[Optional[str], int]] = {}  # child -> (parent or None, constant or delta)
    for line in context.split("\n"):
        s = STATEMENT.match(line)
        if not s:
            raise BenchError(f"{record.get('id', '?')}: cannot parse statement {line!r}")
        child, const, parent, sign, k = s.groups()
        if child in defs:
            raise BenchError(f"{record.get('id', '?')}: {child} is assigned twice")
        if parent is None:
            defs[child] = (None, int(const))
        else:
            defs[child] = (parent, 0 if sign is None else (int(k) if sign == "+" else -int(k)))
    known: Dict[str, int] = {c: v for c, (p, v) in defs.items() if p is None}
    children: Dict[str, List[str]] = {}
    for c, (p, _) in defs.items():
        if p is not None:
            children.setdefault(p, []).append(c)
    frontier = list(known)
    while frontier:
        p = frontier.pop()
        for c in children.get(p, []):
            if c not in known:
                known[c] = known[p] + defs[c][1]
                frontier.append(c)
    return sorted(v for v, x in known.items() if x == value), len(known)
