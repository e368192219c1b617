"""Shared test setup.

One cache directory (tokenizers, tokenized datasets, converted models) for the whole session, so that
the BPE tokenizer is trained and the SmolLM2 GGUF is converted once. CI may point LLMX_CACHE somewhere
persistent; by default it lives in pytest's temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on a 2-core machine: each runs torch on one thread (two processes
# with two threads each slow each other 10-30x). Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def llmx_cache(tmp_path_factory):
    if "LLMX_CACHE" in os.environ:
        yield Path(os.environ["LLMX_CACHE"])
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One cache for all workers, so the SmolLM2 conversion, the pylib corpus and the tokenizers are built once
        # (twice at worst, when two workers start the same entry together: entries are published atomically and
        # the second copy is dropped).
        path = tmp_path_factory.getbasetemp().parent / "llmx_cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("llmx_cache")
    os.environ["LLMX_CACHE"] = str(path)
    yield path


# Small and fast: a 2-layer Llama on the small embedded pydoc corpus, a few steps, every step logged.
TINY = [
    "recipe=pretrain_tiny",
    "data=pydoc",  # the trainer tests need a little text, not the 44M-character default corpus
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "data.seq_len=64",
    "data.tokenizer.vocab_size=1024",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=12",
    "trainer.log_every=1",
    "trainer.eval_every=6",
    "trainer.eval_batches=2",
    "trainer.ckpt_every=4",
    "optim.warmup_steps=2",
    "logger.progress=false",
]


# What a small copy of conf/ keeps: three recipes and the group options they, config.yaml's defaults and the
# broken-copy tests use. validate_all composes every recipe and option of a config directory (~0.25 s each);
# the real conf/ is validated whole once, by tests/test_config.py::test_validate_all_real_conf_is_clean.
SMALL_CONF = {"recipe": {"pretrain_tiny", "pretrain_llama60m", "galore2_llama7b"},
              "model": {"llama_tiny", "llama_60m", "llama_7b"}, "data": {"pylib", "c4", "files"},
              "optim": {"adamw", "galore"}, "trainer": {"default"}, "logger": {"default", "wandb"},
              "launcher": {"local", "torchrun"}, "evaluator": {"none"}, "bench": set(), "sparsify": set(),
              "merge": set()}


def small_conf_copy(dst: Path) -> Path:
    """A copy of conf/ at `dst` with only SMALL_CONF's recipes and group options."""
    import shutil

    shutil.copytree(REPO / "conf", dst)
    for group, keep in SMALL_CONF.items():
        for path in (dst / group).glob("*.yaml"):
            if path.stem not in keep:
                path.unlink()
    return dst


def run_llmx(args, *, cwd: Path, env=None, timeout=300, check=False) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "llmx", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"llmx {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted TINY run through the CLI, (run_dir, process), that the end-to-end and the FSDP tests
    both compare against. Read-only: copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = tmp / "ref"
    proc = run_llmx(["run", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp, check=True)
    return run_dir, proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
