"""Benchmark: the NaturalReasoning pipeline's throughput (llmx.reasoning, recipe kind synthesize).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_natural_reasoning.py [--docs 32] [--out-dir outputs/bench]
        [--skip-serve] [--skip-dedup]

Three parts, each its own table and JSON in --out-dir:
1. stages (this script): documents/s of annotate and synthesize, and questions/s of respond, with the `hf` backend
   on SmolLM2-135M-Instruct (batch 16, greedy; the recipe's max_new_tokens: 32, 96, 160) over the first --docs
   builtin documents (half GSM-Infinite worked solutions, half Python documentation), through run_with_cache as
   the recipe calls them; the baseline is the same stage with the rules backend (llmx's own overhead: prompts,
   cache, parsing), and the ratio is hf/rules. Also the share of SmolLM2's replies that parse in the stage's
   format: what decides whether a 135M model can be the judge or the writer.
2. scripts/bench_serve.py: requests/s through `llmx serve` against in-process generation, and the cache's
   overhead (its own defaults).
3. scripts/bench_dedup.py: MinHash/LSH dedup documents/s against an exact-hash baseline at 100k documents.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def smollm2():
    from omegaconf import OmegaConf

    from llmx.config.schema import ModelConfig
    from llmx.models.pretrained import load_pretrained

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml"))
    return load_pretrained(cfg)


def timed(backend, requests, cache: Path):
    from llmx.bench.backends import run_with_cache

    t0 = time.perf_counter()
    replies = run_with_cache(backend, requests, cache)
    return replies, time.perf_counter() - t0


def stages(n_docs: int) -> list:
    from llmx.bench.backends import GenRequest, HFBackend
    from llmx.reasoning import prompts
    from llmx.reasoning.documents import iter_documents
    from llmx.reasoning.pipeline import clip
    from llmx.reasoning.rules import RuleBackend

    docs = list(iter_documents("builtin", builtin_worked=n_docs // 2, builtin_docs=n_docs - n_docs // 2))[:n_docs]
    model, tok = smollm2()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = [("annotate", prompts.annotate_prompt, prompts.parse_rubric, 32),
                ("synthesize", prompts.synthesize_prompt, prompts.parse_synthesized, 96)]
        for stage, make, parse, max_new in plan:
            reqs = [GenRequest(d.id, make(clip(d.text, 1500))) for d in docs]
            _, t_rules = timed(RuleBackend(), reqs, tmp / f"{stage}_rules.jsonl")
            hf = HFBackend(model, tok, batch_size=16, max_new_tokens=max_new)
            replies, t_hf = timed(hf, reqs, tmp / f"{stage}_hf.jsonl")
            parsed = sum(parse(replies[d.id][0]) is not None for d in docs)
            _, t_cached = timed(hf, reqs, tmp / f"{stage}_hf.jsonl")  # a rerun: every reply from the cache
            rows.append({"stage": stage, "items": len(docs), "hf_items_per_s": len(docs) / t_hf,
                         "rules_items_per_s": len(docs) / t_rules, "cached_rerun_items_per_s": len(docs) / t_cached,
                         "hf_new_tokens": hf.stats.get("new_tokens"), "hf_prompt_tokens": hf.stats.get("prompt_tokens"),
                         "hf_parse_rate": parsed / len(docs)})
        questions = [{"id": d.id, "q": d.meta["problem"]} for d in docs if "problem" in d.meta]
        reqs = [GenRequest(q["id"], prompts.respond_prompt(q["q"])) for q in questions]
        hf = HFBackend(model, tok, batch_size=16, max_new_tokens=160)
        replies, t_hf = timed(hf, reqs, tmp / "respond_hf.jsonl")
        answered = sum(prompts.extract_final_answer(replies[q["id"]][0]) is not None for q in questions)
        rows.append({"stage": "respond", "items": len(questions), "hf_items_per_s": len(questions) / t_hf,
                     "rules_items_per_s": None, "cached_rerun_items_per_s": None,
                     "hf_new_tokens": hf.stats.get("new_tokens"), "hf_prompt_tokens": hf.stats.get("prompt_tokens"),
                     "hf_parse_rate": answered / len(questions)})
    return rows


def table(rows) -> str:
    out = ["| stage | items | hf items/s | rules items/s | hf / rules | cached rerun items/s | hf new tokens | "
           "SmolLM2 replies that parse |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['hf_items_per_s'] / r['rules_items_per_s']:.5f}" if r["rules_items_per_s"] else "-"
        rules = f"{r['rules_items_per_s']:.0f}" if r["rules_items_per_s"] else "-"
        cached = f"{r['cached_rerun_items_per_s']:.0f}" if r["cached_rerun_items_per_s"] else "-"
        out.append(f"| {r['stage']} | {r['items']} | {r['hf_items_per_s']:.3f} | {rules} | {ratio} | {cached} | "
                   f"{r['hf_new_tokens']} | {100 * r['hf_parse_rate']:.0f}% |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--out-dir", default="outputs/bench")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-dedup", action="store_true")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    rows = stages(args.docs)
    print("## NaturalReasoning stages, SmolLM2-135M-Instruct (hf) against the rules backend\n")
    print(table(rows), flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "bench_natural_reasoning.json").write_text(json.dumps({**meta, "stages": rows}, indent=2) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for flag, script, name in ((args.skip_serve, "bench_serve.py", "bench_serve.json"),
                               (args.skip_dedup, "bench_dedup.py", "bench_dedup.json")):
        if not flag:
            print(f"\n## {script}\n", flush=True)
            subprocess.run([sys.executable, str(REPO / "scripts" / script), "--out", str(out / name)], env=env,
                           check=True)


if __name__ == "__main__":
    main()
