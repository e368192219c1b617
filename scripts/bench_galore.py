"""Benchmarks of GaLore 2 in llmx: optimizer-state memory, subspace refresh, optimizer step, convergence.

    .venv/bin/python scripts/bench_galore.py [--device cpu|cuda] [--sections memory,svd,step,convergence]
                                             [--out outputs/bench]

Every ratio is measured against a baseline in the same run.
1. memory: optimizer state per rank under FSDP2 at 1, 8 and 64 ranks for every Llama preset: llmx's
   trainer setup (parallelize, the recipe's optimizer, one step) run on the meta-device model in a fake
   process group (llmx.optim.galore.memory), so the bytes are those llmx allocates: each galore2_*
   recipe against its adamw_* twin (goal: <= 0.5 at 8 and 64 ranks). Also the element ratio (the GaLore
   paper's convention) and the refresh's transient buffer (one full fp32 gradient on its owner rank).
2. svd: subspace refresh on the 4096x11008 and 4096x4096 shapes of Llama 7B at rank 1024, on REAL
   gradients: a one-layer model with the 7B layer shapes is trained 3 AdamW steps on the pydoc corpus
   (bytes as tokens), then the gradients of mlp.down_proj and self_attn.q_proj over 16 x 256 tokens are taken. Exact fp32 SVD against llmx's
   randomized range finder and torch.svd_lowrank, in time and in captured energy (fraction of the exact
   top-r energy; the reference singular values in float64 by an explicit QR-based driver, and no
   orthonormal basis may exceed 1). Also what a bf16-stored basis keeps, and each projection precision's
   error (ieee / bf16 as computed here, tf32 emulated by rounding the operands).
2b. refresh (CPU): one refresh of 8 row-sharded weights on 2 gloo processes, llmx's owner-rank refresh
   against every rank computing every basis (the design before it).
3. step: steady-state optimizer step (no refresh) for the 7 weight matrices of one decoder layer: llmx
   GaLoreAdamW at each projection precision (ieee, tf32 on CUDA, bf16 with a bf16 basis), PyTorch and
   fused Triton paths, against galore-torch's GaLoreAdamW and torch's fused AdamW (full rank). CPU: the
   350M layer (1024 / 2736) at rank 256; CUDA: the 7B layer (4096 / 11008) at rank 1024 (goals: <= 1.0x
   fused AdamW with bf16, <= 1.3x with tf32).
4. convergence: galore2_tiny against AdamW (pretrain_tiny) on the same data (the pylib corpus) and steps:
   AdamW with one global lr, AdamW with the attention / MLP matrices at their own lr (optim.lr_scales, as
   GaLore's alpha gives them theirs), GaLore 2 at rank 32 (lr and alpha tuned), and GaLore at full rank
   (the control without the low rank, at GaLore 2's setting). Tuned on one seed, the best runs on other seeds; validation loss
   mean +- standard error and per-seed ratios (goal: GaLore 2 within 3% of the best AdamW, chosen on the
   tuning seed). layerwise: peak resident memory (VmHWM on CPU) of GaLore with
   and without optimizer-in-backward on a 311M-parameter model (layer-wise mode frees each gradient at once).
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

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}  # size -> galore2 recipe rank


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------- 1. memory
def bench_memory(worlds=(1, 8, 64)) -> dict:
    """Optimizer state per rank under FSDP2: llmx's trainer setup run on the meta-device model in a fake
    world of W ranks (llmx.optim.galore.memory), each galore2_llama* recipe against its adamw_llama*
    twin; bytes as llmx allocates them (fp32 moments, bases in the recipe's basis_dtype)."""
    from llmx.config.compose import compose
    from llmx.models import build_model
    from llmx.optim.galore.memory import optimizer_state_per_rank

    rows = []
    for size, rank in PRESETS.items():
        cfgs = {"galore": compose([f"recipe=galore2_llama{size}"]), "adamw": compose([f"recipe=adamw_llama{size}"])}
        for world in worlds:
            got = {k: optimizer_state_per_rank(lambda c=c: build_model(c.model, device="meta"), c.optim, world)
                   for k, c in cfgs.items()}
            g, a = got["galore"], got["adamw"]
            rows.append({"preset": size, "rank": rank, "world_size": world, "basis_dtype":
                         str(cfgs["galore"].optim.basis_dtype and cfgs["galore"].optim.basis_dtype.value),
                         "adamw_gb": a["state"] / 1e9, "galore_gb": g["state"] / 1e9,
                         "galore_moments_gb": g["moments"] / 1e9, "galore_bases_gb": g["bases"] / 1e9,
                         "galore_over_adamw": g["state"] / a["state"],
                         "refresh_transient_gb": g["largest_grad"] / 1e9,
                         # the GaLore paper's convention: state elements (2 bytes each in bf16)
                         "elements_ratio": (g["moments_elements"] + g["bases_elements"]) / a["moments_elements"]})
            log(f"memory {size} W={world}: GaLore {g['state'] / 1e9:.3f} GB / AdamW {a['state'] / 1e9:.3f} GB "
                f"= {rows[-1]['galore_over_adamw']:.3f}")
    return {"rows": rows}


# ---------------------------------------------------------------- 2. svd
def real_gradients(device: str) -> dict:
    """Gradients of a one-layer model with Llama-7B layer shapes after a few AdamW steps on real text.

    The text is the embedded pydoc corpus read as UTF-8 bytes (a 256-symbol vocabulary): real language
    statistics with no tokenizer, Hydra or datasets needed, so the same code runs on a bare GPU image.
    """
    import gzip

    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = REPO / "llmx" / "data" / "corpus" / "pydoc_topics.jsonl.gz"
    text = "\n".join(json.loads(line)["text"] for line in gzip.open(corpus, "rt"))
    ids = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()
    seq, batch = 256, 4
    blocks = ids[: (len(ids) // seq) * seq].view(-1, seq)
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=seq)
    model = LlamaForCausalLM(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        x = blocks[step * batch:(step + 1) * batch].to(device)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # The measured gradient sums over 16 x 256 tokens: a weight gradient is a sum of one outer product
    # per token, so with fewer tokens than the rank (1024) any rank-1024 basis would hold all of it.
    for i in range(4):
        x = blocks[(3 + i) * batch:(4 + i) * batch].to(device)
        model(input_ids=x, labels=x).loss.backward()
    layer = model.model.layers[0]
    return {"4096x11008 (mlp.down_proj)": layer.mlp.down_proj.weight.grad.float().clone(),
            "4096x4096 (self_attn.q_proj)": layer.self_attn.q_proj.weight.grad.float().clone()}


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10-bit mantissa (to nearest, ties away from zero): what the tensor cores
    multiply, for measuring TF32's error on a machine without them."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & -0x2000).view(torch.float32)


def orthonormality_error(basis: torch.Tensor, side: str) -> float:
    b = basis.double() if side == "right" else basis.double().T  # r x d, rows meant orthonormal
    return float((b @ b.T - torch.eye(b.shape[0], dtype=torch.float64, device=b.device)).abs().max())


def projection_errors(g64: torch.Tensor, basis: torch.Tensor, side: str, device: str) -> dict:
    """Relative Frobenius error of the low-rank gradient computed with each `precision` against float64:
    ieee and bf16 as llmx computes them on this device, tf32 emulated (operands rounded, then float64)."""
    from llmx.optim.galore.projector import matmul

    def low(a, b):
        return (b.T @ a) if side == "left" else (a @ b.T)

    g32, b32 = g64.float(), basis.float()
    ref = low(g64, b32.double())
    err = {}
    for prec in ("ieee", "bf16"):
        got = matmul(b32.T, g32, prec) if side == "left" else matmul(g32, b32.T, prec)
        err[prec] = float((got.double() - ref).norm() / ref.norm())
    err["tf32 (emulated)"] = float((low(_round_tf32(g32).double(), _round_tf32(b32).double()) - ref).norm()
                                   / ref.norm())
    return err


def bench_svd(device: str, ranks=(1024, 128)) -> dict:
    """Rank 1024 is the 7B recipe's; on these gradients it holds essentially all the energy (a weight
    gradient is a sum of per-token outer products, and real ones are close to low rank: GaLore's premise),
    so rank 128 is measured too, where the energy left outside the subspace tells the methods apart."""
    from llmx.optim.galore import GaLoreProjector

    log("svd: computing real gradients (one 7B-shaped layer, 3 AdamW steps)")
    grads = real_gradients(device)
    rows = []
    for name, g in grads.items():
        # The exact fp32 SVD (GaLore 1's refresh, the default driver) is what is timed. The denominator of
        # every captured-energy figure (the sum of the top-r squared singular values) comes from a
        # separate float64 SVD with the QR-based driver: on CUDA the default driver may be iterative, and
        # an inexact denominator once gave "energies" of 1.0012.
        sync(device)
        t = time.perf_counter()
        torch.linalg.svd(g, full_matrices=False)
        sync(device)
        t_exact = time.perf_counter() - t
        if device == "cuda":
            t_exact = min(t_exact, timed(lambda: torch.linalg.svd(g, full_matrices=False), device))
        S = torch.linalg.svdvals(g.double(), driver="gesvd" if device == "cuda" else None)
        g64 = g.double()
        for rank in ranks:
            top = float(S[:rank].square().sum())

            def energy(basis: torch.Tensor, side: str) -> float:
                """Captured energy of the subspace a basis spans, in float64. The basis is orthonormalised
                first (QR): an fp32 basis is orthonormal only to about 1e-6, enough to push a near-1
                energy over 1, and the subspace is what the refresh is judged by. Cannot exceed 1."""
                q = torch.linalg.qr(basis.double() if side == "left" else basis.double().T).Q
                low = q.T @ g64 if side == "left" else g64 @ q
                e = float(low.square().sum()) / top
                assert e <= 1 + 1e-9, f"captured energy {e} > 1: the reference is not exact"
                return e

            variants = {}
            for label, kw in [("llmx randomized, 0 power iterations", dict(power_iters=0)),
                              ("llmx randomized, 1 power iteration", dict(power_iters=1)),
                              ("llmx randomized, 2 power iterations", dict(power_iters=2))]:
                proj = GaLoreProjector(rank, proj_type="std", svd="randomized", oversample=10, **kw)
                secs = timed(lambda: proj.refresh(g, 0), device)
                variants[label] = {"seconds": secs, "speedup": t_exact / secs,
                                   "energy": energy(proj.basis()["P"], proj.side)}
            # torch.svd_lowrank as a second randomized baseline (q = r + 10, niter = 2), on the smaller side
            mat = g.T if g.shape[0] >= g.shape[1] else g
            secs = timed(lambda: torch.svd_lowrank(mat, q=rank + 10, niter=2), device)
            U = torch.svd_lowrank(mat, q=rank + 10, niter=2)[0][:, :rank]
            side = "right" if g.shape[0] >= g.shape[1] else "left"
            variants["torch.svd_lowrank(q=r+10, niter=2)"] = {
                "seconds": secs, "speedup": t_exact / secs, "energy": energy(U.T if side == "right" else U, side)}
            exact = GaLoreProjector(rank, proj_type="std", svd="exact")
            exact.refresh(g, 0)
            total = float(S.square().sum())
            rows.append({"gradient": name, "rank": rank, "exact_seconds": t_exact,
                         "exact_energy": energy(exact.basis()["P"], exact.side),
                         # storing the exact basis in bf16 (optim.basis_dtype=bf16): the subspace it spans,
                         # and how far from orthonormal it is (max |P P^T - I|, which scales the update)
                         "exact_bf16_basis_energy": energy(exact.basis()["P"].bfloat16(), exact.side),
                         "bf16_basis_orthonormality_error": orthonormality_error(exact.basis()["P"].bfloat16(),
                                                                                 exact.side),
                         "projection_error": projection_errors(g64, exact.basis()["P"], exact.side, device),
                         "top_r_energy_fraction_of_total": top / total, "variants": variants})
            log(f"svd {name} r={rank}: exact {t_exact:.2f}s; " + "; ".join(
                f"{k}: {v['seconds']:.3f}s ({v['speedup']:.0f}x) energy {v['energy']:.5f}" for k, v in variants.items()))
    return {"rows": rows}


# ---------------------------------------------------------------- 2b. refresh under FSDP
REFRESH_WORKER = r"""
import json, sys, time
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from llmx.optim.galore.fsdp import refresh, shard_view
from llmx.optim.galore.projector import GaLoreProjector

out, params, m, n, rank, svd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
g = torch.Generator().manual_seed(0)
views = []
for i in range(params):
    p = distribute_tensor(torch.zeros(m, n), mesh, [Shard(0)])
    p.grad = distribute_tensor(torch.randn(m, n, generator=g), mesh, [Shard(0)])
    views.append(shard_view(p))

def fresh():
    return [GaLoreProjector(rank, "std", svd=svd, seed=i) for i in range(params)]

times = {"owner rank (llmx)": [], "every rank computes every basis": []}
for _ in range(2):
    projs = fresh()
    dist.barrier(); t = time.perf_counter()
    refresh([(pr, v, 0) for pr, v in zip(projs, views)])
    dist.barrier(); times["owner rank (llmx)"].append(time.perf_counter() - t)
    projs = fresh()
    dist.barrier(); t = time.perf_counter()
    for pr, v in zip(projs, views):
        pr.refresh(v.full_grad(), 0)
    dist.barrier(); times["every rank computes every basis"].append(time.perf_counter() - t)
if dist.get_rank() == 0:
    json.dump({k: min(v) for k, v in times.items()}, open(out, "w"))
dist.destroy_process_group()
"""


def bench_refresh_dist(nproc: int = 2, params: int = 8, m: int = 2048, n: int = 1024, rank: int = 256,
                       svd: str = "exact") -> dict:
    """Wall time of one refresh of `params` row-sharded m x n weights on `nproc` CPU processes (gloo, one
    thread each): llmx's owner-rank refresh (each basis computed once, by one rank, the ranks in parallel)
    against every rank computing every basis from the all-gathered gradient (the design it replaced)."""
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "worker.py", Path(tmp) / "out.json"
        script.write_text(REFRESH_WORKER)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(out), str(params), str(m), str(n), str(rank), svd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"refresh worker failed:\n{proc.stderr[-3000:]}")
        times = json.loads(out.read_text())
    base = times["every rank computes every basis"]
    log("refresh under FSDP: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    return {"nproc": nproc, "params": params, "shape": [m, n], "rank": rank, "svd": svd, "seconds": times,
            "speedup": base / times["owner rank (llmx)"]}


# ---------------------------------------------------------------- 3. step
def layer_weights(hidden: int, inter: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden), ("o", hidden, hidden),
              ("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]
    params = []
    for _, m, n in shapes:
        p = torch.nn.Parameter(torch.randn(m, n, generator=g).mul_(0.02).to(device))
        p.grad = torch.randn(m, n, generator=g).mul_(1e-3).to(device)
        params.append(p)
    return params


def bench_step(device: str) -> dict:
    from llmx.optim import GaLoreAdamW

    hidden, inter, rank = (4096, 11008, 1024) if device == "cuda" else (1024, 2736, 256)
    group = {"rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    results = {}

    def run(make_opt, label, steps=10):
        params = layer_weights(hidden, inter, device)
        opt = make_opt(params)
        opt.step()  # the first step computes the subspace (not steady state)
        times = []
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t)
        results[label] = statistics.median(times)
        log(f"step {label}: {results[label] * 1e3:.2f} ms")

    run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), "torch AdamW (fused, full rank)")
    for prec in ("ieee", "tf32", "bf16") if device == "cuda" else ("ieee", "bf16"):
        kw = {**group, "precision": prec, "basis_dtype": "bf16" if prec == "bf16" else None}
        run(lambda ps: GaLoreAdamW([{"params": ps, **kw}], lr=1e-3), f"llmx GaLoreAdamW {prec}")
        if device == "cuda":
            run(lambda ps: GaLoreAdamW([{"params": ps, **kw}], lr=1e-3, fused=True),
                f"llmx GaLoreAdamW {prec} (fused Triton)")
    try:
        from galore_torch import GaLoreAdamW as RefGaLore

        run(lambda ps: RefGaLore([{"params": ps, **group}], lr=1e-3), "galore-torch GaLoreAdamW")
    except ImportError as e:
        log(f"galore-torch unavailable: {e}")
    base = results["torch AdamW (fused, full rank)"]
    out = {"shape": {"hidden": hidden, "intermediate": inter, "rank": rank},
           "ms": {k: v * 1e3 for k, v in results.items()},
           "over_fused_adamw": {k: v / base for k, v in results.items()}}
    if device == "cuda":
        out["fused_tiles"] = sweep_fused_tiles(hidden, inter, rank)
    return out


# Candidate (block_m, block_n, block_k, num_warps, num_stages) for the tensor-core precisions; the kernel's
# defaults (_tiles) are untuned starting points.
# Six, to keep scripts/device_check.sh within its time (each is a Triton compile per shape and precision).
TILE_CANDIDATES = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
                   (128, 256, 64, 8, 3), (128, 128, 64, 4, 4)]


def sweep_fused_tiles(hidden: int, inter: int, rank: int, device: str = "cuda", candidates=None) -> dict:
    """Time the fused step per tile shape at the 7B layer's two projected shapes (down_proj: left,
    gate/up: right) for tf32 and bf16 (bf16 basis), against the same step through cuBLAS (the PyTorch
    path): the measurement that says whether the fused kernel is worth its place, and with which tiles."""
    from llmx.kernels.galore_step import galore_adam_step_fused
    from llmx.optim.galore.projector import matmul

    rows = []
    g = torch.Generator().manual_seed(0)
    for (m, n), side in (((inter, hidden), "right"), ((hidden, inter), "left")):
        w = torch.randn(m, n, generator=g).mul_(0.02).to(device)
        grad = torch.randn(m, n, generator=g).mul_(1e-3).to(device)
        q = torch.linalg.qr(torch.randn(m if side == "left" else n, rank, generator=g)).Q  # orthonormal columns
        basis32 = (q if side == "left" else q.T).contiguous().to(device)
        low_shape = (rank, n) if side == "left" else (m, rank)
        for prec in ("tf32", "bf16"):
            basis = basis32.bfloat16() if prec == "bf16" else basis32
            ma, va = torch.zeros(low_shape, device=device), torch.zeros(low_shape, device=device)

            def cublas():  # the PyTorch path's two GEMMs and elementwise Adam, same precision
                low = matmul(basis.T, grad, prec) if side == "left" else matmul(grad, basis.T, prec)
                ma.mul_(0.9).add_(low, alpha=0.1)
                va.mul_(0.999).addcmul_(low, low, value=0.001)
                upd = ma / va.sqrt().add_(1e-6)
                if prec == "bf16":
                    w.add_(matmul(basis, upd, prec) if side == "left" else matmul(upd, basis, prec), alpha=-1e-6)
                else:
                    w.addmm_(basis, upd, alpha=-1e-6) if side == "left" else w.addmm_(upd, basis, alpha=-1e-6)

            times = {"cublas": timed(cublas, device, repeats=10)}
            for tiles in [None, *(TILE_CANDIDATES if candidates is None else candidates)]:
                def fused(tiles=tiles):
                    galore_adam_step_fused(w, grad, basis, side, ma, va, step=10, lr=1e-6, beta1=0.9, beta2=0.999,
                                           eps=1e-6, scale=0.25, weight_decay=0.0, precision=prec, tiles=tiles)
                try:
                    fused()  # compile
                    times["default" if tiles is None else str(tiles)] = timed(fused, device, repeats=10)
                except Exception as e:  # a tile shape that does not fit the shared memory
                    log(f"tiles {tiles}: {type(e).__name__}: {str(e)[:120]}")
            best = min((k for k in times if k != "cublas"), key=times.get)
            rows.append({"shape": [m, n], "side": side, "precision": prec, "ms": {k: v * 1e3 for k, v in times.items()},
                         "best_tiles": best, "best_over_cublas": times[best] / times["cublas"]})
            log(f"tiles {m}x{n} {side} {prec}: cuBLAS {times['cublas'] * 1e3:.3f} ms, default fused "
                f"{times.get('default', float('nan')) * 1e3:.3f} ms, best {best} {times[best] * 1e3:.3f} ms")
    return {"rows": rows}


# ---------------------------------------------------------------- 4. convergence
def llmx_run(args, run_dir: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "llmx", "run", *args, f"hydra.run.dir={run_dir}", "logger.progress=false",
           "trainer.export_hf=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads((run_dir / "final.json").read_text())


def _mean_se(xs) -> tuple:
    mean = statistics.fmean(xs)
    return mean, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


# galore2_tiny's optim.targets: the weights GaLore projects, and those the per-group AdamW gives its own lr.
MATRICES = ("*self_attn.*_proj.weight", "*mlp.*_proj.weight")


def full_rank(recipe: str) -> int:
    """The rank at which GaLore projects nothing away for this recipe: min(m, n) of every targeted matrix,
    read from the composed model (refused unless all are equal, so one optim.rank is full for each)."""
    import fnmatch

    from llmx.config.compose import compose
    from llmx.models import build_model

    cfg = compose([f"recipe={recipe}"])
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.tokenizer.vocab_size, device="meta")
    sides = {min(p.shape) for n, p in model.named_parameters()
             if p.ndim == 2 and any(fnmatch.fnmatch(n, pat) for pat in cfg.optim.targets)}
    if len(sides) != 1:
        raise SystemExit(f"{recipe}: targeted matrices have different min(m, n) {sorted(sides)}; no single full rank")
    return sides.pop()


def method_overrides(method: dict, setting: dict) -> list:
    """A method's overrides at one setting. AdamW's lr_scales are always written out (1.0 for one global lr),
    so that whatever the recipe sets cannot leak in; the composed result is checked by check_methods."""
    out = [f"recipe={method['recipe']}", *method.get("overrides", []), f"optim.lr={setting['lr']:g}"]
    if "alpha" in setting:
        out.append(f"optim.scale={setting['alpha']:g}")
    if method["recipe"] == "pretrain_tiny":
        scale = setting.get("matrix_lr", setting["lr"]) / setting["lr"]
        out.append("++optim.lr_scales={" + ",".join(f"{pat}:{scale:.6g}" for pat in MATRICES) + "}")
    return out


def check_methods(methods) -> None:
    """Each method, composed as it will run, trains what its label says (checked before any run)."""
    from llmx.config.compose import compose

    for m in methods:
        setting = {k: v[0] for k, v in m["axes"].items()} if "axes" in m else {"lr": 1e-2}
        o = compose(method_overrides(m, setting)).optim
        if m["recipe"] == "pretrain_tiny":
            scale = setting.get("matrix_lr", setting["lr"]) / setting["lr"]
            ok = o.name == "adamw" and set(o.lr_scales) == set(MATRICES) and all(
                abs(v - scale) <= 1e-5 * scale for v in o.lr_scales.values())
        else:
            ok = (not o.lr_scales and tuple(o.targets) == MATRICES
                  and (o.rank, getattr(o.svd, "value", o.svd)) == m["expect"])
        if not ok:
            raise SystemExit(f"convergence method {m['label']}: the composed optim config is not what the method "
                             f"claims: {dict(o)}")


def tune(run, axes: dict) -> dict:
    """Every point of the grid `axes` (name -> values) through run(setting) -> val loss. If the best point
    is at an edge of an axis, that edge is extended by one value (about the grid's own ratio) and the new
    points are run too; an optimum still at an edge is reported as such."""
    import itertools

    axes = {k: list(v) for k, v in axes.items()}
    losses = {}

    def run_grid():
        for point in itertools.product(*axes.values()):
            if point not in losses:
                losses[point] = run(dict(zip(axes, point)))

    run_grid()
    best = min(losses, key=losses.get)
    extended = []
    for i, (name, values) in enumerate(axes.items()):
        if len(values) > 1 and best[i] == max(values):
            values.append(float(f"{values[-1] ** 2 / values[-2]:.1g}"))
            extended.append(f"{name} up to {values[-1]:g}")
        elif len(values) > 1 and best[i] == min(values):
            values.insert(0, float(f"{values[0] ** 2 / values[1]:.1g}"))
            extended.append(f"{name} down to {values[0]:g}")
    if extended:
        run_grid()
        best = min(losses, key=losses.get)
    at_edge = [name for i, (name, values) in enumerate(axes.items())
               if len(values) > 1 and best[i] in (min(values), max(values))]
    return {"axes": axes, "grid": [{**dict(zip(axes, p)), "val_loss": v} for p, v in losses.items()],
            "best": dict(zip(axes, best)), "extended": extended, "best_at_edge": at_edge}


def bench_convergence(adamw_lrs, adamw_other_lrs, adamw_matrix_lrs, galore_lrs, galore_alphas, tune_seed: int,
                      seeds) -> dict:
    """AdamW, AdamW with its own lr for the attention / MLP matrices, GaLore 2 at rank 32, and the same GaLore
    at full rank (the control that removes the low rank): same model, data and steps. Every lr is tuned on
    tune_seed; GaLore 2 is tuned on two axes like the per-group AdamW (lr, which the embeddings and norms
    take, and alpha, which scales the projected matrices' updates); the full-rank control is run at GaLore
    2's tuned setting (not tuned: it must differ from GaLore 2 in nothing but the rank), then every method's
    setting runs on the report seeds (never the tuning seed): validation loss mean +- standard error, and
    per-seed ratios."""
    full = full_rank("galore2_tiny")
    methods = [
        {"label": "adamw", "recipe": "pretrain_tiny", "axes": {"lr": adamw_lrs},
         "about": "pretrain_tiny, one global lr"},
        {"label": "adamw_per_group", "recipe": "pretrain_tiny",
         "axes": {"lr": adamw_other_lrs, "matrix_lr": adamw_matrix_lrs},
         "about": "pretrain_tiny; lr: embeddings, norms, lm_head; matrix_lr: attention and MLP matrices "
                  "(optim.lr_scales)"},
        {"label": "galore2_r32", "recipe": "galore2_tiny", "axes": {"lr": galore_lrs, "alpha": galore_alphas},
         "expect": (32, "randomized"), "about": "galore2_tiny: rank 32, T 50, randomized SVD; lr and alpha tuned"},
        {"label": "galore_full_rank", "recipe": "galore2_tiny", "overrides": [f"optim.rank={full}", "optim.svd=exact"],
         "setting_of": "galore2_r32", "expect": (full, "exact"),
         "about": f"galore2_tiny at rank {full} = min(m, n) of every projected matrix, exact SVD, "
                  "GaLore 2's tuned lr and alpha"},
    ]
    check_methods(methods)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def run(m, setting, seed):
            tag = "_".join(f"{k}{v:g}" for k, v in setting.items())
            final = llmx_run([*method_overrides(m, setting), f"seed={seed}"], tmp / f"{m['label']}_{tag}_s{seed}")
            log(f"convergence: {m['label']} {setting} seed {seed}{' (tuning)' if seed == tune_seed else ''}: "
                f"val {final['val_loss']:.4f} ({final['train_time_s']:.0f} s training)")
            return final

        for m in methods:
            row = {"recipe": m["recipe"], "about": m["about"], "overrides": m.get("overrides", [])}
            if "axes" in m:
                row["tuning"] = tune(lambda setting: run(m, setting, tune_seed)["val_loss"], m["axes"])
                setting = row["tuning"]["best"]
            else:
                setting = rows[m["setting_of"]]["setting"]
            row["setting"], row["command"] = setting, "llmx run " + " ".join(method_overrides(m, setting))
            row["val_loss"] = {}
            for seed in seeds:
                final = run(m, setting, seed)
                row["val_loss"][seed], steps = final["val_loss"], final["step"]
            row["mean"], row["se"] = _mean_se(list(row["val_loss"].values()))
            rows[m["label"]] = row
    adamws = [k for k in rows if k.startswith("adamw")]
    # The best AdamW variant is chosen on the tuning seed, like every other setting here.
    best_adamw = min(adamws, key=lambda k: min(g["val_loss"] for g in rows[k]["tuning"]["grid"]))
    ratios = {}
    for num, den in [*(("galore2_r32", a) for a in adamws), ("galore_full_rank", best_adamw),
                     ("galore_full_rank", "galore2_r32")]:
        per_seed = [rows[num]["val_loss"][s] / rows[den]["val_loss"][s] for s in seeds]
        mean, se = _mean_se(per_seed)
        ratios[f"{num} / {den}"] = {"per_seed": dict(zip(seeds, per_seed)), "mean": mean, "se": se}
    goal = ratios[f"galore2_r32 / {best_adamw}"]
    return {"methods": rows, "best_adamw": best_adamw, "ratios": ratios,
            "goal": {"ratio": f"galore2_r32 / {best_adamw}", "mean": goal["mean"], "se": goal["se"],
                     "threshold": 1.03, "met": goal["mean"] <= 1.03},
            "tune_seed": tune_seed, "seeds": list(seeds), "steps": steps, "full_rank": full}


def bench_layerwise() -> dict:
    """Peak memory: a model whose gradients dominate the process (Llama 350M shapes with the default
    corpus's 4096-token vocabulary: 311M parameters, 1.2 GB of fp32 gradients; one 64-token sequence a step)."""
    mem_args = ["recipe=galore2_tiny", "model=llama_350m", "model.vocab_size=null", "data.seq_len=64",
                "trainer.batch_size=1", "trainer.micro_batch_size=1", "trainer.max_steps=3",
                "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.save_final=false",
                "trainer.log_every=1", "optim.grad_clip=null", "optim.rank=128"]
    with tempfile.TemporaryDirectory() as tmp:
        plain = llmx_run(mem_args, Path(tmp) / "plain")
        layerwise = llmx_run([*mem_args, "optim.in_backward=true"], Path(tmp) / "layerwise")
    log(f"peak memory: plain {plain['peak_mem_mb']:.0f} MB, layer-wise {layerwise['peak_mem_mb']:.0f} MB")
    return {"peak_mem_mb_plain": plain["peak_mem_mb"], "peak_mem_mb_layerwise": layerwise["peak_mem_mb"],
            "layerwise_over_plain_peak": layerwise["peak_mem_mb"] / plain["peak_mem_mb"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="memory,svd,refresh,step,convergence,layerwise")
    ap.add_argument("--adamw-lrs", default="2e-3,3e-3,5e-3", help="convergence: AdamW lr grid (one global lr)")
    ap.add_argument("--adamw-other-lrs", default="3e-3,1e-2,2e-2",
                    help="convergence: per-group AdamW, lr grid of the embeddings, norms and lm_head")
    ap.add_argument("--adamw-matrix-lrs", default="1.5e-3,2.5e-3,4e-3",
                    help="convergence: per-group AdamW, lr grid of the attention and MLP matrices")
    ap.add_argument("--galore-lrs", default="5e-3,1e-2,2e-2", help="convergence: GaLore 2 lr grid")
    ap.add_argument("--galore-alphas", default="0.25,0.1,0.05", help="convergence: GaLore 2 alpha (scale) grid")
    ap.add_argument("--tune-seed", type=int, default=0, help="convergence: the seed lrs are tuned on")
    ap.add_argument("--seeds", default="1,2,3", help="convergence: the seeds reported (not the tuning seed)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    args = ap.parse_args()
    sections = args.sections.split(",")
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    result = {"benchmark": "galore", "date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": card,
              "torch": torch.__version__, "command": "python scripts/bench_galore.py " + " ".join(sys.argv[1:])}
    if "memory" in sections:  # needs Hydra (recipes); the figures are device-independent
        result["memory"] = bench_memory()
    if "svd" in sections:
        result["svd"] = bench_svd(args.device)
    if "refresh" in sections and args.device == "cpu":
        result["refresh"] = bench_refresh_dist()
    if "step" in sections:
        result["step"] = bench_step(args.device)
    if "convergence" in sections and args.device == "cpu":
        seeds = [int(x) for x in args.seeds.split(",")]
        if args.tune_seed in seeds:
            raise SystemExit(f"--tune-seed {args.tune_seed} is among --seeds {seeds}: never report the tuning seed")
        grids = [[float(x) for x in g.split(",")]
                 for g in (args.adamw_lrs, args.adamw_other_lrs, args.adamw_matrix_lrs, args.galore_lrs,
                           args.galore_alphas)]
        result["convergence"] = bench_convergence(*grids, args.tune_seed, seeds)
    if "layerwise" in sections and args.device == "cpu":
        result["layerwise"] = bench_layerwise()

    print(f"\nGaLore benchmarks on {card} ({args.device})")
    if "memory" in result:
        print("\n1. optimizer state per rank under FSDP2 (bytes llmx allocates), galore2 recipe vs AdamW")
        print(f"{'preset':<7}{'rank':>6}{'ranks':>6}{'basis':>6}{'AdamW GB':>10}{'GaLore GB':>11}{'ratio':>8}"
              f"{'refresh buffer GB':>19}")
        for r in result["memory"]["rows"]:
            print(f"{r['preset']:<7}{r['rank']:>6}{r['world_size']:>6}{r['basis_dtype']:>6}{r['adamw_gb']:>10.3f}"
                  f"{r['galore_gb']:>11.3f}{r['galore_over_adamw']:>8.3f}{r['refresh_transient_gb']:>19.3f}")
    if "svd" in result:
        print("\n2. subspace refresh on real gradients (time, speed-up over exact SVD, captured energy)")
        for r in result["svd"]["rows"]:
            print(f"{r['gradient']}, rank {r['rank']}: exact SVD {r['exact_seconds']:.2f} s "
                  f"(top-r energy = {r['top_r_energy_fraction_of_total']:.4f} of the total); exact basis energy "
                  f"{r['exact_energy']:.7f}, stored in bf16 {r['exact_bf16_basis_energy']:.7f} (max |PP^T - I| "
                  f"{r['bf16_basis_orthonormality_error']:.1e}); projection error "
                  + ", ".join(f"{k} {v:.2e}" for k, v in r["projection_error"].items()))
            for k, v in r["variants"].items():
                print(f"   {k:<40}{v['seconds']:>8.3f} s{v['speedup']:>8.1f}x  energy {v['energy']:.5f}")
    if "refresh" in result:
        r = result["refresh"]
        print(f"\n2b. one refresh of {r['params']} row-sharded {r['shape'][0]}x{r['shape'][1]} weights, rank "
              f"{r['rank']} ({r['svd']} SVD), {r['nproc']} processes: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items()) + f"; speed-up {r['speedup']:.2f}x")
    if "step" in result:
        s = result["step"]
        print(f"\n3. optimizer step, 7 matrices of one layer (hidden {s['shape']['hidden']}, "
              f"ffn {s['shape']['intermediate']}, rank {s['shape']['rank']})")
        for k, v in s["ms"].items():
            print(f"   {k:<40}{v:>9.2f} ms{s['over_fused_adamw'][k]:>8.2f}x fused AdamW")
        for r in s.get("fused_tiles", {}).get("rows", []):
            print(f"   fused tiles {r['shape'][0]}x{r['shape'][1]} {r['side']} {r['precision']}: cuBLAS "
                  f"{r['ms']['cublas']:.3f} ms, best {r['best_tiles']} {r['ms'][r['best_tiles']]:.3f} ms "
                  f"({r['best_over_cublas']:.2f}x cuBLAS)")
    if "convergence" in result:
        c = result["convergence"]
        print(f"\n4. convergence over {c['steps']} steps (validation loss; tuned on seed {c['tune_seed']}, "
              f"reported seeds {c['seeds']})")
        print(f"{'method':<18}{'setting':<28}{'seed ' + str(c['tune_seed']):>8}{'mean':>9}{'+- se':>8}   "
              f"seeds {c['seeds']}")
        for label, r in c["methods"].items():
            setting = ", ".join(f"{k} {v:g}" for k, v in r["setting"].items())
            tuned = next((f"{g['val_loss']:.4f}" for g in r.get("tuning", {}).get("grid", [])
                          if all(g[k] == v for k, v in r["setting"].items())), "-")  # the control is not tuned
            print(f"{label:<18}{setting:<28}{tuned:>8}{r['mean']:>9.4f}{r['se']:>8.4f}   "
                  + " / ".join(f"{v:.4f}" for v in r["val_loss"].values()))
        for label, r in c["methods"].items():
            if "tuning" not in r:
                continue
            t = r["tuning"]
            loss = {tuple(g[k] for k in t["axes"]): g["val_loss"] for g in t["grid"]}
            print(f"   {label}, seed {c['tune_seed']}" + "".join(f"; extended {e}" for e in t["extended"])
                  + "".join(f"; best still at the {a} edge" for a in t["best_at_edge"]))
            axes = list(t["axes"].items())
            if len(axes) == 1:
                print("      " + ", ".join(f"{axes[0][0]} {v:g}: {loss[(v,)]:.4f}" for v in axes[0][1]))
            else:  # rows: the first axis, columns: the second
                (row_name, rows_), (col_name, cols) = axes
                print(f"      {row_name + ' / ' + col_name:<22}" + "".join(f"{v:>9g}" for v in cols))
                for rv in rows_:
                    print(f"      {rv:<22g}" + "".join(f"{loss.get((rv, cv), float('nan')):>9.4f}" for cv in cols))
        print(f"   best AdamW variant (chosen on seed {c['tune_seed']}): {c['best_adamw']}")
        for name, r in c["ratios"].items():
            print(f"   {name}: {', '.join(f'{v:.4f}' for v in r['per_seed'].values())}; "
                  f"mean {r['mean']:.4f} +- {r['se']:.4f}")
        g = c["goal"]
        print(f"   goal {g['ratio']} <= {g['threshold']}: {'met' if g['met'] else 'NOT met'} "
              f"({g['mean']:.4f} +- {g['se']:.4f})")
    if "layerwise" in result:
        c = result["layerwise"]
        print(f"   peak resident memory (VmHWM): plain {c['peak_mem_mb_plain']:.0f} MB, layer-wise "
              f"{c['peak_mem_mb_layerwise']:.0f} MB (ratio {c['layerwise_over_plain_peak']:.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_galore_{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
