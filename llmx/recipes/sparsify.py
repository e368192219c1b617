"""sparsify recipe: make a pretrained model cheaper to serve without training, evaluate it, save it.

    llmx run recipe=rsparse_smollm2            # R-Sparse on SmolLM2-135M at 40/50/70%, searched allocation
    llmx run recipe=teal_smollm2               # TEAL (magnitude sparsity, greedy allocation), same levels
    llmx run recipe=rsparse_smollm2 model=gemma3_270m
    llmx run recipe=rsparse_llama3_8b model.path=/models/Meta-Llama-3-8B   # GPU cluster

Feature -> config flag:
    method (rsparse | teal | dense | sharp)  sparsify.method (sharp: llmx/recipes/sharp.py, sparsify.sharp.*)
    model-level sparsities to evaluate       sparsify.levels=[0.4,0.5,0.7]
    per-layer allocation                     sparsify.allocation=uniform|greedy|search, sparsify.alpha
                                             (greedy: TEAL's s per layer; rsparse adds sparsify.alpha to it;
                                             search with method=teal: the same search over s alone, alpha = 1)
    what the search varies (rsparse)         sparsify.search.mode=s_alpha|alpha (alpha: s fixed, alphas searched)
    compare at the sparsity achieved         sparsify.match_sparsity=true (one threshold scale, set on
                                             sparsify.match_sequences unscored validation windows)
    which tokens are sparse                  sparsify.token_mode=all|decode|last_fraction, sparsify.token_fraction
    calibration amount and text              sparsify.calib_sequences, data=... (its training split), data.seq_len
    search budget                            sparsify.search.population / generations / seed
    search seeded by TEAL's greedy plan      sparsify.search.init_greedy=true (paths cached, shared with TEAL)
    TEAL greedy step (cost vs resolution)    sparsify.greedy_step
    evaluation text                          data's validation split, sparsify.eval_sequences
    decode speed (batch 1, PyTorch path)     sparsify.decode_tokens=64

Read top to bottom: 1. model and text, 2. calibration (dense activations), 3. the dense baseline,
4. per level: allocate, apply, evaluate (perplexity on the sparsified tokens, achieved sparsity per
projection), save the artifact, time decoding; 5. the table. Every figure names its token mode.
Outputs: results.md, results.json, final.json, artifacts/s<level>/ (load with llmx.sparse.artifact).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import OmegaConf

from llmx.data import build_datasets, build_tokenizer
from llmx.models import load_pretrained
from llmx.sparse import apply_plan, calibrate, layer_shapes, model_sparsity, remove_sparsity, uniform_plan
from llmx.sparse.artifact import artifact_size_bytes, save_artifact
from llmx.sparse.evaluate import decode_speed, match_sparsity, perplexity
from llmx.sparse.rsparse import (RSparseLinear, SVDCache, achieved_sparsity, fuse_shared_inputs, svd_bytes,
                                 svd_max_rank)
from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, cache_dir, enum_value



def check_config(cfg) -> None:
    """Every R-Sparse/TEAL value, and SHARP's checks (its layer spec waits for the model), before any work
    (llmx.launch.check_before_run; main runs it again for callers without the launcher)."""
    sp = cfg.sparsify
    method, allocation = enum_value(sp.method), enum_value(sp.allocation)
    if method == "sharp":
        from llmx.recipes.sharp import check_config as check

        return check(cfg)
    bad = [x for x in sp.levels if not 0.0 < float(x) < 1.0]
    if not sp.levels or bad:
        raise LlmxError(f"sparsify.levels={list(sp.levels)}: each must be a model-level sparsity in (0, 1)")
    if method == "teal" and allocation == "search" and sp.search.mode == "alpha":
        raise LlmxError("sparsify.search.mode=alpha searches R-Sparse's alphas; TEAL (alpha = 1) has none: use "
                        "search.mode=s_alpha (TEAL's s searched, the control for R-Sparse's search)")
    if sp.search.mode not in ("s_alpha", "alpha"):
        raise LlmxError(f"sparsify.search.mode={sp.search.mode!r}; valid: s_alpha (per-module s and alpha), alpha "
                        "(s fixed at the target, or at TEAL's greedy s with search.init_greedy; alphas searched)")
    if not 0.0 < sp.greedy_step < 1.0:
        raise LlmxError(f"sparsify.greedy_step={sp.greedy_step}: must be a step in (0, 1)")
    if not 0.0 <= sp.alpha <= 1.0:
        raise LlmxError(f"sparsify.alpha={sp.alpha}: must be a share of the budget in [0, 1]")
    if not 0.0 < sp.token_fraction <= 1.0:
        raise LlmxError(f"sparsify.token_fraction={sp.token_fraction}: must be in (0, 1]")
    if not 0.0 < sp.match_tolerance < 0.05:
        raise LlmxError(f"sparsify.match_tolerance={sp.match_tolerance}: must be in (0, 0.05)")
    for key, low in (("calib_sequences", 1), ("calib_max_values", 1), ("decode_tokens", 0), ("match_sequences", 1),
                     ("search.population", 2), ("search.generations", 1)):
        value = OmegaConf.select(sp, key)
        if value < low:
            raise LlmxError(f"sparsify.{key}={value}: must be an integer >= {low}")
    if sp.eval_sequences is not None and sp.eval_sequences < 1:
        raise LlmxError(f"sparsify.eval_sequences={sp.eval_sequences}: must be an integer >= 1, or null (all)")
    if not sp.targets:
        raise LlmxError("sparsify.targets=[]: name at least one projection (q_proj, ..., down_proj)")


def main(cfg) -> Dict[str, Any]:
    sp = cfg.sparsify
    run_dir = Path(cfg.run_dir)
    method, allocation, token_mode = enum_value(sp.method), enum_value(sp.allocation), enum_value(sp.token_mode)
    if method == "sharp":  # trains recovery parameters: its own recipe file (llmx/recipes/sharp.py)
        from llmx.recipes.sharp import main as sharp_main

        return sharp_main(cfg)
    check_config(cfg)
    levels = [float(x) for x in sp.levels]
    torch.manual_seed(cfg.seed)

    # 1. The pretrained model and text: calibration from the training split, evaluation on validation.
    model, model_tok = load_pretrained(cfg.model)
    model.eval().requires_grad_(False)
    device = "cuda" if cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    model.to(device)
    tok = build_tokenizer(cfg.data, model_tokenizer=model_tok)
    train, val = build_datasets(cfg.data, tok)
    if len(train) < sp.calib_sequences:
        raise LlmxError(f"sparsify.calib_sequences={sp.calib_sequences} but the training split has {len(train)} "
                        f"sequences of {cfg.data.seq_len} tokens")
    calib_batches = [train[i][None] for i in range(sp.calib_sequences)]
    n_eval = len(val) if sp.eval_sequences is None else min(len(val), sp.eval_sequences)
    eval_windows = [val[i][None] for i in range(n_eval)]
    if not eval_windows:
        raise LlmxError("the validation split is empty: raise data.val_fraction")
    match_windows = [val[i][None] for i in range(n_eval, min(len(val), n_eval + sp.match_sequences))]
    if sp.match_sparsity and len(match_windows) < sp.match_sequences:
        raise LlmxError(f"sparsify.match_sparsity needs {sp.match_sequences} validation windows beyond the "
                        f"{n_eval} scored (eval_sequences), and the split has {len(val)}: lower "
                        "sparsify.eval_sequences or sparsify.match_sequences, or raise data.val_fraction")
    shapes = layer_shapes(model, list(sp.targets))
    score_fraction = sp.token_fraction if token_mode == "last_fraction" else None
    eval_mode = token_mode if token_mode != "decode" else "all"  # perplexity has no decode step: score all
    print(f"llmx: {cfg.model.name}: {len(shapes)} linears; calibration {len(calib_batches)} x {cfg.data.seq_len} "
          f"tokens, evaluation {n_eval} x {cfg.data.seq_len} tokens; tokens sparsified: {_mode_label(cfg, token_mode)}",
          flush=True)

    # 2. Calibration: input magnitudes of every targeted linear in the dense model.
    t0 = time.perf_counter()
    calib = calibrate(model, calib_batches, list(sp.targets), sp.calib_max_values, cfg.seed)
    print(f"llmx: calibrated in {time.perf_counter() - t0:.1f} s", flush=True)

    # 3. The dense baseline on the same tokens.
    dense = perplexity(model, eval_windows, score_fraction)
    rows: List[Dict[str, Any]] = [{"method": "dense", "level": 0.0, "ppl": dense["ppl"], "ppl_se": dense["ppl_se"],
                                   "nll_rows": _rounded(dense["nll_rows"]), "ratio": 1.0,
                                   "achieved": 0.0, "tokens_scored": dense["tokens"]}]
    prompt = eval_windows[0][:, :32]
    dense_speed = decode_speed(model, prompt, sp.decode_tokens) if sp.decode_tokens > 0 else None
    if dense_speed:
        rows[0]["decode_tokens_per_s"] = dense_speed["tokens_per_s"]
    print(f"llmx: dense ppl {dense['ppl']:.3f} ({dense['tokens']} tokens scored)", flush=True)

    # 4. Each level: allocate, apply, evaluate, save, time.
    svd = _svd_cache(cfg, model, shapes, levels, method, allocation, device)
    for level in levels if method != "dense" else []:
        t0 = time.perf_counter()
        if allocation == "uniform":
            plan = uniform_plan(shapes, level, 1.0 if method == "teal" else float(sp.alpha))
        elif allocation == "greedy":  # TEAL's s per layer; R-Sparse keeps its uniform alpha on it
            from llmx.sparse.search import plan_from_paths

            alpha = 1.0 if method == "teal" else float(sp.alpha)
            plan = {n: (s, alpha) for n, (s, _) in plan_from_paths(_greedy_paths(cfg, model, calib, calib_batches),
                                                                   level).items()}
        else:
            plan = _searched_plan(cfg, model, calib, calib_batches, shapes, level, svd, eval_mode)
        alloc_s = time.perf_counter() - t0
        layers = apply_plan(model, calib, plan, token_mode=eval_mode, token_fraction=sp.token_fraction, svd=svd)
        matched = match_sparsity(model, layers, match_windows, level, tol=sp.match_tolerance, shapes=shapes) \
            if sp.match_sparsity else None
        for layer in layers.values():
            layer.track = True
        result = perplexity(model, eval_windows, score_fraction)
        achieved = _achieved(layers, shapes)
        row = {"method": method, "level": level, "allocation": allocation, "ppl": result["ppl"],
               "ppl_se": result["ppl_se"], "nll_rows": _rounded(result["nll_rows"]),
               "ratio": result["ppl"] / dense["ppl"], "planned": model_sparsity(shapes, plan), "achieved": achieved["model"],
               "by_projection": achieved["by_projection"], "tokens_scored": result["tokens"],
               "mean_alpha": sum(a for _, a in plan.values()) / len(plan), "allocation_seconds": round(alloc_s, 1),
               "low_rank_layers": sum(1 for layer in layers.values() if layer.rank > 0)}
        if matched:
            row.update(threshold_scale=matched["scale"], achieved_match_text=matched["achieved"])
        for layer in layers.values():
            layer.track = False
        if sp.save:
            art = save_artifact(model, run_dir / "artifacts" / f"s{level:g}",
                                meta={"model": cfg.model.name, "method": method, "level": level, "allocation": allocation,
                                      "planned_sparsity": row["planned"]})
            row["artifact"] = str(art)
            row["artifact_bytes"] = artifact_size_bytes(art)
        if sp.decode_tokens > 0:
            for layer in layers.values():
                layer.decode_layout()
                layer.token_mode = "decode"
            fuse_shared_inputs(model)  # on the kernel path (CUDA), TEAL's q/k/v and gate/up as one launch each
            speed = decode_speed(model, prompt, sp.decode_tokens)
            row["decode_tokens_per_s"] = speed["tokens_per_s"]
            row["decode_speedup"] = speed["tokens_per_s"] / dense_speed["tokens_per_s"]
        remove_sparsity(model)
        rows.append(row)
        print(f"llmx: {method} {level:.0%}: ppl {row['ppl']:.3f} ({row['ratio']:.3f}x dense), achieved sparsity "
              f"{row['achieved']:.3f}, allocation {alloc_s:.0f} s", flush=True)

    # 5. The table.
    table = _table(cfg, rows, token_mode, dense["tokens"])
    atomic_write_text(run_dir / "results.md", table)
    atomic_write_json(run_dir / "results.json", rows)
    final: Dict[str, Any] = {"dense_ppl": dense["ppl"], "token_mode": token_mode, "evaluated_token_mode": eval_mode}
    for row in rows[1:]:
        final[f"ppl@{row['level']:g}"] = row["ppl"]
        final[f"ppl_ratio@{row['level']:g}"] = row["ratio"]
        if "decode_speedup" in row:
            final[f"decode_speedup@{row['level']:g}"] = row["decode_speedup"]
    atomic_write_json(run_dir / "final.json", final)
    print(table, flush=True)
    return final


_GREEDY: Dict[str, Any] = {}  # paths of this process's model, so several levels share one greedy pass


def _greedy_paths(cfg, model, calib, batches):
    """TEAL's greedy paths for every block (one pass serves every level), cached on disk: the TEAL run
    and the R-Sparse search seeded by it share them."""
    from llmx.sparse.artifact import model_fingerprint
    from llmx.sparse.search import BlockPath, batches_fingerprint, cached_search, teal_greedy_paths

    sp = cfg.sparsify
    key = {"model": cfg.model.name, "weights": model_fingerprint(model), "calib": batches_fingerprint(batches),
           "step": sp.greedy_step, "targets": list(sp.targets), "calib_max_values": sp.calib_max_values,
           "seed": cfg.seed, "version": 2}
    memo = str(sorted(key.items()))
    if memo not in _GREEDY:
        def run():
            t0 = time.perf_counter()
            paths = teal_greedy_paths(model, calib, batches, step=sp.greedy_step,
                                      log=lambda m: print(f"{m} ({time.perf_counter() - t0:.0f} s)", flush=True))
            return [p.to_dict() for p in paths]

        _GREEDY.clear()
        _GREEDY[memo] = [BlockPath.from_dict(d) for d in cached_search(cache_dir() / "teal_greedy", key, run)]
    return _GREEDY[memo]


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _svd_cache(cfg, model, shapes, levels, method: str, allocation: str, device: str) -> SVDCache:
    """The factors' cache, truncated to the largest rank this run's allocation can ask for (svd_max_rank), after
    checking that it fits the device."""
    if method != "rsparse":
        return SVDCache(max_rank=lambda i, o: 0)  # TEAL: alpha = 1 everywhere, no low-rank term
    max_rank = svd_max_rank(allocation, float(cfg.sparsify.alpha), levels)
    element = next(model.parameters()).element_size()
    need, free = svd_bytes(shapes, element, max_rank), _free_bytes(device)
    print(f"llmx: SVD factors: up to {need / 2**30:.2f} GiB on {device} ({free / 2**30:.1f} GiB free), computed "
          "per layer when first used", flush=True)
    if need > free:
        raise LlmxError(f"the SVD factors of the {len(shapes)} layers need up to {need / 2**30:.1f} GiB on {device}, "
                        f"{free / 2**30:.1f} GiB are free: use sparsify.allocation=uniform (factors truncated to its "
                        "rank), fewer sparsify.targets, or a device with more memory")
    return SVDCache(max_rank=max_rank)


def _searched_plan(cfg, model, calib, batches, shapes, level, svd, eval_mode):
    from llmx.sparse.artifact import model_fingerprint
    from llmx.sparse.search import (batches_fingerprint, cached_search, evolutionary_search, plan_from_json,
                                    plan_from_paths, plan_to_json)

    sp = cfg.sparsify
    init = plan_from_paths(_greedy_paths(cfg, model, calib, batches), level) if sp.search.init_greedy else None
    # Everything the searched plan depends on: the cache is keyed by it, so a rerun skips the search.
    key = {"model": cfg.model.name, "weights": model_fingerprint(model), "calib": batches_fingerprint(batches),
           "level": level, "population": sp.search.population, "generations": sp.search.generations,
           "seed": sp.search.seed, "targets": list(sp.targets), "token_mode": eval_mode,
           "token_fraction": sp.token_fraction, "calib_max_values": sp.calib_max_values, "version": 4,
           "init": plan_to_json(init) if init else None, "mode": sp.search.mode, "method": sp.method}

    def run():
        plan, history = evolutionary_search(model, calib, batches, level, population=sp.search.population,
                                            generations=sp.search.generations, seed=sp.search.seed, svd=svd,
                                            init=init, fixed_s=sp.search.mode == "alpha",
                                            # TEAL: the same search over s alone (alpha = 1: no low-rank term)
                                            alpha_choices=(1.0,) if sp.method == "teal" else None,
                                            token_mode=eval_mode, token_fraction=sp.token_fraction,
                                            log=lambda m: print(f"search {level:.0%}: {m}", flush=True))
        return {"plan": plan_to_json(plan), "history": history}

    found = cached_search(cache_dir() / "rsparse_search", key, run)
    return plan_from_json(found["plan"])


def _rounded(values: List[float]) -> List[float]:
    return [round(v, 6) for v in values]


def _achieved(layers: Dict[str, RSparseLinear], shapes) -> Dict[str, Any]:
    """Measured weight-read savings on the evaluation tokens, per projection type and model-level."""
    by_proj: Dict[str, List[float]] = {}
    for name, layer in layers.items():
        if layer.achieved() is not None:
            by_proj.setdefault(name.rsplit(".", 1)[-1], []).append(layer.achieved())
    return {"model": achieved_sparsity(layers, shapes),
            "by_projection": {p: round(sum(v) / len(v), 4) for p, v in by_proj.items()}}


def _mode_label(cfg, token_mode: str) -> str:
    if token_mode == "last_fraction":
        return f"last_fraction (the last {cfg.sparsify.token_fraction:.0%} of each window, the only positions scored)"
    if token_mode == "decode":  # a perplexity has no decode step: it ran with every token sparse
        return "all (token_mode=decode: a perplexity has no single-token step, so every token ran sparse)"
    return token_mode


def _table(cfg, rows, token_mode: str, tokens: int) -> str:
    lines = [f"# {cfg.name}: {cfg.model.name}", "",
             f"Perplexity on {tokens} held-out tokens ({cfg.data.name} validation split, windows of {cfg.data.seq_len}); "
             f"tokens sparsified: {_mode_label(cfg, token_mode)}.",
             "ppl ± its standard error over the held-out windows (the spread of their mean NLLs, to first order).",
             *([f"Thresholds scaled so that the sparsity achieved on {cfg.sparsify.match_sequences} unscored "
                f"validation windows is within {cfg.sparsify.match_tolerance} of the target "
                "(sparsify.match_sparsity)."] if cfg.sparsify.match_sparsity else []),
             "", "| method | target | achieved | ppl | vs dense | low-rank layers | mean alpha | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else "-"
        if "decode_speedup" in r:
            speed += f" ({r['decode_speedup']:.2f}x)"
        ppl = f"{r['ppl']:.3f}" + (f" ± {r['ppl_se']:.3f}" if r.get("ppl_se") is not None else "")
        lines.append(f"| {r['method']} | {r['level']:.0%} | {r.get('achieved', 0):.3f} | {ppl} | "
                     f"{r['ratio']:.3f}x | {r.get('low_rank_layers', '-')} | "
                     f"{r['mean_alpha']:.3f} | {speed} |" if r["method"] != "dense" else
                     f"| dense | - | 0 | {ppl} | 1.000x | - | - | {speed} |")
    return "\n".join(lines) + "\n"

