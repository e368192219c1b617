"""The CoCoMix study's table and plot: validation next-token loss per method (mean ± standard error over seeds) at
equal training tokens, the tokens CoCoMix needs to reach NTP's final loss, and the validation curves (one PNG).

    .venv/bin/python scripts/cocomix_table.py <root> --seeds 1 2 3 [--plot docs/cocomix/val_loss.png] [--out F.json]

<root> holds cocomix run directories (a multirun directory, or any directory above them). Runs are grouped by
cocomix.method (with selection=activation shown as cocomix/activation); --seeds keeps only the reported seeds
(tuning seeds stay out). Tokens to reach: per CoCoMix seed, the first evaluation at which its validation loss is
at or below the mean final NTP loss, linearly interpolated between evaluations (n/a if it never gets there).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import yaml

from seedstats import fmt, mean_se


def curve(run: Path):
    """[(tokens seen, val loss)] of a run, from metrics.jsonl (tokens at an evaluation: those of its step)."""
    tokens, points = {}, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "tokens_seen" in row:
            tokens[row["step"]] = row["tokens_seen"]
        if "val_loss" in row:
            points.append((row["step"], row["val_loss"]))
    per_step = None
    if len(tokens) >= 1:
        s, t = max(tokens.items())
        per_step = t / s
    return [(step * per_step, v) for step, v in points] if per_step else []


def reach(points, target):
    """Tokens at which the curve first reaches `target` (linear interpolation), or None."""
    prev = None
    for t, v in points:
        if v <= target:
            if prev is None or prev[1] == v:
                return t
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        prev = (t, v)
    return None


def load(root: Path, seeds):
    runs = defaultdict(list)
    for res in sorted(root.rglob("results.json")):
        cfg = yaml.safe_load((res.parent / "config.yaml").read_text())
        if "cocomix" not in cfg or not cfg["cocomix"].get("method"):
            continue
        if seeds and cfg["seed"] not in seeds:
            continue
        r = json.loads(res.read_text())
        key = r["method"] + ("/activation" if cfg["cocomix"]["selection"] == "activation" and r["method"] != "ntp"
                             and r["method"] in ("cocomix", "prediction_only", "add") else "")
        runs[key].append({"seed": cfg["seed"], "result": r, "curve": curve(res.parent)})
    return runs


def plot(runs, out: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method, rs in sorted(runs.items()):
        n = min(len(r["curve"]) for r in rs)
        xs = [rs[0]["curve"][i][0] / 1e6 for i in range(n)]
        stats = [mean_se([r["curve"][i][1] for r in rs]) for i in range(n)]
        ys = [m for m, _, _ in stats]
        ax.plot(xs, ys, label=f"{method} (n={len(rs)})")
        if len(rs) > 1:
            ax.fill_between(xs, [m - s for m, s, _ in stats], [m + s for m, s, _ in stats], alpha=0.2)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation next-token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--seeds", type=int, nargs="*", default=[])
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = load(args.root, set(args.seeds))
    if not runs:
        raise SystemExit(f"no cocomix results.json under {args.root}")
    ntp_final = mean_se([r["result"]["final"]["val_loss"] for r in runs.get("ntp", [])])[0]
    summary = {}
    print("| method | seeds | parameters | val loss | tokens/s | peak MB | CoCoMix tokens to NTP's final loss |")
    print("|---|---|---|---|---|---|---|")
    for method in sorted(runs, key=lambda m: (m != "ntp", m)):
        rs = runs[method]
        finals = [r["result"]["final"]["val_loss"] for r in rs]
        tps = [r["result"]["final"]["tokens_per_s"] for r in rs]
        mem = [r["result"]["final"]["peak_mem_mb"] for r in rs]
        tokens = [r["result"]["final"]["tokens_seen"] for r in rs]
        hit = [reach(r["curve"], ntp_final) for r in rs] if "ntp" in runs and method != "ntp" else []
        frac = [h / t for h, t in zip(hit, tokens) if h is not None]
        reach_txt = (f"{fmt(frac)}% of the tokens ({len(frac)}/{len(hit)} seeds reach it)" if hit else "")
        print(f"| {method} | {','.join(str(r['seed']) for r in rs)} | {rs[0]['result']['parameters'] / 1e6:.3f}M | "
              f"{fmt(finals, 1, 4)} | {fmt(tps, 1, 0)} | {fmt(mem, 1, 0)} | {reach_txt} |")
        summary[method] = {"seeds": [r["seed"] for r in rs], "val_loss": mean_se(finals), "tokens_per_s": mean_se(tps),
                           "peak_mb": mean_se(mem), "fraction_of_tokens_to_ntp_final": frac,
                           "parameters": rs[0]["result"]["parameters"]}
    if args.plot:
        plot(runs, args.plot)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
