"""R-Sparse decode GEMV, compacted design: the active channels listed first, then only their weight rows streamed;
several projections that read one input (q/k/v, gate/up) in one call, each with its own mask and low-rank term.

The math is ``rsparse_gemv``'s (see that module for the paper and the storage layout), per segment s of the
concatenated outputs:

    m_s = 1[ |x| * scale_s > t_s ]          y_s = W_s (x * m_s) + U_s ( Vs_s (x * (1 - m_s)) )

Why a second design. ``rsparse_gemv``'s kernel B gives every (input block, output block) pair a program that
loads its whole W^T tile with the inactive rows masked: the inactive rows cost no DRAM traffic but every program
still runs, so its time follows the active bytes only where load latency, not the per-program cost, dominates
(the issue's review: 50% -> 70% sparsity cut bytes by 40% and time by 7-11% on an H100). Here:

Kernel P (prepare), grid (in / BLOCK_P, segments, rank chunks): per channel block and segment, computes the mask
(fp32 compare, per row; the union over the rows decides which W^T rows are loaded), writes the block's active
channel indices compacted (an exclusive prefix sum of the mask: deterministic order, no atomics) with their masked
inputs x*m, and the block's count; and, where the segment has a low-rank term, one rank chunk of the block's share of
z_s = Vs_s (x * (1 - m_s)) per program (reading Vs only for channels some row leaves to it), stored per block -- no
atomics, nothing to re-zero.

Kernel G (GEMV), grid (out / BLOCK_N, SPLIT): each program owns an output block of one segment and a 1/SPLIT share
of the channel blocks (default: one block each, as many programs as the split design's grid); it loops over their
compacted active channels BLOCK_K at a time (a loop over active rows only, so the work per program, and the number
of load instructions, follow the active count), gathering those W^T rows (contiguous runs of BLOCK_N outputs each).
The programs of the first splits add U_s[n_block] @ z_s, one rank chunk each, summing the per-block z shares.
SPLIT = 1: each program writes its outputs in the output dtype directly -- no atomics, no workspace, no ticket.
SPLIT > 1: fp32 atomics into a self-zeroing workspace and a per-output-block ticket whose last holder casts and
re-zeroes (``rsparse_gemv``'s mechanism; SPLIT tickets per output block, none device-wide).

Registers and load widths of every configuration on sm_90 are checked without a GPU by
``scripts/kernel_resources.py`` (Triton's compiler and ptxas): no spills, 16-byte vector loads of the weight rows.

Launches: 2, for one projection or a fused group of up to three, with or without low-rank terms; TEAL's single-mask
fusion in one launch stays with ``rsparse_gemv`` (``fuse_shared_inputs``). Every scratch buffer is rewritten before it
is read, so calls need no memset; the graph-capture rules are ``rsparse_gemv``'s (a workspace first made during
capture is private to that graph).

Unmeasured choice (no GPU was available when this was written): whether the compacted loop beats the single-shot
split-K grid depends on the card, shape and sparsity; ``tune_config`` times both designs per shape and kept
fraction, and ``scripts/bench_rsparse_kernels.py`` reports both.

Segments: ``outs`` (output sizes, summing to W^T's columns) and ``ranks``; ``scale`` (in,) or (segments, in)
(a row of ones gives a TEAL segment its plain |x| mask); ``thresholds`` one Python number per segment (inf: all
channels low-rank); ``u`` the segments' U_s (out_s, r_s) row-major, concatenated flat; ``vst`` (in, sum r_s): the
segments' Vs_s^T side by side (column-major Vs: a skipped channel is one contiguous row), any strides. Segment
boundaries must be multiples of 16 (BLOCK_N is lowered until it divides them).
"""

from __future__ import annotations

import contextlib

import torch

from ._common import INTERPRET as _INTERPRET
from ._common import tl, triton
from .rsparse_gemv import _DTYPES, MAX_ROWS, _check_int32_offsets, _pow2, _threshold32, rsparse_reference

__all__ = ["rsparse_gemv_compact", "rsparse_reference_compact", "compact_candidates", "MAX_SEGMENTS"]

MAX_SEGMENTS = 3
_COMPACT_KEYS = ("block_p", "block_k", "block_n", "split", "num_warps", "block_pl", "block_r", "block_re", "block_z",
                 "dot")


def _segments(wt, scale, thresholds, u, vst, outs, ranks):
    """Checked (outs, ranks, thresholds as fp32-rounded floats); raises on anything inconsistent."""
    k, n = wt.shape
    outs = [n] if outs is None else [int(o) for o in outs]
    if not 1 <= len(outs) <= MAX_SEGMENTS or sum(outs) != n or min(outs) < 1:
        raise ValueError(f"outs must be 1..{MAX_SEGMENTS} positive sizes summing to wt's {n} columns, got {outs}")
    if len(outs) > 1 and any(o % 16 for o in outs[:-1]):
        raise ValueError(f"segment boundaries must be multiples of 16, got outs={outs}")
    ranks = [0] * len(outs) if ranks is None else [int(r) for r in ranks]
    if len(ranks) != len(outs) or min(ranks) < 0:
        raise ValueError(f"ranks must be {len(outs)} non-negative ints (one per segment), got {ranks}")
    if isinstance(thresholds, (int, float)):
        thresholds = [thresholds]
    if len(thresholds) != len(outs):
        raise ValueError(f"need one threshold per segment ({len(outs)}), got {len(thresholds)}")
    if scale is not None and tuple(scale.shape) not in ((k,), (len(outs), k)):
        raise ValueError(f"scale must have shape (in,) = ({k},) or (segments, in) = ({len(outs)}, {k}), got "
                         f"{tuple(scale.shape)}")
    if sum(ranks):
        if u is None or vst is None:
            raise ValueError(f"ranks {ranks} need u and vst")
        if u.numel() != sum(o * r for o, r in zip(outs, ranks)) or tuple(vst.shape) != (k, sum(ranks)):
            raise ValueError(f"u must hold sum(out_s * r_s) = {sum(o * r for o, r in zip(outs, ranks))} values and "
                             f"vst have shape (in, sum r_s) = ({k}, {sum(ranks)}); got {u.numel()} and "
                             f"{tuple(vst.shape)}")
    return outs, ranks, [_threshold32(t) for t in thresholds]


@torch.no_grad()
def rsparse_reference_compact(x, wt, scale, thresholds, u=None, vst=None, *, outs=None, ranks=None):
    """The segmented layer in plain PyTorch, segment by segment through ``rsparse_reference`` (the oracle)."""
    outs, ranks, ts = _segments(wt, scale, thresholds, u, vst, outs, ranks)
    parts, n0, r0, u0 = [], 0, 0, 0
    for i, (o, r, t) in enumerate(zip(outs, ranks, ts)):
        sc = None if scale is None else (scale if scale.dim() == 1 else scale[i])
        uu = u.reshape(-1)[u0: u0 + o * r].view(o, r) if r else None
        vs = vst[:, r0: r0 + r].t() if r else None
        parts.append(rsparse_reference(x, wt[:, n0: n0 + o], sc, t, uu, vs))
        n0, r0, u0 = n0 + o, r0 + r, u0 + o * r
    return torch.cat(parts, dim=-1)


if triton is not None:
    from .rsparse_gemv import _row, _to_storage

    @triton.jit
    def _seg_pick(s, a0, a1, a2):
        return tl.where(s == 0, a0, tl.where(s == 1, a1, a2))

    @triton.jit
    def _masked_tile(x_ptr, scale_ptr, rows, offs, s, B, K, t, stride_xb, stride_xk, stride_ss,
                     HAS_SCALE: tl.constexpr):
        """x (BLOCK_B, len(offs)) in fp32 and which entries segment s keeps; rows >= B and channels >= K: 0, False."""
        ld = (rows[:, None] < B) & (offs[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + offs[None, :] * stride_xk, mask=ld, other=0.0).to(tl.float32)
        mag = tl.abs(x)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + s * stride_ss + offs, mask=offs < K, other=0.0)
            mag = mag * sc.to(tl.float32)[None, :]
        return x, (mag > t) & ld

    @triton.jit
    def _compact_prep_kernel(
        x_ptr, scale_ptr, vt_ptr, idx_ptr, xc_ptr, cnt_ptr, zp_ptr,
        K, NP, RMAX, T0, T1, T2, R0, R1, R2,
        stride_xb, stride_xk, stride_ss, stride_vk, stride_vr,
        B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PL: tl.constexpr,
        BLOCK_R: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LR: tl.constexpr,
    ):
        """Kernel P, program (channel block, segment, rank chunk): the first rank chunk's program writes the block's
        compacted active channels, their x*m and their count; every program its rank chunk of the block's z share."""
        pid_p = tl.program_id(0)
        s = tl.program_id(1)
        pid_r = tl.program_id(2)
        t = _seg_pick(s, T0, T1, T2)
        rows = tl.arange(0, BLOCK_B)
        blk = s * NP + pid_p
        if pid_r == 0:
            offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
            x, keep = _masked_tile(x_ptr, scale_ptr, rows, offs, s, B, K, t, stride_xb, stride_xk, stride_ss,
                                   HAS_SCALE)
            act = tl.max(keep.to(tl.int32), axis=0)  # union over the rows: which W^T rows kernel G loads
            pos = tl.cumsum(act, axis=0) - act  # exclusive prefix sum: the compacted slot of each active channel
            tl.store(idx_ptr + blk * BLOCK_P + pos, offs, mask=act > 0)
            tl.store(xc_ptr + (blk * BLOCK_B + rows[:, None]) * BLOCK_P + pos[None, :], tl.where(keep, x, 0.0),
                     mask=(rows[:, None] < B) & (act[None, :] > 0))
            tl.store(cnt_ptr + blk, tl.sum(act, axis=0))
        if HAS_LR:
            # One rank chunk per program (a grid axis, not a loop: the Vs loads of all chunks are in flight at
            # once), BLOCK_PL channels at a time (a larger (channels, ranks) tile spilled registers on sm_90).
            r_s = _seg_pick(s, R0, R1, R2)
            offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = offs_r < r_s
            if pid_r * BLOCK_R < r_s:
                r_off = _seg_pick(s, 0, R0, R0 + R1)
                z = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
                for c0 in range(0, BLOCK_P, BLOCK_PL):
                    offs_c = pid_p * BLOCK_P + c0 + tl.arange(0, BLOCK_PL)
                    xs, ks = _masked_tile(x_ptr, scale_ptr, rows, offs_c, s, B, K, t, stride_xb, stride_xk, stride_ss,
                                          HAS_SCALE)
                    xl = tl.where(ks, 0.0, xs)
                    low = tl.max((xl != 0.0).to(tl.int32), axis=0) > 0  # rows of Vs no row leaves to it: not read
                    v = tl.load(vt_ptr + offs_c[:, None] * stride_vk + (r_off + offs_r)[None, :] * stride_vr,
                                mask=low[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_PL, BLOCK_R)
                    for b in tl.static_range(B):
                        zb = tl.sum(_row(xl, rows, b)[:, None] * v, axis=0)
                        z += tl.where(rows[:, None] == b, zb[None, :], 0.0)
                tl.store(zp_ptr + (blk * B + rows[:, None]) * RMAX + offs_r[None, :], z,
                         mask=(rows[:, None] < B) & r_ok[None, :])

    @triton.jit
    def _compact_gemv_kernel(
        wt_ptr, u_ptr, idx_ptr, xc_ptr, cnt_ptr, zp_ptr, out_ptr, acc_ptr, tk_ptr,
        N, NP, RMAX, N1, N2, R0, R1, R2,
        stride_wk, stride_wn, stride_ob, stride_on,
        B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Z: tl.constexpr, SPLIT: tl.constexpr,
        HAS_LR: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Kernel G: out[:, n_block] = sum over the active channels of x*m times their W^T rows (+ U_s z_s)."""
        pid_n = tl.program_id(0)
        sp = tl.program_id(1)
        rows = tl.arange(0, BLOCK_B)
        n0 = pid_n * BLOCK_N
        s = (n0 >= N1).to(tl.int32) + (n0 >= N2).to(tl.int32)  # the host makes BLOCK_N divide N1 and N2
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        per = tl.cdiv(NP, SPLIT)
        for p in range(sp * per, tl.minimum(sp * per + per, NP)):
            blk = s * NP + p
            count = tl.load(cnt_ptr + blk)
            for i in range(0, count, BLOCK_K):
                offs_i = i + tl.arange(0, BLOCK_K)
                i_ok = offs_i < count
                ch = tl.load(idx_ptr + blk * BLOCK_P + offs_i, mask=i_ok, other=0)
                # Only active channels' rows: contiguous runs of BLOCK_N outputs, streamed once.
                w = tl.load(wt_ptr + ch[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=i_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
                if B == 1:
                    xv = tl.load(xc_ptr + blk * BLOCK_B * BLOCK_P + offs_i, mask=i_ok, other=0.0)
                    acc += tl.sum(xv[:, None] * w.to(tl.float32), axis=0)[None, :]
                else:
                    xt = tl.load(xc_ptr + (blk * BLOCK_B + rows[:, None]) * BLOCK_P + offs_i[None, :],
                                 mask=(rows[:, None] < B) & i_ok[None, :], other=0.0)
                    if USE_DOT:
                        if DOT_F32:
                            acc += tl.dot(xt, w.to(tl.float32), input_precision="ieee")
                        else:
                            acc += tl.dot(xt.to(w.dtype), w)  # exact: x*m is x or 0, and x has W's dtype
                    else:
                        wf = w.to(tl.float32)
                        for b in tl.static_range(B):
                            yb = tl.sum(_row(xt, rows, b)[:, None] * wf, axis=0)
                            acc += tl.where(rows[:, None] == b, yb[None, :], 0.0)
        if HAS_LR:
            # U_s[n_block] @ z_s, BLOCK_R ranks at a time, the chunks spread over the splits; z_s summed from the
            # channel blocks' shares BLOCK_Z blocks at a time (a whole (blocks, ranks) tile spilled on sm_90).
            r_s = _seg_pick(s, R0, R1, R2)
            seg_lo = _seg_pick(s, 0, N1, N2)
            u_base = _seg_pick(s, 0, N1 * R0, N1 * R0 + (N2 - N1) * R1)
            for r0 in range(sp * BLOCK_R, r_s, SPLIT * BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < r_s
                uu = tl.load(u_ptr + u_base + (offs_n - seg_lo)[:, None] * r_s + offs_r[None, :],
                             mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_R)
                for b in tl.static_range(B):
                    zb = tl.zeros((BLOCK_R,), dtype=tl.float32)
                    for p0 in range(0, NP, BLOCK_Z):
                        blocks = p0 + tl.arange(0, BLOCK_Z)
                        zp = tl.load(zp_ptr + ((s * NP + blocks[:, None]) * B + b) * RMAX + offs_r[None, :],
                                     mask=(blocks[:, None] < NP) & r_ok[None, :], other=0.0)
                        zb += tl.sum(zp, axis=0)
                    yb = tl.sum(uu * zb[None, :], axis=1)
                    acc += tl.where(rows[:, None] == b, yb[None, :], 0.0)
        o_ok = (rows[:, None] < B) & n_ok[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_ob + offs_n[None, :] * stride_on
        if SPLIT == 1:
            tl.store(out_ptrs, _to_storage(acc, out_ptr, INTERPRET), mask=o_ok)
        else:
            acc_ptrs = acc_ptr + rows[:, None] * N + offs_n[None, :]
            tl.atomic_add(acc_ptrs, acc, mask=o_ok, sem="relaxed")
            tl.debug_barrier()
            ticket = tl.atomic_add(tk_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:  # the output block's last program: cast, store, leave zeros behind
                y = tl.load(acc_ptrs, mask=o_ok, other=0.0, cache_modifier=".cg")
                tl.store(out_ptrs, _to_storage(y, out_ptr, INTERPRET), mask=o_ok)
                tl.store(acc_ptrs, tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), mask=o_ok)
                tl.atomic_xchg(tk_ptr + pid_n, 0, sem="relaxed")


def _default_config(n: int, rows: int, same_16bit: bool) -> dict:
    """Untuned starting point (``split`` is clipped to the number of channel blocks)."""
    if _INTERPRET:  # small tiles: test shapes of a few dozen channels cross every block edge
        return dict(block_p=16, block_k=8, block_n=16, split=2, num_warps=1, block_pl=8, block_r=8, block_re=4,
                    block_z=2, dot=False)
    # One 128-channel block per program (split = blocks), 64 of its active rows a step: as many programs as the
    # split design's grid, each streaming only active rows.
    return dict(block_p=128, block_k=64, block_n=64, split=1 << 20, num_warps=4, block_pl=128, block_r=16,
                block_re=16, block_z=64, dot=rows >= 4 and same_16bit)


def compact_candidates(n: int) -> list:
    """Tiles ``tune_config`` tries for this design: 128-channel blocks; BLOCK_N 32-128 x 32-128 active rows a step
    (at most 8K weights) x 4, 16 or all channel blocks' splits (all: one block per program, the split design's
    parallelism; 4: a loop over many blocks per program, fewer atomics): 24 tiles, so tuning stays within seconds."""
    if _INTERPRET:
        return [dict(design="compact", block_p=16, block_k=8, block_n=16, split=3, num_warps=1)]
    return [dict(design="compact", block_p=128, block_k=bk, block_n=bn, split=sp, num_warps=4)
            for bn in (32, 64, 128) for bk in (32, 64, 128) for sp in (4, 16, 1 << 20) if bk * bn <= 8192]


_WORKSPACES: dict = {}


def _workspace(device, rows, k, n, segments, rmax, block_b, block_p, split):
    np_ = triton.cdiv(k, block_p)
    key = (device, rows, k, n, segments, rmax, block_b, block_p, split > 1)
    ws = _WORKSPACES.get(key)
    if ws is not None:
        return ws
    ws = dict(idx=torch.empty(segments * np_ * block_p, device=device, dtype=torch.int32),
              xc=torch.empty(segments * np_ * block_b * block_p, device=device, dtype=torch.float32),
              cnt=torch.empty(segments * np_, device=device, dtype=torch.int32),
              zp=torch.empty(max(1, segments * np_ * rows * rmax), device=device, dtype=torch.float32),
              # SPLIT > 1 only: the fp32 sums and one ticket per output block (>= 16 outputs each), kept zeroed
              acc=torch.zeros(rows * n if split > 1 else 1, device=device, dtype=torch.float32),
              tk=torch.zeros(triton.cdiv(n, 16) if split > 1 else 1, device=device, dtype=torch.int32))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:  # made during capture, the zeros exist only in that graph's replays: keep it private to it
        _WORKSPACES[key] = ws
    return ws


@torch.no_grad()
def rsparse_gemv_compact(x, wt, scale, thresholds, u=None, vst=None, *, outs=None, ranks=None, out=None,
                         config: dict | None = None):
    """The segmented layer (module doc) with the compacted kernels: x (..., in) of 1..16 rows, wt = W^T (in, N).
    Returns (..., N) in x's dtype, or writes ``out``. ``config`` overrides the tiles (block_p, block_k, block_n,
    split, num_warps; kernel P's low-rank tile block_pl x block_r; kernel G's block_re ranks and block_z channel
    blocks at a time; dot). Graph-capturable: no host syncs, fixed launches."""
    k, n = wt.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., in={k}), got {tuple(x.shape)}")
    rows = x.numel() // k
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"x must hold 1..{MAX_ROWS} rows (decode), got {rows}")
    outs, ranks, ts = _segments(wt, scale, thresholds, u, vst, outs, ranks)
    for name, t in (("x", x), ("wt", wt), ("scale", scale), ("u", u), ("vst", vst)):
        if t is not None and (t.dtype not in _DTYPES or t.device != wt.device):
            raise ValueError(f"{name}: {t.dtype} on {t.device}; need float32/16/bf16 on {wt.device}")
    for name, t in (("x", x), ("wt", wt), ("vst", vst)):
        if t is not None:
            _check_int32_offsets(name, t)
    cfg = _default_config(n, rows, x.dtype == wt.dtype and x.dtype != torch.float32)
    unknown = set(config or ()) - set(_COMPACT_KEYS) - {"design"}
    if unknown:
        raise ValueError(f"unknown compact config keys {sorted(unknown)}; valid: {list(_COMPACT_KEYS)}")
    cfg.update({key: v for key, v in (config or {}).items() if key != "design"})
    if any(cfg[key] < 1 or cfg[key] & (cfg[key] - 1) for key in ("block_p", "block_k", "block_n", "block_pl", "block_r",
                                                               "block_re", "block_z")) \
            or cfg["split"] < 1 or cfg["block_n"] < 16:
        raise ValueError(f"block sizes must be powers of two (block_n >= 16) and split >= 1; got {cfg}")
    bounds = [sum(outs[: i + 1]) for i in range(len(outs) - 1)]
    block_n = cfg["block_n"]
    while any(b % block_n for b in bounds):  # an output block never straddles two segments
        block_n //= 2
    np_ = triton.cdiv(k, cfg["block_p"])
    split = min(cfg["split"], np_)
    use_dot = cfg["dot"] and rows > 1
    block_b = max(16, _pow2(rows)) if use_dot else _pow2(rows)
    rmax = max(ranks)
    seg_scale = scale if scale is not None else x
    stride_ss = scale.stride(0) if scale is not None and scale.dim() == 2 else 0
    r3 = (ranks + [0, 0])[:3]
    t3 = (ts + [0.0, 0.0])[:3]
    n1, n2 = (bounds + [n, n])[:2]
    u_flat = u.reshape(-1) if u is not None else wt  # reshape: a view for contiguous u (the layouts llmx builds)
    vt = vst if vst is not None else wt
    ws = _workspace(wt.device, rows, k, n, len(outs), rmax, block_b, cfg["block_p"], split)
    if out is not None and (tuple(out.shape) != (*x.shape[:-1], n) or out.device != wt.device
                            or out.dtype not in _DTYPES):
        raise ValueError(f"out must be a float tensor of shape {(*x.shape[:-1], n)} on {wt.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    direct = out is not None and out.is_contiguous()
    y = out.view(rows, n) if direct else \
        torch.empty(rows, n, device=wt.device, dtype=out.dtype if out is not None else x.dtype)
    x2 = x.reshape(rows, k)
    guard = torch.cuda.device(wt.device) if wt.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _compact_prep_kernel[(np_, len(outs), triton.cdiv(rmax, cfg["block_r"]) if rmax else 1)](
            x2, seg_scale, vt, ws["idx"], ws["xc"], ws["cnt"], ws["zp"],
            k, np_, max(rmax, 1), *t3, *r3,
            x2.stride(0), x2.stride(1), stride_ss, vt.stride(0), vt.stride(1),
            B=rows, BLOCK_B=block_b, BLOCK_P=cfg["block_p"], BLOCK_PL=min(cfg["block_p"], cfg["block_pl"]),
            BLOCK_R=cfg["block_r"], HAS_SCALE=scale is not None, HAS_LR=rmax > 0, num_warps=cfg["num_warps"],
        )
        _compact_gemv_kernel[(triton.cdiv(n, block_n), split)](
            wt, u_flat, ws["idx"], ws["xc"], ws["cnt"], ws["zp"], y, ws["acc"], ws["tk"],
            n, np_, max(rmax, 1), n1, n2, *r3,
            wt.stride(0), wt.stride(1), y.stride(0), y.stride(1),
            B=rows, BLOCK_B=block_b, BLOCK_P=cfg["block_p"], BLOCK_K=max(cfg["block_k"], 16 if use_dot else 1),
            BLOCK_N=block_n, BLOCK_R=cfg["block_re"], BLOCK_Z=cfg["block_z"], SPLIT=split, HAS_LR=rmax > 0,
            USE_DOT=use_dot, DOT_F32=_INTERPRET or x.dtype != wt.dtype or wt.dtype == torch.float32,
            INTERPRET=_INTERPRET, num_warps=cfg["num_warps"],
        )
    if out is None:
        return y.view(*x.shape[:-1], n)
    if not direct:
        out.copy_(y.view(*x.shape[:-1], n))
    return out
