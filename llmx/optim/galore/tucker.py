"""Tucker (HOSVD) projector for gradients with more than two dimensions (conv / neural-operator weights).

The tensor extension of GaLore (galore-torch PR #48, for 5-D neural-operator weights) projects a gradient
G of shape d_0 x ... x d_{N-1} onto a Tucker core, core = G x_0 U_0^T x_1 ... x_{N-1} U_{N-1}^T, runs
Adam on the core and maps the update back by core x_k U_k. The reference computes the factors with
tensorly's `tucker` (HOOI). Here each U_k is the top-r_k left singular vectors of the mode-k unfolding,
i.e. the truncated HOSVD (De Lathauwer, De Moor & Vandewalle, 2000), which is HOOI's initialisation:
one SVD per mode and no iteration, exact whenever the gradient has multilinear rank <= (r_0, ...).

Two defects of the reference are fixed (notes/galore.md 1.5): its basis is computed once and never
refreshed (`is None and step % T == 0`), and its `project_back` ignores its argument and inverts the
stored projected gradient instead of the optimizer's update. Here the factors are refreshed at steps
0, T, 2T, ... like GaLoreProjector, and `project_back` maps back exactly the tensor it is given.

As in GaLoreProjector the SVDs run in fp32 and the factors are stored in the gradient's dtype.
With `rows` (an FSDP2 shard of dim 0), `project` returns this shard's partial sum of the core (mode 0 uses
U_0[rows]; the caller all-reduces) and `project_back` the shard's rows of the result.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from llmx.optim.galore.projector import DTYPES


def mode_dot(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """x x_mode matrix: contract dim `mode` of x with dim 1 of `matrix` (which becomes the new dim `mode`)."""
    return torch.movedim(torch.tensordot(matrix, x, dims=([1], [mode])), 0, mode)


class TuckerProjector:
    """Projects an N-D gradient onto a Tucker core of multilinear rank `rank` (an int for every mode,
    clamped to each mode's size, or one rank per mode), refreshed every `update_proj_gap` steps."""

    def __init__(self, rank: Union[int, Sequence[int]], update_proj_gap: int = 200, scale: float = 1.0):
        ranks = [rank] if isinstance(rank, int) else list(rank)
        if not ranks or any(r < 1 for r in ranks) or update_proj_gap < 1:
            raise ValueError(f"ranks and update_proj_gap must be >= 1, got {rank}, {update_proj_gap}")
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.refreshes = 0
        self._shape: Optional[tuple] = None
        self._factors: List[torch.Tensor] = []

    @property
    def side(self) -> Optional[str]:
        return None if self._shape is None else "tucker"

    def ranks_for(self, shape: Sequence[int]) -> List[int]:
        if isinstance(self.rank, int):
            return [min(self.rank, d) for d in shape]
        if len(self.rank) != len(shape) or any(r > d for r, d in zip(self.rank, shape)):
            raise ValueError(f"Tucker ranks {list(self.rank)} do not fit a gradient of shape {tuple(shape)}")
        return list(self.rank)

    def _require_basis(self) -> None:
        if self._shape is None:
            raise RuntimeError("TuckerProjector has no basis yet: call refresh(grad, step) first")

    def needs_refresh(self, step: int) -> bool:
        return self._shape is None or step % self.update_proj_gap == 0

    def refresh(self, grad: torch.Tensor, step: int) -> None:
        shape = tuple(grad.shape)
        if grad.ndim < 2:
            raise ValueError(f"TuckerProjector needs a gradient with >= 2 dims, got shape {shape}")
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"gradient shape {shape} differs from the shape {self._shape} of the first refresh")
        if grad.dtype not in DTYPES:
            raise ValueError(f"unsupported gradient dtype {grad.dtype}")
        g = grad.detach().float()
        factors = []
        for k, r in enumerate(self.ranks_for(shape)):
            unfolding = g.movedim(k, 0).reshape(shape[k], -1)
            u = torch.linalg.svd(unfolding, full_matrices=False).U
            factors.append(u[:, :r].to(grad.dtype, memory_format=torch.contiguous_format, copy=True))
        self._factors, self._shape = factors, shape
        self.refreshes += 1

    def _factor(self, k: int, device: torch.device) -> torch.Tensor:
        if self._factors[k].device != device:
            self._factors[k] = self._factors[k].to(device)
        return self._factors[k]

    def project(self, grad: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        self._require_basis()
        expected = (len(range(self._shape[0])[rows]) if rows is not None else self._shape[0],) + self._shape[1:]
        if tuple(grad.shape) != expected:
            raise ValueError(f"project expects a gradient of shape {expected}, got {tuple(grad.shape)}")
        return self._multiply(grad.to(self._factors[0].dtype), rows, transpose=True)

    def _multiply(self, x: torch.Tensor, rows: Optional[slice], transpose: bool) -> torch.Tensor:
        """x times every mode's factor (U_k^T to project, U_k to project back); a row shard uses U_0's rows."""
        for k in range(x.ndim):
            u = self._factor(k, x.device)
            if k == 0 and rows is not None:
                u = u[rows]
            x = mode_dot(x, u.T if transpose else u, k)
        return x

    def add_back_(self, target: torch.Tensor, core: torch.Tensor, alpha: float, rows: Optional[slice] = None) -> torch.Tensor:
        """target += alpha * project_back(core, rows), in place (the GaLoreProjector interface)."""
        return target.add_(self.project_back(core, rows), alpha=alpha)

    def project_back(self, core: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        self._require_basis()
        expected = tuple(f.shape[1] for f in self._factors)
        if tuple(core.shape) != expected:
            raise ValueError(f"project_back expects a core of shape {expected}, got {tuple(core.shape)}")
        return self._multiply(core.to(self._factors[0].dtype), rows, transpose=False) * self.scale

    def basis(self) -> Dict[str, torch.Tensor]:
        return {f"U{k}": u.float() for k, u in enumerate(self._factors)}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        d = {"refreshes": torch.tensor(self.refreshes, dtype=torch.int64)}
        if self._shape is not None:
            d["shape"] = torch.tensor(self._shape, dtype=torch.int64)
            d.update({f"U{k}": u for k, u in enumerate(self._factors)})
        return d

    def load_state_dict(self, d: Dict[str, torch.Tensor]) -> None:
        self.refreshes = int(d["refreshes"])
        if "shape" not in d:
            self._shape, self._factors = None, []
            return
        shape = tuple(int(x) for x in d["shape"].tolist())
        ranks = self.ranks_for(shape)
        factors = [d[f"U{k}"] for k in range(len(shape))]
        for k, (u, r) in enumerate(zip(factors, ranks)):
            if tuple(u.shape) != (shape[k], r):
                raise ValueError(f"saved factor U{k} has shape {tuple(u.shape)}, expected {(shape[k], r)}")
        self._shape, self._factors = shape, factors
