"""End-to-end runs through the real CLI in subprocesses: outputs, resume, sweeps, signals and errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics, run_llmx, train_losses

pytestmark = pytest.mark.slow


def tiny_run(tmp_path: Path, name: str, *extra: str, env=None, check=True):
    run_dir = tmp_path / name
    proc = run_llmx(["run", *TINY, f"hydra.run.dir={run_dir}", *extra], cwd=tmp_path, env=env, check=check)
    return run_dir, proc


def test_run_directory_holds_everything(reference_run):
    run_dir, proc = reference_run
    assert f"run directory: {run_dir}" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "final.json", "loss_curve.png", "run_info.json", ".hydra/overrides.yaml"):
        assert (run_dir / name).is_file(), name
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == 12 and final["val_ppl"] == pytest.approx(2.718281828 ** final["val_loss"], rel=1e-6)
    assert final["val_ppl"] < 1024  # learned something: better than uniform over the 1024-token vocabulary
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000008", "step_00000012"] or sorted(
        p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000008", "step_00000012"]
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]
    rows = read_metrics(run_dir)
    assert any("val_ppl" in r for r in rows) and all("tokens_per_s" in r for r in rows if "loss" in r)
    assert "name: pretrain_tiny" in (run_dir / "config.yaml").read_text()
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved


def test_hf_export_loads_with_transformers(reference_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = reference_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and model.config.num_hidden_layers == 2


def test_resume_after_sigkill_continues_the_same_trajectory(tmp_path, reference_run):
    ref_dir, _ = reference_run
    run_dir, proc = tiny_run(tmp_path, "killed", env={"LLMX_DEBUG_KILL_AT_STEP": "10"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert max(train_losses(run_dir)) == 10
    run_dir2, proc2 = tiny_run(tmp_path, "killed", "resume=auto")
    assert run_dir2 == run_dir and "resumed from" in proc2.stdout and "step_00000008" in proc2.stdout
    # Bitwise: the same floats, not merely close.
    assert train_losses(run_dir) == train_losses(ref_dir)
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 13))  # no duplicated steps after the resume
    # Throughput counts the resumed part only: steps 9-12 (4 of 12) in this process's training time.
    final, ref = (json.loads((d / "final.json").read_text()) for d in (run_dir, ref_dir))
    assert final["tokens_seen"] == ref["tokens_seen"]
    assert final["tokens_per_s"] * final["train_time_s"] == pytest.approx(ref["tokens_seen"] * 4 / 12, rel=1e-9)


def test_resume_auto_without_a_path_finds_the_recipes_newest_run(tmp_path):
    """`llmx run ... resume=auto` (no hydra.run.dir) continues inside the run that holds the checkpoint."""
    out = tmp_path / "outputs"
    args = [*TINY, f"output_root={out}", "trainer.max_steps=6"]
    first = run_llmx(["run", *args, "trainer.ckpt_every=3"], cwd=tmp_path, env={"LLMX_DEBUG_KILL_AT_STEP": "5"})
    assert first.returncode == -signal.SIGKILL
    (run_dir,) = list((out / "pretrain_tiny").iterdir())
    proc = run_llmx(["run", *args, "trainer.ckpt_every=3", "resume=auto"], cwd=tmp_path, check=True)
    assert f"run directory: {run_dir}" in proc.stdout and "step_00000003" in proc.stdout
    assert len(list((out / "pretrain_tiny").iterdir())) == 1
    assert json.loads((run_dir / "final.json").read_text())["step"] == 6


def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path, reference_run):
    ref_dir, _ = reference_run
    run_dir = tmp_path / "term"
    env = dict(os.environ, OMP_NUM_THREADS="1", LLMX_DEBUG_STEP_SLEEP="0.3")
    proc = subprocess.Popen([sys.executable, "-m", "llmx", "run", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "resume=auto" in err
    stopped_at = max(train_losses(run_dir))
    assert stopped_at < 12 and (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    tiny_run(tmp_path, "term", "resume=auto")
    assert train_losses(run_dir) == train_losses(ref_dir)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir, proc = tiny_run(tmp_path, "nan", "optim.lr=1e30", "optim.grad_clip=null", "optim.warmup_steps=0",
                             "trainer.ckpt_every=1", check=False)
    assert proc.returncode == 1
    assert "at step" in proc.stderr and ("nan" in proc.stderr or "inf" in proc.stderr)
    assert "Traceback" not in proc.stderr
    complete = sorted((run_dir / "checkpoints").glob("step_*"))
    assert complete, "the checkpoints before the bad step stay"
    assert "last good checkpoint is" in proc.stderr.lower() and complete[-1].name in proc.stderr


def test_sweep_runs_every_job_and_reports_the_failing_one(tmp_path):
    sweep = tmp_path / "sweep"
    # A value that cannot work is refused for the whole sweep before any job runs.
    proc = run_llmx(["run", "-m", *TINY, "trainer.batch_size=8,6", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 2 and "trainer.batch_size=6 is not divisible" in proc.stderr and not sweep.exists()
    # A job that fails while running (resume=latest without a checkpoint) is reported; the others still run.
    proc = run_llmx(["run", "-m", *TINY, "trainer.max_steps=4", "trainer.ckpt_every=0", "trainer.export_hf=false",
                     "resume=null,latest", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "1 ok, 1 not ok" in proc.stdout
    assert "no complete checkpoint" in proc.stderr
    assert (sweep / "0" / "final.json").is_file() and not (sweep / "1" / "final.json").exists()
    assert (sweep / "1" / "error.txt").is_file()
    rep = run_llmx(["report", str(sweep)], cwd=tmp_path, check=True)
    assert "ok" in rep.stdout and "failed" in rep.stdout
    assert (sweep / "report.md").is_file()


def test_bad_override_fails_before_any_work(tmp_path):
    proc = run_llmx(["run", "trainer.max_step=5"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.max_step" in proc.stderr and "max_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_llmx(["run", "optim=sgd"], cwd=tmp_path)
    assert proc.returncode == 2 and "adamw" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_missing_data_path_is_a_clear_error(tmp_path):
    run_dir, proc = tiny_run(tmp_path, "nodata", "data=files", "data.paths=[/nonexistent/corpus/*.jsonl]", check=False)
    assert proc.returncode == 1
    assert "/nonexistent/corpus/*.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_checkpoint_is_refused_and_never_restarts_from_scratch(tmp_path, reference_run):
    import shutil

    ref_dir, _ = reference_run
    run_dir = tmp_path / "corrupt"
    shutil.copytree(ref_dir, run_dir)
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    before = (run_dir / "metrics.jsonl").read_text()
    _, proc = tiny_run(tmp_path, "corrupt", "resume=auto", "trainer.max_steps=16", check=False)
    assert proc.returncode == 1
    assert "corrupt" in proc.stderr and shard.name in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing trained, nothing overwritten

    _, proc = tiny_run(tmp_path, "fresh", "resume=latest", check=False)
    assert proc.returncode == 1 and "no complete checkpoint" in proc.stderr
    _, proc = tiny_run(tmp_path, "fresh2", "resume=auto", "trainer.max_steps=2")
    assert "starting from step 0" in proc.stdout


def test_resume_with_a_changed_config_is_refused_with_the_differences(tmp_path, reference_run):
    import shutil

    ref_dir, _ = reference_run
    run_dir = tmp_path / "changed"
    shutil.copytree(ref_dir, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    _, proc = tiny_run(tmp_path, "changed", "resume=auto", "trainer.max_steps=14", "optim.lr=0.0123", "seed=5",
                       check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "optim.lr: 0.04 in the checkpoint, 0.0123 now" in proc.stderr
    assert "seed: 0 in the checkpoint, 5 now" in proc.stderr and "max_steps" not in proc.stderr
    assert "resume_force=true" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # refused before any step
    _, proc = tiny_run(tmp_path, "changed", "resume=auto", "trainer.max_steps=14", "optim.lr=0.0123",
                       "resume_force=true")
    assert "resume_force=true: continuing" in proc.stdout and "optim.lr" in proc.stdout
    assert max(train_losses(run_dir)) == 14


def test_print_config_and_list_and_validate(tmp_path):
    proc = run_llmx(["run", "--cfg", "job", "recipe=pretrain_llama60m"], cwd=tmp_path, check=True)
    assert "hidden_size: 512" in proc.stdout and "intermediate_size: 1376" in proc.stdout
    proc = run_llmx(["list"], cwd=tmp_path, check=True, env={"COLUMNS": "80"})
    assert "pretrain_tiny" in proc.stdout and "pretrain_llama60m" in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    proc = run_llmx(["list", "--kind", "pretrian"], cwd=tmp_path)
    assert proc.returncode == 2 and "kinds: eval, generate_bench" in proc.stderr and "Traceback" not in proc.stderr
    # `llmx validate` on a small copy of conf/ (the real one is validated whole in-process by test_config.py).
    from conftest import small_conf_copy

    proc = run_llmx(["validate"], cwd=tmp_path, check=True, env={"LLMX_CONF_DIR": str(small_conf_copy(tmp_path / "conf"))})
    assert "all configs compose and type-check" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "llmx", "show", "recipe=pretrain_tiny", "optim.lr=0.5"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert "lr: 0.5" in proc.stdout and proc.stdout.startswith("# pretrain_tiny: pretrain, no paper, fits 2 CPU cores")


def test_cli_startup_imports_nothing_heavy():
    code = "import sys; import llmx.cli; from llmx.config.compose import list_recipes; list_recipes(); " \
           "heavy = [m for m in ('torch', 'transformers', 'datasets', 'wandb') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
