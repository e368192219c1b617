"""lm-evaluation-harness through llmx (llmx.evaluate, the eval kind): the offline tasks, tasks refused before a
model loads, equality with lm-eval's own hf loader, sparsity live during evaluation, the request cache."""

from __future__ import annotations

import json

import pytest

from conftest import run_llmx
from llmx.evaluate.harness import check_tasks, resolve_tasks
from llmx.evaluate.local_tasks import gsm_infinite_items, local_task_dir, pydoc_items
from llmx.utils import LlmxError


def test_local_tasks_are_well_formed_and_deterministic():
    for make in (gsm_infinite_items, pydoc_items):
        items = make(30)
        assert items == make(30) and len(items) == 30
        for x in items:
            assert len(set(x["choices"])) == 4 and 0 <= x["label"] < 4 and x["context"].strip()
    for x in gsm_infinite_items(30):  # the gold choice is the generator's answer, verified by its solver
        assert x["choices"][x["label"]].strip().isdigit() and x["context"].endswith("Answer:")
    assert {x["label"] for x in pydoc_items(60)} == {0, 1, 2, 3}  # the gold is not always in one place


def test_tasks_are_refused_before_any_model(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    mine = tmp_path / "tasks" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("task: my_task\ndoc_to_text: !function utils.doc_to_text\n")
    with pytest.raises(LlmxError, match="bad.yaml is not valid YAML"):
        resolve_tasks([str(bad)])
    with pytest.raises(LlmxError, match="has no 'task:'"):
        resolve_tasks([str(nameless)])
    with pytest.raises(LlmxError, match="does not exist"):
        resolve_tasks([str(tmp_path / "absent.yaml")])
    assert resolve_tasks(["arc_easy", str(mine)]) == (["arc_easy", "my_task"], [str(mine.parent)])
    # The index of lm-eval's tasks plus the local ones: known names pass, an unknown one has suggestions.
    with pytest.raises(LlmxError, match=r"'arc_eazy' is not a task lm-eval knows; did you mean arc_easy"):
        check_tasks(["llmx_gsm_infinite_mc", "llmx_pydoc_next", "hellaswag", "arc_eazy"], [str(local_task_dir())])


def _loglikelihoods(results):
    return {task: [s["filtered_resps"] for s in samples] for task, samples in results["samples"].items()}


@pytest.mark.slow
def test_llmx_path_equals_lm_evals_hf_loader_and_sparsity_is_live(reference_run):
    """A trained tiny model (the reference run's hf/ export): llmx's path (the run loaded by load_pretrained, the
    object handed to lm-eval) gives lm-eval's own `hf` loader's answers request by request; an R-Sparse plan applied
    in memory changes them, and removing it restores them."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from omegaconf import OmegaConf

    from llmx.evaluate.harness import evaluate, task_manager
    from llmx.models import load_pretrained
    from llmx.sparse import apply_plan, calibrate, layer_shapes, remove_sparsity, uniform_plan

    run_dir, _ = reference_run
    tasks, paths = ["llmx_gsm_infinite_mc", "llmx_pydoc_next"], [str(local_task_dir())]
    theirs = simple_evaluate(model=HFLM(pretrained=str(run_dir / "hf"), device="cpu", batch_size=4, dtype="float32"),
                             tasks=tasks, limit=6, task_manager=task_manager(paths), log_samples=True,
                             bootstrap_iters=0)
    cfg = OmegaConf.create({"name": "run", "source": "hf", "path": str(run_dir), "dtype": "float32",
                            "attn_implementation": "sdpa", "level": None, "token_mode": None})
    model, tok = load_pretrained(cfg)
    ours = evaluate(model, tok, tasks, include_paths=paths, limit=6, batch_size=4, log_samples=True, bootstrap_iters=0)
    assert _loglikelihoods(ours) == _loglikelihoods(theirs)
    assert ours["results"] == theirs["results"]

    calib = calibrate(model, [torch.randint(0, len(tok), (2, 32))])
    apply_plan(model, calib, uniform_plan(layer_shapes(model), 0.7, 1.0))
    sparse = evaluate(model, tok, tasks, include_paths=paths, limit=6, batch_size=4, log_samples=True,
                      bootstrap_iters=0)
    assert _loglikelihoods(sparse) != _loglikelihoods(theirs)
    remove_sparsity(model)
    again = evaluate(model, tok, tasks, include_paths=paths, limit=6, batch_size=4, log_samples=True,
                     bootstrap_iters=0)
    assert _loglikelihoods(again) == _loglikelihoods(theirs)


@pytest.mark.slow
def test_the_eval_recipe_writes_its_results_and_resumes_from_its_cache(tmp_path, reference_run):
    run_dir, _ = reference_run
    env = {"LLMX_CACHE": str(tmp_path / "cache")}  # a request cache of its own, whatever CI keeps
    proc = run_llmx(["run", "recipe=eval_smollm2", "eval.tasks=[arc_eazy]"], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "did you mean arc_easy" in proc.stderr and not (tmp_path / "outputs").exists()
    args = ["run", "recipe=eval_smollm2", "model=run", f"model.path={run_dir}", "eval.limit=4", "eval.batch_size=4"]
    first = run_llmx([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, env=env, check=True)
    assert "Cached requests: 0, Requests remaining: 32" in first.stdout + first.stderr
    final = json.loads((tmp_path / "a" / "final.json").read_text())
    assert set(final) >= {"llmx_gsm_infinite_mc/acc", "llmx_gsm_infinite_mc/acc_stderr", "llmx_pydoc_next/acc_norm"}
    lm = json.loads((tmp_path / "a" / "lm_eval" / "results.json").read_text())
    assert lm["results"]["llmx_pydoc_next"]["acc,none"] == final["llmx_pydoc_next/acc"]
    assert "| llmx_pydoc_next | acc |" in (tmp_path / "a" / "results.md").read_text()
    again = run_llmx([*args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, env=env, check=True)
    assert "Cached requests: 32, Requests remaining: 0" in again.stdout + again.stderr
    again_final = json.loads((tmp_path / "b" / "final.json").read_text())
    assert again_final["llmx_pydoc_next/acc"] == final["llmx_pydoc_next/acc"]
    report = run_llmx(["report", str(tmp_path / "a"), str(tmp_path / "b")], cwd=tmp_path, check=True).stdout
    assert f"llmx_pydoc_next {final['llmx_pydoc_next/acc']:.3f}±" in report
