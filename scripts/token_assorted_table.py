"""The Token Assorted study's table: mean ± standard error over seeds, per variant (Sol-Only, CoT, latent mix and
its ablations), from the results.json of token_assorted runs (a multirun directory, or any directory holding run
directories).

    .venv/bin/python scripts/token_assorted_table.py /work/runs/maze --seeds 1 2 3 [--out F.json]

Prints markdown: the task metric (1-Feasible-10 for mazes, accuracy otherwise), greedy accuracy, tokens per answer
(greedy decoding; latent tokens included, and how many of them are latent), the reference response length, and
the decoding speed (answers/s and tokens/s of the greedy pass, the run's own machine and thread count). Runs are
grouped by (task, variant, mix); --seeds keeps only the seeds reported (tuning seeds stay out).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import yaml

from seedstats import fmt, mean_se


def load(root: Path, seeds):
    runs = defaultdict(list)
    for res in sorted(root.rglob("results.json")):
        cfg = yaml.safe_load((res.parent / "config.yaml").read_text())
        if seeds and cfg["seed"] not in seeds:
            continue
        r = json.loads(res.read_text())
        runs[(r["task"], r["variant"], r.get("mix") or "-")].append((cfg["seed"], r))
    return runs


ORDER = {"sol_only": 0, "cot": 1, "latent": 2}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = load(args.root, set(args.seeds))
    if not runs:
        raise SystemExit(f"no results.json under {args.root}")
    summary = {}
    print("| task | variant | mix | seeds | metric (%) | greedy (%) | tokens/answer | latent tokens | CoT+solution "
          "(reference) | answers/s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(runs, key=lambda k: (k[0], ORDER.get(k[1], 9), k[2])):
        rs = runs[key]
        res = [r for _, r in rs]
        row = {name: mean_se([r[name] for r in res]) for name in
               ("accuracy", "greedy_accuracy", "tokens_per_answer", "latent_tokens_per_answer",
                "reference_response_tokens", "answers_per_s", "tokens_per_s")}
        row["seeds"] = sorted(s for s, _ in rs)
        row["metric"] = res[0]["metric"]
        summary["/".join(key)] = row
        print(f"| {key[0]} | {key[1]} | {key[2]} | {','.join(map(str, row['seeds']))} | "
              f"{res[0]['metric']}: {fmt([r['accuracy'] for r in res])} | "
              f"{fmt([r['greedy_accuracy'] for r in res])} | {fmt([r['tokens_per_answer'] for r in res], 1)} | "
              f"{fmt([r['latent_tokens_per_answer'] for r in res], 1)} | "
              f"{fmt([r['reference_response_tokens'] for r in res], 1)} | "
              f"{fmt([r['answers_per_s'] for r in res], 1, 2)} | {fmt([r['tokens_per_s'] for r in res], 1, 0)} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
