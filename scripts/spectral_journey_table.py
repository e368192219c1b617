"""The Spectral Journey study's tables: mean ± standard error over seeds, per depth, from the results.json of
spectral_journey runs (a multirun directory, or any directory holding run directories).

    .venv/bin/python scripts/spectral_journey_table.py outputs/multirun/spectral_journey/<timestamp> [--out F.json]

Prints markdown: path accuracy (any shortest path / canonical), per-step accuracy, accuracy by graph size and
by path length, the probe (RSA at each layer, trained against untrained and the controls), SLN against BFS
(seed-independent: the test set is the same for every seed) and SLN's agreement with the model.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import yaml

from seedstats import fmt, mean_se


def load(root: Path):
    runs = defaultdict(list)
    for res in sorted(root.rglob("results.json")):
        cfg = yaml.safe_load((res.parent / "config.yaml").read_text())
        runs[int(cfg["model"]["num_hidden_layers"])].append((cfg["seed"], json.loads(res.read_text())))
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plots", type=Path, help="write the study's PNGs (accuracy by size and path length per depth, "
                                               "probe by layer per depth) to this directory")
    args = ap.parse_args()
    runs = load(args.root)
    if not runs:
        raise SystemExit(f"no results.json under {args.root}")
    summary = {}
    print("| layers | seeds | path acc, any shortest path (%) | canonical (%) | per step, any (%) | val loss |")
    print("|---|---|---|---|---|---|")
    for depth, rs in sorted(runs.items()):
        res = [r for _, r in rs]
        seeds = sorted(s for s, _ in rs)
        print(f"| {depth} | {','.join(map(str, seeds))} | {fmt([r['path_acc_any'] for r in res])} | "
              f"{fmt([r['path_acc_canonical'] for r in res])} | {fmt([r['step_acc_any'] for r in res])} | "
              f"{fmt([r['final']['val_loss'] for r in res], 1, 3)} |")
        summary[depth] = {"seeds": seeds, "path_acc_any": [r["path_acc_any"] for r in res],
                          "path_acc_canonical": [r["path_acc_canonical"] for r in res],
                          "step_acc_any": [r["step_acc_any"] for r in res]}

    first = next(iter(runs.values()))[0][1]
    for key, label in (("acc_by_size", "nodes"), ("acc_by_distance", "path length")):
        cols = sorted({c for _, r in (x for rs in runs.values() for x in rs) for c in r[key]}, key=int)
        counts = {c: max(r[key][c][1] for rs in runs.values() for _, r in rs if c in r[key]) for c in cols}
        print("\n| layers | " + " | ".join(f"{label} {c} (n={counts[c]})" for c in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for depth, rs in sorted(runs.items()):
            print(f"| {depth} | " + " | ".join(fmt([r[key][c][0] for _, r in rs if c in r[key]], 100, 0) for c in cols)
                  + " |")

    print("\n| layers | layer | trained, combinatorial | untrained, combinatorial | trained, normalized | "
          "untrained, normalized | trained vs random subspace | trained vs line-graph hops | untrained vs hops |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth, rs in sorted(runs.items()):
        for layer in sorted(rs[0][1]["probe"]["trained"], key=int):
            def col(model, kind):
                return fmt([r["probe"][model][layer][kind]["mean"] for _, r in rs], 1, 3)
            print(f"| {depth} | {layer} | {col('trained', 'combinatorial')} | {col('untrained', 'combinatorial')} | "
                  f"{col('trained', 'normalized')} | {col('untrained', 'normalized')} | "
                  f"{col('trained', 'random_subspace')} | {col('trained', 'adjacency')} | "
                  f"{col('untrained', 'adjacency')} |")

    sweeps = [(d, r) for d, rs in sorted(runs.items()) for _, r in rs if "sweep_at_best_layer" in r["probe"]]
    if sweeps:
        keys = list(sweeps[0][1]["probe"]["sweep_at_best_layer"])
        print("\nProbe at each run's best layer (combinatorial Laplacian), trained / untrained, over k and scaling:\n")
        print("| layers | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for depth in sorted({d for d, _ in sweeps}):
            res = [r["probe"]["sweep_at_best_layer"] for d, r in sweeps if d == depth]
            print(f"| {depth} | " + " | ".join(f"{fmt([x[k]['trained'] for x in res], 1, 3)} / "
                                               f"{fmt([x[k]['untrained'] for x in res], 1, 3)}" for k in keys) + " |")

    print(f"\nSLN-style navigator against BFS ({first['sln_scale']} scaling; test set of {first['test_examples']} "
          f"examples; random self-avoiding walk {first['random_walk_acc'] * 100:.1f}%):\n")
    keys = list(first["sln"])
    kinds_rules = sorted({k.rsplit('/', 1)[0] for k in keys})
    ks = [k.rsplit('/', 1)[1] for k in keys if k.startswith(kinds_rules[0] + "/")]
    print("| Laplacian / rule | " + " | ".join(ks) + " |")
    print("|---|" + "---|" * len(ks))
    for kr in kinds_rules:
        print(f"| {kr} | " + " | ".join(f"{first['sln'][f'{kr}/{k}'] * 100:.1f}" for k in ks) + " |")
    print("\n| layers | SLN config | model vs SLN, steps (%) | identical paths (%) | "
          "model vs BFS canonical, steps (%) | identical (%) |")
    print("|---|---|---|---|---|---|")
    for depth, rs in sorted(runs.items()):
        def agree(key, field):
            return fmt([r[key][field] for _, r in rs if key in r])
        print(f"| {depth} | {rs[0][1]['sln_best']} | {agree('sln_agreement', 'step_agreement')} | "
              f"{agree('sln_agreement', 'full_path_agreement')} | {agree('bfs_agreement', 'step_agreement')} | "
              f"{agree('bfs_agreement', 'full_path_agreement')} |")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        print("\n" + "\n".join(str(p) for p in (plot_accuracy(runs, args.plots / "accuracy_by_depth.png"),
                                                 plot_probe(runs, args.plots / "probe_by_depth.png"))))


def _figure(ncols, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_accuracy(runs, out: Path) -> Path:
    fig, axes = _figure(2, (11, 4))
    for ax, key, label in ((axes[0], "acc_by_size", "nodes"), (axes[1], "acc_by_distance", "path length (edges)")):
        for depth, rs in sorted(runs.items()):
            cols = sorted({c for _, r in rs for c in r[key]}, key=int)
            stats = [mean_se([r[key][c][0] for _, r in rs if c in r[key]]) for c in cols]
            ax.errorbar([int(c) for c in cols], [m for m, _, _ in stats],
                        yerr=[0 if n < 2 else se for _, se, n in stats], marker="o", capsize=3,
                        label=f"{depth} layer{'s' if depth > 1 else ''} ({len(rs)} seeds)")
        ax.set_xlabel(label)
        ax.set_ylabel("valid shortest path (test)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Spectral Journey: test accuracy (any shortest path) by depth, mean ± s.e. over seeds")
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_probe(runs, out: Path) -> Path:
    fig, axes = _figure(len(runs), (4 * len(runs), 3.8))
    for ax, (depth, rs) in zip(axes, sorted(runs.items())):
        layers = sorted(rs[0][1]["probe"]["trained"], key=int)
        for model, kind, style in (("trained", "combinatorial", "-"), ("untrained", "combinatorial", "--"),
                                   ("trained", "random_subspace", ":"), ("trained", "adjacency", "-.")):
            stats = [mean_se([r["probe"][model][L][kind]["mean"] for _, r in rs]) for L in layers]
            name = f"{model}, {kind.replace('_', ' ')}" if kind != "adjacency" else "trained vs line-graph hops"
            ax.errorbar([int(L) for L in layers], [m for m, _, _ in stats], yerr=[se for _, se, _ in stats],
                        linestyle=style, marker="o", capsize=3, label=name)
        ax.set_title(f"{depth} layer{'s' if depth > 1 else ''}")
        ax.set_xticks([int(L) for L in layers])
        ax.set_xlabel("layer (0 = embeddings)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("RSA with the line-graph spectrum")
    axes[-1].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out)
    return out


if __name__ == "__main__":
    main()
