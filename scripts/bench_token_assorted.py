"""Generation cost of shorter traces: greedy decoding of the same held-out prompts by the exported models of
token_assorted runs (e.g. CoT against the latent mix), in one process, alternating, so the ratios share a machine
state. The first run given is the baseline.

    .venv/bin/python scripts/bench_token_assorted.py RUN_COT RUN_LATENT [RUN_SOL] [--prompts 200] [--repeats 3]

Prints a table (answers/s, generated tokens/s, tokens per answer; answers/s and length as ratios to the baseline;
one prompt at a time by default, so that an answer's own length sets its cost) and writes JSON (--out, default
outputs/bench/token_assorted.json). Uses the runs' own test problems (rebuilt from their config.yaml) and the
recipe's decoding settings (greedy, latent.max_new_tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def load_run(run_dir: Path):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmx.config.schema import typed
    from llmx.recipes.token_assorted import load_records, triples

    cfg = typed(OmegaConf.load(run_dir / "config.yaml"))
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    _, _, test = load_records(cfg)
    prompts = [list(p) for p, _, _ in triples(cfg, tok, test)]
    return cfg, tok, model, prompts


def decode_once(backend, prompts):
    t0 = time.perf_counter()
    out = backend.generate_rows(prompts, [(str(i), 0) for i in range(len(prompts))])
    return time.perf_counter() - t0, sum(len(x) for x in out)


def main():
    from llmx.bench.backends import HFBackend

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="prompts decoded together (1: each answer's own length sets its cost; in a batch the longest "
                         "answer does)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/token_assorted.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for run_dir in args.runs:
        cfg, tok, model, prompts = load_run(run_dir)
        backend = HFBackend(model, tok, batch_size=args.batch_size, max_new_tokens=cfg.latent.max_new_tokens,
                            chat_template=False)
        runs.append({"run": str(run_dir), "variant": cfg.latent.variant, "backend": backend,
                     "prompts": prompts[: args.prompts], "times": [], "tokens": 0})
    for _ in range(args.repeats):  # alternate, so drift in machine state hits every run alike
        for r in runs:
            seconds, tokens = decode_once(r["backend"], r["prompts"])
            r["times"].append(seconds)
            r["tokens"] = tokens
    rows = []
    for r in runs:
        s = statistics.median(r["times"])
        n = len(r["prompts"])
        rows.append({"run": r["run"], "variant": r["variant"], "prompts": n, "seconds": s, "answers_per_s": n / s,
                     "tokens_per_s": r["tokens"] / s, "tokens_per_answer": r["tokens"] / n, "times": r["times"]})
    base = rows[0]
    print(f"| variant | prompts | tokens/answer | answers/s | tokens/s | answers/s vs {base['variant']} | "
          "tokens/answer vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["answers_per_s_ratio"] = row["answers_per_s"] / base["answers_per_s"]
        row["tokens_per_answer_ratio"] = row["tokens_per_answer"] / base["tokens_per_answer"]
        print(f"| {row['variant']} | {row['prompts']} | {row['tokens_per_answer']:.1f} | {row['answers_per_s']:.2f} | "
              f"{row['tokens_per_s']:.0f} | {row['answers_per_s_ratio']:.2f}x | "
              f"{row['tokens_per_answer_ratio']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                                    "batch_size": args.batch_size,
                                    "torch": torch.__version__, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
