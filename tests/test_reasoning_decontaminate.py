"""NaturalReasoning 13-gram decontamination (llmx.reasoning.decontaminate) with benchmark files in their
released formats, written here."""

from __future__ import annotations

import csv
import json

import pytest

from llmx.reasoning.decontaminate import NgramIndex, decontaminate, load_benchmark
from llmx.utils import LlmxError

MATH_PROBLEMS = [
    "Let $f(x) = 3x^2 - 5$. If the graph of $y = f(x)$ passes through the point $(a, 7)$ with $a > 0$, "
    "what is the value of $a$ expressed in simplest radical form?",
    "How many positive divisors does 6! have that are also multiples of 4 but not multiples of 9 or 5?",
]
GPQA_ROW = {
    "Record ID": "rec42",
    "Question": "A spin-1/2 particle sits in a magnetic field along z.\nWhat is the energy splitting?",
    "Correct Answer": "2 mu B",
    "Incorrect Answer 1": "mu B",
    "Incorrect Answer 2": "the splitting vanishes because the field along the z axis does not couple to the "
                          "spin of a particle at rest in the laboratory frame",
    "Incorrect Answer 3": "4 mu B",
    "Explanation": "The Zeeman energies are plus and minus mu B so they differ by twice that amount always.",
    "High-level domain": "Physics",
}
MMLU_PRO_ROWS = [
    {"question_id": 70, "question": "Which of the following best describes the role of the enzyme helicase?",
     "options": ["It unwinds the DNA double helix at the replication fork during DNA replication in cells",
                 "It joins fragments", "It adds primers", "It proofreads"],
     "answer": "A", "answer_index": 0, "cot_content": "", "category": "biology", "src": "ori_mmlu"},
]
MMLU_ROWS = [{"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
              "answer": 1}]


def write_math_dir(root):
    for i, problem in enumerate(MATH_PROBLEMS):
        path = root / "MATH" / "test" / "algebra" / f"{i + 1}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"problem": problem, "level": "Level 3", "type": "Algebra",
                                    "solution": "We have $3a^2 - 5 = 7$ so $a = 2$. The answer is $\\boxed{2}$."}))
    return root / "MATH"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_gpqa(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def gsm_dir(tmp_path_factory):
    from llmx.bench.dataset import build_plan, generate_dataset

    out = tmp_path_factory.mktemp("gsm") / "bench"
    generate_dataset("gsm_infinite", build_plan(["symbolic", "medium"], ["0"], "2-3", 2), out,
                     formats=["arrow", "jsonl"], progress=False)
    return out


def test_each_released_format_loads_with_its_benchmark_text(tmp_path, gsm_dir):
    math = load_benchmark(write_math_dir(tmp_path))
    assert (math.name, math.format, math.texts) == ("math", "math", MATH_PROBLEMS)
    assert math.ids == ["test/algebra/1.json", "test/algebra/2.json"]
    one = load_benchmark(tmp_path / "MATH" / "test" / "algebra" / "2.json")
    assert one.texts == MATH_PROBLEMS[1:]
    math500 = load_benchmark(write_jsonl(tmp_path / "test.jsonl", [{"problem": p, "answer": "2", "unique_id": f"u{i}"}
                                                                   for i, p in enumerate(MATH_PROBLEMS)]))
    assert math500.texts == MATH_PROBLEMS and math500.ids == ["u0", "u1"]
    gpqa = load_benchmark(write_gpqa(tmp_path / "gpqa_diamond.csv", [GPQA_ROW]))
    assert gpqa.format == "gpqa" and gpqa.ids == ["rec42"]
    assert "What is the energy splitting?" in gpqa.texts[0] and "4 mu B" in gpqa.texts[0]
    assert "Zeeman" not in gpqa.texts[0]  # explanations are not what a model is tested on
    for path in (write_parquet(tmp_path / "test-00000-of-00001.parquet", MMLU_PRO_ROWS),
                 write_jsonl(tmp_path / "mmlu_pro.jsonl", MMLU_PRO_ROWS)):
        pro = load_benchmark(path)
        assert pro.format == "mmlu_pro" and pro.ids == ["70"] and "replication fork" in pro.texts[0]
    assert load_benchmark(write_parquet(tmp_path / "mmlu.parquet", MMLU_ROWS)).format == "mmlu"
    gsm = load_benchmark(gsm_dir)
    records = [json.loads(line) for f in sorted((gsm_dir / "jsonl").rglob("*.jsonl")) for line in open(f)]
    assert gsm.format == "gsm_infinite" and sorted(gsm.ids) == sorted(r["id"] for r in records) and len(gsm.ids) == 8
    record = next(r for r in records if r["subset"] == "medium")
    assert gsm.texts[gsm.ids.index(record["id"])] == f"{record['problem']}\n{record['question']}"


def test_gsm_infinite_without_jsonl_reads_the_arrow_datasets(tmp_path, gsm_dir):
    import shutil

    arrow_only = tmp_path / "arrow_only"
    shutil.copytree(gsm_dir, arrow_only, ignore=shutil.ignore_patterns("jsonl"))
    a, b = load_benchmark(gsm_dir), load_benchmark(arrow_only)
    assert a.texts == b.texts and a.ids == b.ids


def test_13_grams_remove_copies_and_report_the_benchmark(tmp_path, gsm_dir):
    math = load_benchmark(write_math_dir(tmp_path))
    gpqa = load_benchmark(write_gpqa(tmp_path / "gpqa.csv", [GPQA_ROW]))
    gsm = load_benchmark(gsm_dir)
    index = NgramIndex([math, gpqa, gsm])
    medium = next(i for i, x in enumerate(gsm.ids) if x.startswith("medium"))
    texts = [
        # 13 consecutive words of MATH problem 0 ("If the graph ... with"), with other case and punctuation
        "Consider this: IF the graph of y = f(x), passes through the point (a, 7); some twist here.",
        "Consider this: if the graph of y = f(x) passes through the point (a, 8) only; no more.",  # 12 words
        "An unrelated question about chemistry and the boiling point of water at altitude in Denver?",
        "Explain why " + GPQA_ROW["Incorrect Answer 2"].lower() + ".",  # an answer choice counts
        "Solve: " + " ".join(gsm.texts[medium].split()[:13]) + " and more",
    ]
    result = decontaminate(texts, index)
    assert result.kept == [1, 2]
    first, gpqa_hit, gsm_hit = result.removed
    assert (first.item, first.benchmark, first.benchmark_item, first.benchmark_id) == (0, "math", 0,
                                                                                      "test/algebra/1.json")
    assert first.ngram == "if the graph of y f x passes through the point a 7"
    assert (gpqa_hit.item, gpqa_hit.benchmark, gpqa_hit.benchmark_id) == (3, "gpqa", "rec42")
    assert (gsm_hit.item, gsm_hit.benchmark, gsm_hit.benchmark_id) == (4, "gsm_infinite", gsm.ids[medium])
    report = result.report()
    assert report["removed_per_benchmark"] == {"math": 1, "gpqa": 1, "gsm_infinite": 1}
    assert report["kept"] == 2 and report["benchmark_items"]["gsm_infinite"] == 8
    assert decontaminate(texts, NgramIndex([math, gpqa, gsm], n=14)).removed[0].item != 0  # the copy is 13 words


def test_texts_shorter_than_n_match_only_identical_short_items(tmp_path):
    index = NgramIndex([load_benchmark(write_parquet(tmp_path / "mmlu.parquet", MMLU_ROWS), name="mmlu_stem")])
    short = "What is 2+2?\n3\n4\n5\n6"  # the whole benchmark item, 8 words
    result = decontaminate([short, "what is 2 2", "Tell me what is 2 + 2? 3 4 5 6, quickly", ""], index)
    assert result.kept == [1, 2, 3]
    assert result.removed[0].benchmark == "mmlu_stem" and result.removed[0].ngram == "what is 2 2 3 4 5 6"


@pytest.mark.parametrize("name, content, why", [
    ("notes.txt", "What is 2+2?", "unknown file type '.txt'"),
    ("rows.jsonl", '{"text": "What is 2+2?"}\n', "unknown format: fields \\['text'\\]"),
    ("empty.jsonl", "", "holds no items"),
    ("broken.json", "{not json", "cannot be read as json"),
    ("blank.jsonl", '{"problem": "  "}\n', "holds only empty texts"),
    ("missing.csv", None, "does not exist"),
])
def test_bad_benchmark_files_are_one_clear_error(tmp_path, name, content, why):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LlmxError, match=why) as err:
        load_benchmark(path)
    assert str(path) in str(err.value) and "GPQA" in str(err.value) and "MMLU-Pro" in str(err.value)


def test_bad_directories_indexes_and_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LlmxError, match="neither manifest.json"):
        load_benchmark(tmp_path / "empty_dir")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"generator": "other_bench", "datasets": {}}))
    with pytest.raises(LlmxError, match="not 'gsm_infinite'"):
        load_benchmark(tmp_path / "other")
    math = load_benchmark(write_math_dir(tmp_path))
    with pytest.raises(LlmxError, match=r"named \['math'\] more than once"):
        NgramIndex([math, math])
    with pytest.raises(LlmxError, match="n=0"):
        NgramIndex([math], n=0)
    with pytest.raises(LlmxError, match="item 0 is a NoneType"):
        decontaminate([None], NgramIndex([math]))
