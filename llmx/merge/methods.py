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
  1. trim: keep the k largest-magnitude entries of each δ_i, zero the rest. The paper ranks over the whole
     flattened task vector; here, as in mergekit, per tensor (a model-wide threshold would need a pass over
     every tensor first). k = max(1, floor(density · numel)) and exactly k entries are kept, as mergekit
     (the paper gives no rounding rule); entries tied with the k-th largest magnitude are kept in storage
     order until k are kept (mergekit breaks such ties in argsort's unspecified order).
  2. elect: γ = sgn(Σ_i w_i δ̂_i), the sign of the larger total mass (the paper's "sum" rule, Eq. 2 of
     Sec. 3.1; the paper has no per-model weights: with w_i = 1 it is the paper's rule). Where the sum is
     exactly 0 the paper's sgn gives 0 and no model agrees; mergekit elects +1. Default zero_sign="positive"
     (mergekit); zero_sign="zero" is the paper's sgn.
  3. disjoint merge: τ = Σ_{i∈A} w_i δ̂_i / D over A = {i : sgn(w_i δ̂_i) = γ} (entries where δ̂_i = 0
     are never in A). D = Σ_{i∈A} w_i, and 1 where that is 0 (divisor="signed", mergekit's), or
     D = Σ_{i∈A} |w_i| (divisor="abs": a weighted mean even with negative weights; an entry with no agreeing
     model is 0). The two agree when every weight is positive; with w_i = 1 this is the paper's disjoint
     mean. normalize=False keeps the sum Σ_{i∈A} w_i δ̂_i.
  then θ = θ_b + λ τ (the paper's λ, tuned there; 1 by default here).

DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024, Eq. 1): drop each entry of δ_i with probability p = 1 − density and rescale the survivors,
    δ̃_i = m_i ⊙ δ_i / (1 − p),   m_i ~ Bernoulli(1 − p)
so that E[δ̃_i] = δ_i (rescale=True, the paper's). rescale="l1" scales the survivors so that the tensor's L1
norm is unchanged, Σ|δ_i| / Σ|m_i ⊙ δ_i| (mergekit's rescale; no rescaling where either sum is below
1e-7); rescale=False does not rescale. dare_linear: θ = θ_b + λ Σ_i w_i δ̃_i (normalize as task
arithmetic); dare_ties: the TIES election and disjoint merge (steps 2-3) on δ̃_i instead of trimming by
magnitude, normalized by default (the disjoint mean of TIES, which DARE plugs into; mergekit's dare_ties
sums instead: normalize=False).
The mask of a tensor is drawn in fixed blocks of DARE_BLOCK elements, block b from a generator seeded with
`tensor_seed(seed, name, i, b)`: a merge is reproducible, and a tensor's mask depends neither on the order
tensors are processed in nor on how the tensor is cut into chunks.

Streaming. TIES and DARE need facts about a whole tensor before its first entry can be merged (TIES's
magnitude threshold; DARE's L1 rescale). `SparseMerge` takes a tensor in consecutive chunks: it makes
`passes` statistics passes over the chunks (observe, end_pass), then merges chunk by chunk. The exact
k-th largest magnitude takes two passes of 65,536-bin histograms over the float32 bit patterns (|x| >= 0
orders like its bits): the upper 16 bits, then the lower 16 within the chosen bin (`TopK`). Memory is a
few buffers of the chunk's size, whatever the tensor's. The in-memory functions (`ties`, `dare_linear`,
`dare_ties`) are the same code with the whole tensor as one chunk.
"""

from __future__ import annotations

import hashlib
from typing import Callable, List, Optional, Sequence, Union

import torch

Tensorish = Union[torch.Tensor, Callable[[], torch.Tensor]]

__all__ = ["paramdelta", "task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "SparseMerge", "TopK",
           "DareMask", "elect_merge", "topk_count", "tensor_seed", "ZERO_SIGNS", "DIVISORS", "RESCALES"]

ZERO_SIGNS = ("positive", "zero")
DIVISORS = ("signed", "abs")
RESCALES = (True, False, "l1")
DARE_BLOCK = 2**20
L1_EPS = 1e-7  # mergekit's: below it a norm is treated as zero and nothing is rescaled


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


def tensor_seed(seed: int, name: str, index: int, block: int = 0) -> int:
    """A 63-bit seed for (merge seed, tensor name, model index, mask block): independent of processing order."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------ elementwise methods


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
    acc = None
    for m, w in zip(models, weights):  # one model at a time
        x = _fresh(m, dtype).sub_(b)
        acc = x.mul_(w) if acc is None else acc.add_(x, alpha=w)
        del x
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


def _nonzero_sum(weights: Sequence[float]) -> float:
    s = float(sum(weights))
    if s == 0.0:
        raise ValueError(f"normalize=True divides by the sum of the weights, which is 0 ({list(weights)})")
    return s


# ------------------------------------------------------------------------------ TIES and DARE, streamed


def topk_count(numel: int, density: float) -> Optional[int]:
    """Entries TIES keeps of a tensor: max(1, floor(density * numel)) (mergekit's rule); None: all."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    if density >= 1.0 or numel == 0:
        return None
    return min(numel, max(1, int(density * numel)))


class TopK:
    """Keep exactly the k largest-magnitude entries of one float32 tensor given in consecutive chunks.

    Two statistics passes find the k-th largest |x| exactly (radix select on the bit patterns: a histogram
    of the upper 16 bits, then of the lower 16 within the bin that holds it); then trim_ zeroes, chunk by
    chunk in storage order, all entries below it and the entries equal to it beyond the k-th."""

    def __init__(self, numel: int, density: float):
        self.k = topk_count(numel, density)
        self.stage = 0 if self.k is not None else 2
        self.hist = torch.zeros(65536, dtype=torch.int64) if self.k is not None else None
        self.above = 0  # entries known to be larger than the threshold's bin
        self.hi = self.bits = None
        self.equal_left = 0

    def observe(self, x: torch.Tensor) -> None:
        if self.stage >= 2:
            return
        bits = x.abs().view(torch.int32).reshape(-1)
        if self.stage == 0:
            self.hist += torch.bincount(bits >> 16, minlength=65536)
        else:
            low = bits[(bits >> 16) == self.hi] & 0xFFFF
            self.hist += torch.bincount(low, minlength=65536)

    def end_pass(self) -> None:
        if self.stage >= 2:
            return
        from_top = self.hist.flip(0).cumsum(0)  # entries in this bin or a higher one
        j = int(torch.searchsorted(from_top, self.k - self.above))
        self.above += int(from_top[j - 1]) if j else 0
        if self.stage == 0:
            self.hi = 65535 - j
        else:
            self.bits = (self.hi << 16) | (65535 - j)
            self.equal_left = self.k - self.above
            self.hist = None
        self.stage += 1
        if self.hist is not None:
            self.hist.zero_()

    def trim_(self, x: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            return x
        bits = x.abs().view(torch.int32)
        keep = bits > self.bits
        if self.equal_left > 0:
            equal = bits == self.bits
            n = int(equal.sum())
            if n:
                rank = equal.reshape(-1).cumsum(0).reshape(equal.shape)
                keep |= equal & (rank <= self.equal_left)
                self.equal_left -= min(n, self.equal_left)
        return x.mul_(keep)


class DareMask:
    """DARE's Bernoulli(density) keep-mask of one tensor, drawn in blocks of DARE_BLOCK elements (block b
    from its own generator), so that any range of it can be made without the rest."""

    def __init__(self, seed: int, name: str, index: int, numel: int, density: float):
        self.seed, self.name, self.index, self.numel, self.density = seed, name, index, numel, density
        self._last = (None, None)  # (block, mask): a block shared by consecutive chunks is drawn once

    def _block(self, b: int) -> torch.Tensor:
        if self._last[0] != b:
            g = torch.Generator().manual_seed(tensor_seed(self.seed, self.name, self.index, b))
            n = min(DARE_BLOCK, self.numel - b * DARE_BLOCK)
            self._last = (b, torch.rand(n, generator=g) < self.density)
        return self._last[1]

    def keep(self, start: int, n: int) -> torch.Tensor:
        """The mask of elements [start, start + n) (flat index), as a bool tensor of n."""
        out = torch.empty(n, dtype=torch.bool)
        pos = start
        while pos < start + n:
            b = pos // DARE_BLOCK
            end = min(start + n, (b + 1) * DARE_BLOCK)
            out[pos - start:end - start] = self._block(b)[pos - b * DARE_BLOCK:end - b * DARE_BLOCK]
            pos = end
        return out


def elect_merge(wdeltas: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True,
                zero_sign: str = "positive", divisor: str = "signed") -> torch.Tensor:
    """TIES steps 2-3 on weighted deltas w_i δ_i (see the module docstring): the agreeing sum, or mean."""
    total = wdeltas[0].clone()
    for wd in wdeltas[1:]:
        total.add_(wd)
    elected = torch.where(total >= 0, 1.0, -1.0) if zero_sign == "positive" else torch.sign(total)
    del total
    num = torch.zeros_like(elected)
    den = torch.zeros_like(elected) if normalize else None
    for wd, w in zip(wdeltas, weights):
        agree = (torch.sign(wd) == elected) & (wd != 0)
        num.addcmul_(wd, agree)
        if den is not None:
            den.add_(agree, alpha=w if divisor == "signed" else abs(w))
        del agree
    if den is None:
        return num
    if divisor == "signed":
        return num.div_(den.masked_fill_(den == 0, 1.0))
    return num.div_(den.clamp_min_(1e-30))  # den is 0 only where num is 0


class SparseMerge:
    """TIES, dare_linear or dare_ties on ONE tensor of `numel` entries, taken in consecutive chunks.

    Usage: for each of `passes` statistics passes, observe(start, deltas) every chunk, then end_pass();
    then merge(start, base, deltas) every chunk, in order. deltas: one float tensor per model, model_i −
    base over the chunk (merge modifies them in place); start: the chunk's first flat index."""

    def __init__(self, method: str, numel: int, weights: Sequence[float], *, density=1.0, lam: float = 1.0,
                 normalize: Optional[bool] = None, rescale=True, zero_sign: str = "positive",
                 divisor: str = "signed", seed: int = 0, name: str = ""):
        if method not in ("ties", "dare_linear", "dare_ties"):
            raise ValueError(f"method={method!r}: valid: ties, dare_linear, dare_ties")
        if zero_sign not in ZERO_SIGNS or divisor not in DIVISORS or rescale not in RESCALES:
            raise ValueError(f"zero_sign={zero_sign!r} (valid {ZERO_SIGNS}), divisor={divisor!r} (valid {DIVISORS}),"
                             f" rescale={rescale!r} (valid {RESCALES})")
        n = len(weights)
        self.method, self.weights = method, _per_model(weights, n, "weights")
        self.densities = _per_model(density, n, "density")
        for d in self.densities:
            topk_count(1, d)  # checks the range
        self.lam, self.rescale, self.zero_sign, self.divisor = lam, rescale, zero_sign, divisor
        self.normalize = (method != "dare_linear") if normalize is None else normalize
        self.topk = [TopK(numel, d) for d in self.densities] if method == "ties" else None
        self.masks = ([DareMask(seed, name, i, numel, d) if d < 1.0 else None for i, d in enumerate(self.densities)]
                      if method != "ties" else None)
        self.l1 = [[0.0, 0.0] for _ in range(n)] if self.masks and rescale == "l1" else None
        self.factors = [1.0 / d if rescale is True else 1.0 for d in self.densities]
        self.passes = (2 if any(t.k is not None for t in self.topk) else 0) if self.topk else int(self.l1 is not None)

    def observe(self, start: int, deltas: Sequence[torch.Tensor]) -> None:
        for i, d in enumerate(deltas):
            if self.topk:
                self.topk[i].observe(d)
            elif self.l1 is not None and self.masks[i] is not None:
                a = d.abs()
                self.l1[i][0] += float(a.sum(dtype=torch.float64))
                self.l1[i][1] += float(a.reshape(-1).mul_(self.masks[i].keep(start, d.numel())).sum(dtype=torch.float64))

    def end_pass(self) -> None:
        if self.topk:
            for t in self.topk:
                t.end_pass()
        elif self.l1 is not None:
            self.factors = [before / after if before >= L1_EPS and after >= L1_EPS else 1.0
                            for before, after in self.l1]

    def merge(self, start: int, base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        """base + λ · merge of this chunk's deltas (a tensor of base's shape; deltas are modified)."""
        for i, d in enumerate(deltas):
            if self.topk:
                self.topk[i].trim_(d)
            elif self.masks[i] is not None:
                d.reshape(-1).mul_(self.masks[i].keep(start, d.numel()))
                if self.factors[i] != 1.0:
                    d.mul_(self.factors[i])
            d.mul_(self.weights[i])
        if self.method == "dare_linear":
            out = deltas[0]
            for d in deltas[1:]:
                out.add_(d)
            if self.normalize:
                out.div_(_nonzero_sum(self.weights))
        else:
            out = elect_merge(deltas, self.weights, normalize=self.normalize, zero_sign=self.zero_sign,
                              divisor=self.divisor)
        return out.mul_(self.lam).add_(base)


def _sparse_in_memory(method: str, base: Tensorish, models: Sequence[Tensorish], weights, dtype, **kw):
    b = _value(base, dtype)
    deltas = [_fresh(m, dtype).sub_(b) for m in models]
    sm = SparseMerge(method, b.numel(), weights, **kw)
    for _ in range(sm.passes):
        sm.observe(0, deltas)
        sm.end_pass()
    return sm.merge(0, b, deltas)


def ties(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
         density: Union[float, Sequence[float]] = 1.0, lam: float = 1.0, normalize: bool = True,
         zero_sign: str = "positive", divisor: str = "signed", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """TIES-merging of one tensor: trim each delta to its top `density` by magnitude, elect signs, merge."""
    return _sparse_in_memory("ties", base, models, weights, dtype, density=density, lam=lam, normalize=normalize,
                             zero_sign=zero_sign, divisor=divisor)


def dare_linear(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
                density: Union[float, Sequence[float]] = 1.0, lam: float = 1.0, rescale=True,
                normalize: bool = False, seed: int = 0, name: str = "",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DARE then task arithmetic: base + lam * sum_i w_i dare(model_i - base). Masks from (seed, name, i)."""
    return _sparse_in_memory("dare_linear", base, models, weights, dtype, density=density, lam=lam,
                             rescale=rescale, normalize=normalize, seed=seed, name=name)


def dare_ties(base: Tensorish, models: Sequence[Tensorish], weights: Sequence[float], *,
              density: Union[float, Sequence[float]] = 1.0, lam: float = 1.0, rescale=True, normalize: bool = True,
              zero_sign: str = "positive", divisor: str = "signed", seed: int = 0, name: str = "",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DARE's drop-and-rescale, then TIES's sign election and disjoint merge. Masks from (seed, name, i)."""
    return _sparse_in_memory("dare_ties", base, models, weights, dtype, density=density, lam=lam,
                             rescale=rescale, normalize=normalize, zero_sign=zero_sign, divisor=divisor,
                             seed=seed, name=name)
