"""GaLore AdamW (32-bit and 8-bit states): Adam in a low-rank gradient subspace.

GaLore (Zhao et al., 2024, arXiv 2403.03507), Algorithm 1: for a weight W (m x n) with gradient G,
every T steps a basis P of G's top-r singular subspace is computed; each step Adam runs on the projected
gradient R = P^T G (or G P^T), and the normalised update N = M / (sqrt(V) + eps) is mapped back,
W <- W - lr * alpha * P N. The moments M, V have the low-rank shape, which is the memory saving.
GaLore 2 (Su et al., 2025, arXiv 2504.20437) keeps that update and replaces the exact SVD of the refresh
by a randomized one (`svd="randomized"` in a param group; the projector implements both, see
projector.py) and adds FSDP support (here: fsdp.py).

The step is galore-torch 1.0's `GaLoreAdamW` (a copy of transformers' AdamW), operation for operation,
so that with svd="exact" and the same proj_type the parameters match it to rounding:
  1. refresh the basis when `projector.needs_refresh(step)` (step counted before the increment:
     refreshes at 0, T, 2T, ...), then project the gradient;
  2. moments created on first use with the low-rank shape;
  3. step += 1; M = b1 M + (1-b1) R; V = b2 V + (1-b2) R^2;
  4. step_size = lr * sqrt(1 - b2^t) / (1 - b1^t) (bias correction folded in; correct_bias=False: lr);
  5. N = M / (sqrt(V) + eps), projected back (times alpha = `scale`);
  6. W += -step_size * N, then decoupled weight decay AFTER the update: W += -lr * wd * W.
Param groups without the GaLore keys (`rank`, ...) get the same AdamW without projection.

Where the papers are silent, and what is chosen here:
- Moments at a subspace switch. Neither paper says; galore-torch keeps them as they are although they
  are now expressed in the old basis (issue #54). `moments="keep"` is that reference. `"reproject"`
  (our choice) rotates them into the new basis: R = P_new^T P_old (left) or P_old P_new^T (right),
  one rotation per projected mode for full / Tucker projections; M <- R M (left) / M R (right). The
  second moment is not a linear quantity; it is mapped with the elementwise-squared rotation R∘R (exact
  when V is diagonal-dominated in the rotated coordinates, a heuristic otherwise) and clamped at 0.
  `"reset"` zeroes both moments and restarts Adam's bias correction from the refresh (a separate
  `moment_step` counter), as Adam's derivation requires for moments that start again from zero.
- Moment precision: moments are kept in fp32 whatever the parameter dtype (galore-torch keeps them in
  the parameter's dtype); the low-rank moments are small, and the llmx trainer keeps fp32 master weights.
- Checkpoints: optimizer state is tensors only. The projector is not stored as an object (galore-torch
  pickles it, which breaks `torch.load(weights_only=True)` and loses it on resume: notes/galore.md 5.7);
  its `state_dict()` is flattened into the parameter's state under the prefix "projector." and the
  projector is rebuilt from it after `load_state_dict`, so torch.distributed.checkpoint saves, reshards
  and restores it like any moment.
- `fused=True`: the Triton kernel llmx.kernels.galore_step.galore_adam_step_fused (down-projection with
  the Adam epilogue, up-projection with the weight-update epilogue) when `fused_available(device)`, the
  side is left or right, bias correction is on, and no cross-rank sum sits between projection and Adam
  (a row-sharded left projection needs one); otherwise the PyTorch path below. Same math.
- A zero learning rate skips the weight update: torch.distributed.checkpoint initialises an empty
  optimizer's state with one step at lr=0 on zero gradients, and 0 * (anything non-finite) must not
  reach the weights.

8-bit states (`GaLoreAdamW8bit`): M and V of every 2-D state with at least `min_8bit_size` elements
are stored as bitsandbytes' blockwise 8-bit dynamic quantization (signed map for M, unsigned for V, one
fp32 absmax per block), dequantized into fp32 temporaries for the step and quantized back, through
bitsandbytes' public `quantize_blockwise` / `dequantize_blockwise`; the update rule stays the 32-bit
one. galore-torch's 8-bit optimizer instead swaps `p.data` for a low-rank dummy around bitsandbytes'
fused step (notes/galore.md 1.3), which copies every weight. Blocks never cross a row (a row of c
columns is split into ceil(c / b) blocks, b = 64, 128 or 256): the codes and the absmax tensor then
shard on dim 0 exactly like the moment, so under FSDP both are DTensors that DCP reshards. Smaller and
1-D / N-D states stay fp32, as in bitsandbytes.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Dict, Optional

import torch
from torch.optim import Optimizer

from llmx.optim.galore.fsdp import ShardView, local, refresh, shard_view
from llmx.optim.galore.projector import GaLoreProjector, param_seed
from llmx.optim.galore.tucker import TuckerProjector, mode_dot

MOMENT_POLICIES = ("keep", "reproject", "reset")
PROJ = "projector."  # prefix of the projector's tensors inside a parameter's state
# Optional GaLore group keys, passed to the projector only when present (its defaults apply otherwise).
_PROJECTOR_OPTIONS = ("svd", "oversample", "power_iters", "seed", "quant_bits", "quant_group_size", "precision",
                      "basis_dtype")


def _value(x):
    # Config values arrive as str Enums (ProjType, MomentPolicy); groups store the plain strings so that
    # optimizer state dicts load with torch.load(weights_only=True).
    return getattr(x, "value", x)


def _mode_factors(proj) -> Dict[int, torch.Tensor]:
    """The projector's basis as {mode: U (d_mode x r) with orthonormal columns}: low = G x_mode U^T."""
    b = proj.basis()
    side = proj.side
    if side == "left":
        return {0: b["P"]}
    if side == "right":
        return {1: b["P"].T}
    if side == "full":
        return {0: b["A"], 1: b["B"].T}
    return {k: b[f"U{k}"] for k in range(len(b))}  # tucker


class GaLoreAdamW(Optimizer):
    """AdamW with GaLore projection for the param groups that carry GaLore keys.

    Group keys (as galore-torch): `rank` (marks the group as GaLore), `update_proj_gap` (T, default
    200), `scale` (alpha, default 1.0), `proj_type` (std, reverse_std, left, right, full; default std),
    and optionally `svd` (exact / randomized), `oversample`, `power_iters`, `seed`, `precision`,
    `basis_dtype`, `quant_bits`, `quant_group_size`; `moments` and `fused` may also be set per group.
    2-D parameters of such a group get a GaLoreProjector, parameters with more dims a TuckerProjector,
    1-D ones plain AdamW. `param_names` (torch's named groups) seeds each parameter's sketch.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, moments: str = "keep", fused: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon: {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        moments=_value(moments), fused=bool(fused))
        self._projectors: Dict[torch.Tensor, object] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_projectors", {})

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g["moments"] = _value(g["moments"])
        if g["moments"] not in MOMENT_POLICIES:
            raise ValueError(f"moments must be one of {MOMENT_POLICIES}, got {g['moments']!r}")
        if "rank" in g:
            g.setdefault("update_proj_gap", 200)
            g.setdefault("scale", 1.0)
            g.setdefault("proj_type", "std")
            for k in ("proj_type", *_PROJECTOR_OPTIONS):
                if k in g:
                    g[k] = _value(g[k])

    # ------------------------------------------------------------------ projector
    def _projector(self, p: torch.Tensor, group: dict, state: dict):
        proj = self._projectors.get(p)
        if proj is None:
            if p.ndim > 2:
                proj = TuckerProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"])
            else:
                options = {k: group[k] for k in _PROJECTOR_OPTIONS if k in group}
                options["seed"] = param_seed(int(group.get("seed", 0)), self._param_name(p, group))
                proj = GaLoreProjector(group["rank"], proj_type=group["proj_type"],
                                       update_proj_gap=group["update_proj_gap"], scale=group["scale"], **options)
            saved = {k[len(PROJ):]: v for k, v in state.items() if k.startswith(PROJ)}
            if saved:  # resumed: the projector takes the loaded tensors themselves (no second copy)
                proj.load_state_dict(saved)
            self._projectors[p] = proj
        return proj

    def _param_name(self, p: torch.Tensor, group: dict) -> str:
        """The parameter's name from the group's `param_names` (torch's named-parameter groups; llmx's
        builder sets it), else its position in the optimizer ("param.<i>")."""
        names = group.get("param_names")
        if names:
            return names[next(i for i, q in enumerate(group["params"]) if q is p)]
        flat = [q for g in self.param_groups for q in g["params"]]
        return f"param.{next(i for i, q in enumerate(flat) if q is p)}"

    @staticmethod
    def _store_projector(state: dict, proj) -> None:
        # The projector returns its own tensors: the state references them, it does not copy them.
        for k in [k for k in state if k.startswith(PROJ)]:
            del state[k]
        for k, v in proj.state_dict().items():
            state[PROJ + k] = v

    # ------------------------------------------------------------------ moment storage (8-bit overrides)
    def _init_moments(self, state: dict, local: torch.Tensor, view: Optional[ShardView], rows: int) -> None:
        """Zero moments shaped like `local`: under FSDP this rank's rows of a dim-0-sharded DTensor with
        `rows` global rows (`view` None: whole tensors)."""
        for key in ("exp_avg", "exp_avg_sq"):
            z = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            state[key] = view.shard(z, rows) if view is not None else z

    def _read_moments(self, state: dict):
        """fp32 local tensors of M and V; modified in place or passed back to _write_moments."""
        return local(state["exp_avg"]), local(state["exp_avg_sq"])

    def _write_moments(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        for key, new in (("exp_avg", m), ("exp_avg_sq", v)):
            cur = local(state[key])
            if new is not cur:
                cur.copy_(new)

    def _can_fuse(self, group: dict, proj, view: ShardView) -> bool:
        if not group["fused"] or proj.side not in ("left", "right") or not group["correct_bias"]:
            return False
        if view.sharded and proj.side == "left":
            return False  # the partial sums are reduce-scattered between projection and Adam
        from llmx.kernels.galore_step import fused_available

        return fused_available(view.param.device)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                work.append((p, group, "rank" in group and p.ndim >= 2))
        # Every due subspace first, together: under FSDP the SVDs are spread over the ranks (fsdp.py).
        self._refresh_due([(p, group) for p, group, galore in work if galore])
        for p, group, galore in work:
            if galore:
                self._galore_step(p, group)
            else:
                self._plain_step(p, group)
        return loss

    def _refresh_due(self, params) -> None:
        items, due = [], []
        for p, group in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                if group["moments"] == "reset":
                    state["moment_step"] = torch.tensor(0.0)
            proj = self._projector(p, group, state)
            step = int(state["step"])
            if not proj.needs_refresh(step):
                continue
            view = shard_view(p)
            reproject = group["moments"] == "reproject" and proj.side is not None and "exp_avg" in state
            old = {k: u.clone() for k, u in _mode_factors(proj).items()} if reproject else None
            items.append((proj, view, step))
            due.append((group, state, old))
        refresh(items)
        for (proj, view, _), (group, state, old) in zip(items, due):
            self._store_projector(state, proj)
            if "exp_avg" in state:
                self._new_subspace(state, proj, old, group["moments"], view)

    @staticmethod
    def _count(state: dict) -> int:
        """Advance the step counters; returns the t of Adam's bias correction."""
        state["step"] += 1
        if "moment_step" in state:  # moments="reset": t counts from the last reset
            state["moment_step"] += 1
            return int(state["moment_step"])
        return int(state["step"])

    def _step_size(self, group: dict, t: int) -> float:
        beta1, beta2 = group["betas"]
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

    def _adam(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the moments with `grad` (fp32, local) and return N = M / (sqrt(V) + eps)."""
        beta1, beta2 = group["betas"]
        m, v = self._read_moments(state)
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        norm = m / v.sqrt().add_(group["eps"])
        self._write_moments(state, m, v)
        return norm

    def _plain_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        view = shard_view(p)
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            self._init_moments(state, view.param, view, p.shape[0] if p.ndim else 1)
        t = self._count(state)
        norm = self._adam(state, view.grad.float(), group)
        if group["lr"] == 0:
            return
        view.param.add_(norm, alpha=-self._step_size(group, t))
        if group["weight_decay"] > 0.0:
            view.param.add_(view.param, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _moment_rows(proj, p: torch.Tensor) -> int:
        """Global rows of a projected parameter's moments: the weight's (right) or the rank's (left, full)."""
        return p.shape[0] if proj.side == "right" else proj.rank

    def _galore_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        view = shard_view(p)
        proj = self._projector(p, group, state)
        try:
            if self._can_fuse(group, proj, view):
                return self._fused_step(p, group, state, proj, view)
            tucker = isinstance(proj, TuckerProjector)
            low = proj.project(view.grad, rows=view.rows).float()
            summed = view.sharded and proj.side != "right"  # low is this rank's partial sum
            if summed:
                low = view.all_reduce(low) if tucker else view.reduce_scatter(low)
            rows = self._moment_rows(proj, p)
            if "exp_avg" not in state:
                self._init_moments(state, low, None if tucker else view, rows)
            t = self._count(state)
            norm = self._adam(state, low, group)
            if group["lr"] == 0:
                return
            if summed and not tucker:
                norm = view.all_gather(norm, rows)
            proj.add_back_(view.param, norm, -self._step_size(group, t), rows=view.rows)
            if group["weight_decay"] > 0.0:
                view.param.add_(view.param, alpha=-group["lr"] * group["weight_decay"])
        finally:
            if hasattr(proj, "release"):
                proj.release()

    def _fused_step(self, p, group, state, proj, view: ShardView) -> None:
        from llmx.kernels.galore_step import galore_adam_step_fused

        basis = proj.factor("P", view.param.device)  # storage dtype; a right basis gathered whole
        if "exp_avg" not in state:
            shape = (proj.rank, view.param.shape[1]) if proj.side == "left" else (view.param.shape[0], proj.rank)
            self._init_moments(state, torch.empty(shape, device=view.param.device), view, self._moment_rows(proj, p))
        t = self._count(state)
        beta1, beta2 = group["betas"]
        m, v = self._read_moments(state)
        galore_adam_step_fused(view.param, view.grad, basis, proj.side, m, v, step=t, lr=group["lr"], beta1=beta1,
                               beta2=beta2, eps=group["eps"], scale=proj.scale, weight_decay=group["weight_decay"],
                               precision=proj.precision)
        self._write_moments(state, m, v)

    def _new_subspace(self, state: dict, proj, old: Optional[Dict[int, torch.Tensor]], policy: str,
                      view: ShardView) -> None:
        if policy == "keep" or (policy == "reproject" and old is None):
            return  # (no previous basis, e.g. a state saved without one: nothing to rotate from)
        m, v = self._read_moments(state)
        if policy == "reset":
            m.zero_()
            v.zero_()
            state["moment_step"].zero_()
        else:  # reproject: the rotation mixes the moments' rows too, so a sharded moment is gathered once
            sharded = view.sharded and not isinstance(proj, TuckerProjector)
            rows = self._moment_rows(proj, view.full) if sharded else None
            if sharded:
                m, v = view.all_gather(m, rows), view.all_gather(v, rows)
            for k, u_new in _mode_factors(proj).items():
                r = u_new.T @ old[k]  # r x r: new coordinates of the old basis vectors
                m = mode_dot(m, r, k)
                v = mode_dot(v, r * r, k)
            v = v.clamp_(min=0.0)
            if sharded:
                mine = view.local_rows(rows)
                m, v = m[mine], v[mine]
        self._write_moments(state, m, v)

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor but "step" to its parameter's dtype when the parameter is
        # floating point: restore the saved dtypes (uint8 codes, int64 projector fields, fp32 moments
        # of bf16 parameters, the moment_step counter).
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            st = self.state[p]
            for k, v in saved.items():
                if torch.is_tensor(v) and k in st and st[k].dtype != v.dtype:
                    st[k] = v.to(device=st[k].device, copy=True)
        self._projectors.clear()  # rebuilt from the loaded tensors at the next step


# ---------------------------------------------------------------------------------------------------
# 8-bit states
# ---------------------------------------------------------------------------------------------------

_QMAPS: Dict[tuple, torch.Tensor] = {}


def _qmap(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _QMAPS:
        import bitsandbytes.functional as bnbF

        _QMAPS[key] = bnbF.create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


def _blocksize(cols: int) -> int:
    return 64 if cols <= 64 else 128 if cols <= 128 else 256


def _nblocks(cols: int) -> int:
    return -(-cols // _blocksize(cols))


def quantize_rows(x: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Blockwise 8-bit quantization of a 2-D fp32 tensor into `codes` (uint8, x's shape) and `absmax`
    (rows x blocks per row), with blocks that never cross a row."""
    if x.numel() == 0:
        return
    import bitsandbytes.functional as bnbF

    rows, cols = x.shape
    bs = _blocksize(cols)
    pad = _nblocks(cols) * bs - cols
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    q, qs = bnbF.quantize_blockwise(xp.contiguous(), code=_qmap(signed, x.device), blocksize=bs)
    codes.copy_(q.view(rows, -1)[:, :cols])
    absmax.copy_(qs.absmax.view(rows, -1))


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    rows, cols = codes.shape
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    import bitsandbytes.functional as bnbF

    bs = _blocksize(cols)
    pad = _nblocks(cols) * bs - cols
    cp = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    x = bnbF.dequantize_blockwise(cp.contiguous(), absmax=absmax.reshape(-1).contiguous(),
                                  code=_qmap(signed, codes.device), blocksize=bs)
    return x.view(rows, -1)[:, :cols]


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with 8-bit blockwise-quantized moments (bitsandbytes' dynamic maps).

    Same interface as GaLoreAdamW plus `min_8bit_size` (states with fewer elements stay fp32, as in
    bitsandbytes). `fused` is accepted for interface compatibility and ignored: the fused kernel updates
    fp32 moments. State per quantized moment: `<name>` (uint8 codes, the moment's shape) and
    `<name>_absmax` (fp32, rows x ceil(cols / blocksize)).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, moments: str = "keep", fused: bool = False, min_8bit_size: int = 4096):
        self.min_8bit_size = min_8bit_size
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         moments=moments, fused=False)

    def _init_moments(self, state, local, view, rows):
        # Decided from the global shape, so that every rank holds the same state keys.
        if local.ndim != 2 or rows * local.shape[1] < self.min_8bit_size:
            return super()._init_moments(state, local, view, rows)
        wrap = (lambda t: view.shard(t, rows)) if view is not None else (lambda t: t)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = wrap(torch.zeros(local.shape, dtype=torch.uint8, device=local.device))
            state[key + "_absmax"] = wrap(torch.zeros((local.shape[0], _nblocks(local.shape[1])),
                                                      dtype=torch.float32, device=local.device))

    def _read_moments(self, state):
        if state["exp_avg"].dtype != torch.uint8:
            return super()._read_moments(state)
        return tuple(dequantize_rows(local(state[k]), local(state[k + "_absmax"]), signed=k == "exp_avg")
                     for k in ("exp_avg", "exp_avg_sq"))

    def _write_moments(self, state, m, v):
        if state["exp_avg"].dtype != torch.uint8:
            return super()._write_moments(state, m, v)
        for key, x in (("exp_avg", m), ("exp_avg_sq", v)):
            quantize_rows(x, key == "exp_avg", local(state[key]), local(state[key + "_absmax"]))
