"""The cost of llmx's evaluation path against lm-eval's own `hf` model loader: items (documents, four choices each)
per second on the same model, tasks, items and batch size.

    .venv/bin/python scripts/bench_lm_eval.py                       # SmolLM2-135M, llmx's offline tasks, 40 items
    .venv/bin/python scripts/bench_lm_eval.py --limit 100 --batch 8 --repeats 3

  hf     lm-eval's HFLM(pretrained=<directory>): lm-eval loads the model (the converted SmolLM2 directory)
  llmx   llmx.models.load_pretrained, then llmx.evaluate.harness.evaluate: HFLM handed the model object

Rows alternate (hf, llmx, hf, llmx, ...) so that drift of a shared machine falls on both; the request cache is off;
the time is one evaluation's: lm-eval's task index, request building, batching, forwards and metrics; the model
load is not timed (lm-eval's from the directory, llmx's through load_pretrained). Prints a table
with llmx's ratio to hf and writes JSON (--out, default outputs/bench/lm_eval.json). The two paths must also agree
on every metric: the script exits non-zero when they do not.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=40, help="items per task")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/bench/lm_eval.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from llmx.config.compose import compose
    from llmx.evaluate.harness import _task_manager, evaluate, task_manager
    from llmx.evaluate.local_tasks import TASKS, local_task_dir
    from llmx.models import load_pretrained, pretrained_dir

    cfg = compose(["recipe=eval_smollm2"], check_values=False)
    paths = [str(local_task_dir())]
    model, tok = load_pretrained(cfg.model)
    where = pretrained_dir(cfg.model)
    hf_lm = HFLM(pretrained=where, device="cpu", batch_size=args.batch, dtype="float32")

    def run_hf():  # a task index per evaluation, as lm-eval's CLI and llmx's evaluate each build one
        return simple_evaluate(model=hf_lm, tasks=list(TASKS), limit=args.limit, task_manager=task_manager(paths),
                               bootstrap_iters=0, num_fewshot=0)

    def run_llmx():
        return evaluate(model, tok, list(TASKS), include_paths=paths, limit=args.limit, batch_size=args.batch,
                        bootstrap_iters=0, num_fewshot=0)

    times = {"hf": [], "llmx": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("hf", run_hf), ("llmx", run_llmx)):
            _task_manager.cache_clear()  # each evaluation builds its task index, as a fresh process does
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            results[name] = res["results"]
    items = sum(min(args.limit, n) for n in (200, 133))  # the local tasks' sizes
    rows = []
    for name in ("hf", "llmx"):
        best = min(times[name])
        rows.append({"path": name, "items": items, "seconds": times[name], "best_s": best,
                     "items_per_s": items / best, "median_s": statistics.median(times[name])})
    ratio = rows[1]["items_per_s"] / rows[0]["items_per_s"]
    agree = results["hf"] == results["llmx"]
    print("| path | items | best s | items/s | vs hf |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['items']} | {r['best_s']:.2f} | {r['items_per_s']:.2f} | "
              f"{r['items_per_s'] / rows[0]['items_per_s']:.3f}x |")
    print(f"metrics identical: {agree}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "llmx_over_hf": ratio, "metrics_identical": agree,
                               "limit": args.limit, "batch": args.batch, "threads": args.threads,
                               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d")}, indent=2))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
