"""merge recipe: weight-space merging of Hugging Face checkpoints, and a CPU demonstration of ParamΔ.

    llmx run recipe=paramdelta_tiny            # train base, post, base', post' on CPU, merge, evaluate (~6-9 min)
    llmx run recipe=paramdelta_llama3_70b      # Llama-3-70B-Instruct - Llama-3-70B + Llama-3.1-70B
    llmx run recipe=paramdelta_llama3_70b merge.post=/models/L3-70B-Instruct merge.base=/models/L3-70B \\
        merge.new_base=/models/L3.1-70B merge.out_dir=/models/L3.1-70B-ParamDelta
    llmx run recipe=merge_models merge=ties merge.base=/m/base \\
        'merge.models=[{path: /m/math, weight: 1.0}, {path: /m/code, weight: 1.0}]'

Feature -> config flag:
    method                                   merge=paramdelta|task_arithmetic|linear|ties|dare (merge.method)
    ParamΔ inputs and scale                  merge.post, merge.base, merge.new_base, merge.scale
    other methods' inputs and weights        merge.base, merge.models=[{path, weight}], merge.params
    which tensors are merged                 merge.include / merge.exclude (name patterns)
    vocabulary-size mismatch                 merge.vocab_policy=error|post|new_base
    saved / arithmetic dtype                 merge.dtype (null: the inputs'), merge.compute_dtype
    output                                   merge.out_dir (null: <run_dir>/merged), merge.shard_size
    pickle weights (.bin), weights_only      merge.allow_pickle=true
    the demonstration's stages               merge.demo.{pretrain,post_train,continue_pretrain}.{max_steps,lr,...}

Inputs are local directories or hub ids (downloaded with huggingface_hub when not local). Every config
error (method, paths, policy, sizes) is reported before anything is read or trained.

Plain mode (merge.demo is null) merges the configured checkpoints with llmx.merge, streaming tensor by
tensor, and writes results.md / results.json / final.json next to the output's manifest.

Demonstration mode (paramdelta_tiny) makes the paper's setting small enough for a laptop, in one run:
  1. base:  a tiny Llama pretrained from scratch on corpus A: the data group (the pydoc corpus) plus the
            pretrain stage's generator (there: plain sums "3 + 4 = 7" and facts about some fictional people);
  2. post:  base post-trained on a task: answer "Q: 3 + 4 = ? A:" with " 7" (llmx.data.synthetic's arithmetic
            generator), loss on the answer tokens only (merge.demo.answer_only_loss), with corpus A replayed
            (merge.demo.<stage>.replay);
  3. base': base pretrained further on corpus B, text it never saw: facts about other fictional people
            ("Kalo lives in Quenmar."; llmx.data.synthetic.facts), with corpus A replayed;
  4. post': base' post-trained with post's recipe (same data, steps, learning rate, seeds): the paper's
            Θ'_post, what ParamΔ stands in for (Llama-3.1-Instruct against the ParamΔ of Llama-3-Instruct,
            Llama-3 and Llama-3.1: "about 95% of Llama3.1-inst's performance", arXiv 2504.21023);
  5. ParamΔ = post - base + base' (llmx.merge.paramdelta), no training;
  6. all five evaluated on held-out task questions (greedy exact match; the evaluation's questions are
     removed from the post-training data), held-out corpus-B loss and fact recall (greedy completion of
     "Kalo lives in", "Kalo works as a", "Kalo keeps a"), and held-out corpus-A loss. ParamΔ's task
     accuracy is reported as a share of post''s (the paper's measure) and of post's.
The settings were tuned on seeds 0, 1, 2; BENCHMARKS.md reports seeds 10-14, never used for tuning
(scripts/paramdelta_seeds.py: mean ± standard error over runs).
One tokenizer for every stage: data.tokenizer trained on the union of all the corpora. Each stage's output
is kept in <run_dir>/stages/<stage>/ with a stage.json naming what produced it: rerunning with
hydra.run.dir=<that run dir> skips finished stages (a changed stage config is refused), and an unfinished
stage resumes from its newest checkpoint. Outputs: results.md, results.json, final.json.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, cache_dir, enum_value, plain, sha256_text

STAGES = ("pretrain", "post_train", "continue_pretrain")  # the demonstration's training recipes (merge.demo.*)
N_STEPS = 6  # base, post, base', post' (base' post-trained with post's recipe), ParamΔ, evaluation
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")



def main(cfg) -> Dict[str, Any]:
    check_config(cfg)  # every problem of the config, in one error, before any work
    if cfg.merge.demo is None:
        return merge_checkpoints(cfg)
    return paramdelta_demo(cfg)


# ------------------------------------------------------------------------------------------ validation


def check_config(cfg) -> None:
    """Raise one LlmxError listing every problem of cfg.merge (and of the demo's stages)."""
    m, problems = cfg.merge, []
    method = enum_value(m.method)
    demo = m.demo is not None

    def path_problem(key: str, value: Optional[str]) -> None:
        if value is None or not str(value).strip():
            return
        p = Path(str(value)).expanduser()
        if p.is_dir():
            return
        if p.exists():
            problems.append(f"merge.{key}={value}: not a directory (a Hugging Face model directory is expected)")
        elif not HUB_ID.match(str(value)) or str(value).startswith((".", "~")):
            problems.append(f"merge.{key}={value}: no such directory (give a local model directory or a hub id "
                            "such as meta-llama/Meta-Llama-3-70B)")

    if demo:
        if method != "paramdelta":
            problems.append(f"merge.method={method}: the demonstration (merge.demo) builds a ParamΔ model; "
                            "use merge=paramdelta or set merge.demo=null")
        for key in ("post", "base", "new_base"):
            if m[key] is not None:
                problems.append(f"merge.{key}={m[key]}: the demonstration trains its own inputs; leave it null "
                                "or set merge.demo=null to merge existing checkpoints")
        if enum_value(cfg.model.source) != "preset":
            problems.append(f"model={cfg.model.name}: the demonstration trains a base from scratch and needs a "
                            "preset model (model.source=preset)")
        for stage in STAGES:
            s = m.demo[stage]
            if s.max_steps < 1:
                problems.append(f"merge.demo.{stage}.max_steps={s.max_steps}: must be >= 1")
            if not s.lr > 0:
                problems.append(f"merge.demo.{stage}.lr={s.lr}: must be > 0")
            if not 0.0 <= s.replay < 1.0:
                problems.append(f"merge.demo.{stage}.replay={s.replay}: must be a share in [0, 1)")
            if s.generator is not None:
                from llmx.data.synthetic import GENERATORS

                if s.generator not in GENERATORS:
                    problems.append(f"merge.demo.{stage}.generator={s.generator}: not a registered generator; "
                                    f"registered: {', '.join(sorted(GENERATORS))}")
        if m.demo.post_train.generator is None or m.demo.continue_pretrain.generator is None:
            problems.append("merge.demo.post_train.generator and merge.demo.continue_pretrain.generator must name "
                            "synthetic generators (the task and corpus B); only pretrain reads the data group")
        if m.demo.eval_questions < 1:
            problems.append(f"merge.demo.eval_questions={m.demo.eval_questions}: must be >= 1")
    elif method == "paramdelta":
        for key in ("post", "base", "new_base"):
            if m[key] is None or not str(m[key]).strip():
                problems.append(f"merge.{key} is required by method paramdelta (new_base + scale * (post - base))")
        if len(m.models):
            problems.append("merge.models is for task_arithmetic, linear, ties and dare; paramdelta reads "
                            "merge.post, merge.base and merge.new_base")
    else:
        from llmx.merge.engine import METHOD_PARAMS

        unknown = sorted(set(m.params) - set(METHOD_PARAMS[method]))
        if unknown:
            problems.append(f"merge.params: {', '.join(unknown)} not parameters of {method}; valid: "
                            f"{', '.join(METHOD_PARAMS[method])}")
        if method == "linear" and m.base is not None:
            problems.append(f"merge.base={m.base}: linear averages the models and takes no base; use "
                            "merge=task_arithmetic to add deltas to a base")
        if not len(m.models):
            problems.append(f"merge.models is empty: method {method} needs at least one "
                            "{path: <model dir>, weight: <float>}")
        if method in NEEDS_BASE and (m.base is None or not str(m.base).strip()):
            problems.append(f"merge.base is required by method {method} (the models' deltas are taken from it)")
        for key in ("post", "new_base"):
            if m[key] is not None:
                problems.append(f"merge.{key} is ParamΔ's input; method {method} reads merge.base and merge.models")
        if m.scale != 1.0:
            problems.append(f"merge.scale={m.scale} is ParamΔ's; method {method} takes weights in merge.models "
                            "and its own parameters in merge.params")
    if method == "paramdelta":
        if len(m.params):
            problems.append(f"merge.params={dict(m.params)}: paramdelta has no parameters besides merge.scale")
        for key in ("config_from", "tokenizer_from"):
            if m[key] is not None:
                problems.append(f"merge.{key}={m[key]}: paramdelta takes config.json from new_base and the "
                                "tokenizer from post")
    if not math.isfinite(m.scale):
        problems.append(f"merge.scale={m.scale}: must be a finite number")
    for i, entry in enumerate(m.models):
        if not str(entry.path).strip():
            problems.append(f"merge.models[{i}].path is empty")
        if not math.isfinite(entry.weight):
            problems.append(f"merge.models[{i}].weight={entry.weight}: must be a finite number")
        path_problem(f"models[{i}].path", entry.path)
    for key in ("post", "base", "new_base", "config_from", "tokenizer_from"):
        path_problem(key, m[key])
    from llmx.merge.io import parse_size

    try:
        parse_size(str(m.shard_size))
    except ValueError as e:
        problems.append(f"merge.shard_size={m.shard_size}: {e}")
    if m.out_dir and Path(m.out_dir).expanduser().exists() and not m.overwrite and not demo:
        problems.append(f"merge.out_dir={m.out_dir} exists; choose another or set merge.overwrite=true")
    if problems:
        raise LlmxError("merge config: " + "; ".join(problems))


def _resolve(path: str, key: str) -> Path:
    """A local directory for the input merge.<key>: the directory itself (an earlier llmx run: its hf/ or merged/
    output, llmx.models.runs), or a hub snapshot (downloaded)."""
    from llmx.models.runs import find_output

    p = Path(path).expanduser()
    out = find_output(p)
    if out is not None:
        if out.kind != "hf":
            raise LlmxError(f"merge.{key}={path}: {out.what} is not a full set of weights; merging reads Hugging Face "
                            "directories (a trainer run's hf/, a merge's merged/)")
        return out.path
    if p.is_dir():
        return p.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                            "*.txt", "*.jinja"]))
    except Exception as e:  # offline, gated, or no such repository
        raise LlmxError(f"merge.{key}={path}: not a local directory, and downloading it from the hub failed: "
                        f"{e}") from e


def _merge_kwargs(cfg) -> Dict[str, Any]:
    m = cfg.merge
    return {
        "include": list(m.include) or None,
        "exclude": list(m.exclude) or None,
        "vocab_policy": enum_value(m.vocab_policy),
        "dtype": getattr(torch, enum_value(m.dtype)) if m.dtype is not None else None,
        "compute_dtype": getattr(torch, enum_value(m.compute_dtype)),
        "allow_pickle": m.allow_pickle,
        "shard_size": str(m.shard_size),
        "overwrite": bool(m.overwrite),
        "log": lambda msg: print(f"llmx: {msg}", flush=True),
    }


def _quiet_log(msg: str) -> None:
    if " tensors, " not in msg:  # the per-tensor progress lines say nothing for a model of a few MB
        print(f"llmx: {msg}", flush=True)


# ---------------------------------------------------------------------------------------- plain mode


def merge_checkpoints(cfg) -> Dict[str, Any]:
    from llmx.merge import load_manifest, merge, paramdelta

    m, run_dir = cfg.merge, Path(cfg.run_dir)
    method = enum_value(m.method)
    out = Path(m.out_dir).expanduser() if m.out_dir else run_dir / "merged"
    t0 = time.perf_counter()
    if method == "paramdelta":
        inputs = {k: _resolve(m[k], k) for k in ("post", "base", "new_base")}
        print(f"llmx: ParamΔ = {inputs['new_base']} + {m.scale:g} x ({inputs['post']} - {inputs['base']})", flush=True)
        paramdelta(inputs["post"], inputs["base"], inputs["new_base"], out, scale=float(m.scale), **_merge_kwargs(cfg))
    else:
        models = [(_resolve(e.path, f"models[{i}].path"), float(e.weight)) for i, e in enumerate(m.models)]
        inputs = {f"model{i}": p for i, (p, _) in enumerate(models)}
        base = _resolve(m.base, "base") if m.base else None
        if base is not None:
            inputs["base"] = base
        print(f"llmx: {method} of {len(models)} models" + (f" on base {base}" if base else ""), flush=True)
        merge(method, out, models=models, base=base, params=dict(m.params) or None,
              config_from=_resolve(m.config_from, "config_from") if m.config_from else None,
              tokenizer_from=_resolve(m.tokenizer_from, "tokenizer_from") if m.tokenizer_from else None,
              seed=cfg.seed, **_merge_kwargs(cfg))
    seconds = time.perf_counter() - t0
    manifest = load_manifest(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    final = {"method": method, "out_dir": str(out), "seconds": round(seconds, 2), "output_bytes": size,
             "throughput_gb_per_s": round(size / 1e9 / seconds, 3) if seconds > 0 else None,
             "peak_rss_mb": round(_peak_rss_mb(), 1)}
    lines = [f"# {cfg.name}: {method}", "", "| input | path |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in inputs.items()]
    lines += ["", f"Output: `{out}` ({size / 1e9:.3f} GB of safetensors), written in {seconds:.1f} s "
                  f"({final['throughput_gb_per_s']} GB/s), peak RSS {final['peak_rss_mb']:.0f} MB.", ""]
    atomic_write_text(run_dir / "results.md", "\n".join(lines) + "\n")
    atomic_write_json(run_dir / "results.json", {**final, "inputs": {k: str(v) for k, v in inputs.items()},
                                                 "manifest": manifest})
    atomic_write_json(run_dir / "final.json", final)
    print("\n".join(lines), flush=True)
    return final


def _peak_rss_mb() -> float:
    from llmx.trainer.trainer import peak_memory_mb

    return peak_memory_mb(torch.device("cpu"))


# ---------------------------------------------------------------------------------- demonstration mode


def paramdelta_demo(cfg) -> Dict[str, Any]:
    import os

    from llmx.data import build_datasets
    from llmx.data.tokenizer import tokenizer_fingerprint
    from llmx.trainer.distributed import DistInfo, pick_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlmxError("the ParamΔ demonstration runs in one process (launcher=local)")
    d, run_dir = cfg.merge.demo, Path(cfg.run_dir)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=pick_device(cfg.trainer.device, 0))
    # Corpus A: the data group, plus the pretrain stage's generator when set. The other stages: their generator.
    data = {s: _stage_data(cfg, s) for s in STAGES if d[s].generator is not None}
    corpus_a_parts = [cfg.data] + ([data["pretrain"]] if "pretrain" in data else [])

    # 0. One tokenizer for every stage, trained on the union of the corpora.
    tok = _shared_tokenizer(cfg, corpus_a_parts + [data["post_train"], data["continue_pretrain"]])
    tok_sha = tokenizer_fingerprint(tok)
    corpus_a = _corpus_a(corpus_a_parts, tok, d.eval_sequences)
    corpus_b = build_datasets(data["continue_pretrain"], tok)
    task_train, task_questions = _task_data(data["post_train"], tok, cfg.data.seq_len, d.answer_only_loss,
                                            d.eval_questions)
    print(f"llmx: {cfg.name}: tokenizer of {len(tok)} tokens; corpus A {len(corpus_a[0])} blocks, corpus B "
          f"{len(corpus_b[0])} blocks, task {len(task_train[0])} sequences, {len(task_questions)} held-out "
          f"questions", flush=True)
    stages = run_dir / "stages"
    dirs = {"base": stages / "base", "post": stages / "post", "base_prime": stages / "base_prime",
            "post_prime": stages / "post_prime", "paramdelta": stages / "paramdelta"}

    # 1. base: pretrain from scratch on corpus A.
    def fresh_model():
        from llmx.models import build_model

        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, vocab_size=len(tok), device="cpu")

    key = {"tokenizer": tok_sha, "model": plain(cfg.model), "seed": cfg.seed}
    base = _train_stage(cfg, "pretrain", dirs["base"], key, info, tok, fresh_model, corpus_a, number=1)
    # 2. post: the base post-trained on the task.
    key_b = {**key, "from": base["key"]}
    post = _train_stage(cfg, "post_train", dirs["post"], key_b, info, tok, lambda: _load(dirs["base"] / "hf"),
                        task_train, corpus_a[0], sft=True, number=2)
    # 3. base': the base pretrained further on corpus B.
    base_prime = _train_stage(cfg, "continue_pretrain", dirs["base_prime"], key_b, info, tok,
                              lambda: _load(dirs["base"] / "hf"), corpus_b, corpus_a[0], number=3)
    # 4. post' (the paper's Θ'_post, what ParamΔ stands in for): base' post-trained with post's recipe (same
    #    data, steps, learning rate and seeds), as Llama-3.1-Instruct is Llama-3.1 post-trained.
    post_prime = _train_stage(cfg, "post_train", dirs["post_prime"], {**key, "from": base_prime["key"]}, info, tok,
                              lambda: _load(dirs["base_prime"] / "hf"), task_train, corpus_a[0], sft=True, number=4)

    # 5. ParamΔ = post - base + base' (no training).
    merged = dirs["paramdelta"]
    merge_fields = {k: plain(cfg.merge)[k] for k in ("scale", "include", "exclude", "vocab_policy", "dtype",
                                                      "compute_dtype")}
    merge_key = sha256_text(post["key"], base["key"], base_prime["key"], json.dumps(merge_fields, sort_keys=True))
    if _stage_done(merged, merge_key, "paramdelta"):
        print(f"llmx: stage 5/{N_STEPS} paramdelta: done in an earlier run ({merged})", flush=True)
    else:
        from llmx.merge import paramdelta

        print(f"llmx: stage 5/{N_STEPS} paramdelta: post - base + base'", flush=True)
        t0 = time.perf_counter()
        # overwrite: a merge published by a run that died before writing stage.json is redone.
        paramdelta(dirs["post"] / "hf", dirs["base"] / "hf", dirs["base_prime"] / "hf", merged / "hf",
                   scale=float(cfg.merge.scale), **{**_merge_kwargs(cfg), "overwrite": True, "log": _quiet_log})
        atomic_write_json(merged / "stage.json", {"key": merge_key, "seconds": round(time.perf_counter() - t0, 2)})

    # 6. Evaluate the five models on the task, corpus B and corpus A (all held out).
    probes = _fact_probes(data["continue_pretrain"])
    models = [("base", "pretrained on corpus A", dirs["base"]),
              ("base'", "base + continued pretraining on corpus B", dirs["base_prime"]),
              ("post", "base + post-training on the task", dirs["post"]),
              ("post'", "base' + the same post-training (the paper's target)", dirs["post_prime"]),
              ("ParamΔ", "post - base + base' (no training)", merged)]
    rows = [_evaluate(cfg, name, what, where / "hf", tok, task_questions, corpus_a[1], corpus_b[1], probes,
                      info.device) for name, what, where in models]
    final = _demo_final(rows, len(task_questions), probes,
                        {"base": base, "post": post, "base_prime": base_prime, "post_prime": post_prime})
    table = _demo_table(cfg, rows, final, len(task_questions), len(probes))
    atomic_write_text(run_dir / "results.md", table)
    atomic_write_json(run_dir / "results.json", rows)
    atomic_write_json(run_dir / "final.json", final)
    print(table, flush=True)
    return final


def _evaluate(cfg, name, what, hf_dir: Path, tok, questions, val_a, val_b, probes, device) -> Dict[str, Any]:
    d = cfg.merge.demo
    model = _load(hf_dir).to(device).eval()
    row = {"model": name, "what": what, "dir": str(hf_dir),
           "task_accuracy": _exact_match(model, tok, questions, d.max_answer_tokens, device),
           "corpus_b_loss": _mean_loss(model, val_b, d.eval_sequences, cfg.trainer.micro_batch_size, device),
           "corpus_a_loss": _mean_loss(model, val_a, d.eval_sequences, cfg.trainer.micro_batch_size, device)}
    if probes:
        longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for _, a in probes)
        row["fact_recall"] = _exact_match(model, tok, probes, longest + 1, device, stop=r"[.\n]")
    print(f"llmx: {name}: task accuracy {row['task_accuracy']:.3f}, corpus B loss {row['corpus_b_loss']:.4f}"
          + (f", fact recall {row['fact_recall']:.3f}" if probes else "")
          + f", corpus A loss {row['corpus_a_loss']:.4f}", flush=True)
    return row


DEMO_KEYS = [("base", "base"), ("base_prime", "base'"), ("post", "post"), ("post_prime", "post'"),
             ("paramdelta", "ParamΔ")]


def _demo_final(rows, n_questions: int, probes, stages: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """final.json: every model's metrics, and ParamΔ's task accuracy as a share of post' (the paper's
    measure: ParamΔ stands in for post-training the new base) and of post (null where the denominator is 0)."""
    by = {r["model"]: r for r in rows}
    metrics = ["task_accuracy", "corpus_b_loss", "corpus_a_loss"] + (["fact_recall"] if probes else [])
    final = {f"{m}_{k}": by[name][m] for m in metrics for k, name in DEMO_KEYS}
    ours = by["ParamΔ"]["task_accuracy"]
    for k, name in [("post_prime", "post'"), ("post", "post")]:
        final[f"task_share_of_{k}"] = ours / by[name]["task_accuracy"] if by[name]["task_accuracy"] > 0 else None
    final["task_questions"] = n_questions
    final["stage_seconds"] = {k: s["seconds"] for k, s in stages.items()}
    return final


def _stage_data(cfg, stage: str):
    """The data config of a stage: the data group with the stage's synthetic generator."""
    s = cfg.merge.demo[stage]
    data = copy.deepcopy(cfg.data)
    data.name, data.source, data.generator = s.generator, "synthetic", s.generator
    data.generator_args = s.generator_args
    data.val_paths = []
    return data


def _shared_tokenizer(cfg, data_cfgs):
    from llmx.data import build_tokenizer
    from llmx.data.tokenizer import train_bpe, training_text

    if enum_value(cfg.data.tokenizer.source) != "trained":
        return build_tokenizer(cfg.data)  # a pretrained tokenizer is shared as it is
    texts, shas = [], []
    for data_cfg in data_cfgs:
        t, sha = training_text(data_cfg)
        texts += t
        shas.append(sha)
    return train_bpe(texts, cfg.data.tokenizer.vocab_size, cache_dir(cfg.data.cache_dir) / "tokenizers",
                     sha256_text(*shas))


def _corpus_a(parts, tok, eval_sequences: int):
    """(train, val) of corpus A over its parts: every training block of each part, and the first
    eval_sequences / len(parts) validation blocks of each, so each part weighs the same in the loss."""
    from llmx.data import build_datasets

    built = [build_datasets(p, tok) for p in parts]
    per_part = max(1, eval_sequences // len(parts))
    val = [v[i] for _, v in built for i in range(min(len(v), per_part))]
    return torch.utils.data.ConcatDataset([t for t, _ in built]), val


def _load(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)


def _stage_done(stage_dir: Path, key: str, stage: str) -> bool:
    marker = stage_dir / "stage.json"
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text()).get("key")
    if found != key:
        raise LlmxError(f"{stage_dir}: stage {stage} was produced by a different config (or an earlier stage "
                        "changed); run in a new run directory")
    return True


def _train_stage(cfg, stage: str, stage_dir: Path, upstream: Dict[str, Any], info, tok, make_model, datasets,
                 corpus_a=None, sft: bool = False, number: int = 0) -> Dict[str, Any]:
    """Train one stage with the trainer core (resuming from its own checkpoint if any) and export it to
    stage_dir/hf; skipped when stage.json says it is done with the same config. `stage` names the recipe
    (merge.demo.<stage>); upstream says what the stage starts from, so one recipe can run on two models."""
    from omegaconf import open_dict

    from llmx.data import StepLoader
    from llmx.data.instruct import PairLoader, pair_eval_batches
    from llmx.trainer.checkpoint import find_newest
    from llmx.trainer.trainer import Trainer

    s = cfg.merge.demo[stage]
    stage_cfg = copy.deepcopy(cfg)
    with open_dict(stage_cfg):
        stage_cfg.name = f"{cfg.name}/{stage_dir.name}"
        stage_cfg.run_dir = str(stage_dir)
        stage_cfg.trainer.max_steps = s.max_steps
        stage_cfg.trainer.export_hf = True
        stage_cfg.optim.lr = s.lr
        stage_cfg.optim.warmup_steps = s.warmup_steps
        if stage != "pretrain":
            stage_cfg.data = _stage_data(cfg, stage)
        stage_cfg.resume = "auto" if find_newest([stage_dir]) else None
    # What the stage's weights depend on (not logging, evaluation or checkpoint cadence).
    weights_from = {k: v for k, v in plain(stage_cfg.trainer).items() if k not in
               ("eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last", "save_final", "export_hf",
                "detect_nan", "max_seconds")}
    recipe = {"stage": stage, "config": plain(s), "trainer": weights_from, "optim": plain(stage_cfg.optim),
              "data": plain(stage_cfg.data), "answer_only": cfg.merge.demo.answer_only_loss if sft else None}
    key = sha256_text(json.dumps({**upstream, **recipe}, sort_keys=True, default=str))
    if _stage_done(stage_dir, key, stage):
        print(f"llmx: stage {number}/{N_STEPS} {stage_dir.name}: done in an earlier run ({stage_dir})", flush=True)
        return json.loads((stage_dir / "stage.json").read_text())
    print(f"llmx: stage {number}/{N_STEPS} {stage_dir.name}: {stage} for {s.max_steps} steps at lr {s.lr:g} on "
          f"{stage_cfg.data.name}" + (f" + {s.generator}" if stage == "pretrain" and s.generator else ""), flush=True)
    train, val = datasets
    if s.replay > 0:
        train = _Replay(train, corpus_a, s.replay, pairs=sft)
    torch.manual_seed(cfg.seed)
    model = make_model()
    loader_cls = PairLoader if sft else StepLoader
    loader = loader_cls(train, batch_size=cfg.trainer.batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                        seed=cfg.seed, shuffle=True)
    trainer = Trainer(stage_cfg, stage_dir, info, model, loader, val, tokenizer=tok,
                      eval_batches_fn=pair_eval_batches if sft else None)
    t0 = time.perf_counter()
    final = trainer.fit()
    # recipe_sha: equal for two stages trained the same way (post and post'), whatever they started from.
    done = {"key": key, "stage": stage, "seed": cfg.seed, "from": upstream.get("from"),
            "recipe_sha": sha256_text(json.dumps(recipe, sort_keys=True, default=str)),
            "seconds": round(time.perf_counter() - t0, 2),
            "final": {k: v for k, v in final.items() if isinstance(v, (int, float, str))}}
    atomic_write_json(stage_dir / "stage.json", done)
    return done


# Post-training data: each item is a [2, seq_len] tensor (input ids, labels), so the loader's stacking works;
# llmx.data.instruct.PairLoader splits it into the {input_ids, labels} batch the trainer's loss takes
# (IGNORE_INDEX where there is no target: the question, and the padding).


def _task_data(data_cfg, tok, seq_len: int, answer_only: bool, n_questions: int):
    """(train, val) post-training sequences and the held-out (prompt, answer) questions.

    Documents of the task generator are lines "<prompt> A: <answer>"; a sequence is EOS (the document
    separator of pretraining) followed by whole examples, each the prompt up to "A:" and the completion
    " <answer>\\n", padded with EOS. Held-out questions: the first n_questions distinct validation-split
    prompts, removed from the training examples.
    """
    from llmx.data.sources import TRAIN, VALIDATION, documents
    from llmx.trainer.trainer import IGNORE_INDEX

    def examples(split: str) -> List[Tuple[str, str]]:
        out = []
        for doc in documents(data_cfg, split).load():
            for line in doc.splitlines():
                if " A: " not in line:
                    raise LlmxError(f"merge.demo.post_train.generator={data_cfg.generator}: the line {line!r} is "
                                    "not '<question> A: <answer>'")
                q, a = line.split(" A: ", 1)
                out.append((q + " A:", " " + a))
        return out

    eos = tok.eos_token_id

    def pack(pairs: List[Tuple[str, str]]) -> List[torch.Tensor]:
        seqs, ids, labels = [], [eos], [IGNORE_INDEX]
        for prompt, answer in pairs:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            c = tok(answer + "\n", add_special_tokens=False)["input_ids"]
            if 1 + len(p) + len(c) > seq_len:
                raise LlmxError(f"data.seq_len={seq_len} is shorter than one task example ({prompt!r})")
            if len(ids) + len(p) + len(c) > seq_len:
                seqs.append(_pad(ids, labels, seq_len, eos, IGNORE_INDEX))
                ids, labels = [eos], [IGNORE_INDEX]
            ids += p + c
            labels += ([IGNORE_INDEX] * len(p) if answer_only else p) + c
        if len(ids) > 1:
            seqs.append(_pad(ids, labels, seq_len, eos, IGNORE_INDEX))
        return seqs

    train, val = examples(TRAIN), examples(VALIDATION)
    held_out: Dict[str, str] = {}
    for p, a in val:
        if len(held_out) < n_questions:
            held_out.setdefault(p, a)
    train = [(p, a) for p, a in train if p not in held_out]
    if not train:
        raise LlmxError(f"merge.demo.post_train: every training question is one of the {len(held_out)} held-out "
                        f"questions; lower merge.demo.eval_questions or widen the task ({data_cfg.generator} "
                        "generator_args)")
    return (pack(train), pack(val)), list(held_out.items())


def _pad(ids, labels, seq_len, pad_id, ignore):
    n = seq_len - len(ids)
    return torch.tensor([ids + [pad_id] * n, labels + [ignore] * n], dtype=torch.long)


class _Replay(torch.utils.data.Dataset):
    """A stage's training sequences plus corpus-A blocks making up `share` of the total (in order, cycling);
    the loader shuffles them together. With pairs=True the blocks become (ids, ids): a target at every token.

    The stage's sequences are repeated (as many times as it takes for the replayed share to reach all of
    corpus A) so that a small stage dataset does not replay the same few corpus-A blocks every epoch: with
    72 task sequences (paramdelta_tiny with operands 0-9), post-training replayed the same 72 corpus-A blocks
    some 33 times each and memorized them (its corpus-A loss rising), a change of the weights that is no part
    of the task and that ParamΔ then adds to base'."""

    def __init__(self, data, corpus_a, share: float, pairs: bool):
        self.data, self.corpus_a, self.pairs = data, corpus_a, pairs
        self.reps = max(1, math.ceil(len(corpus_a) * (1.0 - share) / share / max(1, len(data)))) if share > 0 else 1
        self.n_data = len(data) * self.reps
        self.extra = round(self.n_data * share / (1.0 - share))
        self.order = torch.randperm(len(corpus_a), generator=torch.Generator().manual_seed(0))  # spread over parts
        self.seq_len = getattr(data, "seq_len", None)

    def __len__(self) -> int:
        return self.n_data + self.extra

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < self.n_data:
            return self.data[i % len(self.data)]
        block = self.corpus_a[int(self.order[(i - self.n_data) % len(self.corpus_a)])]
        return torch.stack([block, block]) if self.pairs else block


def _fact_probes(data_cfg) -> List[Tuple[str, str]]:
    """(prompt, answer) recall probes when corpus B is the facts generator; [] otherwise."""
    if data_cfg.generator != "facts":
        return []
    import inspect

    from llmx.data.synthetic import facts, facts_probes

    args = dict(data_cfg.generator_args)
    n = args.get("n_entities", inspect.signature(facts).parameters["n_entities"].default)
    return facts_probes(int(args.get("seed", 0)), int(n))


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def _exact_match(model, tok, pairs: List[Tuple[str, str]], max_new: int, device, stop: str = r"\n") -> float:
    """Share of prompts whose greedy continuation, cut at the first `stop`, equals the answer (stripped).
    Each prompt starts after EOS, as a document does in pretraining; prompts of equal length share a batch."""
    eos = tok.eos_token_id
    groups: Dict[int, List[int]] = {}
    encoded = [[eos] + tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    correct = 0
    for idx in groups.values():
        for lo in range(0, len(idx), 64):
            chunk = idx[lo:lo + 64]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            for _ in range(max_new):
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            for row, i in zip(ids[:, len(encoded[chunk[0]]):].tolist(), chunk):
                text = re.split(stop, tok.decode(row, skip_special_tokens=True), maxsplit=1)[0]
                correct += text.strip() == pairs[i][1].strip()
    return correct / len(pairs)


@torch.no_grad()
def _mean_loss(model, val, max_sequences: int, micro_batch: int, device) -> float:
    """Mean next-token loss (nats) over the first max_sequences held-out blocks."""
    n = min(len(val), max_sequences)
    if n == 0:
        raise LlmxError("a held-out split is empty: raise data.val_fraction or the generator's n_val_docs")
    total, count = 0.0, 0
    for lo in range(0, n, micro_batch):
        batch = torch.stack([val[i] for i in range(lo, min(n, lo + micro_batch))]).to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


def _share_line(final, key: str, what: str) -> str:
    share = final[f"task_share_of_{key}"]
    if share is None:
        return (f"{dict(DEMO_KEYS)[key]} answers no held-out question, so no share of it is defined (more "
                "merge.demo.post_train.max_steps).")
    return f"ParamΔ's task accuracy is {share:.1%} of {what}."


def _demo_table(cfg, rows, final, n_questions: int, n_probes: int) -> str:
    d = cfg.merge.demo
    facts = n_probes > 0
    lines = [f"# {cfg.name}: ParamΔ on a tiny Llama ({cfg.model.name}, CPU)", "",
             f"- base: {d.pretrain.max_steps} steps on corpus A ({cfg.data.name}"
             + (f" + {d.pretrain.generator}" if d.pretrain.generator else "") + f"); post: {d.post_train.max_steps} "
             f"steps of post-training on {d.post_train.generator} (loss on "
             f"{'answers only' if d.answer_only_loss else 'every token'}); base': {d.continue_pretrain.max_steps} "
             f"more steps of pretraining on corpus B ({d.continue_pretrain.generator}); post': base' post-trained "
             f"as post was; ParamΔ = post - base + base'"
             + (f" (scale {cfg.merge.scale:g})" if cfg.merge.scale != 1.0 else "") + ".",
             f"- task accuracy: greedy exact match on {n_questions} held-out questions (none in the post-training "
             f"data); losses: mean next-token loss (nats) on {d.eval_sequences} held-out blocks at most"
             + (f"; fact recall: greedy completion of the {n_probes} corpus-B facts (\"<name> lives in\" -> city, "
                "\"works as a\" -> job, \"keeps a\" -> pet)" if facts else "") + ".",
             "- training time: " + ", ".join(f"{k} {v:.0f} s" for k, v in final["stage_seconds"].items())
             + ".", "",
             "| model | what | task accuracy | corpus B loss |" + (" fact recall |" if facts else "")
             + " corpus A loss |",
             "|---|---|---|---|" + ("---|" if facts else "") + "---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['what']} | {r['task_accuracy']:.1%} | {r['corpus_b_loss']:.3f} |"
                     + (f" {r['fact_recall']:.1%} |" if facts else "") + f" {r['corpus_a_loss']:.3f} |")
    lines += ["", _share_line(final, "post_prime", "post' (base' post-trained the same way; the paper's measure: "
                              "about 95% on Llama 3.1 70B)"),
              _share_line(final, "post", "post (the post-trained old base)"),
              f"ParamΔ's corpus-B loss is {final['corpus_b_loss_paramdelta']:.3f}: "
              f"base' {final['corpus_b_loss_base_prime']:.3f}, post' {final['corpus_b_loss_post_prime']:.3f}, "
              f"post {final['corpus_b_loss_post']:.3f}"
              + (f"; fact recall {final['fact_recall_paramdelta']:.1%} (base' {final['fact_recall_base_prime']:.1%}, "
                 f"post' {final['fact_recall_post_prime']:.1%}, post {final['fact_recall_post']:.1%})" if facts else "")
              + ".", ""]
    return "\n".join(lines)
