"""Spectral Journey (Cohen, Gromov, Yang, Tian, 2025, arXiv 2502.08794): a small decoder-only transformer
trained from scratch to predict shortest paths, its edge representations probed against the line graph's
spectral embedding, and the SLN-style navigator (llmx.graphs.spectral) run on the same test graphs.

    llmx run recipe=spectral_journey_tiny                       # CPU, about a minute
    llmx run recipe=spectral_journey model.num_hidden_layers=1  # one cell of the study
    llmx run -m recipe=spectral_journey                         # the study: depth 1, 2, 3 x seeds 0, 1, 2

The `pretrain` kind runs this file when data.source=graph_paths (llmx/recipes/pretrain.py).

Feature -> config flag:
    graph sizes, label tokens, sampler, density  data.graphs.nodes, .node_tokens, .sampler, .edge_prob
    query distribution, training path on ties    data.graphs.query, data.graphs.target
    isomorphism split, set sizes                 data.graphs.test_fraction, .split_salt, .*_per_size
    evaluate on a generate-bench dataset         data.graphs.test_dir (checked disjoint from training)
    depth, width, heads                          model.num_hidden_layers, model.hidden_size, ...
    probe and SLN sweeps                         spectral.probe_k, .probe_kinds, .sln_ks, .sln_kinds, ...

Read top to bottom: data (train, validation, test; the test set checked disjoint up to isomorphism),
model, training on the trainer core (checkpoints, resume, FSDP2 under torchrun as any pretrain run), then on
rank 0: path accuracy (any shortest path / the canonical one) by size and distance, per-step accuracy, the
probe by layer against its controls (an untrained model of the same shape, a random subspace, plain
line-graph adjacency), SLN against BFS over k, Laplacian and rule, SLN's agreement with the model step by
step, plots, and results.json. Headline figures also go to final.json, so `llmx report` tabulates sweeps.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from llmx.data.instruct import IGNORE_INDEX, PairLoader
from llmx.graphs import paths as gp
from llmx.graphs import spectral as sp
from llmx.graphs.evaluate import edge_representations, greedy_paths, step_accuracy
from llmx.models import build_model, count_parameters
from llmx.trainer.distributed import destroy_distributed, init_distributed
from llmx.trainer.trainer import Trainer
from llmx.utils import LlmxError, add_to_final, atomic_write_json, atomic_write_text


def check_config(cfg) -> None:
    """The task, the split sizes and the test set's source, before any work (llmx.launch.check_before_run)."""
    from llmx.config.checks import world_size

    g = cfg.data.graphs
    task = task_of(g)  # GraphTask checks its own fields
    for key in ("train_per_size", "val_per_size", "test_per_size"):
        if getattr(g, key) < 1:
            raise LlmxError(f"data.graphs.{key}={getattr(g, key)}: must be an integer >= 1")
    outside = [n for n in g.test_sizes if not task.nodes[0] <= n <= task.nodes[1]]
    if outside:
        raise LlmxError(f"data.graphs.test_sizes={list(g.test_sizes)}: {outside} outside data.graphs.nodes="
                        f"{list(task.nodes)}")
    if g.test_dir and not Path(g.test_dir).expanduser().is_dir():
        raise LlmxError(f"data.graphs.test_dir={g.test_dir}: no such directory (a generate_bench shortest_path "
                        "dataset)")
    if world_size(cfg) > 1 and not cfg.trainer.export_hf:
        raise LlmxError("a multi-process spectral_journey run analyses its Hugging Face export: set "
                        "trainer.export_hf=true")


def main(cfg) -> Dict[str, Any]:
    info = init_distributed(cfg.trainer.device)
    try:
        run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        # 1. Data: identical on every rank (each example has its own RNG), so no rank waits for another.
        g = cfg.data.graphs
        task = task_of(g)
        t0 = time.perf_counter()
        train = gp.make_split(task, "train", g.train_per_size, g.seed)
        val = gp.make_split(task, "train", g.val_per_size, g.seed, start=g.train_per_size)
        test = load_test(g, task)
        gp.check_disjoint(train, test)
        data_s = time.perf_counter() - t0
        tok = gp.hf_tokenizer(task)
        model = build_model(cfg.model, vocab_size=len(task.vocab))
        if info.is_main:
            print(f"llmx: {cfg.name}: {cfg.model.num_hidden_layers}-layer model ({count_parameters(model) / 1e6:.3f}M "
                  f"parameters); {len(train)} training, {len(val)} validation and {len(test)} test examples "
                  f"(test disjoint up to isomorphism; {data_s:.1f}s), world size {info.world_size}", flush=True)

        # 2. Train on the trainer core: rows of [ids; labels], loss on the path and <eos>.
        loader = TrimmedLoader(to_rows(train, task), batch_size=cfg.trainer.batch_size,
                               micro_batch_size=cfg.trainer.micro_batch_size, rank=info.rank,
                               world_size=info.world_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        trainer = Trainer(cfg, run_dir, info, model, loader, to_rows(val, task), tokenizer=tok,
                          eval_batches_fn=trimmed_eval_batches)
        final = trainer.fit()
        if not info.is_main:
            return final

        # 3. Analysis (rank 0): the in-memory model, or under FSDP the exported copy (a sharded forward
        #    would wait for the other ranks).
        net = trainer.model if info.world_size == 1 else load_export(run_dir)
        untrained = build_untrained(cfg, len(task.vocab)).to(next(net.parameters()).device)
        results = analyse(cfg, task, net, untrained, test, run_dir)
        results.update(train_examples=len(train), test_examples=len(test), data_seconds=round(data_s, 2),
                       final={k: final.get(k) for k in ("step", "val_loss", "tokens_per_s")})
        atomic_write_json(run_dir / "results.json", results)
        headline = {k: results[k] for k in ("path_acc_any", "path_acc_canonical", "step_acc_any",
                                              "step_acc_canonical", "sln_best_acc", "probe_gap")}
        add_to_final(run_dir, final, headline)
        print(f"llmx: test path accuracy {results['path_acc_any']:.3f} (any shortest path), "
              f"{results['path_acc_canonical']:.3f} (canonical); per step {results['step_acc_any']:.3f}; "
              f"SLN best {results['sln_best_acc']:.3f} ({results['sln_best']}); results in {run_dir}", flush=True)
        return {**final, **headline}
    finally:
        destroy_distributed()


# ------------------------------------------------------------------------------------------ data


def task_of(g) -> gp.GraphTask:
    return gp.GraphTask(nodes=tuple(int(x) for x in g.nodes), node_tokens=int(g.node_tokens), sampler=str(g.sampler),
                        edge_prob=tuple(float(x) for x in g.edge_prob), target=str(g.target), query=str(g.query),
                        test_fraction=float(g.test_fraction), split_salt=str(g.split_salt))


def load_test(g, task: gp.GraphTask) -> List[Dict]:
    """The test set: generated from the test side of the split (deduplicated up to isomorphism of graph and
    query), or read from a `generate_bench` shortest_path dataset (data.graphs.test_dir)."""
    if g.test_dir:
        from llmx.bench import load_bench

        manifest, sets = load_bench(g.test_dir)
        if manifest.get("generator") != "shortest_path":
            raise LlmxError(f"data.graphs.test_dir={g.test_dir}: a {manifest.get('generator')!r} benchmark; need "
                            "one generated with bench.generator=shortest_path")
        test = [dict(r) for ds in sets.values() for split in ds.values() for r in split]
        too_big = sorted({r["n"] for r in test if r["n"] > task.node_tokens})
        if too_big:
            raise LlmxError(f"data.graphs.test_dir: graphs of {too_big} nodes exceed node_tokens={task.node_tokens}")
        return test
    sizes = list(g.test_sizes) or test_sizes(task, g.seed)
    return gp.make_split(task, "test", g.test_per_size, g.seed, sizes=sizes, dedup=True)


def test_sizes(task: gp.GraphTask, seed: int) -> List[int]:
    """The sizes whose test side of the split is not empty (3 nodes has 2 classes, often both train)."""
    sizes = []
    for n in range(task.nodes[0], task.nodes[1] + 1):
        try:
            gp.sample_example(task, n, "test", gp.example_rng(seed, "test", n, 0), max_attempts=400)
            sizes.append(n)
        except LlmxError:
            pass
    if not sizes:
        raise LlmxError(f"no graph size in data.graphs.nodes={list(task.nodes)} has a test class; raise "
                        "test_fraction or change split_salt")
    return sizes


def to_rows(examples: Sequence[Dict], task: gp.GraphTask) -> List[torch.Tensor]:
    """[2, max_len] rows: token ids padded with <pad>, labels IGNORE_INDEX outside the path and <eos>."""
    pad = task.vocab.index("<pad>")
    rows = []
    for ex in examples:
        prompt, target = gp.encode(ex, task)
        ids = prompt + target
        labels = [IGNORE_INDEX] * len(prompt) + target
        n = task.max_len - len(ids)
        rows.append(torch.tensor([ids + [pad] * n, labels + [IGNORE_INDEX] * n], dtype=torch.long))
    return rows


def _trim(mb: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Drop the pad columns every row of the micro-batch has: a batch costs its longest example."""
    keep = int((mb[:, 1] != IGNORE_INDEX).any(0).nonzero().max()) + 1
    return {"input_ids": mb[:, 0, :keep], "labels": mb[:, 1, :keep]}


class TrimmedLoader(PairLoader):
    """PairLoader (a resumable StepLoader over [2, T] rows) whose micro-batches are trimmed."""

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        return [_trim(mb) for mb in self.inner.next_step()]


def trimmed_eval_batches(val, **kw):
    from llmx.data import eval_batches

    return (_trim(mb) for mb in eval_batches(val, **kw))


# ------------------------------------------------------------------------------------------ model


def load_export(run_dir: Path):
    from transformers import AutoModelForCausalLM

    if not (run_dir / "hf").is_dir():
        raise LlmxError("a multi-process spectral_journey run analyses its Hugging Face export: set "
                        "trainer.export_hf=true")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(run_dir / "hf").to(device)


def build_untrained(cfg, vocab_size: int):
    """The control model: the same shape and the same initialisation as the trained one before training."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, vocab_size=vocab_size)


# ------------------------------------------------------------------------------------------ analysis


def analyse(cfg, task: gp.GraphTask, model, untrained, test: List[Dict], run_dir: Path) -> Dict[str, Any]:
    s = cfg.spectral
    rng = np.random.default_rng(cfg.seed)
    examples = test[: s.eval_examples] if s.eval_examples else test
    t0 = time.perf_counter()
    paths = greedy_paths(model, examples, task)
    out: Dict[str, Any] = {"grading": "any shortest path (path_acc_any) and the canonical one (path_acc_canonical)",
                           "target": task.target}
    out.update(accuracy_table(examples, paths))
    out.update(step_accuracy(model, examples, task))
    out["decode_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out.update(probe_analysis(s, task, model, untrained, test, rng))
    out["probe_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out.update(sln_analysis(s, examples, paths, rng))
    out["sln_seconds"] = round(time.perf_counter() - t0, 2)
    lines = [json.dumps({"edges": ex["edges"], "source": ex["source"], "target": ex["target"], "reference": ex["path"],
                         "model": p, "correct": gp.grade(ex, p)}) for ex, p in zip(examples, paths)]
    atomic_write_text(run_dir / "test_paths.jsonl", "\n".join(lines) + "\n")
    if s.plots:
        out["plots"] = make_plots(out, examples, paths, task, run_dir)
    return out


def probe_analysis(s, task: gp.GraphTask, model, untrained, test: List[Dict], rng) -> Dict[str, Any]:
    """RSA of each layer's edge representations with the line graph's spectral embedding and the controls, for
    the trained and the untrained model; then, at the trained model's best layer, a sweep over k and scaling."""
    probe_set = [ex for ex in test if len(ex["edges"]) >= 3][: s.probe_graphs]
    probe: Dict[str, Any] = {"k": s.probe_k, "scale": s.probe_scale, "edge_position": s.edge_position,
                             "graphs": len(probe_set),
                             "score": "mean Spearman correlation of pairwise Euclidean distances (RSA), per graph"}
    kind0 = s.probe_kinds[0]
    per_layer = {}
    for name, net in (("trained", model), ("untrained", untrained)):
        reps = edge_representations(net, probe_set, task, s.edge_position)
        per_layer[name] = [[(ex["edges"], r[layer]) for ex, r in zip(probe_set, reps)] for layer in range(len(reps[0]))]
        layers = {}
        for layer, per_graph in enumerate(per_layer[name]):
            row = {kind: sp.probe_scores(per_graph, s.probe_k, kind, scale=s.probe_scale) for kind in s.probe_kinds}
            row["random_subspace"] = sp.probe_scores(per_graph, s.probe_k, kind0, control="random_subspace", rng=rng)
            row["adjacency"] = sp.probe_scores(per_graph, s.probe_k, kind0, control="adjacency")
            layers[str(layer)] = row
        probe[name] = layers
    best = max(probe["trained"], key=lambda L: probe["trained"][L][kind0]["mean"])
    probe["best_layer"] = best
    sweep = {}
    for k in s.probe_sweep_ks:
        for scale in sp.SCALES:
            sweep[f"{scale}/k={k or 'all'}"] = {
                name: sp.probe_scores(per_layer[name][int(best)], k or None, kind0, scale=scale)["mean"]
                for name in ("trained", "untrained")}
    probe["sweep_at_best_layer"] = sweep
    gap = probe["trained"][best][kind0]["mean"] - probe["untrained"][best][kind0]["mean"]
    return {"probe": probe, "probe_gap": gap}


def sln_analysis(s, examples: List[Dict], paths: List[List[int]], rng) -> Dict[str, Any]:
    """SLN against BFS over k, Laplacian and rule; the random-walk floor; the best SLN's step-by-step agreement
    with the model, beside the model's agreement with BFS's canonical path (the control: two navigators that
    are both mostly right agree mostly, whatever their mechanism)."""
    sln, sln_paths = {}, {}
    for kind in s.sln_kinds:
        for rule in s.sln_rules:
            for k in s.sln_ks:
                key = f"{kind}/{rule}/k={k or 'all'}"
                sln_paths[key] = [sp.sln_path(ex["edges"], ex["source"], ex["target"], k=k or None, kind=kind,
                                              rule=rule, scale=s.sln_scale) for ex in examples]
                sln[key] = float(np.mean([gp.grade(ex, p) for ex, p in zip(examples, sln_paths[key])]))
    best = max(sln, key=sln.get)
    best_paths = sln_paths[best]
    walks = [sp.random_walk_path(ex["edges"], ex["source"], ex["target"], rng) for ex in examples]
    canonical = [ex["canonical"] for ex in examples]
    return {"sln": sln, "sln_scale": s.sln_scale, "sln_best": best, "sln_best_acc": sln[best],
            "sln_agreement": sp.sln_agreement(paths, best_paths),
            "bfs_agreement": sp.sln_agreement(paths, canonical),
            "sln_bfs_agreement": sp.sln_agreement(best_paths, canonical),
            "random_walk_acc": float(np.mean([gp.grade(ex, p) for ex, p in zip(examples, walks)]))}


def accuracy_table(examples: Sequence[Dict], paths: Sequence[Sequence[int]]) -> Dict[str, Any]:
    by_size, by_dist = defaultdict(list), defaultdict(list)
    ok_any = [gp.grade(ex, p, "any") for ex, p in zip(examples, paths)]
    ok_can = [gp.grade(ex, p, "canonical") for ex, p in zip(examples, paths)]
    for ex, a in zip(examples, ok_any):
        by_size[ex["n"]].append(a)
        by_dist[ex["distance"]].append(a)
    return {
        "path_acc_any": float(np.mean(ok_any)), "path_acc_canonical": float(np.mean(ok_can)),
        "acc_by_size": {str(n): [float(np.mean(v)), len(v)] for n, v in sorted(by_size.items())},
        "acc_by_distance": {str(d): [float(np.mean(v)), len(v)] for d, v in sorted(by_dist.items())},
    }


def make_plots(out: Dict[str, Any], examples, paths, task, run_dir: Path) -> List[str]:
    from llmx.graphs.plots import plot_accuracy, plot_example, plot_probe, plot_sln

    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    files = [plot_accuracy(out, plot_dir / "accuracy.png"), plot_probe(out, plot_dir / "probe.png"),
             plot_sln(out, plot_dir / "sln.png"), plot_example(examples, paths, plot_dir / "example.png")]
    return [str(f) for f in files]
