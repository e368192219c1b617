"""The R-Sparse / TEAL comparison table from several sparsify runs: per model, one row per method and allocation,
one column per level (achieved sparsity, perplexity ± its standard error over the held-out windows), then R-Sparse
against TEAL in pairs fixed in advance (PAIRS), as paired differences of mean NLL over the same windows.

    python scripts/rsparse_table.py RUN_DIR... [--out table.md] [--json table.json]

Searched runs carry their seed in the label; two searches (R-Sparse's against TEAL's s-only search) pair seed k
with seed k, and pairs that differ only in the seed are pooled (mean ± s.e. across seeds).

Each RUN_DIR is an `llmx run` of the sparsify kind (results.json and config.yaml). Runs of one model must share
their evaluation windows (the same data, eval_sequences and token mode): the script checks that their dense
baselines agree. Nothing is selected on the evaluation text: every run is a row, and the pairs are set by allocation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml


def load(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = json.loads((run / "results.json").read_text())
    sp = cfg["sparsify"]
    label = f"{sp['method']} {sp['allocation']}"
    if sp["method"] == "rsparse" and sp["allocation"] != "search":
        label += f" (alpha {sp['alpha']:g})"
    if sp["allocation"] == "search":
        seeded = " from greedy" if sp["search"].get("init_greedy") else ""
        mode = "s" if sp["method"] == "teal" else sp["search"].get("mode", "s_alpha")  # TEAL's search: s alone
        label += f" ({mode}{seeded}, seed {sp['search'].get('seed', 0)})"
    return {"run": str(run), "model": cfg["model"]["name"], "label": label, "method": sp["method"],
            "matched": bool(sp.get("match_sparsity")), "token_mode": sp["token_mode"], "rows": rows}


# (R-Sparse label prefix, TEAL label prefix, what the pair isolates), fixed before looking at any result.
PAIRS = [("rsparse search", "teal greedy", "each paper's own allocation"),
         ("rsparse search", "teal search", "the same search with and without the low-rank term (equal seeds)"),
         ("rsparse greedy", "teal greedy", "the same per-layer s: what the low-rank term adds"),
         ("rsparse uniform", "teal uniform", "uniform s")]


def paired(a: list, b: list) -> tuple:
    """Mean and standard error of the per-window NLL differences a - b."""
    d = [x - y for x, y in zip(a, b)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


def model_table(runs: list) -> tuple:
    dense = runs[0]["rows"][0]
    for r in runs[1:]:
        if abs(r["rows"][0]["ppl"] - dense["ppl"]) > 1e-6 * dense["ppl"]:
            raise SystemExit(f"{r['run']}: dense ppl {r['rows'][0]['ppl']} differs from {runs[0]['run']}'s "
                             f"{dense['ppl']}: not the same evaluation windows")
    levels = sorted({row["level"] for r in runs for row in r["rows"][1:]})
    out = [f"### {runs[0]['model']}", "",
           f"Dense ppl {dense['ppl']:.3f} ± {dense['ppl_se']:.3f} ({dense['tokens_scored']} tokens scored, "
           f"{len(dense.get('nll_rows') or [])} windows). Each cell: achieved sparsity on the scored text, ppl ± s.e."
           + (" Thresholds matched to the level on unscored windows." if all(r["matched"] for r in runs) else ""),
           "", "| method | " + " | ".join(f"{lv:.0%}" for lv in levels) + " |",
           "|---|" + "---|" * len(levels)]
    by_level = {lv: {} for lv in levels}
    for r in sorted(runs, key=lambda r: (r["method"], r["label"])):
        cells = []
        for lv in levels:
            row = next((x for x in r["rows"][1:] if x["level"] == lv), None)
            if row is None:
                cells.append("-")
                continue
            by_level[lv][r["label"]] = (r["method"], row)
            cells.append(f"{row['achieved']:.3f}: {row['ppl']:.2f} ± {row['ppl_se']:.2f}")
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    summary = []
    for lv in levels:
        for r_prefix, t_prefix, what in PAIRS:
            rs = [(lab, row) for lab, (m, row) in by_level[lv].items() if lab.startswith(r_prefix)]
            ts = [(lab, row) for lab, (m, row) in by_level[lv].items() if lab.startswith(t_prefix)]
            for (rl, rr) in rs:
                for (tl, tr) in ts:
                    if "seed " in tl and rl.rsplit("seed ", 1)[-1] != tl.rsplit("seed ", 1)[-1]:
                        continue  # two searches: seed k against seed k
                    entry = {"level": lv, "rsparse": rl, "teal": tl, "what": what, "ppl_ratio": rr["ppl"] / tr["ppl"],
                             "achieved": [rr["achieved"], tr["achieved"]]}
                    if rr.get("nll_rows") and tr.get("nll_rows"):
                        entry["dnll"], entry["dnll_se"] = paired(rr["nll_rows"], tr["nll_rows"])
                    summary.append(entry)
    if summary:
        out += ["", "R-Sparse against TEAL, pairs fixed in advance (no selection on this text): ΔNLL = mean over "
                "windows of NLL(R-Sparse) - NLL(TEAL) ± its paired standard error; < 0 favours R-Sparse.", ""]
        for e in summary:
            d = f"ΔNLL {e['dnll']:+.4f} ± {e['dnll_se']:.4f}" if "dnll" in e else "no per-window NLLs"
            out.append(f"- {e['level']:.0%}, {e['what']}: {e['rsparse']} vs {e['teal']}: ppl ratio "
                       f"{e['ppl_ratio']:.3f}, {d} (achieved {e['achieved'][0]:.3f} vs {e['achieved'][1]:.3f})")
    seeds = over_seeds(summary)
    if seeds:
        out += ["", "Searches over several seeds (the search's own randomness; every seed reported): mean over seeds "
                "± standard error across seeds.", ""]
        for e in seeds:
            out.append(f"- {e['level']:.0%}, {e['search']} vs {e['teal']}, {e['n']} seeds: ΔNLL {e['dnll']:+.4f} ± "
                       f"{e['dnll_se']:.4f} (per seed {', '.join(f'{d:+.4f}' for d in e['per_seed'])}); ppl ratio "
                       f"{e['ppl_ratio']:.3f} ± {e['ppl_ratio_se']:.3f}")
        summary = summary + seeds
    return "\n".join(out), summary


def over_seeds(summary: list) -> list:
    """The pairs of searched runs that differ only in their seed, pooled: mean and standard error across seeds."""
    groups: dict = {}
    for e in summary:
        if "seed " in e["rsparse"] and "dnll" in e:
            unseeded = [lab.rsplit(", seed", 1)[0] + ")" if "seed " in lab else lab for lab in (e["rsparse"], e["teal"])]
            groups.setdefault((e["level"], *unseeded), []).append(e)
    out = []
    for (level, search, teal), es in groups.items():
        if len(es) < 2:
            continue
        d = [e["dnll"] for e in es]
        r = [e["ppl_ratio"] for e in es]
        se = lambda v: statistics.stdev(v) / math.sqrt(len(v))  # noqa: E731
        out.append({"level": level, "search": search, "teal": teal, "n": len(es), "per_seed": d,
                    "dnll": statistics.mean(d), "dnll_se": se(d), "ppl_ratio": statistics.mean(r),
                    "ppl_ratio_se": se(r), "what": "over seeds"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = []
    for run in args.runs:
        if not run.is_dir():  # a shell glob's log files
            continue
        if not (run / "results.json").exists():
            print(f"skipped {run}: no results.json (unfinished?)", file=sys.stderr)
            continue
        runs.append(load(run))
    if not runs:
        ap.error("no finished sparsify run among the arguments")
    tables, summaries = [], {}
    for model in sorted({r["model"] for r in runs}):
        text, summary = model_table([r for r in runs if r["model"] == model])
        tables.append(text)
        summaries[model] = summary
    text = "\n\n".join(tables) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
