"""One GaLore-Adam step for one 2-D weight, as two fused Triton GEMMs (plus a plain PyTorch reference).

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
arXiv 2403.03507, Algorithm 1) keeps Adam's moments in a rank-r subspace: the gradient G (m x n) is
projected down with an orthonormal basis P, Adam runs on the small matrix, and the normalised update is
projected back up. With side "left" (P is m x r) the low-rank gradient is P^T G (r x n); with side
"right" (P is r x n) it is G P^T (m x r). The order of operations below is galore-torch's AdamW, so
that the two agree to rounding:

    low = P^T G | G P^T;  M = b1 M + (1-b1) low;  V = b2 V + (1-b2) low^2
    N   = M / (sqrt(V) + eps)            (from the moments as stored, i.e. rounded to their dtype)
    W   = W - lr sqrt(1-b2^t)/(1-b1^t) * scale * (P N | N P)
    W   = W - lr wd W                    (decoupled decay after the update, as galore-torch does it)

What is fused, and why
----------------------
Unfused (galore-torch), a step is two GEMMs plus about seven element-wise passes over the low-rank
moments and three over m x n tensors (scaling the projected-back update, adding it to W, decaying W),
with the m x n update itself written and read back. The m x n traffic dominates. So:

* Kernel 1, down-projection + moments: the GEMM ``low = P^T G`` (or ``G P^T``) with the Adam update in
  its epilogue. Each output tile reads its M and V tiles once, writes them once, and writes the
  normalised update N (fp32, or bf16 when the up-projection would round it to bf16 anyway). The
  low-rank gradient itself never reaches memory.
* Kernel 2, up-projection + weight update: the GEMM ``U = P N`` (or ``N P``) with
  ``W <- (W - alpha U) - lr wd (W - alpha U)`` in its epilogue: W is read once and written once, and U
  never reaches memory.

Tiling. The down-projection is "fat/skinny": its output has only r rows (or r columns) while its
reduction runs over a weight dimension (4096 for a 7B model's 4096 x 11008 matrices: galore-torch
projects the longer side away, so K is the shorter one). Each program loops over
K in BLOCK_K steps with an fp32 accumulator (a pipelined K loop; the reduction never leaves registers).
When there are fewer output tiles than SMs (small r: 4096 x 4096 at r = 128 has 32 tiles of 128 x 128
for 132 SMs), the K range is split over SPLIT_K programs per tile ("serial split-K"): each writes its
fp32 partial to a workspace, takes a ticket from a per-tile counter, and the program that arrives last
sums the partials *in split order* (so results do not depend on scheduling) and runs the moment
epilogue. The epilogue is not linear in ``low``, so split-K needs this fix-up; atomically accumulating
the partials instead would be non-deterministic and would need a second pass anyway. The
up-projection has a short reduction (r) and m x n outputs, so it is a plain tiled GEMM with grouped
(L2-friendly) tile order. Tile sizes are starting points for an H100 and have not been tuned on one
yet (see ``_tiles``); ``split_k`` can be forced per call.

Precision. ``precision`` picks the tl.dot input precision: "ieee" (exact fp32 products, CUDA cores),
"tf32" (tensor cores, 10-bit mantissa), or "bf16" (operands rounded to bf16, tensor cores). Accumulation
is fp32 in every mode and all element-wise math is fp32. torchao's prototype of these kernels (deleted
from torchao in 2025) measured a relative error of about 1e-3 on exp_avg for its fused kernel with TF32
on, against about 1e-6 for a "hybrid" path with a cuBLAS down-projection: TF32 in the down-projection is
the accuracy cost, so "ieee" is the default and "tf32" / "bf16" are opt-in. One exception: when both
operands of a GEMM already are fp16 (or both bf16), e.g. a bf16 gradient and a bf16 basis, that GEMM
uses the 16-bit tensor-core path whatever was asked, since products of such numbers are exact in fp32.

Running without a GPU: with TRITON_INTERPRET=1 set before this module is imported, the kernels run on
CPU tensors in Triton's interpreter. The interpreter cannot feed bf16 to tl.dot (it keeps bf16 as
uint16), so there "bf16" rounds the operands to bf16 and multiplies them in fp32, which is what the
tensor cores compute (products of bf16 numbers are exact in fp32) up to summation order; "tf32" runs as
exact fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from ._common import INTERPRET as _INTERPRET
from ._common import tl, triton, triton_available

__all__ = ["galore_adam_step_reference", "galore_adam_step_fused", "fused_available", "PRECISIONS"]

PRECISIONS = ("ieee", "tf32", "bf16")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# argument checks shared by both paths
# ----------------------------------------------------------------------------------------------------


def _low_rank_shape(param: torch.Tensor, basis: torch.Tensor, side: str) -> tuple[int, int]:
    m, n = param.shape
    if side == "left":
        if basis.shape[0] != m:
            raise ValueError(f"side 'left' needs a basis of shape (m, r) = ({m}, r), got {tuple(basis.shape)}")
        return basis.shape[1], n
    if basis.shape[1] != n:
        raise ValueError(f"side 'right' needs a basis of shape (r, n) = (r, {n}), got {tuple(basis.shape)}")
    return m, basis.shape[0]


def _check_args(param, grad, basis, side, exp_avg, exp_avg_sq, step) -> tuple[int, int]:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r} (full-rank and Tucker projections "
                         "use the optimizer's own path)")
    tensors = {"param": param, "grad": grad, "basis": basis, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device != param.device:
            raise ValueError(f"{name} is on {t.device} but param is on {param.device}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")
    low = _low_rank_shape(param, basis, side)
    for name in ("exp_avg", "exp_avg_sq"):
        if tuple(tensors[name].shape) != low:
            raise ValueError(f"{name} must have the low-rank shape {low} for side {side!r}, "
                             f"got {tuple(tensors[name].shape)}")
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (incremented before the update), got {step}")
    return low


def _step_size(step, lr, beta1, beta2) -> float:
    t = int(step)
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


# ----------------------------------------------------------------------------------------------------
# reference (CPU path and test oracle)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def galore_adam_step_reference(param, grad, basis, side, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
                               scale, weight_decay) -> None:
    """One GaLore-Adam step in plain PyTorch, in place on param, exp_avg and exp_avg_sq.

    All math is fp32; 16-bit tensors are upcast and the results written back in each tensor's dtype
    (param is rounded once, after update and decay).
    """
    _check_args(param, grad, basis, side, exp_avg, exp_avg_sq, step)
    f32 = torch.float32
    g, p = grad.to(f32), basis.to(f32)
    low = p.T @ g if side == "left" else g @ p.T
    m = exp_avg.to(f32) * beta1 + low * (1.0 - beta1)
    v = exp_avg_sq.to(f32) * beta2 + (low * low) * (1.0 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    # From the stored moments, as galore-torch does (identical for fp32 moments).
    n = exp_avg.to(f32) / (exp_avg_sq.to(f32).sqrt() + eps)
    u = p @ n if side == "left" else n @ p
    w = param.to(f32) - u * (_step_size(step, lr, beta1, beta2) * scale)
    if weight_decay:
        w = w - w * (lr * weight_decay)
    param.copy_(w)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


def fused_available(device) -> bool:
    """Whether galore_adam_step_fused can run on ``device``: CUDA with Triton, or CPU in the interpreter."""
    return triton_available(device)


if triton is not None:

    @triton.jit
    def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Grouped order: GROUP_M row-blocks walk the columns together, so the B panels they share stay in L2.
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m
        return pid_m, pid_n

    @triton.jit
    def _rne_bf16(x):
        # fp32 -> the nearest bf16 value (ties to even), still as fp32. Only for the interpreter, whose own
        # fp32 -> bf16 cast truncates; the GPU's cast already rounds like torch.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        if PRECISION == "bf16":
            if INTERPRET:
                # The interpreter keeps bf16 as uint16 and its dot would multiply the bit patterns.
                acc = tl.dot(_rne_bf16(a), _rne_bf16(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        elif PRECISION == "fp16":
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _gemm_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, k_lo, k_hi, stride_am, stride_ak, stride_bk, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                   INTERPRET: tl.constexpr):
        # Rows/columns past the edge wrap to valid ones (their results are masked at the store), so only
        # the K edge needs a load mask. Strides carry the transposes: no operand is ever copied.
        rm = offs_m % M
        rn = offs_n % N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            rk = k + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=rk[None, :] < k_hi, other=0.0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=rk[:, None] < k_hi, other=0.0)
            # fp32 right after the load: the interpreter cannot do arithmetic on bf16, and "ieee"/"tf32"
            # want fp32 operands anyway.
            acc = _mma(a.to(tl.float32), b.to(tl.float32), acc, PRECISION, INTERPRET)
        return acc

    @triton.jit
    def _to_storage(x, ptr, INTERPRET: tl.constexpr):
        if ptr.dtype.element_ty == tl.bfloat16:
            if INTERPRET:
                x = _rne_bf16(x)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _moments_epilogue(low, offs_m, offs_n, M, N, m_ptr, stride_mm, stride_mn, v_ptr, stride_vm, stride_vn,
                          n_ptr, stride_nm, stride_nn, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                          INTERPRET: tl.constexpr):
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        m_ptrs = m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        v_ptrs = v_ptr + offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn
        m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
        # (1 - beta) comes from the host in double precision, as torch's alpha does.
        m = m * beta1 + low * one_minus_beta1
        v = v * beta2 + (low * low) * one_minus_beta2
        m_st = _to_storage(m, m_ptr, INTERPRET)
        v_st = _to_storage(v, v_ptr, INTERPRET)
        tl.store(m_ptrs, m_st, mask=mask)
        tl.store(v_ptrs, v_st, mask=mask)
        # N from the stored (rounded) moments, like galore-torch; IEEE sqrt and division for parity with torch.
        n = tl.div_rn(m_st.to(tl.float32), tl.sqrt_rn(v_st.to(tl.float32)) + eps)
        n_ptrs = n_ptr + offs_m[:, None] * stride_nm + offs_n[None, :] * stride_nn
        tl.store(n_ptrs, _to_storage(n, n_ptr, INTERPRET), mask=mask)

    @triton.jit
    def _down_proj_adam_kernel(
        a_ptr, b_ptr, m_ptr, v_ptr, n_ptr, ws_ptr, count_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn,
        stride_mm, stride_mn, stride_vm, stride_vn, stride_nm, stride_nn,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """low = A @ B (M x N, reduction K), then the Adam moment update on low; grid (tiles, SPLIT_K)."""
        tile = tl.program_id(0)
        split = tl.program_id(1)
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Splits own whole BLOCK_K steps, so only the last step of the last split meets the K edge.
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = _gemm_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, k_lo, k_hi, stride_am, stride_ak, stride_bk, stride_bn,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, INTERPRET)
        if SPLIT_K == 1:
            _moments_epilogue(acc, offs_m, offs_n, M, N, m_ptr, stride_mm, stride_mn, v_ptr, stride_vm, stride_vn,
                              n_ptr, stride_nm, stride_nn, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                              INTERPRET)
        else:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_tile + split * M * N, acc, mask=mask)
            # Every thread's partial must be written before the ticket is taken (release), and the last
            # program must see all partials after it (acquire): the classic serial split-K semaphore.
            tl.debug_barrier()
            ticket = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT_K - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                # Fixed order, whichever split came last: the result does not depend on scheduling.
                # .cg reads from L2: another SM wrote these lines.
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(ws_tile + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                _moments_epilogue(total, offs_m, offs_n, M, N, m_ptr, stride_mm, stride_mn, v_ptr, stride_vm,
                                  stride_vn, n_ptr, stride_nm, stride_nn, beta1, one_minus_beta1, beta2,
                                  one_minus_beta2, eps, INTERPRET)

    @triton.jit
    def _up_proj_update_kernel(
        a_ptr, b_ptr, w_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_wm, stride_wn,
        alpha, decay,
        APPLY_DECAY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """U = A @ B (M x N, short reduction K = r), then W <- W - alpha U, then W <- W - decay W."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        u = _gemm_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, 0, K, stride_am, stride_ak, stride_bk, stride_bn,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, INTERPRET)
        # W is loaded after the K loop rather than before, so its tile does not hold registers through it.
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        w = w - u * alpha
        if APPLY_DECAY:
            w = w - w * decay
        tl.store(w_ptrs, _to_storage(w, w_ptr, INTERPRET), mask=mask)


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def _tiles(precision: str, operand_bytes: int) -> _Tiles:
    """Tile shapes per dot precision: untuned starting points for an H100 (scripts/bench_galore.py may sweep them).

    fp32 "ieee" runs on CUDA cores, where 64 x 64 tiles keep enough programs in flight. The tensor-core
    modes use 128 x 128 tiles with 8 warps; BLOCK_K is 32 for fp32 operands (3 stages x 32 KiB of shared
    memory) and 64 for 16-bit ones (the same bytes per stage).
    """
    if _INTERPRET:
        # Small tiles so that test shapes of a few dozen rows still cross tile and K-step edges.
        return _Tiles(32, 32, 16, 1, 1)
    if precision == "ieee":
        return _Tiles(64, 64, 32, 4, 3)
    return _Tiles(128, 128, 32 if operand_bytes == 4 else 64, 8, 3)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pick_split_k(tiles: int, k_steps: int, device: torch.device) -> int:
    """Split K only when the output tiles cannot fill the SMs, and keep >= 8 BLOCK_K steps per split."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), k_steps // 8, 16))


def _dot_precision(precision: str, a: torch.Tensor, b: torch.Tensor) -> str:
    """The tl.dot mode for one GEMM: the requested one, unless both operands are already the same 16-bit type.

    A product of two fp16 (or two bf16) numbers is exact in fp32, so the 16-bit tensor-core path then
    computes what "ieee" would, up to summation order, at tensor-core speed (bf16 training with a bf16
    basis would otherwise run its down-projection on CUDA cores for nothing).
    """
    if a.dtype == b.dtype == torch.bfloat16:
        return "bf16"
    if a.dtype == b.dtype == torch.float16:
        return "fp16"
    return precision


def _check_writable(name: str, t: torch.Tensor) -> None:
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} is a broadcast (stride-0) view; the step writes it in place, so it needs its own "
                         "memory")


def _check_int32_offsets(name: str, t: torch.Tensor) -> None:
    # The kernels index with 32-bit offsets (int64 would cost registers for no case that occurs in practice).
    span = sum((sz - 1) * abs(st) for sz, st in zip(t.shape, t.stride()))
    if span >= 2**31:
        raise ValueError(f"{name} spans {span} elements; the fused kernels support up to 2**31 - 1")


@torch.no_grad()
def galore_adam_step_fused(param, grad, basis, side, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, scale,
                           weight_decay, precision: str = "ieee", split_k: int | None = None,
                           tiles: tuple | None = None) -> None:
    """galore_adam_step_reference's step as two fused Triton kernels, in place on param, exp_avg, exp_avg_sq.

    Any strides are accepted (transposed or sliced views included); broadcast views of the written tensors
    are rejected. ``split_k`` forces the down-projection's K split (default: chosen from the SM count);
    ``tiles`` = (block_m, block_n, block_k, num_warps, num_stages) forces both kernels' tiles (default:
    ``_tiles``), for scripts/bench_galore.py's sweep.
    """
    low_m, low_n = _check_args(param, grad, basis, side, exp_avg, exp_avg_sq, step)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not fused_available(param.device):
        raise RuntimeError(f"the fused GaLore step needs a CUDA device with Triton, or TRITON_INTERPRET=1 set "
                           f"before importing {__name__} (for CPU tensors); got device {param.device}")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_writable(name, t)
    for name, t in (("param", param), ("grad", grad), ("basis", basis), ("exp_avg", exp_avg),
                    ("exp_avg_sq", exp_avg_sq)):
        _check_int32_offsets(name, t)
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")

    m, n = param.shape
    # Transposed *views*: their strides do the transposition inside the kernels.
    if side == "left":  # low (r x n) = P^T (r x m) @ G (m x n); U (m x n) = P (m x r) @ N (r x n)
        down_a, down_b, k_down = basis.t(), grad, m
    else:  # low (m x r) = G (m x n) @ P^T (n x r); U (m x n) = N (m x r) @ P (r x n)
        down_a, down_b, k_down = grad, basis.t(), n
    # The up-projection rounds N to bf16 in "bf16" mode anyway, so storing it as bf16 loses nothing.
    n_buf = torch.empty((low_m, low_n), device=param.device,
                        dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    up_a, up_b = (basis, n_buf) if side == "left" else (n_buf, basis)

    down_prec, up_prec = _dot_precision(precision, grad, basis), _dot_precision(precision, basis, n_buf)
    if tiles is not None:
        down = up = _Tiles(*tiles)
    else:
        down = _tiles(down_prec, max(grad.element_size(), basis.element_size()))
        up = _tiles(up_prec, max(basis.element_size(), n_buf.element_size()))
    tiles = triton.cdiv(low_m, down.block_m) * triton.cdiv(low_n, down.block_n)
    k_steps = triton.cdiv(k_down, down.block_k)
    if split_k is None:
        split_k = _pick_split_k(tiles, k_steps, param.device)
    split_k = min(split_k, k_steps)  # no empty splits
    if split_k > 1:
        workspace = torch.empty((split_k, low_m, low_n), device=param.device, dtype=torch.float32)
        counters = torch.zeros(tiles, device=param.device, dtype=torch.int32)
    else:  # unused by the kernel; any tensor will do as the pointer
        workspace = counters = n_buf

    guard = torch.cuda.device(param.device) if param.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _down_proj_adam_kernel[(tiles, split_k)](
            down_a, down_b, exp_avg, exp_avg_sq, n_buf, workspace, counters,
            low_m, low_n, k_down,
            down_a.stride(0), down_a.stride(1), down_b.stride(0), down_b.stride(1),
            exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
            n_buf.stride(0), n_buf.stride(1),
            float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps),
            BLOCK_M=down.block_m, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=down.group_m,
            SPLIT_K=split_k, PRECISION=down_prec, INTERPRET=_INTERPRET,
            num_warps=down.num_warps, num_stages=down.num_stages,
        )
        grid = (triton.cdiv(m, up.block_m) * triton.cdiv(n, up.block_n),)
        _up_proj_update_kernel[grid](
            up_a, up_b, param,
            m, n, up_a.shape[1],
            up_a.stride(0), up_a.stride(1), up_b.stride(0), up_b.stride(1), param.stride(0), param.stride(1),
            _step_size(step, lr, beta1, beta2) * scale, lr * weight_decay,
            APPLY_DECAY=bool(weight_decay),
            BLOCK_M=up.block_m, BLOCK_N=up.block_n, BLOCK_K=up.block_k, GROUP_M=up.group_m,
            PRECISION=up_prec, INTERPRET=_INTERPRET, num_warps=up.num_warps, num_stages=up.num_stages,
        )
