"""Benchmark: keys_maze generation, solving and verification speed (single process).

    .venv/bin/python scripts/bench_keys_maze.py [--n 200] [--out outputs/bench/keys_maze.json]

For each difficulty (room grid, room size, locked doors, op) it times, over `n` problems:
  generated   KeysMaze.generate from problem_rng: mazes/s including rejected draws (attempts per maze reported)
  solve       the BFS solver (canonical optimal trajectory) on the accepted mazes, solves/s
  replay      replaying the reference trajectory, replays/s
  verify      KeysMaze.verify (the independent Dijkstra solver plus the replay), verifications/s
and the mean prompt / CoT / solution token counts of the from-scratch serialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPECS = [
    ("3x3 rooms, size 1, op 1", {"rooms": (3, 3), "room_size": 1, "locked_doors": 2}, 1),
    ("4x4 rooms, size 1, op 2", {"rooms": (4, 4), "room_size": 1, "locked_doors": 3, "loops": 2}, 2),
    ("3x3 rooms, size 2, op 2", {"rooms": (3, 3), "room_size": 2, "locked_doors": 2}, 2),
    # recipe=token_assorted_maze's spec
    ("2x2 rooms, size 3, op 1", {"rooms": (2, 2), "room_size": 3, "locked_doors": 2, "loops": 0}, 1),
    ("2x2 rooms, size 3, op 2", {"rooms": (2, 2), "room_size": 3, "locked_doors": 2, "loops": 0}, 2),
]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def measure(options: dict, op: int, n: int) -> dict:
    from llmx.bench import get_bench
    from llmx.bench.base import problem_rng
    from llmx.bench import keys_maze as km

    bench = get_bench("keys_maze", **options)
    attempts = 0
    sample = km.sample_maze

    def counting(spec, op_, rng):  # counts rejection-sampling draws without changing the generator
        nonlocal attempts
        attempts += 1
        return sample(spec, op_, rng)

    km.sample_maze = counting
    try:
        t = time.perf_counter()
        records = [bench.generate("train", op, 0, problem_rng(0, "keys_maze", "train", 0, op, i), None)
                   for i in range(n)]
        gen_s = time.perf_counter() - t
    finally:
        km.sample_maze = sample
    t = time.perf_counter()
    for r in records:
        km.solve(r["maze"])
    solve_s = time.perf_counter() - t
    t = time.perf_counter()
    for r in records:
        km.replay(r["maze"], r["actions"])
    replay_s = time.perf_counter() - t
    t = time.perf_counter()
    for r in records:
        bench.verify(r)
    verify_s = time.perf_counter() - t
    toks = [km.tokens(r) for r in records]
    return {
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}, "op": op, "n": n,
        "mazes_per_s": rate(n, gen_s), "attempts_per_maze": attempts / n,
        "solves_per_s": rate(n, solve_s), "replays_per_s": rate(n, replay_s), "verifies_per_s": rate(n, verify_s),
        "mean_optimal_len": sum(r["optimal_len"] for r in records) / n,
        "mean_tokens": {name: sum(len(t[i]) for t in toks) / n for i, name in enumerate(("prompt", "cot", "solution"))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="problems per difficulty")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "keys_maze.json")
    args = ap.parse_args()
    random.seed(0)
    result = {
        "benchmark": "keys_maze",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
                   f"{platform.python_version()}, single process",
        "command": "python scripts/bench_keys_maze.py " + " ".join(sys.argv[1:]),
        "results": {name: measure(options, op, args.n) for name, options, op in SPECS},
    }
    head = f"{'difficulty':<26}{'mazes/s':>9}{'tries':>7}{'solves/s':>10}{'replays/s':>11}{'verifies/s':>12}"
    print(head + f"{'len':>6}{'prompt':>8}{'cot':>6}{'sol':>6}")
    for name, r in result["results"].items():
        t = r["mean_tokens"]
        print(f"{name:<26}{r['mazes_per_s']:>9.0f}{r['attempts_per_maze']:>7.1f}{r['solves_per_s']:>10.0f}"
              f"{r['replays_per_s']:>11.0f}{r['verifies_per_s']:>12.0f}{r['mean_optimal_len']:>6.1f}"
              f"{t['prompt']:>8.0f}{t['cot']:>6.0f}{t['solution']:>6.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
