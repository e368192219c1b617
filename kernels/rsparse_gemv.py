"""R-Sparse decode GEMV: input-channel-sparse W x plus a low-rank term, as Triton kernels (and a reference).

R-Sparse (Zhang et al., "R-Sparse: Rank-Aware Activation Sparsity for Efficient LLM Inference", ICLR 2025,
arXiv 2504.19449; numerics from the official ``models/modeling_llama.py::R_Sparse_Linear``) replaces one
linear layer y = W x (W: out x in) by

    m_j = 1[ |x_j| * scale_j > t ]                 scale_j = ||W[:, j]||_2 (column norm of W)
    y   = W (x * m) + U_r ( Vs (x * (1 - m)) )      W = U S V^T,  Vs = (V_r diag(S_r))^T  (r x in)

so the large-magnitude channels go through the exact weight columns and the rest through a rank-r SVD of
W. With no low-rank term and no scale this is TEAL's ``y = W (x * 1[|x| > t])`` (R-Sparse's alpha = 1
mode). In this module the mask uses ``scale`` whenever one is passed (``scale=None``: plain |x|), and the
low-rank term is present when ``u`` and ``vs`` are. For a batch of B decode rows (1..16) every row has
its own mask: the W rows loaded are the union of the rows' active channels, but each row is multiplied
by its own masked x, so the result is exactly the per-row math.

Weight storage (what makes skipping pay)
----------------------------------------
* ``wt`` = W^T contiguous, shape (in, out) -- "W column-major", as the paper asks (Sec. 3.4) and as TEAL
  and CATS store it: input channel j is one contiguous row of ``out`` elements, so an inactive channel is
  a contiguous run of memory that is never fetched.
* ``u`` (out, r) and ``vs`` (r, in) in the same dtype as W. ``vs`` is best stored column-major too, i.e.
  as the transposed view of a contiguous (in, r) tensor (``prepare_rsparse_weight`` does this): the
  low-rank term only reads the channels that the sparse part skipped, and each is then one contiguous
  row of r elements. Any strides work; only the bytes skipped differ. Ranks that are multiples of 16
  let the factor loads vectorise (``rsparse_allocation(..., rank_multiple=16)``).
* ``scale`` (in,) in any float dtype (fp32 from ``prepare_rsparse_weight``; it is tiny).

Kernels and launch count
------------------------
Kernel A (only with a low-rank term), grid (in / BLOCK_KA, r / BLOCK_R): computes the mask once per
(row, channel), writes the masked input x*m (fp32) for kernel B, and adds its share of
z = Vs (x * (1 - m)) (B x r, fp32) with atomics. It loads Vs only for channels that are inactive in at
least one row.

Kernel B, grid (out / BLOCK_N, in / BLOCK_K): single-shot split-K masked GEMV over W^T (TEAL's design,
the fastest one measured on an H100 in the notes: many CTAs, one BLOCK_K x BLOCK_N tile each, no K loop).
Row loads of W^T are masked by the union mask so inactive channels generate no memory traffic, W is
loaded with evict_first (it is streamed once), partial sums are fp32 and are atomically added into an
fp32 accumulator. The programs of the first input-channel blocks (dispatched first) also add
U[n_block, r_chunk] @ z[r_chunk] for their output block, one rank chunk of BLOCK_RE each: the low-rank
epilogue, fused, so U costs no extra launch and is read by many programs in parallel.
Without a low-rank term, kernel B computes the mask itself from x, scale and t.

Accumulator handling, ``reduction=``:
* "ticket" (default): a per-shape workspace (fp32 accumulator, z, counters) that the kernels leave zeroed
  behind them, so nothing needs a memset. After its atomics, each program takes a ticket from its output
  block's counter; the last of the block's in/BLOCK_K programs reads the finished fp32 sums, writes them
  in the output dtype, re-zeroes them and resets the counter (galore_step.py's serial split-K fix-up,
  with the cast fused). The last program to read z zeroes it. Launches: 1 (TEAL) or 2 (R-Sparse), with
  no memset and no cast kernel -- at 10-40 us per GEMV on an H100, a launch of a few us matters.
* "memset": fresh zeroed fp32 buffers per call (one memset), the kernels, then a cast unless the result
  is fp32 and ``out`` is not given (the fp32 buffer is returned as is). Launches: 2-3 (TEAL),
  3-4 (R-Sparse). Simpler, and what the benchmark compares "ticket" against.
The ticket workspace is shared by all calls of one (device, B, in, out, r): calls of the same shape must
not run concurrently on different streams (sequential calls, and calls inside one CUDA graph, are fine).
It is created by the first eager call of a shape; a shape first seen during CUDA-graph capture falls back
to "memset" in that graph, with a warning (a workspace zeroed by a captured kernel would only be zero
after the first replay).

Batch rows: for B <= 3 (or mixed dtypes) the per-row products are CUDA-core FMAs; for B >= 4 with x and W
in the same 16-bit dtype, kernel B uses a 16-row tl.dot (exact: x*m is x or 0, representable in W's
dtype). Block sizes come from ``_pick_config`` (B = 1: BLOCK_K 128, BLOCK_N 64, 4 warps, the best of
nine configs measured in the notes on all three Llama-7B shapes); ``config=`` overrides them.

Against TEAL's kernel (FasterDecoding/TEAL ``kernels/sparse_gemv.py``), point by point
--------------------------------------------------------------------------------------
* Grid: both single-shot split-K, many CTAs, one tile each, no K loop (TEAL's design; a looped few-CTA variant
  measured 0.57-0.96x of dense on an H100 in the notes). TEAL autotunes BLOCK_M 8-128 x BLOCK_N 16-512 per shape
  with triton.autotune; here ``tune_config`` times BLOCK_K 64-256 x BLOCK_N 32-512 per shape *and kept fraction*
  (time follows the active rows), host-side and cached, because triton.autotune's repeated launches would replay
  the self-zeroing ticket workspace and the z handoff between the two kernels. ``RSparseLinear.decode_layout()``
  tunes each layer's one-row tile on CUDA; ``_pick_config``'s heuristic serves batches and untuned calls.
* Mask: both compute |x| > t in the kernel from x (TEAL: fp16 x; here any float dtype, fp32 compare); R-Sparse
  adds the column-norm scale. Inactive rows of W^T are masked loads in both: no traffic, but the program still
  runs -- time follows active bytes only where the load latency, not the per-program fixed cost, dominates.
  The second design here (``rsparse_compact``, ``config={"design": "compact"}``) goes further than TEAL: the mask
  is computed once per channel block and the active channels are compacted (a prefix sum) before any weight row
  streams, and each program then loops over active rows only, so its work follows the active count; the tuner
  times both designs.
* Accumulation: TEAL adds fp16 partial sums atomically into a zeroed fp16 output (a memset launch and fp16
  rounding per add); here fp32 atomics into a self-zeroing workspace with a per-output-block ticket that casts
  once (no memset launch), or "memset".
* Low-rank term: TEAL has none. Here kernel A (z = Vs (x * (1 - m))) is a second launch; U z is fused into kernel
  B's first programs. In the compacted design, the launch that compacts the mask also computes z (per channel
  block, no atomics), so the low-rank term costs no launch of its own there either. (Computing z in the producer,
  the RMSNorm before the projection, would save the second launch; not built: it needs the norm's kernel.)
* Fusion across projections: TEAL's gpt-fast integration fuses q/k/v (one W^T of their concatenated outputs, one
  threshold, as their inputs and sparsities are equal); so does ``llmx.sparse.rsparse.fuse_shared_inputs`` for
  q/k/v and gate/up whenever they share one mask (TEAL, equal thresholds). R-Sparse's projections each have their
  own column-norm mask, threshold and low-rank term: ``fuse_shared_inputs`` runs them as segments of one call of
  the compacted kernels (per-segment scale row, threshold and rank), which TEAL's single-mask fusion cannot do.
* Batch: TEAL handles one row only (its issue 12); here 1-16 rows, each with its own mask (union loads).
* Integration: TEAL's speed-ups come from gpt-fast with torch.compile; here the layer (``RSparseLinear``) calls the
  kernel as the operator ``llmx::rsparse_gemv`` and ``llmx.sparse.evaluate.decode_speed`` compiles the HF decode
  step whole (CUDA graphs), so the same path serves the recipes and the benchmark.

Running without a GPU: with TRITON_INTERPRET=1 set before this module is imported, the kernels run on
CPU tensors in Triton's interpreter. Its bf16 arithmetic is wrong, so every load is cast to fp32 at once
and bf16 stores round to nearest-even by hand (the interpreter's own cast truncates).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace

import torch

from ._common import INTERPRET as _INTERPRET
from ._common import tl, triton, triton_available

__all__ = ["rsparse_reference", "rsparse_gemv", "rsparse_available", "rsparse_allocation", "calibrate_threshold",
           "prepare_rsparse_weight", "tune_config", "tile_candidates", "tile_of", "config_of", "fastest",
           "kept_fraction", "REDUCTIONS", "MAX_ROWS"]

REDUCTIONS = ("ticket", "memset")
MAX_ROWS = 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# argument checks, allocation helpers
# ----------------------------------------------------------------------------------------------------


def _check_args(x, wt, scale, u, vs):
    """Returns (rows, K, N, R); R = 0 means no low-rank term."""
    if wt.dim() != 2:
        raise ValueError(f"wt must be W^T of shape (in, out), got {tuple(wt.shape)}")
    k, n = wt.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., in={k}), got {tuple(x.shape)}")
    rows = x.numel() // k if k else 0
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x must hold 1..{MAX_ROWS} rows (decode), got {rows}")
    for name, t in (("x", x), ("wt", wt), ("scale", scale), ("u", u), ("vs", vs)):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device != wt.device:
            raise ValueError(f"{name} is on {t.device} but wt is on {wt.device}")
    if scale is not None and tuple(scale.shape) != (k,):
        raise ValueError(f"scale must have shape (in,) = ({k},), got {tuple(scale.shape)}")
    if (u is None) != (vs is None):
        raise ValueError("pass both u and vs for the low-rank term, or neither")
    r = 0
    if u is not None:
        if u.dim() != 2 or vs.dim() != 2 or u.shape[0] != n or vs.shape[1] != k or u.shape[1] != vs.shape[0]:
            raise ValueError(f"u must be (out, r) and vs (r, in) with out={n}, in={k}; got {tuple(u.shape)} and "
                             f"{tuple(vs.shape)}")
        r = u.shape[1]
    return rows, k, n, r


def _threshold32(threshold) -> float:
    # The kernels compare in fp32, so the reference compares against the same fp32-rounded value.
    if isinstance(threshold, torch.Tensor):
        raise TypeError("threshold must be a Python number (a tensor would need a device sync to read)")
    return float(torch.tensor(float(threshold), dtype=torch.float32))


def rsparse_allocation(in_features: int, out_features: int, sparsity: float, alpha: float, *,
                       rank_multiple: int = 1) -> tuple[float, int]:
    """The paper's per-layer budget split (official ``utils/setup.py::set_threshold_r_sparse``).

    A layer at sparsity s may read a fraction (1 - s) of W's in*out weights; a share alpha of that goes to
    exact columns and 1 - alpha to the rank-r factors, whose r*(in + out) weights cost the same:
    returns (fraction of channels kept in the sparse part = (1 - s) * alpha,
             r = floor(in * out * (1 - s) * (1 - alpha) / (in + out)), rounded down to ``rank_multiple``).
    ``rank_multiple=16`` is what the kernels want: Triton specialises integer arguments divisible by 16,
    and only then are the rows of U (out, r) and of column-major Vs aligned for 16-byte vector loads
    (checked in the sm_90 PTX: scalar 2-byte loads otherwise). It stays within the budget.
    """
    from llmx.sparse.rsparse import rank_for

    if not (0.0 <= sparsity <= 1.0 and 0.0 <= alpha <= 1.0):
        raise ValueError(f"sparsity and alpha must lie in [0, 1], got {sparsity}, {alpha}")
    keep = (1.0 - sparsity) * alpha
    return keep, rank_for(in_features, out_features, sparsity, alpha) // rank_multiple * rank_multiple


@torch.no_grad()
def calibrate_threshold(x: torch.Tensor, scale: torch.Tensor | None, keep_fraction: float) -> float:
    """The threshold t under which a fraction ``keep_fraction`` of the entries of |x| * scale (or |x|) is kept.

    Uses the quantile of the calibration activations x (..., in), like the official code's top-k; ties
    aside, exactly round(keep_fraction * numel) entries satisfy ``|x| * scale > t``. Reads the result
    back to the host (a device sync): calibration only.
    """
    from llmx.sparse.rsparse import keep_threshold

    mag = x.detach().float().abs()
    if scale is not None:
        mag = mag * scale.float()
    return keep_threshold(mag.reshape(-1).cpu().sort().values, keep_fraction)


@torch.no_grad()
def prepare_rsparse_weight(w: torch.Tensor, rank: int, dtype: torch.dtype | None = None):
    """(wt, scale, u, vs) for a weight W (out, in) in the storage layout the kernels want.

    SVD in float64 (as the official ``prepare_low_rank_weight.py``), on W's device. wt = W^T contiguous;
    scale = column norms of W (fp32); u = U_r (out, r); vs = (V_r diag(S_r))^T as a transposed view of a
    contiguous (in, r) tensor; u, vs, wt in ``dtype`` (default W's). rank 0 gives u = vs = None.
    """
    dtype = dtype or w.dtype
    w64 = w.detach().double()
    scale = w64.norm(dim=0).float()
    wt = w.detach().t().to(dtype).contiguous()
    if rank <= 0:
        return wt, scale, None, None
    uu, s, vh = torch.linalg.svd(w64, full_matrices=False)
    u = uu[:, :rank].to(dtype).contiguous()
    vs = (vh[:rank].T * s[:rank]).to(dtype).contiguous().t()  # (r, in) view of (in, r) storage
    return wt, scale, u, vs


# ----------------------------------------------------------------------------------------------------
# reference (CPU path and test oracle)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def rsparse_reference(x, wt, scale, threshold, u=None, vs=None):
    """The R-Sparse (or, without u/vs, TEAL) layer in plain PyTorch: fp32 math, result in x's dtype.

    x (..., in) with 1..16 rows, wt = W^T (in, out), scale (in,) or None, threshold a number,
    u (out, r) and vs (r, in) or None. Returns (..., out).
    """
    rows, k, n, r = _check_args(x, wt, scale, u, vs)
    t = _threshold32(threshold)
    xf = x.reshape(rows, k).float()
    mag = xf.abs() * scale.float() if scale is not None else xf.abs()
    keep = mag > t
    xm = torch.where(keep, xf, torch.zeros_like(xf))
    y = xm @ wt.float()
    if r:
        xl = torch.where(keep, torch.zeros_like(xf), xf)
        y = y + (xl @ vs.float().t()) @ u.float().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


def rsparse_available(device) -> bool:
    """Whether rsparse_gemv can run on ``device``: CUDA with Triton, or CPU in the interpreter."""
    return triton_available(device)


if triton is not None:

    @triton.jit
    def _rne_bf16(x):
        # fp32 -> nearest bf16 (ties to even), still fp32: the interpreter's own cast truncates.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _to_storage(x, ptr, INTERPRET: tl.constexpr):
        if ptr.dtype.element_ty == tl.bfloat16:
            if INTERPRET:
                x = _rne_bf16(x)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _split_mask(x_ptr, scale_ptr, rows, offs_k, B, K, threshold, stride_xb, stride_xk,
                    HAS_SCALE: tl.constexpr):
        """(x*m, x*(1-m)) for a (BLOCK_B, BLOCK_K) tile, fp32; rows >= B and channels >= K are zeros."""
        ld = (rows[:, None] < B) & (offs_k[None, :] < K)
        # x is reused by every output block of this channel block: keep it in cache.
        x = tl.load(x_ptr + rows[:, None] * stride_xb + offs_k[None, :] * stride_xk, mask=ld, other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        mag = tl.abs(x)
        if HAS_SCALE:
            s = tl.load(scale_ptr + offs_k, mask=offs_k < K, other=0.0, eviction_policy="evict_last")
            mag = mag * s.to(tl.float32)[None, :]
        keep = mag > threshold
        return tl.where(keep, x, 0.0), tl.where(keep, 0.0, x)

    @triton.jit
    def _row(tile, rows, b):
        # Row b of a small (BLOCK_B, X) register tile as an (X,) vector (adding zeros is exact).
        return tl.sum(tl.where(rows[:, None] == b, tile, 0.0), axis=0)

    @triton.jit
    def _rsparse_lowrank_kernel(
        x_ptr, scale_ptr, vs_ptr, xm_ptr, z_ptr,
        K, R, threshold,
        stride_xb, stride_xk, stride_vr, stride_vk,
        B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_SCALE: tl.constexpr,
    ):
        """Kernel A: mask once, write x*m (B x K fp32), z += Vs[:, k_block] (x*(1-m))[k_block] (B x R fp32)."""
        pid_k = tl.program_id(0)
        pid_r = tl.program_id(1)
        rows = tl.arange(0, BLOCK_B)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        xm, xl = _split_mask(x_ptr, scale_ptr, rows, offs_k, B, K, threshold, stride_xb, stride_xk, HAS_SCALE)
        if pid_r == 0:
            tl.store(xm_ptr + rows[:, None] * K + offs_k[None, :], xm, mask=(rows[:, None] < B) & (offs_k[None, :] < K))
        # Vs rows of channels that every row keeps exactly are never read.
        low = tl.max(tl.where(xl != 0.0, 1, 0), axis=0) > 0
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        v = tl.load(vs_ptr + offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                    mask=low[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_R)
        for b in tl.static_range(B):
            zb = tl.sum(_row(xl, rows, b)[:, None] * v, axis=0)
            tl.atomic_add(z_ptr + b * R + offs_r, zb, mask=r_ok, sem="relaxed")

    @triton.jit
    def _rsparse_gemv_kernel(
        x_ptr, scale_ptr, wt_ptr, u_ptr, z_ptr, xm_ptr, out_ptr, acc_ptr, cnt_ptr,
        K, N, R, threshold,
        stride_xb, stride_xk, stride_wk, stride_wn, stride_un, stride_ur, stride_ob, stride_on,
        B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LR: tl.constexpr, TICKET: tl.constexpr,
        USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Kernel B: acc[:, n_block] += (x*m)[:, k_block] @ W^T[k_block, n_block] (+ a chunk of U[n_block] @ z)."""
        pid_n = tl.program_id(0)  # fastest-varying: the small-pid_k programs (low-rank epilogue) start first
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_B)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if B == 1:
            # One row, as a (BLOCK_K, 1) column that broadcasts against the W tile as it is (no per-row
            # extraction from a (BLOCK_B, BLOCK_K) tile as below).
            kk = offs_k[:, None] < K
            if HAS_LR:  # kernel A did the compare; read its x*m
                xv = tl.load(xm_ptr + offs_k[:, None], mask=kk, other=0.0)
            else:
                xv = tl.load(x_ptr + offs_k[:, None] * stride_xk, mask=kk, other=0.0, eviction_policy="evict_last")
                xv = xv.to(tl.float32)
                mag = tl.abs(xv)
                if HAS_SCALE:
                    mag = mag * tl.load(scale_ptr + offs_k[:, None], mask=kk, other=0.0,
                                        eviction_policy="evict_last").to(tl.float32)
                xv = tl.where(mag > threshold, xv, 0.0)
            active = xv != 0.0  # (BLOCK_K, 1); a zero x*m contributes nothing, so skipping it is exact
        else:
            if HAS_LR:
                xm = tl.load(xm_ptr + rows[:, None] * K + offs_k[None, :],
                             mask=(rows[:, None] < B) & (offs_k[None, :] < K), other=0.0)
            else:
                xm, _ = _split_mask(x_ptr, scale_ptr, rows, offs_k, B, K, threshold, stride_xb, stride_xk, HAS_SCALE)
            # Union of the rows' active channels.
            active = tl.max(tl.where(xm != 0.0, 1, 0), axis=0) > 0
            active = active[:, None]
        # Masked-off rows of W^T are never fetched: this is where the sparsity turns into saved bandwidth.
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=active & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        if B == 1:
            acc = tl.sum(xv * w.to(tl.float32), axis=0)[None, :]
        elif USE_DOT:
            if DOT_F32:
                acc = tl.dot(xm, w.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(xm.to(w.dtype), w)  # exact: x*m is x or 0, and x has W's 16-bit dtype
        else:
            wf = w.to(tl.float32)
            acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for b in tl.static_range(B):
                yb = tl.sum(_row(xm, rows, b)[:, None] * wf, axis=0)
                acc += tl.where(rows[:, None] == b, yb[None, :], 0.0)
        # Low-rank epilogue, spread over the first input-channel blocks: program (pid_n, pid_k) adds
        # U[n_block, r_chunk] @ z[:, r_chunk] for the rank chunks pid_k, pid_k + num_k, ... (one chunk each
        # unless r > num_k * BLOCK_R), so U is read by many programs in parallel rather than in a serial loop.
        num_k = tl.num_programs(1)
        if HAS_LR:
            if pid_k * BLOCK_R < R:
                for r0 in range(pid_k * BLOCK_R, R, num_k * BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    r_ok = offs_r < R
                    uu = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                                 mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_R)
                    for b in tl.static_range(B):
                        zb = tl.load(z_ptr + b * R + offs_r, mask=r_ok, other=0.0)
                        yb = tl.sum(uu * zb[None, :], axis=1)
                        acc += tl.where(rows[:, None] == b, yb[None, :], 0.0)
        o_ok = (rows[:, None] < B) & n_ok[None, :]
        acc_ptrs = acc_ptr + rows[:, None] * N + offs_n[None, :]
        tl.atomic_add(acc_ptrs, acc, mask=o_ok, sem="relaxed")
        if TICKET:
            # Every thread's atomics (and z reads) precede the ticket (release); the last program of the
            # output block sees all partial sums after it (acquire): serial split-K fix-up.
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + 1 + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == num_k - 1:
                y = tl.load(acc_ptrs, mask=o_ok, other=0.0, cache_modifier=".cg")  # .cg: other SMs added these
                tl.store(out_ptr + rows[:, None] * stride_ob + offs_n[None, :] * stride_on,
                         _to_storage(y, out_ptr, INTERPRET), mask=o_ok)
                # Leave the workspace as the next call expects it: zeros, counter reset.
                tl.store(acc_ptrs, tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), mask=o_ok)
                tl.atomic_xchg(cnt_ptr + 1 + pid_n, 0, sem="relaxed")
            if HAS_LR:
                if pid_k * BLOCK_R < R:
                    # The last of the z readers zeroes z for kernel A of the next call.
                    zt = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
                    if zt == tl.num_programs(0) * tl.minimum(num_k, tl.cdiv(R, BLOCK_R)) - 1:
                        for r0 in range(0, R, BLOCK_R):
                            offs_r = r0 + tl.arange(0, BLOCK_R)
                            tl.store(z_ptr + rows[:, None] * R + offs_r[None, :],
                                     tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32),
                                     mask=(rows[:, None] < B) & (offs_r[None, :] < R))
                        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_k: int  # kernel B: input channels per program
    block_n: int  # kernel B: outputs per program
    num_warps: int
    dot: bool  # kernel B: 16-row tl.dot instead of per-row FMAs
    block_ka: int  # kernel A: input channels per program
    block_r: int  # kernel A: ranks per program
    num_warps_a: int
    block_re: int  # kernel B: rank chunk of the low-rank epilogue (<= 32 keeps it within the GEMV's registers)


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _pick_config(k: int, n: int, rows: int, r: int, same_16bit: bool) -> _Config:
    """Heuristic tiles. B = 1: (128, 64, 4 warps), best of 9 configs on all three Llama-7B shapes (notes,
    H100). B > 1: untuned starting points (scripts/bench_rsparse_kernels.py --sweep can measure others)."""
    block_r = max(8, min(64, _pow2(max(r, 1))))
    # A 64 x 64 fp32 chunk of U took kernel B from 93 to 167 registers (sm_90, B = 1); 32 stays at 96.
    block_re = min(block_r, 32)
    if _INTERPRET:
        # Small tiles so that test shapes of a few dozen channels cross block edges in every dimension.
        return _Config(32, 32, 1, False, 32, min(block_r, 16), 1, min(block_r, 16))
    block_ka = 64 if k <= 8192 else 128  # ~64-200 programs: z atomics stay uncontended enough
    if rows == 1:
        return _Config(128, 64, 4, False, block_ka, block_r, 4, block_re)
    if rows >= 4 and same_16bit:
        return _Config(64, 64, 4, True, block_ka, block_r, 4, block_re)
    return _Config(64, 64, 4, False, block_ka, block_r, 4, block_re)


_WORKSPACES: dict = {}


def _workspace(device, rows: int, k: int, n: int, r: int):
    """Zero-initialised once; the ticket kernels leave it zeroed (see the module doc)."""
    key = (device, rows, k, n, r)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = dict(acc=torch.zeros(rows, n, device=device, dtype=torch.float32),
                  z=torch.zeros(rows, max(r, 1), device=device, dtype=torch.float32),
                  # [0]: z readers; [1 + i]: output block i (sized for the smallest BLOCK_N, 16)
                  cnt=torch.zeros(triton.cdiv(n, 16) + 1, device=device, dtype=torch.int32),
                  xm=torch.empty(rows, k, device=device, dtype=torch.float32))
        _WORKSPACES[key] = ws
    return ws


def _check_int32_offsets(name: str, t: torch.Tensor) -> None:
    # The kernels index with 32-bit offsets (int64 would cost registers for no layer that occurs in practice).
    span = sum((sz - 1) * abs(st) for sz, st in zip(t.shape, t.stride()))
    if span >= 2**31:
        raise ValueError(f"{name} spans {span} elements; the kernels support up to 2**31 - 1")


@torch.no_grad()
def rsparse_gemv(x, wt, scale, threshold, u=None, vs=None, *, out=None, reduction: str = "ticket",
                 config: dict | None = None):
    """rsparse_reference's layer with the Triton kernels (CUDA, or CPU tensors in the interpreter).

    x (..., in) with 1..16 rows; wt = W^T (in, out), best contiguous; scale (in,) or None; threshold a
    Python number (t = -1 keeps every channel, inf none); u (out, r) and vs (r, in) or both None.
    Returns (..., out) in x's dtype, or writes ``out`` (a tensor of that shape, any float dtype) and
    returns it. ``reduction``: "ticket" (default, 1 or 2 launches) or "memset" (see the module doc).
    ``config`` overrides fields of the tile heuristic (block_k, block_n, num_warps, dot, block_ka, block_r,
    num_warps_a, block_re); with ``design="compact"`` the call runs ``rsparse_compact``'s two kernels instead
    (its own tile fields; ``reduction`` does not apply). Graph-capturable: no host syncs, fixed launch sequence.
    """
    rows, k, n, r = _check_args(x, wt, scale, u, vs)
    if config and config.get("design", "split") != "split":
        if config["design"] != "compact":
            raise ValueError(f"config design={config['design']!r}; valid: split, compact")
        from .rsparse_compact import rsparse_gemv_compact

        return rsparse_gemv_compact(x, wt, scale, [threshold], u.contiguous() if r else None, vs.t() if r else None,
                                    ranks=[r], out=out, config=config)
    config = {key: v for key, v in (config or {}).items() if key != "design"}
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not rsparse_available(wt.device):
        raise RuntimeError(f"rsparse_gemv needs a CUDA device with Triton, or TRITON_INTERPRET=1 set before "
                           f"importing {__name__} (for CPU tensors); got device {wt.device}")
    for name, t in (("x", x), ("wt", wt), ("u", u), ("vs", vs)):
        if t is not None:
            _check_int32_offsets(name, t)
    t32 = _threshold32(threshold)
    out_shape = (*x.shape[:-1], n)
    if out is not None:
        if tuple(out.shape) != out_shape or out.device != wt.device or out.dtype not in _DTYPES:
            raise ValueError(f"out must be a float tensor of shape {out_shape} on {wt.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
    x2 = x.reshape(rows, k)
    has_lr = r > 0
    cfg = _pick_config(k, n, rows, r, x.dtype == wt.dtype and x.dtype != torch.float32)
    if config:
        cfg = replace(cfg, **config)
        sizes = (cfg.block_k, cfg.block_n, cfg.block_ka, cfg.block_r, cfg.block_re)
        if any(v < 1 or v & (v - 1) for v in sizes) or cfg.block_n < 16 or (cfg.dot and cfg.block_k < 16):
            raise ValueError(f"block sizes must be powers of two, block_n >= 16 (the ticket counters are sized "
                             f"for it) and block_k >= 16 with dot; got {cfg}")
    use_dot = cfg.dot and rows > 1  # one row has its own path in kernel B
    block_b = max(16, _pow2(rows)) if use_dot else _pow2(rows)
    dot_f32 = _INTERPRET or x.dtype != wt.dtype or wt.dtype == torch.float32

    guard = torch.cuda.device(wt.device) if wt.device.type == "cuda" else contextlib.nullcontext()
    if reduction == "ticket" and (wt.device, rows, k, n, r) not in _WORKSPACES and wt.device.type == "cuda" \
            and torch.cuda.is_current_stream_capturing():
        # A workspace made during capture would only be zeroed when the graph replays (captured kernels do
        # not run at capture time): an eager call before the first replay would read garbage.
        warnings.warn(f"rsparse_gemv: no ticket workspace for (rows={rows}, in={k}, out={n}, r={r}) yet and the "
                      "stream is capturing a CUDA graph; using reduction='memset' in this graph. Call once eagerly "
                      "before capture to get the ticket path.", stacklevel=2)
        reduction = "memset"
    with guard:
        if reduction == "ticket":
            ws = _workspace(wt.device, rows, k, n, r)
            acc, z, cnt, xm = ws["acc"], ws["z"], ws["cnt"], ws["xm"]
            # The last program of each output block writes the result itself, in its final dtype.
            direct = out is not None and out.is_contiguous()
            y = out.view(rows, n) if direct else \
                torch.empty(rows, n, device=wt.device, dtype=out.dtype if out is not None else x.dtype)
        else:
            buf = torch.zeros(rows * n + rows * max(r, 1), device=wt.device, dtype=torch.float32)
            acc, z = buf[: rows * n].view(rows, n), buf[rows * n:].view(rows, max(r, 1))
            xm = torch.empty(rows, k, device=wt.device, dtype=torch.float32) if has_lr else acc
            cnt = y = acc  # unused by the kernel
        if has_lr:
            grid_a = (triton.cdiv(k, cfg.block_ka), triton.cdiv(r, cfg.block_r))
            _rsparse_lowrank_kernel[grid_a](
                x2, scale if scale is not None else x2, vs, xm, z,
                k, r, t32,
                x2.stride(0), x2.stride(1), vs.stride(0), vs.stride(1),
                B=rows, BLOCK_B=_pow2(rows), BLOCK_K=cfg.block_ka, BLOCK_R=cfg.block_r,
                HAS_SCALE=scale is not None, num_warps=cfg.num_warps_a,
            )
        grid_b = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
        _rsparse_gemv_kernel[grid_b](
            x2, scale if scale is not None else x2, wt, u if has_lr else wt, z, xm, y, acc, cnt,
            k, n, r, t32,
            x2.stride(0), x2.stride(1), wt.stride(0), wt.stride(1),
            u.stride(0) if has_lr else 0, u.stride(1) if has_lr else 0, y.stride(0), y.stride(1),
            B=rows, BLOCK_B=block_b, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_re,
            HAS_SCALE=scale is not None, HAS_LR=has_lr, TICKET=reduction == "ticket",
            USE_DOT=use_dot, DOT_F32=dot_f32, INTERPRET=_INTERPRET, num_warps=cfg.num_warps,
        )
    if reduction == "ticket":
        if out is None:
            return y.view(out_shape)
        if not direct:
            out.copy_(y.view(out_shape))
        return out
    # memset: the fp32 sums are the result, or get cast
    if out is not None:
        out.copy_(acc.view(out_shape))
        return out
    if x.dtype == torch.float32:
        return acc.view(out_shape)
    return acc.to(x.dtype).view(out_shape)


# ----------------------------------------------------------------------------------------------------
# tuning per shape and sparsity
# ----------------------------------------------------------------------------------------------------

_TUNED: dict = {}


def tile_of(config: dict) -> list:
    """A tuned config as a list of ints (what the ``llmx::rsparse_gemv`` operator carries): split [0, block_k,
    block_n, num_warps]; compact [1, block_p, block_k, block_n, split, num_warps]."""
    if config.get("design", "split") == "split":
        return [0, config["block_k"], config["block_n"], config["num_warps"]]
    return [1, config["block_p"], config["block_k"], config["block_n"], config["split"], config["num_warps"]]


def config_of(tile) -> dict:
    """The inverse of ``tile_of``."""
    if tile[0] == 0:
        return dict(design="split", block_k=tile[1], block_n=tile[2], num_warps=tile[3])
    return dict(design="compact", block_p=tile[1], block_k=tile[2], block_n=tile[3], split=tile[4], num_warps=tile[5])


def tile_candidates(n: int | None = None) -> list:
    """Tiles tried by ``tune_config``. Split design: BLOCK_K 64-256 x BLOCK_N 32-512 (TEAL's range of BLOCK_N), at
    most 32K weights a program, with 4 or 8 warps for the larger ones (none that spills registers on sm_90); with
    ``n`` (outputs) also the compacted design's (``rsparse_compact.compact_candidates``). The interpreter gets a few
    small tiles (a test of the mechanism, not of speed)."""
    from .rsparse_compact import compact_candidates

    extra = compact_candidates(n) if n is not None else []
    if _INTERPRET:
        return [dict(design="split", block_k=32, block_n=32, num_warps=1),
                dict(design="split", block_k=16, block_n=32, num_warps=1),
                dict(design="split", block_k=32, block_n=16, num_warps=1)] + extra
    out = []
    for bk in (64, 128, 256):
        for bn in (32, 64, 128, 256, 512):
            # ptxas for sm_90 (scripts/kernel_resources.py): 32K-weight tiles spill to the stack at 4 warps, and
            # 128 x 256 at 8 warps too; 16K tiles fit in registers either way.
            if bk * bn > 32768 or (bk, bn) == (128, 256):
                continue
            warps = (8,) if bk * bn == 32768 else (4, 8) if bk * bn == 16384 else (4,)
            out += [dict(design="split", block_k=bk, block_n=bn, num_warps=w) for w in warps]
    return out + extra


def _time_call(fn, device) -> float:
    """Seconds per call: CUDA graphs and triton's do_bench on CUDA (launch overhead out), the median of five
    wall-clock calls elsewhere."""
    if device.type == "cuda":
        import triton.testing

        try:
            return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e-3
        except Exception:  # noqa: BLE001 -- a graph-unfriendly setup: plain events
            return triton.testing.do_bench(fn, warmup=5, rep=20) * 1e-3
    import time

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[2]


def fastest(key, call, candidates, tol: float) -> dict:
    """The candidate config for which ``call(config)`` is fastest, each first checked against ``call(None)`` (the
    heuristic) to ``tol``; cached under ``key`` (which must name everything the timing depends on)."""
    if key in _TUNED:
        return _TUNED[key]
    ref = call(None).float()
    best, best_t = None, float("inf")
    for cand in candidates:
        y = call(cand)
        err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        if err > tol:
            raise RuntimeError(f"R-Sparse kernel with {cand} differs from the heuristic's tile by {err:.2e}")
        t = _time_call(lambda: call(cand), ref.device)
        if t < best_t:
            best, best_t = cand, t
    _TUNED[key] = best
    return best


def kept_fraction(x, scale, threshold) -> float:
    """Share of (row, channel) entries the mask keeps; one device sync (tuning and bookkeeping only)."""
    mag = x.float().abs() * (scale.float() if scale is not None else 1.0)
    return float((mag > _threshold32(threshold)).float().mean())


@torch.no_grad()
def tune_config(x, wt, scale, threshold, u=None, vs=None, *, candidates=None) -> dict:
    """The fastest tile for this layer, shape and sparsity, over both designs (``tile_candidates``): each checked
    against the heuristic's result, then timed; cached by (device, rows, in, out, r, mask kind, dtype, kept fraction
    to 0.05), so layers of one shape and sparsity tune once. Returns ``config`` for rsparse_gemv (``tile_of`` turns
    it into the operator's ints). Call eagerly (not during graph capture): it launches every candidate."""
    rows, k, n, r = _check_args(x, wt, scale, u, vs)
    key = (str(wt.device), torch.cuda.get_device_name(wt.device) if wt.is_cuda else "", rows, k, n, r,
           scale is not None, wt.dtype, round(kept_fraction(x, scale, threshold) * 20) / 20)
    tol = 1e-5 if x.dtype == torch.float32 and wt.dtype == torch.float32 else 1e-2
    return fastest(key, lambda cfg: rsparse_gemv(x, wt, scale, threshold, u, vs, config=cfg),
                   candidates or tile_candidates(n), tol)
