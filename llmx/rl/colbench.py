"""ColBench backend programming (SWEET-RL, Zhou et al. 2025, arXiv 2503.15478, §3.2): tasks, scoring,
an offline task generator and a scripted collaborator.

A task is the reference's record: a vague `problem_description` the agent sees, a hidden reference
function `ground_truth` (the training-time information c of the paper's Eq. 2-3, seen only by the
human simulator and the critic) and 10 `test_cases` (name -> call expression). Reward = passed/total,
where a test counts only when the reference's output is not None and equals the agent's (the reference's
rule, sweet_rl/utils/code_utils.py); success = all tests pass.

Differences from the reference, each deliberate:
* Code runs in llmx.rl.sandbox (a limited child process, explicit namespaces so Python 3.13 works), not
  in-process with exec + signal.alarm; so there is no word blacklist ("import os", "print(", ...): the
  sandbox contains what the blacklist tried to keep out. The reference's own function also runs in the
  sandbox, with the same per-call timeout (the reference gives it none).
* A reference output that comes back from the sandbox as an unserializable tag ("<unserializable T>")
  never counts, since two such tags compare equal where the objects (compared by identity) would not.

The offline generator replaces the paper's Llama-3.1-70B task generation (no such model here). Each
family is one small function whose details ("slots": a rate, a threshold, >= or >, round or int) are
left open by the description. Templates are short, plain and uniform across families, slot values are
short and appear verbatim in both the simulator's reply and the code: a ~2M-parameter model trained here
must learn to play the agent by SFT on scripted dialogues (`scripted_turns`). Each family documents its
slots: candidate values, keywords for the rule-based simulator, 2-3 question paraphrases and a reply.
Test inputs are chosen per task so that changing any one slot to any other candidate changes at least
one of the 10 outputs (checked in-process on our own trusted templates); a kept task's reference then
also passes its own tests in the sandbox with non-None outputs.

How tests are chosen (the paper's generator asks the LLM for 10 tests; ours are computed): 60 distinct
random inputs per task (half of the threshold-like arguments drawn at candidate thresholds, where >= and >
differ), then greedily the input that tells the most not-yet-told one-slot alternatives apart, until all
are told (else the assignment is skipped), filled up to 10 with the remaining random inputs, shuffled.

Difficulty: an agent that asks each slot with probability p and guesses the others uniformly succeeds
with probability prod_slots (p + (1 - p) / k_slot); with 3-4 slots of 2-5 candidates that is ~20% at
p = 0.5 (the design's target is 20-30%) and 100% when every slot is asked. All 11 families together hold
1393 distinct verified tasks (seed 0), so splits of up to ~1400 tasks have no duplicates.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from llmx.rl.sandbox import CallResult, Limits, run_many, run_calls
from llmx.utils import LlmxError, atomic_write_text

MAX_ROUNDS = 10  # agent turns per episode (reference: max_steps=10)
END_MARKER = "I WANT TO ANSWER:"
REPLY_CHARS = 400  # simulator replies are cut here (reference, backend tasks)
N_TESTS = 10

AGENT_SYSTEM_PROMPT = (
    "You help a human write a Python function. The human describes it only vaguely but knows the details. "
    "Ask short clarifying questions, one per turn; the human answers briefly, in at most two sentences. "
    f"You have at most {MAX_ROUNDS} turns. When you are ready, write \"{END_MARKER}\" followed by the whole "
    "function as raw python code and nothing else. Be concise."
)


# --- task records ---------------------------------------------------------------------------------


@dataclass
class Task:
    task_id: str
    problem_description: str
    ground_truth: str
    test_cases: Dict[str, str]
    family: Optional[str] = None
    hidden: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d: Dict[str, Any] = {
            "task_id": self.task_id,
            "problem_description": self.problem_description,
            "ground_truth": self.ground_truth,
            "test_cases": dict(self.test_cases),
        }
        if self.family is not None:
            d["family"] = self.family
        if self.hidden:
            d["hidden"] = dict(self.hidden)
        return d

    @staticmethod
    def from_json(d: Any, where: str = "task") -> "Task":
        """A Task from our record or the official ColBench one (test_cases as a dict or a JSON string of
        one; no task_id: one is made from the content). Errors name `where` and the field."""
        if not isinstance(d, dict):
            raise LlmxError(f"{where}: a task must be a JSON object, got {type(d).__name__}")
        for name in ("problem_description", "ground_truth"):
            if name not in d:
                raise LlmxError(f"{where}: missing field {name!r}")
            if not isinstance(d[name], str):
                raise LlmxError(f"{where}: field {name!r} must be a string, got {type(d[name]).__name__}")
        if "test_cases" not in d:
            raise LlmxError(f"{where}: missing field 'test_cases'")
        tests = d["test_cases"]
        if isinstance(tests, str):
            try:
                tests = json.loads(tests)
            except ValueError as e:
                raise LlmxError(f"{where}: field 'test_cases' is a string but not JSON ({e})") from None
        if not isinstance(tests, dict) or not tests:
            raise LlmxError(
                f"{where}: field 'test_cases' must be a non-empty dict name -> call string (or a JSON string of one), "
                f"got {type(tests).__name__}"
            )
        bad = [k for k, v in tests.items() if not isinstance(v, str)]
        if bad:
            raise LlmxError(f"{where}: field 'test_cases': {bad[0]!r} is not a call string")
        hidden = d.get("hidden") or {}
        if not isinstance(hidden, dict):
            raise LlmxError(f"{where}: field 'hidden' must be a dict slot -> value, got {type(hidden).__name__}")
        family = d.get("family")
        if family is not None and not isinstance(family, str):
            raise LlmxError(f"{where}: field 'family' must be a string")
        task_id = d.get("task_id")
        if task_id is None:
            content = (d["problem_description"] + "\0" + d["ground_truth"]).encode()
            task_id = "task-" + hashlib.sha256(content).hexdigest()[:12]
        return Task(str(task_id), d["problem_description"], d["ground_truth"], {str(k): v for k, v in tests.items()},
                    family, dict(hidden))


def load_tasks(path: Any) -> List[Task]:
    """Every task of a JSONL file (official ColBench backend records or ours); the first bad line
    raises one LlmxError naming file:line and the field. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LlmxError(f"{path}: no such task file")
    from llmx.rl.data import jsonl_records

    tasks = [Task.from_json(d, where) for where, d in jsonl_records(path)]
    if not tasks:
        raise LlmxError(f"{path}: no tasks in the file")
    return tasks


def save_tasks(path: Any, tasks: Sequence[Task]) -> None:
    atomic_write_text(path, "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in tasks))


# --- scoring ----------------------------------------------------------------------------------------


def strip_fences(text: str) -> str:
    """Markdown code fences removed, as the reference does (```python and ``` anywhere)."""
    return text.replace("```python", "").replace("```", "").strip()


def extract_answer(turn: str, end_marker: str = END_MARKER) -> str:
    """The code of an agent turn: the text after the first end marker (the whole turn when there is
    none: the reference scores the last turn when the round limit is hit), fences stripped."""
    i = turn.find(end_marker)
    return strip_fences(turn[i + len(end_marker):] if i >= 0 else turn)


def expected_outputs(task: Task, limits: Limits = Limits()) -> List[CallResult]:
    """The reference function's result on each test, run in the sandbox (callers cache it)."""
    return run_calls(task.ground_truth, list(task.test_cases.values()), limits).calls


def _counts(e: CallResult) -> bool:
    return e.ok and e.value is not None and not (isinstance(e.value, str) and e.value.startswith("<unserializable"))


def count_passed(expected: Sequence[CallResult], got: Sequence[CallResult]) -> int:
    return sum(1 for e, g in zip(expected, got) if _counts(e) and g.ok and g.value == e.value)


def score(task: Task, answer_code: str, expected: Optional[Sequence[CallResult]] = None,
          limits: Limits = Limits()) -> Tuple[int, int]:
    """(passed, total) of `answer_code` on the task's tests."""
    if expected is None:
        expected = expected_outputs(task, limits)
    got = run_calls(answer_code, list(task.test_cases.values()), limits).calls
    return count_passed(expected, got), len(task.test_cases)


# --- offline task families --------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    name: str
    candidates: Tuple[Any, ...]
    keywords: Tuple[str, ...]  # words or phrases (matched word by word) that make the rule simulator answer
    questions: Tuple[str, ...]  # paraphrases the scripted agent asks
    reply: str  # one sentence with "{value}"


@dataclass(frozen=True)
class Family:
    name: str
    signature: str
    description: str  # vague: purpose and signature, never a slot value
    template: str  # the reference code, "{slot}" placeholders
    slots: Tuple[Slot, ...]
    inputs: Callable[[random.Random], Tuple[Any, ...]]  # one random argument tuple


def _pick(rng: random.Random, low: int, high: int, edges: Sequence[int]) -> int:
    # Half the draws hit a candidate threshold exactly, so that >= vs > and < vs <= can be told apart.
    return rng.choice(edges) if rng.random() < 0.5 else rng.randint(low, high)


FAMILIES: Dict[str, Family] = {}


def _family(f: Family) -> None:
    FAMILIES[f.name] = f


_family(Family(
    "shipping_cost", "shipping_cost(weight, express)",
    "returns the shipping cost of a parcel. It depends on the weight and on express delivery.",
    "def shipping_cost(weight, express):\n"
    "    if weight {op} {limit}:\n"
    "        return 0\n"
    "    cost = weight * {rate}\n"
    "    if express:\n"
    "        cost = cost + {extra}\n"
    "    return cost\n",
    (
        Slot("rate", (2, 3, 4, 5, 6), ("rate", "kg"), ("What is the rate per kg?", "How much does each kg cost?"),
             "The rate is {value} per kg."),
        Slot("extra", (5, 10, 15, 20), ("express",), ("How much extra is express?", "What does express add?"),
             "Express adds {value}."),
        Slot("limit", (20, 30, 50, 100), ("free",), ("When is shipping free?", "From what weight is it free?"),
             "Shipping is free from weight {value}."),
        Slot("op", (">=", ">"), ("inclusive", "exactly", "equal"),
             ("Is the comparison inclusive?", "Does a weight exactly equal to it count?"),
             "Use {value} for the comparison."),
    ),
    lambda r: (_pick(r, 1, 120, (20, 30, 50, 100)), r.random() < 0.5),
))

_family(Family(
    "ticket_price", "ticket_price(age, student)",
    "returns the price of a museum ticket. It depends on the age and on being a student.",
    "def ticket_price(age, student):\n"
    "    if age < {child_age}:\n"
    "        return {child_price}\n"
    "    price = {adult_price}\n"
    "    if student:\n"
    "        price = price - {discount}\n"
    "    return price\n",
    (
        Slot("child_age", (6, 10, 12, 14), ("age", "old"),
             ("What age counts as a child?", "How old is a child at most?"),
             "Children are under {value} years old."),
        Slot("child_price", (0, 2, 4, 5), ("children", "kids"), ("How much do children pay?", "What do kids pay?"),
             "Children pay {value}."),
        Slot("adult_price", (10, 12, 15, 20), ("adult", "adults", "full"),
             ("What is the adult price?", "What is the full price?"), "The adult price is {value}."),
        Slot("discount", (2, 3, 5), ("student", "students", "discount"),
             ("What discount do students get?", "How much less does a student pay?"),
             "Students get {value} off."),
    ),
    lambda r: (_pick(r, 1, 80, (5, 6, 9, 10, 11, 12, 13, 14)), r.random() < 0.5),
))

_family(Family(
    "grade", "grade(score)",
    "turns an exam score from 0 to 100 into a letter grade.",
    "def grade(score):\n"
    "    if score >= {a_cut}:\n"
    "        return \"A\"\n"
    "    if score >= {b_cut}:\n"
    "        return \"B\"\n"
    "    if score >= {pass_cut}:\n"
    "        return \"C\"\n"
    "    return \"{fail}\"\n",
    (
        Slot("a_cut", (85, 90, 95), ("an a", "top"), ("What score gets an A?", "What is the cutoff for the top grade?"),
             "An A needs {value} or more."),
        Slot("b_cut", (70, 75, 80), ("a b", "second"),
             ("What score gets a B?", "What is the cutoff for the second grade?"),
             "A B needs {value} or more."),
        Slot("pass_cut", (40, 50, 60), ("pass", "passing", "a c"),
             ("What is the lowest passing score?", "What score gets a C?"),
             "A C needs {value} or more."),
        Slot("fail", ("F", "D", "E"), ("fail", "failing", "below"),
             ("What does a failing score get?", "What letter do failing scores get?"), "Failing scores get {value}."),
    ),
    lambda r: (_pick(r, 0, 100, (39, 40, 49, 50, 59, 60, 69, 70, 74, 75, 79, 80, 84, 85, 89, 90, 94, 95)),),
))

_family(Family(
    "parking_fee", "parking_fee(hours)",
    "returns the parking fee for a number of hours.",
    "def parking_fee(hours):\n"
    "    if hours <= {free_hours}:\n"
    "        return 0\n"
    "    fee = (hours - {free_hours}) * {hourly}\n"
    "    return min(fee, {max_fee})\n",
    (
        Slot("free_hours", (0, 1, 2, 3, 4), ("free",), ("How many hours are free?", "Is some time free?"),
             "The first {value} hours are free."),
        Slot("hourly", (2, 3, 4, 5, 6), ("hourly", "rate"),
             ("What is the hourly rate?", "What is the rate after that?"),
             "Each hour costs {value}."),
        Slot("max_fee", (10, 15, 20, 25, 30), ("maximum", "max", "cap", "most"),
             ("What is the maximum fee?", "Is there a cap on the fee?", "What is the most anyone pays?"),
             "The fee is at most {value}."),
    ),
    lambda r: (_pick(r, 0, 24, (0, 1, 2, 3, 4, 5)),),
))

_family(Family(
    "bonus", "bonus(sales, years)",
    "returns the yearly bonus of a salesperson from their sales and years at the company.",
    "def bonus(sales, years):\n"
    "    if sales < {target}:\n"
    "        return 0\n"
    "    amount = sales * {percent} // 100\n"
    "    if years >= {senior_years}:\n"
    "        amount = amount + {extra}\n"
    "    return amount\n",
    (
        Slot("target", (100, 200, 300, 500, 1000), ("target", "minimum"),
             ("What is the sales target?", "What minimum sales earn a bonus?"), "The sales target is {value}."),
        Slot("percent", (5, 10, 15, 20), ("percent", "percentage"),
             ("What percent of sales is the bonus?", "What percentage do they get?"), "The bonus is {value} percent."),
        Slot("senior_years", (2, 3, 5, 10), ("years", "senior"),
             ("After how many years is someone senior?", "How many years make someone senior?"),
             "Senior means {value} years or more."),
        Slot("extra", (50, 100, 200), ("extra", "additional"),
             ("How big is the extra amount?", "What additional amount is added?"), "The extra amount is {value}."),
    ),
    lambda r: (r.choice((r.randint(50, 2000), r.choice((99, 100, 199, 200, 299, 300, 499, 500, 999, 1000)))),
               _pick(r, 0, 15, (1, 2, 3, 4, 5, 9, 10))),
))

_family(Family(
    "water_bill", "water_bill(liters, summer)",
    "returns a monthly water bill from the liters used and whether it is summer.",
    "def water_bill(liters, summer):\n"
    "    bill = {base}\n"
    "    if liters > {free}:\n"
    "        bill = bill + (liters - {free}) * {rate}\n"
    "    if summer:\n"
    "        bill = bill + {summer_extra}\n"
    "    return bill\n",
    (
        Slot("base", (5, 10, 15, 20), ("base", "fixed"), ("What is the base fee?", "Is there a fixed monthly fee?"),
             "The base fee is {value}."),
        Slot("free", (50, 100, 150, 200), ("free", "included"),
             ("How many liters are free?", "How many liters are included?"), "The first {value} liters are free."),
        Slot("rate", (1, 2, 3, 4), ("rate", "liter"),
             ("What is the rate per liter?", "What does each extra liter cost?"),
             "Each liter costs {value}."),
        Slot("summer_extra", (5, 10, 20), ("summer",), ("What changes in summer?", "How much more in summer?"),
             "Summer adds {value}."),
    ),
    lambda r: (_pick(r, 0, 300, (50, 51, 100, 101, 150, 151, 200, 201)), r.random() < 0.5),
))

_family(Family(
    "split_bill", "split_bill(total, people)",
    "splits a restaurant bill between people and returns what each one pays.",
    "def split_bill(total, people):\n"
    "    total = total + {fee}\n"
    "    total = total + total * {tip} // 100\n"
    "    return {rounding}(total / people)\n",
    (
        Slot("fee", (0, 1, 2, 5, 10), ("fee", "service"), ("Is there a service fee?", "What fee is added?"),
             "The service fee is {value}."),
        Slot("tip", (0, 5, 10, 15, 20), ("tip",), ("How much tip is added?", "What tip percent do we add?"),
             "The tip is {value} percent."),
        Slot("rounding", ("round", "int"), ("round", "rounded", "rounding", "whole"),
             ("How should the share be rounded?", "Should I round the result?"), "Use {value} on the share."),
    ),
    lambda r: (r.randint(10, 200), r.randint(1, 7)),
))

_family(Family(
    "discount_price", "discount_price(price, coupon)",
    "returns the final price of an item in a shop sale, maybe with a coupon.",
    "def discount_price(price, coupon):\n"
    "    if price >= {min_price}:\n"
    "        price = price - price * {percent} // 100\n"
    "    if coupon:\n"
    "        price = price - {coupon_value}\n"
    "    return max(price, {lowest})\n",
    (
        Slot("min_price", (50, 100, 150, 200), ("sale", "minimum"),
             ("From what price is the sale?", "What is the minimum price for the sale?"),
             "The sale starts at price {value}."),
        Slot("percent", (5, 10, 20, 25), ("percent", "percentage"),
             ("What percent is taken off?", "What percentage is taken off?"), "The sale takes {value} percent off."),
        Slot("coupon_value", (5, 10, 15), ("coupon",),
             ("How much is a coupon worth?", "What does the coupon take off?"),
             "A coupon takes {value} off."),
        Slot("lowest", (0, 1, 5), ("lowest", "never", "negative"),
             ("What is the lowest possible price?", "Can the price go negative?"), "The price is never below {value}."),
    ),
    lambda r: (_pick(r, 1, 300, (1, 2, 4, 6, 10, 49, 50, 99, 100, 149, 150, 199, 200)), r.random() < 0.5),
))

_family(Family(
    "late_fee", "late_fee(days)",
    "returns the fee for returning a library book some days late.",
    "def late_fee(days):\n"
    "    if days <= {grace}:\n"
    "        return 0\n"
    "    return min(days * {daily}, {cap})\n",
    (
        Slot("grace", (0, 1, 2, 3, 5), ("grace", "free"), ("Is there a grace period?", "Are the first days free?"),
             "The first {value} days are free."),
        Slot("daily", (1, 2, 3, 5), ("day", "daily", "per"), ("What is the fee per day?", "What is the daily fee?"),
             "Each day costs {value}."),
        Slot("cap", (10, 20, 30, 50), ("maximum", "max", "cap", "most"),
             ("Is there a maximum fee?", "What is the most someone pays?"), "The fee is at most {value}."),
    ),
    lambda r: (_pick(r, 0, 40, (0, 1, 2, 3, 4, 5, 6)),),
))

_family(Family(
    "speed_fine", "speed_fine(over, school)",
    "returns the fine for driving some km/h over the speed limit, maybe near a school.",
    "def speed_fine(over, school):\n"
    "    if over <= {tolerance}:\n"
    "        return 0\n"
    "    fine = over * {per_unit}\n"
    "    if school:\n"
    "        fine = fine * {school_mult}\n"
    "    return fine\n",
    (
        Slot("tolerance", (0, 2, 3, 5, 10), ("tolerance", "allowed"),
             ("Is there a tolerance?", "How much over is allowed?"),
             "Up to {value} over is allowed."),
        Slot("per_unit", (2, 3, 5, 10, 20), ("per", "each"),
             ("What is the fine per km/h?", "How much for each km/h over?"), "Each km/h costs {value}."),
        Slot("school_mult", (2, 3, 4), ("school",), ("What changes near a school?", "How much more in a school zone?"),
             "Near a school the fine is times {value}."),
    ),
    lambda r: (_pick(r, 0, 40, (0, 1, 2, 3, 4, 5, 6, 10, 11)), r.random() < 0.5),
))

_family(Family(
    "battery_label", "battery_label(percent)",
    "returns a short label for the battery level of a phone.",
    "def battery_label(percent):\n"
    "    if percent < {warn}:\n"
    "        return \"{warn_word}\"\n"
    "    if percent >= {full}:\n"
    "        return \"full\"\n"
    "    return \"ok\"\n",
    (
        Slot("warn", (10, 15, 20, 25, 30), ("warning", "warn"),
             ("Below what percent is there a warning?", "When should it warn?"), "Warn below {value} percent."),
        Slot("warn_word", ("low", "empty", "red"), ("label", "called"),
             ("What label shows when it is nearly empty?", "What is a nearly empty battery called?"),
             "A nearly empty battery shows {value}."),
        Slot("full", (80, 90, 95, 99), ("full",), ("From what percent is it full?", "When is the battery full?"),
             "It is full from {value} percent."),
    ),
    lambda r: (_pick(r, 0, 100, (9, 10, 14, 15, 19, 20, 24, 25, 29, 30, 79, 80, 89, 90, 94, 95, 98, 99)),),
))

# Questions that no slot answers (the simulator says it does not know); they contain no slot keyword.
JUNK_QUESTIONS = (
    "Should I add type hints?",
    "Do you want a docstring?",
    "Which python version do you use?",
    "Should the function print anything?",
)


def render(family: Family, values: Dict[str, Any]) -> str:
    return family.template.format(**values)


def _task_id(family: str, hidden: Dict[str, Any]) -> str:
    return f"{family}-" + hashlib.sha256(json.dumps([family, hidden], sort_keys=True).encode()).hexdigest()[:10]


def _call(family: Family, args: Tuple[Any, ...]) -> str:
    return f"{family.signature.split('(')[0]}({', '.join(repr(a) for a in args)})"


class _Functions:
    """Our own templates compiled in-process (trusted code), one per assignment, for the cheap check."""

    def __init__(self) -> None:
        self.cache: Dict[Tuple[str, str], Callable] = {}

    def get(self, family: Family, values: Dict[str, Any]) -> Callable:
        key = (family.name, repr(tuple(values[s.name] for s in family.slots)))  # repr: 1 and True differ
        if key not in self.cache:
            ns: Dict[str, Any] = {}
            exec(render(family, values), ns)
            self.cache[key] = ns[family.signature.split("(")[0]]
        return self.cache[key]


def _safe(fn: Callable, args: Tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # a template bug: the output differs from any real value
        return ("<error>", type(e).__name__)


def choose_tests(family: Family, hidden: Dict[str, Any], rng: random.Random, functions: Optional[_Functions] = None,
                 pool: int = 60) -> Tuple[Optional[List[Tuple[Any, ...]]], str]:
    """(N_TESTS argument tuples, "") such that every one-slot change of `hidden` changes some output;
    (None, why) when the family's inputs cannot tell some alternative apart or the reference fails."""
    functions = functions or _Functions()
    ref = functions.get(family, hidden)
    inputs: List[Tuple[Any, ...]] = []
    for _ in range(pool * 3):
        args = family.inputs(rng)
        if args not in inputs:
            inputs.append(args)
        if len(inputs) == pool:
            break
    outs = [_safe(ref, a) for a in inputs]
    bad = [a for a, o in zip(inputs, outs) if o is None or isinstance(o, tuple) and o[:1] == ("<error>",)]
    if bad:
        return None, f"the reference fails or returns None on {_call(family, bad[0])}"
    alternatives = [(s.name, v) for s in family.slots for v in s.candidates if v != hidden[s.name]]
    told: Dict[Tuple[str, Any], set] = {}
    for alt in alternatives:
        fn = functions.get(family, {**hidden, alt[0]: alt[1]})
        told[alt] = {i for i, a in enumerate(inputs) if _safe(fn, a) != outs[i]}
    chosen: List[int] = []
    left = set(alternatives)
    while left and len(chosen) < N_TESTS:
        best = max(range(len(inputs)), key=lambda i: (sum(1 for a in left if i in told[a]), -i))
        covered = {a for a in left if best in told[a]}
        if not covered:
            break
        chosen.append(best)
        left -= covered
    if left:
        name, value = sorted(left, key=str)[0]
        return None, f"no test input tells slot {name!r}={hidden[name]!r} from {value!r}"
    rest = [i for i in range(len(inputs)) if i not in chosen]
    chosen += rest[: N_TESTS - len(chosen)]
    if len(chosen) < N_TESTS:
        return None, f"only {len(chosen)} distinct test inputs"
    rng.shuffle(chosen)  # the order would otherwise hint at which tests are the tricky ones
    return [inputs[i] for i in chosen], ""


def make_task(family: Family, hidden: Dict[str, Any], tests: Sequence[Tuple[Any, ...]]) -> Task:
    return Task(
        task_id=_task_id(family.name, hidden),
        problem_description=f"I need a python function {family.signature} that {family.description}",
        ground_truth=render(family, hidden),
        test_cases={f"test{i + 1}": _call(family, a) for i, a in enumerate(tests)},
        family=family.name,
        hidden=dict(hidden),
    )


# The sandbox runs the references of many tasks per child: a child start costs ~15 ms, the 10 calls
# of a template microseconds. Each task's code still gets its own namespace.
_RUNNER = (
    "def run_task(code, calls):\n"
    "    ns = {}\n"
    "    exec(code, ns)\n"
    "    return [eval(c, ns) for c in calls]\n"
)


def _sandbox_check(tasks: List[Task], expected: List[List[Any]], limits: Limits, chunk: int) -> List[str]:
    """"" for each task whose reference, run in the sandbox, reproduces the in-process outputs; else why.
    chunk > 1: that many tasks per child (each exec'd in its own namespace by run_task, one call per task);
    chunk <= 1: one child per task, running the reference exactly as scoring does."""
    if chunk <= 1:
        per_task = []
        for r in run_many([(t.ground_truth, list(t.test_cases.values())) for t in tasks], limits):
            error = next((c.error for c in r.calls if not c.ok), r.error)
            per_task.append((all(c.ok for c in r.calls), [c.value for c in r.calls], error))
    else:
        jobs = []
        for i in range(0, len(tasks), chunk):
            part = tasks[i:i + chunk]
            jobs.append((_RUNNER, [f"run_task({t.ground_truth!r}, {list(t.test_cases.values())!r})" for t in part]))
        per_task = [(c.ok, list(c.value) if c.ok else None, c.error or r.error)
                    for r in run_many(jobs, limits) for c in r.calls]
    why = []
    for (ok, values, error), want in zip(per_task, expected):
        if not ok:
            why.append(f"the reference fails in the sandbox: {error}")
        elif values != want or any(v is None for v in values):
            why.append("the sandbox outputs differ from the in-process ones")
        else:
            why.append("")
    return why


def generate_tasks(n: int, seed: int, *, families: Optional[Sequence[str]] = None, verify: bool = True,
                   limits: Limits = Limits(), chunk: int = 100) -> List[Task]:
    """`n` distinct tasks (no two with the same family and hidden values), deterministic in `seed`.

    All assignments of the chosen families are shuffled by `seed` and taken in order, so a smaller n
    gives a prefix of a larger one. An assignment whose tests cannot tell every one-slot change apart
    is skipped. verify=True also runs every kept reference on its own tests in the sandbox."""
    names = list(families) if families else sorted(FAMILIES)
    unknown = [x for x in names if x not in FAMILIES]
    if unknown:
        raise LlmxError(f"unknown task family {unknown[0]!r}; valid: {sorted(FAMILIES)}")
    if n < 1:
        raise LlmxError(f"n={n}: the number of tasks must be >= 1")
    space = []
    for name in names:
        fam = FAMILIES[name]
        for values in itertools.product(*(s.candidates for s in fam.slots)):
            space.append((name, dict(zip((s.name for s in fam.slots), values))))
    random.Random(seed).shuffle(space)
    functions = _Functions()
    tasks: List[Task] = []
    expected: List[List[Any]] = []
    skipped: Dict[str, str] = {}
    for name, hidden in space:
        if len(tasks) == n:
            break
        fam = FAMILIES[name]
        tests, why = choose_tests(fam, hidden, random.Random(f"{seed}:{_task_id(name, hidden)}"), functions)
        if tests is None:
            skipped.setdefault(name, why)
            continue
        tasks.append(make_task(fam, hidden, tests))
        expected.append([functions.get(fam, hidden)(*a) for a in tests])
    if verify:
        why = _sandbox_check(tasks, expected, limits, chunk)
        failed = [(t, w) for t, w in zip(tasks, why) if w]
        if failed:  # our own templates: a failure here is a bug in a family, not bad luck
            t, w = failed[0]
            raise LlmxError(f"task {t.task_id}: {w} ({len(failed)} task(s) failed)")
    if len(tasks) < n:
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        raise LlmxError(f"only {len(tasks)} distinct verified tasks exist in families {names}, {n} asked"
                        + (f" (skipped, e.g. {reasons})" if reasons else ""))
    return tasks


# --- the scripted collaborator -----------------------------------------------------------------------


def family_of(task: Task) -> Family:
    if task.family not in FAMILIES or not task.hidden:
        raise LlmxError(f"task {task.task_id}: not a generated task (family {task.family!r}); "
                        f"scripted agents and the rule simulator need one of {sorted(FAMILIES)}")
    return FAMILIES[task.family]


def scripted_turns(task: Task, rng: random.Random, *, ask_prob: float = 0.5, junk_prob: float = 0.1,
                   paraphrase: bool = True, max_rounds: int = MAX_ROUNDS, guess: str = "random") -> List[str]:
    """The agent turns of a noisy scripted collaborator: each slot, in random order, is asked about with
    probability ask_prob (one question per turn, a random paraphrase); before each slot a question that
    no slot answers comes with probability junk_prob; the last turn answers with the values asked for
    and the others guessed: uniformly from the slot's candidates (guess="random"), or always the first
    candidate, a fixed default (guess="default": the same success rate in expectation over uniformly drawn
    tasks, but the only thing left to learn from an answer is copying what was asked, which a tiny model
    learns far sooner than from targets that are noise whenever a slot was not asked). Assumes the simulator
    answers what is asked (the rule simulator does). At most max_rounds turns."""
    if guess not in ("random", "default"):
        raise LlmxError(f"scripted_turns: guess={guess!r}; valid: 'random', 'default'")
    fam = family_of(task)
    questions: List[str] = []
    values: Dict[str, Any] = {}
    for slot in rng.sample(fam.slots, len(fam.slots)):
        if rng.random() < junk_prob and len(questions) < max_rounds - 1:
            questions.append(rng.choice(JUNK_QUESTIONS))
        if rng.random() < ask_prob and len(questions) < max_rounds - 1:
            questions.append(rng.choice(slot.questions) if paraphrase else slot.questions[0])
            values[slot.name] = task.hidden[slot.name]
        else:
            values[slot.name] = rng.choice(slot.candidates) if guess == "random" else slot.candidates[0]
    return questions + [f"{END_MARKER}\n{render(fam, values)}"]
