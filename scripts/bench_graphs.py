"""Benchmark: Spectral Journey's data generation and training throughput.

    .venv/bin/python scripts/bench_graphs.py [--per-size 1000] [--steps 60] [--repeats 3] [--out outputs/bench]

Generation (graphs of 3-10 nodes, the spectral_journey data settings): examples/s for
  raw          sampling a connected graph, relabelling, the query and every shortest path (no split)
  train split  the same plus the isomorphism split (WL hash, redrawing test-side graphs): the recipe's train set
  test split   test-side graphs (4 of 5 draws are redrawn) and dedup up to isomorphism of (graph, query)
and the exact train/test disjointness check (networkx VF2 within invariant buckets), in examples/s of the
training set it checks.

Training: the spectral_journey recipe's loop (llmx Trainer, one example per row, each micro-batch trimmed to
its longest example, loss on the path tokens) against the plain pretrain trainer on the same examples
(llmx Trainer, the token stream packed into blocks, loss on every token), same model (2 layers, width 64),
batch 64, AdamW. Both are timed between metrics rows after `warmup` steps and alternate `repeats` times;
throughput is in examples/s (a packed block holds several examples), the ratio is of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generation(per_size: int) -> dict:
    import random

    from llmx.graphs import paths as gp

    task = gp.GraphTask()
    sizes = range(task.nodes[0], task.nodes[1] + 1)
    out = {}
    t = time.perf_counter()
    for n in sizes:
        rng = random.Random(n)
        for _ in range(per_size):
            raw = gp._gnp(n, rng.uniform(*task.edge_prob), rng)
            labels = rng.sample(range(task.node_tokens), n)
            edges = [(labels[u], labels[v]) for u, v in raw]
            s, t_ = gp._query(task, labels, edges, rng)
            gp.shortest_paths(edges, s, t_)
    out["raw_per_s"] = per_size * len(sizes) / (time.perf_counter() - t)
    t = time.perf_counter()
    train = gp.make_split(task, "train", per_size, seed=0)
    out["train_split_per_s"] = len(train) / (time.perf_counter() - t)
    t = time.perf_counter()
    test_sizes = list(range(4, task.nodes[1] + 1))  # 3 nodes has no test-side class (llmx.graphs.paths)
    test = gp.make_split(task, "test", per_size // 4, seed=0, sizes=test_sizes, dedup=True)
    out["test_split_dedup_per_s"] = (per_size // 4) * len(test_sizes) / (time.perf_counter() - t)
    out["test_kept_after_dedup"] = len(test) / ((per_size // 4) * len(test_sizes))
    t = time.perf_counter()
    gp.check_disjoint(train, test)
    out["disjoint_check_train_per_s"] = len(train) / (time.perf_counter() - t)
    out["train_examples"], out["test_examples"] = len(train), len(test)
    return out


def _timed_fit(cfg, model, loader, val, eval_fn, warmup: int, examples_per_step: float) -> float:
    from llmx.trainer.distributed import init_distributed
    from llmx.trainer.trainer import Trainer

    info = init_distributed("cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(cfg, Path(run_dir), info, model, loader, val, eval_batches_fn=eval_fn).fit()
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and r["step"] >= warmup]
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) * examples_per_step / (last["time"] - first["time"])


def training(steps: int, warmup: int, repeats: int) -> dict:
    import torch

    from llmx.config.compose import compose
    from llmx.data import StepLoader
    from llmx.graphs import paths as gp
    from llmx.models import build_model
    from llmx.recipes.spectral_journey import TrimmedLoader, task_of, to_rows, trimmed_eval_batches

    total = steps + warmup
    cfg = compose(["recipe=spectral_journey", f"trainer.max_steps={total}", "trainer.eval_every=0",
                   "trainer.ckpt_every=0", "trainer.save_final=false", "trainer.export_hf=false",
                   "trainer.log_every=10", "trainer.eval_batches=1", "optim.warmup_steps=0"])
    task = task_of(cfg.data.graphs)
    examples = gp.make_split(task, "train", 500, seed=0)
    rows = to_rows(examples, task)
    # The plain pretrain data: the same examples' tokens, concatenated and cut into blocks of 64.
    stream = torch.cat([r[0][r[0] != task.vocab.index("<pad>")] for r in rows])
    block = 64
    blocks = list(stream[: len(stream) // block * block].view(-1, block))
    per_block = len(rows) / (len(stream) / block)
    b = cfg.trainer.batch_size

    def model():
        torch.manual_seed(0)
        return build_model(cfg.model, vocab_size=len(task.vocab))

    graph, plain = [], []
    for r in range(repeats):
        loader = TrimmedLoader(rows, batch_size=b, micro_batch_size=b, rank=0, world_size=1, seed=r)
        graph.append(_timed_fit(cfg, model(), loader, rows[:64], trimmed_eval_batches, warmup, b))
        loader = StepLoader(blocks, batch_size=b, micro_batch_size=b, rank=0, world_size=1, seed=r)
        plain.append(_timed_fit(cfg, model(), loader, blocks[:64], None, warmup, b * per_block))
        print(f"repeat {r}: spectral_journey {graph[-1]:.0f} examples/s, plain pretrain {plain[-1]:.0f} examples/s",
              file=sys.stderr)
    mean_len = float(len(stream) / len(rows))
    return {"spectral_journey_examples_per_s": statistics.median(graph),
            "plain_pretrain_examples_per_s": statistics.median(plain),
            "ratio": statistics.median(graph) / statistics.median(plain), "graph_runs": graph, "plain_runs": plain,
            "mean_example_tokens": mean_len, "plain_block": block, "examples_per_block": per_block}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    args = ap.parse_args()

    import torch

    result = {
        "benchmark": "graphs",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": "python scripts/bench_graphs.py " + " ".join(sys.argv[1:]),
        "generation": generation(args.per_size),
        "training": training(args.steps, args.warmup, args.repeats),
    }
    g, tr = result["generation"], result["training"]
    print(f"{'generation':<34}{'examples/s':>12}")
    for key in ("raw_per_s", "train_split_per_s", "test_split_dedup_per_s", "disjoint_check_train_per_s"):
        print(f"{key:<34}{g[key]:>12.0f}")
    print(f"test examples kept after dedup: {g['test_kept_after_dedup']:.2f}")
    print(f"\n{'training (batch 64)':<34}{'examples/s':>12}")
    print(f"{'spectral_journey (trimmed rows)':<34}{tr['spectral_journey_examples_per_s']:>12.0f}")
    print(f"{'plain pretrain (packed blocks)':<34}{tr['plain_pretrain_examples_per_s']:>12.0f}")
    print(f"ratio {tr['ratio']:.2f} (mean example {tr['mean_example_tokens']:.1f} tokens)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_graphs.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
