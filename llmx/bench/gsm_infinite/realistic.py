"""GSM-Infinite "medium" (d=2) and "hard" (d=3) problems: generator and an independent solver.

Zhou, Liu, Chen, Tian, Chen, "GSM-Infinite: How Do Your LLMs Behave over Infinitely Increasing Context
Length and Reasoning Complexity?" (ICML 2025, arXiv 2502.05252). The generator follows the design of the
reference (`gsm-infinite/data/realistic/forward_generator.py`, `reverse_generator.py`), which replicates
iGSM from Ye et al., "Physics of Language Models: Part 2.1" (arXiv 2407.20311). Own code and wording.

The problem world
-----------------
A structure graph has two layers from a theme (`templates.py`): top items (locations) and middle items
(adult animals), with edges between them. Each edge (location L, animal A) gives an *instance parameter*
"the number of A in L"; for d=3 also "the average number of newborn children per A in L". Each top item
gives *abstract parameters*, never stated, only implied by the instruction message:

    total(L)   = "the total number of adult animals in L"          = sum over A of number(A in L)
    newborn(L) = "the total number of newborn animal children in L" = sum over A of number(A in L) * average(A in L)
                 (d=3 only: the implicit multiplication that makes "hard" hard)

where A ranges over the animals the problem mentions for L (every edge of the structure is mentioned, as in
the reference, so "mentioned" and "in the structure" agree). Every instance parameter is defined by one
statement over a constant and earlier parameters:

    X equals c | X equals Y | X equals c plus|times Y | X equals the sum of Y and Z
    X equals the difference between Y and Z | X equals the sum of A, B, and C  (and "c plus|times" + any of these)

Operation count (the reference's `num_op`; the `op` field)
-----------------------------------------------------------
op = sum, over every parameter in the dependency closure of the query, of its in-degree, where a constant
counts as one dependency (the reference's RNG node). So "X equals 3" is 1, "X equals 3 plus Y" is 2, "the
sum of Y and Z" is 2, total(L) over k animals is k, and newborn(L) over k animals is 2k (a count and an
average per animal; the reference's alias nodes for the averages are not counted, as in `num_op`).

Sampling (per attempt; an attempt that breaks a constraint raises `Unsatisfiable` and the next one
starts from the same rng, until `max_attempts`):
  1. opmax from the reference's buckets (op 2->3, 3-4->4, 5-6->6, 7-9->10, 10-11->15, 12-15->20,
     16-18->25, 19-20->30, then 1.5*op), s = (opmax+1)//2 (the reference's `--force`), n and m as in
     `drawAll`; layer widths from the reference's softmax weights, edge count e, structure (`drawStructure`).
  2. Necessary abstracts while their op stays <= n, then extra instance parameters up to m (`drawNecessary1`).
  3. A topological order built from the query backwards, adding an edge when the order would otherwise be
     disconnected (`drawNecessary2`; a 2-parameter order grows by one half the time, `addingparameter`),
     extra operations until the sum of current ops reaches s, and the dependencies of each instance
     parameter drawn from the constant and the parameters before it (`drawNecessary3`). The query is the
     last parameter; a graph whose op differs from the requested op is rejected before any value is drawn.
  4. Values: constants in [1, number_range-1] (multipliers from 2); a draw is rejected when a needed
     count is < 1, an average is < 0 or any needed value exceeds 1000 (the reference's `detectnegative`).
  5. Every other instance parameter of the structure is defined too ("unnecessary" parameters,
     `drawUnnecessary`), from the constant, earlier ones, or the needed ones; the question never needs them.

Forward mode asks for the query. Reverse mode (the reference's "forwardreverse") hides the value of the
last plain-constant parameter before the query ("X exists, and its number is greater than 0"; for an
average "X is greater than 0"), states the query's value instead, and asks for the hidden one; the attempt
is kept only if exactly one positive integer solves the resulting equation. Op is the same sum over the
same parameters (the hidden one still counts 1).

Close noise (length > 0): distractor statements about new parameters (new top and middle items from the
separate distractor vocabularies, so they never join a total the question needs), each defined from 1 or 2
(p=0.5 each) random core parameters plus a constant with p=0.5; nothing needed depends on them.
`base.fill_to_length` mixes them in until the whole prompt measures the target within 3%.

Where this differs from the reference, or the paper leaves it open
-----------------------------------------------------------------
- No alias ("special") abstract nodes: newborn(L) depends on the (count, average) pairs directly. The op
  budget of step 2 uses the op definition above (the reference's `op()` there also counts the aliases,
  so it admits slightly fewer abstracts for d=3).
- `drawNecessary3`: when an instance already has the edge from step 3, that parent is taken out of its
  pool. The reference removes the pool's last element instead, may draw the parent twice and then drops
  the duplicate (`remove_dup`), which changes op after the fact; here op is exact by construction.
- Unnecessary parameters depend only on parameters already defined (and totals whose parts are all
  defined), so the problem is acyclic by construction; the reference can create cycles and bare 0-op
  constants there. Their values are kept valid (difference operands swapped, multiplier dropped, or a
  plain constant as last resort) instead of being left unchecked (the reference never computes them).
- Rejection is nested, for speed: an attempt is dropped as soon as the requested op is out of reach of
  its needed parameters or of its order (this alone changes nothing but speed); otherwise the
  dependencies (step 3b) are redrawn up to DEP_TRIES=8 times for the same order, then the constants and
  forms (step 4) up to VALUE_TRIES=8 times for the same graph. Each redraw is an exact conditional draw,
  but orders on which the requested op is rare are kept more often than under the reference's flat
  rejection, so the mix of problem shapes at a given op differs somewhat. Setting both to 1 gives flat
  rejection: about 1000 medium / 200 hard problems/s on one core over ops 2-30, against 2600 / 900.
- Plain constants are uniform in [1, number_range-1] (the reference draws from [2, ...] half the time).
- Layer items are sampled from the theme's whole list (the reference: from one 5-item subcategory).
  ip_max = 20 (the reference's default) for op <= 20, op beyond; layers stay <= 5 items up to op 30 and
  grow with op beyond (`_width_weights`). Tested to op 60; hard problems above about op 65 are rarely
  found within the default max_attempts.
- Reverse: the reference keeps only first-order equations (they arise unless a count and its average
  both depend on the hidden value); here any polynomial equation with exactly one positive integer root
  is kept by default, and the solution says so (about a third of hard reverse problems over ops 2-30 are
  then of degree 2 or more); `linear_only=True` restores the reference's filter. The hidden parameter is never
  the query itself.
- Noise: the reference's distractors sometimes depend on another distractor total and have no constant;
  here they depend on core parameters only (no cycles possible among distractors) and add a constant
  half the time. Length: the whole prompt is measured and matched within 3% (the reference aims at the
  length minus 1000 tokens with an estimate that counts six copies of problem and solution, with the
  Llama-3 tokenizer, and adds `misslength // 40` statements, so its "8k" prompts are far shorter than 8k).
  `length_measure="reference"` (bench.options.length_measure) matches the reference's measure within 3%
  instead (no distractors when the problem alone exceeds it, as there); n_tokens stays the real length.
- Text: own wording for messages, questions ("What is X?" for every kind of parameter) and solutions
  (one "Define ... as V; so V = ..." step per parameter, whole sums in one step).
"""

from __future__ import annotations

import math
import random
import re
import string
from typing import Any, Callable, Dict, List, Optional, Tuple

from llmx.bench.base import BenchError, Unsatisfiable, fill_to_length
from llmx.bench.gsm_infinite.templates import THEME_BY_NAME, THEMES, Theme

__all__ = ["THEMES", "MODES", "generate_realistic", "solve_realistic", "solve_realistic_with_ops", "op_max_for"]

MODES = ("forward", "reverse")
VALUE_CAP = 1000  # the reference's detectnegative: larger numbers are "too hard to compute"
IP_MAX = 20  # the reference's --ipmax default: bound on the structure's edge count
MAX_WIDTH = 12  # items per layer in every theme vocabulary
DEP_TRIES = 8  # redraws of the dependencies for one order before the order is dropped
VALUE_TRIES = 8  # redraws of the constants and forms for one dependency graph
COUNT, AVG, TOTAL, NEWBORN = 0, 1, 2, 3  # kinds; TOTAL and NEWBORN are the abstract ones
HIDDEN_COUNT = " exists, and its number is greater than 0"
HIDDEN_AVG = " is greater than 0"
# Solution variables: 'x' is kept for the unknown of reverse mode.
LETTERS = tuple(c for c in string.ascii_uppercase + string.ascii_lowercase if c != "x")


def op_max_for(op: int) -> int:
    """The reference's per-op `--opmax` buckets (test_generate3.sh); beyond op 20, proportional growth."""
    for last, opmax in ((2, 3), (4, 4), (6, 6), (9, 10), (11, 15), (15, 20), (18, 25), (20, 30)):
        if op <= last:
            return opmax
    return math.ceil(1.5 * op)


class Param:
    __slots__ = ("kind", "top", "mid", "parts", "owners", "parents", "const", "c", "cop", "form", "value",
                 "poly", "var", "left", "seen", "pos", "ops", "first", "needed", "defined")

    def __init__(self, kind: int, top: int, mid: int, parts: Optional[List["Param"]] = None):
        self.kind, self.top, self.mid = kind, top, mid
        self.parts = parts or []  # abstracts: what they sum (NEWBORN: count, average, count, average, ...)
        self.owners: List[Param] = []  # instances: the abstracts they are part of
        self.parents: List[Param] = []  # instances: parameters they are defined from
        self.const = False  # instances: whether a constant is one of the dependencies
        self.c = 0  # that constant
        self.cop = ""  # "+" or "*": how the constant joins the parents ("" when there are no parents)
        self.form = "+"  # two parents: "+" (sum) or "-" (difference)
        self.value = 0
        self.poly: List[int] = []
        self.var = ""
        self.left = 0  # dependents not yet placed while ordering
        self.seen = False  # has a placed dependent while ordering
        self.pos = -1
        self.ops = 0  # ops budget while sampling (the reference's cur_op)
        self.first: Optional[Param] = None  # the parent given while ordering, kept across redraws
        self.needed = False
        self.defined = False

    def n_deps(self) -> int:
        return len(self.parts) if self.kind >= TOTAL else len(self.parents) + self.const


# --------------------------------------------------------------------------------------------- sampling


def _width_weights(op: int, s: int, ip_max: int) -> List[float]:
    """Cumulative weights of the layer widths 1..w: the reference's softmax of -(rel - centre)^2 with
    rel = (s-1)/(ip_max-1) and centres 0.1, 0.3, ..., 0.9 for w = 5; beyond op 30, w grows with op
    (centres spread the same way) so that larger problems have room. (Growing w already from op 20
    makes hard problems of op 21-30 three times slower to find: their op sits in the low tail.)"""
    w = 5 if op <= 30 else min(MAX_WIDTH, math.ceil(5 * op / 30))
    rel = (s - 1) / (ip_max - 1)
    cum, acc = [], 0.0
    for i in range(w):
        acc += math.exp(-((rel - (i + 0.5) / w) ** 2))
        cum.append(acc)
    return cum


def _draw_structure(rng: random.Random, d: int, s: int, ip_max: int, reverse: bool,
                    cum_weights: List[float]) -> Tuple[int, int, List[Tuple[int, int]]]:
    """Step 1 (drawStructure): layer widths, then edges; returns (n_top, n_mid, sorted edges (top, mid))."""
    t0, t1 = rng.choices(range(1, len(cum_weights) + 1), cum_weights=cum_weights, k=2)
    # The reference narrows small problems: forward d=2 wants >= 2 items per layer, reverse <= 3.
    if s <= 5:
        if reverse:
            t0, t1 = min(t0, 3), min(t1, 3)
        elif d == 2:
            t0, t1 = max(t0, 2), max(t1, 2)
    w0, w1 = min(t0, t1), max(t0, t1)
    low = (d - 1) * w0
    e = min(rng.randint(low, ip_max), rng.randint(low, ip_max), w1 * w1 if d == 2 else w1 * w1 + w1)
    widths = [w0, w0]
    p = rng.random()
    while widths[0] < w1 or widths[1] < w1:
        if widths[0] * widths[1] < e or (widths[1] != e and rng.random() < p):
            grow = [i for i in (0, 1) if widths[i] < w1]
            widths[grow[rng.randrange(len(grow))]] += 1
        else:
            break
    n_top, n_mid = widths
    if e > n_top * n_mid:
        raise Unsatisfiable("more edges than item pairs")
    edges = set()
    degree = [0] * n_top
    for j in range(n_mid):  # every middle item hangs under some top item
        t = rng.randrange(n_top)
        edges.add((t, j))
        degree[t] += 1
    tries = 0
    while len(edges) < e:  # then random edges, to top items without any first
        tries += 1
        if tries > 10 * e:
            raise Unsatisfiable("could not place the edges")
        bare = [t for t in range(n_top) if not degree[t]]
        t = bare[rng.randrange(len(bare))] if bare else rng.randrange(n_top)
        edge = (t, rng.randrange(n_mid))
        if edge not in edges:
            edges.add(edge)
            degree[t] += 1
    if not all(degree):
        raise Unsatisfiable("a top item without edges")
    return n_top, n_mid, sorted(edges)


def _biased_choice(rng: random.Random, cands: List[Param]) -> Param:
    # The reference's samplingwithbias: abstracts and already-connected parameters are preferred.
    weights = [math.exp(((p.kind >= TOTAL) + p.seen) * abs(rng.gauss(0.0, 1.0))) for p in cands]
    return rng.choices(cands, weights=weights)[0]


def _sample_order(d: int, op: int, s: int, ip_max: int, reverse: bool, rng: random.Random, cum_weights):
    """Steps 1-3a: structure, needed parameters and their topological order (query last). Returns
    (n_top, n_mid, instances, abstracts, topo) or raises Unsatisfiable."""
    n = max(rng.randint(1, s), rng.randint(1, s))
    m = rng.randint(n, s)
    n_top, n_mid, edges = _draw_structure(rng, d, s, ip_max, reverse, cum_weights)

    insts: List[Param] = []
    by_top: List[List[Param]] = [[] for _ in range(n_top)]
    for t, j in edges:
        count = Param(COUNT, t, j)
        insts.append(count)
        by_top[t].append(count)
        if d == 3:
            avg = Param(AVG, t, j)
            insts.append(avg)
            by_top[t].append(avg)
    levels: Dict[int, List[Param]] = {1: [], 2: []}
    for t in range(n_top):
        total = Param(TOTAL, t, -1, [p for p in by_top[t] if p.kind == COUNT])
        levels[1].append(total)
        if d == 3:
            levels[2].append(Param(NEWBORN, t, -1, list(by_top[t])))
    abstracts = levels[1] + levels[2]
    for a in abstracts:
        for q in a.parts:
            q.owners.append(a)

    # Step 2 (drawNecessary1): abstracts, deepest level first, while their op fits n; then extra instances.
    need_abs: List[Param] = []
    need_inst: List[Param] = []
    abs_op = 0
    pools = {lvl: list(levels[lvl]) for lvl in (1, 2)}
    updated = True
    while updated:
        updated = False
        for lvl in range(d - 1, 0, -1):
            pool = pools[lvl]
            if not pool:
                continue
            a = pool.pop(rng.randrange(len(pool)))
            if abs_op + len(a.parts) <= n:
                a.needed = True
                need_abs.append(a)
                abs_op += len(a.parts)
                for q in a.parts:
                    if not q.needed:
                        q.needed = True
                        need_inst.append(q)
                updated = True
                break
    for _ in range(1, m - abs_op):
        rest = [p for p in insts if not p.needed]
        if not rest:
            break
        q = rest[rng.randrange(len(rest))]
        q.needed = True
        need_inst.append(q)
    if not need_abs and not need_inst:
        raise Unsatisfiable("nothing needed")
    # Cheap early exit, before ordering: the widest op range `_op_range` could give for these parameters
    # (whatever edges the ordering adds, and with the one instance addingparameter may add).
    n_inst = len(need_inst)
    n_grown = n_inst + (len(need_abs) + n_inst == 2)
    if not abs_op + max(n_inst, s - abs_op) <= op <= abs_op + max(s - abs_op, n_grown) + n_grown:
        raise Unsatisfiable("op out of reach for these parameters")

    # Step 3a (drawNecessary2): order from the query backwards; a parameter may be placed once all its
    # dependents are placed, and must feed one of them, else an edge is added to keep one component.
    for a in need_abs:
        for q in a.parts:
            q.left += 1
    remaining = need_abs + need_inst
    placed: List[Param] = []
    free = [p for p in remaining if p.left == 0]
    p0 = free[rng.randrange(len(free))]
    while True:
        remaining.remove(p0)
        placed.append(p0)
        for q in p0.parts:
            q.left -= 1
            q.seen = True
        if not remaining:
            break
        ready = [p for p in remaining if p.left == 0 and p.seen]
        if not ready:
            if p0.kind >= TOTAL:
                raise Unsatisfiable("an abstract parameter cannot be connected")
            p1 = _biased_choice(rng, [p for p in remaining if p.left == 0])
            p0.parents.append(p1)
            p1.seen = True
            ready = [p1]
        elif p0.kind < TOTAL:
            chance = rng.random()
            if rng.random() < chance:
                p1 = _biased_choice(rng, remaining)
                p0.parents.append(p1)
                if not p1.seen:
                    p1.seen = True
                    if p1.left == 0:
                        ready.append(p1)
        p0 = ready[rng.randrange(len(ready))]
    topo = placed[::-1]
    if len(topo) == 2 and rng.random() < 0.5:
        # The reference's addingparameter: grow a 2-parameter order by one instance (the first unused one),
        # either as a new first parameter feeding the old first, or as a new query fed by the old one. Op 3
        # with s=2 is reachable only this way.
        extra = next((p for p in insts if not p.needed), None)
        if extra is not None:
            extra.needed = True
            if rng.random() < 0.5:
                topo[0].parents.append(extra)
                topo.insert(0, extra)
            else:
                extra.parents.append(topo[1])
                topo.append(extra)
    for i, p in enumerate(topo):
        p.pos = i

    for p in topo:
        p.first = p.parents[0] if p.parents else None
    return n_top, n_mid, insts, abstracts, topo


def _op_range(topo: List[Param], s: int) -> Tuple[int, int]:
    """Bounds on the op that `_draw_deps` can give this order ((1, 0) when it cannot work at all): an
    instance raised to c ops gets c+1 dependencies, or one less when c == 1."""
    abstract = sum(len(p.parts) for p in topo if p.kind >= TOTAL)
    insts = [p for p in topo if p.kind < TOTAL]
    start = sum(len(p.parents) for p in insts)
    room = sum(min(3, max(1, p.pos)) for p in insts)
    raised = max(s - abstract, start)
    if raised > room:
        return 1, 0
    hi = abstract + raised + len(insts)
    return hi - min(raised, len(insts)), hi


def _draw_deps(topo: List[Param], s: int, rng: random.Random) -> int:
    """Step 3b (drawNecessary3): raise the ops of random instances (at most min(3, position) each) until
    the sum reaches s, then draw each instance's dependencies from the constant and earlier parameters.
    Returns the op count."""
    total = 0
    order = []
    for p in topo:
        if p.kind >= TOTAL:
            total += len(p.parts)
        else:
            p.parents = [p.first] if p.first is not None else []
            p.const = False
            p.ops = len(p.parents)
            total += p.ops
            order.append(p)
    cands = [p for p in order if p.ops < min(3, max(1, p.pos))]
    while total < s:
        if not cands:
            raise Unsatisfiable("no room for more operations")
        i = rng.randrange(len(cands))
        p = cands[i]
        p.ops += 1
        total += 1
        if p.ops >= min(3, max(1, p.pos)):  # full: swap-remove
            cands[i] = cands[-1]
            cands.pop()
    for p in order:
        k = (1 if rng.random() < 0.5 else 2) if p.ops == 1 else p.ops + 1
        pool = topo[:p.pos]
        k = min(k, len(pool) + 1)  # +1: the constant
        if p.first is not None:
            pool.remove(p.first)
            k -= 1
        if k == len(pool) + 1:
            p.parents.extend(pool)
            p.const = True
        else:
            if rng.random() < 0.5:
                p.const = True
                k -= 1
            if k > 0:
                p.parents.extend(rng.sample(pool, k))
    return sum(p.n_deps() for p in topo)


def _draw_form(p: Param, rng: random.Random, number_range: int) -> None:
    if p.const:
        if not p.parents:
            p.cop = ""
            p.c = rng.randint(1, number_range - 1)
        elif number_range > 2 and rng.random() >= 0.5:
            p.cop = "*"
            p.c = rng.randint(2, number_range - 1)
        else:
            p.cop = "+"
            p.c = rng.randint(1, number_range - 1)
    if len(p.parents) == 2:
        p.form = "+" if rng.random() < 0.5 else "-"


def _inst_value(p: Param) -> int:
    if not p.parents:
        return p.c
    if len(p.parents) == 2 and p.form == "-":
        v = p.parents[0].value - p.parents[1].value
    else:
        v = sum(q.value for q in p.parents)
    if p.const:
        v = v + p.c if p.cop == "+" else v * p.c
    return v


def _abstract_value(a: Param) -> int:
    if a.kind == TOTAL:
        return sum(q.value for q in a.parts)
    return sum(a.parts[i].value * a.parts[i + 1].value for i in range(0, len(a.parts), 2))


def _valid(p: Param) -> bool:
    return (p.value >= 1 if p.kind == COUNT else p.value >= 0) and p.value <= VALUE_CAP


# --------------------------------------------------------------------------- polynomials (reverse mode)


def _padd(a: List[int], b: List[int], sign: int = 1) -> List[int]:
    out = [0] * max(len(a), len(b))
    for i, v in enumerate(a):
        out[i] += v
    for i, v in enumerate(b):
        out[i] += sign * v
    while len(out) > 1 and out[-1] == 0:
        out.pop()
    return out


def _pmul(a: List[int], b: List[int]) -> List[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, u in enumerate(a):
        if u:
            for j, v in enumerate(b):
                out[i + j] += u * v
    while len(out) > 1 and out[-1] == 0:
        out.pop()
    return out


def _peval(a: List[int], x: int) -> int:
    v = 0
    for coef in reversed(a):
        v = v * x + coef
    return v


def _pstr(a: List[int]) -> str:
    terms = []
    for deg in range(len(a) - 1, -1, -1):
        c = a[deg]
        if c == 0:
            continue
        mag = abs(c)
        if deg == 0:
            body = str(mag)
        else:
            body = ("" if mag == 1 else f"{mag}*") + ("x" if deg == 1 else f"x^{deg}")
        terms.append((c < 0, body))
    if not terms:
        return "0"
    text = ("-" if terms[0][0] else "") + terms[0][1]
    for neg, body in terms[1:]:
        text += (" - " if neg else " + ") + body
    return text


def _wrap(a: List[int]) -> str:
    text = _pstr(a)
    return text if (len(a) == 1 and a[0] >= 0) or a == [0, 1] else f"({text})"


def _other_positive_root(q: List[int], h: int) -> bool:
    """Whether q (with q(h) == 0) has a positive integer root other than h."""
    if len(q) == 2:
        return False
    # Divide by (x - h) (synthetic division), then look for positive roots among divisors of the constant.
    quot = [0] * (len(q) - 1)
    carry = 0
    for i in range(len(q) - 1, 0, -1):
        carry = q[i] + carry * h
        quot[i - 1] = carry
    while len(quot) > 1 and quot[0] == 0:  # a root at 0 is not positive
        quot = quot[1:]
    c0 = abs(quot[0])
    if len(quot) == 1:
        return False
    limit = math.isqrt(c0)
    if limit > 100_000:
        raise Unsatisfiable("equation too large to check")
    for r in range(1, limit + 1):
        if c0 % r == 0:
            for cand in (r, c0 // r):
                if cand != h and _peval(quot, cand) == 0:
                    return True
    return False


# ------------------------------------------------------------------------------------------------ text


class _Namer:
    def __init__(self, theme: Theme, tops: List[str], mids: List[str]):
        self.theme, self.tops, self.mids = theme, tops, mids

    def __call__(self, p: Param) -> str:
        top = self.tops[p.top]
        if p.kind == COUNT:
            return f"the number of {self.mids[p.mid]} in {top}"
        if p.kind == AVG:
            return f"the average number of {self.theme.child} per {self.mids[p.mid]} in {top}"
        if p.kind == TOTAL:
            return f"the total number of {self.theme.cat1} in {top}"
        return f"the total number of {self.theme.cat2} in {top}"


def _rhs(p: Param, name: Callable[[Param], str]) -> str:
    if not p.parents:
        return str(p.c)
    names = [name(q) for q in p.parents]
    if len(names) == 1:
        inner = names[0]
    elif len(names) == 2:
        inner = (f"the sum of {names[0]} and {names[1]}" if p.form == "+"
                 else f"the difference between {names[0]} and {names[1]}")
    else:
        inner = "the sum of " + ", ".join(names[:-1]) + ", and " + names[-1]
    if p.const:
        return f"{p.c} {'plus' if p.cop == '+' else 'times'} {inner}"
    return inner


def _statement(p: Param, name: Callable[[Param], str]) -> str:
    return "The " + name(p)[4:] + " equals " + _rhs(p, name)


def _step(p: Param, sym_of: Callable[[Param], str], num_of: Callable[[Param], str]) -> Tuple[str, str]:
    """(symbolic, substituted) right-hand sides of one solution step."""
    if p.kind == TOTAL:
        return " + ".join(sym_of(q) for q in p.parts), " + ".join(num_of(q) for q in p.parts)
    if p.kind == NEWBORN:
        pairs = [(p.parts[i], p.parts[i + 1]) for i in range(0, len(p.parts), 2)]
        return (" + ".join(f"{sym_of(a)} * {sym_of(b)}" for a, b in pairs),
                " + ".join(f"{num_of(a)} * {num_of(b)}" for a, b in pairs))
    if not p.parents:
        return str(p.c), str(p.c)
    joiner = " - " if len(p.parents) == 2 and p.form == "-" else " + "
    sym = joiner.join(sym_of(q) for q in p.parents)
    num = joiner.join(num_of(q) for q in p.parents)
    if p.const:
        if len(p.parents) > 1:
            sym, num = f"({sym})", f"({num})"
        op = " + " if p.cop == "+" else " * "
        sym, num = f"{p.c}{op}{sym}", f"{p.c}{op}{num}"
    return sym, num


def _define(name: str, var: str, chain: List[str]) -> str:
    steps = [var]
    for part in chain:
        if part != steps[-1]:
            steps.append(part)
    return f"Define {name} as {var}; so {' = '.join(steps)}."


def _forward_solution(topo: List[Param], name) -> str:
    lines = []
    for p in topo:
        sym, num = _step(p, lambda q: q.var, lambda q: str(q.value))
        lines.append(_define(name(p), p.var, [sym, num, str(p.value)]))
    lines.append(f"Answer: {topo[-1].value}.")
    return " ".join(lines)


def _reverse_solution(topo: List[Param], hidden: Param, name) -> str:
    lines = ["The unknown quantity is easiest to find with an equation."]
    for p in topo:
        if p is hidden:
            lines.append(f"Define {name(p)} as x; its value is not given, so we keep it as the unknown x.")
            continue
        sym, num = _step(p, lambda q: q.var, lambda q: _wrap(q.poly))
        lines.append(_define(name(p), p.var, [sym, num, _pstr(p.poly)]))
    query = topo[-1]
    poly, target, h = query.poly, query.value, hidden.value
    lines.append(f"We are told that {name(query)} equals {target}, so {_pstr(poly)} = {target}.")
    if len(poly) == 2:
        a, b = poly[1], poly[0]
        lhs = _pstr([0, a])
        if b > 0:
            lines.append(f"Subtracting {b} from both sides gives {lhs} = {target - b}.")
        elif b < 0:
            lines.append(f"Adding {-b} to both sides gives {lhs} = {target - b}.")
        if a != 1:
            lines.append(f"Dividing both sides by {a} gives x = {h}.")
    else:
        lines.append(f"This equation has degree {len(poly) - 1}; among the positive whole numbers only x = {h} "
                     f"satisfies it, since putting x = {h} into {_pstr(poly)} gives {target}.")
    lines.append(f"Answer: {h}.")
    return " ".join(lines)


def _join(statements: List[str]) -> str:
    return ". ".join(statements) + "."


def _render(message: str, statements: List[str], question: str) -> str:
    return f"{message}\n\nProblem: {_join(statements)}\nQuestion: {question}"


# ----------------------------------------------------------------------------------------------- noise

REFERENCE_BUFFER = 1000  # the reference aims its measure at the length minus 1000 tokens


def _reference_measure(message: str, solution: str, count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    """The reference's length of a prompt: tokens of instruction + 6 x (problem + question + solution) +
    problem + question, i.e. six copies of the solved problem besides the asked one. Summed per part here
    (the reference tokenizes the concatenation; the two differ by a few tokens at the seams)."""
    m, sol = count_tokens(message), count_tokens(solution)
    return lambda prompt: (lambda n: n + 6 * (n - m + sol))(count_tokens(prompt))



class _Noise:
    """Prefix-stable stream of distractor statements: noise(k) == noise(k + 1)[:k]."""

    def __init__(self, theme: Theme, d: int, refs: List[Tuple[str, int]], number_range: int, seed: int):
        self.theme, self.d, self.refs, self.number_range = theme, d, refs, number_range
        self.rng = random.Random(seed)
        self.cache: List[str] = []
        self.stream = self._statements()

    def __call__(self, k: int) -> List[str]:
        while len(self.cache) < k:
            self.cache.append(next(self.stream))
        return self.cache[:k]

    def _statements(self):
        r, theme = self.rng, self.theme
        for top in r.sample(theme.noise_tops, len(theme.noise_tops)):
            for mid in r.sample(theme.noise_mids, r.randint(3, 8)):
                yield self._define(f"the number of {mid} in {top}", 1)
                if self.d == 3:
                    yield self._define(f"the average number of {theme.child} per {mid} in {top}", 0)
        raise BenchError(f"gsm_infinite: the {theme.name} distractor vocabulary is exhausted; ask for a shorter context")

    def _define(self, name: str, least: int) -> str:
        r = self.rng
        refs = r.sample(self.refs, 1 if r.random() < 0.5 else 2)
        if len(refs) == 2:
            (na, va), (nb, vb) = refs
            if r.random() < 0.5 or va == vb:
                inner, value = f"the sum of {na} and {nb}", va + vb
            else:  # keep the difference positive: these values are never checked by anyone
                if va < vb:
                    (na, va), (nb, vb) = (nb, vb), (na, va)
                inner, value = f"the difference between {na} and {nb}", va - vb
        else:
            inner, value = refs[0]
        if r.random() < 0.5 or value < least:  # a constant half the time, and always to lift a zero count
            if self.number_range > 2 and value >= least and r.random() < 0.5:
                c = r.randint(2, self.number_range - 1)
                if value * c <= VALUE_CAP:
                    return "The " + name[4:] + f" equals {c} times {inner}"
            inner = f"{r.randint(1, max(1, self.number_range - 1))} plus {inner}"
        return "The " + name[4:] + " equals " + inner


# ------------------------------------------------------------------------------------------- generator


def _draw_values(topo: List[Param], reverse: bool, rng: random.Random, number_range: int,
                 linear_only: bool) -> Optional[Param]:
    """Step 4: forms, constants and values of the needed parameters, in order. Returns the hidden
    parameter in reverse mode (else None); raises Unsatisfiable when a value or the equation is unfit."""
    for p in topo:
        if p.kind >= TOTAL:
            p.value = _abstract_value(p)
        else:
            if len(p.parents) > 1:
                rng.shuffle(p.parents)
            _draw_form(p, rng, number_range)
            p.value = _inst_value(p)
        if not _valid(p):
            raise Unsatisfiable("a value out of range")
    if not reverse:
        return None
    hidden = None
    for p in reversed(topo[:-1]):
        if p.kind < TOTAL and not p.parents:
            hidden = p
            break
    if hidden is None:
        raise Unsatisfiable("no plain constant to hide")
    for p in topo:
        if p is hidden:
            p.poly = [0, 1]
        elif p.kind == TOTAL:
            p.poly = [0]
            for q in p.parts:
                p.poly = _padd(p.poly, q.poly)
        elif p.kind == NEWBORN:
            p.poly = [0]
            for i in range(0, len(p.parts), 2):
                p.poly = _padd(p.poly, _pmul(p.parts[i].poly, p.parts[i + 1].poly))
        elif not p.parents:
            p.poly = [p.c]
        else:
            if len(p.parents) == 2 and p.form == "-":
                poly = _padd(p.parents[0].poly, p.parents[1].poly, -1)
            else:
                poly = [0]
                for q in p.parents:
                    poly = _padd(poly, q.poly)
            if p.const:
                poly = _padd(poly, [p.c]) if p.cop == "+" else _pmul(poly, [p.c])
            p.poly = poly
    poly = topo[-1].poly
    if len(poly) < 2:
        raise Unsatisfiable("the stated value does not depend on the hidden one")
    if linear_only and len(poly) > 2:
        raise Unsatisfiable("not a first-order equation")
    eq = list(poly)
    eq[0] -= topo[-1].value
    if _other_positive_root(eq, hidden.value):
        raise Unsatisfiable("more than one positive integer solution")
    return hidden


def _attempt(d: int, op: int, reverse: bool, theme: Theme, number_range: int, rng: random.Random,
             s: int, ip_max: int, cum_weights, linear_only: bool = False, dep_tries: int = DEP_TRIES,
             value_tries: int = VALUE_TRIES):
    n_top, n_mid, insts, abstracts, topo = _sample_order(d, op, s, ip_max, reverse, rng, cum_weights)
    # Nested rejection: an order whose op range misses the target is dropped at once; otherwise the
    # dependencies, then the values, are redrawn a few times for the same order before giving it up.
    lo, hi = _op_range(topo, s)
    if not lo <= op <= hi:
        raise Unsatisfiable("op out of reach for this order")
    for _ in range(dep_tries):
        if _draw_deps(topo, s, rng) == op:
            break
    else:
        raise Unsatisfiable(f"op != {op}")
    for _ in range(value_tries):
        try:
            hidden = _draw_values(topo, reverse, rng, number_range, linear_only)
            break
        except Unsatisfiable:
            continue
    else:
        raise Unsatisfiable("no valid values")
    for p in topo:
        p.defined = True

    # Step 5: the unnecessary parameters, each from the constant and parameters defined before it.
    usable = list(topo)
    for a in abstracts:
        if not a.needed and all(q.defined for q in a.parts):
            a.value = _abstract_value(a)
            a.defined = True
            usable.append(a)
    rest = [p for p in insts if not p.defined]
    rng.shuffle(rest)
    independent: List[Param] = []
    for p in rest:
        if rng.random() < 0.5:
            pool = list(independent)
            independent.append(p)
        else:
            pool = list(usable)
        k = 1
        while k < min(4, len(pool) + 1) and rng.random() < 0.5:
            k += 1
        if k == len(pool) + 1:
            p.parents, p.const = pool, True
        else:
            p.const = rng.random() < 0.5
            p.parents = rng.sample(pool, k - p.const) if k - p.const > 0 else []
        _draw_form(p, rng, number_range)
        p.value = _inst_value(p)
        if not _valid(p) and len(p.parents) == 2 and p.form == "-":
            p.parents.reverse()
            p.value = _inst_value(p)
        if not _valid(p) and p.const and p.cop == "*":
            p.cop, p.c = "+", rng.randint(1, number_range - 1)
            p.value = _inst_value(p)
        if not _valid(p):
            p.parents, p.const, p.cop, p.c = [], True, "", rng.randint(1, number_range - 1)
            p.value = p.c
        p.defined = True
        usable.append(p)
        for a in p.owners:
            if not a.defined and all(q.defined for q in a.parts):
                a.value = _abstract_value(a)
                a.defined = True
                usable.append(a)

    # Text.
    name = _Namer(theme, rng.sample(theme.tops, n_top), rng.sample(theme.mids, n_mid))
    statements = []
    for p in insts:
        if p is hidden:
            statements.append("The " + name(p)[4:] + (HIDDEN_AVG if p.kind == AVG else HIDDEN_COUNT))
        else:
            statements.append(_statement(p, name))
    if len(topo) > len(LETTERS):
        letters = list(LETTERS) + [f"{c}{i}" for i in range(1, 1 + len(topo) // len(LETTERS)) for c in LETTERS]
        rng.shuffle(letters)
    else:
        letters = rng.sample(LETTERS, len(topo))
    for p, var in zip(topo, letters):
        p.var = var
    if reverse:
        hidden.var = "x"
        query = topo[-1]
        statements.append("The " + name(query)[4:] + f" equals {query.value}")
        question = f"What is {name(hidden)}?"
        solution = _reverse_solution(topo, hidden, name)
        answer = hidden.value
    else:
        question = f"What is {name(topo[-1])}?"
        solution = _forward_solution(topo, name)
        answer = topo[-1].value
    refs = [(name(p), p.value) for p in insts + [a for a in abstracts if a.defined]]
    return statements, question, solution, answer, refs


def generate_realistic(d: int, op: int, mode: str, template: str, length: int, rng: random.Random,
                       count_tokens: Optional[Callable[[str], int]], number_range: int = 5,
                       max_attempts: int = 2000, linear_only: bool = False, dep_tries: int = DEP_TRIES,
                       value_tries: int = VALUE_TRIES, length_measure: str = "tokens") -> Dict[str, Any]:
    """One medium (d=2) or hard (d=3) problem with exactly `op` operations; see the module docstring.
    `linear_only` keeps only first-order reverse equations, as the reference does; `length_measure` is
    "tokens" (the prompt measures `length`) or "reference" (the reference's measure, `_reference_measure`)."""
    if d not in (2, 3):
        raise BenchError(f"gsm_infinite realistic: d={d!r}; valid: 2 (medium), 3 (hard)")
    if mode not in MODES:
        raise BenchError(f"gsm_infinite realistic: unknown mode {mode!r}; valid modes: {list(MODES)}")
    if template not in THEME_BY_NAME:
        raise BenchError(f"gsm_infinite realistic: unknown template {template!r}; valid templates: {list(THEMES)}")
    if op < 2:
        raise BenchError(f"gsm_infinite realistic: op={op} is impossible; the smallest problem has op=2 (a "
                         "question needs one defined quantity and one derived from it)")
    if number_range < 2:
        raise BenchError(f"gsm_infinite realistic: number_range={number_range} must be >= 2")
    if length < 0:
        raise BenchError(f"gsm_infinite realistic: length={length} must be >= 0 tokens")
    if length > 0 and count_tokens is None:
        raise BenchError("gsm_infinite realistic: a context length needs a token counter (count_tokens)")
    theme = THEME_BY_NAME[template]
    reverse = mode == "reverse"
    s = (op_max_for(op) + 1) // 2
    ip_max = max(IP_MAX, op)
    cum = _width_weights(op, s, ip_max)
    message = theme.message + (" " + theme.reverse_hint if reverse else "")

    for _ in range(max_attempts):
        try:
            statements, question, solution, answer, refs = _attempt(d, op, reverse, theme, number_range, rng, s,
                                                                    ip_max, cum, linear_only,
                                                                    dep_tries, value_tries)
            if length > 0:
                noise = _Noise(theme, d, refs, number_range, rng.getrandbits(64))
                shown: List[List[str]] = []

                def render(stmts: List[str]) -> str:
                    shown.append(stmts)
                    return _render(message, stmts, question)

                if length_measure == "reference":
                    # A distractor lengthens the problem, which the measure counts 7 times.
                    prompt, _, n_noise = fill_to_length(render, statements, noise, length - REFERENCE_BUFFER,
                                                        _reference_measure(message, solution, count_tokens), rng,
                                                        allow_over=True, count_piece=lambda s: 7 * count_tokens(s))
                    n_tokens = count_tokens(prompt)
                else:
                    prompt, n_tokens, n_noise = fill_to_length(render, statements, noise, length, count_tokens, rng)
                statements = shown[-1]
            else:
                rng.shuffle(statements)
                prompt, n_noise = _render(message, statements, question), 0
                n_tokens = count_tokens(prompt) if count_tokens else 0
        except Unsatisfiable:
            continue
        return {
            "prompt": prompt,
            "problem": _join(statements),
            "question": question,
            "solution": solution,
            "answer": str(answer),
            "op": op,
            "length": length,
            "n_tokens": n_tokens,
            "template": template,
            "mode": mode,
            "d": d,
            "n_noise": n_noise,
        }
    raise BenchError(f"gsm_infinite realistic: no problem with d={d}, op={op}, mode={mode}, template={template} "
                     f"found in {max_attempts} attempts")


# ---------------------------------------------------------------------------------------------- solver
#
# Works from the text alone (problem, question, and the theme's category phrases): it shares no code
# with the sampler above beyond the theme vocabulary, and solves reverse problems with sympy.

_CONST_RHS = re.compile(r"(\d+)(?: (plus|times) (.+))?")


def _parse_name(text: str, theme: Theme) -> Tuple[str, ...]:
    """'the number of A in L' -> ('count', A, L); averages -> ('avg', A, L); totals -> ('total'|'newborn', L)."""
    def split_in(body: str) -> Tuple[str, str]:
        if body.count(" in ") != 1:
            raise BenchError(f"cannot parse the quantity {text!r}")
        left, _, right = body.partition(" in ")
        return left, right

    if text.startswith("the number of "):
        return ("count",) + split_in(text[len("the number of "):])
    if text.startswith("the average number of "):
        body = text[len("the average number of "):]
        child, sep, rest = body.partition(" per ")
        if not sep or child != theme.child:
            raise BenchError(f"cannot parse the average {text!r}")
        return ("avg",) + split_in(rest)
    if text.startswith("the total number of "):
        cat, top = split_in(text[len("the total number of "):])
        if cat == theme.cat1:
            return ("total", top)
        if cat == theme.cat2:
            return ("newborn", top)
        raise BenchError(f"unknown total {text!r} for theme {theme.name}")
    raise BenchError(f"cannot parse the quantity {text!r}")


def _parse_rhs(rhs: str, theme: Theme) -> Tuple[Optional[int], str, str, List[Tuple[str, ...]]]:
    """-> (constant or None, '+'/'*'/'' how it joins, '+'/'-' how the refs combine, refs)."""
    m = _CONST_RHS.fullmatch(rhs)
    if m and m.group(2) is None:
        return int(m.group(1)), "", "+", []
    const, join, inner = None, "", rhs
    if m:
        const, join, inner = int(m.group(1)), "+" if m.group(2) == "plus" else "*", m.group(3)
    combine = "+"
    if inner.startswith("the sum of "):
        body = inner[len("the sum of "):]
        if ", " in body:
            items = body.split(", ")
            if not items[-1].startswith("and ") or len(items) < 3:
                raise BenchError(f"cannot parse the sum {inner!r}")
            items[-1] = items[-1][4:]
        else:
            items = body.split(" and ")
            if len(items) != 2:
                raise BenchError(f"cannot parse the sum {inner!r}")
    elif inner.startswith("the difference between "):
        items = inner[len("the difference between "):].split(" and ")
        if len(items) != 2:
            raise BenchError(f"cannot parse the difference {inner!r}")
        combine = "-"
    else:
        items = [inner]
    return const, join, combine, [_parse_name(item, theme) for item in items]


def solve_realistic_with_ops(record: Dict[str, Any]) -> Tuple[int, int]:
    """Re-solve a medium/hard record from its text: (answer, op). Raises BenchError when the text does not
    parse, a needed quantity is undefined or cyclic, or a reverse problem has no unique positive answer."""
    theme = THEME_BY_NAME.get(record.get("template", ""))
    if theme is None:
        raise BenchError(f"unknown template {record.get('template')!r}; valid templates: {list(THEMES)}")
    problem, question = record["problem"].strip(), record["question"].strip()
    if not problem.endswith(".") or not question.startswith("What is ") or not question.endswith("?"):
        raise BenchError("the problem or question is not in the expected form")
    asked = _parse_name(question[len("What is "):-1], theme)

    defs: Dict[Tuple[str, ...], List[tuple]] = {}
    hidden: List[Tuple[str, ...]] = []
    mentioned: List[Tuple[str, ...]] = []
    for sentence in problem[:-1].split(". "):
        if not sentence.startswith("The "):
            raise BenchError(f"cannot parse the statement {sentence!r}")
        sentence = "the " + sentence[4:]
        if sentence.endswith(HIDDEN_COUNT) or sentence.endswith(HIDDEN_AVG):
            key = _parse_name(sentence[:-len(HIDDEN_COUNT if sentence.endswith(HIDDEN_COUNT) else HIDDEN_AVG)], theme)
            if key[0] not in ("count", "avg"):
                raise BenchError(f"only a count or an average can be unknown: {sentence!r}")
            hidden.append(key)
            mentioned.append(key)
            continue
        lhs, sep, rhs = sentence.partition(" equals ")
        if not sep:
            raise BenchError(f"cannot parse the statement {sentence!r}")
        key = _parse_name(lhs, theme)
        const, join, combine, refs = _parse_rhs(rhs, theme)
        defs.setdefault(key, []).append((const, join, combine, refs))
        mentioned.append(key)
        mentioned.extend(refs)

    # Implicit totals: over every count/average mentioned for that top item.
    counts_at: Dict[str, List[Tuple[str, ...]]] = {}
    mids_at: Dict[str, List[str]] = {}
    for key in dict.fromkeys(mentioned):
        if key[0] == "count":
            counts_at.setdefault(key[2], []).append(key)
        if key[0] in ("count", "avg") and key[1] not in mids_at.setdefault(key[2], []):
            mids_at[key[2]].append(key[1])
    known = set(mentioned)

    # Definitions vs. the one stated value of reverse mode (a total with a statement, or a second,
    # plain-number statement about a quantity that already has a definition).
    constraints: List[Tuple[Tuple[str, ...], int]] = []
    definition: Dict[Tuple[str, ...], tuple] = {}
    for key, stmts in defs.items():
        if key in hidden:
            raise BenchError(f"{key} is both unknown and defined")
        if key[0] in ("total", "newborn"):
            if len(stmts) != 1 or stmts[0][3]:
                raise BenchError(f"a total can only be stated as a number: {key}")
            constraints.append((key, stmts[0][0]))
        elif len(stmts) == 1:
            definition[key] = stmts[0]
        elif len(stmts) == 2 and sum(1 for s in stmts if not s[3]) == 1:
            plain = stmts[0] if not stmts[0][3] else stmts[1]
            definition[key] = stmts[1] if plain is stmts[0] else stmts[0]
            constraints.append((key, plain[0]))
        else:
            raise BenchError(f"{key} is defined {len(stmts)} times")

    def deps(key: Tuple[str, ...]) -> Tuple[int, List[Tuple[str, ...]]]:
        """(in-degree, dependencies) of one quantity; a constant counts as one dependency."""
        if key[0] == "total":
            parts = counts_at.get(key[1], [])
            return len(parts), parts
        if key[0] == "newborn":
            parts = [k for mid in mids_at.get(key[1], []) for k in (("count", mid, key[1]), ("avg", mid, key[1]))]
            return len(parts), [k for k in parts if k in known]
        if key in hidden:
            return 1, []
        if key not in definition:
            raise BenchError(f"{key} is needed but never defined")
        const, _, _, refs = definition[key]
        return len(refs) + (const is not None), refs

    unknown: Dict[Tuple[str, ...], Any] = {}
    if hidden:
        import sympy

        if len(hidden) != 1 or len(constraints) != 1:
            raise BenchError(f"a reverse problem needs one unknown and one stated value, found {len(hidden)} and "
                             f"{len(constraints)}")
        unknown[hidden[0]] = sympy.Symbol("x")
    elif constraints:
        raise BenchError(f"{constraints[0][0]} is defined twice but nothing is unknown")

    memo: Dict[Tuple[str, ...], Any] = {}
    visiting = set()

    def value(key: Tuple[str, ...]):
        if key in memo:
            return memo[key]
        if key in visiting:
            raise BenchError(f"{key} depends on itself")
        visiting.add(key)
        if key in unknown:
            v = unknown[key]
        elif key[0] == "total":
            v = sum(value(k) for k in counts_at.get(key[1], []))
        elif key[0] == "newborn":
            v = 0
            for mid in mids_at.get(key[1], []):
                count, avg = ("count", mid, key[1]), ("avg", mid, key[1])
                v += (value(count) if count in known else 0) * (value(avg) if avg in known else 0)
        else:
            deps(key)  # raises if undefined
            const, join, combine, refs = definition[key]
            vals = [value(k) for k in refs]
            if not vals:
                v = const
            else:
                v = vals[0] - vals[1] if combine == "-" else sum(vals)
                if const is not None:
                    v = v + const if join == "+" else v * const
        visiting.discard(key)
        memo[key] = v
        return v

    def op_count(root: Tuple[str, ...]) -> int:
        seen, stack, total = {root}, [root], 0
        while stack:
            n, ds = deps(stack.pop())
            total += n
            for k in ds:
                if k not in seen:
                    seen.add(k)
                    stack.append(k)
        return total

    if not hidden:
        answer = value(asked)
        if not isinstance(answer, int):
            raise BenchError(f"the answer {answer!r} is not an integer")
        return answer, op_count(asked)

    import sympy

    if asked != hidden[0]:
        raise BenchError("the question does not ask for the unknown quantity")
    key, stated = constraints[0]
    x = unknown[hidden[0]]
    expr = sympy.expand(value(key) - stated)
    if not expr.has(x):
        raise BenchError("the stated value does not involve the unknown quantity")
    roots = set()
    for factor, _ in sympy.factor_list(expr, x)[1]:
        poly = sympy.Poly(factor, x)
        if poly.degree() == 1:
            a, b = poly.all_coeffs()
            r = sympy.Rational(-b, a)
            if r.is_integer and r > 0:
                roots.add(int(r))
    if len(roots) != 1:
        raise BenchError(f"the equation {expr} = 0 has {len(roots)} positive integer solutions")
    return roots.pop(), op_count(key)


def solve_realistic(record: Dict[str, Any]) -> int:
    return solve_realistic_with_ops(record)[0]
