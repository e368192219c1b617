"""R-Sparse: training-free rank-aware activation sparsity (Zhang, Liu, Tian, Khaitan, Wang, Li; ICLR 2025,
arXiv 2504.19449), and TEAL-style magnitude sparsity as its alpha = 1 special case.

Every targeted linear y = W x (the 7 projections of each Llama-family decoder layer) becomes

    m   = 1[|x_j| * ||W[:, j]|| > t]                       (channels worth an exact column)
    y   = W (x * m) + U_r ( S_r V_r^T (x * (1 - m)) )       (Sec. 3.3; the reference's `r_sparse` mode)

with W = U S V^T its SVD. Per layer, s is the fraction of weight reads saved and alpha the share of what is
left that goes to exact columns (the reference's `set_threshold_r_sparse`):

    kept channels  k = in * (1 - s) * alpha                 -> t = quantile of |x * scale| at 1 - (1 - s) * alpha
    rank           r = in * out * (1 - s) * (1 - alpha) / (in + out)

so k * out + r * (in + out) = (1 - s) * in * out. alpha = 1 is TEAL (Liu et al., 2024): m = 1[|x_j| > t] on
raw |x| (no column norms, no low-rank term), as the reference's `sparse` mode; alpha = 0 is low-rank only.

Choices (the paper or the reference is unclear, or we fix a bug; each is a config):
* out is the layer's own output size, so grouped-query k_proj / v_proj get their correct rank budget (the
  reference assumes out = hidden size for every attention projection).
* Thresholds are quantiles over a random subsample (default 65,536 values per layer) of the calibration
  activations, all tokens x channels, as the reference's quantile over its one 512-token window;
  calibration text and amount are config (`calibrate`).
* Which tokens are sparse is explicit (`token_mode`): "all"; "decode" (only single-token calls, i.e. the
  generated tokens; the prompt runs dense); "last_fraction" (the last `token_fraction` of every sequence,
  the rest dense: the reference's evaluation, `--prefill_ratio 0.1`).
* SVD in float64 (as the reference), factors stored in the weight's dtype.

Decoding (`decode_layout()`): W is stored transposed (W^T contiguous, "column-major W", paper Sec. 3.4), once -- the
layer's W becomes a view of it -- so a decoded token reads only its active channels' rows. Calls of 1..16 rows (a
decode step of batch 1..16) then run the fused Triton kernel (`llmx.kernels.rsparse_gemv`: mask, exact columns and
low-rank term, no host sync, CUDA-graph capturable) on CUDA; `fuse_shared_inputs` then decodes q/k/v and gate/up as
one call each (TEAL: one shared mask; R-Sparse: one segment per projection, each with its own mask and low-rank term).
On CPU a single row uses embedding_bag over the active rows, and the plain PyTorch math below is the kernel's
oracle. Prompts (many tokens) multiply the masked input by W.
Both compare |x| * scale in fp32 (scale, the column norms, is kept in fp32), so the kernel and the PyTorch path
choose the same channels in any compute dtype.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKEN_MODES = ("all", "decode", "last_fraction")
MAX_DECODE_ROWS = 16  # the fused kernel's largest batch (llmx.kernels.rsparse_gemv.MAX_ROWS)
Plan = Dict[str, Tuple[float, float]]  # module name -> (s, alpha)


def find_linears(model: nn.Module, targets: Sequence[str] = TARGETS) -> Dict[str, nn.Module]:
    """name -> module for every nn.Linear (or RSparseLinear) whose last name component is in `targets`."""
    found = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(mod, (nn.Linear, RSparseLinear)):
            found[name] = mod
    return found


def sparse_tail(t: int, fraction: float) -> int:
    """token_mode=last_fraction: how many of a sequence's t positions are sparse (the last ones), at least one."""
    return max(1, math.ceil(fraction * t))


def rank_for(in_features: int, out_features: int, s: float, alpha: float) -> int:
    """The low-rank share of a layer's budget: r (in + out) = in out (1 - s)(1 - alpha), rounded down. The 1e-9
    keeps a product that is an integer in exact arithmetic (e.g. s = 0.7) from rounding down past it."""
    return int(in_features * out_features * (1.0 - s) * (1.0 - alpha) / (in_features + out_features) + 1e-9)


def keep_threshold(sorted_mags: torch.Tensor, keep_fraction: float) -> float:
    """The threshold t of a layer that keeps the channels with magnitude > t, so that round(keep_fraction * n) of
    the n ascending `sorted_mags` pass (ties aside): the largest dropped value; -1 keeps all, inf none. The one
    threshold rule of the layer, the calibration and the kernels."""
    n = len(sorted_mags)
    keep = int(round(keep_fraction * n))
    if keep >= n:
        return -1.0  # magnitudes are >= 0
    if keep <= 0:
        return float("inf")
    return float(sorted_mags[n - keep - 1])


def reads_saved(in_features: int, out_features: int, active_channels: float, rank: int) -> float:
    """Fraction of the dense layer's weight reads saved for one token."""
    return 1.0 - (active_channels * out_features + rank * (in_features + out_features)) / (in_features * out_features)


def model_sparsity(shapes: Mapping[str, Tuple[int, int]], plan: Plan) -> float:
    """Model-level sparsity: weight-read savings weighted by layer size, over the targeted linears only
    (embeddings and lm_head excluded, as the paper counts)."""
    total = sum(i * o for i, o in shapes.values())
    return sum(plan[n][0] * i * o for n, (i, o) in shapes.items()) / total


def achieved_sparsity(layers: Mapping[str, "RSparseLinear"], shapes: Mapping[str, Tuple[int, int]]) -> float:
    """Model-level sparsity measured by tracking layers (`track`): each layer's achieved weight-read savings weighted
    by its size, over every targeted layer of `shapes` (a layer kept dense, or that saw no token, saves nothing)."""
    total = sum(i * o for i, o in shapes.values())
    saved = sum((layer.achieved() or 0.0) * shapes[n][0] * shapes[n][1] for n, layer in layers.items())
    return saved / total if total else 0.0


def layer_shapes(model: nn.Module, targets: Sequence[str] = TARGETS) -> Dict[str, Tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in find_linears(model, targets).items()}


# ---- calibration -----------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Sorted random subsamples of |x| and |x| * column-norm per linear, from the dense model's inputs."""

    abs_x: Dict[str, torch.Tensor] = field(default_factory=dict)
    abs_xs: Dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def threshold(self, name: str, zero_fraction: float, weighted: bool) -> float:
        """The threshold that drops `zero_fraction` of the calibration values of `name` (keep_threshold)."""
        return keep_threshold((self.abs_xs if weighted else self.abs_x)[name], 1.0 - zero_fraction)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        out = {f"abs_x/{k}": v for k, v in self.abs_x.items()}
        out.update({f"abs_xs/{k}": v for k, v in self.abs_xs.items()})
        out["tokens"] = torch.tensor([self.tokens])
        return out

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "Calibration":
        cal = cls(tokens=int(sd["tokens"][0]))
        for k, v in sd.items():
            kind, _, name = k.partition("/")
            if kind == "abs_x":
                cal.abs_x[name] = v
            elif kind == "abs_xs":
                cal.abs_xs[name] = v
        return cal


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[torch.Tensor], targets: Sequence[str] = TARGETS,
              max_values: int = 1 << 16, seed: int = 0) -> Calibration:
    """Run the dense model on `batches` (token-id tensors, B x T) and keep, per targeted linear, a uniform
    random subsample of its input magnitudes (|x| and |x| * ||W[:, j]||), sorted for quantile lookups."""
    linears = find_linears(model, targets)
    if not linears:
        raise ValueError(f"no linear layer named one of {list(targets)} in {type(model).__name__}")
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, max_values // max(1, len(batches)))
    samples: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in linears}
    scales = {n: m.weight.detach().float().norm(dim=0).cpu() for n, m in linears.items()}

    last: Dict[str, object] = {}  # the input seen last and its subsample

    def hook(name):
        def fn(_mod, args):
            # Linears fed the same tensor (q/k/v, gate/up) share one subsample, so at equal s they get equal
            # thresholds (TEAL's; R-Sparse's weighted ones then differ by their column norms only).
            if last.get("input") is not args[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
                idx = torch.randint(0, x.numel(), (min(per_batch, x.numel()),), generator=gen)
                last.update(input=args[0], idx=idx, vals=x.reshape(-1)[idx].abs(), width=x.shape[1])
            idx, vals = last["idx"], last["vals"]
            samples[name].append((vals, vals * scales[name][idx % last["width"]]))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    tokens = 0
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.to(device))
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    cal = Calibration(tokens=tokens)
    for n, parts in samples.items():
        cal.abs_x[n] = torch.cat([a for a, _ in parts]).sort().values
        cal.abs_xs[n] = torch.cat([b for _, b in parts]).sort().values
    return cal


# ---- the layer -------------------------------------------------------------------------------------------


class SVDCache:
    """SVD factors of each weight, computed on first use (in float64, on the weight's device, as the reference's
    offline SVD) and kept there in the weight's dtype, truncated to max_rank(in, out) when given (the largest rank
    the allocation can ask for); sliced to any rank below it (the search varies ranks). A layer's factors are what
    RSparseLinear holds, so the cached copy costs what the largest-rank layer would."""

    def __init__(self, max_rank: Optional[Callable[[int, int], int]] = None):
        self.max_rank = max_rank
        self.factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, name: str, weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if name not in self.factors:
            out_f, in_f = weight.shape
            keep = min(out_f, in_f) if self.max_rank is None else self.max_rank(in_f, out_f)
            u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
            # U (out x k), S V^T (k x in)
            self.factors[name] = (u[:, :keep].to(weight.dtype).contiguous(),
                                  (s[:keep, None] * vh[:keep]).to(weight.dtype).contiguous())
        u, svt = self.factors[name]
        if rank > u.shape[1]:
            raise ValueError(f"{name}: rank {rank} asked of an SVD cache that keeps rank {u.shape[1]} (max_rank)")
        return u[:, :rank].contiguous(), svt[:rank].contiguous()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)


def svd_max_rank(allocation: str, alpha: float = 1.0, levels: Sequence[float] = ()) -> Callable[[int, int], int]:
    """The largest rank an allocation can ask of a layer (in, out): what SVDCache keeps. uniform: its alpha at the
    lowest level; greedy: its alpha at s = 0; search: any (s, alpha), so the budget's own bound rank_for(s=0, alpha=0)
    = in*out/(in+out), half of full rank for a square layer."""
    if allocation == "uniform":
        return lambda i, o: max(rank_for(i, o, level, alpha) for level in levels)
    if allocation == "greedy":
        return lambda i, o: rank_for(i, o, 0.0, alpha)
    return lambda i, o: rank_for(i, o, 0.0, 0.0)


def svd_bytes(shapes: Mapping[str, Tuple[int, int]], element_size: int,
              max_rank: Optional[Callable[[int, int], int]] = None) -> int:
    """What an SVDCache holds once every layer of `shapes` {name: (in, out)} has been asked for."""
    ranks = {n: min(i, o) if max_rank is None else max_rank(i, o) for n, (i, o) in shapes.items()}
    return sum(ranks[n] * (i + o) * element_size for n, (i, o) in shapes.items())


class RSparseLinear(nn.Module):
    """A linear layer with R-Sparse (alpha < 1) or TEAL (alpha = 1) input sparsity; see the module docstring."""

    def __init__(self, linear: nn.Linear, s: float, alpha: float, threshold: float,
                 u: Optional[torch.Tensor] = None, svt: Optional[torch.Tensor] = None,
                 token_mode: str = "all", token_fraction: float = 0.1):
        super().__init__()
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode={token_mode!r}; valid: {list(TOKEN_MODES)}")
        if not 0.0 <= s < 1.0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"need 0 <= s < 1 and 0 <= alpha <= 1, got s={s}, alpha={alpha}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared with the dense model: applying and removing costs no copy
        self.bias = linear.bias
        self.weight_t: Optional[torch.Tensor] = None  # W^T contiguous, after decode_layout(); weight is then its view
        self.kernel = False  # decode_layout(): rows of single-token calls go to the fused Triton kernel
        self.tile: Optional[List[int]] = None  # decode_layout(tune=True): the kernel's tile for one row
        self.group: Optional["SharedInputGroup"] = None  # fuse_shared_inputs(): one kernel call for q/k/v, gate/up
        self.group_slice, self.group_lead = (0, 0), False  # this layer's outputs in the group's, and who calls
        self.s, self.alpha, self.threshold = float(s), float(alpha), float(threshold)
        self.rank = 0 if u is None else u.shape[1]
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("svt", svt, persistent=False)
        # fp32, as the kernel compares: |x| * scale in the compute dtype would round the product first
        self.register_buffer("scale", linear.weight.detach().float().norm(dim=0), persistent=False)
        self.token_mode, self.token_fraction = token_mode, float(token_fraction)
        self.track = False  # count active channels (achieved sparsity on real inputs)
        self.seen_tokens = 0
        self.active_channels = 0.0

    @property
    def weighted(self) -> bool:
        return self.alpha < 1.0

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, s={self.s:.3f}, alpha={self.alpha:.3f}, "
                f"rank={self.rank}, threshold={self.threshold:.4g}, tokens={self.token_mode}")

    def decode_layout(self, kernel: Optional[bool] = None, tune: Optional[bool] = None) -> "RSparseLinear":
        """Store W as W^T contiguous (column-major W; `weight` becomes its transposed view, so W is held once) so a
        decoded token reads only its active channels' rows; with `kernel` (default: on CUDA where Triton runs) decode
        calls go to the fused kernel, whose low-rank factor Vs is then stored column-major too. With `tune` (default:
        on CUDA) the kernel's tile for one row is chosen by timing (llmx.kernels.rsparse_gemv.tune_config) on a
        Gaussian input thresholded to this layer's kept fraction; layers of one shape and sparsity share the result."""
        from llmx.kernels._common import triton_available

        if self.weight_t is None:
            self.weight_t = self.weight.detach().t().contiguous()
            self.weight = nn.Parameter(self.weight_t.t(), requires_grad=False)
        self.kernel = self.weight.is_cuda and triton_available(self.weight.device) if kernel is None else kernel
        if self.kernel:
            if not triton_available(self.weight.device):
                raise RuntimeError(f"the fused R-Sparse kernel needs CUDA with Triton (or TRITON_INTERPRET=1 for CPU "
                                   f"tensors); the layer is on {self.weight.device}: use decode_layout(kernel=False)")
            if self.rank > 0 and self.svt.stride(0) != 1:
                self.svt = self.svt.t().contiguous().t()  # (r, in) over (in, r) storage: a skipped channel, one row
            if self.weight.is_cuda if tune is None else tune:
                self.tile = self._tune()
        return self

    def _tune(self) -> Optional[List[int]]:
        from llmx.kernels.rsparse_gemv import tile_of, tune_config

        x = _tuning_input(self.in_features, self.weight)
        lr = (self.u, self.svt) if self.rank > 0 else (None, None)
        return tile_of(tune_config(x, self.weight_t, self.scale if self.weighted else None, self.tuning_threshold(x),
                                   *lr))

    def tuning_threshold(self, x: torch.Tensor) -> float:
        """The threshold that keeps this layer's planned fraction (1 - s) * alpha of the entries of x: tiles are timed
        at the sparsity the layer will run at."""
        mag = (x.float().abs() * (self.scale.float() if self.weighted else 1.0)).reshape(-1).sort().values.cpu()
        return keep_threshold(mag, (1.0 - self.s) * self.alpha) if self.alpha > 0 else float("inf")

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        # fp32, as the kernel compares (scale is fp32, unless model.to(dtype) cast the buffer: then its values)
        mag = x.abs().float() * self.scale.float() if self.weighted else x.abs().float()
        return mag > self.threshold

    def sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.numel() <= MAX_DECODE_ROWS * x.shape[-1]:
            return self.kernel_forward(x)
        m = self.mask(x) if self.alpha > 0 else torch.zeros_like(x, dtype=torch.bool)
        if self.track:
            self.seen_tokens += m.numel() // m.shape[-1]
            self.active_channels += float(m.sum())
        if self.weight_t is not None and x.numel() == x.shape[-1]:  # one token: read only the active rows of W^T
            # embedding_bag(sum, per-sample weights) is sum_j x_j * W^T[j, :] over the active j, computed in
            # place from the rows (index_select then matmul would copy them first: twice the memory traffic).
            xv = x.reshape(-1)
            idx = m.reshape(-1).nonzero().squeeze(1)
            if idx.numel():
                y = F.embedding_bag(idx[None], self.weight_t, per_sample_weights=xv.index_select(0, idx)[None],
                                    mode="sum").reshape(*x.shape[:-1], -1)
            else:  # no channel passes (embedding_bag refuses an empty bag)
                y = x.new_zeros(*x.shape[:-1], self.out_features)
        elif self.alpha > 0:
            y = F.linear(x * m, self.weight)
        else:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.rank > 0:
            y = y + F.linear(F.linear(x * ~m, self.svt), self.u)
        return y if self.bias is None else y + self.bias

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """1..16 rows through the fused kernel: one call does the mask, the exact columns and the low-rank term."""
        if self.track:  # counting needs the mask on the host side; the kernel never materialises it
            m = self.mask(x)
            self.seen_tokens += m.numel() // m.shape[-1]
            self.active_channels += float(m.sum())
        group = self.group
        if group is not None and (self.group_lead or group.x is x):
            # one call for the group, made by its first member; the others take their slice
            if self.group_lead:
                group.x, group.y = x, group(x)
            y = group.y[..., self.group_slice[0]: self.group_slice[1]]
            return y if self.bias is None else y + self.bias
        threshold = self.threshold if self.alpha > 0 else float("inf")  # alpha = 0: every channel low-rank
        lr = (self.u, self.svt) if self.rank > 0 else (None, None)
        tile = self.tile if x.numel() == x.shape[-1] else None  # tuned for one row; batches keep the heuristic
        y = rsparse_gemv_op(x, self.weight_t, self.scale if self.weighted else None, threshold, *lr, tile)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mode == "all" or (x.dim() >= 2 and x.shape[-2] == 1):
            return self.sparse_forward(x)  # every token, or a single-token (decode) call
        if self.token_mode == "decode":
            return F.linear(x, self.weight, self.bias)  # a prompt: dense
        # last_fraction: the first tokens dense, the last ceil(f * T) sparse (the reference's evaluation)
        t = x.shape[-2]
        n_sparse = sparse_tail(t, self.token_fraction)
        dense = F.linear(x[..., : t - n_sparse, :], self.weight, self.bias)
        return torch.cat([dense, self.sparse_forward(x[..., t - n_sparse:, :])], dim=-2)

    def achieved(self) -> Optional[float]:
        """Measured fraction of weight reads saved since tracking started (None before any token)."""
        if not self.seen_tokens:
            return None
        return reads_saved(self.in_features, self.out_features, self.active_channels / self.seen_tokens, self.rank)


@torch.library.custom_op("llmx::rsparse_gemv", mutates_args=())
def rsparse_gemv_op(x: torch.Tensor, wt: torch.Tensor, scale: Optional[torch.Tensor], threshold: float,
                    u: Optional[torch.Tensor], vs: Optional[torch.Tensor],
                    tile: Optional[List[int]] = None) -> torch.Tensor:
    """The fused kernel as one PyTorch operator: torch.compile traces the layer through it without a graph break
    (the kernel's launch logic stays in Python) and CUDA graphs capture it. tile: ``rsparse_gemv.tile_of``'s ints."""
    from llmx.kernels.rsparse_gemv import config_of, rsparse_gemv  # at call time: tests reload the kernel module

    return rsparse_gemv(x, wt, scale, threshold, u, vs, config=None if tile is None else config_of(tile))


@rsparse_gemv_op.register_fake
def _(x, wt, scale, threshold, u, vs, tile=None):
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


@torch.library.custom_op("llmx::rsparse_gemv_segments", mutates_args=())
def rsparse_segments_op(x: torch.Tensor, wt: torch.Tensor, scale: Optional[torch.Tensor], thresholds: List[float],
                        u: Optional[torch.Tensor], vst: Optional[torch.Tensor], outs: List[int], ranks: List[int],
                        tile: Optional[List[int]] = None) -> torch.Tensor:
    """Projections that read one input, each with its own mask and low-rank term, in one call of the compacted
    kernels (``llmx.kernels.rsparse_compact``), as one PyTorch operator."""
    from llmx.kernels.rsparse_compact import rsparse_gemv_compact
    from llmx.kernels.rsparse_gemv import config_of

    return rsparse_gemv_compact(x, wt, scale, thresholds, u, vst, outs=outs, ranks=ranks,
                                config=None if tile is None else config_of(tile))


@rsparse_segments_op.register_fake
def _(x, wt, scale, thresholds, u, vst, outs, ranks, tile=None):
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


def _tuning_input(features: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device=like.device).manual_seed(features)
    return torch.randn(1, features, generator=g, device=like.device).to(like.dtype)


class SharedInputGroup:
    """Projections that read one input (q/k/v, gate/up) decoded by one kernel call over their concatenated W^T, which
    their own W^T -- and low-rank factors -- become views of (held once). With one mask (TEAL: alpha = 1, no
    low-rank term, equal thresholds) the call is rsparse_gemv's single launch, as TEAL's gpt-fast fusion; otherwise
    each projection keeps its own column-norm mask, threshold and low-rank term as a segment of the compacted
    kernels' two launches (R-Sparse's q/k/v and gate/up). Thresholds are read at every call (matching may scale
    them)."""

    def __init__(self, members: Sequence[RSparseLinear]):
        self.members = list(members)
        self.outs = [m.out_features for m in members]
        self.ranks = [m.rank for m in members]
        self.wt = torch.cat([m.weight_t for m in members], dim=1)
        # a TEAL member's plain |x| mask is a row of ones
        self.scale = torch.stack([m.scale.float() if m.weighted else torch.ones_like(m.scale, dtype=torch.float32)
                                  for m in members]) if any(m.weighted for m in members) else None
        self.u = self.vst = None
        if sum(self.ranks):
            self.u = torch.cat([m.u.reshape(-1) for m in members if m.rank])
            self.vst = torch.cat([m.svt.t() for m in members if m.rank], dim=1).contiguous()  # (in, sum r)
        lo = u0 = r0 = 0
        for m in members:
            m.group_slice, m.group_lead = (lo, lo + m.out_features), m is members[0]
            m.weight_t = self.wt[:, lo: lo + m.out_features]
            m.weight = nn.Parameter(m.weight_t.t(), requires_grad=False)
            if m.rank:
                m.u = self.u[u0: u0 + m.out_features * m.rank].view(m.out_features, m.rank)
                m.svt = self.vst[:, r0: r0 + m.rank].t()
                u0, r0 = u0 + m.out_features * m.rank, r0 + m.rank
            m.group, lo = self, lo + m.out_features
        self.tile: Optional[List[int]] = None  # tune(): the segmented call's tile for one row
        self.x: Optional[torch.Tensor] = None  # the input of the last call, and its outputs
        self.y: Optional[torch.Tensor] = None

    def one_mask(self) -> bool:
        return all(m.alpha == 1.0 and m.rank == 0 for m in self.members) and \
            len({m.threshold for m in self.members}) == 1

    def thresholds(self) -> List[float]:
        return [m.threshold if m.alpha > 0 else float("inf") for m in self.members]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_mask():
            return rsparse_gemv_op(x, self.wt, None, self.members[0].threshold, None, None, None)
        tile = self.tile if x.numel() == x.shape[-1] else None
        return rsparse_segments_op(x, self.wt, self.scale, self.thresholds(), self.u, self.vst, self.outs, self.ranks,
                                   tile)

    def tune(self) -> None:
        """The segmented call's tile for one row, by timing (``rsparse_gemv.fastest``) at the members' planned
        sparsities; groups of one shape and sparsity tune once."""
        from llmx.kernels.rsparse_compact import compact_candidates, rsparse_gemv_compact
        from llmx.kernels.rsparse_gemv import fastest, tile_of

        if self.one_mask():
            return
        x = _tuning_input(self.wt.shape[0], self.wt)
        ts = [m.tuning_threshold(x) for m in self.members]
        key = ("segments", str(x.device), tuple(self.wt.shape), tuple(self.outs), tuple(self.ranks), self.wt.dtype,
               tuple(round((1.0 - m.s) * m.alpha * 20) / 20 for m in self.members))
        tol = 1e-5 if self.wt.dtype == torch.float32 else 1e-2
        best = fastest(key, lambda cfg: rsparse_gemv_compact(x, self.wt, self.scale, ts, self.u, self.vst,
                                                             outs=self.outs, ranks=self.ranks, config=cfg),
                       compact_candidates(self.wt.shape[1]), tol)
        self.tile = tile_of(best)


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_shared_inputs(model: nn.Module, tune: Optional[bool] = None) -> int:
    """In each block, the projections that read the same input (q/k/v, gate/up), all on the kernel path with one
    token mode, decode in one call (SharedInputGroup): TEAL's single-mask fusion (its gpt-fast path: one launch), or
    R-Sparse's per-projection masks and low-rank terms as segments (two launches; segment boundaries must be
    multiples of 16). With `tune` (default: on CUDA) each segmented group's tile is chosen by timing. Returns the
    number of groups formed."""
    formed = 0
    for block in model.modules():
        for names in SHARED_INPUTS:
            members = [getattr(block, n, None) for n in names]
            if not all(isinstance(m, RSparseLinear) and m.kernel and m.group is None for m in members):
                continue
            if len({m.token_mode for m in members}) > 1 or len({m.weight_t.dtype for m in members}) > 1 \
                    or any(m.out_features % 16 for m in members[:-1]):
                continue
            group = SharedInputGroup(members)
            if members[0].weight.is_cuda if tune is None else tune:
                group.tune()
            formed += 1
    return formed


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_plan(model: nn.Module, calib: Calibration, plan: Plan, *, token_mode: str = "all",
               token_fraction: float = 0.1, svd: Optional[SVDCache] = None) -> Dict[str, RSparseLinear]:
    """Replace every linear named in `plan` by an RSparseLinear with its (s, alpha); returns them.
    Layers already replaced are rebuilt from their dense weight. s = 0 keeps a layer dense."""
    svd = svd or SVDCache()
    linears = find_linears(model, {n.rsplit(".", 1)[-1] for n in plan})
    missing = sorted(set(plan) - set(linears))
    if missing:
        raise ValueError(f"plan names layers the model does not have: {missing[:5]}")
    out = {}
    for name, (s, alpha) in plan.items():
        mod = linears[name]
        dense = mod if isinstance(mod, nn.Linear) else _as_linear(mod)
        if s <= 0:
            _set_module(model, name, dense)
            continue
        r = rank_for(dense.in_features, dense.out_features, s, alpha)
        u, svt = svd.get(name, dense.weight, r) if r > 0 else (None, None)
        zero = 1.0 - (1.0 - s) * alpha
        t = calib.threshold(name, zero, weighted=alpha < 1.0)
        layer = RSparseLinear(dense, s, alpha, t, u, svt, token_mode, token_fraction)
        _set_module(model, name, layer)
        out[name] = layer
    return out


def _as_linear(mod: RSparseLinear) -> nn.Linear:
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
    lin.weight = mod.weight
    if mod.bias is not None:
        lin.bias = mod.bias
    return lin


def remove_sparsity(model: nn.Module) -> int:
    """Put the dense linears back (the weights were shared, nothing is copied); returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, RSparseLinear)]
    for n in names:
        _set_module(model, n, _as_linear(model.get_submodule(n)))
    return len(names)


def uniform_plan(shapes: Mapping[str, Tuple[int, int]], s: float, alpha: float) -> Plan:
    return {n: (s, alpha) for n in shapes}


def perturbed_seed(seed: int, *parts: object) -> int:
    return random.Random(f"{seed}|" + "|".join(map(str, parts))).getrandbits(63)
