"""generate-bench recipe: generate a verified benchmark, run a model on it, grade, score, plot.

    llmx run recipe=gsm_infinite_tiny                 # symbolic/medium/hard, 0 and 2k tokens, oracle-graded
    llmx run recipe=gsm_infinite_symbolic_smollm2     # SmolLM2-135M on symbolic ops 1-8 (CPU)
    llmx run recipe=gsm_infinite_leaderboard evaluator.base_url=http://node:8000/v1 evaluator.model_name=...
    llmx report outputs/gsm_infinite_symbolic_smollm2/<run>

Feature -> config flag:
    generator and its options               bench.generator, bench.options.*
    subsets, context lengths, ops, count    bench.subsets, bench.lengths, bench.ops, bench.ops_by_subset, bench.per_op
    parallel generation, verification       bench.workers, bench.verify
    output formats / location               bench.formats=[arrow,jsonl], bench.out_dir
    evaluate an existing benchmark          bench.dataset_dir=<dir with manifest.json>
    length-measuring tokenizer              bench.tokenizer (null: the model group's)
    model backend                           evaluator=none|oracle|hf|openai (+ model=... for hf)
    samples, pass@k                         evaluator.num_samples, evaluator.pass_k, evaluator.pass_estimator
    sampling temperature (per subset)       evaluator.temperature, evaluator.temperature_by_subset={symbolic: 1.0}
    length measure (real or reference's)    bench.options.length_measure=tokens|reference
    resumable replies                       evaluator.cache (default: keyed by model and benchmark)

Read top to bottom: 1. the benchmark (generate or load), 2. the problems to evaluate, 3. replies from the
backend through the cache, 4. grading, 5. scores (accuracy per op and length, AUC, sigmoid fit), tables
and plots. Outputs in the run directory: bench/ (the dataset + manifest.json), replies are cached
outside it so that a rerun continues; problems.jsonl (every reply and its grade), scores.json,
results.md, accuracy_<subset>.png, final.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from omegaconf import OmegaConf

from llmx.bench.base import BenchError, get_bench
from llmx.bench.dataset import build_plan, generate_dataset, load_bench
from llmx.bench.metrics import markdown_table, plot_curves, score
from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, sha256_text


def tokenizer_path(cfg) -> str:
    """The tokenizer directory (or hub id) that measures context lengths."""
    if cfg.bench.tokenizer:
        return str(cfg.bench.tokenizer)
    if cfg.model.source in ("hf", "gguf"):
        from llmx.models.pretrained import pretrained_dir

        return pretrained_dir(cfg.model, weights=False)
    raise LlmxError("generate-bench needs a tokenizer to measure lengths: set bench.tokenizer=<dir or hub id> "
                    "or a pretrained model group (model=smollm2_135m)")


def check_config(cfg) -> None:
    """Every cell of the plan asked of its generator (ops, lengths, subsets) and the sampling settings, before a
    tokenizer or model is loaded (llmx.launch.check_before_run)."""
    bench_cfg = cfg.bench
    options = OmegaConf.to_container(bench_cfg.options, resolve=True)
    bench = get_bench(bench_cfg.generator, **options)
    subset_temperatures(cfg.evaluator, bench.subsets)
    if bench_cfg.dataset_dir:
        return
    for cell in build_plan(list(bench_cfg.subsets), list(bench_cfg.lengths), _plain(bench_cfg.ops),
                           bench_cfg.per_op, _plain(bench_cfg.ops_by_subset)):
        try:
            bench.check_request(cell.subset, cell.op, cell.length)
        except BenchError as e:
            raise LlmxError(f"bench.ops / bench.lengths / bench.subsets: {e}") from None


def main(cfg) -> Dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    bench_cfg, ev = cfg.bench, cfg.evaluator
    options = OmegaConf.to_container(bench_cfg.options, resolve=True)
    backend_name = ev.backend.value if hasattr(ev.backend, "value") else str(ev.backend)
    temperatures = subset_temperatures(ev, get_bench(bench_cfg.generator, **options).subsets)

    # 1. The benchmark: load an existing one, or generate (every problem verified by its solver).
    if bench_cfg.dataset_dir:
        data_dir = Path(bench_cfg.dataset_dir).expanduser()
        manifest, sets = load_bench(data_dir)
        print(f"llmx: evaluating the benchmark in {data_dir} ({manifest['problems']} problems)", flush=True)
    else:
        cells = build_plan(list(bench_cfg.subsets), list(bench_cfg.lengths), _plain(bench_cfg.ops), bench_cfg.per_op,
                           _plain(bench_cfg.ops_by_subset))
        data_dir = Path(bench_cfg.out_dir).expanduser() if bench_cfg.out_dir else run_dir / "bench"
        total = sum(c.count for c in cells)
        print(f"llmx: generating {total} {bench_cfg.generator} problems in {len(cells)} (subset, length, op) "
              f"cells with {bench_cfg.workers} worker(s) -> {data_dir}", flush=True)
        manifest = generate_dataset(bench_cfg.generator, cells, data_dir, seed=cfg.seed, options=options,
                                    tokenizer_path=tokenizer_path(cfg), workers=bench_cfg.workers,
                                    verify=bench_cfg.verify, formats=list(bench_cfg.formats),
                                    progress=cfg.logger.progress)
        print(f"llmx: generated {manifest['problems']} problems in {manifest['seconds']:.1f} s "
              f"({manifest['problems_per_s']:.0f}/s), verified: {manifest['verified']}", flush=True)
        if "arrow" not in bench_cfg.formats:
            if backend_name != "none":
                raise LlmxError("evaluation reads the Arrow datasets: add arrow to bench.formats")
            sets = {}
        else:
            _, sets = load_bench(data_dir)
    final: Dict[str, Any] = {"problems_generated": manifest["problems"],
                             "problems_per_s": manifest.get("problems_per_s"), "bench_dir": str(data_dir)}
    if backend_name == "none":
        atomic_write_json(run_dir / "final.json", final)
        return final

    # 2. The problems to evaluate: the first limit_per_op of each split, by index.
    bench = get_bench(manifest["generator"], **manifest.get("options", {}))
    records: List[Dict[str, Any]] = []
    for name, dsd in sets.items():
        for split in sorted(dsd, key=lambda s: int(s.split("_")[-1])):
            rows = dsd[split]
            n = len(rows) if ev.limit_per_op is None else min(len(rows), ev.limit_per_op)
            records.extend(rows.select(range(n)).to_list())
    if not records:
        raise LlmxError(f"no problems to evaluate in {data_dir}")

    # 3. Replies, through a cache keyed by the backend and the benchmark: a rerun of the same evaluation
    #    (or one killed halfway) only asks for what is missing.
    from llmx.bench.backends import build_backend

    solutions = {r["id"]: r["solution"] for r in records} if backend_name == "oracle" else None
    backend = build_backend(ev, cfg.model, solutions)
    t0 = time.perf_counter()
    replies, caches = _replies(cfg, backend, records, temperatures, manifest)
    cache_path = Path(next(iter(caches.values())))
    seconds = time.perf_counter() - t0

    # 4. Grading: every sample of every problem (symbolic sets optionally extracted by an LLM).
    extracted = _llm_extracted(ev, records, replies, cache_path) if ev.symbolic_extractor == "llm" else {}
    rows = []
    with open(run_dir / "problems.jsonl", "w") as f:
        for r in records:
            got = replies[r["id"]]
            if r["subset"] == "symbolic" and extracted:
                correct = [extracted[(r["id"], i)] == set(r["answer_list"]) for i in range(len(got))]
            else:
                correct = [bench.grade(reply, r) for reply in got]
            groups = bench.group_keys(r)
            rows.append({"subset": r["subset"], "length": r["length"], "op": r["op"], "correct": correct, "groups": groups})
            f.write(json.dumps({"id": r["id"], "subset": r["subset"], "length": r["length"], "op": r["op"],
                                "answer": r["answer"], "correct": correct, "replies": got}) + "\n")

    # 5. Scores, tables and plots.
    scores = score(rows, ks=list(ev.pass_k) or None, estimator=ev.pass_estimator)
    scores.update(backend=backend_name, fingerprint=backend.fingerprint(), bench_dir=str(data_dir),
                  replies_cache=str(cache_path), replies_caches=caches, temperatures=temperatures,
                  seconds=round(seconds, 1))
    atomic_write_json(run_dir / "scores.json", scores)
    table = markdown_table(scores)
    atomic_write_text(run_dir / "results.md", f"# {cfg.name}: {backend_name}\n\n{table}")
    plots = plot_curves(scores, run_dir)
    n_correct = sum(sum(r["correct"]) for r in rows)
    n_total = sum(len(r["correct"]) for r in rows)
    final.update(problems_evaluated=len(rows), acc=n_correct / n_total, eval_seconds=round(seconds, 1))
    for key, curve in scores["curves"].items():
        if curve["group"] is None:
            final[f"auc/{key}"] = round(curve["auc"], 2)
            if curve["sigmoid"]["ok"]:
                final[f"op50/{key}"] = round(curve["sigmoid"]["op50"], 2)
    final["plots"] = plots
    atomic_write_json(run_dir / "final.json", final)
    print(table, flush=True)
    print(f"llmx: done: accuracy {final['acc']:.3f} over {n_total} samples; results in {run_dir}", flush=True)
    return final


def subset_temperatures(ev, subsets) -> Dict[str, float]:
    """evaluator.temperature_by_subset checked against the generator's subsets; refused before any work."""
    by_subset = _plain(ev.temperature_by_subset) or {}
    unknown = sorted(set(by_subset) - set(subsets))
    if unknown:
        raise LlmxError(f"evaluator.temperature_by_subset names {unknown}; valid subsets: {list(subsets)}")
    out = {}
    for subset, t in {**{s: ev.temperature for s in subsets}, **by_subset}.items():
        try:
            t = float(t)
        except (TypeError, ValueError):
            t = -1.0
        if not t >= 0:  # also refuses NaN
            key = f"evaluator.temperature_by_subset.{subset}" if subset in by_subset else "evaluator.temperature"
            raise LlmxError(f"{key}={by_subset.get(subset, ev.temperature)!r} must be a number >= 0 (0: greedy)")
        out[subset] = t
    return out


def _replies(cfg, backend, records, temperatures: Dict[str, float],
             manifest) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """Every record's replies, sampled at its subset's temperature; and the cache of each temperature."""
    from llmx.bench.backends import GenRequest, run_with_cache

    ev = cfg.evaluator
    backend_name = ev.backend.value if hasattr(ev.backend, "value") else str(ev.backend)
    replies: Dict[str, List[str]] = {}
    caches: Dict[str, str] = {}
    for temperature, group in _by_temperature(records, temperatures, float(ev.temperature)).items():
        # One cache per temperature: a cache holds the replies of one backend configuration.
        sampler = backend.with_temperature(temperature)
        cache_path = _cache_path(cfg, sampler, manifest, temperature)
        caches[f"{temperature:g}"] = str(cache_path)
        requests = [GenRequest(key=r["id"], prompt=r["prompt"], n=ev.num_samples) for r in group]
        print(f"llmx: {backend_name}: {len(requests)} problems x {ev.num_samples} sample(s) at temperature "
              f"{temperature:g}; replies cache {cache_path}", flush=True)
        progress = _progress_printer() if cfg.logger.progress else None
        replies.update(run_with_cache(sampler, requests, cache_path, progress=progress))
    return replies, caches


def _by_temperature(records, temperatures: Dict[str, float], default: float) -> Dict[float, List[Dict[str, Any]]]:
    groups: Dict[float, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(temperatures.get(r["subset"], default), []).append(r)
    return groups


def _cache_path(cfg, backend, manifest, temperature: float) -> Path:
    if not cfg.evaluator.cache:
        return _default_cache(cfg, backend, manifest)  # keyed by the fingerprint, which holds the temperature
    path = Path(cfg.evaluator.cache).expanduser()
    if temperature == float(cfg.evaluator.temperature):
        return path
    return path.with_name(f"{path.stem}.t{temperature:g}{path.suffix}")


def _llm_extracted(ev, records, replies, cache_path: Path):
    if ev.symbolic_extractor not in ("rules", "llm"):
        raise LlmxError(f"evaluator.symbolic_extractor={ev.symbolic_extractor!r}; valid: 'rules', 'llm'")
    if not ev.extractor_base_url or not ev.extractor_model:
        raise LlmxError("evaluator.symbolic_extractor=llm needs evaluator.extractor_base_url and "
                        "evaluator.extractor_model (an OpenAI-compatible server, e.g. vLLM serving Qwen2.5-7B-Instruct)")
    import os

    from llmx.bench.backends import OpenAIBackend
    from llmx.bench.gsm_infinite.grading import llm_extract_symbolic

    items = {(r["id"], i): reply for r in records if r["subset"] == "symbolic" for i, reply in enumerate(replies[r["id"]])}
    if not items:
        return {}
    extractor = OpenAIBackend(ev.extractor_base_url, ev.extractor_model, api_key=os.environ.get(ev.api_key_env),
                              concurrency=ev.concurrency, max_retries=ev.max_retries, timeout_s=ev.timeout_s,
                              max_tokens=2048, temperature=0.0)
    print(f"llmx: extracting {len(items)} symbolic answers with {ev.extractor_model}", flush=True)
    return llm_extract_symbolic(extractor, items, cache_path.with_suffix(".extract.jsonl"))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _default_cache(cfg, backend, manifest) -> Path:
    key = sha256_text(json.dumps(backend.fingerprint(), sort_keys=True, default=str),
                      json.dumps({k: manifest[k] for k in ("generator", "options", "seed", "plan", "tokenizer")},
                                 sort_keys=True, default=str))[:16]
    return Path(cfg.output_root) / "bench_cache" / f"{manifest['generator']}-{key}.jsonl"


def _progress_printer():
    state = {"t0": time.perf_counter(), "last": 0.0}

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - state["last"] > 10:
            state["last"] = now
            print(f"evaluate: {done}/{total} problems ({now - state['t0']:.0f} s)", flush=True)

    return progress

