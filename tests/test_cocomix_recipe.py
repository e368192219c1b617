"""The cocomix recipe through the CLI, with SmolLM2-135M as the teacher, a random SAE on its block 3 and a small local
text: every method trains and evaluates next-token loss; the baselines are matched to CoCoMix's parameter count;
cached labels resume exactly; 2-process FSDP2 gives the single-process losses; bad input is refused before work."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_llmx
from llmx.concept.sae import SAEConfig, TopKSAE, save_sae


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("cocomix")
    torch.manual_seed(0)
    save_sae(TopKSAE(SAEConfig(d_model=576, n_latents=1024, k=8, layer=3, teacher="smollm2_135m")), root / "sae")
    # Text: the docstrings of a few standard-library modules (deterministic for a given Python), ~120 blocks.
    import argparse
    import collections
    import json as json_mod
    import pathlib
    import re
    import subprocess

    docs = [m.__doc__ for m in (argparse, collections, json_mod, pathlib, re, subprocess, sys) if m.__doc__]
    (root / "text").mkdir()
    for i, d in enumerate(docs):
        (root / "text" / f"{i}.txt").write_text(d)
    return root


def args(setting, *extra):
    return ["run", "recipe=cocomix_tiny", "data=files", f"data.paths=[{setting / 'text'}]",
            "data.tokenizer.source=model",
            "data.seq_len=32", "data.val_fraction=0.15", f"cocomix.sae={setting / 'sae'}", "cocomix.k=8",
            "cocomix.labels=online",
            "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.batch_size=4",
            "trainer.micro_batch_size=2", "trainer.eval_batches=2", "cocomix.steer_tokens=4", "logger.progress=false",
            *extra]


@pytest.mark.slow
def test_every_method_trains_at_cocomix_parameter_count(setting, tmp_path):
    sweep = tmp_path / "sweep"
    # prediction_only and add differ from cocomix only in the mix, which tests/test_cocomix.py checks directly.
    run_llmx([*args(setting, "cocomix.method=cocomix,ntp,kd,pause", f"hydra.sweep.dir={sweep}"),
              "-m"], cwd=tmp_path, check=True, timeout=900)
    res = {}
    for job in sorted(sweep.glob("[0-9]*")):
        r = json.loads((job / "results.json").read_text())
        res[r["method"]] = (r, [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()])
    assert set(res) == {"cocomix", "ntp", "kd", "pause"}
    n = res["cocomix"][0]["parameters"]
    for method in ("ntp", "kd", "pause"):
        assert abs(res[method][0]["parameters"] - n) / n < 1e-3, (method, res[method][0]["parameters"], n)
    for method, (r, rows) in res.items():
        assert 0 < r["final"]["val_loss"] < 20
        train_rows = [row for row in rows if "loss" in row]
        if method == "cocomix":
            assert train_rows[-1]["train_concept"] > 0 and "top1_in_labels" in r["concepts"]
            assert len(r["concepts"]["per_token"]) == 12 and "steered" in r["concepts"]["steering"]
        if method == "kd":
            assert train_rows[-1]["train_kd"] >= 0
    # The model's saved state rebuilds: every parameter is in student.safetensors.
    state = load_file(str(sorted(sweep.glob("[0-9]*"))[0] / "student.safetensors"))
    assert any(k.startswith("concept.") for k in state)


@pytest.mark.slow
def test_cached_labels_resume_exactly(setting, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_llmx([*args(setting, "cocomix.labels=cached", f"hydra.run.dir={full}")], cwd=tmp_path, check=True, timeout=900)
    proc = run_llmx([*args(setting, "cocomix.labels=cached", f"hydra.run.dir={killed}")], cwd=tmp_path,
                    env={"LLMX_DEBUG_KILL_AT_STEP": "3"}, timeout=900)
    assert proc.returncode != 0
    run_llmx([*args(setting, "cocomix.labels=cached", "resume=auto", f"hydra.run.dir={killed}")], cwd=tmp_path,
             check=True, timeout=900)
    a, b = load_file(str(full / "student.safetensors")), load_file(str(killed / "student.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.dist
def test_fsdp_two_processes_with_activation_checkpointing_match_one(setting, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_llmx([*args(setting, f"hydra.run.dir={one}")], cwd=tmp_path, check=True, timeout=900)
    # Two processes with activation checkpointing against one without: neither may change the numbers.
    proc = run_llmx([*args(setting, "launcher=torchrun", "launcher.nproc_per_node=2",
                           "trainer.activation_checkpointing=true", f"hydra.run.dir={two}")],
                    cwd=tmp_path, check=True, timeout=900)
    assert "world size 2" in proc.stdout

    def losses(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]

    (t1, v1), (t2, v2) = losses(one), losses(two)
    assert len(t1) == len(t2) and len(v1) == len(v2)
    for x, y in zip(t1 + v1, t2 + v2):
        assert abs(x - y) < 1e-3 * max(1.0, abs(x)), (t1, t2, v1, v2)


@pytest.mark.parametrize("override, message", [
    ("cocomix.insert_layer=4", "cocomix.insert_layer=4 is outside the student's 4 blocks"),
    ("cocomix.method=distill", "cocomix.method='distill'; valid: cocomix, ntp, kd, pause"),
    ("data.tokenizer.source=trained", "data.tokenizer.source must be model"),
    ("cocomix.top=9", "cocomix.top=9 must be in [1, cocomix.k=8]"),
    ("cocomix.labels=offline", "cocomix.labels='offline'; valid: online, cached"),
    ("model=smollm2_135m", "model must be a preset"),
])
def test_config_errors_name_the_bad_value(setting, override, message):
    from llmx.config.compose import compose
    from llmx.recipes.cocomix import check_config
    from llmx.utils import LlmxError

    cfg = compose(args(setting, override)[1:])
    with pytest.raises(LlmxError) as err:
        check_config(cfg)
    assert message in str(err.value)


def test_a_missing_sae_is_refused_before_work(setting, tmp_path):
    proc = run_llmx([*args(setting, "cocomix.sae=no_such_sae", f"hydra.run.dir={tmp_path / 'run'}")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "train it first (llmx run recipe=sae_smollm2 sae.name=no_such_sae)" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_sae_of_another_teacher_is_refused(setting, tmp_path):
    other = tmp_path / "other_sae"
    save_sae(TopKSAE(SAEConfig(d_model=640, n_latents=1024, k=8, layer=3, teacher="gemma3_270m")), other)
    proc = run_llmx([*args(setting, f"cocomix.sae={other}", f"hydra.run.dir={tmp_path / 'run'}")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "was trained on 'gemma3_270m', not the teacher 'smollm2_135m'" in proc.stdout + proc.stderr
    narrow = tmp_path / "narrow_sae"
    save_sae(TopKSAE(SAEConfig(d_model=512, n_latents=1024, k=8, layer=3, teacher="smollm2_135m")), narrow)
    proc = run_llmx([*args(setting, f"cocomix.sae={narrow}", f"hydra.run.dir={tmp_path / 'run2'}")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "(width 512, block 3) does not fit the teacher (width 576, 30 blocks)" in proc.stdout + proc.stderr
