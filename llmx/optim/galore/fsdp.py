"""GaLore under FSDP2: what each rank holds, and the only communication the optimizer adds.

FSDP2 (`fully_shard`) turns every parameter, and its gradient, into a DTensor sharded on dim 0
(`Shard(0)`): rank k holds rows [k*ceil(m/W), ...) of the m x n weight. GaLore's subspace needs the
whole gradient, its Adam step only the projected one. The strategy (no paper describes one: GaLore 2,
arXiv 2504.20437, states FSDP support without the method; notes section 2.3):

Refresh steps (every update_proj_gap steps, per parameter):
  the full gradient is all-gathered (`grad.full_tensor()`: each rank receives (W-1)/W * m*n values and
  holds one m x n fp32 buffer transiently), and EVERY rank computes the basis from these identical
  values. Chosen over "rank 0 computes and broadcasts" because no rank idles while another runs the
  SVD and no basis-sized broadcast is needed: an exact SVD (LAPACK / cuSOLVER) of bitwise-identical
  input is bitwise-identical, and the randomized range finder is seeded. That is checked, not assumed:
  a checksum of the projector state (two float64 numbers per tensor, ~10 values) is all-reduced as
  MAX of [c, -c]; on a mismatch (heterogeneous hardware or libraries) the projector state of mesh
  coordinate 0 is broadcast and used everywhere.
Other steps, by side of the projection (side = which dimension of the m x n gradient is compressed):
  right (P is r x n; `std` picks it when m >= n): G_local @ P^T is exactly this rank's rows of the
    m x r low-rank gradient. No communication. Moments are DTensors Shard(0) of global shape (m, r),
    so they stay sharded (1/W of the low-rank state per rank) and DCP saves and reshards them.
  left (P is m x r; `std` when m < n) and full (r x r core): P[rows]^T @ G_local is a partial sum over
    the row shards; one all-reduce of r x n (full: r x r) fp32 values per step and parameter gives the
    low-rank gradient on every rank. Moments are replicated plain tensors (DCP writes them once) and
    every rank runs the same small Adam step on them.
    For down_proj-shaped weights (m < n) at large rank that all-reduce is sizeable (r x n vs the
    m x n reduce-scatter FSDP already does); proj_type=right avoids it at the price of compressing
    the larger dimension.
  Tucker (ndim > 2): like left: the mode-0 factor's rows give a partial sum of the core, one
    all-reduce of the core per step; moments replicated.
The update is always applied to the local shard (`param.to_local()`), in place. With the optimizer in
backward (one optimizer per parameter, stepped from post-accumulate-grad hooks) these collectives run
inside backward, in the same parameter order on every rank.

Memory: the projector's basis is held in full on every rank (it is refreshed from the full gradient),
although a left basis is only used through this rank's rows between refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@dataclass
class ShardView:
    """A parameter as this rank sees it: local tensors, and where its rows sit in the global matrix."""

    param: torch.Tensor  # local shard (the whole tensor outside FSDP); updated in place
    grad: torch.Tensor  # local shard of the gradient
    full: Optional["DTensor"] = None  # the DTensor parameter, None for a plain tensor
    dgrad: Optional["DTensor"] = None  # its gradient, with the parameter's placements
    rows: Optional[slice] = None  # this rank's rows of dim 0; None when it holds every row
    shard_groups: List = field(default_factory=list)  # groups over which dim 0 is split

    @property
    def sharded(self) -> bool:
        return self.rows is not None

    def full_grad(self) -> torch.Tensor:
        """The whole gradient on every rank (an all-gather under FSDP)."""
        return self.grad if self.dgrad is None else self.dgrad.full_tensor()

    def sum_rows(self, partial: torch.Tensor) -> torch.Tensor:
        """All-reduce a partial sum over the row shards (in place)."""
        for g in self.shard_groups:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=g)
        return partial

    def like_rows(self, local: torch.Tensor) -> torch.Tensor:
        """State whose rows follow the parameter's: a DTensor of the same placements when sharded."""
        if self.full is None:
            return local
        shape = (self.full.shape[0], *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.full.device_mesh, self.full.placements, run_check=False,
                                  shape=torch.Size(shape), stride=stride)


def shard_view(p: torch.Tensor) -> ShardView:
    if not is_dtensor(p):
        return ShardView(param=p, grad=p.grad)
    grad = p.grad
    if grad.placements != p.placements:
        grad = grad.redistribute(p.device_mesh, p.placements)
    for pl in p.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise NotImplementedError(
                f"GaLore supports DTensor parameters sharded on dim 0 (FSDP2) or replicated; got placements "
                f"{p.placements}"
            )
    mesh = p.device_mesh
    shard_dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    view = ShardView(param=p.to_local(), grad=grad.to_local(), full=p, dgrad=grad)
    if shard_dims:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        view.rows = slice(offset[0], offset[0] + local_shape[0])
        view.shard_groups = [mesh.get_group(i) for i in shard_dims]
    return view


def _checksum(tensors) -> torch.Tensor:
    parts = []
    for t in tensors:
        x = t.detach().double().flatten()
        # the weighted sum also catches permutations and sign flips of basis vectors
        w = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device) if x.numel() else x
        parts += [x.sum(), (x * w).sum()]
    return torch.stack(parts) if parts else torch.zeros(1, dtype=torch.float64)


def make_identical(projector, view: ShardView) -> bool:
    """Check that every rank computed the same projector state; broadcast coordinate 0's if not.

    Returns True when a broadcast was needed. Collective over the parameter's whole mesh."""
    if view.full is None:
        return False
    mesh = view.full.device_mesh
    sd = projector.state_dict()
    keys = sorted(k for k, v in sd.items() if torch.is_tensor(v))
    c = _checksum([sd[k] for k in keys])
    both = torch.cat([c, -c]).to(view.param.device if view.param.device.type != "meta" else "cpu")
    for i in range(mesh.ndim):
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=mesh.get_group(i))
    n = c.numel()
    if torch.equal(both[:n], -both[n:]):
        return False
    for k in keys:
        t = sd[k].contiguous()
        for i in range(mesh.ndim):
            dist.broadcast(t, group=mesh.get_group(i), group_src=0)
        sd[k] = t
    projector.load_state_dict(sd)
    return True
