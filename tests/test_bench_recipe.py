"""The generate-bench recipe end to end through the real CLI: generate + verify + grade + score + report,
the replies cache across runs, evaluation of an existing benchmark, and SmolLM2 through the hf backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_llmx

pytestmark = pytest.mark.slow


def only_run(root: Path, name: str) -> Path:
    runs = sorted((root / name).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_tiny_recipe_oracle_end_to_end(tmp_path):
    proc = run_llmx(["run", "recipe=gsm_infinite_tiny", f"output_root={tmp_path}"], cwd=tmp_path, check=True)
    run = only_run(tmp_path, "gsm_infinite_tiny")
    final = json.loads((run / "final.json").read_text())
    # 3 subsets x 2 lengths x ops 2-5 x 3 problems, each answered by its own reference solution.
    assert final["problems_generated"] == final["problems_evaluated"] == 72
    assert final["acc"] == 1.0, (run / "results.md").read_text()
    manifest = json.loads((run / "bench" / "manifest.json").read_text())
    assert set(manifest["datasets"]) == {f"{s}_{n}" for s in ("symbolic", "medium", "hard") for n in ("0", "2000")}
    stats = manifest["datasets"]["hard_2000"]["n_tokens"]
    assert 1900 <= stats["min"] <= stats["max"] <= 2100  # SmolLM2 tokens, within 5% of the target
    scores = json.loads((run / "scores.json").read_text())
    assert scores["curves"]["medium/2000"]["auc"] == pytest.approx(300.0)  # acc 1 over ops 2..5
    assert any(k.startswith("medium/0/mode=") for k in scores["curves"])  # theme/mode breakdowns
    assert {p.name for p in run.glob("accuracy_*.png")} == {"accuracy_symbolic.png", "accuracy_medium.png", "accuracy_hard.png"}
    lines = (run / "problems.jsonl").read_text().splitlines()
    assert len(lines) == 72 and all(json.loads(x)["correct"] == [True] for x in lines)
    assert "AUC" in proc.stdout

    report = run_llmx(["report", str(run)], cwd=tmp_path, check=True)
    assert "Benchmark" in report.stdout and "medium/2000" in report.stdout
    assert "## Benchmark" in (run / "report.md").read_text()

    # Evaluate the same benchmark again: the replies come from the cache, nothing is regenerated.
    cache = Path(scores["replies_cache"])
    before = cache.read_text()
    again = run_llmx(["run", "recipe=gsm_infinite_tiny", f"output_root={tmp_path}", f"bench.dataset_dir={run / 'bench'}"],
                     cwd=tmp_path, check=True)
    assert "evaluating the benchmark in" in again.stdout and "generating" not in again.stdout
    assert cache.read_text() == before


def test_bad_bench_config_fails_before_work(tmp_path):
    proc = run_llmx(["run", "recipe=gsm_infinite_tiny", f"output_root={tmp_path}", "bench.subsets=[easy]"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown subset 'easy'" in proc.stderr + proc.stdout and "symbolic" in proc.stderr + proc.stdout
    proc = run_llmx(["run", "recipe=gsm_infinite_tiny", f"output_root={tmp_path}", "evaluator.backend=gpt"], cwd=tmp_path)
    assert proc.returncode != 0 and "oracle" in proc.stderr + proc.stdout


def test_smollm2_hf_backend_through_the_recipe(tmp_path):
    proc = run_llmx(["run", "recipe=gsm_infinite_symbolic_smollm2", f"output_root={tmp_path}", "bench.ops=1-2",
                     "bench.per_op=2", "evaluator.max_new_tokens=24", "evaluator.batch_size=4"], cwd=tmp_path,
                    check=True, timeout=600)
    run = only_run(tmp_path, "gsm_infinite_symbolic_smollm2")
    final = json.loads((run / "final.json").read_text())
    assert final["problems_evaluated"] == 4 and 0.0 <= final["acc"] <= 1.0
    rows = [json.loads(x) for x in (run / "problems.jsonl").read_text().splitlines()]
    assert all(len(r["replies"]) == 1 and r["replies"][0].strip() for r in rows)  # the model said something
    assert "accuracy" in proc.stdout
