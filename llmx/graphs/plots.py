"""PNG plots of a spectral_journey run's results.json: accuracy by graph size and path length, the probe by
layer against its controls, SLN accuracy against the number of eigenvectors, and one worked example.

matplotlib's object-oriented Figure + Agg canvas, as llmx.logging.plots: no global backend, no display.
Every file is written to a temporary name first and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence


def _figure(ncols: int = 1, size=(7, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out


def plot_accuracy(results: Dict[str, Any], out: Path) -> Path:
    fig, axes = _figure(2, (10, 4))
    for ax, key, label in ((axes[0], "acc_by_size", "nodes"), (axes[1], "acc_by_distance", "path length (edges)")):
        table = results[key]
        xs = [int(x) for x in table]
        ax.bar(xs, [table[str(x)][0] for x in xs], color="tab:blue")
        for x in xs:
            ax.text(x, table[str(x)][0] + 0.01, f"n={table[str(x)][1]}", ha="center", fontsize="x-small")
        ax.set_xlabel(label)
        ax.set_ylabel("valid shortest path")
        ax.set_ylim(0, 1.08)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"test accuracy (any shortest path): {results['path_acc_any']:.3f}; "
                 f"canonical {results['path_acc_canonical']:.3f}")
    return _save(fig, out)


def plot_probe(results: Dict[str, Any], out: Path) -> Path:
    probe = results["probe"]
    fig, (ax,) = _figure()
    layers = sorted(probe["trained"], key=int)
    xs = [int(layer) for layer in layers]
    kinds = [k for k in probe["trained"][layers[0]] if k not in ("random_subspace", "adjacency")]
    for kind in kinds:
        ax.errorbar(xs, [probe["trained"][L][kind]["mean"] for L in layers],
                    yerr=[probe["trained"][L][kind]["sem"] for L in layers], marker="o", label=f"trained, {kind}")
        ax.errorbar(xs, [probe["untrained"][L][kind]["mean"] for L in layers],
                    yerr=[probe["untrained"][L][kind]["sem"] for L in layers], marker="s", linestyle="--",
                    label=f"untrained, {kind}")
    for control, style in (("random_subspace", ":"), ("adjacency", "-.")):
        ax.plot(xs, [probe["trained"][L][control]["mean"] for L in layers], linestyle=style, marker=".",
                label=f"trained vs {control.replace('_', ' ')}")
    ax.set_xticks(xs)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("RSA (Spearman)")
    ax.set_title(f"edge representations vs line-graph spectral embedding (k={probe['k']}, {probe['graphs']} graphs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    return _save(fig, out)


def plot_sln(results: Dict[str, Any], out: Path) -> Path:
    fig, (ax,) = _figure()
    series: Dict[str, List] = {}
    for key, acc in results["sln"].items():
        kind, rule, k = key.split("/")
        series.setdefault(f"{kind}, {rule}", []).append((k[2:], acc))
    labels = [k for k, _ in next(iter(series.values()))]
    for name, points in series.items():
        ax.plot(range(len(points)), [a for _, a in points], marker="o", label=name)
    ax.axhline(results["random_walk_acc"], color="grey", linestyle=":", label="random walk")
    ax.axhline(results["path_acc_any"], color="black", linestyle="--", label="transformer")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("eigenvectors k")
    ax.set_ylabel("valid shortest path")
    ax.set_ylim(0, 1.02)
    ax.set_title("SLN-style navigator against BFS on the test graphs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    return _save(fig, out)


def plot_example(examples: Sequence[Dict], paths: Sequence[Sequence[int]], out: Path) -> Path:
    """The largest test graph with the longest path the model got right (else the first), drawn with its
    shortest path (green) and the model's path (red dashed)."""
    import networkx as nx

    from llmx.graphs.paths import grade

    order = sorted(range(len(examples)), key=lambda i: (grade(examples[i], paths[i]), examples[i]["distance"],
                                                        examples[i]["n"]), reverse=True)
    ex, got = examples[order[0]], paths[order[0]]
    g = nx.Graph()
    g.add_edges_from(map(tuple, ex["edges"]))
    pos = nx.spring_layout(g, seed=0)
    fig, (ax,) = _figure(1, (6, 5))
    nx.draw_networkx(g, pos, ax=ax, node_color="#dddddd", edge_color="#999999")
    truth = list(zip(ex["path"], ex["path"][1:]))
    nx.draw_networkx_edges(g, pos, edgelist=truth, ax=ax, edge_color="tab:green", width=4)
    model_edges = [(u, v) for u, v in zip(got, got[1:]) if g.has_edge(u, v)]
    nx.draw_networkx_edges(g, pos, edgelist=model_edges, ax=ax, edge_color="tab:red", width=1.5, style="dashed")
    ax.set_title(f"{ex['n']} nodes, {ex['source']} -> {ex['target']}: reference {ex['path']}, model {list(got)}",
                 fontsize="small")
    ax.set_axis_off()
    return _save(fig, out)
