"""Mean ± standard error over seeds of sweet_rl_tiny runs (each run's results.json).

    for s in 1 2 3; do llmx run recipe=sweet_rl_tiny seed=$s hydra.run.dir=outputs/sweet/seed$s; done
    python scripts/sweet_rl_seeds.py outputs/sweet/seed* [--out sweet_rl_seeds.json]

Prints one markdown table per measure: per method, each seed's value, then mean ± s.e. (sample standard
deviation / sqrt(n)); and the ordering the paper claims (SWEET-RL >= multi-turn DPO >= RFT >= zero-shot),
checked on the means.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def mean_se(xs):
    n = len(xs)
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def table(title, runs, section, key, scale=1.0, fmt="{:.1f}"):
    names = []
    for r in runs:
        for k in r.get(section, {}):
            if k not in names:
                names.append(k)
    lines = [f"\n**{title}**\n", "| | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean ± s.e. |",
             "|---" * (len(runs) + 2) + "|"]
    out = {}
    for name in names:
        vals = [r[section][name][key] * scale if name in r.get(section, {}) else None for r in runs]
        got = [v for v in vals if v is not None]
        m, se = mean_se(got)
        out[name] = {"values": vals, "mean": m, "se": se}
        cells = [fmt.format(v) if v is not None else "-" for v in vals]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt.format(m)} ± {fmt.format(se)} |")
    print("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = []
    for d in args.runs:
        r = json.loads((Path(d) / "results.json").read_text())
        cfg = (Path(d) / "config.yaml").read_text() if (Path(d) / "config.yaml").exists() else ""
        r["seed"] = next((line.split(":", 1)[1].strip() for line in cfg.splitlines() if line.startswith("seed:")), d)
        runs.append(r)
    out = {
        "success_rate": table("success rate (%)", runs, "methods", "success_rate", 100),
        "tests_passed": table("% tests passed", runs, "methods", "tests_passed", 100),
        "mean_turn_tokens": table("mean agent turn length (tokens)", runs, "methods", "mean_turn_tokens"),
        "mean_turns": table("agent turns per episode", runs, "methods", "mean_turns", fmt="{:.2f}"),
        "answered": table("episodes that reached an answer (%)", runs, "methods", "answered", 100),
        "critic_accuracy": table("critic accuracy on held-out trajectory pairs (%)", runs, "critics",
                                 "held_out_accuracy", 100),
    }
    if any(r.get("critics_on_test") for r in runs):
        out["critic_test_accuracy"] = table("critic accuracy on test-task pairs of the baselines' episodes (%)", runs,
                                            "critics_on_test", "accuracy", 100)
        out["critic_test_pairs"] = table("test-task pairs", runs, "critics_on_test", "pairs", fmt="{:.0f}")
    if any(r.get("best_of_n") for r in runs):
        out["best_of_n"] = table("best-of-N, success rate (%)", runs, "best_of_n", "success_rate", 100)
    s = out["success_rate"]
    order = [m for m in ("sweet", "mtdpo", "rft", "zero_shot") if m in s]
    holds = all(s[a]["mean"] >= s[b]["mean"] for a, b in zip(order, order[1:]))
    print(f"\nclaim {' >= '.join(order)} on mean success: {'holds' if holds else 'does not hold'}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
