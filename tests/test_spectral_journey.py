"""Spectral Journey: the shortest-path data (llmx.graphs.paths), its benchmark generator, the model-side
evaluation (llmx.graphs.evaluate) and the recipe end to end. The line-graph analysis has its own file
(test_graphs_spectral.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import networkx as nx
import pytest
import torch

from conftest import run_llmx
from llmx.graphs import paths as gp
from llmx.utils import LlmxError


def nx_graph(ex):
    g = nx.Graph()
    g.add_edges_from(map(tuple, ex["edges"]))
    return g


@pytest.mark.parametrize("sampler", gp.SAMPLERS)
def test_examples_are_connected_graphs_with_bfs_shortest_paths(sampler):
    task = gp.GraphTask(nodes=(3, 10), sampler=sampler)
    rng = random.Random(0)
    distances = set()
    for i in range(150):
        n = 3 + i % 8
        ex = gp.sample_example(task, n, "train", rng)
        g = nx_graph(ex)
        assert g.number_of_nodes() == n and nx.is_connected(g)
        assert set(g.nodes) <= set(range(task.node_tokens))
        truth = sorted(nx.all_shortest_paths(g, ex["source"], ex["target"]))
        assert ex["canonical"] == truth[0] and ex["path"] in truth and ex["n_paths"] == len(truth)
        assert ex["distance"] == nx.shortest_path_length(g, ex["source"], ex["target"])
        distances.add(ex["distance"])
    assert max(distances) >= 4  # query=by_distance reaches long paths, not only single edges


def test_random_target_draws_among_the_shortest_paths():
    task = gp.GraphTask(nodes=(8, 8), target="random", edge_prob=(0.5, 0.5))
    rng = random.Random(1)
    ties = [ex for ex in (gp.sample_example(task, 8, "train", rng) for _ in range(200)) if ex["n_paths"] > 1]
    assert ties and any(ex["path"] != ex["canonical"] for ex in ties)


def test_train_and_test_graphs_are_never_isomorphic():
    task = gp.GraphTask(nodes=(4, 7))
    train = gp.make_split(task, "train", 150, seed=0)
    test = gp.make_split(task, "test", 40, seed=0, dedup=True)
    assert test and {ex["n"] for ex in test} == {4, 5, 6, 7}

    # Exact check, bucketed by an invariant other than the split's (size, edges, degree sequence).
    def bucket(ex):
        return ex["n"], tuple(sorted(d for _, d in nx_graph(ex).degree()))

    by_bucket = {}
    for ex in train:
        by_bucket.setdefault(bucket(ex), []).append(nx_graph(ex))
    for ex in test:
        assert not any(nx.is_isomorphic(nx_graph(ex), h) for h in by_bucket.get(bucket(ex), []))
    gp.check_disjoint(train, test)  # and the recipe's own check agrees
    with pytest.raises(LlmxError, match="overlaps the training set"):
        gp.check_disjoint(train, train[:5])

    # Dedup keeps one example per (graph, query) up to relabelling.
    keys = [gp.query_key(ex) for ex in test]
    assert len(keys) == len(set(keys))


def test_sets_are_prefix_stable_and_disjoint_in_index():
    task = gp.GraphTask(nodes=(5, 6))
    small = gp.make_split(task, "train", 5, seed=3)
    big = gp.make_split(task, "train", 8, seed=3)
    assert small == [ex for ex in big if ex in small] and small[:5] == big[:5]
    val = gp.make_split(task, "train", 5, seed=3, start=8)
    assert not any(ex in big for ex in val)


def test_bad_task_settings_are_refused_with_the_valid_range():
    with pytest.raises(LlmxError, match=r"node_tokens=8 covers labels 0-7"):
        gp.GraphTask(nodes=(3, 10), node_tokens=8)
    with pytest.raises(LlmxError, match=r"valid samplers: \['gnp', 'tree_plus'\]"):
        gp.GraphTask(sampler="ba")
    with pytest.raises(LlmxError, match="test_fraction=0"):
        gp.GraphTask(test_fraction=0)
    with pytest.raises(LlmxError, match="no test graph of 3 nodes"):
        gp.sample_example(gp.GraphTask(nodes=(3, 3)), 3, "test", random.Random(0), max_attempts=50)


def test_token_format_and_grading():
    task = gp.GraphTask(nodes=(6, 6))
    ex = gp.sample_example(task, 6, "train", random.Random(2))
    prompt, target = gp.encode(ex, task)
    toks = gp.prompt_tokens(ex)
    assert toks[0] == "<bos>" and toks[-4:] == ["<q>", str(ex["source"]), str(ex["target"]), "<p>"]
    assert [int(t) for t in toks[1:-4]] == [x for e in ex["edges"] for x in e]
    assert gp.decode_path(target, task) == ex["path"] and target[-1] == task.vocab.index("<eos>")
    tok = gp.hf_tokenizer(task)
    assert tok(" ".join(toks))["input_ids"] == prompt
    assert gp.grade(ex, ex["path"], "any") and gp.grade(ex, ex["canonical"], "canonical")
    g = nx_graph(ex)
    for path in ([ex["source"]], ex["path"][:-1], ex["path"] + [ex["path"][-2]], list(reversed(ex["path"]))):
        assert not gp.grade(ex, path, "any")
    longer = [p for p in nx.all_simple_paths(g, ex["source"], ex["target"]) if len(p) > len(ex["path"])]
    assert all(not gp.grade(ex, p, "any") for p in longer[:20])
    # Per-step correctness agrees with BFS distances from networkx.
    dist = nx.single_source_shortest_path_length(g, ex["target"])
    u = ex["source"]
    for v in range(task.node_tokens):
        want = g.has_edge(u, v) and dist[v] == dist[u] - 1
        assert gp.step_correct(ex, [u], v, "any") == want


def test_bench_generator_reuses_the_recipe_problems_and_grades_replies(tmp_path):
    from llmx.bench import build_plan, generate_dataset, get_bench, load_bench
    from llmx.bench.shortest_path import parse_path

    manifest = generate_dataset("shortest_path", build_plan(["test"], ["0"], "5-7", 4), tmp_path / "b", seed=0,
                                progress=False)
    assert manifest["problems"] == 12 and manifest["verified"]
    _, sets = load_bench(tmp_path / "b")
    records = [dict(r) for ds in sets.values() for split in ds.values() for r in split]
    task = gp.GraphTask()
    recipe_side = gp.make_split(task, "test", 4, seed=0, sizes=[5, 6, 7])
    edge_lists = sorted(json.dumps(r["edges"]) for r in records)
    assert edge_lists == sorted(json.dumps(e["edges"]) for e in recipe_side)
    bench = get_bench("shortest_path")
    for r in records:
        assert bench.grade(r["solution"], r)  # the reference solution ends with "Answer: <path>"
        assert not bench.grade("Answer: " + " ".join(map(str, r["path"][:-1])), r)
    assert parse_path("Step 1: 3 -> 4\nAnswer: 3 4 9") == [3, 4, 9]
    with pytest.raises(LlmxError, match="no context padding"):
        bench.check_request("test", 5, 8000)
    with pytest.raises(LlmxError, match="valid:"):
        get_bench("shortest_path", grading="strict")


def tiny_model(task, layers=2):
    from omegaconf import OmegaConf

    from llmx.config.schema import ModelConfig
    from llmx.models import build_model

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "t", "hidden_size": 32, "intermediate_size": 64,
                                                              "num_hidden_layers": layers, "num_attention_heads": 2,
                                                              "max_position_embeddings": 128})
    torch.manual_seed(0)
    # float64: batched and one-by-one forwards must pick the same argmax even where logits nearly tie
    return build_model(cfg, vocab_size=len(task.vocab)).double().eval()


def test_greedy_decoding_and_edge_states_match_a_step_by_step_reference():
    from llmx.graphs.evaluate import edge_representations, greedy_paths, step_accuracy

    task = gp.GraphTask(nodes=(4, 7))
    examples = gp.make_split(task, "train", 3, seed=1)
    model = tiny_model(task)
    got = greedy_paths(model, examples, task, batch_size=4)
    reps = edge_representations(model, examples, task)
    with torch.no_grad():
        for ex, path, ex_reps in zip(examples, got, reps):
            ids = gp.encode(ex, task)[0]
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            positions = [i for i, t in enumerate(ids) if 0 < i <= 2 * len(ex["edges"]) and i % 2 == 0]
            assert len(ex_reps) == 3  # embeddings + 2 layers
            for layer, h in enumerate(out.hidden_states):
                assert torch.allclose(torch.from_numpy(ex_reps[layer]), h[0, positions].float(), atol=1e-5)
            seq = list(ids)
            for _ in range(ex["n"] + 1):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            assert path == gp.decode_path(seq[len(ids):], task)
    acc = step_accuracy(model, examples, task)
    assert acc["steps"] == sum(ex["distance"] for ex in examples) and 0 <= acc["step_acc_any"] <= 1


@pytest.mark.slow
def test_tiny_recipe_trains_evaluates_probes_and_refuses_an_overlapping_test_set(tmp_path):
    run = tmp_path / "run"
    run_llmx(["run", "recipe=spectral_journey_tiny", f"hydra.run.dir={run}", "trainer.max_steps=200",
              "spectral.sln_kinds=[combinatorial]", "spectral.sln_rules=[nearest]"], cwd=tmp_path, check=True)
    results = json.loads((run / "results.json").read_text())
    final = json.loads((run / "final.json").read_text())
    assert final["step"] == 200 and final["path_acc_any"] == results["path_acc_any"]
    # Learned something: well above the untrained model's near-zero, and canonical is the stricter grade.
    assert 0.15 < results["path_acc_any"] <= 1 and results["path_acc_canonical"] <= results["path_acc_any"]
    assert sum(n for _, n in results["acc_by_size"].values()) == results["test_examples"]
    assert set(results["probe"]["trained"]) == {"0", "1", "2"}
    assert set(results["probe"]["trained"]["1"]) == {"combinatorial", "normalized", "random_subspace", "adjacency"}
    assert set(results["sln"]) == {f"combinatorial/nearest/k={k}" for k in (1, 2, 4, "all")}
    assert set(results["probe"]["sweep_at_best_layer"]) == {f"{s}/k={k}" for s in ("none", "resistance")
                                                             for k in (2, 4, 8, "all")}
    assert results["bfs_agreement"]["n_steps"] > 0 and results["sln_bfs_agreement"]["step_agreement"] > 0.9
    lines = [json.loads(x) for x in (run / "test_paths.jsonl").read_text().splitlines()]
    assert len(lines) == results["test_examples"]
    assert sum(x["correct"] for x in lines) == pytest.approx(results["path_acc_any"] * len(lines))
    assert {Path(p).name for p in results["plots"]} == {"accuracy.png", "probe.png", "sln.png", "example.png"}
    assert (run / "hf" / "config.json").is_file()

    # The analysis reruns on the export with other settings; the training figures stay.
    import subprocess
    import sys

    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "spectral_journey_reanalyse.py"),
                    str(run), "--set", "spectral.probe_k=2", "spectral.plots=false", "spectral.sln_ks=[2]"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    again = json.loads((run / "results.json").read_text())
    assert again["probe"]["k"] == 2 and again["final"] == results["final"]
    assert again["path_acc_any"] == results["path_acc_any"]  # the same model on the same test set

    # A benchmark of training-side graphs as the test set is refused before any training.
    from llmx.bench import build_plan, generate_dataset

    generate_dataset("shortest_path", build_plan(["train"], ["0"], "5-6", 3), tmp_path / "leak", seed=0,
                     options={"node_tokens": 6}, progress=False)
    proc = run_llmx(["run", "recipe=spectral_journey_tiny", f"hydra.run.dir={tmp_path / 'bad'}",
                     f"data.graphs.test_dir={tmp_path / 'leak'}"], cwd=tmp_path)
    assert proc.returncode != 0 and "overlaps the training set" in proc.stdout + proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_process_fsdp_run_analyses_its_export(tmp_path):
    run = tmp_path / "run"
    proc = run_llmx(["run", "recipe=spectral_journey_tiny", "launcher=torchrun", "launcher.nproc_per_node=2",
                     "trainer.max_steps=20", "trainer.micro_batch_size=32", "trainer.eval_every=20",
                     "spectral.probe_graphs=10", "spectral.sln_ks=[2]", "spectral.plots=false",
                     f"hydra.run.dir={run}"], cwd=tmp_path, check=True)
    assert "world size 2" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["final"]["step"] == 20 and 0 <= results["path_acc_any"] <= 1


@pytest.mark.slow
def test_bench_recipe_grades_the_reference_paths(tmp_path):
    run = tmp_path / "run"
    run_llmx(["run", "recipe=spectral_journey_bench", "bench.per_op=3", f"hydra.run.dir={run}"], cwd=tmp_path,
             check=True)
    final = json.loads((run / "final.json").read_text())
    assert final["problems_evaluated"] == 21 and final["acc"] == 1.0
