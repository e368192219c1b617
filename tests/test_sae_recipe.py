"""The sae recipe through the CLI on a tiny random Llama: it trains, reports quality, publishes where CoCoMix looks,
resumes exactly after a kill, and refuses a block outside the model before any work."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_llmx

TINY_SAE = [
    "recipe=sae_smollm2", "model=llama_tiny", "model.num_hidden_layers=2", "data=pydoc",
    "data.tokenizer.source=trained", "data.tokenizer.vocab_size=1024", "data.seq_len=64",
    "sae.layer=1", "sae.n_latents=512", "sae.k=8", "sae.dead_tokens=2000", "sae.eval_blocks=8",
    "trainer.max_steps=20", "trainer.eval_every=10", "trainer.ckpt_every=10", "trainer.batch_size=4",
    "trainer.micro_batch_size=2", "optim.lr=3e-3", "logger.progress=false",
]


@pytest.mark.slow
def test_sae_recipe_trains_publishes_and_resumes_exactly(tmp_path, llmx_cache):
    full = tmp_path / "full"
    run_llmx(["run", *TINY_SAE, "sae.name=tiny_full", f"hydra.run.dir={full}"], cwd=tmp_path, check=True)
    res = json.loads((full / "results.json").read_text())
    q = res["quality"]
    assert q["l0"] <= 8 and 0 < q["nmse"] < 1 and q["explained_variance"] > 0 and q["tokens"] == 8 * 63
    published = llmx_cache / "sae" / "tiny_full"
    assert json.loads((published / "config.json").read_text())["config"]["layer"] == 1
    ref = load_file(str(published / "model.safetensors"))
    cols = ref["decoder.weight"].norm(dim=0)
    torch.testing.assert_close(cols, torch.ones_like(cols))

    killed = tmp_path / "killed"
    proc = run_llmx(["run", *TINY_SAE, "sae.name=tiny_killed", f"hydra.run.dir={killed}"], cwd=tmp_path,
                    env={"LLMX_DEBUG_KILL_AT_STEP": "10"})
    assert proc.returncode != 0 and not (killed / "results.json").exists()
    run_llmx(["run", *TINY_SAE, "sae.name=tiny_killed", "resume=auto", f"hydra.run.dir={killed}"], cwd=tmp_path,
             check=True)
    resumed = load_file(str(killed / "sae" / "model.safetensors"))
    for name, t in ref.items():
        assert torch.equal(t, resumed[name]), name


def test_sae_recipe_refuses_a_block_outside_the_model(tmp_path):
    proc = run_llmx(["run", *TINY_SAE, "sae.layer=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "sae.layer=2 is outside llama_tiny's 2 blocks (valid: 0..1)" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
