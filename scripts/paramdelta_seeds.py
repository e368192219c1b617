"""Summarize paramdelta_tiny runs over seeds: one row per seed, then mean ± standard error.

    for s in 10 11 12 13 14; do llmx run recipe=paramdelta_tiny seed=$s hydra.run.dir=outputs/pd/seed$s; done
    .venv/bin/python scripts/paramdelta_seeds.py outputs/pd/seed*        # markdown on stdout

The paper's measure (ParamΔ, Cao et al., ICLR 2025, arXiv 2504.21023: "about 95% of Llama3.1-inst's
performance") is ParamΔ's score as a share of the new base post-trained the same way (post' here, Θ'_post);
the share of post (the post-trained old base) is given too. Each share is a ratio of one seed's two
accuracies; its mean over seeds and the standard error (sample standard deviation / sqrt(n)) are over the
seeds where the denominator is not 0 (a seed without one is named below the table).
Reads each run directory's final.json and stages/base/stage.json (the seed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

# (column, final.json key, format): shares and accuracies in %, losses in nats.
COLUMNS = [("ParamΔ / post'", "task_share_of_post_prime", "pct"), ("ParamΔ / post", "task_share_of_post", "pct"),
           ("task: base", "task_accuracy_base", "pct"), ("base'", "task_accuracy_base_prime", "pct"),
           ("post", "task_accuracy_post", "pct"), ("post'", "task_accuracy_post_prime", "pct"),
           ("ParamΔ", "task_accuracy_paramdelta", "pct"),
           ("recall: base'", "fact_recall_base_prime", "pct"), ("post'", "fact_recall_post_prime", "pct"),
           ("ParamΔ", "fact_recall_paramdelta", "pct"),
           ("B loss: base'", "corpus_b_loss_base_prime", "loss"), ("post'", "corpus_b_loss_post_prime", "loss"),
           ("ParamΔ", "corpus_b_loss_paramdelta", "loss"),
           ("A loss: base", "corpus_a_loss_base", "loss"), ("ParamΔ", "corpus_a_loss_paramdelta", "loss")]


def mean_se(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and standard error of the mean (None for fewer than 2 values)."""
    if not values:
        raise ValueError("no values")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def load(run_dir: Path) -> dict:
    final_path, base_path = run_dir / "final.json", run_dir / "stages" / "base" / "stage.json"
    for p in (final_path, base_path):
        if not p.is_file():
            raise SystemExit(f"{run_dir}: no {p.relative_to(run_dir)} (not a finished paramdelta_tiny run "
                             "directory)")
    final = json.loads(final_path.read_text())
    if "task_share_of_post_prime" not in final:
        raise SystemExit(f"{run_dir}: final.json has no post' columns (a run from before the post' stage)")
    return {**final, "seed": json.loads(base_path.read_text()).get("seed")}


def _cell(value, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if kind == "pct" else f"{value:.3f}"


def _mean_cell(values: List[float], kind: str) -> str:
    m, se = mean_se(values)
    if kind == "pct":
        return f"{m:.1%}" + (f" ± {se:.1%}" if se is not None else "")
    return f"{m:.3f}" + (f" ± {se:.3f}" if se is not None else "")


MODELS = [("base", "base"), ("base_prime", "base'"), ("post", "post"), ("post_prime", "post'"),
          ("paramdelta", "ParamΔ")]
METRICS = [("task accuracy", "task_accuracy", "pct"), ("corpus B loss", "corpus_b_loss", "loss"),
           ("fact recall", "fact_recall", "pct"), ("corpus A loss", "corpus_a_loss", "loss")]


def model_means(runs: Sequence[dict]) -> str:
    """Every model's metrics, mean ± standard error over the runs."""
    lines = ["| model | " + " | ".join(c for c, _, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for key, name in MODELS:
        cells = [_mean_cell([r[f"{m}_{key}"] for r in runs], kind) if all(f"{m}_{key}" in r for r in runs) else "-"
                 for _, m, kind in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(run_dirs: Sequence[Path]) -> str:
    """Per seed: ParamΔ's shares and the key columns, then their means; then every model's means."""
    runs = sorted((load(Path(d)) for d in run_dirs), key=lambda r: (r["seed"] is None, r["seed"]))
    head = "| seed | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in runs:
        lines.append(f"| {r['seed']} | " + " | ".join(_cell(r.get(k), kind) for _, k, kind in COLUMNS) + " |")
    means = []
    for _, k, kind in COLUMNS:
        values = [r[k] for r in runs if r.get(k) is not None]
        means.append(_mean_cell(values, kind) if values else "-")
    lines.append(f"| mean ± s.e. (n={len(runs)}) | " + " | ".join(means) + " |")
    for k, name in [("task_share_of_post_prime", "post'"), ("task_share_of_post", "post")]:
        missing = [str(r["seed"]) for r in runs if r.get(k) is None]
        if missing:
            lines.append(f"\n{name} answered no held-out question for seed(s) {', '.join(missing)}: left out of "
                         f"the mean of ParamΔ / {name}.")
    return "\n".join(lines) + "\n\n" + model_means(runs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="finished paramdelta_tiny run directories")
    print(summarize(ap.parse_args(argv).run_dirs), end="")


if __name__ == "__main__":
    main()
