"""Benchmarks of the R-Sparse decode GEMV (llmx.kernels.rsparse_gemv): per layer, and a Llama-7B decode step.

    python scripts/bench_rsparse_kernels.py --device cuda [--out outputs/bench] [--sections layer,fused,decode,hf,...]
    python scripts/bench_rsparse_kernels.py --device cpu --smoke     # tiny shapes, PyTorch reference path only

Every speed-up is against cuBLAS dense (torch.nn.functional.linear) measured in the same run.
Sections 1-4 import only torch, triton, the kernel module and the standard library (no Hydra, no llmx.config):
they run on a bare GPU image. If ``llmx`` is not installed, the kernel module is loaded from ../kernels/ by path.

1. layer: one linear at batch 1, bf16, shapes (out x in) 4096x4096, 14336x4096, 4096x14336, at layer
   sparsity s = 0.5 and 0.7. Each call is timed inside a CUDA graph (triton.testing.do_bench_cudagraph;
   do_bench if that fails) and rotates over --copies (>= 4) weight copies so that L2 cannot hold W.
   Variants: dense; TEAL (alpha = 1: |x| > t, no low rank, a fraction 1 - s of channels kept);
   R-Sparse fused (the paper's allocation at alpha = 0.9: a fraction (1 - s) * 0.9 of channels kept,
   rank r = in*out*(1 - s)*0.1/(in + out) rounded down to a multiple of 16); R-Sparse unfused (mask and low-rank term as separate torch
   ops around the Triton sparse GEMV: what the fusion saves); and the "memset" reduction of both kernels
   (fresh zeroed fp32 buffers + cast instead of the self-cleaning ticket workspace). Thresholds are the
   quantile of |x| * scale (|x| for TEAL) of the Gaussian x used, so the kept fraction is exact. The
   low-rank factors are random (an SVD would give the same timing). Each variant's output is first
   checked against rsparse_reference. s = 0.99 measures the fixed cost (launches, mask, reduction). On CUDA
   also the tile ``tune_config`` picks for the shape and kept fraction (teal_tuned, rsparse_tuned).
   Also the compacted design (kernels/rsparse_compact.py: active channels listed first, a loop over them only)
   with its untuned tiles (teal_compact, rsparse_compact); the tuned columns choose over both designs.
2b. fused: q/k/v (4096 -> 4096 + 1024 + 1024, Llama-3-8B) and gate/up (4096 -> 2 x 14336) at batch 1, s = 0.5,
   alpha 0.95: dense over the concatenated W against R-Sparse one call per projection (either design) and one
   segmented call per group (each projection its own mask, threshold and low-rank term), heuristic and tuned.
2. sweep: TEAL at s = 0.5, batch 1, over a few (BLOCK_K, BLOCK_N, warps) tiles, to check the heuristic.
3. batch: 4096x4096 at s = 0.5 with 4 and 8 rows (union masks; tl.dot path): dense, TEAL, R-Sparse.
4. decode: a Llama-7B-shaped decoder in plain torch (32 layers, hidden 4096, ffn 11008, 32 heads,
   vocab 32000, bf16, random weights; RMSNorm, RoPE, SDPA over a 512-token KV cache, SwiGLU), one
   decode step captured in a CUDA graph and replayed 100 times: dense (F.linear) against the 7
   projections of every layer as R-Sparse (s = 0.5 each, alpha = 0.9), TEAL (s = 0.5) and R-Sparse with
   the memset reduction. Thresholds are calibrated per projection on the captured step's own inputs
   (eager, layer by layer), so each projection keeps exactly its target fraction. The dense weights are
   converted to W^T in place, one matrix at a time (peak memory ~ one 7B model).
5. hf: the product path end to end: an HF LlamaForCausalLM of the Llama-3-8B shape (--hf-layers, random bf16
   weights) decoding 128 tokens greedily through llmx.sparse.evaluate.decode_speed (static KV cache, the step
   compiled with CUDA graphs), dense against TEAL and R-Sparse (s = 0.5 uniform, alpha = 0.95) applied by
   llmx.sparse.apply_plan with the fused kernel inside the layers (TEAL's q/k/v and gate/up as one launch each,
   llmx.sparse.rsparse.fuse_shared_inputs, as its gpt-fast path does); R-Sparse both per projection and with
   q/k/v and gate/up as segmented calls (rsparse_fused). Needs transformers and llmx.sparse (the
   device check's llmx shim provides the latter; neither needs Hydra).
Sections fail independently: an error is printed and recorded in the JSON, and the next section runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RANK_MULTIPLE = 16  # the paper's rank rounded down to a multiple of 16: aligned factor rows (see rsparse_allocation)


def load_kernels():
    try:
        import llmx.kernels.rsparse_gemv as mod
        return mod
    except ImportError:  # llmx not installed (a bare GPU image): load kernels/ as a package of its own
        spec = importlib.util.spec_from_file_location("llmx_kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["llmx_kernels"] = pkg
        spec.loader.exec_module(pkg)
        return importlib.import_module("llmx_kernels.rsparse_gemv")


rs = load_kernels()


def log(msg: str) -> None:
    print(msg, flush=True)


def rel_err(actual, expected) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


class Backend:
    """The Triton kernels on CUDA; the PyTorch reference on CPU (smoke checks of the script itself)."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device == "cuda"

    def sparse(self, x, wt, scale, t, u=None, vs=None, reduction="ticket", config=None):
        if self.cuda:
            return rs.rsparse_gemv(x, wt, scale, t, u, vs, reduction=reduction, config=config)
        return rs.rsparse_reference(x, wt, scale, t, u, vs)

    def unfused(self, x, wt, scale, t, u, vs):
        """R-Sparse as separate ops: mask in torch, Triton sparse GEMV on x*m, low-rank GEMVs in torch."""
        keep = x.abs() * scale > t
        xs = torch.where(keep, x, torch.zeros_like(x))
        y = self.sparse(xs, wt, None, 0.0)  # |x*m| > 0: exactly the kept channels (zeros add nothing)
        return y if u is None else y + F.linear(F.linear(x - xs, vs), u)

    def time_us(self, fn) -> tuple[float, str]:
        if self.cuda:
            import triton.testing
            try:
                try:
                    ms = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
                except TypeError:  # a Triton without return_mode: the mean
                    ms = triton.testing.do_bench_cudagraph(fn, rep=20)
                return ms * 1e3, "cudagraph"
            except Exception as e:  # noqa: BLE001 -- fall back, but say so
                log(f"  do_bench_cudagraph failed ({type(e).__name__}: {e}); using do_bench")
                return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3, "do_bench"
        fn()
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6, "perf_counter"


def rotating(fns):
    """One callable that runs fns[0], fns[1], ... in turn: graph capture unrolls it over the weight copies."""
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return call


def make_copies(out_f, in_f, s, alpha, copies, device, dtype, gen):
    """Weight copies: dense W (out, in), W^T, fp32 column norms, random factors at the paper's rank."""
    keep, rank = rs.rsparse_allocation(in_f, out_f, s, alpha, rank_multiple=RANK_MULTIPLE)
    layers = []
    for _ in range(copies):
        w = torch.randn(out_f, in_f, generator=gen, device=device, dtype=dtype).mul_(0.02)
        wt = w.t().contiguous()
        u = vs = None
        if rank:
            u = torch.randn(out_f, rank, generator=gen, device=device, dtype=dtype).mul_(rank ** -0.5)
            vs = torch.randn(in_f, rank, generator=gen, device=device, dtype=dtype).mul_(0.02).t()  # column-major
        layers.append(dict(w=w, wt=wt, scale=wt.float().norm(dim=1), u=u, vs=vs))
    return layers, keep, rank


# ---------------------------------------------------------------- 1. layer
def bench_layer(be: Backend, shapes, sparsities, copies, dtype, rows: list, save=lambda: None) -> dict:
    """Fills ``rows`` (one per shape and sparsity) and calls ``save`` after each: a timeout keeps the rows done."""
    gen = torch.Generator(device=be.device).manual_seed(0)
    for out_f, in_f in shapes:
        for s in sparsities:
            layers, keep_rs, rank = make_copies(out_f, in_f, s, 0.9, copies, be.device, dtype, gen)
            keep_teal = 1.0 - s
            x = torch.randn(1, in_f, generator=gen, device=be.device, dtype=dtype)
            for L in layers:
                L["t_rs"] = rs.calibrate_threshold(x, L["scale"], keep_rs)
                L["t_teal"] = rs.calibrate_threshold(x, None, keep_teal)
            variants = {
                "dense": lambda L: (lambda: F.linear(x, L["w"])),
                "teal": lambda L: (lambda: be.sparse(x, L["wt"], None, L["t_teal"])),
                "rsparse": lambda L: (lambda: be.sparse(x, L["wt"], L["scale"], L["t_rs"], L["u"], L["vs"])),
                "rsparse_unfused": lambda L: (lambda: be.unfused(x, L["wt"], L["scale"], L["t_rs"], L["u"], L["vs"])),
                "teal_memset": lambda L: (lambda: be.sparse(x, L["wt"], None, L["t_teal"], reduction="memset")),
                "rsparse_memset": lambda L: (lambda: be.sparse(x, L["wt"], L["scale"], L["t_rs"], L["u"], L["vs"],
                                                              reduction="memset")),
                # the compacted design with its untuned tiles (kernels/rsparse_compact.py)
                "teal_compact": lambda L: (lambda: be.sparse(x, L["wt"], None, L["t_teal"], config=COMPACT)),
                "rsparse_compact": lambda L: (lambda: be.sparse(x, L["wt"], L["scale"], L["t_rs"], L["u"], L["vs"],
                                                               config=COMPACT)),
            }
            L0 = layers[0]
            if be.cuda and s < 0.99:  # the tile tune_config picks for this shape and kept fraction (decode_layout's)
                tuned = {"teal": rs.tune_config(x, L0["wt"], None, L0["t_teal"]),
                         "rsparse": rs.tune_config(x, L0["wt"], L0["scale"], L0["t_rs"], L0["u"], L0["vs"])}
                variants["teal_tuned"] = lambda L: (lambda: be.sparse(x, L["wt"], None, L["t_teal"],
                                                                      config=tuned["teal"]))
                variants["rsparse_tuned"] = lambda L: (lambda: be.sparse(x, L["wt"], L["scale"], L["t_rs"], L["u"],
                                                                         L["vs"], config=tuned["rsparse"]))
            refs = {"teal": rs.rsparse_reference(x.float(), L0["wt"], None, L0["t_teal"]),
                    "rsparse": rs.rsparse_reference(x.float(), L0["wt"], L0["scale"], L0["t_rs"], L0["u"], L0["vs"])}
            row = {"out": out_f, "in": in_f, "s": s, "rank": rank, "keep_rsparse": keep_rs, "keep_teal": keep_teal,
                   "active_rsparse": float((x.float().abs() * L0["scale"] > L0["t_rs"]).float().mean()),
                   "active_teal": float((x.float().abs() > L0["t_teal"]).float().mean()),
                   "us": {}, "err": {}, "timer": {}, "tuned": tuned if "teal_tuned" in variants else None}
            for name, make in variants.items():
                try:
                    if name != "dense":
                        y = make(L0)()
                        row["err"][name] = rel_err(y, refs["teal" if name.startswith("teal") else "rsparse"])
                        if row["err"][name] > 2e-2:
                            raise AssertionError(f"{name}: rel err {row['err'][name]:.2e} against the reference")
                    row["us"][name], row["timer"][name] = be.time_us(rotating([make(L) for L in layers]))
                except Exception as e:  # noqa: BLE001 -- one broken variant must not hide the others
                    row["us"][name] = None
                    row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                    log(f"  {out_f}x{in_f} s={s} {name}: FAILED {type(e).__name__}: {e}")
            bytes_w = out_f * in_f * torch.finfo(dtype).bits // 8
            if row["us"].get("dense"):
                row["dense_TBps"] = bytes_w / (row["us"]["dense"] * 1e-6) / 1e12
            rows.append(row)
            log_row(row)
            save()
            del layers
    return {"rows": rows}


COMPACT = {"design": "compact"}
COLS = ["teal", "rsparse", "rsparse_unfused", "teal_memset", "rsparse_memset", "teal_compact", "rsparse_compact",
        "teal_tuned", "rsparse_tuned"]


def log_row(row):
    d = row["us"].get("dense")
    cells = [f"{row['out']:>5}x{row['in']:<5}", f"{row['s']:.2f}", f"r={row['rank']:<4}"]
    cells.append(f"dense {d:7.1f} us ({row.get('dense_TBps', 0):.2f} TB/s)" if d else "dense   failed")
    for c in COLS:
        v = row["us"].get(c)
        cells.append(f"{c} {v:7.1f} ({d / v:4.2f}x)" if v and d else f"{c}    failed")
    log(" | ".join(cells))


def print_table(rows, title):
    log(f"\n{title}")
    head = (f"{'shape (out x in)':>17} {'s':>4} {'r':>4} {'dense us':>9} {'TB/s':>5} | {'teal us':>8} {'x':>5} | "
            f"{'rsparse us':>10} {'x':>5} | {'unfused us':>10} {'x':>5} | {'teal-memset':>11} {'x':>5} | "
            f"{'rs-memset':>9} {'x':>5} | {'teal-cmp':>8} {'x':>5} | {'rs-cmp':>8} {'x':>5} | "
            f"{'teal-tuned':>10} {'x':>5} | {'rs-tuned':>8} {'x':>5}")
    log(head)
    log("-" * len(head))
    for row in rows:
        d = row["us"].get("dense")

        def cell(name, w):
            v = row["us"].get(name)
            return f"{v:>{w}.1f} {d / v:>4.2f}x" if v and d else f"{'-':>{w}} {'-':>5}"

        dense = f"{d:>9.1f} {row.get('dense_TBps', 0):>5.2f}" if d else f"{'-':>9} {'-':>5}"
        log(f"{row['out']:>8}x{row['in']:<8} {row['s']:>4.2f} {row['rank']:>4} {dense} | {cell('teal', 8)} | "
            f"{cell('rsparse', 10)} | {cell('rsparse_unfused', 10)} | {cell('teal_memset', 11)} | "
            f"{cell('rsparse_memset', 9)} | {cell('teal_compact', 8)} | {cell('rsparse_compact', 8)} | "
            f"{cell('teal_tuned', 10)} | {cell('rsparse_tuned', 8)}")
        if row.get("tuned"):
            log(f"{'':>17} tuned tiles: teal {row['tuned']['teal']}, rsparse {row['tuned']['rsparse']}")


# ---------------------------------------------------------------- 2. sweep
SWEEP = [(128, 64, 4), (64, 64, 4), (256, 64, 8), (128, 128, 4), (64, 128, 4), (128, 32, 4), (32, 128, 4)]


def bench_sweep(be: Backend, shapes, copies, dtype) -> dict:
    gen = torch.Generator(device=be.device).manual_seed(1)
    rows = []
    for out_f, in_f in shapes:
        layers, _, _ = make_copies(out_f, in_f, 0.5, 1.0, copies, be.device, dtype, gen)
        x = torch.randn(1, in_f, generator=gen, device=be.device, dtype=dtype)
        ts = [rs.calibrate_threshold(x, None, 0.5) for _ in layers]
        res = {}
        for bk, bn, nw in SWEEP:
            cfg = dict(block_k=bk, block_n=bn, num_warps=nw)
            try:
                res[f"{bk}x{bn}w{nw}"] = be.time_us(rotating(
                    [lambda L=L, t=t: be.sparse(x, L["wt"], None, t, config=cfg) for L, t in zip(layers, ts)]))[0]
            except Exception as e:  # noqa: BLE001
                res[f"{bk}x{bn}w{nw}"] = None
                log(f"  sweep {out_f}x{in_f} {bk}x{bn}w{nw}: FAILED {type(e).__name__}: {e}")
        best = min((v, k) for k, v in res.items() if v)
        log(f"sweep TEAL s=0.5 {out_f}x{in_f}: " + " ".join(f"{k}={v:.1f}" for k, v in res.items() if v)
            + f"  -> best {best[1]} ({best[0]:.1f} us; default 128x64w4)")
        rows.append({"out": out_f, "in": in_f, "us": res, "best": best[1]})
        del layers
    return {"rows": rows}


def time_variants(be: Backend, fns: dict, what: str) -> dict:
    """Microseconds per call of each variant (a list of callables, rotated); None where one fails."""
    us = {}
    for name, fl in fns.items():
        try:
            us[name] = be.time_us(rotating(fl))[0]
        except Exception as e:  # noqa: BLE001 -- one broken variant must not hide the others
            us[name] = None
            log(f"  {what} {name}: FAILED {type(e).__name__}: {e}")
    return us


def speedups(us: dict) -> str:
    d = us.get("dense")
    return " ".join(f"{k} {v:.1f} us" + (f" ({d / v:.2f}x)" if d and k != "dense" else "") for k, v in us.items() if v)


# ---------------------------------------------------------------- 2b. fused
def bench_fused(be: Backend, hidden, groups, s, alpha, copies, dtype) -> dict:
    """Projections that read one input, at batch 1: dense (one F.linear over the concatenated W, as HF's fused
    checkpoints or gpt-fast run them), R-Sparse as one call per projection (split design, heuristic tiles; and the
    compacted design), and R-Sparse as one segmented call of the compacted kernels (each projection its own mask,
    threshold and low-rank term) with heuristic and tuned tiles."""
    from importlib import import_module

    rc = import_module(rs.__name__.rsplit(".", 1)[0] + ".rsparse_compact")
    gen = torch.Generator(device=be.device).manual_seed(3)
    rows = []
    for gname, outs in groups.items():
        x = torch.randn(1, hidden, generator=gen, device=be.device, dtype=dtype)
        copies_ = []
        for _ in range(copies):
            parts = [make_copies(o, hidden, s, alpha, 1, be.device, dtype, gen) for o in outs]
            mem = [p[0][0] for p in parts]
            for m, (_, keep, _) in zip(mem, parts):
                m["t"] = rs.calibrate_threshold(x, m["scale"], keep)
            ranks = [p[2] for p in parts]
            copies_.append(dict(
                mem=mem, ranks=ranks, w=torch.cat([m["w"] for m in mem]), wt=torch.cat([m["wt"] for m in mem], 1),
                scale=torch.stack([m["scale"] for m in mem]), ts=[m["t"] for m in mem],
                u=torch.cat([m["u"].reshape(-1) for m in mem if m["u"] is not None]) if sum(ranks) else None,
                vst=(torch.cat([m["vs"].t() for m in mem if m["vs"] is not None], 1).contiguous()
                     if sum(ranks) else None)))
        c0 = copies_[0]

        def seg(c, cfg=None):
            if not be.cuda:
                return rc.rsparse_reference_compact(x, c["wt"], c["scale"], c["ts"], c["u"], c["vst"], outs=outs,
                                                    ranks=c["ranks"])
            return rc.rsparse_gemv_compact(x, c["wt"], c["scale"], c["ts"], c["u"], c["vst"], outs=outs,
                                           ranks=c["ranks"], config=cfg)

        def per_layer(c, cfg=None):
            return [be.sparse(x, m["wt"], m["scale"], m["t"], m["u"], m["vs"], config=cfg) for m in c["mem"]]

        tuned = None
        if be.cuda:
            tuned = rs.fastest(("bench-fused", gname, dtype), lambda cfg: seg(c0, cfg),
                               rc.compact_candidates(sum(outs)), 1e-2)
        ref = rc.rsparse_reference_compact(x.float(), c0["wt"], c0["scale"], c0["ts"], c0["u"], c0["vst"], outs=outs,
                                           ranks=c0["ranks"])
        err = rel_err(seg(c0), ref)
        if err > 2e-2:
            raise AssertionError(f"fused {gname}: rel err {err:.2e} against the reference")
        fns = {"dense": lambda c: F.linear(x, c["w"]), "rsparse_per_layer": per_layer,
               "rsparse_per_layer_compact": lambda c: per_layer(c, COMPACT), "rsparse_fused": seg,
               "rsparse_fused_tuned": lambda c: seg(c, tuned)}
        us = time_variants(be, {name: [lambda c=c, fn=fn: fn(c) for c in copies_] for name, fn in fns.items()},
                           f"fused {gname}")
        rows.append({"group": gname, "outs": outs, "ranks": c0["ranks"], "us": us, "err": err, "tuned": tuned})
        log(f"fused {gname} {outs} <- {hidden} s={s} alpha={alpha} ranks {c0['ranks']}: {speedups(us)}; "
            f"tuned {tuned}")
    return {"rows": rows}


# ---------------------------------------------------------------- 3. batch
def bench_batch(be: Backend, shape, batches, copies, dtype) -> dict:
    gen = torch.Generator(device=be.device).manual_seed(2)
    out_f, in_f = shape
    layers, keep_rs, rank = make_copies(out_f, in_f, 0.5, 0.9, copies, be.device, dtype, gen)
    rows = []
    for b in batches:
        x = torch.randn(b, in_f, generator=gen, device=be.device, dtype=dtype)
        row = {"out": out_f, "in": in_f, "rows": b, "rank": rank, "us": {},
               "union_active_rsparse": float((x.float().abs() * layers[0]["scale"] >
                                              rs.calibrate_threshold(x, layers[0]["scale"], keep_rs)).any(0).float().mean())}
        tr = [rs.calibrate_threshold(x, L["scale"], keep_rs) for L in layers]
        tt = [rs.calibrate_threshold(x, None, 0.5) for L in layers]
        fns = {"dense": [lambda L=L: F.linear(x, L["w"]) for L in layers],
               "teal": [lambda L=L, t=t: be.sparse(x, L["wt"], None, t) for L, t in zip(layers, tt)],
               "rsparse": [lambda L=L, t=t: be.sparse(x, L["wt"], L["scale"], t, L["u"], L["vs"])
                           for L, t in zip(layers, tr)]}
        row["us"] = time_variants(be, fns, f"batch {b}")
        log(f"batch {b} rows {out_f}x{in_f} s=0.5 (union of kept channels {row['union_active_rsparse']:.2f}): "
            + speedups(row["us"]))
        rows.append(row)
    return {"rows": rows}


# ---------------------------------------------------------------- 4. decode
class DenseProj:
    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return F.linear(x, self.w)


class SparseProj:
    """W^T plus (optionally) the low-rank factors; the threshold is calibrated on the first call's input."""

    def __init__(self, be, wt, scale, u, vs, keep, reduction="ticket"):
        self.be, self.wt, self.scale, self.u, self.vs, self.keep = be, wt, scale, u, vs, keep
        self.reduction, self.t, self.record, self.active = reduction, None, False, None

    def __call__(self, x):
        if self.t is None:
            self.t = rs.calibrate_threshold(x, self.scale, self.keep)
        if self.record:
            mag = x.float().abs() * self.scale if self.scale is not None else x.float().abs()
            self.active = float((mag > self.t).float().mean())
        return self.be.sparse(x, self.wt, self.scale, self.t, self.u, self.vs, reduction=self.reduction)


PROJ = ("q", "k", "v", "o", "gate", "up", "down")


class Decoder:
    """Llama-style decoder, batch 1, one token per step, static shapes (graph-capturable)."""

    def __init__(self, be, layers, hidden, ffn, heads, vocab, ctx, dtype, seed=0):
        dev = be.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.hidden, self.heads, self.hd, self.ctx = hidden, heads, hidden // heads, ctx

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device=dev, dtype=dtype).mul_(0.02)

        self.shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
                       "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
        self.layers = [{**{p: DenseProj(rnd(*self.shapes[p])) for p in PROJ},
                        "attn_norm": torch.ones(hidden, device=dev, dtype=dtype),
                        "mlp_norm": torch.ones(hidden, device=dev, dtype=dtype)} for _ in range(layers)]
        self.embed, self.lm_head = rnd(vocab, hidden), rnd(vocab, hidden)
        self.norm = torch.ones(hidden, device=dev, dtype=dtype)
        self.k_cache = torch.zeros(layers, 1, heads, ctx, self.hd, device=dev, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k_cache.normal_(generator=gen)  # a filled context: attention reads real numbers
        self.v_cache.normal_(generator=gen)
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.hd, 2, device=dev, dtype=torch.float32) / self.hd))
        ang = torch.outer(torch.arange(ctx, device=dev, dtype=torch.float32), inv)
        self.cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
        self.sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
        self.positions = torch.arange(ctx, device=dev)

    @staticmethod
    def rmsnorm(x, w, eps=1e-6):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def rope(self, t, cos, sin):
        h = self.hd // 2
        rot = torch.cat([-t[..., h:], t[..., :h]], -1)
        return t * cos + rot * sin

    def step(self, tok, pos):
        """tok, pos: (1,) long tensors on the device. Returns the logits (1, vocab)."""
        h = self.embed[tok]  # (1, hidden)
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for i, L in enumerate(self.layers):
            x = self.rmsnorm(h, L["attn_norm"])
            q = self.rope(L["q"](x).view(1, self.heads, 1, self.hd), cos, sin)
            k = self.rope(L["k"](x).view(1, self.heads, 1, self.hd), cos, sin)
            v = L["v"](x).view(1, self.heads, 1, self.hd)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            h = h + L["o"](a.reshape(1, self.hidden))
            x = self.rmsnorm(h, L["mlp_norm"])
            h = h + L["down"](F.silu(L["gate"](x)) * L["up"](x))
        return F.linear(self.rmsnorm(h, self.norm), self.lm_head)

    def to_sparse(self, be, s, alpha, gen):
        """Dense W -> W^T (one matrix at a time, so peak memory stays ~ one model), column norms, factors."""
        for L in self.layers:
            for p in PROJ:
                out_f, in_f = self.shapes[p]
                keep, rank = rs.rsparse_allocation(in_f, out_f, s, alpha, rank_multiple=RANK_MULTIPLE)
                w = L[p].w
                wt = w.t().contiguous()
                L[p] = None
                del w
                scale = wt.float().norm(dim=1)
                u = vs = None
                if rank:
                    u = torch.randn(out_f, rank, generator=gen, device=be.device, dtype=wt.dtype).mul_(rank ** -0.5)
                    vs = torch.randn(in_f, rank, generator=gen, device=be.device, dtype=wt.dtype).mul_(0.02).t()
                L[p] = SparseProj(be, wt, scale, u, vs, keep)

    def set_mode(self, mode, s):
        """Switch the sparse projections between variants (they share W^T): thresholds are recalibrated."""
        for L in self.layers:
            for p in PROJ:
                P = L[p]
                if not hasattr(P, "full"):
                    P.full = (P.scale, P.u, P.vs, P.keep)
                scale, u, vs, keep = P.full
                if mode == "teal":
                    P.scale, P.u, P.vs, P.keep, P.reduction = None, None, None, 1.0 - s, "ticket"
                else:
                    P.scale, P.u, P.vs, P.keep = scale, u, vs, keep
                    P.reduction = "memset" if mode == "rsparse_memset" else "ticket"
                P.t = None

    def sparse_projs(self):
        return [L[p] for L in self.layers for p in PROJ if isinstance(L[p], SparseProj)]


def time_decode(be, model, steps) -> dict:
    tok = torch.tensor([1], device=be.device)
    pos = torch.tensor([model.ctx - 1], device=be.device)  # the last slot: attention reads the full cache
    model.step(tok, pos)  # eager: calibrates thresholds where needed, creates kernel workspaces
    projs = model.sparse_projs()
    for P in projs:
        P.record = True
    model.step(tok, pos)
    for P in projs:
        P.record = False
    active = None
    if projs:
        weights = [P.wt.numel() for P in projs]
        active = sum(P.active * w for P, w in zip(projs, weights)) / sum(weights)
    if be.cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.step(tok, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model.step(tok, pos)
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1e3
        del graph
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            model.step(tok, pos)
        secs = time.perf_counter() - t0
    return {"tokens_per_s": steps / secs, "ms_per_token": secs / steps * 1e3,
            "weighted_active_channel_fraction": active}


def bench_decode(be, cfg, steps, s, alpha, variants, dtype) -> dict:
    model = Decoder(be, **cfg, dtype=dtype)
    res = {"config": {**cfg, "dtype": str(dtype), "steps": steps, "sparsity": s, "alpha": alpha}, "variants": {}}

    def run(name):
        try:
            res["variants"][name] = r = time_decode(be, model, steps)
            act = r["weighted_active_channel_fraction"]
            log(f"decode {name}: {r['tokens_per_s']:.1f} tok/s ({r['ms_per_token']:.3f} ms/token)"
                + (f", kept channels (weight-averaged) {act:.3f}" if act is not None else ""))
        except Exception as e:  # noqa: BLE001
            res["variants"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"decode {name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()

    if "dense" in variants:
        run("dense")
        r = res["variants"]["dense"]
        if r.get("ms_per_token"):
            # Bytes a dense step must read: every projection and lm_head (the KV cache and norms are extra).
            nbytes = sum(P.w.numel() for L in model.layers for P in (L[p] for p in PROJ)) * model.embed.element_size()
            nbytes += model.lm_head.numel() * model.lm_head.element_size()
            r["weight_gb"] = nbytes / 1e9
            r["weight_TBps"] = nbytes / (r["ms_per_token"] * 1e-3) / 1e12
            log(f"decode dense: {r['weight_gb']:.2f} GB of weights per token -> {r['weight_TBps']:.2f} TB/s")
    model.to_sparse(be, s, alpha, torch.Generator(device=be.device).manual_seed(1))
    if be.cuda:
        torch.cuda.empty_cache()
    for name in ("rsparse", "teal", "rsparse_memset"):
        if name in variants:
            model.set_mode(name, s)
            run(name)
    dense = res["variants"].get("dense", {}).get("tokens_per_s")
    for name, r in res["variants"].items():
        if name != "dense" and dense and r.get("tokens_per_s"):
            r["speedup_vs_dense"] = r["tokens_per_s"] / dense
            log(f"decode {name} / dense = {r['speedup_vs_dense']:.3f}")
    if be.cuda:
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        log(f"decode peak memory {res['peak_memory_gb']:.1f} GB")
    return res


class RandomFactors:
    """Stands in for llmx.sparse.SVDCache: random rank-r factors (an SVD of 224 8B-sized matrices would take
    longer than the benchmark; the decode time does not depend on the factors being singular vectors)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def get(self, name, weight, rank):
        g = torch.Generator(device=weight.device).manual_seed(self.seed + len(name))
        out_f, in_f = weight.shape
        u = torch.randn(out_f, rank, generator=g, device=weight.device, dtype=torch.float32) / rank**0.5
        svt = 0.02 * torch.randn(rank, in_f, generator=g, device=weight.device, dtype=torch.float32)
        return u.to(weight.dtype), svt.to(weight.dtype)


def bench_hf(be, cfg, new_tokens, s, alpha, dtype, res: dict, save=lambda: None) -> dict:
    """5. hf: the product path end to end. An HF LlamaForCausalLM (random weights) decodes greedily through
    llmx.sparse.evaluate.decode_speed -- static KV cache, the step compiled whole (CUDA graphs on CUDA) -- dense,
    then with every projection TEAL (uniform s) and R-Sparse (uniform s, alpha) through llmx.sparse.apply_plan and
    RSparseLinear.decode_layout(), i.e. the fused kernel inside the layers. Thresholds from llmx.sparse.calibrate
    on random token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmx.sparse import apply_plan, calibrate, layer_shapes, remove_sparsity, uniform_plan
    from llmx.sparse.evaluate import decode_speed
    from llmx.sparse.rsparse import fuse_shared_inputs

    config = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
                         num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                         vocab_size=cfg["vocab"], max_position_embeddings=4096, rope_theta=500000.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the compute dtype: an fp32 8B model would not fit beside it
    try:
        with torch.device(be.device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(0)
    calib = calibrate(model, [torch.randint(0, cfg["vocab"], (1, 128), generator=g) for _ in range(2)])
    prompt = torch.randint(0, cfg["vocab"], (1, 32), generator=g)
    shapes = layer_shapes(model)
    res.update(config={**cfg, "dtype": str(dtype), "new_tokens": new_tokens, "sparsity": s, "alpha": alpha},
               variants={})  # filled in place and saved after each variant: a timeout keeps the variants done
    for name, a, fuse in (("dense", None, False), ("teal", 1.0, True), ("rsparse_fused", alpha, True),
                          ("rsparse", alpha, False)):
        layers = {}
        if a is not None:
            layers = apply_plan(model, calib, uniform_plan(shapes, s, a), token_mode="decode", svd=RandomFactors())
            for layer in layers.values():
                layer.decode_layout()
            if fuse:  # TEAL: q/k/v and gate/up one launch each (its gpt-fast path); R-Sparse: one segmented call each
                fuse_shared_inputs(model)
        t0 = time.perf_counter()
        r = decode_speed(model, prompt, new_tokens, repeats=3)
        r.pop("tokens")
        r.update(kernel=any(layer.kernel for layer in layers.values()), seconds_with_warmup=time.perf_counter() - t0)
        res["variants"][name] = r
        save()
        log(f"hf {name}: {r['tokens_per_s']:.1f} tok/s (compiled {r['compiled']}, kernel {r['kernel']})")
        remove_sparsity(model)
    dense = res["variants"]["dense"]["tokens_per_s"]
    for name, r in res["variants"].items():
        r["speedup_vs_dense"] = r["tokens_per_s"] / dense
    log("hf: " + ", ".join(f"{n} {r['speedup_vs_dense']:.3f}x" for n, r in res["variants"].items()))
    if be.cuda:
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return res


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (required on CPU: reference path only)")
    ap.add_argument("--sections", default="layer,fused,decode,hf,sweep,batch")
    ap.add_argument("--copies", type=int, default=4, help="weight copies rotated per timing (>= 4 defeats L2)")
    ap.add_argument("--steps", type=int, default=100, help="decode steps timed")
    ap.add_argument("--decode-variants", default="dense,rsparse,teal,rsparse_memset")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--hf-layers", type=int, default=32, help="hf section: decoder layers of the Llama-3-8B shape")
    ap.add_argument("--hf-tokens", type=int, default=128, help="hf section: tokens decoded per timing")
    args = ap.parse_args()
    if args.device == "cpu" and not args.smoke:
        ap.error("on CPU only --smoke runs (the PyTorch reference at tiny shapes)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device")
    be = Backend(args.device)
    dtype = torch.bfloat16
    if args.smoke:
        global RANK_MULTIPLE
        RANK_MULTIPLE = 1  # the tiny shapes' ranks are 1-2
        shapes, decode_cfg = [(96, 64), (160, 64), (64, 160)], dict(layers=2, hidden=64, ffn=172, heads=4, vocab=256,
                                                                       ctx=32)
        hf_cfg = dict(layers=2, hidden=64, ffn=160, heads=4, kv_heads=2, vocab=256)
        steps = min(args.steps, 5)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    else:
        shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
        decode_cfg = dict(layers=32, hidden=4096, ffn=11008, heads=32, vocab=32000, ctx=512)
        hf_cfg = dict(layers=args.hf_layers, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256)  # Llama-3-8B
        steps = args.steps
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
           "smoke": args.smoke, "kernel_module": rs.__file__}
    if args.device == "cuda":
        import triton
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sms=props.multi_processor_count, triton=triton.__version__,
                   cuda=torch.version.cuda)
    log("env " + json.dumps(env))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {"env": env, "errors": {}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("rsparse_kernels" + ("_smoke" if args.smoke else "") + f"_{args.device}.json")
    t_start = time.perf_counter()

    def save():
        path.write_text(json.dumps(results, indent=2, default=str))

    for sec in sections:
        t0 = time.perf_counter()
        log(f"\n=== {sec}")
        try:
            if sec == "layer":
                results[sec] = {"rows": []}  # s = 0.99: the fixed cost
                bench_layer(be, shapes, (0.5, 0.7, 0.99), args.copies, dtype, results[sec]["rows"], save)
                print_table(results[sec]["rows"], f"per-layer, batch 1, {str(dtype)[6:]}, {env.get('gpu', 'cpu')} "
                            f"(timer: {results[sec]['rows'][0]['timer'].get('dense', '?')}); x = speed-up vs dense")
            elif sec == "sweep":
                results[sec] = bench_sweep(be, shapes, args.copies, dtype)
            elif sec == "fused":
                hidden = shapes[0][1]
                groups = {"qkv": [hidden, hidden // 4, hidden // 4], "gate_up": [shapes[1][0], shapes[1][0]]}
                results[sec] = bench_fused(be, hidden, groups, 0.5, 0.95, args.copies, dtype)
            elif sec == "batch":
                results[sec] = bench_batch(be, shapes[0], (4, 8), args.copies, dtype)
            elif sec == "hf":
                results[sec] = {}
                bench_hf(be, hf_cfg, 8 if args.smoke else args.hf_tokens, 0.5, 0.95, dtype, results[sec], save)
            elif sec == "decode":
                variants = [v.strip() for v in args.decode_variants.split(",")]
                results[sec] = bench_decode(be, decode_cfg, steps, 0.5, 0.9, variants, dtype)
            else:
                raise ValueError(f"unknown section {sec!r}")
        except Exception as e:  # noqa: BLE001 -- report, then run the next section
            results["errors"][sec] = f"{type(e).__name__}: {e}"
            log(f"section {sec} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        log(f"=== {sec}: {time.perf_counter() - t0:.1f} s")
        if be.cuda:
            torch.cuda.empty_cache()
        save()  # after every section (and within layer and hf, after every row): a timeout keeps what is done
    log(f"\nwrote {path} ({time.perf_counter() - t_start:.1f} s); errors: {results['errors'] or 'none'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
