"""Optimizer state per rank under FSDP2, counted by running llmx's real training setup on shapes only.

A model on the meta device (shapes, no data) is wrapped by llmx's `parallelize` (FSDP2 `fully_shard`)
inside a fake process group of W ranks (torch's "fake" backend: collectives that move nothing), the
trainer's optimizer is built from the run's config, every parameter gets a meta gradient, and one
optimizer step runs: the first step allocates all state (moments, projector bases) through the same code
as training, including the owner-rank refresh and the sharded layout. The bytes of the local tensors
this process then holds are rank 0's; FSDP2 splits dim 0 into chunks of ceil(rows / W) with rank 0's
the largest, so rank 0 holds the most.

Transient buffers are not state and are reported separately, from the shapes: at a refresh the owner
holds one full gradient (the largest m x n), and in a step a rank holds one gathered right basis and one
gathered left update (r x n each).

The fake backend lives in torch.testing._internal (stable across torch 2.x, but internal): this module
is a measuring tool for scripts/bench_galore.py and the tests, not used by training.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.distributed as dist
from torch import nn

from llmx.optim.galore.fsdp import local


_PROJECTOR_METADATA = {"projector.side", "projector.refreshes", "projector.shape", "projector.dtype"}


def _local_bytes(t: torch.Tensor) -> int:
    t = local(t)
    return t.numel() * t.element_size()


def optimizer_state_per_rank(make_model: Callable[[], nn.Module], optim_cfg, world_size: int) -> Dict[str, int]:
    """Bytes of optimizer state rank 0 holds when `make_model()` (built on the meta device) trains with
    `optim_cfg` (an llmx optim config) under FSDP2 on `world_size` ranks (1: no FSDP).

    Returns bytes {"state": total, "moments": ..., "bases": ..., "other": ..., "largest_grad": the
    largest full fp32 gradient of a projected parameter (the refresh's transient)}, and "<kind>_elements"
    counts of the local elements."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from llmx.trainer.distributed import DistInfo, parallelize
    from llmx.trainer.optim import build_optimizer, optimizers_of

    if dist.is_initialized():
        raise RuntimeError("optimizer_state_per_rank needs a process without a process group")
    if world_size > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with torch.device("meta"):
            model = make_model()
        info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("meta"))
        model = parallelize(model, info, param_dtype=None, activation_checkpointing=False, compile=False,
                            reshard_after_forward=True)
        opt = build_optimizer(model, optim_cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for o in optimizers_of(opt):
            o.step()
        out = {"moments": 0, "bases": 0, "other": 0, "largest_grad": 0}
        for o in optimizers_of(opt):
            for p, state in o.state.items():
                for key, t in state.items():
                    if not torch.is_tensor(t):
                        continue
                    kind = "moments" if key.startswith("exp_avg") else \
                        "bases" if key.startswith("projector.") and key not in _PROJECTOR_METADATA else "other"
                    out[kind] += _local_bytes(t)
                    out[kind + "_elements"] = out.get(kind + "_elements", 0) + local(t).numel()
                if any(k.startswith("projector.") for k in state):
                    out["largest_grad"] = max(out["largest_grad"], p.numel() * 4)
        out["state"] = out["moments"] + out["bases"] + out["other"]
        return out
    finally:
        if world_size > 1:
            dist.destroy_process_group()
