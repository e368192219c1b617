"""Benchmark: llmx trainer throughput against a plain PyTorch loop, and CLI start-up time.

    .venv/bin/python scripts/bench_trainer.py [--steps 60] [--warmup 10] [--repeats 3] [--out outputs/bench]

Both loops train the same model (the pretrain_tiny Llama) on the same packed data (the default pylib corpus), batch 16 x 128,
AdamW with the same lr, clipping 1.0, fp32 on CPU. The plain loop is what one would write by hand:
index a tensor, forward, cross-entropy, backward, clip, step. The llmx side is the real Trainer.fit with
its data loader, loss normalisation, metrics and progress bar; its throughput is taken from wall-clock
times between metrics rows (so everything the loop does counts), after `warmup` steps. The two alternate
`repeats` times and the ratio of medians is reported. Goal: llmx >= 0.95 of the plain loop.

Start-up: wall time of `llmx --help` and `llmx list` in fresh processes (median of 5). Goal: < 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides):
    from llmx.config.compose import compose

    return compose(["recipe=pretrain_tiny", *overrides])


def build(cfg):
    import torch

    from llmx.data import build_datasets, build_tokenizer
    from llmx.models import build_model

    tok = build_tokenizer(cfg.data)
    train, val = build_datasets(cfg.data, tok)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size=len(tok))
    return tok, model, train, val


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """Tokens/s of a hand-written loop over the same model and data."""
    import torch
    import torch.nn.functional as F

    tok, model, train, _ = build(cfg)
    # The blocks the run can reach (steps x batch), not the whole 110k-block corpus.
    data = torch.stack([train[i] for i in range(min(len(train), (steps + warmup) * cfg.trainer.batch_size))])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    b = cfg.trainer.batch_size
    model.train()
    t_start = None
    for step in range(steps + warmup):
        if step == warmup:
            t_start = time.perf_counter()
        idx = torch.randint(0, len(data), (b,), generator=g)
        x = data[idx]
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t_start
    return steps * b * x.shape[1] / elapsed


def llmx_loop(cfg, steps: int, warmup: int) -> float:
    from llmx.data import StepLoader
    from llmx.trainer.distributed import init_distributed
    from llmx.trainer.trainer import Trainer

    tok, model, train, val = build(cfg)
    info = init_distributed("cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        loader = StepLoader(train, batch_size=cfg.trainer.batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                            rank=0, world_size=1, seed=cfg.seed, shuffle=True)
        Trainer(cfg, Path(run_dir), info, model, loader, val, tokenizer=tok).fit()
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and r["step"] >= warmup]
    first, last = rows[0], rows[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])


def startup(args) -> float:
    exe = str(Path(sys.executable).with_name("llmx"))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([exe, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    args = ap.parse_args()

    import torch

    total = args.steps + args.warmup
    cfg = compose_cfg([f"trainer.max_steps={total}", "trainer.eval_every=0", "trainer.ckpt_every=0",
                       "trainer.save_final=false", "trainer.export_hf=false", "trainer.log_every=10",
                       "trainer.eval_batches=1", "optim.warmup_steps=0", "logger.progress=true"])
    plain, ours = [], []
    for r in range(args.repeats):
        plain.append(plain_loop(cfg, args.steps, args.warmup))
        ours.append(llmx_loop(cfg, args.steps, args.warmup))
        print(f"repeat {r}: plain {plain[-1]:.0f} tok/s, llmx {ours[-1]:.0f} tok/s", file=sys.stderr)
    help_s, list_s = startup(["--help"]), startup(["list"])

    result = {
        "benchmark": "trainer",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": "python scripts/bench_trainer.py " + " ".join(sys.argv[1:]),
        "model": "pretrain_tiny Llama, batch 16 x 128, AdamW, fp32 CPU",
        "plain_tokens_per_s": statistics.median(plain),
        "llmx_tokens_per_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(plain),
        "plain_runs": plain,
        "llmx_runs": ours,
        "llmx_help_s": help_s,
        "llmx_list_s": list_s,
    }
    rows = [
        ("plain PyTorch loop, tokens/s", f"{result['plain_tokens_per_s']:.0f}", "baseline"),
        ("llmx Trainer, tokens/s", f"{result['llmx_tokens_per_s']:.0f}", f"{result['ratio']:.3f}x (goal >= 0.95)"),
        ("`llmx --help`, s", f"{help_s:.3f}", "goal < 0.5"),
        ("`llmx list`, s", f"{list_s:.3f}", "goal < 0.5"),
    ]
    print(f"\n{'measure':<32} {'value':>10}  ratio / goal")
    for name, value, note in rows:
        print(f"{name:<32} {value:>10}  {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_trainer.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
