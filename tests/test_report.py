"""`llmx report` on synthetic run directories: discovery, status, table, written files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from llmx.report import collect_runs, report_markdown, report_text, run_labels, write_report
from llmx.utils import LlmxError


def make_run(
    run_dir: Path,
    steps: int = 30,
    lr: float = 1e-3,
    overrides=("recipe=pretrain_tiny",),
    final: bool = True,
    error: str | None = None,
    extra_final: dict | None = None,
) -> Path:
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(10, steps + 1, 10):
            f.write(json.dumps({"step": step, "time": 1.0, "loss": 6.0 - lr * step, "tokens_per_s": 15000.0 + step}) + "\n")
            f.write(json.dumps({"step": step, "time": 1.0, "val_loss": 6.1 - lr * step, "val_ppl": 400.0}) + "\n")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if final:
        body = {"step": steps, "loss": 6.0 - lr * steps, "val_loss": 6.1 - lr * steps, "val_ppl": 400.0,
                "tokens_per_s": 15000.0, "peak_mem_gb": 0.5}
        body.update(extra_final or {})
        (run_dir / "final.json").write_text(json.dumps(body))
    if error:
        (run_dir / "error.txt").write_text(error + "\nTraceback ...\n")
    return run_dir


def test_single_run_ok(tmp_path):
    run = make_run(tmp_path / "pretrain_tiny" / "2025-01-01_00-00-00", overrides=["optim.lr=3e-3"])
    (r,) = collect_runs([run])
    assert r["status"] == "ok" and r["step"] == 30
    assert r["overrides"] == ["optim.lr=3e-3"]
    assert r["final"]["loss"] == pytest.approx(5.97) and "step" not in r["final"]
    assert r["run"] == "2025-01-01_00-00-00" and r["dir"] == str(run)


def test_status_detection(tmp_path):
    make_run(tmp_path / "ok")
    make_run(tmp_path / "failed", final=False, error="LlmxError: out of memory")
    make_run(tmp_path / "running", final=False, steps=20)
    runs = {r["run"].split("/")[-1]: r for r in collect_runs([tmp_path])}
    assert runs["ok"]["status"] == "ok"
    assert runs["failed"]["status"] == "failed" and runs["failed"]["error"] == "LlmxError: out of memory"
    running = runs["running"]
    assert running["status"] == "incomplete" and running["step"] == 20
    # No final.json: the last value of each key across the train and eval lines.
    assert running["final"]["loss"] == pytest.approx(5.98) and running["final"]["val_loss"] == pytest.approx(6.08)


def test_failed_then_resumed_to_completion_is_ok(tmp_path):
    run = make_run(tmp_path / "r", final=False, error="killed")
    old = time.time() - 100
    os.utime(run / "error.txt", (old, old))
    (run / "final.json").write_text(json.dumps({"step": 30, "loss": 1.0}))
    assert collect_runs([run])[0]["status"] == "ok"


def test_sweep_dir_recursion(tmp_path):
    sweep = tmp_path / "multirun" / "pretrain_tiny" / "2025-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for i, lr in enumerate([1e-3, 2e-3, 3e-3] + [1e-4] * 8):
        make_run(sweep / str(i), lr=lr, overrides=["recipe=pretrain_tiny", f"optim.lr={lr}", "trainer.max_steps=30"])
    # Files inside a run (tensorboard, HF export, checkpoints) are not runs of their own.
    (sweep / "0" / "tb").mkdir()
    (sweep / "0" / "hf").mkdir()
    (sweep / "0" / "hf" / "final.json").write_text("{}")
    runs = collect_runs([tmp_path / "multirun"])
    assert [r["run"].split("/")[-1] for r in runs] == [str(i) for i in range(11)]  # numeric order
    assert runs[0]["run"] == "multirun/pretrain_tiny/2025-01-01_00-00-00/0"
    assert all(r["status"] == "ok" for r in runs)


def test_missing_or_empty_paths(tmp_path):
    with pytest.raises(LlmxError, match="no such directory"):
        collect_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    assert collect_runs([tmp_path / "empty"]) == []


def _header(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[lines.index("") + 1].split("  ")


def test_report_table_columns(tmp_path):
    make_run(tmp_path / "s" / "0", lr=1e-3, overrides=["recipe=pretrain_tiny", "optim.lr=1e-3"])
    make_run(tmp_path / "s" / "1", lr=2e-3, overrides=["recipe=pretrain_tiny", "optim.lr=2e-3"],
             extra_final={"sparsity": 0.5})
    make_run(tmp_path / "s" / "2", final=False, error="boom", overrides=["recipe=pretrain_tiny", "optim.lr=3e-3"])
    runs = collect_runs([tmp_path / "s"])
    text = report_text(runs, width=None)
    headers = [h.strip() for h in _header(text) if h.strip()]
    assert headers == ["run", "status", "step", "final train loss", "val loss", "val ppl", "tokens/s"]
    # sparsity is not in every run's metrics: not a column; peak_mem_gb is only in final.json
    # files, and the failed run has none, so it is not common either.
    assert "pretrain_tiny optim.lr=2e-3" in text and "failed: pretrain_tiny optim.lr=3e-3: boom" in text
    assert "5.97" in text and "failed" in text and "15,000" in text and "common overrides" not in text


def test_labels_name_the_recipe_and_what_differs(tmp_path):
    sweep = tmp_path / "multirun" / "x" / "2026-01-01_00-00-00"
    for i, (lr, rank) in enumerate([(1e-3, 8), (1e-3, 16), (3e-3, 8)]):
        make_run(sweep / str(i), overrides=["recipe=galore2_tiny", f"optim.lr={lr}", f"optim.rank={rank}",
                                            "logger.progress=false", f"hydra.run.dir=/x/{i}"])
    (sweep / "0" / "config.yaml").write_text("name: galore2_tiny\nseed: 0\n")
    for stamp in ("2026-01-02_10-00-00", "2026-01-02_11-00-00"):  # the default recipe: named in config.yaml only
        make_run(tmp_path / stamp, overrides=["logger.progress=false"])
        (tmp_path / stamp / "config.yaml").write_text("name: pretrain_tiny\n")
    runs = collect_runs([sweep])
    assert run_labels(runs) == ["galore2_tiny optim.lr=0.001 optim.rank=8", "galore2_tiny optim.lr=0.001 optim.rank=16",
                                "galore2_tiny optim.lr=0.003 optim.rank=8"]
    twins = collect_runs([tmp_path / "2026-01-02_10-00-00", tmp_path / "2026-01-02_11-00-00"])
    assert run_labels(twins) == ["pretrain_tiny (2026-01-02_10-00-00)", "pretrain_tiny (2026-01-02_11-00-00)"]
    assert "pretrain_tiny (2026-01-02_11-00-00)" in report_markdown(twins)


def test_report_fits_80_columns_by_wrapping_rows(tmp_path):
    for i in range(3):
        make_run(tmp_path / "s" / str(i), lr=1e-3 * (i + 1), extra_final={"parameters_of_the_student": 10 ** 7 + i},
                 overrides=["recipe=cocomix_tiny", f"cocomix.method=kd seed={i} optim.lr={1e-3 * (i + 1)}",
                            "cocomix.kd_temperature=2.0"])
    runs = collect_runs([tmp_path / "s"])
    wide = report_text(runs, width=None)
    assert max(map(len, wide.splitlines())) > 80  # one line per run would not fit
    text = report_text(runs, width=80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    for label in run_labels(runs):
        assert label in lines  # a label on a line of its own, its values below it
    assert "common overrides: recipe=cocomix_tiny" not in text and "cocomix.kd_temperature=2.0" in text


def test_generic_common_numeric_keys(tmp_path):
    for i in range(2):
        make_run(tmp_path / "s" / str(i), extra_final={"sparsity": 0.5 * i, "note": "x"})
    runs = collect_runs([tmp_path / "s"])
    text = report_text(runs, width=None)
    headers = [h.strip() for h in _header(text)]
    assert "sparsity" in headers and "note" not in headers
    # Equal in every run: named once under the terminal table, a full column in report.md.
    assert "peak_mem_gb" not in headers and "peak_mem_gb=0.5000" in text
    assert "| peak_mem_gb |" in report_markdown(runs)


def test_single_run_label_carries_its_overrides(tmp_path):
    run = make_run(tmp_path / "r", overrides=["optim.lr=3e-3", "trainer.max_steps=30"])
    text = report_text(collect_runs([run]), width=None)
    assert "r optim.lr=3e-3 trainer.max_steps=30" in text


def test_write_report(tmp_path):
    make_run(tmp_path / "s" / "0", lr=1e-3)
    make_run(tmp_path / "s" / "1", lr=3e-3, final=False, error="boom")
    runs = collect_runs([tmp_path / "s"])
    paths = write_report(runs, tmp_path / "report")
    names = {p.name for p in paths}
    assert names == {"report.json", "report.md", "loss_curves.png"}
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [d["status"] for d in data] == ["ok", "failed"] and data[0]["final"]["val_ppl"] == 400.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("\n| ") == 3  # header + 2 rows
    assert "| run | status | step | final train loss | val loss | val ppl | tokens/s |" in md and "## Failures" in md
    png = tmp_path / "report" / "loss_curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert report_markdown(runs) == md
