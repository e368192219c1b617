"""SHARP's controls and a rank x SFT-length sweep on a reduced setting, in one process (the model, its
evaluation and the SLW calibration are loaded or captured once, not once per variant).

    python scripts/sharp_sweep.py --out sweep.jsonl --jobs adjacent:16:0:0 prune:16:0:0 adjacent:16:80:0 ...
    python scripts/sharp_sweep.py --table sweep.jsonl       # the markdown table (mean +- s.e. over seeds)

A job is reference:rank:sft_steps:seed. reference is llmx.sharing's (adjacent = SHARP; permuted, distant,
prune = the controls); rank 0 means no recovery at all (Direct Sharing, or for prune the MLP deleted);
sft_steps 0 means SLW only. Every job starts from the original model: share, SLW (cached per
reference/rank/seed under --work, so a job with SFT reuses its SLW), then SFT with its own full schedule
(warmup and cosine over sft_steps, so SFT 40 is not the 40th step of SFT 80), then perplexity. Each job
appends one JSON line to --out as it finishes. The recipe's settings apply (recipe=sharp_smollm2) with the
reduced overrides in REDUCED, then any `key=value` overrides given after --.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from llmx.config.compose import compose  # noqa: E402
from llmx.recipes.sharp import _stage1, _stage2, calibration, evaluate, prepare  # noqa: E402
from llmx.sharing import capture_mlp_io, decoder_layers, recovery_parameters, share_mlps  # noqa: E402
from llmx.utils import sha256_text  # noqa: E402

# 4 later layers (SFT's backward reaches only the last 8 of 30), 256-token sequences, 12 + 12 held-out
# sequences: one SFT step of 4 x 256 tokens costs seconds instead of the full recipe's 12-15 s.
REDUCED = ["recipe=sharp_smollm2", "sparsify.sharp.layers=[22,24,26,28]", "sparsify.sharp.sft.seq_len=256",
           "sparsify.eval_sequences=12", "sparsify.sharp.sft.eval_sequences=12", "sparsify.sharp.slw.steps=200",
           "sparsify.sharp.compare_storage=false", "logger.progress=false", "trainer.ckpt_every=0"]


def run_job(ctx, cfg, io, job, work: Path, originals) -> dict:
    reference, rank, sft_steps, seed = job
    layers = decoder_layers(ctx.model)
    for i, mlp in originals.items():
        layers[i].mlp = mlp
    recovery = "lora" if rank else "none"
    init = "svd" if reference == "prune" and rank else "zero"
    t0 = time.perf_counter()
    refs = share_mlps(ctx.model, ctx.replaced, recovery=recovery, rank=max(rank, 1), init=init,
                      reference=reference, seed=seed)
    row = {"reference": reference, "rank": rank, "sft_steps": sft_steps, "seed": seed, "init": init,
           "references": {str(k): v for k, v in refs.items()},
           "recovery_parameters": sum(p.numel() for p in recovery_parameters(ctx.model))}
    name = f"{reference}-r{rank}-s{seed}"
    if rank:
        sh = cfg.sparsify.sharp
        key = sha256_text(json.dumps({"job": name, "slw": str(sh.slw), "layers": ctx.replaced}))
        slw = _stage1(ctx.model, io[seed], sh.slw, work / name / "slw", key, seed)
        row["slw_rel_err_before"] = sum(v["rel_err_before"] for v in slw.values()) / len(slw)
        row["slw_rel_err_after"] = sum(v["rel_err_after"] for v in slw.values()) / len(slw)
        row["slw_held_out_rows"] = next(iter(slw.values()))["held_out_rows"]
    if sft_steps:
        job_cfg = copy.deepcopy(cfg)
        with open_dict(job_cfg):
            job_cfg.sparsify.sharp.sft.steps = sft_steps
            job_cfg.seed = seed
        final = _stage2(job_cfg, ctx.model, ctx.tok, ctx.sft_train, ctx.sft_val, work / name / f"sft{sft_steps}",
                        sha256_text(name, str(sft_steps)), ctx.device)
        row["sft_final"] = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        ctx.model.to(ctx.device).eval()
    row.update(evaluate(ctx, f"{name} sft{sft_steps}"))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(path: str) -> str:
    """One line per (reference, rank, sft_steps): mean +- standard error over the seeds that ran."""
    import statistics

    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    groups: dict = {}
    for r in lines:
        if "reference" in r:
            groups.setdefault((r["reference"], r["rank"], r["sft_steps"]), []).append(r)

    def cell(vals, fmt):
        if not vals:
            return "-"
        if len(vals) == 1:
            return format(vals[0], fmt)
        se = statistics.stdev(vals) / len(vals) ** 0.5
        return f"{format(statistics.mean(vals), fmt)} ± {format(se, fmt)}"

    out = ["| reference | rank | recovery params | SFT steps | seeds | SLW held-out rel. error | text ppl vs original "
           "| instruction ppl vs original |", "|---|---|---|---|---|---|---|---|"]
    for (ref, rank, sft), rs in groups.items():
        slw = [r["slw_rel_err_after"] for r in rs if "slw_rel_err_after" in r]
        out.append(f"| {ref} | {rank} | {rs[0]['recovery_parameters']:,} | {sft} | {len(rs)} | {cell(slw, '.3f')} | "
                   f"{cell([r['text_ratio'] for r in rs], '.3f')}x | {cell([r['instruct_ratio'] for r in rs], '.3f')}x |")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2]))
        return
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="sharp_sweep_work")
    ap.add_argument("--jobs", nargs="+", required=True, help="reference:rank:sft_steps:seed")
    args = ap.parse_args(argv)
    jobs = []
    for j in args.jobs:
        ref, rank, sft, seed = j.split(":")
        jobs.append((ref, int(rank), int(sft), int(seed)))
    cfg = compose(REDUCED + overrides)
    with open_dict(cfg):
        cfg.run_dir = str(Path(args.work).resolve())
    work = Path(cfg.run_dir)
    work.mkdir(parents=True, exist_ok=True)
    ctx = prepare(cfg)
    out = Path(args.out)
    head = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "overrides": REDUCED + overrides, "replaced": ctx.replaced,
            "sft_train_sequences": len(ctx.sft_train), "train_examples": ctx.train_stats["examples"]}
    original = evaluate(ctx, "original")
    with out.open("a") as f:
        f.write(json.dumps({"header": head, "original": original}) + "\n")
    sh = cfg.sparsify.sharp
    io = {}
    for seed in sorted({j[3] for j in jobs if j[1]}):
        calib, keep = calibration(ctx.sft_train, sh.slw.sequences, seed, packed=True)
        io[seed] = capture_mlp_io(ctx.model, ctx.replaced, calib, max_tokens=sh.slw.max_tokens, keep=keep)
        print(f"calibration seed {seed}: {sum(int(k.sum()) for k in keep)} real tokens of "
              f"{sum(k.numel() for k in keep)}", flush=True)
    originals = {i: decoder_layers(ctx.model)[i].mlp for i in ctx.replaced}
    for job in jobs:
        row = run_job(ctx, cfg, io, job, work, originals)
        row["text_ratio"] = row["ppl_text"] / original["ppl_text"]
        row["instruct_ratio"] = row["ppl_instruct"] / original["ppl_instruct"]
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"JOB {job}: text {row['text_ratio']:.3f}x instruct {row['instruct_ratio']:.3f}x "
              f"slw {row.get('slw_rel_err_after', float('nan')):.3f} ({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
