"""The `llmx` command line.

    llmx run [OVERRIDES...]             compose conf/ with Hydra overrides and run the recipe
    llmx run -m recipe=a,b optim.lr=1e-3,3e-3   a sweep: one run directory per job
    llmx list [--kind K --paper P --cpu]  every recipe, one line each, grouped by paper
    llmx show recipe=X [OVERRIDES...]   its full description, measured CPU time, resolved config
    llmx validate                       compose and type-check every config in conf/
    llmx report RUN_DIR...              final metrics of runs or sweeps, as a table and plots
    llmx serve model=X [--port 8000]    an OpenAI-compatible HTTP server over a local model

Only typer is imported at start-up; Hydra, torch and transformers load inside the commands, so
`llmx --help` and `llmx list` answer at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="llmx: reproduce LLM-efficiency papers with one CLI, from a laptop to a GPU cluster.",
    pretty_exceptions_enable=False,
)

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"llmx: error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _compose_or_exit(overrides: List[str], check_values: bool = True):
    from llmx.config.compose import ConfigError, compose

    try:
        return compose(overrides, check_values=check_values)
    except ConfigError as e:
        _fail(str(e), 2)


def _has_override(overrides: List[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def _config_sweep_params(overrides: List[str]) -> List[str]:
    """Sweep axes a config declares in hydra.sweeper.params (Hydra's BasicSweeper reads them too; the
    command line wins for the same key), so that every job is validated and listed before any runs."""
    from llmx.config.compose import compose, expand_sweep

    first_job = expand_sweep(overrides)[0]  # the recipe (and so its sweeper params) may itself be swept
    params = compose(first_job, return_hydra_config=True, check_values=False).hydra.sweeper.get("params") or {}
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    return [f"{k}={v}" for k, v in params.items() if k not in given]


def _fit_micro_batch(overrides: List[str], jobs: List[List[str]]) -> List[str]:
    """A launch over N processes whose micro-batch the user did not set gets the largest one that splits the
    batch evenly (the recipe's micro-batch is a single-process choice), said once, before torchrun starts. In a
    sweep, only when every job that needs one needs the same; otherwise each job's check names its choices."""
    from llmx.config.checks import derived_micro_batch, world_size
    from llmx.config.compose import compose

    if _has_override(overrides, "trainer.micro_batch_size"):
        return overrides
    changes = set()
    for job in jobs:
        cfg = compose(job, check_values=False)
        if "trainer" in cfg and world_size(cfg) > 1 and derived_micro_batch(cfg) != cfg.trainer.micro_batch_size:
            changes.add((derived_micro_batch(cfg), cfg.trainer.micro_batch_size, cfg.trainer.batch_size,
                         world_size(cfg)))
    if len({c[0] for c in changes}) != 1:
        return overrides
    micro, configured, batch, world = changes.pop()
    typer.echo(f"llmx: trainer.micro_batch_size={micro} (the recipe's {configured} does not split "
               f"trainer.batch_size={batch} over {world} processes; set it to choose)")
    return overrides + [f"trainer.micro_batch_size={micro}"]


def _pin_resume_dir(overrides: List[str]) -> List[str]:
    """resume=auto|latest on a single run: continue inside the run directory that holds the newest
    complete checkpoint of this recipe (metrics.jsonl continues there), unless hydra.run.dir is given."""
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "resume"), None)
    if value not in ("auto", "latest") or _has_override(overrides, "hydra.run.dir"):
        return overrides
    from llmx.trainer.checkpoint import find_newest
    from llmx.utils import LlmxError

    cfg = _compose_or_exit(overrides)
    root = Path(cfg.output_root) / cfg.name
    try:
        found = find_newest(sorted(p for p in root.glob("*") if p.is_dir())) if root.is_dir() else None
    except LlmxError as e:
        _fail(str(e))
    if found is None:
        if value == "latest":
            _fail(f"resume=latest: no complete checkpoint of recipe '{cfg.name}' under {root}/; "
                  "use resume=auto to start fresh when none exists")
        return overrides
    return overrides + [f"hydra.run.dir={found.parent.parent}"]


@app.command(context_settings=EXTRA)
def run(
    ctx: typer.Context,
    multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep: a,b lists, range(), glob(*) in overrides."),
    cfg: Optional[str] = typer.Option(None, "--cfg", "-c", help="Print the composed config (job|hydra|all) and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the jobs without running them."),
):
    """Run a recipe: `llmx run recipe=pretrain_tiny optim.lr=3e-3`. Overrides use Hydra syntax."""
    overrides = list(ctx.args)
    from llmx.config.compose import ConfigError, compose, expand_sweep

    # Validate every job's config before any work starts, with llmx's own error messages.
    try:
        jobs = expand_sweep(overrides + _config_sweep_params(overrides)) if multirun else [overrides]
        fitted = _fit_micro_batch(overrides, jobs)
        if fitted != overrides:
            overrides = fitted
            jobs = [job + overrides[-1:] for job in jobs]
        cfgs = [compose(job) for job in jobs]
    except ConfigError as e:
        _fail(str(e), 2)
    if cfg is None:
        from llmx.launch import check_before_run
        from llmx.utils import LlmxError

        for i, job_cfg in enumerate(cfgs):
            try:
                check_before_run(job_cfg)
            except LlmxError as e:
                _fail(f"job {i} ({' '.join(jobs[i])}): {e}" if len(cfgs) > 1 else str(e), 2)
    if not multirun and cfgs[0].launcher.name.value == "slurm":
        # Hydra hands jobs to its launcher plugin only in multirun; one Slurm job is a sweep of one.
        typer.echo("llmx: launcher=slurm submits through Hydra's multirun (one job)")
        multirun = True
    if dry_run:
        for i, job in enumerate(jobs):
            typer.echo(f"job {i}: {' '.join(job) or '(defaults)'}")
        return
    if not multirun and cfg is None:
        overrides = _pin_resume_dir(overrides)
    code = _run_hydra(overrides, multirun=multirun, cfg=cfg)
    raise typer.Exit(code)


def _run_hydra(overrides: List[str], *, multirun: bool, cfg: Optional[str]) -> int:
    import hydra

    from llmx import launch
    from llmx.config.compose import conf_dir
    from llmx.config.schema import register

    register()

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def task(job_cfg) -> str:
        from hydra.core.hydra_config import HydraConfig

        return launch.run_job(job_cfg, Path(HydraConfig.get().runtime.output_dir)).status

    argv = ["llmx run"] + (["--multirun"] if multirun else []) + (["--cfg", cfg] if cfg else []) + overrides
    saved, sys.argv = sys.argv, argv
    launch.RESULTS.clear()
    try:
        task()
    finally:
        sys.argv = saved
    if cfg is not None:
        return 0
    results = list(launch.RESULTS)
    if multirun:
        failed = [r for r in results if r.status != "ok"]
        typer.echo(f"llmx: sweep finished: {len(results) - len(failed)} ok, {len(failed)} not ok")
        for r in results:
            line = f"  [{r.status}] {r.run_dir}" + (f": {r.message}" if r.message else "")
            typer.echo(line, err=r.status != "ok")
        return 1 if failed else 0
    return results[-1].exit_code if results else 1


def _width() -> Optional[int]:
    """The terminal's width; when stdout is not a terminal, $COLUMNS if set, else no limit (grep sees whole lines)."""
    import shutil

    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


@app.command("list")
def list_cmd(
    kind: Optional[str] = typer.Option(None, help="only recipes of this kind (pretrain, sparsify, merge, ...)"),
    paper: Optional[str] = typer.Option(None, help="only recipes whose paper contains this text"),
    cpu: bool = typer.Option(False, "--cpu", help="only recipes that fit 2 CPU cores"),
    by: str = typer.Option("paper", help="group by paper or kind"),
):
    """Every recipe, one line each, grouped by paper: kind, cpu or gpu, description. `llmx show recipe=X` prints one
    recipe in full, with its measured CPU time."""
    from llmx.catalog import render_list, select
    from llmx.config.compose import list_recipes
    from llmx.utils import LlmxError

    try:
        rows = select(list_recipes(), kind=kind, paper=paper, cpu=cpu)
        text = render_list(rows, width=_width(), by=by, ellipsis="…" if _utf8() else "...")
    except LlmxError as e:
        _fail(str(e), 2)
    if sys.stdout.isatty():
        text = "\n".join(typer.style(line, bold=True) if line and not line.startswith(" ") else line
                         for line in text.splitlines())
    typer.echo(text)
    plural = "s" if len(rows) != 1 else ""
    typer.echo(f"\n{len(rows)} recipe{plural}. Run one: llmx run recipe=NAME; details: llmx show recipe=NAME")


def _utf8() -> bool:
    return (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"


@app.command(context_settings=EXTRA)
def show(ctx: typer.Context):
    """A recipe's full description and measured CPU time, then its resolved config:
    `llmx show recipe=pretrain_llama60m optim.lr=1e-3`."""
    from omegaconf import OmegaConf

    from llmx.catalog import describe
    from llmx.config.compose import list_recipes

    cfg = _compose_or_exit(list(ctx.args), check_values=False)  # a description, not a run: model.path may be unset
    row = next((r for r in list_recipes() if r["name"] == cfg.name), None)
    if row is not None:
        typer.echo(describe(row))
    typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)


@app.command()
def validate():
    """Compose and type-check every config in conf/; non-zero exit naming each bad one."""
    from llmx.config.compose import validate_all

    problems = validate_all()
    for what, err in problems:
        typer.secho(f"FAIL {what}: {err}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo("all configs compose and type-check")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories or sweep directories."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write report.md/json and plots."),
):
    """Final metrics of runs or whole sweeps as a table (each run labelled by its recipe and the overrides in which
    it differs from the others), plus report.md, report.json and the loss curves labelled the same way."""
    from llmx.report import bench_sections, collect_runs, report_text, write_report
    from llmx.utils import LlmxError

    for d in run_dirs:
        if not d.exists():
            _fail(f"{d}: no such directory")
    try:
        runs = collect_runs(run_dirs)
    except LlmxError as e:
        _fail(str(e))
    if not runs:
        _fail(f"no llmx runs (directories with metrics.jsonl) under {' '.join(map(str, run_dirs))}")
    typer.echo(report_text(runs, width=_width()))
    bench = bench_sections(runs)
    if bench:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(bench))
    target = out or (run_dirs[0] if len(run_dirs) == 1 else Path("."))
    for path in write_report(runs, target):
        typer.echo(f"wrote {path}")


@app.command(context_settings=EXTRA)
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: reachable from other nodes)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Served model name (default: model.name)."),
):
    """Serve a model over an OpenAI-compatible HTTP API:
    `llmx serve model=smollm2_135m evaluator.batch_size=8 --port 8000`.

    The model comes from model=..., generation defaults (batch_size, max_new_tokens, temperature, device,
    dtype, system_prompt) from evaluator.*; requests may override max_tokens, temperature, top_p, seed, stop."""
    import signal

    from llmx.utils import LlmxError

    overrides = list(ctx.args)
    if not _has_override(overrides, "evaluator"):
        overrides = ["evaluator=hf"] + overrides
    cfg = _compose_or_exit(overrides)
    source = str(getattr(cfg.model.source, "value", cfg.model.source))
    if source not in ("hf", "gguf"):
        _fail(f"llmx serve needs a pretrained model (model.source=hf or gguf, e.g. model=smollm2_135m); "
              f"model={cfg.model.name} has source={source}")
    backend_kind = str(getattr(cfg.evaluator.backend, "value", cfg.evaluator.backend))
    if backend_kind != "hf":
        _fail(f"llmx serve runs the model itself: evaluator={backend_kind} is not valid; use evaluator=hf")
    from llmx.bench.backends import build_backend
    from llmx.serve import Server

    try:
        server = Server(build_backend(cfg.evaluator, cfg.model), host=host, port=port, model_name=model_name)
    except LlmxError as e:
        _fail(str(e))
    # Slurm and process managers stop with SIGTERM: shut down as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    typer.echo(f"llmx: serving {server.model_name} at {server.base_url} (Ctrl-C stops)")
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    typer.echo("llmx: server stopped")


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        app()
        return
    # A rank of an outer torchrun: exit without interpreter teardown, which can abort after a clean
    # run when gloo process groups existed (see llmx/worker.py).
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
