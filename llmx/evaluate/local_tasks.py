"""Small lm-evaluation-harness tasks built offline from data llmx already has, so the evaluation path runs end
to end without the network (the paper suites in conf/eval/ need the hub).

Both are zero-shot multiple choice scored by log-likelihood, as lm-eval scores HellaSwag or ARC (acc, and
acc_norm: the log-likelihood divided by the choice's length in bytes):

    llmx_gsm_infinite_mc   GSM-Infinite "medium" problems at zero context, 2-3 operations, from llmx's own
                           generator (llmx.bench.gsm_infinite; generated here, so Apache-2.0 like llmx): the
                           problem and question, then " Answer:"; four choices: the answer and three numbers a
                           model that copies or is off by one would pick (numbers of the problem, answer +- 1, 2).
    llmx_pydoc_next        The continuation of a paragraph of Python's documentation (the pydoc corpus embedded in
                           llmx, PSF licence): 40 words of context, then the next 12 words against the same
                           position of three other paragraphs. Only the topics that llmx's pydoc splits hold out
                           (val_fraction 0.25, as data=pydoc_eval), so a model calibrated or tuned on the training
                           topics is not tested on them.

Each task is a YAML file beside its JSONL data (absolute paths), written once per version into the llmx cache
and handed to lm-eval's TaskManager as an include path. Writing goes through a temporary directory renamed into
place, so concurrent runs never read half a task.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, List

from llmx.utils import cache_dir, publish_dir

VERSION = "1"
TASKS = ("llmx_gsm_infinite_mc", "llmx_pydoc_next")
PER_TASK = 200  # items per task: acc's standard error is about 0.035 at 200

_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def gsm_infinite_items(n: int = PER_TASK, seed: int = 0) -> List[Dict]:
    from llmx.bench.gsm_infinite import GSMInfinite

    gen, rng = GSMInfinite(), random.Random(f"llmx-eval/gsm/{seed}")
    items, seen = [], set()
    while len(items) < n:
        r = gen.generate("medium", 2 + len(items) % 2, 0, rng, None)
        if r["problem"] in seen:
            continue
        seen.add(r["problem"])
        answer = int(r["answer"])
        pool = {int(x) for x in re.findall(r"\d+", r["problem"])} | {answer - 2, answer - 1, answer + 1, answer + 2}
        pool = sorted(x for x in pool if x >= 0 and x != answer)
        choices = rng.sample(pool, 3) + [answer]
        rng.shuffle(choices)
        items.append({"context": f"Problem: {r['problem']}\nQuestion: {r['question']}\nAnswer:",
                      "choices": [f" {c}" for c in choices], "label": choices.index(answer), "op": r["op"]})
    return items


def pydoc_items(n: int = PER_TASK, seed: int = 0, context_words: int = 40, next_words: int = 12) -> List[Dict]:
    from llmx.data.sources import pydoc_corpus, validation_mask

    corpus = pydoc_corpus()
    held_out = [text for (_, text), val in zip(corpus, validation_mask([t for t, _ in corpus], 0.25)) if val]
    paragraphs = [p.split() for text in held_out for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if len(p) >= context_words + next_words]
    rng = random.Random(f"llmx-eval/pydoc/{seed}")
    picked = rng.sample(range(len(paragraphs)), min(n, len(paragraphs)))
    items = []
    for i in picked:
        words = paragraphs[i]
        others = rng.sample([j for j in range(len(paragraphs)) if j != i], 3)
        span = slice(context_words, context_words + next_words)
        choices = [" " + " ".join(paragraphs[j][span]) for j in others] + [" " + " ".join(words[span])]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": " ".join(words[:context_words]), "choices": [choices[k] for k in order],
                      "label": order.index(3)})
    return items


def _task_yaml(name: str, data: Path) -> Dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "metric_list": _METRICS,
            "metadata": {"version": float(VERSION), "source": "llmx.evaluate.local_tasks"}}


def local_task_dir(root: Path | None = None) -> Path:
    """The directory of the local tasks' YAML and data (built on first use); give it to lm-eval as include_path."""
    import yaml

    out = (root or cache_dir() / "lm_eval_tasks") / f"v{VERSION}"
    if out.is_dir():
        return out
    with publish_dir(out) as tmp:
        for name, items in (("llmx_gsm_infinite_mc", gsm_infinite_items()), ("llmx_pydoc_next", pydoc_items())):
            data = tmp / f"{name}.jsonl"
            data.write_text("".join(json.dumps(x) + "\n" for x in items))
            # The YAML names the data where it will be once the directory is published.
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, out / data.name), sort_keys=False))
    return out
