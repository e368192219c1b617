"""Benchmarks of GaLore 2 in llmx: optimizer-state memory, subspace refresh, optimizer step, convergence.

    .venv/bin/python scripts/bench_galore.py [--device cpu|cuda] [--sections memory,svd,step,convergence]
                                             [--out outputs/bench]

Every ratio is measured against a baseline in the same run.
1. memory: optimizer-state elements and bytes of every Llama preset, counted from the meta-device model
   by running llmx's own projector on meta gradients (so the shapes are exactly what training holds):
   GaLore (the galore2_* recipe's rank) against AdamW. Bytes at 2 per element (bf16 states, the GaLore
   paper's convention) and, for 8-bit, 1 byte per moment element with bf16 projectors.
2. svd: subspace refresh on the 4096x11008 and 4096x4096 shapes of Llama 7B at rank 1024, on REAL
   gradients: a one-layer model with the 7B layer shapes is trained 3 AdamW steps on the pydoc corpus
   (bytes as tokens), then the gradients of mlp.down_proj and self_attn.q_proj over 16 x 256 tokens are taken. Exact fp32 SVD against llmx's
   randomized range finder and torch.svd_lowrank, in time and in captured energy (fraction of the exact
   top-r energy). Goal: >= 30x faster at >= 0.99 of the energy.
3. step: steady-state optimizer step (no refresh) for the 7 weight matrices of one decoder layer: llmx
   GaLoreAdamW against galore-torch's GaLoreAdamW and torch's fused AdamW (full rank). CPU: the 350M
   layer (1024 / 2736) at rank 256; CUDA: the 7B layer (4096 / 11008) at rank 1024.
4. convergence: galore2_tiny against AdamW (pretrain_tiny) on the same data (the pylib corpus) and steps:
   each method's lr tuned on one seed, the best run on other seeds; validation loss mean +- standard error
   and the per-seed ratio (goal: within 3%). layerwise: peak resident memory (VmHWM on CPU) of GaLore with
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
def bench_memory() -> dict:
    from llmx.config.compose import compose
    from llmx.models import build_model
    from llmx.optim.galore import GaLoreProjector

    rows = []
    for size, rank in PRESETS.items():
        cfg = compose([f"recipe=galore2_llama{size}"])
        model = build_model(cfg.model, device="meta")
        targets = list(cfg.optim.targets)
        import fnmatch

        adamw = galore_moments = projectors = other = 0
        for name, p in model.named_parameters():
            adamw += 2 * p.numel()
            if p.ndim == 2 and any(fnmatch.fnmatch(name, pat) for pat in targets):
                proj = GaLoreProjector(rank, proj_type="std", update_proj_gap=200, scale=0.25)
                grad = torch.empty(p.shape, device="meta")
                proj.refresh(grad, 0)
                low = proj.project(grad)
                galore_moments += 2 * low.numel()
                projectors += sum(t.numel() for t in proj.basis().values())
            else:
                other += 2 * p.numel()
        galore = galore_moments + projectors + other
        rows.append({
            "preset": size, "rank": rank, "parameters": sum(p.numel() for p in model.parameters()),
            "adamw_state_elements": adamw, "galore_state_elements": galore,
            "galore_moments": galore_moments, "galore_projectors": projectors, "non_galore_moments": other,
            "adamw_gb_bf16": adamw * 2 / 1e9, "galore_gb_bf16": galore * 2 / 1e9,
            "galore_over_adamw": galore / adamw,
            # 8-bit: moments 1 byte/element, projectors kept in bf16; against 8-bit Adam (2 bytes/param).
            "galore8bit_gb": (galore_moments + other) / 1e9 + projectors * 2 / 1e9, "adam8bit_gb": adamw / 1e9,
        })
        log(f"memory {size}: GaLore/AdamW = {rows[-1]['galore_over_adamw']:.3f}")
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


def bench_svd(device: str, ranks=(1024, 128)) -> dict:
    """Rank 1024 is the 7B recipe's; on these gradients it holds essentially all the energy (a weight
    gradient is a sum of per-token outer products, and real ones are close to low rank: GaLore's premise),
    so rank 128 is measured too, where the energy left outside the subspace tells the methods apart."""
    from llmx.optim.galore import GaLoreProjector

    log("svd: computing real gradients (one 7B-shaped layer, 3 AdamW steps)")
    grads = real_gradients(device)
    rows = []
    for name, g in grads.items():
        # The exact SVD is timed once on CPU (about 30 s for 4096 x 11008); its singular values give the
        # denominator of every captured-energy figure: the sum of the top-r squared values.
        sync(device)
        t = time.perf_counter()
        S = torch.linalg.svd(g, full_matrices=False).S
        sync(device)
        t_exact = time.perf_counter() - t
        if device == "cuda":
            t_exact = min(t_exact, timed(lambda: torch.linalg.svd(g, full_matrices=False), device))
        for rank in ranks:
            top = float(S[:rank].double().square().sum())

            def energy(low: torch.Tensor) -> float:
                return float(low.double().square().sum()) / top

            variants = {}
            for label, kw in [("llmx randomized, 0 power iterations", dict(power_iters=0)),
                              ("llmx randomized, 1 power iteration", dict(power_iters=1)),
                              ("llmx randomized, 2 power iterations", dict(power_iters=2))]:
                proj = GaLoreProjector(rank, proj_type="std", svd="randomized", oversample=10, **kw)
                secs = timed(lambda: proj.refresh(g, 0), device)
                variants[label] = {"seconds": secs, "speedup": t_exact / secs, "energy": energy(proj.project(g))}
            # torch.svd_lowrank as a second randomized baseline (q = r + 10, niter = 2), on the smaller side
            mat = g.T if g.shape[0] >= g.shape[1] else g
            secs = timed(lambda: torch.svd_lowrank(mat, q=rank + 10, niter=2), device)
            U = torch.svd_lowrank(mat, q=rank + 10, niter=2)[0][:, :rank]
            variants["torch.svd_lowrank(q=r+10, niter=2)"] = {
                "seconds": secs, "speedup": t_exact / secs, "energy": energy(U.T @ mat)}
            total = float(S.double().square().sum())
            rows.append({"gradient": name, "rank": rank, "exact_seconds": t_exact,
                         "top_r_energy_fraction_of_total": top / total, "variants": variants})
            log(f"svd {name} r={rank}: exact {t_exact:.2f}s; " + "; ".join(
                f"{k}: {v['seconds']:.3f}s ({v['speedup']:.0f}x) energy {v['energy']:.5f}" for k, v in variants.items()))
    return {"rows": rows}


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
    run(lambda ps: GaLoreAdamW([{"params": ps, **group}], lr=1e-3), "llmx GaLoreAdamW")
    if device == "cuda":
        run(lambda ps: GaLoreAdamW([{"params": ps, **group}], lr=1e-3, fused=True), "llmx GaLoreAdamW (fused Triton)")
    try:
        from galore_torch import GaLoreAdamW as RefGaLore

        run(lambda ps: RefGaLore([{"params": ps, **group}], lr=1e-3), "galore-torch GaLoreAdamW")
    except ImportError as e:
        log(f"galore-torch unavailable: {e}")
    base = results["torch AdamW (fused, full rank)"]
    return {"shape": {"hidden": hidden, "intermediate": inter, "rank": rank},
            "ms": {k: v * 1e3 for k, v in results.items()},
            "over_fused_adamw": {k: v / base for k, v in results.items()}}


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


def bench_convergence(adamw_lrs, galore_lrs, tune_seed: int, seeds) -> dict:
    """AdamW (pretrain_tiny) against GaLore 2 (galore2_tiny): each method's lr tuned on tune_seed, then
    the best lr of each run on the report seeds (never the tuning seed): mean +- standard error."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method, recipe, lrs in (("adamw", "pretrain_tiny", adamw_lrs), ("galore", "galore2_tiny", galore_lrs)):
            tuning = {}
            for lr in lrs:
                tuning[lr] = llmx_run([f"recipe={recipe}", f"optim.lr={lr}", f"seed={tune_seed}"],
                                      tmp / f"{method}_tune_{lr}")["val_loss"]
                log(f"convergence: {method} lr {lr} seed {tune_seed} (tuning): val {tuning[lr]:.4f}")
            best = min(tuning, key=tuning.get)
            report = {}
            for seed in seeds:
                final = llmx_run([f"recipe={recipe}", f"optim.lr={best}", f"seed={seed}"], tmp / f"{method}_{seed}")
                report[seed], steps = final["val_loss"], final["step"]
                log(f"convergence: {method} lr {best} seed {seed}: val {report[seed]:.4f}")
            mean, se = _mean_se(list(report.values()))
            rows[method] = {"recipe": recipe, "tuning_seed": tune_seed, "tuning_val_loss": tuning, "lr": best,
                            "val_loss": report, "mean": mean, "se": se}
    ratios = [rows["galore"]["val_loss"][s] / rows["adamw"]["val_loss"][s] for s in seeds]
    mean, se = _mean_se(ratios)
    return {**rows, "galore_over_adamw_per_seed": dict(zip(seeds, ratios)), "ratio_mean": mean, "ratio_se": se,
            "seeds": list(seeds), "steps": steps}


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
    ap.add_argument("--sections", default="memory,svd,step,convergence,layerwise")
    ap.add_argument("--adamw-lrs", default="2e-3,3e-3,5e-3,1e-2", help="convergence: AdamW lr grid")
    ap.add_argument("--galore-lrs", default="5e-3,1e-2,2e-2,3e-2", help="convergence: GaLore lr grid")
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
    if "step" in sections:
        result["step"] = bench_step(args.device)
    if "convergence" in sections and args.device == "cpu":
        seeds = [int(x) for x in args.seeds.split(",")]
        if args.tune_seed in seeds:
            raise SystemExit(f"--tune-seed {args.tune_seed} is among --seeds {seeds}: never report the tuning seed")
        result["convergence"] = bench_convergence([float(x) for x in args.adamw_lrs.split(",")],
                                                  [float(x) for x in args.galore_lrs.split(",")], args.tune_seed, seeds)
    if "layerwise" in sections and args.device == "cpu":
        result["layerwise"] = bench_layerwise()

    print(f"\nGaLore benchmarks on {card} ({args.device})")
    if "memory" in result:
        print("\n1. optimizer-state memory (bf16 bytes), GaLore at the galore2 recipe rank vs AdamW")
        print(f"{'preset':<7}{'rank':>6}{'AdamW GB':>10}{'GaLore GB':>11}{'ratio':>8}{'8-bit GaLore GB':>17}{'8-bit Adam GB':>15}")
        for r in result["memory"]["rows"]:
            print(f"{r['preset']:<7}{r['rank']:>6}{r['adamw_gb_bf16']:>10.2f}{r['galore_gb_bf16']:>11.2f}"
                  f"{r['galore_over_adamw']:>8.3f}{r['galore8bit_gb']:>17.2f}{r['adam8bit_gb']:>15.2f}")
    if "svd" in result:
        print("\n2. subspace refresh on real gradients (time, speed-up over exact SVD, captured energy)")
        for r in result["svd"]["rows"]:
            print(f"{r['gradient']}, rank {r['rank']}: exact SVD {r['exact_seconds']:.2f} s "
                  f"(top-r energy = {r['top_r_energy_fraction_of_total']:.4f} of the total)")
            for k, v in r["variants"].items():
                print(f"   {k:<40}{v['seconds']:>8.3f} s{v['speedup']:>8.1f}x  energy {v['energy']:.5f}")
    if "step" in result:
        s = result["step"]
        print(f"\n3. optimizer step, 7 matrices of one layer (hidden {s['shape']['hidden']}, "
              f"ffn {s['shape']['intermediate']}, rank {s['shape']['rank']})")
        for k, v in s["ms"].items():
            print(f"   {k:<40}{v:>9.2f} ms{s['over_fused_adamw'][k]:>8.2f}x fused AdamW")
    if "convergence" in result:
        c = result["convergence"]
        print(f"\n4. convergence over {c['steps']} steps (validation loss; lr tuned on seed {args.tune_seed}, "
              f"reported seeds {c['seeds']})")
        print(f"{'method':<8}{'best lr':>8}{'mean':>9}{'+- se':>8}   tuning (lr: val loss)")
        for m in ("adamw", "galore"):
            r = c[m]
            grid = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in r["tuning_val_loss"].items())
            print(f"{m:<8}{r['lr']:>8g}{r['mean']:>9.4f}{r['se']:>8.4f}   {grid}")
        print(f"   GaLore / AdamW per seed: {', '.join(f'{v:.4f}' for v in c['galore_over_adamw_per_seed'].values())}; "
              f"mean {c['ratio_mean']:.4f} +- {c['ratio_se']:.4f} (goal <= 1.03)")
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
