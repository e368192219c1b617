"""Rerun a finished spectral_journey run's analysis on its exported model, with today's code and optional
spectral.* overrides; results.json is rewritten (the training figures it held are kept).

    .venv/bin/python scripts/spectral_journey_reanalyse.py RUN_DIR [RUN_DIR ...] [--set spectral.probe_k=8 ...]

The test set is rebuilt from the run's own config (same seed, split and sizes), the untrained control from its
seed; the model is the run's Hugging Face export (`<run>/hf`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. spectral.probe_graphs=500")
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from llmx.config.schema import typed
    from llmx.recipes.spectral_journey import analyse, build_untrained, load_export, load_test, task_of
    from llmx.utils import atomic_write_json

    for run in args.runs:
        cfg = typed(OmegaConf.merge(OmegaConf.load(run / "config.yaml"), OmegaConf.from_dotlist(args.set)))
        task = task_of(cfg.data.graphs)
        test = load_test(cfg.data.graphs, task)
        model, untrained = load_export(run), build_untrained(cfg, len(task.vocab))
        t0 = time.perf_counter()
        results = analyse(cfg, task, model, untrained, test, run)
        old = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
        keep = {k: old[k] for k in ("train_examples", "data_seconds", "final") if k in old}
        atomic_write_json(run / "results.json", {**results, **keep, "test_examples": len(test),
                                                 "reanalysed_seconds": round(time.perf_counter() - t0, 1)})
        print(f"{run}: path accuracy {results['path_acc_any']:.3f}, probe best layer {results['probe']['best_layer']}, "
              f"SLN agreement {results['sln_agreement']['step_agreement']:.3f} "
              f"(model vs BFS {results['bfs_agreement']['step_agreement']:.3f}), {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)


if __name__ == "__main__":
    main()
