"""GSM-Infinite generation speed: problems/s per subset and context length, and worker scaling.

    python scripts/bench_gsm_infinite.py                      # ~2 min on 2 cores
    python scripts/bench_gsm_infinite.py --full-100k          # also the 101,200-problem zero-context run

Sections (every problem is verified by the independent solver unless the row says otherwise):
  zero      zero-context symbolic (ops 1-30), medium and hard (ops 2-30): 1 worker, 2 workers (ratio =
            scaling), and 1 worker without verification (ratio = the solver's cost)
  long      8k, 32k and 128k-token problems measured with SmolLM2's tokenizer, one process (the length
            search's tokenizer passes dominate)
  full      the 100k run of recipe gsm_infinite_generate_100k, through the same library call
Prints a table and writes bench_gsm_infinite.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmx.bench.dataset import build_plan, generate_dataset  # noqa: E402


def run(cells, workers, verify=True, tokenizer=None):
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = generate_dataset("gsm_infinite", cells, Path(tmp) / "out", workers=workers, verify=verify,
                             tokenizer_path=tokenizer, progress=False)
        wall = time.perf_counter() - t0
    return {"problems": m["problems"], "gen_seconds": m["seconds"], "wall_seconds": round(wall, 2),
            "problems_per_s": round(m["problems"] / wall, 1)}


def smollm2_tokenizer() -> str:
    from omegaconf import OmegaConf

    from llmx.config.schema import ModelConfig
    from llmx.models.pretrained import pretrained_dir

    root = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(root / "conf/model/smollm2_135m.yaml"))
    return pretrained_dir(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-op", type=int, default=100, help="problems per op in the zero-context section")
    ap.add_argument("--long-per-op", type=int, default=8)
    ap.add_argument("--sections", default="zero,long")
    ap.add_argument("--full-100k", action="store_true")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    rows = []

    if "zero" in sections:
        for subset, ops in (("symbolic", "1-30"), ("medium", "2-30"), ("hard", "2-30")):
            cells = build_plan([subset], ["0"], ops, args.per_op)
            one = run(cells, 1)
            two = run(cells, 2)
            raw = run(cells, 1, verify=False)
            rows.append({"section": "zero", "subset": subset, "length": "0", "ops": ops, **one,
                         "problems_per_s_2_workers": two["problems_per_s"],
                         "scaling_2_workers": round(two["problems_per_s"] / one["problems_per_s"], 2),
                         "problems_per_s_unverified": raw["problems_per_s"],
                         "verify_cost": round(raw["problems_per_s"] / one["problems_per_s"], 2)})
            print(rows[-1], flush=True)

    if "long" in sections:
        tok = smollm2_tokenizer()
        for subset, length, ops, per_op in (("symbolic", "8k", "2-10:4", args.long_per_op),
                                            ("symbolic", "32k", "2-10:4", args.long_per_op),
                                            ("medium", "8k", "2-10:4", args.long_per_op),
                                            ("hard", "8k", "2-10:4", args.long_per_op),
                                            ("hard", "32k", "2-10:4", args.long_per_op),
                                            ("symbolic", "128k", "6", 2), ("hard", "128k", "6", 2)):
            cells = build_plan([subset], [length], ops, per_op)
            one = run(cells, 1, tokenizer=tok)  # one process: the time per problem, tokenizer load included
            rows.append({"section": "long", "subset": subset, "length": length, "ops": ops, "workers": 1, **one})
            print(rows[-1], flush=True)

    if args.full_100k:
        cells = build_plan(["symbolic", "medium", "hard"], ["0"], "2-30", 1150, {"symbolic": "1-30"})
        full = run(cells, 2)
        rows.append({"section": "full", "subset": "all", "length": "0", "ops": "1/2-30", "workers": 2, **full})
        print(rows[-1], flush=True)

    print()
    print(f"{'section':8} {'subset':9} {'length':6} {'ops':7} {'problems':>9} {'s':>8} {'problems/s':>11}  notes")
    for r in rows:
        notes = ""
        if r["section"] == "zero":
            notes = (f"2 workers {r['problems_per_s_2_workers']:.0f}/s ({r['scaling_2_workers']:.2f}x); "
                     f"unverified {r['problems_per_s_unverified']:.0f}/s ({r['verify_cost']:.2f}x)")
        print(f"{r['section']:8} {r['subset']:9} {r['length']:6} {r['ops']:7} {r['problems']:>9} "
              f"{r['wall_seconds']:>8.1f} {r['problems_per_s']:>11.1f}  {notes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    (out / "bench_gsm_infinite.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out / 'bench_gsm_infinite.json'}")


if __name__ == "__main__":
    main()
