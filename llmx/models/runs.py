"""An earlier llmx run as a model: `model.path` may name a run directory of any kind, or the output inside it.

So runs chain: pretrain with GaLore 2, share its MLPs with SHARP, sparsify that with R-Sparse, evaluate the
result on GSM-Infinite, each command reading the previous run directory. What a run directory yields, in
this order (the most derived output first):

    artifacts/s<level>/   R-Sparse or TEAL (sparsify)   the run's own model, loaded as that run loaded it
                                                        (so recursively through its chain), then the
                                                        artifact applied in place (llmx.sparse.artifact);
                                                        model.level picks the level when there are several
    compact/              SHARP (sparsify)              llmx.sharing.load_compact: a replaced layer's MLP
                                                        is never materialised
    merged/hf/, merged/   merge, ParamΔ                 transformers from_pretrained
    hf/                   every trainer run             transformers from_pretrained

A path to one of these outputs directly (`run/artifacts/s0.5`, `run/compact`) works too. A directory is an
llmx run when it holds the `config.yaml` and `run_info.json` every run writes; any other path is left to the
model's own source (Hugging Face directory or hub id, GGUF). The caller's model.dtype and attention
implementation apply to the model at the end of the chain; `model.token_mode` overrides the token mode the
artifact was evaluated with (llmx.sparse.rsparse.TOKEN_MODES).

An R-Sparse artifact on a SHARP model sparsifies the shared reference projections in place, so both layers
that use a reference read it sparsely; the artifact's fingerprint is that of the compact model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from llmx.utils import LlmxError

RUN_FILES = ("config.yaml", "run_info.json")


@dataclass
class RunOutput:
    kind: str  # "hf" | "sharp" | "rsparse"
    path: Path  # the directory that is loaded (the artifact for rsparse)
    run_dir: Optional[Path]  # the run that made it, when known
    what: str  # for messages: "run galore2_tiny (pretrain): hf/"


def is_run_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in RUN_FILES)


def _run_name(run_dir: Optional[Path]) -> str:
    if run_dir is None:
        return "?"
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    return f"{cfg.get('name', run_dir.name)} ({cfg.get('kind', '?')})"


def _status(run_dir: Path) -> str:
    import json

    try:
        return json.loads((run_dir / "status.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "unknown (no status.json)"


def _levels(run_dir: Path) -> List[Path]:
    found = [p for p in (run_dir / "artifacts").glob("s*") if (p / "rsparse.json").is_file()]
    return sorted(found, key=lambda p: float(p.name[1:]))


def _pick_level(run_dir: Path, levels: List[Path], level: Optional[float]) -> Path:
    names = ", ".join(p.name[1:] for p in levels)
    if level is None:
        if len(levels) > 1:
            raise LlmxError(f"model.path={run_dir} holds R-Sparse/TEAL artifacts at sparsity {names}: choose one with "
                            f"model.level=<one of them>")
        return levels[0]
    for p in levels:
        if abs(float(p.name[1:]) - float(level)) < 1e-9:
            return p
    raise LlmxError(f"model.level={level}: {run_dir} has artifacts at sparsity {names} only")


def _owner(path: Path, depth: int) -> Optional[Path]:
    """The run directory `depth` levels above an output, when it is one."""
    up = path.parents[depth - 1] if len(path.parents) >= depth else None
    return up if up is not None and is_run_dir(up) else None


def find_output(path: Any, level: Optional[float] = None) -> Optional[RunOutput]:
    """What `path` yields as a model when it is an llmx run or an output inside one (module docstring); None when it
    is neither. Reads only small files, so the launcher calls it to refuse a bad path before any work."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        return None
    p = p.resolve()
    if (p / "rsparse.json").is_file():
        owner = _owner(p, 2)
        return RunOutput("rsparse", p, owner, f"run {_run_name(owner)}: artifacts/{p.name}")
    if (p / "sharp.json").is_file():
        owner = _owner(p, 1)
        return RunOutput("sharp", p, owner, f"run {_run_name(owner)}: {p.name}/")
    if not is_run_dir(p):
        return None
    levels = _levels(p)
    if levels:
        art = _pick_level(p, levels, level)
        return RunOutput("rsparse", art, p, f"run {_run_name(p)}: artifacts/{art.name}")
    if level is not None:
        raise LlmxError(f"model.level={level} is set, but {p} holds no R-Sparse/TEAL artifacts (artifacts/s<level>)")
    for sub, kind in (("compact", "sharp"), ("merged/hf", "hf"), ("merged", "hf"), ("hf", "hf")):
        out = p / sub
        if (out / ("sharp.json" if kind == "sharp" else "config.json")).is_file():
            return RunOutput(kind, out, p, f"run {_run_name(p)}: {sub}/")
    raise LlmxError(f"model.path={p} is an llmx run ({_run_name(p)}, status {_status(p)}) without a model to load: "
                    "looked for artifacts/s<level>/, compact/, merged/ and hf/ (a trainer run writes hf/ at its end "
                    "when trainer.export_hf=true)")


def _base_model_cfg(out: RunOutput, model_cfg: Any):
    """The model config of the run that made an artifact, with the caller's dtype and attention."""
    from omegaconf import OmegaConf

    if out.run_dir is None:
        raise LlmxError(f"{out.path}: an R-Sparse artifact outside its run directory; the dense model it was made "
                        "for is unknown (keep it at <run>/artifacts/s<level>)")
    base = OmegaConf.load(out.run_dir / "config.yaml").model
    base.dtype = model_cfg.dtype
    base.attn_implementation = model_cfg.attn_implementation
    return base


def _skeleton(model_cfg: Any):
    """The model that model_cfg loads, with its parameters on the meta device: shapes without reading weights."""
    out = find_output(model_cfg.path, getattr(model_cfg, "level", None))
    if out is not None and out.kind == "sharp":
        from llmx.sharing.compact import compact_skeleton

        return compact_skeleton(out.path)[0]
    if out is not None and out.kind == "rsparse":  # an artifact keeps its dense model's shapes
        return _skeleton(_base_model_cfg(out, model_cfg))
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmx.models.pretrained import pretrained_dir

    config = AutoConfig.from_pretrained(pretrained_dir(model_cfg, weights=False))
    config.__dict__.pop("quantization_config", None)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def check_fits(model_cfg: Any) -> None:
    """When model.path names an R-Sparse/TEAL artifact: its layers against the shapes of the model it will be
    applied to, before any weight is read (llmx.launch.check_before_run). The weights' identity is checked when
    they are loaded (llmx.sparse.artifact's fingerprint)."""
    import json

    from llmx.sparse.rsparse import find_linears

    out = find_output(model_cfg.path, getattr(model_cfg, "level", None))
    if out is None or out.kind != "rsparse":
        return
    layers = json.loads((out.path / "rsparse.json").read_text())["layers"]
    base = _base_model_cfg(out, model_cfg)
    shapes = {n: (m.in_features, m.out_features) for n, m in find_linears(_skeleton(base), list({
        n.rsplit(".", 1)[-1] for n in layers})).items()}
    for name, e in layers.items():
        if shapes.get(name) != (e["in"], e["out"]):
            have = f"has {shapes[name]}" if name in shapes else "has no such layer"
            raise LlmxError(f"model.path: {out.what} does not fit its model {base.name} ({base.path or base.package}): "
                            f"layer {name} is (in, out) = ({e['in']}, {e['out']}) in the artifact, the model {have}")


def load_output(out: RunOutput, model_cfg: Any):
    """(model, tokenizer) of a run's output, in model_cfg.dtype."""
    from llmx.models.pretrained import load_pretrained, resolve_dtype

    print(f"llmx: model.path: {out.what}", flush=True)
    if out.kind == "rsparse":
        from llmx.sparse.artifact import load_artifact

        model, tokenizer = load_pretrained(_base_model_cfg(out, model_cfg))
        load_artifact(model, out.path, token_mode=getattr(model_cfg, "token_mode", None))
        return model, tokenizer
    if out.kind == "sharp":
        from llmx.sharing import load_compact

        model, tokenizer = load_compact(out.path, dtype=resolve_dtype(model_cfg.dtype), with_tokenizer=True)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out.path, dtype=resolve_dtype(model_cfg.dtype),
                                                 attn_implementation=model_cfg.attn_implementation)
    return model, AutoTokenizer.from_pretrained(out.path)


def output_dir(out: RunOutput, model_cfg: Any, weights: bool) -> str:
    """A directory that from_pretrained reads for this output. weights=False (a tokenizer or a config is wanted):
    an artifact answers with its dense model's directory. weights=True: only plain Hugging Face outputs have one."""
    if out.kind == "hf":
        return str(out.path)
    if not weights:
        if out.kind == "sharp":
            return str(out.path)  # config.json and the tokenizer are stored beside the compact weights
        from llmx.models.pretrained import pretrained_dir

        return pretrained_dir(_base_model_cfg(out, model_cfg), weights=False)
    made = "a SHARP compact checkpoint" if out.kind == "sharp" else "an R-Sparse/TEAL artifact"
    raise LlmxError(f"model.path: {out.what} is {made}, which this step would read as a plain Hugging Face directory; "
                    "recipes that load the model in memory take it (sparsify, sae, pretrain with model.source=hf, "
                    "generate_bench with evaluator=hf)")
