"""`llmx report` on synthetic run directories: discovery, status, table, written files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from llmx.report import collect_runs, report_markdown, report_table, write_report
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


def _render(table) -> str:
    console = Console(record=True, width=250, color_system=None)
    console.print(table)
    return console.export_text()


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


def test_report_table_columns(tmp_path):
    make_run(tmp_path / "s" / "0", lr=1e-3, overrides=["recipe=pretrain_tiny", "optim.lr=1e-3"])
    make_run(tmp_path / "s" / "1", lr=2e-3, overrides=["recipe=pretrain_tiny", "optim.lr=2e-3"],
             extra_final={"sparsity": 0.5})
    make_run(tmp_path / "s" / "2", final=False, error="boom", overrides=["recipe=pretrain_tiny", "optim.lr=3e-3"])
    runs = collect_runs([tmp_path / "s"])
    table = report_table(runs)
    headers = [c.header for c in table.columns]
    assert headers[:7] == ["run", "status", "step", "final train loss", "val loss", "val ppl", "tokens/s"]
    assert headers[-1] == "overrides"
    # sparsity is not in every run's metrics: not a column; peak_mem_gb is only in final.json
    # files, and the failed run has none, so it is not common either.
    assert "sparsity" not in headers and "peak_mem_gb" not in headers
    text = _render(table)
    assert "optim.lr=2e-3" in text and "common overrides: recipe=pretrain_tiny" in text
    assert "5.97" in text and "failed" in text and "15,000" in text


def test_generic_common_numeric_keys(tmp_path):
    for i in range(2):
        make_run(tmp_path / "s" / str(i), extra_final={"sparsity": 0.5 * i, "note": "x"})
    runs = collect_runs([tmp_path / "s"])
    table = report_table(runs)
    headers = [c.header for c in table.columns]
    assert "sparsity" in headers and "note" not in headers
    # Equal in every run: named once under the terminal table, a full column in report.md.
    assert "peak_mem_gb" not in headers and "peak_mem_gb=0.5000" in _render(table)
    assert "peak_mem_gb" in [c.header for c in report_table(runs, all_columns=True).columns]
    assert "| peak_mem_gb |" in report_markdown(runs)


def test_single_run_overrides_under_table(tmp_path):
    run = make_run(tmp_path / "r", overrides=["optim.lr=3e-3", "trainer.max_steps=30"])
    table = report_table(collect_runs([run]))
    assert [c.header for c in table.columns][-1] == "tokens/s"
    assert "overrides: optim.lr=3e-3 trainer.max_steps=30" in _render(table)


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
