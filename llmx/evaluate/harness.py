"""Downstream evaluation through lm-evaluation-harness (lm-eval 0.4.x) on a model object in memory.

lm-eval's own `HFLM` is handed the model object (not a path), so whatever llmx did to the model in memory is
what lm-eval measures: an R-Sparse or TEAL artifact applied in place (its RSparseLinear layers run during every
log-likelihood), SHARP's shared MLPs loaded from the compact checkpoint. Requests, batching (`batch_size="auto"`
finds the largest batch that fits), few-shot sampling and metrics with their standard errors are lm-eval's; the
wrapper adds nothing per request, so its cost is the harness's (scripts/bench_lm_eval.py measures it).

Tasks are names lm-eval knows, the local tasks of llmx.evaluate.local_tasks, or a user's task YAML file (its
directory is added to lm-eval's include path and its `task:` name used). `check_tasks` resolves them all before
any model is loaded. The request cache (lm-eval's `use_cache`, an SQLite file of every answered request) is kept
per model fingerprint, so a killed evaluation continues where it stopped and a changed model never reads
another model's answers.

Which tokens an R-Sparse model sparsifies during log-likelihood scoring is the artifact's token mode (or
model.token_mode): "all" (the worst case, every token sparse) or "last_fraction" (the reference's evaluation,
the last 10% of each sequence); lm-eval's requests do not mark where the continuation starts inside a batch, so
the notes' "continuation tokens sparse" is not offered.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmx.utils import LlmxError


def task_manager(include_paths: Sequence[str]):
    """lm-eval's task index (about 8 s to build), once per process and include paths: it is only read."""
    return _task_manager(tuple(str(p) for p in include_paths))


@functools.lru_cache(maxsize=8)
def _task_manager(include_paths: Tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


def resolve_tasks(tasks: Sequence[str], include_paths: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """(task names, include paths): a task given as a YAML file becomes its `task:` name, its directory an include
    path. A file that does not parse, or has no `task:` (or `group:`), is an error naming it."""
    import yaml

    names, paths = [], [str(Path(p).expanduser()) for p in include_paths]
    for t in tasks:
        t = str(t)
        if not t.endswith((".yaml", ".yml")):
            names.append(t)
            continue
        path = Path(t).expanduser()
        if not path.is_file():
            raise LlmxError(f"eval.tasks: {t} does not exist (a task YAML file, or a task name lm-eval knows)")
        try:
            # lm-eval's YAML has !function tags: read them as plain scalars, only the name is wanted here.
            loader = type("Loader", (yaml.SafeLoader,), {})
            loader.add_multi_constructor("!", lambda self, suffix, node: None)
            doc = yaml.load(path.read_text(), Loader=loader)
        except yaml.YAMLError as e:
            raise LlmxError(f"eval.tasks: {t} is not valid YAML: {e}") from None
        name = (doc or {}).get("task") or (doc or {}).get("group") if isinstance(doc, dict) else None
        if not isinstance(name, str):
            raise LlmxError(f"eval.tasks: {t} has no 'task:' (or 'group:') name; lm-eval task files start with one")
        names.append(name)
        paths.append(str(path.parent.resolve()))
    return names, sorted(set(paths), key=paths.index)


def check_tasks(tasks: Sequence[str], include_paths: Sequence[str] = ()) -> Tuple[List[str], List[str]]:
    """resolve_tasks, then every name looked up in lm-eval's task index (about 8 s): an unknown one is an error
    with the closest names."""
    if not tasks:
        raise LlmxError("eval.tasks is empty: name lm-eval tasks (e.g. [arc_easy, piqa]) or a task YAML file")
    names, paths = resolve_tasks(tasks, include_paths)
    known = set(task_manager(paths).all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise LlmxError(f"eval.tasks: {name!r} is not a task lm-eval knows{hint}")
    return names, paths


def model_fingerprint(model: Any) -> str:
    """Identity for the request cache: the module tree as printed (an artifact changes settings, not weights), the
    dtype, and the first values of every tensor."""
    import torch

    h = hashlib.sha256(repr(model).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().reshape(-1)[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], *, include_paths: Sequence[str] = (),
             num_fewshot: Optional[int] = None, batch_size: Any = "auto", max_batch_size: int = 64,
             limit: Optional[float] = None, cache: Optional[str] = None, device: str = "cpu",
             log_samples: bool = False, bootstrap_iters: int = 100000, seed: int = 0) -> Dict[str, Any]:
    """lm-eval's results dict for `model` (any transformers causal LM object) on `tasks`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names, paths = resolve_tasks(tasks, include_paths)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
              device=device)
    return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, use_cache=cache,
                           task_manager=task_manager(paths), log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                           torch_random_seed=seed, fewshot_random_seed=seed)


def summary(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (task, metric) with its standard error, from lm-eval's results["results"]."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            if not filt:  # lm-eval's bookkeeping (sample_len), not a metric
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": results.get("n-samples", {}).get(task, {}).get("effective")})
    return rows
