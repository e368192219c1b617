"""sparsify recipe, method sharp: SHARP (arXiv 2502.07832) on a pretrained model: share adjacent-layer MLPs,
recover with low-rank parameters (Single Layer Warmup, then SFT), report, save a compact checkpoint.

    llmx run recipe=sharp_smollm2                                   # SmolLM2-135M on CPU
    llmx run recipe=sharp_smollm2 sparsify.sharp.layers='"-16:"'    # a higher ratio (aggressive sharing)
    llmx run recipe=sharp_smollm2 sparsify.sharp.layers='"1:16:2"'  # the ablation: earlier layers
    llmx run recipe=sharp_smollm2 sparsify.sharp.recovery=parallel  # another recovery, same parameter count
    llmx run recipe=sharp_llama2_7b model.path=/models/Llama-2-7b-hf   # one GPU

Feature -> config flag (all under sparsify.sharp):
    replaced layers (list or slice)          layers=[17,19,21] | layers='"0.5::2"'
    recovery parameterization, rank          recovery=lora|parallel|none, rank, targets=[gate_proj,...]
    equal parameter counts across choices    match_params=true
    recovery initialisation                  init=zero|svd
    stage 1 (SLW)                            slw.steps / lr / batch_tokens / sequences / data=sft|text
    stage 2 (SFT) and its data               sft.steps / lr / seq_len / sources=[{kind: file, path: ...}, ...]
    the fair control (SFT without sharing)   baseline_sft=true
    controls for the shared weights          reference=adjacent|permuted|distant|prune (prune: init=svd)
    recovery master-weight dtype             recovery_dtype=float32 (null: the model's dtype)
    compact checkpoint dtype                 save_dtype
    size and load time against the original  compare_storage

Read top to bottom: 1. model, text and instruction data; 2. the original's perplexities and the MLP
inputs/outputs SLW fits; 3. Direct Sharing; 4. SLW; 5. SFT through the trainer core; 6. the optional
control; 7. storage, the compact checkpoint, load time; 8. the table. Perplexity is measured twice: on
held-out plain text (data group's validation split: pydoc_eval) and on held-out instruction responses
(in-distribution for SFT, as the paper measures). Stages 4 and 5 are kept in the run directory (slw/, sft/)
keyed by their config, so rerunning with hydra.run.dir=<run dir> skips what is done and resumes SFT
from its newest checkpoint. Outputs: results.md, results.json, final.json, compact/ (llmx.sharing.load_compact).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch

from llmx.sharing import (capture_mlp_io, decoder_layers, freeze_all_but_recovery, matched_rank, mlp_storage,
                          padding_mask, recovery_parameters, select_layers, share_mlps, shared_layers,
                          single_layer_warmup)
from llmx.sharing.sharp import _check_share_args
from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, enum_value, plain, sha256_text




def check_config(cfg, num_layers: Optional[int] = None) -> None:
    """Every bad value of sparsify.sharp, before any work (num_layers known: the layer spec too)."""
    sh = cfg.sparsify.sharp
    errors = []
    if sh.rank < 1 and enum_value(sh.recovery) != "none":
        errors.append(f"sparsify.sharp.rank={sh.rank}: must be >= 1 (or recovery=none for Direct Sharing)")
    if sh.slw.steps < 0 or sh.sft.steps < 0:
        errors.append("sparsify.sharp.slw.steps and sft.steps must be >= 0")
    if sh.slw.data not in ("sft", "text"):
        errors.append(f"sparsify.sharp.slw.data={sh.slw.data!r}; valid: sft, text")
    if sh.slw.steps and (sh.slw.lr <= 0 or sh.slw.batch_tokens < 1 or sh.slw.sequences < 1):
        errors.append("sparsify.sharp.slw: lr > 0, batch_tokens >= 1 and sequences >= 1 are required")
    if sh.sft.steps and sh.sft.lr <= 0:
        errors.append(f"sparsify.sharp.sft.lr={sh.sft.lr}: must be > 0")
    if sh.save_dtype not in (None, "float32", "bfloat16", "float16"):
        errors.append(f"sparsify.sharp.save_dtype={sh.save_dtype!r}; valid: null, float32, bfloat16, float16")
    kinds = [s.kind for s in sh.sft.sources]
    bad_kinds = [k for k in kinds if k not in ("file", "pydoc_qa", "gsm_infinite")]
    if bad_kinds:
        errors.append(f"sparsify.sharp.sft.sources: kind {bad_kinds}; valid: file, pydoc_qa, gsm_infinite")
    for s in sh.sft.sources:
        if s.kind == "file" and not (s.path and Path(s.path).expanduser().is_file()):
            errors.append(f"sparsify.sharp.sft.sources: kind=file path={s.path!r} is not a file")
    if enum_value(sh.recovery) == "lora":
        bad = [t for t in sh.targets if t not in ("gate_proj", "up_proj", "down_proj")]
        if bad or not sh.targets:
            errors.append(f"sparsify.sharp.targets={list(sh.targets)}: valid are gate_proj, up_proj, down_proj")
    if enum_value(sh.init) == "svd" and enum_value(sh.recovery) != "lora":
        errors.append(f"sparsify.sharp.init=svd needs recovery=lora (got {enum_value(sh.recovery)})")
    if enum_value(sh.reference) == "prune":
        try:
            _check_share_args(enum_value(sh.recovery), list(sh.targets), enum_value(sh.init), "prune")
        except LlmxError as e:
            errors.append(str(e))
    if sh.recovery_dtype not in (None, "float32", "bfloat16", "float16"):
        errors.append(f"sparsify.sharp.recovery_dtype={sh.recovery_dtype!r}; valid: null, float32, bfloat16, float16")
    if not 0 < sh.slw.holdout < 1:
        errors.append(f"sparsify.sharp.slw.holdout={sh.slw.holdout}: must be in (0, 1)")
    if num_layers is not None:
        try:
            select_layers(plain(sh.layers), num_layers)
        except LlmxError as e:
            errors.append(str(e))
    if errors:
        raise LlmxError("bad SHARP config:\n  " + "\n  ".join(errors))


# The row before any recovery, per reference mode.
NO_RECOVERY = {"adjacent": "direct sharing", "permuted": "direct sharing, permuted reference",
               "distant": "direct sharing, distant reference", "prune": "pruned (MLP deleted)"}


def calibration(items, n: int, seed: int, packed: bool):
    """SLW's calibration sequences: n drawn at random (seeded) from all of `items`, so that every
    instruction source is represented (instruction_pairs and pack_pairs keep the sources in order, and the
    first n were all pydoc). For packed [2, T] instruction items also the masks of their real tokens
    (padding dropped). Returns (list of [1, T] ids, list of [1, T] masks or None)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    if not packed:
        return [items[i][None] for i in order], None
    return [items[i][0][None] for i in order], [padding_mask(items[i])[None] for i in order]


def prepare(cfg) -> SimpleNamespace:
    """Step 1: the model (frozen, on its device), tokenizer, replaced layers, held-out text windows, and the
    packed instruction data (training sequences; held-out sequences evenly spaced over the sources)."""
    import os

    from llmx.data import build_datasets, build_tokenizer
    from llmx.data.instruct import instruction_pairs, pack_pairs
    from llmx.models import load_pretrained

    sh, sp = cfg.sparsify.sharp, cfg.sparsify
    check_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlmxError("SHARP runs in one process: a shared MLP's weights live in another block, and FSDP frees "
                        "a block's weights after its forward. Use launcher=local (one GPU holds a 7B model)")
    torch.manual_seed(cfg.seed)
    model, model_tok = load_pretrained(cfg.model)
    device = torch.device("cuda" if cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model.to(device).eval().requires_grad_(False)
    num_layers = len(decoder_layers(model))
    check_config(cfg, num_layers)
    replaced = select_layers(plain(sh.layers), num_layers)
    tok = build_tokenizer(cfg.data, model_tokenizer=model_tok)
    text_train, text_val = build_datasets(cfg.data, tok)
    n_eval = len(text_val) if sp.eval_sequences is None else min(len(text_val), sp.eval_sequences)
    text_windows = [text_val[i][None] for i in range(n_eval)]
    sources = plain(sh.sft.sources)
    sft_train, train_stats = pack_pairs(tok, instruction_pairs(sources, "train", cfg.seed), sh.sft.seq_len,
                                        sh.sft.chat_template)
    sft_val, val_stats = pack_pairs(tok, instruction_pairs(sources, "validation", cfg.seed), sh.sft.seq_len,
                                    sh.sft.chat_template)
    # Evenly spaced over the held-out sequences, so every source is in the evaluation (they come in order).
    n_val = min(len(sft_val), sh.sft.eval_sequences)
    sft_val = [sft_val[k * len(sft_val) // n_val] for k in range(n_val)] if n_val else []
    if not text_windows or not sft_val:
        raise LlmxError("no held-out data: raise data.val_fraction, or the instruction sources' validation share")
    if sh.sft.steps and len(sft_train) < cfg.trainer.batch_size:
        raise LlmxError(f"{len(sft_train)} SFT sequences, fewer than trainer.batch_size={cfg.trainer.batch_size}")
    print(f"llmx: SHARP on {cfg.model.name} ({num_layers} layers): replacing {replaced}; text: {n_eval} x "
          f"{cfg.data.seq_len} held-out tokens; instructions: {train_stats['examples']} training examples in "
          f"{len(sft_train)} sequences, {len(sft_val)} held-out sequences", flush=True)
    return SimpleNamespace(model=model, tok=tok, device=device, replaced=replaced, text_train=text_train,
                           text_windows=text_windows, sources=sources, sft_train=sft_train, sft_val=sft_val,
                           train_stats=train_stats, val_stats=val_stats)


def evaluate(ctx: SimpleNamespace, tag: str) -> Dict[str, Any]:
    """Perplexity of ctx.model on the held-out text windows and instruction responses."""
    from llmx.sparse.evaluate import perplexity

    t0 = time.perf_counter()
    text = perplexity(ctx.model, ctx.text_windows)
    inst = _instruction_ppl(ctx.model, ctx.sft_val, ctx.device)
    row = {"variant": tag, "ppl_text": text["ppl"], "ppl_instruct": inst["ppl"],
           "text_tokens": text["tokens"], "instruct_tokens": inst["tokens"]}
    print(f"llmx: {tag}: text ppl {text['ppl']:.3f}, instruction ppl {inst['ppl']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def main(cfg) -> Dict[str, Any]:
    from llmx.models import load_pretrained

    sh = cfg.sparsify.sharp
    run_dir = Path(cfg.run_dir)
    # 1. Model, text (perplexity; SLW with slw.data=text) and instruction data (SLW by default; SFT; perplexity).
    ctx = prepare(cfg)
    model, tok, device, replaced = ctx.model, ctx.tok, ctx.device, ctx.replaced
    text_train, sft_train, sft_val, sources = ctx.text_train, ctx.sft_train, ctx.sft_val, ctx.sources
    train_stats, val_stats = ctx.train_stats, ctx.val_stats

    # 2. The original: perplexities, storage, and the MLP inputs/outputs of the layers to be replaced.
    rows: List[Dict[str, Any]] = [evaluate(ctx, "original")]
    before = mlp_storage(model)
    calib, keep = calibration(sft_train if sh.slw.data == "sft" else text_train, sh.slw.sequences, cfg.seed,
                              packed=sh.slw.data == "sft")
    io = capture_mlp_io(model, replaced, calib, max_tokens=sh.slw.max_tokens, keep=keep) if sh.slw.steps else {}
    calib_stats = {"sequences": len(calib), "positions": sum(c.numel() for c in calib),
                   "padding_dropped": sum(int((~k).sum()) for k in keep) if keep else 0}
    print(f"llmx: SLW calibration: {calib_stats['sequences']} sequences, {calib_stats['positions']} positions, "
          f"{calib_stats['padding_dropped']} padding positions dropped", flush=True)

    # 3. Direct Sharing (no recovery), then the recovery modules at their initial values.
    recovery, targets, reference = enum_value(sh.recovery), list(sh.targets), enum_value(sh.reference)
    rec_dtype = getattr(torch, sh.recovery_dtype) if sh.recovery_dtype else None
    mlp0 = decoder_layers(model)[replaced[0]].mlp
    rank = matched_rank(mlp0, sh.rank, recovery, targets) if sh.match_params else sh.rank
    originals = {i: decoder_layers(model)[i].mlp for i in replaced}
    share_mlps(model, replaced, recovery="none", reference=reference, seed=cfg.seed)
    rows.append(evaluate(ctx, NO_RECOVERY[reference]))
    for i, mlp in originals.items():  # back to the plain model, to share again with recovery
        decoder_layers(model)[i].mlp = mlp
    del originals
    refs = share_mlps(model, replaced, recovery=recovery, rank=rank, targets=targets, init=enum_value(sh.init),
                      reference=reference, seed=cfg.seed, recovery_dtype=rec_dtype)
    after = mlp_storage(model)
    storage = {"mlp_before": before["mlp"], "mlp_after": after["mlp"],
               "mlp_reduction": 1 - after["mlp"] / before["mlp"], "total_before": before["total"],
               "total_after": after["total"], "total_reduction": 1 - after["total"] / before["total"],
               "recovery_parameters": sum(p.numel() for p in recovery_parameters(model)), "rank": rank,
               "references": {str(i): j for i, j in refs.items()}, "reference": reference}
    print(f"llmx: stored MLP parameters {before['mlp'] / 1e6:.2f}M -> {after['mlp'] / 1e6:.2f}M "
          f"({storage['mlp_reduction']:.1%} fewer), {recovery} rank {rank}, "
          f"{storage['recovery_parameters'] / 1e6:.3f}M recovery parameters", flush=True)
    if enum_value(sh.init) == "svd":
        rows.append(evaluate(ctx, "svd init"))

    # 4. Stage 1, SLW: each layer's recovery alone, against the original layer's output (kept in slw/).
    upstream = {"model": cfg.model.name, "layers": replaced, "recovery": recovery, "rank": rank, "targets": targets,
                "init": enum_value(sh.init), "seed": cfg.seed, "reference": reference,
                "recovery_dtype": sh.recovery_dtype, "data": "mixed, padding dropped, whole sequences held out"}
    slw_key = sha256_text(json.dumps({**upstream, "slw": plain(sh.slw), "sources": sources,
                                      "seq_len": sh.sft.seq_len}, sort_keys=True, default=str))
    slw_report = _stage1(model, io, sh.slw, run_dir / "slw", slw_key, cfg.seed) if sh.slw.steps else {}
    del io
    if sh.slw.steps:
        rows.append(evaluate(ctx, "SLW"))

    # 5. Stage 2, SFT: every recovery parameter together, through the trainer core (kept in sft/).
    sft_final = None
    if sh.sft.steps:
        sft_key = sha256_text(slw_key, json.dumps({"sft": plain(sh.sft), "optim": plain(cfg.optim),
                                                   "trainer": plain(cfg.trainer)}, sort_keys=True, default=str))
        sft_final = _stage2(cfg, model, tok, sft_train, sft_val, run_dir / "sft", sft_key, device)
        model.to(device)
        rows.append(evaluate(ctx, "SLW + SFT" if sh.slw.steps else "SFT"))

    # 6. The control: the same recovery modules and SFT on the unshared model.
    if sh.baseline_sft and sh.sft.steps:
        from llmx.sharing.sharp import adapt_mlps

        shared_model = model
        model, _ = load_pretrained(cfg.model)
        model.to(device).eval().requires_grad_(False)
        adapt_mlps(model, replaced, recovery=recovery, rank=rank, targets=targets)
        _stage2(cfg, model, tok, sft_train, sft_val, run_dir / "control_sft", sha256_text(sft_key, "control"), device,
                what="control SFT (same recovery modules on the layers' own MLPs, nothing shared)")
        ctx.model = model.to(device)
        rows.append(evaluate(ctx, "control: SFT, no sharing"))
        ctx.model = model = shared_model

    # 7. Storage: the compact checkpoint, its size and load time against the original's.
    from llmx.models.pretrained import resolve_dtype
    from llmx.sharing import save_compact

    save_dtype = resolve_dtype(sh.save_dtype) if sh.save_dtype else None
    if reference == "adjacent":
        compact = save_compact(model, run_dir / "compact", tok, dtype=save_dtype, overwrite=True,
                               meta={"model": cfg.model.name, "recipe": cfg.name, "storage": storage})
        storage.update(_disk_and_load(cfg, compact, save_dtype, run_dir) if sh.compare_storage else
                       {"compact_bytes": _dir_bytes(compact)})
    else:  # a control measures quality only; the compact format stores SHARP's sharing
        print(f"llmx: reference={reference} is a control: no compact checkpoint", flush=True)

    # 8. The table.
    orig, shared = rows[0], [r for r in rows if not r["variant"].startswith("control")][-1]
    for r in rows:
        r["text_ratio"] = r["ppl_text"] / orig["ppl_text"]
        r["instruct_ratio"] = r["ppl_instruct"] / orig["ppl_instruct"]
    final = {"storage": storage, "rows": rows, "slw": slw_report, "replaced": replaced, "slw_calibration": calib_stats,
             "sft": {k: v for k, v in (sft_final or {}).items() if isinstance(v, (int, float, str))},
             "instruction_data": {"train": train_stats, "validation": val_stats}}
    table = _table(cfg, rows, storage, slw_report, replaced, recovery, rank)
    atomic_write_text(run_dir / "results.md", table)
    atomic_write_json(run_dir / "results.json", final)
    summary = {"mlp_reduction": storage["mlp_reduction"], "ppl_text_original": orig["ppl_text"],
               "ppl_instruct_original": orig["ppl_instruct"],
               # The shared model's last stage: the one compact/ holds, which a later run reads (llmx.models.runs).
               "variant": shared["variant"], "ppl_text": shared["ppl_text"], "text_ratio": shared["text_ratio"]}
    for r in rows[1:]:
        summary[f"text_ratio[{r['variant']}]"] = r["text_ratio"]
        summary[f"instruct_ratio[{r['variant']}]"] = r["instruct_ratio"]
    atomic_write_json(run_dir / "final.json", summary)
    print(table, flush=True)
    return summary


@torch.inference_mode()
def _instruction_ppl(model, items, device) -> Dict[str, float]:
    """Perplexity of the response tokens of packed instruction sequences."""
    from llmx.trainer.trainer import causal_lm_loss, count_targets

    nll, n = 0.0, 0
    for item in items:
        batch = {"input_ids": item[0][None].to(device), "labels": item[1][None].to(device)}
        nll += float(causal_lm_loss(model, batch))
        n += count_targets(batch)
    return {"ppl": math.exp(nll / n), "tokens": n}


def _stage1(model, io, slw, stage_dir: Path, key: str, seed: int) -> Dict[str, Any]:
    from safetensors.torch import load_file, save_file

    shared = shared_layers(model)
    marker = stage_dir / "stage.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        state = load_file(str(stage_dir / "recovery.safetensors"))
        for i, m in shared.items():
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})
        print(f"llmx: SLW: done in an earlier run ({stage_dir})", flush=True)
        return json.loads(marker.read_text())["report"]
    report = {}
    t0 = time.perf_counter()
    for n, (i, m) in enumerate(shared.items()):
        with torch.enable_grad():
            x, y, groups = io[i]
            r = single_layer_warmup(m, x, y, groups=groups, holdout=slw.holdout, steps=slw.steps, lr=slw.lr,
                                    batch_tokens=slw.batch_tokens, seed=seed + i)
        report[str(i)] = r
        print(f"llmx: SLW {n + 1}/{len(shared)}: layer {i}: held-out relative error {r['rel_err_before']:.3f} -> "
              f"{r['rel_err_after']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    state = {f"{i}.{k}": v.detach().cpu().contiguous() for i, m in shared.items() for k, v in m.state_dict().items()}
    save_file(state, str(stage_dir / "recovery.safetensors"))
    atomic_write_json(marker, {"key": key, "report": report})
    return report


def _stage2(cfg, model, tok, train, val, stage_dir: Path, key: str, device, what: str = "SFT") -> Dict[str, Any]:
    """SFT of the recovery parameters with the trainer core; resumes from stage_dir's newest checkpoint."""
    from omegaconf import open_dict

    from llmx.data.instruct import PairLoader, pair_eval_batches
    from llmx.trainer.checkpoint import find_newest
    from llmx.trainer.distributed import init_distributed
    from llmx.trainer.trainer import Trainer

    sh = cfg.sparsify.sharp
    marker = stage_dir / "stage.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        from safetensors.torch import load_file

        state = load_file(str(stage_dir / "recovery.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise LlmxError(f"{stage_dir}: recovery parameters {unexpected[:4]} do not fit this model")
        print(f"llmx: {what}: done in an earlier run ({stage_dir})", flush=True)
        return json.loads(marker.read_text())["final"]
    stage_cfg = copy.deepcopy(cfg)
    with open_dict(stage_cfg):
        stage_cfg.run_dir = str(stage_dir)
        stage_cfg.name = f"{cfg.name}/sft"
        stage_cfg.trainer.max_steps = sh.sft.steps
        stage_cfg.trainer.export_hf = False  # a shared model is not a plain HF checkpoint: compact/ is
        stage_cfg.optim.lr = sh.sft.lr
        stage_cfg.optim.warmup_steps = sh.sft.warmup_steps
        stage_cfg.resume = "auto" if find_newest([stage_dir]) else None
    trainable = freeze_all_but_recovery(model)
    print(f"llmx: {what}: {trainable / 1e6:.3f}M trainable recovery parameters, {sh.sft.steps} steps at lr "
          f"{sh.sft.lr:g}", flush=True)
    info = init_distributed(cfg.trainer.device)
    loader = PairLoader(train, batch_size=cfg.trainer.batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                        seed=cfg.seed, shuffle=True)
    trainer = Trainer(stage_cfg, stage_dir, info, model, loader, val, tokenizer=tok, eval_batches_fn=pair_eval_batches)
    final = trainer.fit()
    model.eval().requires_grad_(False)
    from safetensors.torch import save_file

    rec = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
           if ".mlp.lora." in k or ".mlp.parallel." in k}
    save_file(rec, str(stage_dir / "recovery.safetensors"))
    done = {k: v for k, v in final.items() if isinstance(v, (int, float, str))}
    atomic_write_json(marker, {"key": key, "final": done})
    return done


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _disk_and_load(cfg, compact: Path, save_dtype, run_dir: Path) -> Dict[str, Any]:
    """Weights on disk and load time (best of 3, warm page cache, CPU) of the compact checkpoint against the
    original model saved the same way (safetensors, same dtype) by transformers."""
    import shutil

    from transformers import AutoModelForCausalLM

    from llmx.models import load_pretrained
    from llmx.sharing import load_compact

    original, _ = load_pretrained(cfg.model)
    if save_dtype is not None:
        original.to(save_dtype)
    dtype = next(original.parameters()).dtype
    orig_dir = run_dir / ".original_for_comparison"
    shutil.rmtree(orig_dir, ignore_errors=True)
    original.save_pretrained(orig_dir)
    del original

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            m = fn()
            times.append(time.perf_counter() - t0)
            del m
        return min(times)

    try:
        out = {"original_bytes": _weights_bytes(orig_dir), "compact_bytes": _weights_bytes(compact),
               "original_load_s": best(lambda: AutoModelForCausalLM.from_pretrained(orig_dir, dtype=dtype)),
               "compact_load_s": best(lambda: load_compact(compact)), "dtype": str(dtype).replace("torch.", "")}
    finally:
        shutil.rmtree(orig_dir, ignore_errors=True)
    out["bytes_ratio"] = out["compact_bytes"] / out["original_bytes"]
    out["load_ratio"] = out["compact_load_s"] / out["original_load_s"]
    print(f"llmx: weights on disk {out['original_bytes'] / 1e6:.1f} MB -> {out['compact_bytes'] / 1e6:.1f} MB "
          f"({out['bytes_ratio']:.3f}x); load {out['original_load_s']:.2f} s -> {out['compact_load_s']:.2f} s", flush=True)
    return out


def _table(cfg, rows, storage, slw_report, replaced, recovery: str, rank: int) -> str:
    lines = [f"# {cfg.name}: {cfg.model.name}", "",
             f"Replaced layers {replaced} (references {storage['references']}); recovery {recovery}, rank {rank}; "
             f"stored MLP parameters {storage['mlp_before'] / 1e6:.2f}M -> {storage['mlp_after'] / 1e6:.2f}M "
             f"(**{storage['mlp_reduction']:.1%} fewer**; whole model {storage['total_reduction']:.1%} fewer).", "",
             f"Perplexity on {rows[0]['text_tokens']} held-out text tokens ({cfg.data.name}) and on "
             f"{rows[0]['instruct_tokens']} held-out instruction-response tokens.", "",
             "| variant | text ppl | vs original | instruction ppl | vs original |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ppl_text']:.3f} | {r['text_ratio']:.3f}x | {r['ppl_instruct']:.3f} | "
                     f"{r['instruct_ratio']:.3f}x |")
    if slw_report:
        errs = [(v["rel_err_before"], v["rel_err_after"]) for v in slw_report.values()]
        lines += ["", f"SLW held-out relative error of the replaced MLPs' outputs, mean over layers: "
                      f"{sum(b for b, _ in errs) / len(errs):.3f} (Direct Sharing / init) -> "
                      f"{sum(a for _, a in errs) / len(errs):.3f}."]
    if "original_bytes" in storage:
        lines += ["", f"Weights on disk ({storage['dtype']}): {storage['original_bytes'] / 1e6:.1f} MB -> "
                      f"{storage['compact_bytes'] / 1e6:.1f} MB ({storage['bytes_ratio']:.3f}x); load time "
                      f"{storage['original_load_s']:.2f} s -> {storage['compact_load_s']:.2f} s "
                      f"({storage['load_ratio']:.2f}x)."]
    return "\n".join(lines) + "\n"
