"""GaLore under FSDP2: what each rank holds, and the communication the optimizer adds.

FSDP2 (`fully_shard`) turns every parameter, and its gradient, into a DTensor sharded on dim 0 over a
1-D mesh of W ranks: rank k holds rows R_k (chunks of ceil(m/W) rows) of the m x n weight. GaLore 2
(arXiv 2504.20437) states FSDP support without describing it (notes/galore.md 2.3); this is llmx's design.

State: sharded, so that a rank holds about 1/W of the optimizer state, as with sharded AdamW. Every
GaLore tensor is a DTensor sharded on its dim 0 over the same mesh, so torch.distributed.checkpoint
saves, reshards and restores it like the weights:
  right (P is r x n; `std` picks it when m >= n): moments m x r, rows R_k like the weight; P sharded on
    its r rows. Step: P is all-gathered (r x n, in its storage dtype), low_k = G_k P^T is exactly this
    rank's rows of the low-rank gradient, Adam runs on them, W_k += -lr alpha N_k P.
  left (P is m x r; `std` when m < n): P sharded like the weight, so P[R_k] is local and never moves.
    P[R_k]^T G_k is this rank's partial sum of the r x n low-rank gradient: it is reduce-scattered (each
    rank receives the sum of its ceil(r/W) rows), Adam runs on those rows of the sharded r x n moments,
    and the normalised update N (r x n) is all-gathered for W_k += -lr alpha P[R_k] N. Reduce-scatter
    plus all-gather move what the all-reduce of the replicated design did; Adam's state and work are 1/W.
  full (A m x r like left, B r x n like right's P): the r x r core is reduce-scattered and gathered.
  Quantized bases (Q-GaLore, quant_bits): stored whole on every rank (4 bits are 1/8 of fp32; the
    quantization groups run across rows). Tucker (ndim > 2): factors and moments whole on every rank,
    the core's partial sums all-reduced.

Refresh (every update_proj_gap steps): the subspace needs the whole gradient. The parameters due in a
step are taken in rounds of W; in a round, parameter i's gradient is gathered to rank i (its owner)
only, every owner computes its own basis at the same time as the others (fp32 SVD or randomized range
finder), and each owner scatters to every rank the shard of the basis that rank stores (a quantized or
Tucker basis is broadcast whole). So each basis is computed once, not W times, and every rank holds at
most one full gradient at a time. With the optimizer in backward each parameter is its own round
(owner: rank 0), so the SVDs of different parameters do not overlap: that mode saves gradient memory,
not refresh time.

Every collective runs on the parameter's device (NCCL needs CUDA tensors); the projector's metadata
(side, shape, counters) is derived identically on every rank and never communicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def _meta_stride(shape) -> Tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


@dataclass
class ShardView:
    """A parameter as this rank sees it: local tensors, and where its rows sit in the global matrix."""

    param: torch.Tensor  # local shard (the whole tensor outside FSDP); updated in place
    grad: torch.Tensor  # local shard of the gradient
    full: Optional["DTensor"] = None  # the DTensor parameter, None for a plain tensor
    dgrad: Optional["DTensor"] = None  # its gradient, with the parameter's placements
    rows: Optional[slice] = None  # this rank's rows of dim 0; None when it holds every row

    @property
    def sharded(self) -> bool:
        return self.rows is not None

    @property
    def mesh(self):
        return self.full.device_mesh

    @property
    def group(self):
        return self.mesh.get_group(0)

    @property
    def world(self) -> int:
        return self.mesh.size(0)

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank(0)

    def full_grad(self) -> torch.Tensor:
        """The whole gradient on every rank (an all-gather under FSDP)."""
        return self.grad if self.dgrad is None else self.dgrad.full_tensor()

    def shard(self, local: torch.Tensor, global_rows: int) -> torch.Tensor:
        """`local` as this rank's rows of a dim-0-sharded DTensor with `global_rows` rows (unchanged
        outside FSDP, or for a parameter that is not sharded)."""
        if not self.sharded:
            return local
        shape = torch.Size((global_rows, *local.shape[1:]))
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=_meta_stride(shape))

    def local_rows(self, global_rows: int) -> slice:
        """This rank's rows of a dim-0-sharded tensor with `global_rows` rows (torch.chunk's split)."""
        chunk = -(-global_rows // self.world)
        lo = min(global_rows, self.rank * chunk)
        return slice(lo, min(global_rows, lo + chunk))

    def reduce_scatter(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' `partial` (same shape everywhere) and return this rank's rows of the sum."""
        d = DTensor.from_local(partial, self.mesh, [Partial()], run_check=False)
        return d.redistribute(self.mesh, [Shard(0)]).to_local()

    def all_gather(self, local: torch.Tensor, global_rows: int) -> torch.Tensor:
        """The whole tensor whose dim-0 shards the ranks hold (`local` is this rank's)."""
        return self.shard(local, global_rows).full_tensor()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    # -------------------------------------------------------------- owner-rank refresh primitives
    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def gather_grad(self, owner: int) -> Optional[torch.Tensor]:
        """The whole gradient on rank `owner` (None elsewhere): a gather, not an all-gather."""
        m = self.full.shape[0]
        chunk = -(-m // self.world)
        local = self.grad
        if local.shape[0] < chunk:  # the last ranks' shards are short (or empty): pad to equal chunks
            local = torch.cat([local, local.new_zeros(chunk - local.shape[0], *local.shape[1:])])
        local = local.contiguous()
        bufs = [torch.empty_like(local) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(local, bufs, dst=self._global(owner), group=self.group)
        return torch.cat(bufs)[:m] if bufs is not None else None

    def scatter_rows(self, owner: int, full: Optional[torch.Tensor], shape: Tuple[int, int],
                     dtype: torch.dtype) -> torch.Tensor:
        """Rank `owner` holds `full` (of `shape`); every rank receives its rows of it."""
        rows = shape[0]
        chunk = -(-rows // self.world)
        out = torch.empty((chunk, *shape[1:]), dtype=dtype, device=self.param.device)
        parts = None
        if self.rank == owner:
            padded = full.to(dtype)
            if rows < chunk * self.world:
                padded = torch.cat([padded, padded.new_zeros(chunk * self.world - rows, *shape[1:])])
            parts = list(padded.contiguous().split(chunk))
        dist.scatter(out, parts, src=self._global(owner), group=self.group)
        mine = self.local_rows(rows)
        return out[: mine.stop - mine.start]

    def broadcast(self, owner: int, full: Optional[torch.Tensor], shape: Tuple[int, ...],
                  dtype: torch.dtype) -> torch.Tensor:
        t = full.to(dtype).contiguous() if self.rank == owner else \
            torch.empty(shape, dtype=dtype, device=self.param.device)
        dist.broadcast(t, src=self._global(owner), group=self.group)
        return t


def shard_view(p: torch.Tensor) -> ShardView:
    if not is_dtensor(p):
        return ShardView(param=p, grad=p.grad)
    if p.device_mesh.ndim != 1:
        raise NotImplementedError(
            f"GaLore supports DTensor parameters on a 1-D mesh (FSDP2's fully_shard); got a "
            f"{p.device_mesh.ndim}-D mesh {p.device_mesh} (HSDP is not supported)"
        )
    (placement,) = p.placements
    if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
        raise NotImplementedError(
            f"GaLore supports DTensor parameters sharded on dim 0 (FSDP2) or replicated; got placements "
            f"{p.placements}"
        )
    grad = p.grad
    if grad.placements != p.placements:
        grad = grad.redistribute(p.device_mesh, p.placements)
    view = ShardView(param=p.to_local(), grad=grad.to_local(), full=p, dgrad=grad)
    if isinstance(placement, Shard):
        view.rows = view.local_rows(p.shape[0])
    return view


# ------------------------------------------------------------------------------------------------ refresh
def refresh(items: List[Tuple[object, ShardView, int]]) -> None:
    """Refresh the projectors of `items` ((projector, view, step), in the same order on every rank)."""
    local = [it for it in items if it[1].full is None]
    shared = [it for it in items if it[1].full is not None]
    for proj, view, step in local:
        proj.refresh(view.grad, step)
    tucker = [it for it in shared if not hasattr(it[0], "compute")]
    matrices = [it for it in shared if hasattr(it[0], "compute")]
    for proj, view, step in tucker:
        _refresh_tucker(proj, view, step)
    if matrices:
        world = matrices[0][1].world
        for start in range(0, len(matrices), world):
            _refresh_round(matrices[start:start + world])


def _refresh_round(items) -> None:
    """Item i's gradient goes to rank i, which computes its basis while the others compute theirs."""
    mine: Dict[int, Dict[str, torch.Tensor]] = {}
    for i, (proj, view, step) in enumerate(items):
        proj.prepare(view.full.shape)
        full = view.gather_grad(owner=i) if view.sharded else (view.grad if view.rank == i else None)
        if full is not None:
            mine[i] = (proj, full, step)
    for i, (proj, full, step) in list(mine.items()):
        mine[i] = proj.compute(full, step)
        del full
    for i, (proj, view, step) in enumerate(items):
        factors = {}
        dtype = proj.storage_dtype(view.grad.dtype)
        for name in proj.factor_names():
            shape = proj.factor_shape(name)
            src = mine.get(i, {}).get(name)
            if view.sharded and proj.quant_bits is None:
                factors[name] = view.shard(view.scatter_rows(i, src, shape, dtype), shape[0])
            else:  # replicated parameter, or a quantized basis (quantized by every rank from the same fp32)
                factors[name] = view.broadcast(i, src, shape, dtype if proj.quant_bits is None else torch.float32)
        proj.install(factors, view.grad.dtype)


def _refresh_tucker(proj, view: ShardView, step: int) -> None:
    # Every rank decomposes the gathered gradient, then rank 0's factors are used everywhere: an SVD
    # of the same input need not agree bit for bit across devices and libraries.
    proj.refresh(view.full_grad(), step)
    for t in proj.state_dict().values():
        if t.is_floating_point():
            dist.broadcast(t, src=view._global(0), group=view.group)
