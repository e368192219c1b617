"""Scores of an evaluated benchmark: accuracy per (subset, length, op), pass@k, AUC and a sigmoid fit.

AUC is the leaderboard's (GSM-Infinite `app.py`): the trapezoid integral of accuracy (a fraction) over op,
times 100, over the ops evaluated: a model at 100% on ops 1..30 scores 2900. It depends on the op range,
so every reported AUC names its range.

The sigmoid is the paper's observation that accuracy decays as a sigmoid of op (Zhou et al., 2025,
Sec. 4): acc(op) = top / (1 + exp((op - op50) / width)), fitted by least squares (scipy's curve_fit)
with top in [0, 1] and width > 0. op50 is where the fitted curve crosses top/2. A fit needs at least 4
ops with a non-constant accuracy; otherwise it is reported as missing with the reason.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from llmx.bench.base import length_name



def pass_at_k(correct: Sequence[bool], k: int, estimator: str = "reference") -> float:
    """pass@k of one problem from its n samples.

    reference: 1 - (1 - c/n)^k, the reference's estimate (sampling with replacement from the n samples);
    unbiased: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), defined for k <= n."""
    n, c = len(correct), sum(bool(x) for x in correct)
    if n == 0:
        raise ValueError("pass@k of a problem with no samples")
    if estimator == "reference":
        return 1.0 - (1.0 - c / n) ** k
    if estimator == "unbiased":
        if k > n:
            raise ValueError(f"unbiased pass@{k} needs at least {k} samples per problem, got {n}")
        if n - c < k:
            return 1.0
        return 1.0 - math.comb(n - c, k) / math.comb(n, k)
    raise ValueError(f"pass@k estimator {estimator!r}; valid: 'reference', 'unbiased'")


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def ks_for(n: int) -> List[int]:
    """k = 1, 2, 4, ... up to n, as the reference reports repeated sampling."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def auc(ops: Sequence[float], acc: Sequence[float]) -> float:
    pairs = sorted(zip(ops, acc))
    total = 0.0
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]):
        total += (x1 - x0) * (y0 + y1) / 2
    return total * 100


def sigmoid(op, top, op50, width):
    import numpy as np

    return top / (1.0 + np.exp((np.asarray(op, dtype=float) - op50) / width))


def fit_sigmoid(ops: Sequence[float], acc: Sequence[float]) -> Dict[str, Any]:
    if len(ops) < 4:
        return {"ok": False, "reason": f"{len(ops)} ops; a fit needs >= 4"}
    if max(acc) - min(acc) < 1e-9:
        return {"ok": False, "reason": f"accuracy is constant ({acc[0]:.3f}) over the ops"}
    import numpy as np
    from scipy.optimize import curve_fit

    x, y = np.asarray(ops, dtype=float), np.asarray(acc, dtype=float)
    span = max(x.max() - x.min(), 1.0)
    best = None
    # A few starting midpoints: the least-squares surface has flat regions when op50 starts far off.
    for start in np.linspace(x.min(), x.max(), 5):
        try:
            p, _ = curve_fit(sigmoid, x, y, p0=(max(y.max(), 1e-3), start, span / 8),
                             bounds=([0.0, x.min() - 4 * span, 1e-3], [1.0, x.max() + 4 * span, 4 * span]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        sse = float(((sigmoid(x, *p) - y) ** 2).sum())
        if best is None or sse < best[1]:
            best = (p, sse)
    if best is None:
        return {"ok": False, "reason": "least squares did not converge"}
    p, sse = best
    sst = float(((y - y.mean()) ** 2).sum())
    return {"ok": True, "top": float(p[0]), "op50": float(p[1]), "width": float(p[2]),
            "r2": 1.0 - sse / sst if sst > 0 else float("nan")}


def score(rows: Sequence[Dict[str, Any]], ks: Optional[Sequence[int]] = None, estimator: str = "reference") -> Dict[str, Any]:
    """rows: one per problem with subset, length, op, correct (a list of bools, one per sample) and
    optional `groups` (extra breakdown labels such as "mode=reverse").

    Returns {"cells": [...per (subset, length, op[, group])...], "curves": {subset/length: {...}}}:
    a cell has n, samples, acc (mean over problems of the fraction of correct samples = pass@1) and
    pass@k; a curve has the ops, accuracies, AUC with its op range, and the sigmoid fit."""
    n_samples = min(len(r["correct"]) for r in rows) if rows else 0
    ks = list(ks) if ks else ks_for(n_samples)
    groups: Dict[Tuple[str, int, Optional[str], int], List[Dict[str, Any]]] = {}
    for r in rows:
        for g in [None] + list(r.get("groups") or []):
            groups.setdefault((r["subset"], int(r["length"]), g, int(r["op"])), []).append(r)
    cells = []
    for (subset, length, g, op), rs in sorted(groups.items(), key=lambda t: (t[0][0], t[0][1], t[0][2] or "", t[0][3])):
        cell = {"subset": subset, "length": length, "group": g, "op": op, "n": len(rs),
                "samples": len(rs[0]["correct"]), "acc": mean(mean(map(float, r["correct"])) for r in rs)}
        for k in ks:
            if k <= min(len(r["correct"]) for r in rs):
                cell[f"pass@{k}"] = mean(pass_at_k(r["correct"], k, estimator) for r in rs)
        cells.append(cell)
    curves: Dict[str, Dict[str, Any]] = {}
    for cell in cells:
        key = f"{cell['subset']}/{length_name(cell['length'])}" + (f"/{cell['group']}" if cell["group"] else "")
        curve = curves.setdefault(key, {"subset": cell["subset"], "length": cell["length"], "group": cell["group"],
                                        "ops": [], "acc": [], "n": []})
        curve["ops"].append(cell["op"])
        curve["acc"].append(cell["acc"])
        curve["n"].append(cell["n"])
    for curve in curves.values():
        curve["auc"] = auc(curve["ops"], curve["acc"])
        curve["op_range"] = [min(curve["ops"]), max(curve["ops"])]
        curve["sigmoid"] = fit_sigmoid(curve["ops"], curve["acc"])
        below = [op for op, a in zip(curve["ops"], curve["acc"]) if a < 0.5]
        curve["first_op_below_50"] = below[0] if below else None
    return {"cells": cells, "curves": curves, "ks": ks, "estimator": estimator}


def markdown_table(scores: Dict[str, Any]) -> str:
    """Accuracy per op (rows) and subset/length (columns), then AUC and the fit per curve."""
    curves = {k: c for k, c in scores["curves"].items() if c["group"] is None}
    ops = sorted({op for c in curves.values() for op in c["ops"]})
    names = list(curves)
    lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for op in ops:
        row = []
        for name in names:
            c = curves[name]
            row.append(f"{c['acc'][c['ops'].index(op)]:.3f} (n={c['n'][c['ops'].index(op)]})" if op in c["ops"] else "")
        lines.append(f"| {op} | " + " | ".join(row) + " |")
    lines += ["", "| curve | ops | AUC | sigmoid top | op50 | width | R^2 |", "|---|---|---|---|---|---|---|"]
    for name, c in scores["curves"].items():
        s = c["sigmoid"]
        fit = (f"{s['top']:.3f} | {s['op50']:.2f} | {s['width']:.2f} | {s['r2']:.3f}" if s["ok"]
               else f"- | - | - | {s['reason']}")
        lines.append(f"| {name} | {c['op_range'][0]}-{c['op_range'][1]} | {c['auc']:.1f} | {fit} |")
    return "\n".join(lines) + "\n"


def plot_curves(scores: Dict[str, Any], out_dir) -> List[str]:
    """One PNG per subset: accuracy against op, a line per context length, the sigmoid fit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_subset: Dict[str, List[Dict[str, Any]]] = {}
    for c in scores["curves"].values():
        if c["group"] is None:
            by_subset.setdefault(c["subset"], []).append(c)
    paths = []
    for subset, curves in by_subset.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in sorted(curves, key=lambda c: c["length"]):
            label = length_name(c["length"])
            line, = ax.plot(c["ops"], c["acc"], "o-", label=f"{label} (AUC {c['auc']:.0f})")
            s = c["sigmoid"]
            if s["ok"]:
                xs = np.linspace(min(c["ops"]), max(c["ops"]), 200)
                ax.plot(xs, sigmoid(xs, s["top"], s["op50"], s["width"]), "--", color=line.get_color(), alpha=0.7)
        ax.set_xlabel("reasoning ops")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"GSM-Infinite {subset}" if subset in ("symbolic", "medium", "hard") else subset)
        ax.grid(alpha=0.3)
        ax.legend(title="context length", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"accuracy_{subset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def isfinite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
