"""Per-layer sparsity allocation for R-Sparse / TEAL: the LM-loss objective, TEAL's greedy block-wise
allocation, an evolutionary search of per-module (s, alpha), and a JSON cache for search results.

Sources. R-Sparse (Zhang et al., ICLR 2025, arXiv 2504.19449) Sec. 3.5 picks each layer's sparsity and
its sparse/low-rank split rho (our alpha) with an evolutionary search on 16 random C4 training samples
(~1 A6000-hour for Llama-2-7B). The search code was never released (VITA-Group/R-Sparse issue #2 asks for
it, unanswered); its one output, `config/llama3_sparsity_50_evolutionary_search.npy`, has s = 0.5 for all
224 modules and alpha = 1 for 193 of them. TEAL (Liu et al., ICLR 2025; FasterDecoding/TEAL
`teal/greedyopt.py`) allocates sparsity greedily, block by block. Everything below that the papers do not
pin down is our choice, stated here.

Budget. A plan is {module: (s, alpha)} over the 7 projections of every decoder layer; its model-level
sparsity is the size-weighted mean of s (`rsparse.model_sparsity`: weight reads saved, embeddings and
lm_head excluded, as the paper counts). Every plan returned here meets a target model-level sparsity:
exactly (to 1e-6) for the evolutionary search, within +-0.01 for TEAL's greedy (its paths move in steps).

`lm_loss(model, batches)`: mean next-token cross-entropy over all predicted tokens of the batches
(token-weighted, not batch-weighted), in inference mode and eval mode. The paper does not state its
search objective (presumably LM loss on its 16 samples); we use the loss: smooth, cheap, and the log of
the perplexity it reports.

`teal_greedy_paths` / `teal_greedy_plan` (TEAL's greedy, alpha = 1 everywhere):
* One dense forward over the calibration batches captures every decoder layer's inputs (args and kwargs,
  so position embeddings and masks come along) and its dense output; every block is then searched on its
  own, with dense inputs, as TEAL does. Memory: all layers' inputs for the calibration tokens (SmolLM2,
  2048 tokens: 140 MB), each freed once its block is done.
* Per block all projections start at s = 0. A step tries raising each projection p by step / w_p, where
  w_p = (in * out of p) / (in * out of q_proj), and keeps the move with the smallest error; the block's
  size-weighted sparsity thus grows by the same amount whatever p is. A move that would reach s >= 1 is
  skipped (TEAL skips projections at 1; RSparseLinear needs s < 1). The path runs until the block reaches
  `max_sparsity` (0.9) and is recorded, so one calibration pass serves every target.
* Error: the L2 (Frobenius) norm of the block output minus the dense block output over the last
  `last_fraction` (25%) of the tokens of every window, all windows together; every token is sparse.
  TEAL's code takes the norm over the token axis and averages it over batch and channels, which can rank
  close candidates differently; we keep the plain L2 error the TEAL paper describes.
* Cost (this is what makes it usable on a CPU, while computing exactly TEAL's numbers): only the last
  tokens are scored, and only k_proj / v_proj carry earlier tokens into them (through attention), so every
  other projection is computed on the scored rows only (the others are zero). A candidate changes one
  projection, so projections that neither are it nor read its output replay the outputs of the current
  point (q/k/v read the fixed block input; o reads q/k/v; gate/up read the attention result; down reads
  everything). After each block the last point is re-measured with a plain forward of the real
  RSparseLinear layers and must match, which checks both shortcuts on the architecture at hand.
* Plan for a target: per block the point whose sparsity is nearest the target (ties: the lower one).
  If the size-weighted model-level sparsity is then off by more than `tol` (0.005, inside the promised
  0.01; only coarse paths or blocks of different sizes get there), blocks move one point at a time in the
  needed direction, cheapest error per unit of sparsity first, while that brings it closer. Error scales
  differ between blocks, so this tie-break is a heuristic; with 0.05 steps it rarely runs.

`evolutionary_search` (R-Sparse Sec. 3.5, our design):
* Genome: per module (s, alpha), s in `s_range` (default [0, 0.95]; s = 0 keeps a module dense), alpha
  in [0, 1] (or in `alpha_choices`). Fitness: `lm_loss` of the model with the plan applied
  (`apply_plan`, given `token_mode`) on the calibration batches; lower is better.
* Constraint: every genome lies on sum_i w_i s_i = target (w_i = size share). Mutations are built
  budget-neutral (sum_i w_i ds_i = 0), then clipped to s_range and repaired by the projection onto the
  constraint in the size-weighted metric: s_i <- clip(s_i + c) with one scalar c found by bisection
  (the KKT solution of min sum_i w_i (s_i' - s_i)^2 s.t. the budget and the box). A uniform shift keeps
  the relative profile, so repair disturbs the mutation least.
* Initial population, in this order, truncated to `population`: uniform s = target with alpha = 1 (TEAL
  uniform; always first, so the result is never worse than it), the `init` plans (e.g. the TEAL greedy
  plan; repaired onto the budget, alphas kept), each init plan's s with alpha 0.95 and then 0.9 (the
  greedy allocation with R-Sparse's low-rank split), uniform s = target with alpha in (0.95, 0.9, 0.8) (or
  the non-1 `alpha_choices`, largest first); the rest are mutants of those seeds, in turn.
* `fixed_s` (the form of R-Sparse's one released result, s = 0.5 everywhere with alphas searched): every
  genome keeps one s profile (the first init plan's, or s = target everywhere), and the seeds are that
  profile with alpha 1, 0.95, 0.9, 0.8; mutations redraw the alpha of 1-3 modules, or of every module of
  one projection type or decoder layer at once (half each), so that 24 evaluations try many modules.
* Mutations (one per child, a second with probability 0.3), with step scale `sigma` (0.1 in s):
  - transfer (0.35): move size-weighted budget from one random module to another, the larger of the two
    s changes being U(0, sigma);
  - group shift (0.25): all modules of one projection type, or of one decoder layer, move by
    +-U(0, sigma) and all others compensate uniformly. With a budget of tens of evaluations over
    hundreds of genes, such low-dimensional moves are what can find "attention vs MLP" or "early vs late
    layers" trade-offs at all;
  - depth tilt (0.15): s_i += d * (2 depth_i / (L - 1) - 1), d = +-U(0, sigma), minus its weighted mean;
  - alpha (0.25): redraw alpha of 1-3 random modules. Biased to 1 (R-Sparse's released search result has
    193/224 modules at alpha = 1): alpha = 1 with probability 1/2, else 1 - 10^U(-2, 0), which is
    log-uniform in 1 - alpha over [0.01, 1] and covers the released extremes (0.021 .. 0.145 and near 1).
    With `alpha_choices` the draw is uniform over them, 1.0 (when listed) taking half the mass;
    alpha_choices = (1.0,) searches s only.
* Crossover (probability 0.3 per child): the child of a tournament parent takes a contiguous range of
  decoder layers (all 7 modules, s and alpha together, which keeps each layer's internal trade-off) from
  a second tournament parent and is repaired; every child is then mutated as above.
* Selection: parents by binary tournament; (mu + lambda) elitism: the next population is the best
  `population` of parents and children, so the best loss never increases (ties: the earlier evaluated).
* Budget: generation 0 evaluates the initial population, every later generation `population` children:
  at most population * generations evaluations of `lm_loss`, the config of the search. A child equal to
  an already evaluated genome is mutated again (5 tries), then takes its known loss without evaluating.
* Determinism: all randomness from random.Random(seed), consumed in a fixed order; modules in the model's
  order; with the same inputs (and the same deterministic torch kernels) a rerun gives the same plan and
  history. SVD factors come from one `SVDCache` (pass one to share it across searches). The model is left
  dense on return, also on error.
* history: per generation (best loss, mean loss of the population, model sparsity of the best).

Measured cost (SmolLM2-135M, 30 layers, 16 x 128 tokens, one CPU thread of a shared 2-core machine):
lm_loss 6-8 s; teal_greedy_paths 29 min (192 steps x 7 candidates per layer); evolutionary_search with
8 x 6 evaluations 6 min. On a shared CPU prefer torch.set_num_threads(1): with 2 threads and a busy
neighbour, each small op can wait a scheduler quantum in an OpenMP barrier (lm_loss took 43 s, not 6 s).

`cached_search(cache_dir, key_parts, fn)`: the JSON result of `fn()` stored at
cache_dir / f"{sha256(canonical JSON of key_parts)[:16]}.json" (atomic write); the key is stored too and
checked on read. The caller puts in key_parts everything the result depends on (model id, calibration
fingerprint, e.g. `batches_fingerprint`, target, search config). Hits and misses both return the value as
read back from JSON (tuples become lists), so a rerun sees exactly what the first run saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmx.sparse.rsparse import (
    Calibration,
    Plan,
    RSparseLinear,
    SVDCache,
    _set_module,
    apply_plan,
    find_linears,
    layer_shapes,
    model_sparsity,
    remove_sparsity,
    uniform_plan,
)
from llmx.utils import atomic_write_json

History = List[Tuple[float, float, float]]  # per generation: best loss, mean loss, best model sparsity

# ---- objective ---------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_batch(ids: torch.Tensor) -> torch.Tensor:
    return ids.unsqueeze(0) if ids.dim() == 1 else ids


def lm_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over every predicted token of `batches` (token-id tensors, B x T)."""
    was_training = model.training
    model.eval()  # dropout off: the objective must be a function of the plan only
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            device = _device(model)
            for ids in batches:
                ids = _as_batch(ids).to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                               reduction="sum"))
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("lm_loss needs at least one batch with two or more tokens")
    return total / count


# ---- blocks ------------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> List[Tuple[str, Dict[str, str]]]:
    """(decoder-layer prefix, {projection: module name}) in model order; the prefix is the name up to the
    last numeric component before the projection (model.layers.3.self_attn.q_proj -> model.layers.3)."""
    out: Dict[str, Dict[str, str]] = {}
    for name in find_linears(model):
        parts = name.split(".")
        idx = max((i for i, p in enumerate(parts[:-1]) if p.isdigit()), default=None)
        if idx is None:
            raise ValueError(f"{name}: not inside a numbered decoder layer")
        out.setdefault(".".join(parts[: idx + 1]), {})[parts[-1]] = name
    return list(out.items())


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _start(t: int, last_fraction: float) -> int:
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction={last_fraction}: need 0 < last_fraction <= 1")
    return min(t - 1, int(t * (1.0 - last_fraction)))  # TEAL's start index, at least one token scored


@dataclass
class _Captured:
    inputs: List[Tuple[tuple, dict]] = field(default_factory=list)  # per batch: the layer's (args, kwargs)
    targets: List[torch.Tensor] = field(default_factory=list)  # per batch: dense output, scored rows only
    starts: List[int] = field(default_factory=list)


def _capture(model: nn.Module, blocks, batches, last_fraction: float) -> List[_Captured]:
    """One dense forward: every decoder layer's inputs and its dense output on the scored rows."""
    if any(isinstance(m, RSparseLinear) for m in model.modules()):
        raise ValueError("the model must be dense (call remove_sparsity first)")
    caps = [_Captured() for _ in blocks]
    handles = []
    for (prefix, _), cap in zip(blocks, caps):
        layer = model.get_submodule(prefix)

        def pre(_m, args, kwargs, cap=cap):
            cap.inputs.append((args, dict(kwargs)))

        def post(_m, _args, _kwargs, output, cap=cap):
            y = _first(output)
            start = _start(y.shape[-2], last_fraction)
            cap.starts.append(start)
            cap.targets.append(y[..., start:, :].clone())

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = _device(model)
            for ids in batches:
                model(input_ids=_as_batch(ids).to(device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return caps


def _sq_error(out: torch.Tensor, target: torch.Tensor, start: int) -> float:
    diff = _first(out)[..., start:, :] - target
    return float(torch.sum(diff * diff, dtype=torch.float64))


def _block_error(layer: nn.Module, cap: _Captured) -> float:
    """Plain forward of the layer on its captured inputs: L2 error on the scored rows, all batches."""
    return math.sqrt(sum(_sq_error(layer(*args, **kwargs), target, start)
                         for (args, kwargs), target, start in zip(cap.inputs, cap.targets, cap.starts)))


def _teal_layer(calib: Calibration, name: str, dense: nn.Module, s: float) -> nn.Module:
    """What apply_plan builds for (s, alpha = 1): a dense layer at s <= 0, else raw-|x| magnitude sparsity."""
    if s <= 0:
        return dense
    return RSparseLinear(dense, s, 1.0, calib.threshold(name, s, weighted=False))


def block_errors(model: nn.Module, calib: Calibration, batches: Sequence[torch.Tensor], plan: Plan, *,
                 last_fraction: float = 0.25, svd: Optional[SVDCache] = None) -> List[float]:
    """Per decoder layer, the greedy's error measure for `plan` as apply_plan builds it (any alpha): the L2
    norm of block output minus dense block output on the last `last_fraction` of the tokens, with dense
    block inputs. Modules absent from `plan` stay dense. The model is left dense."""
    blocks = _blocks(model)
    caps = _capture(model, blocks, batches, last_fraction)
    svd = svd or SVDCache()
    errors = []
    try:
        with torch.inference_mode():
            for (prefix, names), cap in zip(blocks, caps):
                sub = {n: plan[n] for n in names.values() if n in plan}
                apply_plan(model, calib, sub, svd=svd)
                layer = model.get_submodule(prefix)
                errors.append(_block_error(layer, cap))
                remove_sparsity(model)
    finally:
        remove_sparsity(model)
    return errors


# ---- TEAL greedy -------------------------------------------------------------------------------------------

_ATTN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
# Which projections' settings reach each projection's input inside a Llama-style block. Conservative for
# parallel-attention blocks (their MLP is just recomputed more often than needed); the per-block re-check
# catches any architecture where it is wrong.
_UPSTREAM = {
    "q_proj": frozenset({"q_proj"}), "k_proj": frozenset({"k_proj"}), "v_proj": frozenset({"v_proj"}),
    "o_proj": _ATTN, "gate_proj": _ATTN | {"gate_proj"}, "up_proj": _ATTN | {"up_proj"},
    "down_proj": _ATTN | {"gate_proj", "up_proj", "down_proj"},
}
_ALL_ROWS = frozenset({"k_proj", "v_proj"})  # their early rows reach the scored rows through attention


class _Ctl:
    batch = 0
    start = 0


class _ReplayLinear(nn.Module):
    """Stands in for one projection during the greedy: computes its current layer (on the scored rows
    only, unless it is k/v), or replays the outputs recorded at the current point."""

    def __init__(self, proj: str, ctl: _Ctl):
        super().__init__()
        self.ctl = ctl
        self.all_rows = proj in _ALL_ROWS
        self.layer: Optional[nn.Module] = None
        self.replay: Optional[List[torch.Tensor]] = None
        self.record: List[torch.Tensor] = []
        # One full-size output per batch whose unscored rows stay zero: only the tail is ever written,
        # which saves allocating, zero-filling and concatenating a full tensor per call.
        self.buffers: Dict[int, torch.Tensor] = {}

    def _full(self, tail: torch.Tensor) -> torch.Tensor:
        b, start = self.ctl.batch, self.ctl.start
        buf = self.buffers.get(b)
        if buf is None:
            buf = self.buffers[b] = tail.new_zeros(*tail.shape[:-2], start + tail.shape[-2], tail.shape[-1])
        buf[..., start:, :].copy_(tail)
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            y = self.replay[self.ctl.batch]
            return y if self.all_rows else self._full(y)
        y = self.layer(x if self.all_rows else x[..., self.ctl.start:, :])
        self.record.append(y)
        return y if self.all_rows else self._full(y)


@dataclass
class BlockPath:
    """TEAL's greedy path of one decoder layer: point i has size-weighted sparsity `sparsity[i]`, block
    output error `error[i]` and per-projection sparsities `s[i]` (in `names` order)."""

    prefix: str
    names: Dict[str, str]  # projection -> module name
    sizes: Dict[str, int]  # projection -> in * out
    sparsity: List[float] = field(default_factory=list)
    error: List[float] = field(default_factory=list)
    s: List[List[float]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(self.sizes.values())

    def plan_at(self, i: int) -> Plan:
        return {name: (float(s), 1.0) for name, s in zip(self.names.values(), self.s[i])}

    def nearest(self, target: float) -> int:
        return min(range(len(self.sparsity)), key=lambda i: (abs(self.sparsity[i] - target), i))

    def to_dict(self) -> dict:
        # names as [projection, module] pairs: the rows of `s` follow their order, which a JSON object written
        # with sorted keys (atomic_write_json) would not keep.
        return {"prefix": self.prefix, "names": [[p, n] for p, n in self.names.items()], "sizes": self.sizes,
                "sparsity": self.sparsity, "error": self.error, "s": self.s}

    @classmethod
    def from_dict(cls, d: dict) -> "BlockPath":
        if isinstance(d["names"], dict):
            raise ValueError("BlockPath.from_dict: 'names' must be a list of [projection, module] pairs (the order "
                             "of the columns of 's'); a mapping loses that order in sorted JSON")
        return cls(d["prefix"], {p: n for p, n in d["names"]}, {k: int(v) for k, v in d["sizes"].items()},
                   list(d["sparsity"]), list(d["error"]), [list(x) for x in d["s"]])


def _greedy_block(model, calib, prefix, names, cap: _Captured, step, max_sparsity) -> BlockPath:
    layer = model.get_submodule(prefix)
    dense = {p: model.get_submodule(n) for p, n in names.items()}  # _capture made sure they are dense
    sizes = {p: m.in_features * m.out_features for p, m in dense.items()}
    ref = sizes.get("q_proj", max(sizes.values()))
    increments = {p: step * ref / sizes[p] for p in names}  # step / w_p
    total = sum(sizes.values())
    projs = list(names)
    counts = {p: 0 for p in projs}

    def s_of(p: str, n: int) -> float:
        return n * increments[p]

    def sparsity(c: Dict[str, int]) -> float:
        return sum(s_of(p, c[p]) * sizes[p] for p in projs) / total

    ctl = _Ctl()
    wrappers = {p: _ReplayLinear(p, ctl) for p in projs}
    layers: Dict[Tuple[str, int], nn.Module] = {}

    def layer_for(p: str, n: int) -> nn.Module:
        if (p, n) not in layers:
            layers[(p, n)] = _teal_layer(calib, names[p], dense[p], s_of(p, n))
        return layers[(p, n)]

    current: Dict[str, List[torch.Tensor]] = {}

    def run(c: Dict[str, int], changed: Optional[str]) -> Tuple[float, Dict[str, List[torch.Tensor]]]:
        for p, w in wrappers.items():
            fresh = changed is None or changed in _UPSTREAM.get(p, frozenset(projs))
            w.layer, w.replay, w.record = layer_for(p, c[p]), (None if fresh else current[p]), []
        err = 0.0
        for b, ((args, kwargs), target, start) in enumerate(zip(cap.inputs, cap.targets, cap.starts)):
            ctl.batch, ctl.start = b, start
            err += _sq_error(layer(*args, **kwargs), target, start)
        return math.sqrt(err), {p: w.record for p, w in wrappers.items() if w.replay is None}

    path = BlockPath(prefix, dict(names), sizes)
    for p in projs:
        _set_module(model, names[p], wrappers[p])
    try:
        with torch.inference_mode():
            err, current = run(counts, None)
            path.sparsity.append(0.0)
            path.error.append(err)
            path.s.append([0.0] * len(projs))
            while sparsity(counts) < max_sparsity - 1e-9:
                best = None
                for p in projs:
                    if s_of(p, counts[p] + 1) >= 1.0 - 1e-9:
                        continue
                    trial = dict(counts)
                    trial[p] += 1
                    err, outs = run(trial, p)
                    if best is None or err < best[0]:
                        best = (err, p, outs)
                    del outs
                if best is None:
                    break
                err, p, outs = best
                counts[p] += 1
                current.update(outs)
                path.sparsity.append(sparsity(counts))
                path.error.append(err)
                path.s.append([s_of(q, counts[q]) for q in projs])
    finally:
        for p in projs:
            _set_module(model, names[p], dense[p])
    # Re-measure the last point with the real layers and a plain forward: validates the replay shortcut.
    with torch.inference_mode():
        for p in projs:
            _set_module(model, names[p], layer_for(p, counts[p]))
        try:
            check = _block_error(layer, cap)
        finally:
            for p in projs:
                _set_module(model, names[p], dense[p])
    if abs(check - path.error[-1]) > 1e-2 * max(check, path.error[-1]) + 1e-4:
        raise RuntimeError(f"{prefix}: greedy replay error {path.error[-1]:.6g} != plain forward {check:.6g}; "
                           "the block does not have the Llama-style data flow the greedy shortcut assumes")
    return path


def teal_greedy_paths(model: nn.Module, calib: Calibration, batches: Sequence[torch.Tensor], *,
                      step: float = 0.05, last_fraction: float = 0.25, max_sparsity: float = 0.9,
                      log: Optional[Callable[[str], None]] = None) -> List[BlockPath]:
    """TEAL's greedy path of every decoder layer (see the module docstring); feed to `plan_from_paths`."""
    if not 0 < step < 1 or not 0 < max_sparsity < 1:
        raise ValueError(f"need 0 < step < 1 and 0 < max_sparsity < 1, got {step}, {max_sparsity}")
    blocks = _blocks(model)
    caps = _capture(model, blocks, batches, last_fraction)
    paths = []
    for i, (prefix, names) in enumerate(blocks):
        paths.append(_greedy_block(model, calib, prefix, names, caps[i], step, max_sparsity))
        caps[i] = None  # free this layer's activations
        if log:
            log(f"teal greedy {prefix}: {len(paths[-1].sparsity) - 1} steps, "
                f"error at {paths[-1].sparsity[-1]:.3f} = {paths[-1].error[-1]:.4g}")
    return paths


def plan_from_paths(paths: Sequence[BlockPath], target: float, *, tol: float = 0.005) -> Plan:
    """Per block the path point nearest `target`; then moves along the paths until the size-weighted
    model-level sparsity is within `tol` of the target (or no move brings it closer)."""
    if not paths:
        raise ValueError("no paths")
    lo = sum(p.sparsity[0] * p.size for p in paths) / sum(p.size for p in paths)
    hi = sum(p.sparsity[-1] * p.size for p in paths) / sum(p.size for p in paths)
    if not lo - 0.01 <= target <= hi + 0.01:
        raise ValueError(f"target {target} outside what the paths reach [{lo:.3f}, {hi:.3f}]")
    idx = [p.nearest(target) for p in paths]
    total = sum(p.size for p in paths)

    def level() -> float:
        return sum(p.sparsity[i] * p.size for p, i in zip(paths, idx)) / total

    while abs(level() - target) > tol:
        dev = level() - target
        d = -1 if dev > 0 else 1
        best = None
        for b, (p, i) in enumerate(zip(paths, idx)):
            j = i + d
            if not 0 <= j < len(p.sparsity) or p.sparsity[j] == p.sparsity[i]:
                continue
            # Error change per unit of sparsity: smallest increase going up, largest decrease going down.
            rate = (p.error[j] - p.error[i]) / (p.sparsity[j] - p.sparsity[i])
            key = rate if d > 0 else -rate
            if best is None or key < best[0]:
                best = (key, b, j)
        if best is None:
            break
        _, b, j = best
        old = idx[b]
        idx[b] = j
        if abs(level() - target) >= abs(dev):
            idx[b] = old
            break
    plan: Plan = {}
    for p, i in zip(paths, idx):
        plan.update(p.plan_at(i))
    return plan


def teal_greedy_plan(model: nn.Module, calib: Calibration, batches: Sequence[torch.Tensor], target: float, *,
                     step: float = 0.05, last_fraction: float = 0.25, max_sparsity: float = 0.9,
                     log: Optional[Callable[[str], None]] = None) -> Plan:
    """TEAL's greedy block-wise allocation at one target (alpha = 1 everywhere). For several targets call
    `teal_greedy_paths` once and `plan_from_paths` per target."""
    paths = teal_greedy_paths(model, calib, batches, step=step, last_fraction=last_fraction,
                              max_sparsity=max_sparsity, log=log)
    return plan_from_paths(paths, target)


# ---- evolutionary search -----------------------------------------------------------------------------------


def project_budget(s: Sequence[float], weights: Sequence[float], target: float,
                   s_range: Tuple[float, float]) -> List[float]:
    """clip(s_i + c, s_range) with the scalar c that makes sum_i w_i s_i = target (weights sum to 1): the
    projection onto budget and box in the size-weighted metric."""
    lo, hi = s_range
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise ValueError(f"target {target} outside s_range {s_range}")

    def clipped(c: float) -> List[float]:
        return [min(hi, max(lo, x + c)) for x in s]

    def level(v: Sequence[float]) -> float:
        return math.fsum(w * x for w, x in zip(weights, v))

    if all(lo <= x <= hi for x in s) and abs(level(s) - target) <= 1e-12:
        return list(s)
    a, b = lo - max(s), hi - min(s)  # level(clipped(a)) = lo <= target <= hi = level(clipped(b))
    for _ in range(200):
        mid = 0.5 * (a + b)
        if level(clipped(mid)) < target:
            a = mid
        else:
            b = mid
        if b - a < 1e-15:
            break
    out = clipped(0.5 * (a + b))
    free = [i for i, x in enumerate(out) if lo < x < hi]
    wfree = math.fsum(weights[i] for i in free)
    if free and wfree > 0:  # absorb the last rounding residue where no bound is touched
        r = (target - level(out)) / wfree
        for i in free:
            out[i] += r
    return out


@dataclass
class _Genome:
    s: List[float]
    a: List[float]
    loss: float = math.inf
    born: int = -1

    def key(self) -> tuple:
        return tuple(self.s) + tuple(self.a)


_DEFAULT_ALPHAS = (0.95, 0.9, 0.8)


class _Search:
    """The operators of `evolutionary_search` over one model's module list."""

    def __init__(self, names, shapes, blocks, target, s_range, alpha_choices, sigma, rng: random.Random,
                 fixed_s: bool = False):
        self.names, self.target, self.s_range, self.sigma, self.rng = names, target, s_range, sigma, rng
        self.fixed_s = fixed_s
        sizes = [shapes[n][0] * shapes[n][1] for n in names]
        self.w = [x / sum(sizes) for x in sizes]
        self.alpha_choices = None if alpha_choices is None else tuple(float(a) for a in alpha_choices)
        index = {n: i for i, n in enumerate(names)}
        self.layers = [[index[n] for n in proj_names.values()] for _, proj_names in blocks]
        self.depth = [0] * len(names)
        for d, members in enumerate(self.layers):
            for i in members:
                self.depth[i] = d
        types: Dict[str, List[int]] = {}
        for i, n in enumerate(names):
            types.setdefault(n.rsplit(".", 1)[-1], []).append(i)
        self.types = list(types.values())
        self.ops = [("transfer", 0.35), ("group", 0.25), ("tilt", 0.15)]
        if self.alpha_choices is None or set(self.alpha_choices) != {1.0}:
            self.ops.append(("alpha", 0.25))
        if fixed_s:  # s stays where the seed put it: only alphas move, a few modules or a whole group at once
            self.ops = [("alpha", 0.5), ("alpha_group", 0.5)]

    def repair(self, g: _Genome) -> _Genome:
        if not self.fixed_s:
            g.s = project_budget(g.s, self.w, self.target, self.s_range)
        return g

    def draw_alpha(self) -> float:
        rng = self.rng
        if self.alpha_choices is None:
            return 1.0 if rng.random() < 0.5 else 1.0 - 10.0 ** rng.uniform(-2.0, 0.0)
        if 1.0 in self.alpha_choices and rng.random() < 0.5:
            return 1.0
        return rng.choice(self.alpha_choices)

    def _shift_group(self, s: List[float], group: Sequence[int], delta: float) -> None:
        members = set(group)
        w_in = sum(self.w[i] for i in members)
        if w_in >= 1.0 - 1e-12:
            return
        comp = -delta * w_in / (1.0 - w_in)
        for i in range(len(s)):
            s[i] += delta if i in members else comp

    def mutate(self, g: _Genome) -> _Genome:
        rng, s, n = self.rng, list(g.s), len(g.s)
        a = list(g.a)
        ops, probs = zip(*self.ops)
        op = rng.choices(ops, weights=probs)[0]
        if op == "tilt" and len(self.layers) < 2:
            op = "transfer"
        if op == "transfer" and n >= 2:
            i, j = rng.sample(range(n), 2)
            mass = rng.uniform(0.0, self.sigma) * min(self.w[i], self.w[j])
            s[i] -= mass / self.w[i]
            s[j] += mass / self.w[j]
        elif op == "group":
            group = rng.choice(self.types) if rng.random() < 0.5 else rng.choice(self.layers)
            self._shift_group(s, group, rng.uniform(-self.sigma, self.sigma))
        elif op == "tilt":
            last = len(self.layers) - 1
            d = rng.uniform(-self.sigma, self.sigma)
            ds = [d * (2.0 * self.depth[i] / last - 1.0) for i in range(n)]
            mean = math.fsum(w * x for w, x in zip(self.w, ds))
            s = [x + y - mean for x, y in zip(s, ds)]
        elif op == "alpha":
            for i in rng.sample(range(n), min(n, rng.randint(1, 3))):
                a[i] = self.draw_alpha()
        elif op == "alpha_group":
            value = self.draw_alpha()
            for i in rng.choice(self.types) if rng.random() < 0.5 else rng.choice(self.layers):
                a[i] = value
        return self.repair(_Genome(s, a))

    def crossover(self, g1: _Genome, g2: _Genome) -> _Genome:
        s, a = list(g1.s), list(g1.a)
        lo = self.rng.randrange(len(self.layers))
        hi = self.rng.randrange(lo, len(self.layers)) + 1
        for members in self.layers[lo:hi]:
            for i in members:
                s[i], a[i] = g2.s[i], g2.a[i]
        return self.repair(_Genome(s, a))

    def tournament(self, pop: List[_Genome]) -> _Genome:
        i, j = self.rng.randrange(len(pop)), self.rng.randrange(len(pop))
        return pop[min(i, j)]  # pop is sorted best first


def evolutionary_search(model: nn.Module, calib: Calibration, batches: Sequence[torch.Tensor], target: float, *,
                        population: int = 8, generations: int = 10, seed: int = 0,
                        alpha_choices: Optional[Sequence[float]] = None,
                        s_range: Tuple[float, float] = (0.0, 0.95),
                        init: Union[Plan, Sequence[Plan], None] = None, svd: Optional[SVDCache] = None,
                        token_mode: str = "all", token_fraction: float = 0.1, sigma: float = 0.1,
                        fixed_s: bool = False,
                        log: Optional[Callable[[str], None]] = None) -> Tuple[Plan, History]:
    """Search per-module (s, alpha) at model-level sparsity `target`, minimising `lm_loss` on `batches`
    (see the module docstring); fixed_s: alpha only, on the s of the first `init` plan (else s = target
    everywhere). Returns (best plan, history); the model is left dense."""
    if population < 1 or generations < 1:
        raise ValueError(f"need population >= 1 and generations >= 1, got {population}, {generations}")
    lo, hi = s_range
    if not 0.0 <= lo <= target <= hi < 1.0:
        raise ValueError(f"need 0 <= s_range[0] <= target <= s_range[1] < 1, got {s_range}, target {target}")
    if alpha_choices is not None and (not alpha_choices or any(not 0.0 <= x <= 1.0 for x in alpha_choices)):
        raise ValueError(f"alpha_choices must be a non-empty sequence of values in [0, 1], got {alpha_choices}")
    if any(isinstance(m, RSparseLinear) for m in model.modules()):
        raise ValueError("the model must be dense (call remove_sparsity first)")
    shapes = layer_shapes(model)
    names = list(shapes)
    rng = random.Random(seed)
    ops = _Search(names, shapes, _blocks(model), target, s_range, alpha_choices, sigma, rng, fixed_s)
    svd = svd or SVDCache()
    init_plans = [] if init is None else ([init] if isinstance(init, dict) else list(init))
    for plan in init_plans:
        if set(plan) != set(names):
            raise ValueError(f"init plan modules differ from the model's: {sorted(set(plan) ^ set(names))[:5]}")

    seen: Dict[tuple, float] = {}
    evaluations = 0

    def evaluate(g: _Genome) -> _Genome:
        nonlocal evaluations
        key = g.key()
        if key in seen:
            g.loss = seen[key]
            return g
        plan = dict(zip(names, zip(g.s, g.a)))
        apply_plan(model, calib, plan, token_mode=token_mode, token_fraction=token_fraction, svd=svd)
        loss = lm_loss(model, batches)
        g.loss = loss if math.isfinite(loss) else math.inf
        g.born = evaluations
        evaluations += 1
        seen[key] = g.loss
        return g

    def fresh(g: _Genome) -> _Genome:
        for _ in range(5):
            if g.key() not in seen:
                break
            g = ops.mutate(g)
        return g

    def sparsity_of(g: _Genome) -> float:
        return model_sparsity(shapes, dict(zip(names, zip(g.s, g.a))))

    history: History = []
    try:
        alphas = _DEFAULT_ALPHAS if alpha_choices is None else sorted({a for a in alpha_choices if a < 1.0},
                                                                      reverse=True)
        if fixed_s:  # one s profile, on the budget: the first init plan's, or the target everywhere
            profile = project_budget([init_plans[0][n][0] for n in names], ops.w, target, s_range) if init_plans \
                else [target] * len(names)
            seeds = [{n: (x, a) for n, x in zip(names, profile)} for a in (1.0, *alphas)]
        else:
            # TEAL uniform first (the result is never worse), the init plans, each init plan's s with the low-rank
            # alphas (greedy s + R-Sparse's split), then uniform s with them.
            seeds = [uniform_plan(shapes, target, 1.0)] + init_plans
            seeds += [{n: (p[n][0], a) for n in names} for a in alphas[:2] for p in init_plans]
            seeds += [uniform_plan(shapes, target, a) for a in alphas]
        genomes = [ops.repair(_Genome([p[n][0] for n in names], [float(p[n][1]) for n in names]))
                   for p in seeds[:population]]
        n_seeds, keys = len(genomes), {g.key() for g in genomes}
        while len(genomes) < population:
            g = ops.mutate(genomes[(len(genomes) - n_seeds) % n_seeds])
            for _ in range(5):  # e.g. an alpha redraw of 1.0 on modules already at 1 changes nothing
                if g.key() not in keys:
                    break
                g = ops.mutate(g)
            keys.add(g.key())
            genomes.append(g)
        pop: List[_Genome] = []
        for g in genomes:
            g = evaluate(g)
            if all(g.key() != h.key() for h in pop):
                pop.append(g)
        pop.sort(key=lambda g: (g.loss, g.born))

        for gen in range(generations):
            if gen > 0:
                children = []
                for _ in range(population):
                    child = ops.tournament(pop)
                    if len(pop) > 1 and rng.random() < 0.3:
                        child = ops.crossover(child, ops.tournament(pop))
                    child = ops.mutate(child)
                    if rng.random() < 0.3:
                        child = ops.mutate(child)
                    children.append(evaluate(fresh(child)))
                merged: Dict[tuple, _Genome] = {}
                for g in pop + children:
                    merged.setdefault(g.key(), g)
                pop = sorted(merged.values(), key=lambda g: (g.loss, g.born))[:population]
            best = pop[0]
            budget_error = abs(sparsity_of(best) - target)
            if budget_error > 1e-6:
                raise RuntimeError(f"budget repair failed: sparsity off by {budget_error:.3g}")
            mean = sum(g.loss for g in pop) / len(pop)
            history.append((best.loss, mean, sparsity_of(best)))
            if log:
                log(f"evolutionary search gen {gen}: best {best.loss:.5f} mean {mean:.5f} "
                    f"sparsity {history[-1][2]:.4f} evaluations {evaluations}")
    finally:
        remove_sparsity(model)
    best = pop[0]
    return {n: (float(s), float(a)) for n, s, a in zip(names, best.s, best.a)}, history


# ---- cache -------------------------------------------------------------------------------------------------


def batches_fingerprint(batches: Sequence[torch.Tensor]) -> str:
    """sha256 of the calibration token ids (shapes included), for cache keys."""
    h = hashlib.sha256()
    for ids in batches:
        t = _as_batch(ids).detach().to("cpu", torch.int64).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def plan_to_json(plan: Plan) -> Dict[str, List[float]]:
    return {n: [float(s), float(a)] for n, (s, a) in plan.items()}


def plan_from_json(obj: Dict[str, Sequence[float]]) -> Plan:
    return {n: (float(v[0]), float(v[1])) for n, v in obj.items()}


def cached_search(cache_dir: Union[str, Path], key_parts: Dict[str, Any], fn: Callable[[], Any]) -> Any:
    """fn()'s JSON-serialisable result, computed once per key: stored as
    cache_dir / f"{sha256(key)[:16]}.json" with the key, where key = canonical JSON of `key_parts`."""
    key = json.dumps(key_parts, sort_keys=True, default=str)
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            if json.dumps(stored.get("key"), sort_keys=True, default=str) == key:
                return stored["result"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # unreadable or foreign: recompute and overwrite
    atomic_write_json(path, {"key": json.loads(key), "result": fn()})
    # Return what was written, read back: a hit then sees exactly what this miss sees (key order included).
    return json.loads(path.read_text())["result"]
