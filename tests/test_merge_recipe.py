"""The merge recipe: config validation before any work, plain merges of small checkpoints, the 70B config,
the synthetic corpora of the ParamΔ demonstration, and a smoke run of paramdelta_tiny end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from conftest import REPO, run_llmx
from llmx.config.compose import ConfigError, compose
from llmx.data import synthetic
from llmx.recipes import merge as recipe
from llmx.utils import LlmxError


@pytest.fixture(autouse=True)
def _real_conf(monkeypatch):
    monkeypatch.delenv("LLMX_CONF_DIR", raising=False)


def _cfg(tmp_path, *overrides):
    cfg = compose(list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    return cfg


def _tiny_llama(path: Path, seed: int, vocab: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _tensors(hf_dir: Path) -> dict:
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("key,bad,valid", [("merge.method", "soup", "task_arithmetic"),
                                           ("merge.vocab_policy", "truncate", "new_base"),
                                           ("merge.dtype", "fp8", "bfloat16")])
def test_bad_enum_values_fail_at_compose(key, bad, valid):
    with pytest.raises(ConfigError) as e:
        compose(["recipe=merge_models", f"{key}={bad}"])
    assert bad in str(e.value) and valid in str(e.value)


@pytest.mark.parametrize("overrides,expected", [
    (["merge=paramdelta"], ["merge.post is required", "merge.base is required", "merge.new_base is required"]),
    (["merge=paramdelta", "merge.post=/no/such/post", "merge.base=/no/such/base", "merge.new_base=/no/such/nb"],
     ["merge.post=/no/such/post: no such directory", "merge.new_base=/no/such/nb: no such directory"]),
    (["merge=ties"], ["merge.models is empty", "merge.base is required by method ties"]),
    (["merge=ties", "merge.base=org/base", "merge.models=[{path: org/a, weight: 1.0}]", "+merge.params.densty=0.3"],
     ["densty not parameters of ties; valid: density, lambda, normalize"]),
    (["merge=linear", "merge.base=org/base", "merge.models=[{path: org/a, weight: 1.0}]"],
     ["linear averages the models and takes no base"]),
    (["merge=task_arithmetic", "merge.base=org/base", "merge.models=[{path: org/a, weight: 1.0}]",
      "merge.scale=0.5"], ["merge.scale=0.5 is ParamΔ's"]),
    (["merge=paramdelta", "merge.post=a/b", "merge.base=a/c", "merge.new_base=a/d", "merge.shard_size=5 gigs"],
     ["merge.shard_size=5 gigs: not a size"]),
])
def test_check_config_lists_every_problem(tmp_path, overrides, expected):
    cfg = _cfg(tmp_path, "recipe=merge_models", *overrides)
    with pytest.raises(LlmxError) as e:
        recipe.check_config(cfg)
    for text in expected:
        assert text in str(e.value)


def test_demo_rejects_inputs_and_other_methods(tmp_path):
    cfg = _cfg(tmp_path, "recipe=paramdelta_tiny", "merge.post=/x", "merge.method=ties",
               "merge.demo.post_train.replay=1.0", "merge.demo.continue_pretrain.generator=nope")
    with pytest.raises(LlmxError) as e:
        recipe.check_config(cfg)
    msg = str(e.value)
    for text in ("merge.post=/x: the demonstration trains its own inputs", "merge.method=ties",
                 "replay=1.0: must be a share in [0, 1)", "generator=nope: not a registered generator"):
        assert text in msg


@pytest.mark.slow
def test_bad_config_fails_before_any_work(tmp_path):
    proc = run_llmx(["run", "recipe=merge_models", "merge=paramdelta", "merge.post=/no/such/dir", "merge.base=a/b",
                     "merge.new_base=a/c", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, timeout=120)
    assert proc.returncode != 0
    assert "merge.post=/no/such/dir: no such directory" in proc.stderr
    assert not (tmp_path / "run" / "merged").exists() and not (tmp_path / "run" / "results.md").exists()


def test_llama3_70b_composes_and_validates_without_downloading(tmp_path):
    cfg = _cfg(tmp_path, "recipe=paramdelta_llama3_70b")
    assert cfg.kind.value == "merge" and cfg.fits_cpu is False
    assert (cfg.merge.post, cfg.merge.base, cfg.merge.new_base) == (
        "meta-llama/Meta-Llama-3-70B-Instruct", "meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3.1-70B")
    recipe.check_config(cfg)  # hub ids pass; they are resolved (downloaded) only when the merge runs
    assert compose(["recipe=paramdelta_llama3_70b", "merge.post=/models/x"]).merge.post == "/models/x"


# ---------------------------------------------------------------------------------------------- plain mode


def test_plain_paramdelta_and_task_arithmetic(tmp_path):
    post, base, new_base = (_tiny_llama(tmp_path / n, s) for n, s in [("post", 1), ("base", 2), ("new_base", 3)])
    cfg = _cfg(tmp_path, "recipe=merge_models", "merge=paramdelta", f"merge.post={post}", f"merge.base={base}",
               f"merge.new_base={new_base}", "merge.scale=0.5")
    final = recipe.main(cfg)
    run = Path(cfg.run_dir)
    out = _tensors(run / "merged")
    P, B, N = _tensors(post), _tensors(base), _tensors(new_base)
    assert set(out) == set(N)
    for k in N:
        torch.testing.assert_close(out[k], N[k] + 0.5 * (P[k] - B[k]), rtol=0, atol=1e-6)
    assert final["method"] == "paramdelta" and Path(final["out_dir"]) == run / "merged"
    for f in ("results.md", "results.json", "final.json"):
        assert (run / f).is_file()
    assert json.loads((run / "results.json").read_text())["manifest"]["method"] == "paramdelta"

    cfg = _cfg(tmp_path / "ta", "recipe=merge_models", f"merge.base={base}",
               f"merge.models=[{{path: {post}, weight: 1.0}}, {{path: {new_base}, weight: 1.0}}]")
    recipe.main(cfg)
    ta = _tensors(Path(cfg.run_dir) / "merged")
    for k in N:  # ParamΔ is task arithmetic with post and new_base on the old base (mergekit's form A)
        torch.testing.assert_close(ta[k], N[k] + P[k] - B[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ demo corpora


def test_facts_worlds_and_probes():
    docs = list(synthetic.facts(0, "train", n_docs=20, n_entities=8))
    assert docs == list(synthetic.facts(0, "train", n_docs=20, n_entities=8))
    assert docs != list(synthetic.facts(0, "validation", n_docs=20, n_val_docs=20, n_entities=8))
    world0, world1 = synthetic.facts_world(0, 8), synthetic.facts_world(1, 8)
    assert not {p["name"] for p in world0} & {p["name"] for p in world1}  # other seeds: other people
    probes = synthetic.facts_probes(0, 8)
    assert len(probes) == 8 * 3
    person = world0[0]
    assert (f"{person['name']} lives in", f" {person['city']}") in probes
    text = " ".join(docs)
    for prompt, answer in probes:  # every statement in the documents is the world's fact
        for rest in text.split(prompt + " ")[1:]:
            assert re.match(re.escape(answer.strip()) + r"\b", rest), (prompt, rest[:30])
    with pytest.raises(LlmxError, match="n_entities"):
        synthetic.facts_world(100, 8)


def test_mixture_and_arithmetic_template():
    args = {"parts": [{"generator": "arithmetic", "args": {"n_docs": 4, "lines_per_doc": 1,
                                                           "template": "{a} {op} {b} = {answer}"}},
                      {"generator": "facts", "args": {"n_docs": 2, "facts_per_doc": 1, "seed": 1}}]}
    docs = synthetic.generate("mixture", 0, "train", args)
    assert len(docs) == 6 and sum("=" in d for d in docs) == 4
    assert not docs[0].startswith("Q:")
    assert list(synthetic.arithmetic(0, "train", n_docs=2))[0].startswith("Q: ")  # the default is unchanged
    with pytest.raises(LlmxError, match="parts"):
        synthetic.generate("mixture", 0, "train", {"parts": [{"gen": "facts"}]})


# ---------------------------------------------------------------------------------- the demo, end to end

SMOKE = [
    "recipe=paramdelta_tiny",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "data.seq_len=64",
    "data.tokenizer.vocab_size=300",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=4",
    "trainer.ckpt_every=0",
    "trainer.eval_batches=1",
    "logger.progress=false",
    "merge.demo.pretrain.max_steps=6",
    "merge.demo.post_train.max_steps=4",
    "merge.demo.continue_pretrain.max_steps=4",
    "merge.demo.pretrain.generator_args.parts.0.args.n_docs=100",
    "merge.demo.pretrain.generator_args.parts.1.args.n_docs=20",
    "merge.demo.pretrain.generator_args.parts.2.args.n_docs=50",
    "merge.demo.continue_pretrain.generator_args.n_docs=100",
    "merge.demo.eval_questions=10",
    "merge.demo.eval_sequences=4",
]


@pytest.mark.slow
def test_paramdelta_tiny_smoke(tmp_path):
    run = tmp_path / "run"
    proc = run_llmx(["run", *SMOKE, f"hydra.run.dir={run}"], cwd=REPO, timeout=300, check=True)
    for f in ("results.md", "results.json", "final.json"):
        assert (run / f).is_file(), proc.stdout
    rows = json.loads((run / "results.json").read_text())
    assert [r["model"] for r in rows] == ["base", "base'", "post", "post'", "ParamΔ"]
    final = json.loads((run / "final.json").read_text())
    for metric in ("task_accuracy", "corpus_b_loss", "corpus_a_loss", "fact_recall"):
        for model in ("base", "base_prime", "post", "post_prime", "paramdelta"):
            assert f"{metric}_{model}" in final, (metric, model)
    for target in ("post_prime", "post"):  # ParamΔ's task accuracy as a share of post' (the paper's) and of post
        acc = final[f"task_accuracy_{target}"]
        assert final[f"task_share_of_{target}"] == (final["task_accuracy_paramdelta"] / acc if acc else None)
    assert set(final["stage_seconds"]) == {"base", "post", "base_prime", "post_prime"}
    table = (run / "results.md").read_text()
    assert "| post' |" in table
    assert "of post' (base' post-trained the same way" in table or "post' answers no held-out question" in table

    # post' is base' post-trained with post's recipe: same data and seeds, another starting point.
    stages = run / "stages"
    base_prime, post, post_prime = (json.loads((stages / s / "stage.json").read_text())
                                    for s in ("base_prime", "post", "post_prime"))
    assert post_prime["recipe_sha"] == post["recipe_sha"] and post_prime["seed"] == post["seed"]
    assert post_prime["from"] == base_prime["key"] != post["from"]
    assert _tensors(stages / "post_prime" / "hf").keys() == _tensors(stages / "post" / "hf").keys()

    # The ParamΔ model is exactly post - base + base' (float32 inputs and output).
    P, B, N = (_tensors(stages / s / "hf") for s in ("post", "base", "base_prime"))
    out = _tensors(stages / "paramdelta" / "hf")
    assert set(out) == set(N) == set(P) == set(B)
    for k in N:
        torch.testing.assert_close(out[k], N[k] + (P[k] - B[k]), rtol=0, atol=1e-6)
    manifest = json.loads((stages / "paramdelta" / "hf" / "llmx_merge.json").read_text())
    assert manifest["method"] == "paramdelta"

    # Rerunning in the same run directory skips every finished stage and evaluates again.
    again = run_llmx(["run", *SMOKE, f"hydra.run.dir={run}"], cwd=REPO, timeout=300, check=True)
    assert again.stdout.count("done in an earlier run") == 5, again.stdout
    assert "stage 4/6 post_prime: done in an earlier run" in again.stdout
    assert "| mean ± s.e. (n=1) |" in _seeds_script().summarize([run])  # the seeds summary reads a real run
    assert json.loads((run / "final.json").read_text()) == final

    # The same run directory with a changed stage config is refused, not silently reused.
    changed = run_llmx(["run", *SMOKE, "merge.demo.post_train.lr=5e-4", f"hydra.run.dir={run}"], cwd=REPO,
                       timeout=300)
    assert changed.returncode != 0 and "produced by a different config" in changed.stderr


def test_replay_reaches_all_of_corpus_a_and_keeps_the_share():
    from llmx.recipes.merge import _Replay

    data = [torch.full((4,), -i) for i in range(1, 4)]  # 3 stage sequences
    corpus_a = [torch.full((4,), i) for i in range(20)]
    r = _Replay(data, corpus_a, 0.5, pairs=False)
    items = [r[i] for i in range(len(r))]
    stage = [x for x in items if x[0] < 0]
    replayed = {int(x[0]) for x in items if x[0] >= 0}
    assert len(stage) == len(items) - len(stage)  # half of every epoch replays corpus A
    assert replayed == set(range(20))  # every block, not the same 3 each epoch
    assert {int(x[0]) for x in stage} == {-1, -2, -3}
    pairs = _Replay(data, corpus_a, 0.25, pairs=True)
    assert pairs[len(pairs) - 1].shape == (2, 4)
    assert sum(1 for i in range(len(pairs)) if pairs[i].dim() == 2) == round(len(pairs) * 0.25)


def _seeds_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paramdelta_seeds", REPO / "scripts" / "paramdelta_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_summary_means_and_standard_errors(tmp_path):
    seeds = _seeds_script()
    keys = [f"{m}_{k}" for _, m, _ in seeds.METRICS for k, _ in seeds.MODELS]
    runs = []
    for seed, share, post_share in [(11, 0.9, 0.6), (10, 0.7, None), (12, 0.8, 0.8)]:
        run = tmp_path / f"seed{seed}"
        (run / "stages" / "base").mkdir(parents=True)
        (run / "stages" / "base" / "stage.json").write_text(json.dumps({"seed": seed}))
        final = {k: 0.5 for k in keys}
        final.update(task_share_of_post_prime=share, task_share_of_post=post_share)
        (run / "final.json").write_text(json.dumps(final))
        runs.append(run)
    table = seeds.summarize(runs)
    rows = [line for line in table.splitlines() if line.startswith("| 1")]
    assert [r.split(" | ")[0] for r in rows] == ["| 10", "| 11", "| 12"]  # sorted by seed
    mean_row = next(line for line in table.splitlines() if line.startswith("| mean"))
    # post': mean 0.8, s.e. = sd 0.1 / sqrt(3); post: seeds 11 and 12 only (seed 10's post scored 0)
    assert "| 80.0% ± 5.8% | 70.0% ± 10.0% |" in mean_row
    assert "no held-out question for seed(s) 10" in table
    assert "| post' | 50.0% ± 0.0% | 0.500 ± 0.000 | 50.0% ± 0.0% | 0.500 ± 0.000 |" in table  # every model
    assert seeds.mean_se([2.0]) == (2.0, None)
    (runs[0] / "final.json").write_text(json.dumps({"task_accuracy_post": 0.5}))
    with pytest.raises(SystemExit, match="no post' columns"):
        seeds.summarize(runs)
