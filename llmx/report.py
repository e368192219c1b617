"""`llmx report`: gather finished, failed and running runs into one table, JSON and plot.

A run directory is recognised by the files the trainer leaves in it (metrics.jsonl, final.json,
error.txt, .hydra/overrides.yaml), so the report works on a single run, a multirun sweep or a whole
outputs/ tree, and reads only files: it can be pointed at a sweep that is still going.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from llmx.logging.metrics import FINAL_FILE, METRICS_FILE, read_metrics
from llmx.utils import LlmxError, atomic_write_json, atomic_write_text

ERROR_FILE = "error.txt"
BENCH_RESULTS = "results.md"  # written by the generate-bench recipe
_MARKERS = (METRICS_FILE, FINAL_FILE, ERROR_FILE, os.path.join(".hydra", "overrides.yaml"))

# (header, accepted keys): the headline columns, shown when any run has one of the keys.
HEADLINE_COLUMNS = (
    ("final train loss", ("loss", "train_loss", "train/loss")),
    ("val loss", ("val_loss", "val/loss", "eval_loss")),
    ("val ppl", ("val_ppl", "val/ppl", "ppl")),
    ("tokens/s", ("tokens_per_s", "train/tokens_per_s", "tok_per_s")),
)
_NOT_METRICS = {"step", "time"}


def _natural_key(path: Path):
    # Sweep job dirs are 0, 1, ..., 10: sort them as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in _MARKERS)


def find_run_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run directory, else every run directory below it. The search does
    not descend into a run directory (its tb/, wandb/, hf/ and checkpoints are not runs)."""
    if _is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and _is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=_natural_key)


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return []
    return [str(x) for x in data] if isinstance(data, list) else []


def _saved_config(run_dir: Path, overrides: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
    """(the recipe a run ran, its model.path): `name` in its saved config, else its recipe= override."""
    import yaml

    name = model_path = None
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
            name, model_path = cfg.get("name"), (cfg.get("model") or {}).get("path")
        except (yaml.YAMLError, AttributeError):
            pass
    if not (isinstance(name, str) and name):
        name = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
    return name, model_path if isinstance(model_path, str) else None


def _last_values(records: Iterable[dict]) -> dict:
    # Train and eval metrics are logged on separate lines; the latest value of each key describes
    # where an unfinished run got to.
    out: dict = {}
    for rec in records:
        for key, value in rec.items():
            if key != "time":
                out[key] = value
    if out:
        out["step"] = max((r["step"] for r in records if isinstance(r.get("step"), (int, float))), default=None)
    return out


def _status(run_dir: Path) -> str:
    final, error = run_dir / FINAL_FILE, run_dir / ERROR_FILE
    # A run that failed and was then resumed to completion keeps its old error.txt; the newer file
    # tells which happened last.
    if final.is_file() and (not error.is_file() or final.stat().st_mtime >= error.stat().st_mtime):
        return "ok"
    if error.is_file():
        return "failed"
    return "incomplete"


def _first_line(path: Path, limit: int = 200) -> Optional[str]:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                return line.strip()[:limit]
    except OSError:
        pass
    return None


def collect_run(run_dir: Path, label: Optional[str] = None) -> dict:
    records = read_metrics(run_dir)
    final: dict = {}
    final_path = run_dir / FINAL_FILE
    if final_path.is_file():
        try:
            loaded = json.loads(final_path.read_text())
            final = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            final = {}
    if not final:
        final = _last_values(records)
    step = final.get("step")
    if not isinstance(step, (int, float)) and records:
        step = _last_values(records).get("step")
    status = _status(run_dir)
    overrides = _read_overrides(run_dir)
    recipe, model_path = _saved_config(run_dir, overrides)
    return {
        "run": label or run_dir.name,
        "dir": str(run_dir),
        "recipe": recipe,
        "model_path": model_path,
        "overrides": overrides,
        "status": status,
        "step": step,
        "final": {k: v for k, v in final.items() if k not in _NOT_METRICS},
        "error": _first_line(run_dir / ERROR_FILE) if status == "failed" else None,
        "has_metrics": bool(records),
    }


def collect_runs(paths: Sequence[os.PathLike | str]) -> list[dict]:
    """One dict per run found under `paths` (run directories or sweep/output trees); [] when there
    are none, so the caller words that. A path that does not exist is an LlmxError."""
    runs = []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise LlmxError(f"no such directory: {root}")
        dirs = find_run_dirs(root)
        base = root.parent
        for d in dirs:
            # Relative to the given path's parent: "<run>" for a run, "<sweep>/<job>" for a sweep.
            runs.append(collect_run(d, label=str(d.relative_to(base))))
    return runs


# --------------------------------------------------------------------------------------------------
# Table


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _lookup(final: dict, keys: Sequence[str]):
    for k in keys:
        if _is_number(final.get(k)):
            return final[k]
    return None


class Column(NamedTuple):
    header: str
    get: Callable[[dict], Any]
    headline: bool


def metric_columns(runs: Sequence[dict]) -> list[Column]:
    """The headline metrics any run has, then every other numeric key that all runs share (so a
    recipe's own metrics show up without code here)."""
    cols: list[Column] = []
    covered: set[str] = set()
    for header, keys in HEADLINE_COLUMNS:
        covered.update(keys)
        if any(_lookup(r["final"], keys) is not None for r in runs):
            cols.append(Column(header, lambda r, keys=keys: _lookup(r["final"], keys), True))
    numeric = [{k for k, v in r["final"].items() if _is_number(v)} for r in runs]
    common = set.intersection(*numeric) if numeric else set()
    # Standard errors are shown with their value in the result column, not as columns of their own.
    for key in sorted(k for k in common - covered - _NOT_METRICS if not k.endswith("_stderr")):
        cols.append(Column(key, lambda r, key=key: r["final"].get(key), False))
    return cols


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:#.4g}"
    return str(value)


# Overrides that say how a run was run, not what it computed, or that the "from" column shows: never in a label.
_NOT_IN_LABELS = ("hydra.", "logger.", "resume", "launcher.", "recipe=", "model.path=", "model=run")


def _split_overrides(runs: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """(overrides every run shares, each run's others), leaving out _NOT_IN_LABELS."""
    kept = [[o for o in r["overrides"] if not o.lstrip("+~").startswith(_NOT_IN_LABELS)] for r in runs]
    if len(runs) < 2:
        return [], kept
    common = [o for o in kept[0] if all(o in k for k in kept[1:])]
    return common, [[o for o in k if o not in common] for k in kept]


def run_labels(runs: Sequence[dict]) -> list[str]:
    """Each run by its recipe and the overrides in which it differs from the other runs of that recipe (a sweep's
    jobs by their swept values; a recipe met once among several, as in a chain of runs, by its name; a lone run by
    all its overrides); runs that would read alike get their directory's name."""
    by_recipe: dict = {}
    for i, r in enumerate(runs):
        by_recipe.setdefault(r.get("recipe") or Path(r["dir"]).name, []).append(i)
    differing: list = [[] for _ in runs]
    for name, idx in by_recipe.items():
        if len(idx) > 1 or len(runs) == 1:
            for i, d in zip(idx, _split_overrides([runs[i] for i in idx])[1]):
                differing[i] = d
    labels = [" ".join([r.get("recipe") or Path(r["dir"]).name] + d) for r, d in zip(runs, differing)]
    return [f"{label} ({Path(r['dir']).name})" if labels.count(label) > 1 else label
            for label, r in zip(labels, runs)]


def _sources(runs: Sequence[dict], labels: Sequence[str]) -> list[str]:
    """What each run's model.path names: the label of a compared run (the run itself or an output inside it, as
    llmx.models.runs reads them), else the path's last parts; "-" without one."""
    dirs = {Path(r["dir"]).resolve(): label for r, label in zip(runs, labels)}
    out = []
    for r in runs:
        path = r.get("model_path")
        if not path:
            out.append("-")
            continue
        p = Path(path).expanduser().resolve()
        owner = next((dirs[d] for d in (p, *p.parents[:2]) if d in dirs), None)
        out.append(owner or "/".join(Path(path).parts[-2:]))
    return out


# A run's headline result from its final.json, for the kinds whose metrics are not the trainer's: first match.
def _result(final: dict) -> str:
    parts = []
    levels = sorted(k[len("ppl@"):] for k in final if k.startswith("ppl@") and _is_number(final[k]))
    for level in levels:
        ratio = final.get(f"ppl_ratio@{level}")
        parts.append(f"ppl {_fmt(final[f'ppl@{level}'])} at {float(level):.0%}"
                     + (f" ({ratio:.3f}x dense)" if _is_number(ratio) else ""))
    if _is_number(final.get("ppl_text")):
        ratio = final.get("text_ratio")
        parts.append(f"ppl {_fmt(final['ppl_text'])}" + (f" ({ratio:.3f}x original)" if _is_number(ratio) else ""))
    if _is_number(final.get("mlp_reduction")):
        parts.append(f"MLP weights -{final['mlp_reduction']:.1%}")
    for key in sorted(k for k in final if k.endswith("/acc") and _is_number(final[k])):  # lm-eval (the eval kind)
        se = final.get(f"{key}_stderr")
        parts.append(f"{key.rsplit('/', 1)[0]} {final[key]:.3f}" + (f"±{se:.3f}" if _is_number(se) else ""))
    if _is_number(final.get("acc")):
        n = final.get("problems_evaluated")
        parts.append(f"accuracy {final['acc']:.3f}" + (f" (n={n})" if _is_number(n) else ""))
    return ", ".join(parts) or "-"


def _common_dir(runs: Sequence[dict]) -> str:
    """The leading directory every run label shares (a sweep's directory)."""
    parts = [Path(r["run"]).parts for r in runs]
    if not parts:
        return ""
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return "/".join(parts[0][:k])


class TableData(NamedTuple):
    headers: list[str]
    rows: list[list[str]]
    common_overrides: list[str]
    prefix: str  # leading directory shared by every run
    constants: list[tuple[str, str]]  # (metric, value) equal in every run, when left out of rows


def table_data(runs: Sequence[dict], all_columns: bool = True) -> TableData:
    """The report table as strings, one row per run labelled by run_labels. all_columns False keeps a terminal
    table narrow: generic metrics that are the same in every run (parameters, world size, ...) move to
    `constants`."""
    cols = metric_columns(runs)
    constants: list[tuple[str, str]] = []
    if not all_columns:
        shown = []
        for col in cols:
            values = {_fmt(col.get(r)) for r in runs}
            if col.headline or len(values) > 1:
                shown.append(col)
            else:
                constants.append((col.header, values.pop()))
        cols = shown
    common, _ = _split_overrides(runs)
    labels = run_labels(runs)
    extra = []  # (header, value per run): a chain's source and the results that are not trainer metrics
    if any(r.get("model_path") for r in runs):
        extra.append(("from", _sources(runs, labels)))
    results = [_result(r["final"]) for r in runs]
    if any(x != "-" for x in results):
        extra.append(("result", results))
    headers = ["run", "status", "step"] + [h for h, _ in extra] + [c.header for c in cols]
    rows = [[label, run["status"], _fmt(run["step"])] + [v[i] for _, v in extra] + [_fmt(c.get(run)) for c in cols]
            for i, (run, label) in enumerate(zip(runs, labels))]
    return TableData(headers, rows, common, _common_dir(runs), constants)


def report_text(runs: Sequence[dict], width: Optional[int] = 80) -> str:
    """The terminal table. When a row does not fit `width` columns it wraps by row, not by cell: each run's
    label on a line of its own, its values on the next, under one header."""
    data = table_data(runs, all_columns=False)
    title = f"{len(runs)} run{'s' if len(runs) != 1 else ''}" + (f" in {data.prefix}" if data.prefix else "")
    value_headers, value_rows = data.headers[1:], [row[1:] for row in data.rows]
    widths = [max(len(h), *(len(r[i]) for r in value_rows)) for i, h in enumerate(value_headers)]

    text_cols = {i for i, h in enumerate(value_headers) if h in ("status", "from", "result")}

    def line(cells, cols):
        return "  ".join(cells[i].ljust(widths[i]) if i in text_cols else cells[i].rjust(widths[i]) for i in cols)

    every = range(len(widths))
    label_w = max(len(h) for h in [data.headers[0]] + [row[0] for row in data.rows])
    out = [title, ""]
    if width is None or label_w + 2 + len(line(value_headers, every)) <= width:
        out.append(data.headers[0].ljust(label_w) + "  " + line(value_headers, every))
        out += [row[0].ljust(label_w) + "  " + line(values, every) for row, values in zip(data.rows, value_rows)]
    else:
        # Columns in groups that fit under a 2-space indent; each run: its label, then a line per group.
        groups = [[]]
        for i in every:
            if groups[-1] and 2 + len(line(value_headers, groups[-1] + [i])) > width:
                groups.append([])
            groups[-1].append(i)
        out += [data.headers[0]] + ["  " + line(value_headers, g) for g in groups]
        for row, values in zip(data.rows, value_rows):
            # A group with nothing for this run (a sparsify run under the trainer's columns) is left out.
            out += [row[0]] + ["  " + line(values, g) for g in groups if any(values[i] != "-" for i in g)]
    notes = []
    if data.common_overrides:
        notes.append(f"common overrides: {' '.join(data.common_overrides)}")
    if data.constants:
        label = "same in every run" if len(runs) > 1 else "also"
        notes.append(f"{label}: " + ", ".join(f"{k}={v}" for k, v in data.constants))
    failed = [(row[0], r) for row, r in zip(data.rows, runs) if r["status"] == "failed" and r["error"]]
    notes += [f"failed: {label}: {r['error']}" for label, r in failed]
    if notes:
        out.append("")
        out += _wrap(notes, width)
    return "\n".join(line.rstrip() for line in out)


def _wrap(lines: Sequence[str], width: Optional[int]) -> list[str]:
    import textwrap

    if width is None:
        return list(lines)
    return [w for text in lines for w in textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)]


def report_markdown(runs: Sequence[dict]) -> str:
    """The full table (every common metric) as markdown, with the failures listed below it."""
    data = table_data(runs, all_columns=True)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["# llmx report", ""]
    if data.prefix:
        out += [f"Runs under `{data.prefix}`.", ""]
    if data.common_overrides:
        out += [f"Common overrides: `{' '.join(data.common_overrides)}`", ""]
    out += ["| " + " | ".join(data.headers) + " |", "|" + "|".join("---" for _ in data.headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in data.rows]
    failed = [r for r in runs if r["status"] == "failed" and r["error"]]
    if failed:
        out += ["", "## Failures", ""]
        labels = {r["dir"]: row[0] for r, row in zip(runs, data.rows)}
        out += [f"- `{labels[r['dir']]}` ({r['run']}): {r['error']}" for r in failed]
    bench = bench_sections(runs)
    if bench:
        out += ["", bench]
    return "\n".join(out) + "\n"


def bench_sections(runs: Sequence[dict]) -> str:
    """For generate-bench runs: the accuracy-per-op table, AUC and sigmoid fit (results.md), and the plots."""
    out = []
    for r in runs:
        results = Path(r["dir"]) / BENCH_RESULTS
        if not results.is_file():
            continue
        body = results.read_text().split("\n", 2)[-1].strip()  # drop the file's own title line
        out += [f"## Benchmark: {r['run']}", "", body, ""]
        out += [f"![{Path(p).stem}]({p})" for p in sorted(Path(r["dir"]).glob("accuracy_*.png"))]
        out.append("")
    return "\n".join(out).strip()


def write_report(runs: Sequence[dict], out_dir: os.PathLike | str) -> list[Path]:
    """report.json, report.md and loss_curves.png in out_dir; returns the paths written."""
    from llmx.logging.plots import plot_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write_json(out_dir / "report.json", list(runs))
    written.append(out_dir / "report.json")
    atomic_write_text(out_dir / "report.md", report_markdown(runs))
    written.append(out_dir / "report.md")
    with_curves = [(label, r["dir"]) for label, r in zip(run_labels(runs), runs) if r.get("has_metrics")]
    if with_curves:
        written.append(plot_comparison(with_curves, out_dir / "loss_curves.png"))
    return written
