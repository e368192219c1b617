"""Value checks shared by every recipe kind, run on the composed config before anything starts: before Hydra makes
a run directory, before torchrun spawns a process, before a model or data is loaded. The schema checks types;
these check ranges and combinations, each with one message naming the value and what is valid. A kind's own
settings are checked by its recipe module's check_config, also before work.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Tuple


def _int_at_least(n: int, meaning: str = "") -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and v >= n), f"an integer >= {n}" + (f" ({meaning})" if meaning else "")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


# key -> (valid?, what is valid). Keys absent from a config (optim.rank without GaLore) are skipped; null is
# accepted where the schema allows it (it means "off" there).
RANGES = {
    "seed": _int_at_least(0),
    "trainer.max_steps": _int_at_least(1),
    "trainer.batch_size": _int_at_least(1),
    "trainer.micro_batch_size": _int_at_least(1),
    "trainer.eval_every": _int_at_least(0, "0: evaluate at the end only"),
    "trainer.eval_batches": _int_at_least(1),
    "trainer.log_every": _int_at_least(1),
    "trainer.ckpt_every": _int_at_least(0, "0: a checkpoint at the end only"),
    "trainer.keep_last": _int_at_least(0, "0: keep every checkpoint"),
    "trainer.max_seconds": (_positive, "a number of seconds > 0, or null"),
    "optim.lr": (_positive, "a finite number > 0"),
    "optim.weight_decay": (_non_negative, "a finite number >= 0"),
    "optim.warmup_steps": _int_at_least(0),
    "optim.grad_clip": (_positive, "a finite number > 0, or null (no clipping)"),
    "optim.min_lr_ratio": (lambda v: _non_negative(v) and v <= 1, "a number in [0, 1]"),
    "optim.eps": (_positive, "a finite number > 0"),
    "optim.rank": _int_at_least(1),
    "optim.update_proj_gap": _int_at_least(1),
    "optim.scale": (_positive, "a finite number > 0"),
    "data.seq_len": _int_at_least(2),
    "launcher.nproc_per_node": _int_at_least(1),
    "launcher.nnodes": _int_at_least(1),
}


def _select(cfg, key: str):
    from omegaconf import OmegaConf

    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    return None if value is missing else value, value is not missing


def world_size(cfg) -> int:
    """The process count a launch of `cfg` will have: launcher=torchrun/slurm start nproc_per_node x nnodes; a
    local launch inside an outer torchrun has that torchrun's WORLD_SIZE."""
    import os

    name = getattr(cfg.launcher.name, "value", cfg.launcher.name)
    if name in ("torchrun", "slurm"):
        return int(cfg.launcher.nproc_per_node) * int(cfg.launcher.nnodes)
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def derived_micro_batch(cfg) -> int:
    """The largest micro-batch, at most the configured one, that splits trainer.batch_size evenly over the
    launch's processes (the configured one when it already does; it when none does, for the check to refuse)."""
    t, world = cfg.trainer, world_size(cfg)
    fits = [m for m in range(1, t.micro_batch_size + 1) if t.batch_size % (m * world) == 0]
    return fits[-1] if fits else t.micro_batch_size


def problems(cfg, batch_split: bool = True, model_path: bool = True) -> List[str]:
    """Every shared value of `cfg` outside its range, one message each (batch_split: and whether the batch splits
    over the launch's processes; model_path: and whether model.path names what the model's source needs)."""
    out = []
    for key, (ok, valid) in RANGES.items():
        value, present = _select(cfg, key)
        if present and value is not None and (isinstance(value, bool) or not ok(value)):
            out.append(f"{key}={value!r}: must be {valid}")
    betas, present = _select(cfg, "optim.betas")
    if present and betas is not None and not (len(betas) == 2 and all(_non_negative(b) and b < 1 for b in betas)):
        out.append(f"optim.betas={list(betas)}: must be two numbers in [0, 1)")
    if "model" in cfg:
        out += model_problems(cfg.model, model_path)
    if batch_split and not out and "trainer" in cfg:
        t, world = cfg.trainer, world_size(cfg)
        if t.batch_size % (t.micro_batch_size * world):
            fits = [m for m in range(1, t.batch_size + 1) if t.batch_size % (m * world) == 0]
            hint = (f"with {world} process(es) trainer.micro_batch_size can be {', '.join(map(str, fits))}"
                    if fits else f"trainer.batch_size must be a multiple of the {world} processes")
            out.append(f"trainer.batch_size={t.batch_size} is not divisible by trainer.micro_batch_size="
                       f"{t.micro_batch_size} x {world} process(es) = {t.micro_batch_size * world}; {hint}")
    return out



def model_problems(model, path: bool = True) -> List[str]:
    """model.path, model.level and model.token_mode: an llmx run in model.path is resolved here (small files only),
    so a run without a model, an ambiguous or absent level, or a failed run is refused before any work."""
    from llmx.models.runs import find_output
    from llmx.utils import LlmxError

    out = []
    source = getattr(model.source, "value", model.source)
    if source == "preset" and model.path:
        out.append(f"model.path={model.path!r} is set but model.source=preset builds a new model from the preset's "
                   "shape; to start from those weights use model=run (or model.source=hf)")
    level, token_mode = model.get("level"), model.get("token_mode")
    if level is not None and not (_positive(level) and level < 1):
        out.append(f"model.level={level!r}: must be a sparsity in (0, 1), one an R-Sparse/TEAL run saved")
    if token_mode is not None:
        from llmx.sparse.rsparse import TOKEN_MODES  # torch: only when a token mode is asked for
    if token_mode is not None and token_mode not in TOKEN_MODES:
        out.append(f"model.token_mode={token_mode!r}: must be one of {list(TOKEN_MODES)}, or null")
    if path and not out and source != "preset":
        try:
            found = find_output(model.path, level)
        except LlmxError as e:
            return [str(e)]
        if found is None and source == "hf":
            from llmx.models.pretrained import hf_location

            try:
                hf_location(model)
            except LlmxError as e:
                return [str(e)]
        if found is None and token_mode is not None:
            out.append(f"model.token_mode={token_mode!r} applies to an R-Sparse/TEAL run in model.path; "
                       f"model.path={model.path!r} is not one")
        elif found is not None and found.kind != "rsparse" and token_mode is not None:
            out.append(f"model.token_mode={token_mode!r} applies to an R-Sparse/TEAL artifact; {found.what} is not one")
    return out
