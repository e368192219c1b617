"""FSDP2 under `torchrun --nproc_per_node=2` with gloo on CPU, through the real CLI."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, read_metrics, run_llmx, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.dist]

FSDP = ["launcher=torchrun", "launcher.nproc_per_node=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_run):
    tmp = tmp_path_factory.mktemp("fsdp")
    single, fsdp = reference_run[0], tmp / "fsdp"  # the one-process run is conftest's shared TINY run
    proc = run_llmx(["run", *TINY, *FSDP, f"hydra.run.dir={fsdp}"], cwd=tmp, check=True)
    return tmp, single, fsdp, proc


def test_two_process_fsdp_matches_single_process(runs):
    _, single, fsdp, proc = runs
    assert "llmx.worker --torchrun --nproc_per_node=2" in proc.stdout and "world size 2" in proc.stdout
    a, b = train_losses(single), train_losses(fsdp)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:  # same global batch and loss normalisation; only the summation order differs
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    final = json.loads((fsdp / "final.json").read_text())
    assert final["world_size"] == 2
    assert final["val_loss"] == pytest.approx(json.loads((single / "final.json").read_text())["val_loss"], rel=1e-4)
    # Only rank 0 logs: one line per step, not two.
    assert len([r for r in read_metrics(fsdp) if "loss" in r]) == 12


def test_fsdp_export_is_a_full_hf_model(runs):
    import torch
    from transformers import AutoModelForCausalLM

    _, single, fsdp, _ = runs
    a = AutoModelForCausalLM.from_pretrained(single / "hf")
    b = AutoModelForCausalLM.from_pretrained(fsdp / "hf")
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=n)


def test_a_ranks_error_reaches_the_user_as_one_line(tmp_path):
    proc = run_llmx(["run", *TINY, *FSDP, f"hydra.run.dir={tmp_path / 'r'}", "resume=latest"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("resume=latest: no complete checkpoint") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert (tmp_path / "r" / "error.txt").read_text().startswith("resume=latest: no complete checkpoint")


def test_validation_covers_every_block_at_1_2_and_3_processes(tmp_path):
    # lr 1e-12: the weights stay those of step 0, so the losses differ only by summation order, not by which
    # blocks each process count evaluates (the held-out blocks, 31, split evenly over neither 2 nor 3 ranks).
    common = [*TINY, "trainer.max_steps=1", "trainer.batch_size=12", "trainer.micro_batch_size=2",
              "trainer.eval_batches=1000", "optim.lr=1e-12", "trainer.export_hf=false"]
    val = {}
    for n in (1, 2, 3):
        extra = ["launcher=torchrun", f"launcher.nproc_per_node={n}"] if n > 1 else []
        run_llmx(["run", *common, *extra, f"hydra.run.dir={tmp_path / str(n)}"], cwd=tmp_path, check=True)
        val[n] = json.loads((tmp_path / str(n) / "final.json").read_text())["val_loss"]
    assert val[2] == pytest.approx(val[1], rel=1e-6) and val[3] == pytest.approx(val[1], rel=1e-6), val


def test_fsdp_resume_after_sigkill_is_bitwise(runs):
    tmp, _, fsdp, _ = runs
    killed = tmp / "fsdp_killed"
    proc = run_llmx(["run", *TINY, *FSDP, f"hydra.run.dir={killed}"], cwd=tmp, env={"LLMX_DEBUG_KILL_AT_STEP": "10"})
    assert proc.returncode != 0
    assert max(train_losses(killed)) <= 10 and (killed / "checkpoints" / "step_00000008").is_dir()
    run_llmx(["run", *TINY, *FSDP, f"hydra.run.dir={killed}", "resume=auto"], cwd=tmp, check=True)
    assert train_losses(killed) == train_losses(fsdp)


def _readme_launch_commands():
    """The commands of the README's "Distributed runs" section, joined across backslash continuations."""
    import re

    from conftest import REPO

    section = (REPO / "README.md").read_text().split("## Distributed runs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = " ".join(b.replace("\\\n", " ") for b in blocks).replace("\n", " \n ").split("\n")
    return [" ".join(line.split("#", 1)[0].split()) for line in lines if line.split("#", 1)[0].strip()]


def test_the_readmes_launch_commands_run(tmp_path):
    """Each command of the README's distributed section, as written, at 2 processes (8 on 2 CPU cores would only be
    slow) on the tiny test model; the multi-node and Slurm ones validated (--dry-run), as one machine cannot run
    them."""
    import re
    import shlex
    import sys

    commands = _readme_launch_commands()
    assert len(commands) == 4, commands
    small = [*TINY[1:], "trainer.max_steps=2", "trainer.export_hf=false"]  # TINY[0] is the recipe: the README's
    for i, command in enumerate(commands):
        argv = shlex.split(re.sub(r"(nproc_per_node|nnodes)=8\b", r"\1=2", command).replace("$HEAD_NODE", "127.0.0.1"))
        if argv[0] == "torchrun":  # the user's own torchrun running `llmx run` in every rank
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
            argv = [a.replace("hydra.run.dir=outputs/x/run1", f"hydra.run.dir={tmp_path / 'own'}") for a in argv]
            import subprocess

            proc = subprocess.run([*argv, *small], cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert (tmp_path / "own" / "final.json").is_file()
            continue
        assert argv[0] == "llmx"
        if "launcher.nnodes=2" in argv or "launcher=slurm" in argv:
            proc = run_llmx(["run", "--dry-run", *argv[2:]], cwd=tmp_path)
        else:
            proc = run_llmx([*argv[1:], *small, f"hydra.run.dir={tmp_path / str(i)}"], cwd=tmp_path)
        assert proc.returncode == 0, command + "\n" + proc.stdout + proc.stderr
