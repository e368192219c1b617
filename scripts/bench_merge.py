"""Benchmark: a ParamΔ merge of synthetic Llama-shaped checkpoints, llmx.merge against mergekit.

    .venv/bin/python scripts/bench_merge.py [--size-gb 2] [--mergekit-python /work/mergekit-venv/bin/python]
        [--repeats 1] [--shard-size 5GB] [--cache-dir DIR] [--out outputs/bench] [--no-compare]

Inputs: three checkpoints (base, post, new_base) with Llama-3.2-1B's shapes (hidden 2048, intermediate
8192, 32 heads, 8 KV heads, vocab 128256) and an untied head, with as many decoder layers as make each
>= --size-gb (8 layers, 2.02 GB, at the default 2 GB; below ~1.8 GB the hidden size, then the vocabulary,
is halved until the embedding and head are at most 60% of the model); random bf16: base ~ N(0, 0.02^2)
(norms 1 + N(0, 0.02^2)), post and new_base = base + an independent N(0, 0.002^2). Written once with the
safetensors library in 1 GB shards (Hugging Face names and index) into the cache directory (default
$LLMX_CACHE/bench_merge) and reused by later runs.

Each merge runs in a fresh subprocess of its own (this script with --_worker), which times the merge call
only and reports its peak resident set, VmHWM of its own address space (/proc/self/status; not ru_maxrss,
which Linux carries across fork and exec), and the peak of its anonymous resident memory (RssAnon, sampled
every 5 ms: resident memory that is not file pages, so that mergekit's memory-mapped input pages, which the
kernel can drop at any time, are not counted as its working memory). The floor rows are the same process
importing torch and the merge library and merging nothing. Before the timed runs every input file is read
before every run, so that every run finds the inputs in the page cache; each run's output is deleted after
it (except the compared ones of the last repeat), and before each run the system's dirty pages are written
back (os.sync), so that no run pays for another's writes or has its inputs evicted by them.
  llmx_cold: llmx.merge.paramdelta(post, base, new_base): fp32 arithmetic, bf16 output, SHA-256 of every
             input and output file computed (hash_cache=False), every file and directory fsync'ed before the
             output is renamed into place.
  llmx:      the same with its defaults: the inputs' hashes come from llmx's hash cache (by path, size,
             mtime, inode), filled by the llmx_cold run before it, as after any first merge of those files;
             the output is still hashed and fsync'ed.
  llmx_lean: hash_inputs=False, fsync=False: the work mergekit does (no hashes, no fsync).
  mergekit:  task_arithmetic "Form B" (mergekit's documented ParamΔ recipe): base_model new_base, models post
             (weight 1) and base (weight -1), normalize false, dtype float32, out_dtype bfloat16, through
             mergekit.merge.run_merge in process (copy_tokenizer=False), with its default out_shard_size
             (5B) and with --out-shard-size 500M (mergekit_500M), its fastest configuration here.
             mergekit needs transformers>=5 and a few packages of its own; install it beside llmx without
             touching .venv:
               python3.11 -m venv /work/mergekit-venv
               echo "$PWD/.venv/lib/python3.11/site-packages" \\
                   > /work/mergekit-venv/lib/python3.11/site-packages/llmx.pth
               /work/mergekit-venv/bin/pip install mergekit==0.1.5
             (it is also in llmx's dev extra, so .venv/bin/python works as --mergekit-python).
Throughput is GB (10^9 bytes) of output tensor data per second of the merge call; the input read rate
is three times that. The comparison (--no-compare skips it) reads both outputs and the inputs in row
chunks: elements that differ, the largest difference in bf16 ulps, and each tool's largest error against
the formula evaluated in float64. Goal (issue 5): the same tensors within one bf16 ulp, llmx faster and
with a lower peak memory; issue 20: llmx with hashes and fsync at least 2x the throughput of mergekit's
fastest configuration. Prints a table and writes bench_merge.json (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 64, "vocab_size": 128256}  # Llama 3.2 1B
INPUT_SHARD = 10**9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb() -> float:
    return proc_status_mb("VmHWM")


class AnonPeak:
    """The peak of RssAnon, sampled every 5 ms on a thread (the kernel keeps no peak of it)."""

    def __init__(self):
        import threading

        self.peak, self._stop = proc_status_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, proc_status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, proc_status_mb("RssAnon"))


# ------------------------------------------------------------------------------------------------ inputs


def shapes(size_gb: float) -> dict:
    """Llama 3.2 1B's shapes, narrowed for small sizes so that the embedding and head stay <= 60% of the model:
    hidden (with intermediate and heads) halved down to 256, then the vocabulary halved."""
    s = dict(SHAPE)
    while 2 * s["vocab_size"] * s["hidden_size"] * 2 > 0.6 * size_gb * 1e9:
        if s["hidden_size"] > 256:
            s.update(hidden_size=s["hidden_size"] // 2, intermediate_size=s["intermediate_size"] // 2,
                     num_attention_heads=s["num_attention_heads"] // 2,
                     num_key_value_heads=max(1, s["num_key_value_heads"] // 2))
        elif s["vocab_size"] > 1024:
            s["vocab_size"] //= 2
        else:
            break
    return s


def layout(size_gb: float):
    """(layers, [(name, shape)]) of a Llama-shaped model (untied head) of at least size_gb in bf16."""
    s = shapes(size_gb)
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    per_layer = [("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
                 ("self_attn.k_proj.weight", (kv, h)), ("self_attn.v_proj.weight", (kv, h)),
                 ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
                 ("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)), ("mlp.down_proj.weight", (h, i))]
    layer_bytes = sum(math.prod(s) for _, s in per_layer) * 2
    fixed = (2 * v * h + h) * 2
    layers = max(1, math.ceil((size_gb * 1e9 - fixed) / layer_bytes))
    names = [("model.embed_tokens.weight", (v, h))]
    for k in range(layers):
        names += [(f"model.layers.{k}.{n}", s) for n, s in per_layer]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return layers, names


def config(layers: int, size_gb: float) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
            **shapes(size_gb), "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 128000, "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False}


def build_inputs(root: Path, size_gb: float) -> dict:
    """base, post, new_base under root/<spec>/ (built once; a finished set has done.json)."""
    import torch
    from safetensors.torch import save_file

    layers, names = layout(size_gb)
    s = shapes(size_gb)
    spec = root / f"llama_h{s['hidden_size']}_v{s['vocab_size']}_{layers}layers"
    dirs = {r: spec / r for r in ("base", "post", "new_base")}
    if (spec / "done.json").is_file():
        return dirs
    if spec.exists():
        shutil.rmtree(spec)
    t0 = time.perf_counter()
    for role, d in dirs.items():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config(layers, size_gb), indent=2))
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192, "role": role}))
        shards, cur, size = [], {}, 0
        for k, (name, shape) in enumerate(names):
            g = torch.Generator().manual_seed(1000 + k)
            t = torch.randn(shape, generator=g).mul_(0.02)
            if name.endswith("norm.weight"):
                t.add_(1.0)
            if role != "base":
                g2 = torch.Generator().manual_seed((1 if role == "post" else 2) * 10**6 + k)
                t.add_(torch.randn(shape, generator=g2).mul_(0.002))
            t = t.to(torch.bfloat16)
            n = t.numel() * 2
            if cur and size + n > INPUT_SHARD:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = t
            size += n
        shards.append(cur)
        wm = {}
        for j, sd in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sd, str(d / fname), metadata={"format": "pt"})
            wm.update({n: fname for n in sd})
        total = sum(math.prod(s) * 2 for _, s in names)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": wm}, indent=2))
        del shards, cur
        log(f"built {role}: {total / 1e9:.2f} GB in {len(wm) and len(set(wm.values()))} shards")
    (spec / "done.json").write_text(json.dumps({"layers": layers, "seconds": time.perf_counter() - t0}))
    return dirs


def warm(dirs: dict) -> None:
    for d in dirs.values():
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 * 2**20):
                    pass


# ------------------------------------------------------------------------------------------------ workers


def worker(args) -> None:
    """Run one merge (or none: floor_*) in this process; print one JSON line."""
    import torch

    if args._worker.startswith(("llmx", "floor_llmx")):
        from llmx.merge import paramdelta
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    result = {"tool": args._worker, "threads": torch.get_num_threads()}
    if args._worker.startswith("floor"):
        result.update(seconds=0.0, vm_hwm_mb=vm_hwm_mb(), rss_anon_peak_mb=proc_status_mb("RssAnon"))
        print(json.dumps(result), flush=True)
        return
    anon = AnonPeak()
    t = time.perf_counter()
    if args._worker.startswith("llmx"):
        kw = {"llmx": {}, "llmx_cold": {"hash_cache": False}, "llmx_lean": {"hash_inputs": False, "fsync": False}}
        paramdelta(args.post, args.base, args.new_base, args.out_dir, shard_size=args.shard_bytes,
                   dtype=torch.bfloat16, **({"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}),
                   **kw[args._worker])
    else:
        cfg = MergeConfiguration.model_validate({
            "merge_method": "task_arithmetic", "base_model": args.new_base,
            "models": [{"model": args.post, "parameters": {"weight": 1.0}},
                       {"model": args.base, "parameters": {"weight": -1.0}}],
            "parameters": {"normalize": False}, "dtype": "float32", "out_dtype": "bfloat16"})
        shard = 500 * 10**6 if args._worker == "mergekit_500M" else args.shard_bytes
        run_merge(cfg, out_path=args.out_dir, options=MergeOptions(copy_tokenizer=False, write_model_card=False,
                                                                   out_shard_size=shard, quiet=True))
    result.update(seconds=time.perf_counter() - t, vm_hwm_mb=vm_hwm_mb(), rss_anon_peak_mb=anon.stop())
    print(json.dumps(result), flush=True)


def run_worker(python: str, tool: str, dirs: dict, out_dir: Path, shard_bytes: int, chunk_bytes=None) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.sync()  # every run starts with nothing of another's output waiting to be written back
    cmd = [python, str(Path(__file__).resolve()), "--_worker", tool, "--post", str(dirs["post"]),
           "--base", str(dirs["base"]), "--new-base", str(dirs["new_base"]), "--out-dir", str(out_dir),
           "--shard-bytes", str(shard_bytes)] + (["--chunk-bytes", str(chunk_bytes)] if chunk_bytes else [])
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{tool} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["process_s"] = wall
    if not tool.startswith("floor"):
        res["output_bytes"] = tensor_bytes(out_dir)
        res["gb_per_s"] = res["output_bytes"] / 1e9 / res["seconds"]
    return res


def tensor_bytes(d: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for n in h.keys():
                sl = h.get_slice(n)
                total += math.prod(sl.get_shape()) * 2  # bf16
    return total


# ------------------------------------------------------------------------------------------------ compare


def open_all(d: Path) -> dict:
    from safetensors import safe_open

    handles = {}
    for f in sorted(d.glob("*.safetensors")):
        h = safe_open(str(f), "pt")
        for n in h.keys():
            handles[n] = h
    return handles


def compare(dirs: dict, outs: dict, rows_per_chunk: int = 2048) -> dict:
    """Both outputs against each other and against new_base + (post - base) in float64, in row chunks."""
    import torch

    ins = {r: open_all(d) for r, d in dirs.items()}
    got = {t: open_all(d) for t, d in outs.items()}
    names = sorted(ins["new_base"])
    res = {"tensors": len(names), "elements": 0, "differing_elements": 0, "max_diff_ulps": 0.0,
           "max_err_half_ulps": {t: 0.0 for t in outs},
           "missing": {t: sorted(set(names) - set(g)) for t, g in got.items()}}
    for n in names:
        if any(n not in g for g in got.values()):
            continue
        rows = ins["new_base"][n].get_slice(n).get_shape()[0]
        for a in range(0, rows, rows_per_chunk):
            b = min(rows, a + rows_per_chunk)
            x = {r: ins[r][n].get_slice(n)[a:b].double() for r in ins}
            ref = x["new_base"] + (x["post"] - x["base"])
            ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp_min(1e-30))[1] - 8)  # bf16 ulp
            outs_t = {t: g[n].get_slice(n)[a:b].double() for t, g in got.items()}
            for t, o in outs_t.items():
                res["max_err_half_ulps"][t] = max(res["max_err_half_ulps"][t],
                                                   ((o - ref).abs() / (ulp / 2)).max().item())
            if len(outs_t) == 2:
                o1, o2 = outs_t.values()
                res["differing_elements"] += int((o1 != o2).sum())
                res["max_diff_ulps"] = max(res["max_diff_ulps"], ((o1 - o2).abs() / ulp).max().item())
            res["elements"] += ref.numel()
    res["same_within_1_ulp"] = res["max_diff_ulps"] <= 1.0 and not any(res["missing"].values())
    return res


# ------------------------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each input model (bf16)")
    ap.add_argument("--mergekit-python", default=None, help="a python with mergekit installed (optional)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each tool; medians reported")
    ap.add_argument("--shard-size", default="5GB", help="output shard size of both tools (bytes)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    ap.add_argument("--no-compare", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true")
    for flag in ("--_worker", "--post", "--base", "--new-base", "--out-dir"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunk-bytes", default=None, help="llmx's chunk_bytes (default: the library's)")
    args = ap.parse_args()
    if args._worker:
        return worker(args)

    from llmx.merge.io import parse_size
    from llmx.utils import cache_dir

    shard_bytes = parse_size(args.shard_size)
    root = args.cache_dir or cache_dir() / "bench_merge"
    dirs = build_inputs(root, args.size_gb)
    model_bytes = json.loads((dirs["base"] / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    warm(dirs)
    work = dirs["base"].parent
    tools = [("llmx_cold", sys.executable), ("llmx", sys.executable), ("llmx_lean", sys.executable)]
    if args.mergekit_python:
        tools = [("mergekit", args.mergekit_python), ("mergekit_500M", args.mergekit_python)] + tools
    runs = {t: [] for t, _ in tools}
    floors = {t: run_worker(py, f"floor_{t}", dirs, work / "out_floor", shard_bytes) for t, py in tools
              if t in ("llmx", "mergekit")}
    for t, _ in tools:
        floors.setdefault(t, floors["llmx" if t.startswith("llmx") else "mergekit"])
    compared = ("llmx", "mergekit")
    for r in range(args.repeats):
        for tool, py in tools:
            warm(dirs)  # the inputs in the page cache for every run, whatever the runs before evicted
            res = run_worker(py, tool, dirs, work / f"out_{tool}", shard_bytes, args.chunk_bytes)
            if r < args.repeats - 1 or tool not in compared or args.no_compare:
                shutil.rmtree(work / f"out_{tool}")  # outputs left behind would crowd the inputs out of the cache
            runs[tool].append(res)
            log(f"repeat {r}: {tool}: {res['seconds']:.1f} s, {res['gb_per_s']:.3f} GB/s, "
                f"peak RSS {res['vm_hwm_mb']:.0f} MB, peak RssAnon {res['rss_anon_peak_mb']:.0f} MB")
    cmp = None
    if not args.no_compare:
        outs = {t: work / f"out_{t}" for t, _ in tools if t in compared}
        cmp = compare(dirs, outs)

    med = {t: {k: statistics.median(x[k] for x in rs)
               for k in ("seconds", "gb_per_s", "vm_hwm_mb", "rss_anon_peak_mb", "output_bytes")}
           for t, rs in runs.items()}
    base_tool = "mergekit_500M" if "mergekit_500M" in med else "llmx"
    import torch

    result = {
        "benchmark": "merge",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
                   f"torch {torch.__version__}",
        "command": "python scripts/bench_merge.py " + " ".join(sys.argv[1:]),
        "inputs": {"shape": shapes(args.size_gb), "layers": layout(args.size_gb)[0],
                   "bytes_per_model": model_bytes, "dtype": "bfloat16", "dirs": {k: str(v) for k, v in dirs.items()}},
        "shard_size": shard_bytes,
        "throughput_unit": "GB (1e9 bytes) of output tensor data per second of the merge call",
        "baseline": base_tool,
        "floor": floors,
        "median": med,
        "runs": runs,
        "compare": cmp,
    }
    for t in med:
        result["median"][t]["speed_vs_baseline"] = med[t]["gb_per_s"] / med[base_tool]["gb_per_s"]
        result["median"][t]["peak_rss_vs_baseline"] = med[t]["vm_hwm_mb"] / med[base_tool]["vm_hwm_mb"]
    sh = shapes(args.size_gb)
    print(f"\nParamΔ merge of 3 x {model_bytes / 1e9:.2f} GB bf16 (Llama: hidden {sh['hidden_size']}, vocab "
          f"{sh['vocab_size']}, {layout(args.size_gb)[0]} layers), output shards {shard_bytes / 1e9:g} GB, "
          f"median of {args.repeats}")
    print(f"{'tool':14} {'merge s':>8} {'GB/s out':>9} {'speed':>7} {'peak RSS MB':>12} {'RssAnon MB':>11} "
          f"{'floor MB':>9}")
    for t in med:
        m = med[t]
        print(f"{t:14} {m['seconds']:8.2f} {m['gb_per_s']:9.3f} {m['speed_vs_baseline']:6.2f}x "
              f"{m['vm_hwm_mb']:12.0f} {m['rss_anon_peak_mb']:11.0f} {floors[t]['vm_hwm_mb']:9.0f}")
    print(f"speed: against {base_tool}")
    if cmp:
        print(f"compare: {cmp['elements']} elements in {cmp['tensors']} tensors; llmx vs mergekit differ in "
              f"{cmp['differing_elements']} (max {cmp['max_diff_ulps']:.2f} bf16 ulp); max error vs float64 "
              + ", ".join(f"{t} {v:.2f}" for t, v in cmp["max_err_half_ulps"].items()) + " half-ulps"
              + ("" if "mergekit" in med else " (mergekit not run)"))
    print("llmx_cold: SHA-256 of every input and output file computed, fsync; llmx: input hashes from its cache, "
          "output hashed, fsync; llmx_lean: neither (as mergekit)")
    if not args.keep_outputs:
        for t, _ in tools:
            shutil.rmtree(work / f"out_{t}", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_merge.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
