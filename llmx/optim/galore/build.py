"""`optim.name=galore_adamw`: GaLoreAdamW / GaLoreAdamW8bit from a GaLoreOptimConfig.

Registered on import; llmx.trainer.optim.builder_for imports this module for names starting with
"galore". The builder receives the trainer's decay / no-decay groups (each with a "names" list) and
splits each by parameter name: 2-D parameters (and N-D ones when cfg.tucker) whose names match one of
cfg.targets (fnmatch) are projected, with rank cfg.rank or that of the first matching pattern of
cfg.rank_overrides; everything else (embeddings, norms, lm_head by default) gets plain AdamW with the
same update rule. Optimizer-in-backward calls the builder once per parameter, so the parameter's own
name decides.
"""

from __future__ import annotations

import fnmatch
from typing import List

import torch

from llmx.optim.galore.adamw import GaLoreAdamW, GaLoreAdamW8bit, _value
from llmx.trainer.optim import register_optimizer
from llmx.utils import LlmxError


def _rank_for(name: str, cfg) -> int:
    for pattern, rank in dict(cfg.rank_overrides or {}).items():
        if fnmatch.fnmatch(name, pattern):
            return int(rank)
    return int(cfg.rank)


@register_optimizer("galore_adamw")
def build_galore_adamw(cfg, groups: List[dict]) -> torch.optim.Optimizer:
    targets = list(cfg.targets)
    galore_keys = {
        "update_proj_gap": int(cfg.update_proj_gap),
        "scale": float(cfg.scale),
        "proj_type": _value(cfg.proj_type),
        "svd": _value(cfg.svd),
        "oversample": int(cfg.oversample),
        "power_iters": int(cfg.power_iters),
        "quant_bits": cfg.quant_bits,
        "quant_group_size": int(cfg.quant_group_size),
        "precision": _value(cfg.precision),
        "basis_dtype": _value(cfg.basis_dtype),
    }
    matched = set()
    all_names = []
    out = []
    for group in groups:
        # the trainer's per-group keys: set_lr reads lr_scale from whichever group a parameter lands in
        keep = {k: group[k] for k in ("weight_decay", "lr_scale") if k in group}
        plain, plain_names, by_rank = [], [], {}  # by_rank: rank -> (parameters, names)
        for name, p in zip(group["names"], group["params"]):
            all_names.append(name)
            hits = [pat for pat in targets if fnmatch.fnmatch(name, pat)]
            matched.update(hits)
            if hits and (p.ndim == 2 or (p.ndim > 2 and cfg.tucker)):
                params, names = by_rank.setdefault(_rank_for(name, cfg), ([], []))
                params.append(p)
                names.append(name)
            else:
                plain.append(p)
                plain_names.append(name)
        # torch wants param_names on every group or none
        if plain:
            out.append({"params": plain, "param_names": plain_names, **keep})
        for rank, (params, names) in by_rank.items():
            # param_names: each parameter's randomized-SVD sketch seed is derived from its name
            out.append({"params": params, "param_names": names, **keep, "rank": rank, **galore_keys})
    unmatched = [pat for pat in targets if pat not in matched]
    # In-backward mode builds one optimizer per parameter: a pattern missing from one parameter's name
    # says nothing about the model, so only whole-model builds can check the patterns.
    if unmatched and not cfg.in_backward:
        raise LlmxError(
            f"optim.targets: {unmatched} match no trainable parameter; parameter names look like "
            f"{all_names[:6]} (fnmatch patterns, e.g. '*mlp.*_proj.weight')"
        )
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                  moments=_value(cfg.moments), fused=bool(cfg.fused))
    if cfg.optim_bits == 32:
        return GaLoreAdamW(out, **kwargs)
    if cfg.optim_bits == 8:
        return GaLoreAdamW8bit(out, **kwargs)
    raise LlmxError(f"optim.optim_bits={cfg.optim_bits}: expected 32 or 8")
