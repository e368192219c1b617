"""Optimizers from config, the learning-rate schedule, and optimizer-in-backward.

Optimizers are looked up by `optim.name` in OPTIMIZERS; a method package (GaLore, ...) adds its own
with `register_optimizer`, so the trainer never changes when an optimizer is added. A builder gets the
optimizer config and the trainable parameters split into decay / no-decay groups, each group carrying a
"names" list beside "params" (so a builder can choose parameters by module name), and returns a
torch.optim.Optimizer.

The schedule is a pure function of the step (no LambdaLR object): the trainer writes the lr into every
param group before each step, so resuming needs only the step count, and optimizers that live inside
backward (one per parameter) follow the same schedule without a scheduler each.

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
    """Split trainable parameters into decay and no-decay groups by name pattern (optim.no_decay)."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.weight_decay and any(fnmatch.fnmatch(name, pat) for pat in cfg.no_decay):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [{"params": decay, "names": decay_names, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "names": no_decay_names, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


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
                opt = build(cfg, [{"params": [p], "names": [name], "weight_decay": group["weight_decay"]}])
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
    for group in opt.param_groups:
        group["lr"] = lr


def grad_params(model: nn.Module) -> Iterable[torch.Tensor]:
    return [p for p in model.parameters() if p.grad is not None]
