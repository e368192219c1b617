"""GSM-Infinite (Zhou, Liu, Chen, Tian, Chen; ICML 2025, arXiv 2502.05252): an infinitely scalable
benchmark of grade-school-math-like reasoning with controllable reasoning ops and context length.

Subsets: `symbolic` (assignment chains over abstract variables, `symbolic.py`), `medium` (2-entity
implicit relations) and `hard` (3-entity relations, implicit multiplication), the last two in three themes
and in forward and reverse mode (`realistic.py`). Every problem is re-solved by an independent solver that
reads only its text before it is written (`verify`); graders in `grading.py`.

Which (theme, mode) a realistic problem uses is drawn per problem from `realistic_mix`; the default is
the reference's evaluation filter (config.sh): crazy_zootopia 40%, movie_festival_awards 5%,
teachers_in_school 5%, for each of forward and reverse.

Options where fidelity and speed part (defaults: the reference's behaviour):
  sampling=reference   flat rejection sampling of realistic problems, as the reference: the distribution
                       of problem shapes at a given op is the reference's. `fast` redraws dependencies and
                       constants for a kept structure (nested rejection, ~2.5-4x faster, a somewhat
                       different mix of shapes; see realistic.py).
  reverse_linear_only  keep only reverse problems whose equation in the hidden quantity is first order, as
                       the reference does; false also admits higher-order equations with exactly one
                       positive integer root (about a third of hard reverse problems).
  length_measure=tokens  a length target is the prompt's real length in bench.tokenizer's tokens (within 3%).
                       `reference` measures as the reference generated its published sets: symbolic adds
                       int(length x 828/9668) filler variables whatever the tokenizer; realistic counts the
                       instruction, six solved copies of the problem and the problem itself against the
                       target minus 1000 tokens, so its prompts are several times shorter than the target.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence

from llmx.bench.base import BenchError, BenchGenerator, register_bench
from llmx.bench.gsm_infinite.grading import gold_realistic, realistic_correct, symbolic_correct
from llmx.bench.gsm_infinite.symbolic import generate_symbolic, solve_symbolic

SUBSETS = ("symbolic", "medium", "hard")
THEMES = ("crazy_zootopia", "teachers_in_school", "movie_festival_awards")  # realistic.THEMES (a test checks)
MODES = ("forward", "reverse")
LENGTH_MEASURES = ("tokens", "reference")
DEFAULT_MIX = (
    {"template": "crazy_zootopia", "mode": "forward", "weight": 0.4},
    {"template": "movie_festival_awards", "mode": "forward", "weight": 0.05},
    {"template": "teachers_in_school", "mode": "forward", "weight": 0.05},
    {"template": "crazy_zootopia", "mode": "reverse", "weight": 0.4},
    {"template": "movie_festival_awards", "mode": "reverse", "weight": 0.05},
    {"template": "teachers_in_school", "mode": "reverse", "weight": 0.05},
)


@register_bench("gsm_infinite")
class GSMInfinite(BenchGenerator):
    subsets = SUBSETS

    def __init__(self, *, realistic_mix: Optional[Sequence[Dict[str, Any]]] = None, number_range: int = 5,
                 symbolic_max_value: int = 10, grader_mode: str = "reference", sampling: str = "reference",
                 reverse_linear_only: bool = True, max_attempts: int = 20000, length_measure: str = "tokens",
                 **options: Any):
        super().__init__(**options)
        if options:
            raise BenchError(f"gsm_infinite: unknown option(s) {sorted(options)}; valid: realistic_mix, number_range, "
                             "symbolic_max_value, grader_mode, sampling, reverse_linear_only, max_attempts, "
                             "length_measure")
        if sampling not in ("reference", "fast"):
            raise BenchError(f"gsm_infinite: sampling={sampling!r}; valid: 'reference' (flat rejection, the "
                             "reference's distribution of problem shapes), 'fast' (nested rejection)")
        if length_measure not in LENGTH_MEASURES:
            raise BenchError(f"gsm_infinite: length_measure={length_measure!r}; valid: 'tokens' (the prompt measures "
                             "the length target), 'reference' (the reference's measure: symbolic 828/9668 filler "
                             "statements per token, realistic 6 solved copies counted, 1000 tokens below the target)")
        self.length_measure = length_measure
        self.sampling = sampling
        self.reverse_linear_only = bool(reverse_linear_only)
        self.max_attempts = int(max_attempts)
        self.mix = [dict(m) for m in (realistic_mix or DEFAULT_MIX)]
        for m in self.mix:
            if m.get("template") not in THEMES:
                raise BenchError(f"gsm_infinite: realistic_mix template {m.get('template')!r}; valid: {list(THEMES)}")
            if m.get("mode") not in MODES:
                raise BenchError(f"gsm_infinite: realistic_mix mode {m.get('mode')!r}; valid: {list(MODES)}")
            if not float(m.get("weight", 1.0)) > 0:
                raise BenchError(f"gsm_infinite: realistic_mix weight must be > 0, got {m.get('weight')!r}")
        if number_range < 2:
            raise BenchError(f"gsm_infinite: number_range={number_range} must be >= 2")
        if grader_mode not in ("reference", "lenient"):
            raise BenchError(f"gsm_infinite: grader_mode={grader_mode!r}; valid: 'reference', 'lenient'")
        self.number_range = number_range
        self.symbolic_max_value = symbolic_max_value
        self.grader_mode = grader_mode

    def check_request(self, subset: str, op: int, length: int) -> None:
        super().check_request(subset, op, length)
        if subset != "symbolic" and op < 2:
            raise BenchError(f"gsm_infinite: {subset} problems need op >= 2 (a question needs at least one "
                             f"defined quantity and one derived from it), got op={op}")

    def generate(self, subset: str, op: int, length: int, rng: random.Random, count_tokens) -> Dict[str, Any]:
        if subset == "symbolic":
            return generate_symbolic(op, length, rng, count_tokens, max_value=self.symbolic_max_value,
                                     length_measure=self.length_measure)
        from llmx.bench.gsm_infinite.realistic import generate_realistic

        weights = [float(m.get("weight", 1.0)) for m in self.mix]
        pick = rng.choices(self.mix, weights=weights)[0]
        tries = 1 if self.sampling == "reference" else None  # None: the module's nested-rejection defaults
        extra = {} if tries is None else {"dep_tries": tries, "value_tries": tries}
        return generate_realistic(d=2 if subset == "medium" else 3, op=op, mode=pick["mode"], template=pick["template"],
                                  length=length, rng=rng, count_tokens=count_tokens, number_range=self.number_range,
                                  max_attempts=self.max_attempts, linear_only=self.reverse_linear_only,
                                  length_measure=self.length_measure, **extra)

    def verify(self, record: Dict[str, Any]) -> None:
        rid = record.get("id", "?")
        if record["subset"] == "symbolic":
            answer, op = solve_symbolic(record)
            if answer != list(record["answer_list"]) or op != record["op"]:
                raise BenchError(f"{rid}: the solver disputes the problem: it finds {answer} with op {op}, the "
                                 f"generator wrote {record['answer_list']} with op {record['op']}")
            return
        from llmx.bench.gsm_infinite.realistic import solve_realistic_with_ops

        # The solver reads the problem and question fields; the model reads the prompt: they must agree.
        if f"Problem: {record['problem']}\nQuestion: {record['question']}" not in record["prompt"]:
            raise BenchError(f"{rid}: the prompt does not contain the problem and question that were verified")
        answer, op = solve_realistic_with_ops(record)
        if str(answer) != record["answer"] or op != record["op"]:
            raise BenchError(f"{rid}: the solver disputes the problem: it finds {answer} with op {op}, the "
                             f"generator wrote {record['answer']} with op {record['op']}")
        if gold_realistic(record["solution"]) != answer:
            raise BenchError(f"{rid}: the reference solution's 'Answer:' is not {answer}")

    def grade(self, reply: str, record: Dict[str, Any]) -> bool:
        if record["subset"] == "symbolic":
            return symbolic_correct(reply, record["answer_list"])
        return realistic_correct(reply, int(record["answer"]), self.grader_mode)

    def group_keys(self, record: Dict[str, Any]) -> List[str]:
        """Extra breakdowns reported besides (subset, length, op): theme and mode of realistic problems."""
        if record["subset"] == "symbolic":
            return []
        return [f"template={record['template']}", f"mode={record['mode']}"]
