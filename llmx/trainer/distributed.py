"""Process groups, devices and the one place that wraps a model for parallel training.

Model code (transformers models, llmx.models) knows nothing of parallelism: `parallelize` applies
every wrapper in a fixed order, as torchtitan does. Under torchrun the environment variables RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set; the backend is NCCL on CUDA and gloo
on CPU, so the same FSDP2 code path is tested on a 2-core machine with
`torchrun --nproc_per_node=2`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from llmx.utils import LlmxError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise LlmxError(f"trainer.device={spec}: CUDA is not available on this machine; use auto or cpu")
    if spec not in ("cpu", "cuda") and not spec.startswith("cuda:"):
        raise LlmxError(f"trainer.device={spec}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_spec: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a transformers causal LM (model.model.layers)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LlmxError(f"cannot find decoder layers in {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def parallelize(
    model: nn.Module,
    info: DistInfo,
    *,
    param_dtype: Optional[torch.dtype],
    activation_checkpointing: bool,
    compile: bool,
    reshard_after_forward: bool,
) -> nn.Module:
    """Wrap `model` for training. The order is fixed and matters:

    1. activation checkpointing per block: it must wrap the block before compile and FSDP see it,
       so that recomputation covers exactly one block;
    2. torch.compile per block, after AC and before FSDP (compiling the FSDP-wrapped block would
       trace through the all-gather hooks);
    3. FSDP2 `fully_shard` on each block, then on the root. The root wrap also shards the
       embeddings, final norm and lm_head, which form one communication group; tied embeddings
       stay one parameter because they live in the same (root) group.
    Single process: steps 1-2 only. A model without decoder blocks (an SAE) is only root-wrapped.
    """
    layers = decoder_layers(model) if hasattr(getattr(model, "model", model), "layers") else []
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        inner = getattr(model, "model", model)
        for i, layer in enumerate(layers):
            inner.layers[i] = checkpoint_wrapper(layer)
        layers = list(inner.layers)
    if compile:
        for layer in layers:
            layer.compile()
    if info.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for i, layer in enumerate(layers):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            last = i == len(layers) - 1
            fully_shard(layer, reshard_after_forward=reshard_after_forward and not last, **kwargs)
        fully_shard(model, reshard_after_forward=False, **kwargs)
    return model
