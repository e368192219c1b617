"""Benchmark: NaturalReasoning near-duplicate removal (llmx.reasoning.dedup) against an exact-hash baseline.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_dedup.py [--n 100000] [--naive-n 5000] [--seed 0]
        [--out outputs/bench/bench_dedup.json]

Documents: --n synthetic texts of 50-100 words (uniform), words drawn from a Zipf(1) vocabulary of 30,000
so that common phrases recur across unrelated documents as in real text (they make LSH candidates that the
verification must reject). Planted: 10% of documents are a copy of an earlier one with 1-5 words replaced
(near duplicates, shingle Jaccard ~0.5-0.95, so some fall below 0.55 by construction: recall is also
reported over the planted pairs whose exact Jaccard, computed here, is >= 0.6 and whose source was kept: a
copy of a removed document is compared only with what removed it, by the first-occurrence rule) and 2% an
exact copy with changed case and punctuation.
Everything is drawn from --seed, so every run and every method sees the same texts.

Each method runs in a fresh subprocess (this script with --_worker) that builds the documents, then times only
the call, and reports its peak resident set (VmHWM of its own process) before the call (RSS MB: the
interpreter and the documents) and after it (peak MB):
  exact        exact_duplicates: a 128-bit hash of each normalised text (the baseline of the ratios)
  near         near_duplicates with its defaults (threshold 0.55, num_perm 128, 3-word shingles), timed as
               its two stages: sketch (MinHash.generator + update_batch) and the LSH pass
  per_doc      the sketch stage written the obvious way, one MinHash(...) per document and update() per
               shingle, on the first --naive-n documents only: why sketch uses datasketch's bulk path
Prints a table and writes JSON (--out) with documents/s and the ratio to the exact baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmx.utils import atomic_write_json  # noqa: E402

PUNCT = [".", ",", "?", "!", ";"]


def documents(n: int, seed: int):
    """(texts, planted near duplicates {position: source}, planted exact-copy positions)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30000)]
    cum = list(accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))
    texts, near, exact = [], {}, []
    for i in range(n):
        roll = rng.random()
        if i > 0 and roll < 0.10:
            source = rng.randrange(i)
            tokens = texts[source].split()
            for pos in rng.sample(range(len(tokens)), rng.randint(1, 5)):
                tokens[pos] = rng.choices(vocab, cum_weights=cum)[0]
            texts.append(" ".join(tokens))
            near[i] = source
        elif i > 0 and roll < 0.12:
            texts.append(texts[rng.randrange(i)].upper() + rng.choice(PUNCT))
            exact.append(i)
        else:
            texts.append(" ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(50, 100))))
    return texts, near, exact


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def jaccard(a: str, b: str) -> float:
    from llmx.reasoning.dedup import DEFAULT_SHINGLE, shingles

    sa, sb = shingles(a, DEFAULT_SHINGLE), shingles(b, DEFAULT_SHINGLE)
    return len(sa & sb) / max(len(sa | sb), 1)


def per_doc_sketches(texts, num_perm: int, shingle: int, seed: int) -> int:
    from datasketch import MinHash

    from llmx.reasoning.dedup import shingles

    for t in texts:
        m = MinHash(num_perm=num_perm, seed=seed)
        for s in shingles(t, shingle):
            m.update(s.encode())
    return len(texts)


def worker(method: str, n: int, naive_n: int, seed: int) -> dict:
    from llmx.reasoning import dedup

    texts, near, exact = documents(n, seed)
    planted = set(near) | set(exact)
    clear = {i for i, j in near.items() if jaccard(texts[i], texts[j]) >= 0.6}
    out = {"method": method, "rss_before_mb": round(peak_rss_mb(), 1)}
    t0 = time.perf_counter()
    if method == "exact":
        result = dedup.exact_duplicates(texts)
    elif method == "near":
        sk = dedup.sketch(texts)
        out["sketch_s"] = round(time.perf_counter() - t0, 3)
        result = dedup.dedup_sketches(sk)
        out["lsh_s"] = round(time.perf_counter() - t0 - out["sketch_s"], 3)
        out["lsh"] = {"bands": result.params["lsh_bands"], "rows": result.params["lsh_rows"]}
    else:
        texts = texts[:naive_n]
        per_doc_sketches(texts, dedup.DEFAULT_NUM_PERM, dedup.DEFAULT_SHINGLE, dedup.DEFAULT_SEED)
        result = None
    seconds = time.perf_counter() - t0
    out.update(documents=len(texts), seconds=round(seconds, 3), docs_per_s=round(len(texts) / seconds, 1),
               peak_rss_mb=round(peak_rss_mb(), 1))
    if result is not None:
        removed = {d.item for d in result.removed}
        clear = {i for i in clear if near[i] not in removed}
        out.update(removed=len(removed), planted_near=len(near), planted_exact=len(exact),
                   recall_near=round(len(removed & set(near)) / max(len(near), 1), 4),
                   recall_exact=round(len(removed & set(exact)) / max(len(exact), 1), 4),
                   planted_near_j_ge_0_6=len(clear),
                   recall_near_j_ge_0_6=round(len(removed & clear) / max(len(clear), 1), 4),
                   removed_unplanted=len(removed - planted))
    return out


def run_worker(method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", method, "--n", str(args.n), "--naive-n", str(args.naive_n),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows, base_rate: float) -> str:
    head = f"{'method':<8} {'docs':>8} {'seconds':>8} {'docs/s':>10} {'x exact':>8} {'RSS MB':>7} {'peak MB':>8} " \
           f"{'removed':>8} {'recall near':>11} {'near J>=.6':>10} {'recall exact':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<8} {r['documents']:>8} {r['seconds']:>8.2f} {r['docs_per_s']:>10.0f} "
                     f"{r['docs_per_s'] / base_rate:>8.3f} {r['rss_before_mb']:>7.0f} {r['peak_rss_mb']:>8.0f} "
                     f"{r.get('removed', '-'):>8} {r.get('recall_near', '-'):>11} "
                     f"{r.get('recall_near_j_ge_0_6', '-'):>10} {r.get('recall_exact', '-'):>12}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--naive-n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench/bench_dedup.json")
    p.add_argument("--_worker", choices=["exact", "near", "per_doc"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.n < 1 or args.naive_n < 1:
        sys.exit(f"--n={args.n} and --naive-n={args.naive_n} must be >= 1")
    if args._worker:
        print(json.dumps(worker(args._worker, args.n, args.naive_n, args.seed)))
        return
    rows = [run_worker(m, args) for m in ("exact", "near", "per_doc")]
    base = rows[0]["docs_per_s"]
    for r in rows:
        r["ratio_vs_exact"] = round(r["docs_per_s"] / base, 4)
    near = rows[1]
    print(table(rows, base))
    print(f"near stages: sketch {near['sketch_s']:.2f} s ({near['documents'] / near['sketch_s']:.0f} docs/s), "
          f"LSH pass {near['lsh_s']:.2f} s; LSH {near['lsh']['bands']} bands x {near['lsh']['rows']} rows; "
          f"removed without being planted: {near['removed_unplanted']}")
    print(f"per_doc sketching vs sketch stage: "
          f"{rows[2]['docs_per_s'] / (near['documents'] / near['sketch_s']):.3f}x")
    atomic_write_json(args.out, {
        "n": args.n, "naive_n": args.naive_n, "seed": args.seed, "rows": rows,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
