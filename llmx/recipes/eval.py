"""The `eval` kind: lm-evaluation-harness on one model, read top to bottom.

The model is whatever `model=` gives through llmx.models.load_pretrained: a preset's pretrained weights, a Hugging
Face directory or hub id, or an earlier llmx run (llmx.models.runs: a trainer run's hf/, a merge's output, SHARP's
compact checkpoint, an R-Sparse/TEAL artifact applied in memory, `model.level`, `model.token_mode`). The tasks are
`eval=` (conf/eval/: llmx's offline tasks, or a paper's suite), any lm-eval task name, or a task YAML file.

  1. check_config, which the launcher runs before the run directory exists: the tasks against lm-eval's index
     (unknown names and unparsable files fail before a model loads), the batch size, limit and shots.
  2. Load the model; the request cache is named by its fingerprint, so a killed run repeated resumes from it.
  3. lm-eval (llmx.evaluate.harness), with lm-eval's own progress bars.
  4. Outputs: lm_eval/results.json (lm-eval's JSON), results.md (task, metric, value +- standard error), final.json
     (`<task>/<metric>` and `<task>/<metric>_stderr`, which `llmx report` shows beside other runs' metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, cache_dir


def _tasks_and_paths(cfg) -> tuple:
    from llmx.evaluate.local_tasks import local_task_dir

    e = cfg.eval
    paths = list(e.include_paths) + ([str(local_task_dir())] if e.local_tasks else [])
    return list(e.tasks), paths


def check_config(cfg) -> None:
    """Before any model is loaded (llmx.launch.check_before_run): the tasks, the batch size, the limit."""
    from llmx.evaluate.harness import check_tasks

    e = cfg.eval
    if str(e.batch_size) != "auto" and not (str(e.batch_size).isdigit() and int(e.batch_size) >= 1):
        raise LlmxError(f"eval.batch_size={e.batch_size!r}: must be 'auto' or an integer >= 1")
    if e.limit is not None and not e.limit > 0:
        raise LlmxError(f"eval.limit={e.limit}: must be > 0 (items per task, or a fraction when < 1), or null (all)")
    if e.num_fewshot is not None and e.num_fewshot < 0:
        raise LlmxError(f"eval.num_fewshot={e.num_fewshot}: must be >= 0, or null (each task's default)")
    missing = [p for p in e.include_paths if not Path(p).expanduser().is_dir()]
    if missing:
        raise LlmxError(f"eval.include_paths: {missing} are not directories (of lm-eval task YAML files)")
    check_tasks(*_tasks_and_paths(cfg))


def _table(cfg, rows: List[Dict[str, Any]], seconds: float) -> str:
    lines = [f"# {cfg.name}: {cfg.model.name} on {cfg.eval.name}", "",
             f"lm-eval, {cfg.eval.num_fewshot if cfg.eval.num_fewshot is not None else 'default'} shots; "
             f"{seconds:.0f} s.", "", "| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for r in rows:
        se = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(cfg) -> Dict[str, Any]:
    import torch

    from llmx.evaluate.harness import evaluate, model_fingerprint, summary
    from llmx.models import load_pretrained

    e, run_dir = cfg.eval, Path(cfg.run_dir)
    tasks, paths = _tasks_and_paths(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_pretrained(cfg.model)
    device = e.device if e.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    fingerprint = model_fingerprint(model)
    cache = None
    if e.cache:
        where = cache_dir() / "lm_eval_cache" / fingerprint
        where.mkdir(parents=True, exist_ok=True)
        cache = str(where / "requests")  # lm-eval appends _rank<r>.db
    print(f"llmx: {cfg.name}: {cfg.model.name} (fingerprint {fingerprint}) on {tasks}"
          + (f"; request cache {cache}_rank*.db" if cache else ""), flush=True)
    t0 = time.perf_counter()
    batch = e.batch_size if str(e.batch_size) == "auto" else int(e.batch_size)
    results = evaluate(model, tokenizer, tasks, include_paths=paths, num_fewshot=e.num_fewshot, batch_size=batch,
                       max_batch_size=e.max_batch_size, limit=e.limit, cache=cache, device=device,
                       log_samples=e.log_samples, bootstrap_iters=e.bootstrap_iters, seed=cfg.seed)
    seconds = time.perf_counter() - t0
    rows = summary(results)
    samples = results.pop("samples", None)
    results["llmx"] = {"model": OmegaConf.to_container(cfg.model, resolve=True), "fingerprint": fingerprint,
                       "seconds": seconds}
    atomic_write_text(run_dir / "lm_eval" / "results.json", json.dumps(results, indent=2, default=str))
    if samples is not None:
        atomic_write_text(run_dir / "lm_eval" / "samples.json", json.dumps(samples, default=str))
    table = _table(cfg, rows, seconds)
    atomic_write_text(run_dir / "results.md", table)
    final: Dict[str, Any] = {"eval_seconds": round(seconds, 1)}
    for r in rows:
        final[f"{r['task']}/{r['metric']}"] = r["value"]
        if r["stderr"] is not None:
            final[f"{r['task']}/{r['metric']}_stderr"] = r["stderr"]
    atomic_write_json(run_dir / "final.json", final)
    print(table, flush=True)
    return final
