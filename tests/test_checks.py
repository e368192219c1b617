"""Shared value checks: every bad value is refused when the config is composed, before a run directory exists."""

import pytest

from conftest import run_llmx
from llmx.config.checks import derived_micro_batch
from llmx.config.compose import ConfigError, compose


@pytest.mark.parametrize("recipe, override, message", [
    ("pretrain_tiny", "trainer.max_steps=-1", "trainer.max_steps=-1: must be an integer >= 1"),
    ("pretrain_tiny", "trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1"),
    ("pretrain_tiny", "trainer.micro_batch_size=0", "trainer.micro_batch_size=0: must be an integer >= 1"),
    ("pretrain_tiny", "trainer.micro_batch_size=5", "not divisible by trainer.micro_batch_size=5 x 1"),
    ("pretrain_tiny", "trainer.log_every=0", "trainer.log_every=0: must be an integer >= 1"),
    ("pretrain_tiny", "trainer.eval_every=-5", "(0: evaluate at the end only)"),
    ("pretrain_tiny", "optim.lr=-1e-3", "optim.lr=-0.001: must be a finite number > 0"),
    ("pretrain_tiny", "optim.grad_clip=0", "or null (no clipping)"),
    ("pretrain_tiny", "optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
    ("pretrain_tiny", "data.seq_len=1", "data.seq_len=1: must be an integer >= 2"),
    ("pretrain_tiny", "seed=-3", "seed=-3: must be an integer >= 0"),
    ("galore2_tiny", "optim.rank=0", "optim.rank=0: must be an integer >= 1"),
    ("galore2_tiny", "optim.update_proj_gap=0", "optim.update_proj_gap=0: must be an integer >= 1"),
    ("cocomix_tiny", "launcher.nproc_per_node=0", "launcher.nproc_per_node=0: must be an integer >= 1"),
    ("sweet_rl_tiny", "trainer.batch_size=0", "trainer.batch_size=0: must be an integer >= 1"),
])
def test_bad_values_are_refused_at_compose(recipe, override, message):
    with pytest.raises(ConfigError) as err:
        compose([f"recipe={recipe}", override])
    assert message in str(err.value)


def test_several_bad_values_are_listed_together():
    with pytest.raises(ConfigError, match="bad values:\n  trainer.max_steps=-1.*\n  optim.rank=0"):
        compose(["recipe=galore2_tiny", "trainer.max_steps=-1", "optim.rank=0"])


def test_batch_split_over_the_launchers_processes():
    cfg = compose(["recipe=pretrain_tiny", "launcher=torchrun", "launcher.nproc_per_node=3",
                   "trainer.batch_size=12", "trainer.micro_batch_size=4"])
    assert derived_micro_batch(cfg) == 4
    with pytest.raises(ConfigError, match="micro_batch_size can be 1, 2$"):
        compose(["recipe=pretrain_tiny", "launcher=torchrun", "launcher.nproc_per_node=4",
                 "trainer.batch_size=8", "trainer.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="must be a multiple of the 3 processes"):
        compose(["recipe=pretrain_tiny", "launcher=torchrun", "launcher.nproc_per_node=3", "trainer.batch_size=16"])


def test_cli_refuses_before_any_run_directory_and_derives_the_micro_batch(tmp_path):
    proc = run_llmx(["run", "recipe=pretrain_tiny", "trainer.max_steps=-1"], cwd=tmp_path)
    assert proc.returncode == 2 and "trainer.max_steps=-1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
    # The README's distributed command with the default recipe: the micro-batch is derived, said once.
    proc = run_llmx(["run", "--dry-run", "launcher=torchrun", "launcher.nproc_per_node=8"], cwd=tmp_path, check=True)
    assert "trainer.micro_batch_size=2 (the recipe's 16 does not split trainer.batch_size=16 over 8" in proc.stdout
    assert "job 0: launcher=torchrun launcher.nproc_per_node=8 trainer.micro_batch_size=2" in proc.stdout
    # A micro-batch the user set is kept, and refused when it does not split.
    proc = run_llmx(["run", "--dry-run", "launcher=torchrun", "launcher.nproc_per_node=8",
                     "trainer.micro_batch_size=4"], cwd=tmp_path)
    assert proc.returncode == 2 and "micro_batch_size can be 1, 2" in proc.stderr


@pytest.mark.parametrize("recipe, override, message", [
    ("gsm_infinite_tiny", "bench.ops=[0]", "gsm_infinite: op=0 must be >= 1"),
    ("spectral_journey_bench", "bench.ops=[1]", "op=1 nodes is outside 2-10"),
    ("token_assorted_maze_bench", "bench.ops=[99]", "op=99 doors opened is outside 1-2"),
    ("cocomix_tiny", "cocomix.method=foo", "cocomix.method='foo'; valid: cocomix, ntp, kd"),
    ("cocomix_tiny", "cocomix.insert_layer=9", "outside the student's 4 blocks (valid: 0..3)"),
    ("token_assorted_maze_tiny", "latent.variant=foo", "latent.variant='foo'; valid:"),
    ("sharp_smollm2", "sparsify.sharp.rank=0", "sparsify.sharp.rank=0: must be >= 1"),
    ("merge_models", "merge.models=[]", "merge.models is empty"),
    ("sweet_rl_tiny", "rl.methods=[]", "rl.methods is empty; valid methods: zero_shot"),
    ("natural_reasoning_smollm2", "synth.uses=[foo]", "unknown; valid: distill, rft, dpo"),
    ("rsparse_smollm2", "sparsify.levels=[0.5,1.2]", "sparsify.levels=[0.5, 1.2]: each must be a model-level"),
    ("teal_smollm2", "sparsify.allocation=search sparsify.search.mode=alpha",
     "sparsify.search.mode=alpha searches R-Sparse's alphas; TEAL (alpha = 1) has none"),
    ("rsparse_smollm2", "sparsify.search.population=1", "sparsify.search.population=1: must be an integer >= 2"),
    ("rsparse_smollm2", "sparsify.match_tolerance=0.1", "sparsify.match_tolerance=0.1: must be in (0, 0.05)"),
    ("rsparse_smollm2", "sparsify.alpha=1.5", "sparsify.alpha=1.5: must be a share of the budget in [0, 1]"),
    ("sae_smollm2", "sae.k=0", "sae.k=0 must be in [1, sae.n_latents="),
    ("spectral_journey_tiny", "data.graphs.test_sizes=[50]", "[50] outside data.graphs.nodes="),
    ("spectral_journey_tiny", "data.graphs.sampler=star", "graphs.sampler='star'; valid samplers"),
    ("rsparse_smollm2", "sparsify.search.mode=s", "sparsify.search.mode='s'; valid: s_alpha"),
    ("eval_smollm2", "eval.batch_size=big", "eval.batch_size='big': must be 'auto' or an integer >= 1"),
])
def test_each_kind_refuses_its_bad_values_before_work(recipe, override, message):
    from llmx.launch import check_before_run
    from llmx.utils import LlmxError

    cfg = compose([f"recipe={recipe}", *override.split()])
    with pytest.raises(LlmxError) as err:
        check_before_run(cfg)
    assert message in str(err.value)
    if recipe != "merge_models":  # which models to merge is the user's to say
        check_before_run(compose([f"recipe={recipe}"]))  # the recipe as shipped passes


def test_a_kinds_error_leaves_no_run_directory(tmp_path):
    proc = run_llmx(["run", "recipe=gsm_infinite_tiny", "bench.ops=[0]"], cwd=tmp_path)
    assert proc.returncode == 2 and "op=0 must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
