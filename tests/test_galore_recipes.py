"""The galore2_* and adamw_* recipes: the GaLore paper's hyperparameters, the 7B model on the meta device,
the sweep example, and a short real galore2_tiny run through the CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import TINY, run_llmx, train_losses
from llmx.config.compose import compose

# ../shared/notes/galore.md 1.9: rank, T, lr, steps, warmup, micro-batch; batch 512 x 256 tokens, alpha 0.25.
PAPER = {
    "60m": (128, 200, 0.01, 10_000, 1_000, 256),
    "130m": (256, 200, 0.01, 20_000, 2_000, 256),
    "350m": (256, 200, 0.01, 60_000, 6_000, 128),
    "1b": (512, 200, 0.01, 100_000, 10_000, 16),
    "7b": (1024, 500, 0.005, 150_000, 15_000, 8),
}


@pytest.mark.parametrize("size", list(PAPER))
def test_galore2_recipes_carry_the_paper_hyperparameters(size):
    rank, gap, lr, steps, warmup, micro = PAPER[size]
    cfg = compose([f"recipe=galore2_llama{size}"])
    o, t = cfg.optim, cfg.trainer
    assert (o.name, o.rank, o.update_proj_gap, o.lr, o.scale) == ("galore_adamw", rank, gap, lr, 0.25)
    assert (t.max_steps, o.warmup_steps, t.batch_size, t.micro_batch_size) == (steps, warmup, 512, micro)
    assert o.svd.value == "randomized" and o.schedule.value == "cosine" and o.min_lr_ratio == 0.1
    assert (cfg.data.name, cfg.data.seq_len, cfg.data.tokenizer.path) == ("c4", 256, "t5-base")
    assert cfg.model.name == f"llama_{size}" and cfg.model.vocab_size == 32000
    base = compose([f"recipe=adamw_llama{size}"])
    assert base.optim.name == "adamw" and base.model == cfg.model and base.data == cfg.data
    assert (base.trainer.max_steps, base.trainer.batch_size, base.optim.warmup_steps) == (steps, 512, warmup)


def test_7b_recipe_builds_on_meta_with_its_galore_targets():
    import fnmatch

    from llmx.models import build_model, count_parameters

    cfg = compose(["recipe=galore2_llama7b"])
    start = time.perf_counter()
    model = build_model(cfg.model, device="meta")
    assert time.perf_counter() - start < 30
    assert count_parameters(model) == 6_738_415_616
    targets = [n for n, p in model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in cfg.optim.targets)]
    assert len(targets) == 32 * 7  # q, k, v, o, gate, up, down in every layer
    assert all(p.is_meta for p in model.parameters())
    assert cfg.launcher.name.value == "torchrun" and cfg.launcher.nproc_per_node == 8


def test_sweep_example_expands_to_rank_times_gap(tmp_path):
    proc = run_llmx(["run", "--dry-run", "-m", "recipe=galore2_tiny_sweep"], cwd=tmp_path, check=True)
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("job ")]
    assert len(jobs) == 6 and "optim.rank=32 optim.update_proj_gap=50" in jobs[-1]


GALORE_TINY = ["run", *[o for o in TINY if not o.startswith("recipe=")], "recipe=galore2_tiny", "optim.rank=8",
               "optim.update_proj_gap=3"]


@pytest.fixture(scope="module")
def galore_ref(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("galore")
    ref = tmp / "ref"
    run_llmx([*GALORE_TINY, f"hydra.run.dir={ref}"], cwd=tmp, check=True)
    return tmp, ref


@pytest.mark.slow
def test_galore2_tiny_trains_and_resumes_from_its_checkpoint(galore_ref):
    tmp, ref = galore_ref
    losses = train_losses(ref)
    assert losses[12] < losses[1]
    final = json.loads((ref / "final.json").read_text())
    assert final["val_ppl"] < 1024
    # The checkpoint holds the projectors: a run killed after step 10 resumes from step 8 exactly.
    killed = tmp / "killed"
    proc = run_llmx([*GALORE_TINY, f"hydra.run.dir={killed}"], cwd=tmp, env={"LLMX_DEBUG_KILL_AT_STEP": "10"})
    assert proc.returncode != 0
    run_llmx([*GALORE_TINY, f"hydra.run.dir={killed}", "resume=auto"], cwd=tmp, check=True)
    assert train_losses(killed) == losses
    state = torch.load(next((ref / "checkpoints" / "step_00000012").glob("train_state_rank0.pt")), weights_only=True)
    assert state["step"] == 12


@pytest.mark.slow
@pytest.mark.dist
def test_galore2_tiny_under_two_process_fsdp_matches_one_process(galore_ref):
    """Plain GaLore and layer-wise GaLore (with accumulation) through the trainer under torchrun."""
    tmp, ref = galore_ref
    fsdp = ["launcher=torchrun", "launcher.nproc_per_node=2"]
    # Exact SVD: the two runs' gradients differ by the rounding of FSDP's reduction order (1e-7), and
    # the randomized range finder's rank-8 basis of these early gradients amplifies that to 4e-4 in the
    # loss within 12 steps (measured), while the exact one stays within 1e-7. That the owner rank's
    # randomized basis is the one-process basis, bit for bit, is test_galore_dist's refresh check.
    exact = ["optim.svd=exact"]
    run_llmx([*GALORE_TINY, *exact, f"hydra.run.dir={tmp / 'exact'}"], cwd=tmp, check=True)
    run_llmx([*GALORE_TINY, *exact, *fsdp, f"hydra.run.dir={tmp / 'fsdp'}"], cwd=tmp, check=True)
    a, b = train_losses(tmp / "exact"), train_losses(tmp / "fsdp")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step

    noclip = ["optim.grad_clip=null", *exact]
    run_llmx([*GALORE_TINY, *noclip, f"hydra.run.dir={tmp / 'noclip'}"], cwd=tmp, check=True)
    # micro-batch 2 over 2 ranks: 2 micro-batches per step, stepped inside backward on the last one.
    run_llmx([*GALORE_TINY, *noclip, *fsdp, "optim.in_backward=true", "trainer.micro_batch_size=2",
              f"hydra.run.dir={tmp / 'fsdp_layerwise'}"], cwd=tmp, check=True)
    a, b = train_losses(tmp / "noclip"), train_losses(tmp / "fsdp_layerwise")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
