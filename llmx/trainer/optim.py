"""Optimizers from config, the learning-rate schedule, and optimizer-in-backward.

Optimizers are looked up by `optim.name` in OPTIMIZERS; a method package (GaLore, ...) adds its own
with `register_optimizer`, so the trainer never changes when an optimizer is added. A builder gets the
optimizer config and the trainable parameters split into groups by weight decay and lr multiplier
(optim.lr_scales), each group carrying a "names" list beside "params" (so a builder can choose parameters by
module name), and returns a torch.optim.Optimizer. A builder that re-splits the groups keeps each group's
"weight_decay" and "lr_scale" in the groups it makes.

The schedule is a pure function of the step (no LambdaLR object): the trainer writes the lr (times the
group's "lr_scale") into every param group before each step, so resuming needs only the step count, and
optimizers that live inside backward (one per parameter) follow the same schedule without a scheduler each.

Optimizer-in-backward (`optim.in_backward=true`): one optimizer per parameter, stepped by a
post-accumulate-grad hook as soon as that parameter's gradient is complete, after which the gradient
is freed. Peak memory drops by the size of all gradients. Differences from the usual loop, handled here:
- gradient accumulation: hooks fire after every micro-batch's backward; they step only when the trainer
  has marked the current micro-batch as the last of the step (the reference GaLore code and the
  transformers Trainer step on every micro-batch, or refuse accumulation);
- global gradient-norm clipping needs every gradient before any step, so it is refused with a clear
  message (see `check_in_backward`).
"""

from __future__ import annotations

import fnmatch
import importlib
import math
from typing import Callable, Dict, Iterable, List

import torch
from torch import nn

from llmx.utils import LlmxError

OptimizerBuilder = Callable[[object, List[dict]], torch.optim.Optimizer]
OPTIMIZERS: Dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str):
    def deco(fn: OptimizerBuilder) -> OptimizerBuilder:
        OPTIMIZERS[name] = fn
        return fn

    return deco


@register_optimizer("adamw")
def _adamw(cfg, groups: List[dict]) -> torch.optim.Optimizer:
    # foreach (not fused) so that results are identical on CPU and under FSDP's DTensors.
    return torch.optim.AdamW(strip_names(groups), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def param_groups(model: nn.Module, cfg) -> List[dict]:
    """Split trainable parameters into groups by weight decay (optim.no_decay name patterns) and by lr
    multiplier (optim.lr_scales: the first matching pattern wins). A group with a multiplier other than 1
    carries it as "lr_scale", which set_lr applies."""
    scales = lr_scales(model, cfg)
    groups: Dict[tuple, dict] = {}  # (decays, lr_scale) -> group
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (cfg.weight_decay and any(fnmatch.fnmatch(name, pat) for pat in cfg.no_decay))
        scale = next((s for pat, s in scales.items() if fnmatch.fnmatch(name, pat)), 1.0)
        group = groups.get((decays, scale))
        if group is None:
            group = {"params": [], "names": [], "weight_decay": cfg.weight_decay if decays else 0.0}
            # Only scaled groups get the key: checkpoints store every group key, and those written
            # before lr_scales existed must still load into a run that does not use it.
            if scale != 1.0:
                group["lr_scale"] = scale
            groups[(decays, scale)] = group
        group["params"].append(p)
        group["names"].append(name)
    # Decay groups first, the order checkpoints written before lr_scales existed have.
    return [g for (decays, _), g in groups.items() if decays] + [g for (decays, _), g in groups.items() if not decays]


def lr_scales(model: nn.Module, cfg) -> Dict[str, float]:
    """optim.lr_scales, checked against the whole model: every multiplier finite and > 0, every pattern
    matching a trainable parameter (a typo would otherwise silently train everything at the full lr)."""
    scales = dict(getattr(cfg, "lr_scales", None) or {})
    for pat, s in scales.items():
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise LlmxError(f"optim.lr_scales['{pat}']={s}: a multiplier of the lr must be a finite number > 0")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unmatched = [pat for pat in scales if not any(fnmatch.fnmatch(n, pat) for n in names)]
    if unmatched:
        raise LlmxError(
            f"optim.lr_scales: {unmatched} match no trainable parameter; parameter names look like "
            f"{names[:6]} (fnmatch patterns, e.g. '*mlp.*_proj.weight')"
        )
    return {str(pat): float(s) for pat, s in scales.items()}


def strip_names(groups: List[dict]) -> List[dict]:
    """Param groups without the "names" list (which builders may use to pick parameters)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


# Method packages register their optimizers when imported. They are imported on first need, so that a
# plain AdamW run loads none of them, and all of them before an unknown name is reported.
OPTIMIZER_MODULES = ("llmx.optim.galore.build",)


def builder_for(name: str) -> OptimizerBuilder:
    if name not in OPTIMIZERS:
        for module in OPTIMIZER_MODULES:
            importlib.import_module(module)
    if name not in OPTIMIZERS:
        raise LlmxError(f"optim.name={name}: unknown optimizer; available: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


class InBackwardOptimizer:
    """One optimizer per parameter, stepped inside backward. Quacks like an optimizer for the trainer.

    `optimizers` is the list handed to torch.distributed.checkpoint's get_state_dict, which accepts
    several optimizers, so checkpoints hold every per-parameter state under its parameter's name.
    """

    def __init__(self, model: nn.Module, cfg, build: OptimizerBuilder):
        self.optimizers: List[torch.optim.Optimizer] = []
        self.last_micro_batch = True
        self._hooks = []
        for group in param_groups(model, cfg):
            for name, p in zip(group["names"], group["params"]):
                opt = build(cfg, [{**group, "params": [p], "names": [name]}])
                self.optimizers.append(opt)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(opt)))

    def _make_hook(self, opt: torch.optim.Optimizer):
        def hook(param: torch.Tensor) -> None:
            if not self.last_micro_batch:
                return  # keep accumulating into .grad
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    @property
    def param_groups(self) -> List[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:  # the hooks already stepped
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:  # the hooks already freed the gradients
        pass

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def check_in_backward(cfg) -> None:
    if cfg.in_backward and cfg.grad_clip:
        raise LlmxError(
            f"optim.in_backward=true cannot clip the global gradient norm (optim.grad_clip={cfg.grad_clip}): each "
            "parameter steps as soon as its own gradient is ready, before the others exist. Set optim.grad_clip=null."
        )


def build_optimizer(model: nn.Module, cfg):
    """The optimizer named by cfg.name over model's trainable parameters (or the in-backward wrapper)."""
    build = builder_for(cfg.name)
    check_in_backward(cfg)
    if cfg.in_backward:
        return InBackwardOptimizer(model, cfg, build)
    return build(cfg, param_groups(model, cfg))


def optimizers_of(opt) -> List[torch.optim.Optimizer]:
    return opt.optimizers if isinstance(opt, InBackwardOptimizer) else [opt]


def lr_at(step: int, *, base_lr: float, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to
    base_lr * min_lr_ratio at max_steps, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        factor = 1.0 - progress
    else:
        raise LlmxError(f"optim.schedule={schedule}: expected cosine, linear or constant")
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def set_lr(opt, lr: float) -> None:
    """Write the scheduled lr into every param group, times the group's optim.lr_scales multiplier."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def grad_params(model: nn.Module) -> Iterable[torch.Tensor]:
    return [p for p in model.parameters() if p.grad is not None]
