"""Weight-space merge methods, one tensor at a time, in plain PyTorch.

Every function takes the inputs of ONE tensor and returns the merged tensor in `dtype` (float32 by
default; the caller casts it to the saved dtype). An input is either a tensor, which is never modified,
or a zero-argument callable returning a tensor that the function may modify in place (a fresh one, or a
scratch buffer of the caller's), which it drops as soon as it is used: the streaming merge passes callables
so that the elementwise methods hold only about three tensors of one shape at a time whatever the number of
models, and allocate nothing of their own (the streaming merge reuses its buffers from chunk to chunk).
Notation: θ_b the base, θ_i the models, w_i their weights, δ_i = θ_i − θ_b their task vectors ("deltas"),
λ a global scale.

ParamΔ (Cao et al., "ParamΔ for Direct Weight Mixing: Post-Train Large Language Model at Zero Cost",
ICLR 2025, arXiv 2504.21023):
    Θ_ParamΔ = Θ_post − Θ_base + Θ'_base,   here   Θ'_base + scale · (Θ_post − Θ_base)   (paper: scale = 1)
computed as new_base + scale * (post - base): one subtraction, one fused multiply-add.

Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
    θ = θ_b + λ Σ_i w_i δ_i          (normalize=True divides Σ_i w_i δ_i by Σ_i w_i)
ParamΔ is the case θ_b = Θ_base, models Θ_post and Θ'_base with weights 1 and 1.

Linear ("model soups", Wortsman et al., ICML 2022):
    θ = Σ_i w_i θ_i / Σ_i w_i        (normalize=False: Σ_i w_i θ_i)

TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023),
three steps on the task vectors:
  1. trim: keep the top-k entries of each δ_i by magnitude, k = ceil(density · numel), zero the rest
     (`trim_magnitude`). The paper ranks over the whole flattened task vector; here, as in mergekit,
     per tensor (a model-wide threshold would need a first pass over every tensor). Entries whose
     magnitude equals the k-th largest are all kept, so ties may keep a few more than k.
  2. elect: γ = sgn(Σ_i w_i δ̂_i), the sign of the larger total mass (the paper's "sum" rule, Eq. 2 of
     Sec. 3.1; the paper has no per-model weights: with w_i = 1 it is the paper's rule).
  3. disjoint merge: τ = Σ_{i∈A} w_i δ̂_i / Σ_{i∈A} |w_i| over A = {i : sgn(w_i δ̂_i) = γ} (entries
     where δ̂_i = 0 are never in A); an entry with no agreeing model is 0. With w_i = 1 this is the paper's
     disjoint mean. normalize=False keeps the sum Σ_{i∈A} w_i δ̂_i.
  then θ = θ_b + λ τ (the paper's λ, tuned there; 1 by default here).

DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024): drop each entry of δ_i with probability p = 1 − density and rescale the survivors,
    δ̃_i = m_i ⊙ δ_i / (1 − p),   m_i ~ Bernoulli(1 − p)          (rescale=False: no division)
so that E[δ̃_i] = δ_i. dare_linear: θ = θ_b + λ Σ_i w_i δ̃_i (normalize as task arithmetic);
dare_ties: the TIES election and disjoint merge (steps 2-3) on δ̃_i instead of trimming by magnitude.
The masks come from torch.Generator objects; the streaming merge seeds one per (seed, tensor name, model
index) through `tensor_seed`, so a merge is reproducible and does not depend on the order tensors are
processed in.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, List, Optional, Sequence, Union

import torch

Tensorish = Union[torch.Tensor, Callable[[], torch.Tensor]]

__all__ = ["paramdelta", "task_arithmetic", "linear", "ties", "dare_linear", "dare_ties",
           "trim_magnitude", "dare_drop", "sign_elect_merge", "tensor_seed"]


def _value(x: Tensorish, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, read-only (may be the caller's tensor itself)."""
    return (x() if callable(x) else x).to(dtype)


def _fresh(x: Tensorish, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, safe to modify in place (a callable's result is fresh; a tensor is copied)."""
    if callable(x):
        return x().to(dtype)
    return x.to(dtype, copy=True)


def _per_model(value, n: int, what: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for {n} models")
    return values


def _check_density(densities: Sequence[float]) -> None:
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {d}")


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for (merge seed, tensor name, model index): independent of processing order."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------- methods


def paramdelta(post: Tensorish, base: Tensorish, new_base: Tensorish, *, scale: float = 1.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """new_base + scale * (post - base)."""
    delta = _fresh(post, dtype)
    delta.sub_(_value(base, dtype))
    out = _fresh(new_base, dtype)
    out.add_(delta, alpha=scale)
    return out


def task_arithmetic(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
                    lam: float = 1.0, normalize: bool = False,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """base + lam * sum_i w_i (model_i - base)  (/ sum_i w_i with normalize=True)."""
    weights = _per_model(weights, len(models), "weights")
    b = _value(base, dtype)
    acc = _weighted_delta_sum(b, models, weights, dtype)
    if normalize:
        acc.div_(_nonzero_sum(weights))
    return acc.mul_(lam).add_(b)


def linear(models: Sequence[Tensorish], weights: Sequence[float], *, normalize: bool = True,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_i w_i model_i  (/ sum_i w_i with normalize=True)."""
    weights = _per_model(weights, len(models), "weights")
    acc = _fresh(models[0], dtype).mul_(weights[0])
    for m, w in zip(models[1:], weights[1:]):
        acc.add_(_value(m, dtype), alpha=w)
    if normalize:
        acc.div_(_nonzero_sum(weights))
    return acc


def ties(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
         density: Union[float, Sequence[float]] = 1.0, lam: float = 1.0, normalize: bool = True,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """TIES-merging: trim each delta to its top `density` by magnitude, elect signs, disjoint merge."""
    weights = _per_model(weights, len(models), "weights")
    densities = _per_model(density, len(models), "density")
    _check_density(densities)
    b = _value(base, dtype)
    deltas = []
    for m, d in zip(models, densities):
        x = _fresh(m, dtype).sub_(b)
        deltas.append(trim_magnitude(x, d))
        del x
    merged = sign_elect_merge(deltas, weights, normalize=normalize)
    del deltas
    return merged.mul_(lam).add_(b)


def dare_linear(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
                density: Union[float, Sequence[float]] = 1.0, lam: float = 1.0, rescale: bool = True,
                normalize: bool = False, generators: Optional[Sequence[torch.Generator]] = None, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DARE then task arithmetic: base + lam * sum_i w_i dare(model_i - base)."""
    weights = _per_model(weights, len(models), "weights")
    densities = _per_model(density, len(models), "density")
    _check_density(densities)
    gens = _generators(generators, seed, len(models))
    b = _value(base, dtype)
    acc = None
    for m, w, d, g in zip(models, weights, densities, gens):
        x = dare_drop(_fresh(m, dtype).sub_(b), d, generator=g, rescale=rescale)
        if acc is None:
            acc = x.mul_(w)
        else:
            acc.add_(x, alpha=w)
        del x
    if normalize:
        acc.div_(_nonzero_sum(weights))
    return acc.mul_(lam).add_(b)


def dare_ties(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
              density: Union[float, Sequence[float]] = 1.0, lam: float = 1.0, rescale: bool = True,
              normalize: bool = True, generators: Optional[Sequence[torch.Generator]] = None, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DARE's drop-and-rescale, then TIES's sign election and disjoint merge."""
    weights = _per_model(weights, len(models), "weights")
    densities = _per_model(density, len(models), "density")
    _check_density(densities)
    gens = _generators(generators, seed, len(models))
    b = _value(base, dtype)
    deltas = [dare_drop(_fresh(m, dtype).sub_(b), d, generator=g, rescale=rescale)
              for m, d, g in zip(models, densities, gens)]
    merged = sign_elect_merge(deltas, weights, normalize=normalize)
    del deltas
    return merged.mul_(lam).add_(b)


# ------------------------------------------------------------------------------------------ components


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = ceil(density * numel) largest-magnitude entries of `delta`, in place.

    Entries tied with the k-th largest magnitude are all kept."""
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    k = min(n, max(0, math.ceil(density * n - 1e-9)))
    if k == 0:
        return delta.zero_()
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values  # the k-th largest
    keep = mag.reshape(delta.shape) >= threshold
    del mag
    return delta.mul_(keep)


def dare_drop(delta: torch.Tensor, density: float, *, generator: Optional[torch.Generator] = None,
              rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability `density` (drop rate p = 1 - density), rescale by 1/density; in place."""
    if density >= 1.0:
        return delta
    keep = torch.empty(delta.shape, dtype=torch.bool).bernoulli_(density, generator=generator)
    delta.mul_(keep)
    del keep
    if rescale:
        delta.div_(density)
    return delta


def sign_elect_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                     normalize: bool = True) -> torch.Tensor:
    """TIES steps 2-3: γ = sgn(Σ w_i δ_i); Σ_{agreeing} w_i δ_i (/ Σ_{agreeing} |w_i| with normalize)."""
    weights = _per_model(weights, len(deltas), "weights")
    total = None
    for d, w in zip(deltas, weights):
        total = d.mul(w) if total is None else total.add_(d, alpha=w)
    elected = torch.sign(total)
    del total
    num = torch.zeros_like(elected)
    den = torch.zeros_like(elected) if normalize else None
    for d, w in zip(deltas, weights):
        wd = d.mul(w)
        agree = (torch.sign(wd) == elected) & (wd != 0)
        num.add_(wd.mul_(agree))
        if den is not None:
            den.add_(agree, alpha=abs(w))
        del wd, agree
    if den is not None:
        num = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return num


def _weighted_delta_sum(b: torch.Tensor, models: Sequence[Tensorish], weights: Sequence[float],
                        dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i (model_i - b), holding one model at a time."""
    acc = None
    for m, w in zip(models, weights):
        x = _fresh(m, dtype).sub_(b)
        if acc is None:
            acc = x.mul_(w)
        else:
            acc.add_(x, alpha=w)
        del x
    return acc


def _nonzero_sum(weights: Sequence[float]) -> float:
    s = float(sum(weights))
    if s == 0.0:
        raise ValueError(f"normalize=True divides by the sum of the weights, which is 0 ({list(weights)})")
    return s


def _generators(generators, seed: int, n: int) -> List[torch.Generator]:
    if generators is not None:
        if len(generators) != n:
            raise ValueError(f"generators: {len(generators)} for {n} models")
        return list(generators)
    return [torch.Generator().manual_seed(tensor_seed(seed, "", i)) for i in range(n)]
