"""Launchers: the torchrun command line and the Slurm (submitit) job that launcher=slurm composes.

There is no Slurm here, so the Slurm test goes as far as a real submission would before sbatch: the
composed hydra.launcher config instantiates hydra-submitit-launcher's SlurmLauncher, whose parameters
configure a real submitit SlurmExecutor, which renders the sbatch script we check.
"""

from __future__ import annotations

import os
import sys

import pytest
from omegaconf import OmegaConf

from llmx.config.compose import compose
from llmx.launch import torchrun_command
from llmx.utils import LlmxError


def test_torchrun_command_single_and_multi_node(tmp_path):
    cfg = compose(["launcher=torchrun", "launcher.nproc_per_node=4", "trainer.micro_batch_size=4"])
    cmd = torchrun_command(cfg, tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "llmx.worker", "--torchrun"]  # torchrun without its traceback
    assert "--nproc_per_node=4" in cmd and "--standalone" in cmd and cmd[-3:] == ["-m", "llmx.worker", str(tmp_path)]

    # Only the command line is checked here, not how a batch splits over 64 processes.
    cfg = compose(["launcher=torchrun", "launcher.nproc_per_node=8", "launcher.nnodes=8",
                   "launcher.rdzv_endpoint=node001:29500"], check_values=False)
    cmd = torchrun_command(cfg, tmp_path)
    assert "--nnodes=8" in cmd and "--rdzv_backend=c10d" in cmd and "--rdzv_endpoint=node001:29500" in cmd
    assert "--standalone" not in cmd

    cfg = compose(["launcher=torchrun", "launcher.nnodes=2"], check_values=False)
    with pytest.raises(LlmxError, match="rdzv_endpoint"):
        torchrun_command(cfg, tmp_path)
    # Under Slurm the first allocated host is the rendezvous point.
    assert "--rdzv_endpoint=gpu17:29500" in torchrun_command(cfg, tmp_path, node_rank_host="gpu17")


def test_slurm_launcher_config_renders_a_valid_sbatch_script(tmp_path, monkeypatch):
    import submitit
    from hydra.utils import get_class

    # submitit refuses to build a Slurm executor where `srun` is not on PATH; nothing here runs it.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    # The micro-batch the CLI derives for the README's command (256 does not split 512 over 64 processes).
    overrides = ["recipe=pretrain_llama60m", "launcher=slurm", "launcher.nnodes=8", "launcher.gpus_per_node=8",
                 "trainer.micro_batch_size=8",
                 "launcher.partition=gpu", "launcher.account=llm", "launcher.timeout_min=2880",
                 f"hydra.sweep.dir={tmp_path}/sweep"]
    cfg = compose(overrides, return_hydra_config=True)
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    target = launcher_cfg.pop("_target_")
    assert get_class(target).__name__ == "SlurmLauncher"
    assert cfg.launcher.name.value == "slurm" and cfg.launcher.nproc_per_node == 8

    # What BaseSubmititLauncher.launch does with these parameters, short of submitting.
    folder = launcher_cfg.pop("submitit_folder")
    assert folder.startswith(f"{tmp_path}/sweep/.submitit")
    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="slurm",
                                     slurm_max_num_timeout=launcher_cfg.pop("max_num_timeout"))
    base = {"timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "name",
            "stderr_to_stdout"}
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher_cfg.items() if v is not None}
    executor.update_parameters(**params)  # raises on a parameter submitit does not know
    script = executor._executor._make_submission_file_text("echo hi", "uid")
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --account=llm", "#SBATCH --time=2880",
                 "#SBATCH --signal=USR2@120"):
        assert line in script, line
