"""The generate-bench recipe end to end through the real CLI: generate + verify + grade + score + report,
the replies cache across runs, evaluation of an existing benchmark, and SmolLM2 through the hf backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_llmx

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
    assert set(manifest["datasets"]) == {f"{s}_{n}" for s in ("symbolic", "medium", "hard") for n in ("0", "2k")}
    stats = manifest["datasets"]["hard_2k"]["n_tokens"]
    assert 1900 <= stats["min"] <= stats["max"] <= 2100  # SmolLM2 tokens, within 5% of the target
    scores = json.loads((run / "scores.json").read_text())
    assert scores["curves"]["medium/2k"]["auc"] == pytest.approx(300.0)  # acc 1 over ops 2..5
    assert any(k.startswith("medium/0/mode=") for k in scores["curves"])  # theme/mode breakdowns
    assert {p.name for p in run.glob("accuracy_*.png")} == {"accuracy_symbolic.png", "accuracy_medium.png", "accuracy_hard.png"}
    lines = (run / "problems.jsonl").read_text().splitlines()
    assert len(lines) == 72 and all(json.loads(x)["correct"] == [True] for x in lines)
    assert "AUC" in proc.stdout

    report = run_llmx(["report", str(run)], cwd=tmp_path, check=True)
    assert "Benchmark" in report.stdout and "medium/2k" in report.stdout
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


class ModelServer:
    """A real OpenAI-compatible HTTP server standing in for a served model: it knows each problem's answer
    (from the generated dataset), answers correctly for op < 4 and wrongly from op 4 on, in chatty text;
    extraction prompts (evaluator.symbolic_extractor=llm) get the conclusion's variable list back."""

    def __init__(self, records):
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        by_prompt = {r["prompt"]: r for r in records}
        self.requests = 0
        outer = self

        def answer(prompt: str) -> str:
            if prompt.startswith("Below is a reply"):
                last = prompt.strip().splitlines()[-1]
                return ", ".join(re.findall(r"\bV\d+\b", last)) or "NONE"
            r = by_prompt[prompt]
            right = r["op"] < 4
            if r["subset"] == "symbolic":
                names = r["answer_list"] if right else r["answer_list"][:-1] + ["V999999"]
                return "Let me work through the assignments step by step.\nSo the variables are " + " and ".join(names) + "."
            value = int(r["answer"]) if right else int(r["answer"]) + 1
            return f"Step by step, the quantities add up.\nAnswer: {value}."

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                text = answer(body["messages"][-1]["content"])
                data = json.dumps({"choices": [{"index": i, "message": {"role": "assistant", "content": text}}
                                               for i in range(body.get("n", 1))]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_backend_and_llm_extractor_through_the_recipe(tmp_path):
    from llmx.bench.dataset import load_bench

    gen = ["run", "recipe=gsm_infinite_tiny", f"output_root={tmp_path}", "evaluator=none", "bench.lengths=[0]",
           "bench.ops=2-5", "bench.per_op=4", "name=gen"]
    run_llmx(gen, cwd=tmp_path, check=True)
    bench_dir = only_run(tmp_path, "gen") / "bench"
    _, sets = load_bench(bench_dir)
    records = [r for dsd in sets.values() for split in dsd.values() for r in split.to_list()]
    server = ModelServer(records)
    try:
        common = ["run", "recipe=gsm_infinite_tiny", f"output_root={tmp_path}", f"bench.dataset_dir={bench_dir}",
                  "evaluator=openai", f"evaluator.base_url={server.base_url}", "evaluator.model_name=stand-in",
                  "evaluator.concurrency=4"]
        run_llmx(common + ["name=rules"], cwd=tmp_path, check=True)
        scores = json.loads((only_run(tmp_path, "rules") / "scores.json").read_text())
        for subset in ("symbolic", "medium", "hard"):
            assert scores["curves"][f"{subset}/0"]["acc"] == [1.0, 1.0, 0.0, 0.0], subset  # right below op 4 only
            assert scores["curves"][f"{subset}/0"]["auc"] == pytest.approx(150.0)
        assert server.requests == len(records)

        run_llmx(common + ["name=llm", "evaluator.symbolic_extractor=llm", f"evaluator.extractor_base_url={server.base_url}",
                           "evaluator.extractor_model=extractor"], cwd=tmp_path, check=True)
        scores = json.loads((only_run(tmp_path, "llm") / "scores.json").read_text())
        assert scores["curves"]["symbolic/0"]["acc"] == [1.0, 1.0, 0.0, 0.0]
        n_symbolic = sum(1 for r in records if r["subset"] == "symbolic")
        # The same model settings and benchmark: model replies come from the cache; only extraction is new.
        assert server.requests == len(records) + n_symbolic
    finally:
        server.close()
