"""Benchmark: the Token Assorted VQ-VAE (llmx.latent.vqvae) on one CPU thread: encoding and training speed.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_vqvae.py [--vocab 32000] [--chunks 1024] [--train-steps 10]
        [--seed 0] [--out outputs/bench/vqvae.json]

Models (untrained, random init; speed does not depend on the weights): chunk_len 16, compression 16 (one latent
per chunk), 2 encoder + 2 decoder layers, 1 prompt layer, 4 heads, --vocab tokens:
  small   dim  64, codebook   64
  medium  dim 128, codebook 1024
  large   dim 256, codebook 1024
Data: synthetic examples (prompt 64 tokens, CoT 64 tokens = 4 full chunks, solution 8 tokens), uniform random
ids drawn from --seed; --chunks CoT chunks in all.
Rows, each timed after one untimed warm-up call:
  encode_cot   chunks/s of encode_cot (building chunks, collating, encoding, quantising, regrouping) at batch
               64 and 256
  codes_for    chunks/s of model.codes_for on a pre-collated [B, 16] batch (the network alone), B = 64 and 256
  train        optimizer steps/s of train_vqvae at batch 32 (chunks of the whole X, prompt included)
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmx.latent.vqvae import (VQVAE, VQVAEConfig, collate, encode_cot, train_vqvae,  # noqa: E402
                               training_chunks)
from llmx.utils import atomic_write_json  # noqa: E402

SIZES = {"small": (64, 64), "medium": (128, 1024), "large": (256, 1024)}
BATCHES = (64, 256)


def make_examples(n: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def ids(k: int):
        return torch.randint(1, vocab, (k,), generator=g).tolist()

    return [(ids(64), ids(64), ids(8)) for _ in range(n)]


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench_size(name: str, dim: int, book: int, args, examples) -> list:
    torch.manual_seed(args.seed)
    model = VQVAE(VQVAEConfig(vocab_size=args.vocab, pad_id=0, dim=dim, codebook_size=book)).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for b in BATCHES:
        sec = timed(lambda: encode_cot(model, examples, batch_size=b))
        rows.append({"model": name, "dim": dim, "codebook": book, "params": params, "what": "encode_cot",
                     "batch": b, "per_s": args.chunks / sec})
    for b in BATCHES:
        batch = collate(training_chunks(examples[: b], 16, 0)[: b], 0)
        batch = {k: batch[k] for k in ("chunk_ids", "chunk_mask")}
        sec = timed(lambda: model.codes_for(**batch), repeats=3)
        rows.append({"model": name, "dim": dim, "codebook": book, "params": params, "what": "codes_for",
                     "batch": b, "per_s": b / sec})
    items = training_chunks(examples, 16, 0)
    train_vqvae(model, items, [], steps=2, batch_size=32, log=None)  # warm-up
    hist = train_vqvae(model, items, [], steps=args.train_steps, batch_size=32, log=None,
                       log_every=args.train_steps)
    rows.append({"model": name, "dim": dim, "codebook": book, "params": params, "what": "train",
                 "batch": 32, "per_s": hist["steps_per_s"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunks", type=int, default=1024, help="CoT chunks encoded (4 per example)")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench/vqvae.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    examples = make_examples(args.chunks // 4, args.vocab, args.seed)
    rows = []
    for name, (dim, book) in SIZES.items():
        rows += bench_size(name, dim, book, args, examples)
    print(f"{'model':7} {'dim':>4} {'book':>5} {'params':>8} {'what':11} {'batch':>5} {'per s':>10}")
    for r in rows:
        unit = "steps" if r["what"] == "train" else "chunks"
        print(f"{r['model']:7} {r['dim']:4d} {r['codebook']:5d} {r['params'] / 1e6:7.2f}M {r['what']:11} "
              f"{r['batch']:5d} {r['per_s']:10.1f} {unit}")
    atomic_write_json(args.out, {"bench": "vqvae", "torch": torch.__version__, "threads": 1,
                                 "machine": platform.processor() or platform.machine(), "args": vars(args),
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
