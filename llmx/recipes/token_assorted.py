"""Token Assorted (Su et al., 2025, arXiv 2502.03275): a VQ-VAE turns the first chain-of-thought chunks into latent
tokens, a language model is trained on sequences that mix latent and text tokens, and is compared at equal training
tokens with Sol-Only (prompt then solution) and CoT (prompt, whole chain of thought, solution).

    llmx run recipe=token_assorted_maze_tiny                       # CPU smoke run, about a minute
    llmx run -m recipe=token_assorted_maze latent.variant=sol_only,cot,latent seed=1,2,3
    llmx run recipe=token_assorted_smollm2_math latent.variant=cot  # SmolLM2-135M with the extended vocabulary

The `pretrain` kind runs this file when data.source=latent_cot (llmx/recipes/pretrain.py).

Feature -> config flag:
    task: Keys-Finding Mazes, GSM-Infinite, JSONL   data.latent.task=keys_maze|gsm_infinite|jsonl, data.latent.*
    maze difficulty                                 data.latent.options (MazeSpec fields), data.latent.ops
    what is trained                                 latent.variant=sol_only|cot|latent
    mixing and the paper's ablations                latent.mix=random|all|curriculum|poisson, latent.m_set
    chunk length, compression, codebook             latent.chunk_len, latent.compression, latent.codebook_size
    VQ-VAE size and training; reuse one             latent.vqvae.*, latent.vqvae_dir
    new embedding rows (pretrained models)          latent.embed_noise
    1-Feasible-k sampling, decoding length          latent.samples, latent.top_k, latent.temperature, ...

Task formats. keys_maze: the token serialisation of llmx.bench.keys_maze (prompt, annotated optimal trajectory,
move sequence), on a word-level vocabulary of the maze tokens plus the latent tokens; the model is trained from
scratch. gsm_infinite: the problem and question as the user turn of the model's chat template; the CoT is the
reference solution up to "Answer:", the solution is "Answer: N." closing the turn. jsonl (MetaMathQA's layout):
`query` and `response` fields; the CoT is the response before "The answer is:", the solution the rest.
Loss is on the response (C ⊕ S, or its hybrid), never on the prompt.

Equal training tokens: every variant packs its examples into rows of data.seq_len tokens and trains
trainer.max_steps steps of trainer.batch_size rows, so all variants see the same number of tokens; a shorter
variant sees more examples (epochs). Each epoch draws m afresh per example (mix=random).

The VQ-VAE is part of data preparation: trained on the training examples with the data seed (not the run seed), and
cached by data, tokenizer and settings, so every seed and variant of a study shares one. Every variant uses the
same vocabulary (latent tokens included), so the models have equal parameter counts.

Metrics. keys_maze: 1-Feasible-k, llmx's definition (llmx.bench.keys_maze.one_feasible_k): k sampled answers
(top-k sampling at the given temperature), success if any is feasible, reaches the goal and is as short as the
optimum; also the greedy answer's success rate. Other tasks: greedy accuracy with the task's grader. Tokens per
answer: generated tokens up to end of sequence, latent tokens included.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from llmx.data.instruct import PairLoader, pack_token_pairs, pair_eval_batches, render
from llmx.data.tokenizer import tokenizer_fingerprint
from llmx.latent import hybrid as hy
from llmx.models import build_model, count_parameters, load_pretrained
from llmx.trainer.distributed import barrier, destroy_distributed, init_distributed
from llmx.trainer.trainer import Trainer
from llmx.utils import LlmxError, add_to_final, atomic_write_json, atomic_write_text, cache_dir

TASKS = ("keys_maze", "gsm_infinite", "jsonl")


def main(cfg) -> Dict[str, Any]:
    check_config(cfg)
    info = init_distributed(cfg.trainer.device)
    try:
        run_dir = Path(cfg.run_dir)
        lat, d = cfg.latent, cfg.data.latent
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        # 1-2. Records, tokenizer and model (a pretrained model gains the latent tokens), (P, C, S) ids, and the
        #      VQ-VAE's codes of every example's whole CoT chunks. Rank 0 goes first, so the generated problems
        #      and the VQ-VAE are built once and cached; the other ranks read them.
        t0 = time.perf_counter()
        prepared = prepare(cfg, verbose=True) if info.is_main else None
        barrier()
        if prepared is None:
            prepared = prepare(cfg, verbose=False)
        model, tok, ids, train, val, test, test_rec, codes, val_codes, vq_info = prepared
        torch.manual_seed(cfg.seed)
        data_s = time.perf_counter() - t0

        # 3. Training rows: enough epochs of (re-mixed) examples for max_steps steps, packed to seq_len.
        rows, pack_stats = training_rows(cfg, train, codes, ids, tok)
        val_pairs = hy.training_pairs(val, val_codes, lat.variant, lat.mix, lat.m_set, lat.chunk_len, ids, 1, cfg.seed)
        val_rows, _ = pack_token_pairs(val_pairs, cfg.data.seq_len, pad_id(tok))
        if info.is_main:
            print(f"llmx: {cfg.name}: {lat.variant} on {d.task} ({count_parameters(model) / 1e6:.2f}M parameters); "
                  f"{len(train)} training, {len(val)} validation, {len(test)} test examples ({data_s:.1f}s); "
                  f"{pack_stats['epochs']} epochs packed into {len(rows)} rows of {cfg.data.seq_len} tokens",
                  flush=True)
        loader = PairLoader(rows, batch_size=cfg.trainer.batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                            rank=info.rank, world_size=info.world_size, seed=cfg.seed, shuffle=False)
        trainer = Trainer(cfg, run_dir, info, model, loader, val_rows, tokenizer=tok, eval_batches_fn=pair_eval_batches)
        final = trainer.fit()
        if not info.is_main:
            return final

        # 4. Evaluation on held-out problems (rank 0; under FSDP on the exported copy).
        net = trainer.model if info.world_size == 1 else load_export(run_dir)
        results = evaluate(cfg, net, tok, ids, test_rec, test)
        results.update(variant=lat.variant, mix=lat.mix if lat.variant == "latent" else None, task=d.task,
                       train_examples=len(train), test_examples=len(test), data_seconds=round(data_s, 2),
                       packing=pack_stats, vqvae=vq_info, parameters=count_parameters(net),
                       train_tokens=final["step"] * cfg.trainer.batch_size * cfg.data.seq_len,
                       final={k: final.get(k) for k in ("step", "val_loss", "tokens_per_s")})
        atomic_write_json(run_dir / "results.json", results)
        headline = {k: results[k] for k in ("accuracy", "greedy_accuracy", "tokens_per_answer", "answers_per_s")}
        add_to_final(run_dir, final, headline)
        print(f"llmx: {lat.variant}: {results['metric']} {results['accuracy']:.3f}, "
              f"greedy {results['greedy_accuracy']:.3f}, "
              f"{results['tokens_per_answer']:.1f} tokens per answer; results in {run_dir}", flush=True)
        return {**final, **headline}
    finally:
        destroy_distributed()


def prepare(cfg, verbose: bool):
    lat = cfg.latent
    train_rec, val_rec, test_rec = load_records(cfg)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial model
    model, tok, ids = build_model_and_tokenizer(cfg)
    train, val, test = (triples(cfg, tok, r) for r in (train_rec, val_rec, test_rec))
    vq_info: Dict[str, Any] = {}
    codes = val_codes = None
    if lat.variant == "latent":
        from llmx.latent.vqvae import encode_cot

        vq, vq_info = get_vqvae(cfg, tok, train, val, verbose)
        t1 = time.perf_counter()
        codes, val_codes = encode_cot(vq, train, 256), encode_cot(vq, val, 256)
        vq_info["encode_seconds"] = round(time.perf_counter() - t1, 2)
        hy.check_codes(codes, lat.codebook_size, "training set")
    return model, tok, ids, train, val, test, test_rec, codes, val_codes, vq_info


# ------------------------------------------------------------------------------------------ checks


def check_config(cfg) -> None:
    """Every value that would otherwise fail after the data or the model is built."""
    lat, d = cfg.latent, cfg.data.latent
    if d.task not in TASKS:
        raise LlmxError(f"data.latent.task={d.task!r}; valid: {list(TASKS)}")
    if lat.variant not in hy.VARIANTS:
        raise LlmxError(f"latent.variant={lat.variant!r}; valid: {list(hy.VARIANTS)}")
    if lat.mix not in hy.MIXES:
        raise LlmxError(f"latent.mix={lat.mix!r}; valid: {list(hy.MIXES)}")
    if lat.chunk_len < 1 or lat.compression < 1 or lat.chunk_len % lat.compression:
        raise LlmxError(f"latent.chunk_len={lat.chunk_len} must be a positive multiple of latent.compression="
                        f"{lat.compression}")
    if lat.chunk_len != lat.compression:
        raise LlmxError(f"latent.compression={lat.compression} < chunk_len={lat.chunk_len}: hybrid sequences place "
                        "one latent token per chunk (the paper's L = r = 16); set compression = chunk_len")
    if lat.codebook_size < 2:
        raise LlmxError(f"latent.codebook_size={lat.codebook_size} must be >= 2")
    bad_m = [m for m in lat.m_set if m < 0 or m % lat.chunk_len]
    if not lat.m_set or bad_m:
        raise LlmxError(f"latent.m_set={list(lat.m_set)}: need non-negative multiples of chunk_len={lat.chunk_len}")
    if lat.samples < 1 or lat.top_k < 0 or lat.temperature <= 0 or lat.max_new_tokens < 1:
        raise LlmxError(f"latent.samples={lat.samples} (>= 1), top_k={lat.top_k} (>= 0), temperature="
                        f"{lat.temperature} (> 0), max_new_tokens={lat.max_new_tokens} (>= 1)")
    if min(d.train_examples, d.val_examples, d.test_examples) < 1:
        raise LlmxError(f"data.latent: train_examples={d.train_examples}, val_examples={d.val_examples}, "
                        f"test_examples={d.test_examples} must all be >= 1")
    if d.task == "keys_maze":
        if cfg.model.source != "preset":
            raise LlmxError("data.latent.task=keys_maze trains from scratch on its own vocabulary: use a preset "
                            f"model (model.source=preset), not {cfg.model.source}")
        from llmx.bench import get_bench

        gen = get_bench("keys_maze", **plain(d.options))
        for op in d.ops:
            gen.check_request("train", int(op), 0)
    elif cfg.model.source == "preset":
        raise LlmxError(f"data.latent.task={d.task} is text: use a pretrained model (model=smollm2_135m, ...)")
    if d.task == "gsm_infinite":
        from llmx.bench import get_bench

        gen = get_bench("gsm_infinite")
        for op in d.ops:
            gen.check_request(d.subset, int(op), 0)
    if d.task == "jsonl":
        for p in list(d.paths) + list(d.test_paths):
            if not Path(p).is_file():
                raise LlmxError(f"data.latent.paths: {p} does not exist")
        if not d.paths or not d.test_paths:
            raise LlmxError("data.latent.task=jsonl needs data.latent.paths and data.latent.test_paths")


# ------------------------------------------------------------------------------------------ data


def load_records(cfg) -> Tuple[List[Dict], List[Dict], List[Dict]]:
    d = cfg.data.latent
    if d.task == "jsonl":
        rows = read_jsonl(d.paths, d)
        test = read_jsonl(d.test_paths, d)[: d.test_examples]
        n_val = min(d.val_examples, max(1, len(rows) // 10))
        return rows[n_val: n_val + d.train_examples], rows[:n_val], test
    subset_train, subset_test = ("train", "test") if d.task == "keys_maze" else (d.subset, d.subset)
    train = generate(cfg, subset_train, d.train_examples + d.val_examples, d.seed)
    # Test problems come from their own stream (another subset, or for GSM-Infinite another seed); any that
    # equals a training problem is dropped.
    test = generate(cfg, subset_test, d.test_examples, d.seed if d.task == "keys_maze" else d.seed + 7919)
    seen = {identity(r) for r in train}
    test = [r for r in test if identity(r) not in seen]
    return train[d.val_examples:], train[: d.val_examples], test


def identity(r: Dict) -> str:
    return json.dumps(r["maze"], sort_keys=True) if "maze" in r else r["prompt"]


def generate(cfg, subset: str, n: int, seed: int) -> List[Dict]:
    """`n` problems spread over data.latent.ops, written once through llmx.bench's dataset writer (verified
    by the generator's own solver) and cached by their settings."""
    from llmx.bench import build_plan, generate_dataset, load_bench

    d = cfg.data.latent
    ops = sorted(int(o) for o in d.ops)
    per_op = math.ceil(n / len(ops))
    options = plain(d.options) if d.task == "keys_maze" else {}
    key = hashlib.sha256(json.dumps([d.task, subset, ops, per_op, seed, options], sort_keys=True).encode()).hexdigest()
    out = cache_dir(cfg.data.cache_dir) / "token_assorted" / f"{d.task}-{subset}-{key[:16]}"
    if not (out / "manifest.json").is_file():
        generate_dataset(d.task, build_plan([subset], ["0"], ops, per_op), out, seed=seed, options=options,
                         workers=d.workers, progress=False)
    _, sets = load_bench(out)
    by_op = [[dict(r) for r in ds[f"ops_{op}"]] for ds in sets.values() for op in ops]
    mixed = [r for group in zip(*by_op) for r in group]  # interleave ops so any prefix is balanced
    return mixed[:n]


def plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def read_jsonl(paths: Sequence[str], d) -> List[Dict]:
    rows = []
    for p in paths:
        for i, line in enumerate(Path(p).read_text().splitlines()):
            if not line.strip():
                continue
            r = json.loads(line)
            if d.prompt_field not in r or d.response_field not in r:
                raise LlmxError(f"{p}:{i + 1}: a record needs {d.prompt_field!r} and {d.response_field!r} "
                                f"(data.latent.prompt_field / response_field); it has {sorted(r)}")
            response = str(r[d.response_field])
            cut = response.rfind(d.answer_marker)
            if cut < 0:
                raise LlmxError(f"{p}:{i + 1}: the response has no {d.answer_marker!r} (data.latent.answer_marker)")
            rows.append({"prompt": str(r[d.prompt_field]), "cot": response[:cut].strip(),
                         "final": response[cut:].strip(), "answer": response[cut + len(d.answer_marker):].strip()})
    return rows


def build_model_and_tokenizer(cfg):
    """keys_maze: a word-level tokenizer of the maze tokens and the latent tokens, a preset model of that size.
    Otherwise: the pretrained model and its tokenizer, extended with the latent tokens."""
    lat = cfg.latent
    if cfg.data.latent.task == "keys_maze":
        from llmx.bench.keys_maze import vocab

        tok = word_tokenizer(list(vocab(None)) + hy.latent_tokens(lat.codebook_size))
        model = build_model(cfg.model, vocab_size=len(tok))
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model, tok, hy.latent_ids(tok, lat.codebook_size)
    model, tok = load_pretrained(cfg.model)
    ids = hy.extend_vocabulary(model, tok, lat.codebook_size, noise=lat.embed_noise, seed=cfg.seed)
    return model, tok, ids


def word_tokenizer(tokens: List[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(tokens)}, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>")


def prompt_text(r: Dict) -> str:
    return f"{r['problem']} {r['question']}\nSolve it step by step; end with 'Answer: <number>'."


def split_solution(r: Dict) -> Tuple[str, str]:
    """GSM-Infinite: (CoT, solution) = the reference solution before "Answer:", and "Answer: N." after it."""
    text = r["solution"]
    cut = text.rfind("Answer:")
    return text[:cut].strip(), text[cut:].strip()


def triples(cfg, tok, records: Sequence[Dict]) -> List[hy.Example]:
    """(prompt ids, CoT ids, solution ids) per record; the solution ends the sequence (EOS or end of turn)."""
    task = cfg.data.latent.task
    out = []
    for r in records:
        if task == "keys_maze":
            from llmx.bench.keys_maze import tokens

            p, c, s = tokens(r)
            out.append(tuple(tok.convert_tokens_to_ids(x) for x in (p, c, s)))
            continue
        prompt, (cot, final) = (prompt_text(r), split_solution(r)) if task == "gsm_infinite" else \
            (r["prompt"], (r["cot"], r["final"]))
        p, s = render(tok, prompt, " " + final)
        c = tok(cot, add_special_tokens=False)["input_ids"]
        out.append((p, c, s))
    return out


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def training_rows(cfg, train: List[hy.Example], codes, ids, tok) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
    lat = cfg.latent
    needed = cfg.trainer.max_steps * cfg.trainer.batch_size
    one, _ = pack_token_pairs(hy.training_pairs(train, codes, lat.variant, lat.mix, lat.m_set, lat.chunk_len, ids,
                                                1, cfg.seed), cfg.data.seq_len, pad_id(tok))
    epochs = max(1, math.ceil(needed / max(1, len(one))))
    pairs = hy.training_pairs(train, codes, lat.variant, lat.mix, lat.m_set, lat.chunk_len, ids, epochs, cfg.seed)
    rows, stats = pack_token_pairs(pairs, cfg.data.seq_len, pad_id(tok))
    if stats["truncated"] or stats["skipped"]:
        raise LlmxError(f"data.seq_len={cfg.data.seq_len} is too short: {stats['truncated']} examples would be "
                        f"truncated and {stats['skipped']} skipped; the longest needs "
                        f"{max(len(p) + len(r) for p, r in pairs)} tokens")
    lengths = [len(r) for _, r in pairs]
    stats.update(epochs=epochs, rows=len(rows), mean_response_tokens=sum(lengths) / len(lengths))
    return rows, stats


# ------------------------------------------------------------------------------------------ VQ-VAE


def get_vqvae(cfg, tok, train, val, verbose: bool):
    """The VQ-VAE: latent.vqvae_dir if given (checked against this tokenizer and codebook), else the cached one
    for these data and settings, trained here on first use."""
    from llmx.latent.vqvae import (VQVAE, VQVAEConfig, cot_chunks, evaluate_vqvae, load_vqvae, save_vqvae,
                                   train_vqvae, training_chunks)

    lat, v = cfg.latent, cfg.latent.vqvae
    expect = {"vocab_size": len(tok), "tokenizer": tokenizer_fingerprint(tok), "codebook_size": lat.codebook_size,
              "chunk_len": lat.chunk_len}
    if lat.vqvae_dir:
        return load_vqvae(lat.vqvae_dir, expect=expect), {"dir": str(lat.vqvae_dir), **saved_metrics(lat.vqvae_dir)}
    vcfg = VQVAEConfig(vocab_size=len(tok), pad_id=pad_id(tok), chunk_len=lat.chunk_len, compression=lat.compression,
                       codebook_size=lat.codebook_size, dim=v.dim, layers=v.layers, heads=v.heads,
                       max_prompt_len=v.max_prompt_len, beta=v.beta, codebook_update=v.codebook_update,
                       ema_decay=v.ema_decay, dead_code_steps=v.dead_code_steps)
    data_key = hashlib.sha256(json.dumps([train, val]).encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([vcfg.to_dict(), v.steps, v.batch_size, v.lr, cfg.data.latent.seed, data_key,
                                     expect["tokenizer"]], sort_keys=True).encode()).hexdigest()[:16]
    where = cache_dir(cfg.data.cache_dir) / "token_assorted" / f"vqvae-{key}"
    if (where / "config.json").is_file():
        return load_vqvae(where, expect=expect), {"dir": str(where), "cached": True, **saved_metrics(where)}
    torch.manual_seed(cfg.data.latent.seed)
    model = VQVAE(vcfg)
    items = training_chunks(train, lat.chunk_len, vcfg.pad_id)
    val_items = training_chunks(val, lat.chunk_len, vcfg.pad_id)
    t0 = time.perf_counter()
    log = (lambda msg: print(f"llmx: vqvae: {msg}", flush=True)) if verbose else (lambda msg: None)
    train_vqvae(model, items, val_items, steps=v.steps, batch_size=v.batch_size, lr=v.lr, seed=cfg.data.latent.seed,
                log=log)
    cot_items = [item for p, c, _ in val for item in cot_chunks(p, c, lat.chunk_len)]
    cot_metrics = evaluate_vqvae(model, cot_items, 256) if cot_items else {}
    metrics = {**evaluate_vqvae(model, val_items, 256), "train_seconds": round(time.perf_counter() - t0, 1),
               **{f"cot_{k}": v for k, v in cot_metrics.items()},
               "train_chunks": len(items), "parameters": sum(p.numel() for p in model.parameters())}
    log(f"validation token accuracy {metrics['token_acc']:.3f} (CoT chunks {metrics.get('cot_token_acc', 0):.3f}), "
        f"codebook usage {metrics['codebook_usage']:.2f}, perplexity {metrics['perplexity']:.1f}")
    save_vqvae(model, where, extra={**expect, "metrics": metrics})
    return model, {"dir": str(where), "cached": False, **metrics}


def saved_metrics(where) -> Dict[str, Any]:
    """The quality figures a VQ-VAE was saved with (by this recipe; one trained elsewhere may have none)."""
    return json.loads((Path(where) / "config.json").read_text()).get("extra", {}).get("metrics", {})


# ------------------------------------------------------------------------------------------ evaluation


def load_export(run_dir: Path):
    from transformers import AutoModelForCausalLM

    if not (run_dir / "hf").is_dir():
        raise LlmxError("a multi-process token_assorted run evaluates its Hugging Face export: set "
                        "trainer.export_hf=true")
    return AutoModelForCausalLM.from_pretrained(run_dir / "hf")


def evaluate(cfg, model, tok, ids: hy.LatentIds, records: List[Dict], examples: List[hy.Example]) -> Dict[str, Any]:
    from llmx.bench.backends import HFBackend

    lat, task = cfg.latent, cfg.data.latent.task
    device = next(model.parameters()).device
    prompts = [list(p) for p, _, _ in examples]
    k = lat.samples if task == "keys_maze" else 1
    greedy = HFBackend(model, tok, batch_size=lat.eval_batch_size, max_new_tokens=lat.max_new_tokens,
                       chat_template=False, device=device)
    t0 = time.perf_counter()
    greedy_out = greedy.generate_rows(prompts, [(str(i), 0) for i in range(len(prompts))])
    greedy_s = time.perf_counter() - t0
    sampled = None
    if k > 1:
        sampler = HFBackend(model, tok, batch_size=lat.eval_batch_size, max_new_tokens=lat.max_new_tokens,
                            temperature=lat.temperature, top_k=lat.top_k, seed=cfg.seed, chat_template=False,
                            device=device)
        rows = [(str(i), j) for i in range(len(prompts)) for j in range(k)]
        flat = sampler.generate_rows([prompts[int(i)] for i, _ in rows], rows)
        sampled = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
    judge = maze_judge if task == "keys_maze" else text_judge(cfg)
    per_op: Dict[str, List[float]] = defaultdict(list)
    greedy_ok, ok, lines = [], [], []
    for i, (r, g) in enumerate(zip(records, greedy_out)):
        g_ok = judge(r, [g], tok, ids)
        s_ok = judge(r, sampled[i], tok, ids) if sampled else g_ok
        greedy_ok.append(g_ok)
        ok.append(s_ok)
        per_op[str(r.get("op", 0))].append(float(s_ok))
        lines.append(json.dumps({"id": r.get("id", i), "op": r.get("op"), "greedy": tok.decode(g), "greedy_ok": g_ok,
                                 "ok": s_ok, "tokens": len(g), "latent_tokens": sum(map(ids.is_latent, g))}))
    atomic_write_text(Path(cfg.run_dir) / "test_answers.jsonl", "\n".join(lines) + "\n")
    lengths = [len(g) for g in greedy_out]
    n = len(records)
    return {
        "metric": f"1-Feasible-{k}" if k > 1 else "accuracy",
        "accuracy": sum(ok) / n, "accuracy_se": se(ok), "greedy_accuracy": sum(greedy_ok) / n,
        "accuracy_by_op": {op: [sum(v) / len(v), len(v)] for op, v in sorted(per_op.items())},
        "tokens_per_answer": sum(lengths) / n,
        "latent_tokens_per_answer": sum(sum(map(ids.is_latent, g)) for g in greedy_out) / n,
        "sampled_tokens_per_answer": (sum(len(x) for s in sampled for x in s) / (n * k)) if sampled else None,
        "reference_response_tokens": sum(len(c) + len(s) for _, c, s in examples) / n,
        "decode_seconds": round(greedy_s, 2), "answers_per_s": n / greedy_s, "tokens_per_s": sum(lengths) / greedy_s,
        "decoding": {"greedy": True, "samples": k, "top_k": lat.top_k, "temperature": lat.temperature,
                     "max_new_tokens": lat.max_new_tokens},
    }


def se(values: Sequence[bool]) -> float:
    n = len(values)
    p = sum(values) / n
    return math.sqrt(p * (1 - p) / n) if n > 1 else 0.0


def maze_judge(record: Dict, answers: Sequence[List[int]], tok, ids: hy.LatentIds) -> bool:
    """1-Feasible-k over the answers: any feasible, goal-reaching answer as short as the optimum."""
    from llmx.bench.keys_maze import one_feasible_k, parse_solution

    plans = [parse_solution(tok.convert_ids_to_tokens(hy.strip_latents(a, ids))) for a in answers]
    return bool(one_feasible_k(record["maze"], plans, record["optimal_len"]))


def text_judge(cfg):
    task = cfg.data.latent.task
    if task == "gsm_infinite":
        from llmx.bench import get_bench

        gen = get_bench("gsm_infinite")
        def gsm_judge(r, answers, tok, ids):
            return any(gen.grade(tok.decode(hy.strip_latents(a, ids), skip_special_tokens=True), r) for a in answers)

        return gsm_judge

    def jsonl_judge(r, answers, tok, ids):
        marker = re.escape(cfg.data.latent.answer_marker)
        for a in answers:
            text = tok.decode(hy.strip_latents(a, ids), skip_special_tokens=True)
            m = re.search(marker + r"\s*(.+)", text)
            if m and normalise(m.group(1)) == normalise(r["answer"]):
                return True
        return False

    return jsonl_judge


def normalise(answer: str) -> str:
    return re.sub(r"\s+", "", answer).rstrip(".").lower()

