"""The R-Sparse GEMV kernels (llmx.kernels.rsparse_gemv) against their PyTorch reference, and the reference
against float64 dense math.

Without CUDA the Triton kernels run in Triton's interpreter, switched on before the kernel module is
imported (hence the environment line above the imports). The interpreter runs programs one after
another, so it checks the ticket logic (last program per output block casts and re-zeroes) but not the
GPU's memory ordering; the CUDA tests at the bottom (Llama-7B layer shapes, bf16, repeated calls and a
CUDA-graph replay) cover that. Run with -s to see the measured errors ("rsparse-parity ...").
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402

import llmx.kernels.rsparse_gemv as rs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not rs.rsparse_available("cpu"):
    # Imported earlier in this session without the interpreter: re-run the @triton.jit decorators.
    rs = importlib.reload(rs)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the expected tensor."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make_layer(k, n, r, *, dtype=torch.float32, seed=0, device=DEVICE):
    """(W fp32 (out, in), wt, scale, u, vs) with SVD factors (u = vs = None for r = 0)."""
    g = torch.Generator().manual_seed(seed)
    # Column norms that vary by channel, as in real layers: the weight-aware mask then differs from |x|'s.
    w = torch.randn(n, k, generator=g) * (0.02 * (0.5 + torch.rand(k, generator=g)))
    wt, scale, u, vs = rs.prepare_rsparse_weight(w.to(device), r, dtype=dtype)
    return w.to(device), wt, scale, u, vs


def make_x(rows, k, *, dtype=torch.float32, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g).to(device=device, dtype=dtype)


def masks(x, scale, t):
    mag = x.float().abs() * scale.float() if scale is not None else x.float().abs()
    return mag > rs._threshold32(t)


# ----------------------------------------------------------------------------------------------------
# the reference against float64 dense math
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, 8])
def test_reference_nothing_masked_is_dense(r):
    """t = -1: every channel passes (magnitudes are >= 0), the low-rank input is zero: y = W x."""
    w, wt, scale, u, vs = make_layer(96, 80, r, device="cpu")
    x = make_x(3, 96, device="cpu")
    y = rs.rsparse_reference(x, wt, scale, -1.0, u, vs)
    assert rel_err(y, x.double() @ w.double().T) < 1e-5


def test_reference_full_rank_everything_masked_is_dense():
    """t = +inf: every channel goes through the low-rank path; at full rank U Vs = W, so y = W x."""
    k, n = 96, 80
    w, wt, scale, u, vs = make_layer(k, n, min(k, n), device="cpu")
    x = make_x(3, k, device="cpu")
    y = rs.rsparse_reference(x, wt, scale, float("inf"), u, vs)
    assert not masks(x, scale, float("inf")).any()
    assert rel_err(y, x.double() @ w.double().T) < 1e-5


def test_reference_alpha1_is_teal():
    """No scale, no low rank: y = W (x * 1[|x| > t]) computed in float64."""
    w, wt, _, _, _ = make_layer(96, 80, 0, device="cpu")
    x = make_x(4, 96, device="cpu")
    t = 0.7
    y = rs.rsparse_reference(x, wt, None, t)
    m = x.abs() > t
    assert 0.3 < m.float().mean() < 0.7
    assert rel_err(y, (x.double() * m) @ w.double().T) < 1e-6


def test_reference_rsparse_formula():
    """The full layer at rank 8 against W (x*m) + U_r Vs (x*(1-m)) in float64, m weight-aware."""
    k, n, r = 72, 160, 8
    w, wt, scale, u, vs = make_layer(k, n, r, device="cpu")
    x = make_x(3, k, device="cpu")
    t = rs.calibrate_threshold(x, scale, 0.45)
    m = masks(x, scale, t)
    assert not torch.equal(m, x.abs() > x.abs().median())  # the scale changes which channels pass
    x64 = x.double()
    expect = (x64 * m) @ w.double().T + ((x64 * ~m) @ vs.double().T) @ u.double().T
    assert rel_err(rs.rsparse_reference(x, wt, scale, t, u, vs), expect) < 1e-5


def test_helpers():
    keep, rank = rs.rsparse_allocation(4096, 4096, 0.5, 0.9)
    assert keep == pytest.approx(0.45) and rank == 102
    assert rs.rsparse_allocation(4096, 14336, 0.5, 0.9)[1] == 159
    assert rs.rsparse_allocation(4096, 4096, 0.5, 1.0) == (0.5, 0)
    assert rs.rsparse_allocation(4096, 4096, 0.5, 0.9, rank_multiple=16) == (keep, 96)
    x = make_x(2, 100, device="cpu")
    scale = torch.rand(100) + 0.5
    t = rs.calibrate_threshold(x, scale, 0.3)
    assert masks(x, scale, t).sum() == 60  # exactly 30% of 200
    assert rs.calibrate_threshold(x, scale, 1.0) < 0 and rs.calibrate_threshold(x, scale, 0.0) == float("inf")
    w, wt, scale, u, vs = make_layer(40, 24, 24, device="cpu")
    assert wt.shape == (40, 24) and wt.is_contiguous() and vs.shape == (24, 40) and vs.stride() == (1, 24)
    assert torch.allclose(scale.double(), w.double().norm(dim=0), rtol=1e-6)  # column norms of W
    assert torch.allclose(vs.double().norm(dim=0), w.double().norm(dim=0), rtol=1e-5)  # = ||(V S)[j, :]||
    assert rel_err(u.double() @ vs.double(), w) < 1e-5


# ----------------------------------------------------------------------------------------------------
# kernels against the reference (interpreter on CPU; the same on CUDA)
# ----------------------------------------------------------------------------------------------------

SHAPES = [(96, 80), (72, 160), (37, 53)]  # (in, out); 37 x 53 crosses every block edge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("r", [0, 8])
def test_kernel_matches_reference(k, n, r, rows, dtype):
    _, wt, scale, u, vs = make_layer(k, n, r, dtype=dtype)
    x = make_x(rows, k, dtype=dtype)
    t = rs.calibrate_threshold(x, scale, 0.45)
    y = rs.rsparse_gemv(x, wt, scale, t, u, vs)
    ref = rs.rsparse_reference(x, wt, scale, t, u, vs)
    err = rel_err(y, ref)
    print(f"rsparse-parity {k}x{n} r={r} B={rows} {str(dtype)[6:]}: rel err {err:.2e}")
    assert y.dtype == dtype and y.shape == (rows, n)
    assert err < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("r", [0, 8])
def test_memset_reduction(r, rows, dtype):
    _, wt, scale, u, vs = make_layer(37, 53, r, dtype=dtype)
    x = make_x(rows, 37, dtype=dtype)
    t = rs.calibrate_threshold(x, scale, 0.45)
    y = rs.rsparse_gemv(x, wt, scale, t, u, vs, reduction="memset")
    err = rel_err(y, rs.rsparse_reference(x, wt, scale, t, u, vs))
    print(f"rsparse-parity memset 37x53 r={r} B={rows} {str(dtype)[6:]}: rel err {err:.2e}")
    assert y.dtype == dtype and err < TOL[dtype]


@pytest.mark.parametrize("r", [0, 8])
def test_teal_mode(r):
    """scale=None: the mask is |x| > t, with or without the low-rank term."""
    _, wt, _, u, vs = make_layer(72, 160, r)
    x = make_x(3, 72)
    t = rs.calibrate_threshold(x, None, 0.5)
    y = rs.rsparse_gemv(x, wt, None, t, u, vs)
    assert rel_err(y, rs.rsparse_reference(x, wt, None, t, u, vs)) < 1e-5


@pytest.mark.parametrize("t", [-1.0, float("inf")])
@pytest.mark.parametrize("k,n", [(72, 40), (37, 53)])  # 37 x 53: more rank chunks (3) than channel blocks (2)
def test_kernel_threshold_limits(k, n, t):
    """Nothing masked / everything masked (full rank): the kernels give W x too."""
    w, wt, scale, u, vs = make_layer(k, n, min(k, n))
    x = make_x(3, k)
    y = rs.rsparse_gemv(x, wt, scale, t, u, vs)
    assert rel_err(y, x.double() @ w.double().T) < 1e-5


def test_per_row_masks():
    """Rows with different (here: disjoint) active sets give exactly the per-row results."""
    k, n, r = 96, 80, 8
    _, wt, scale, u, vs = make_layer(k, n, r)
    t = 0.2
    # |x| * scale = 0.5 t (dropped) or 2 t (kept), random signs: row 0 keeps only its first third of the
    # channels, row 1 only its last third, row 2 a random half.
    sign = make_x(3, k).sign()
    keep = torch.zeros(3, k, dtype=torch.bool, device=DEVICE)
    keep[0, :32] = keep[1, 64:] = True
    keep[2] = torch.rand(k, generator=torch.Generator().manual_seed(7)).to(DEVICE) < 0.5
    x = sign * torch.where(keep, 2 * t, 0.5 * t) / scale
    m = masks(x, scale, t)
    assert torch.equal(m, keep)
    assert 0.2 < m[2].float().mean() < 0.8
    y = rs.rsparse_gemv(x, wt, scale, t, u, vs)
    per_row = torch.cat([rs.rsparse_reference(x[i:i + 1], wt, scale, t, u, vs) for i in range(3)])
    assert rel_err(y, per_row) < 1e-5
    singles = torch.cat([rs.rsparse_gemv(x[i:i + 1], wt, scale, t, u, vs) for i in range(3)])
    assert rel_err(y, singles) < 1e-5


def test_ticket_workspace_is_left_zeroed():
    """Repeated and interleaved calls: each is right, and the workspace is clean after every call."""
    layers = {r: make_layer(72, 160, r, seed=r) for r in (0, 8)}
    for i in range(3):
        for r, (_, wt, scale, u, vs) in layers.items():
            x = make_x(3, 72, seed=10 + i)
            t = rs.calibrate_threshold(x, scale, 0.4)
            assert rel_err(rs.rsparse_gemv(x, wt, scale, t, u, vs), rs.rsparse_reference(x, wt, scale, t, u, vs)) < 1e-5
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            ws = rs._WORKSPACES[(wt.device, 3, 72, 160, r)]
            assert not ws["acc"].any() and not ws["z"].any() and not ws["cnt"].any()


def test_dot_path():
    """The 16-row tl.dot variant of kernel B (fp32 'ieee' in the interpreter) against the reference."""
    for rows, r in [(3, 8), (8, 0), (1, 8)]:  # one row ignores the flag (it has its own path)
        _, wt, scale, u, vs = make_layer(72, 160, r)
        x = make_x(rows, 72)
        t = rs.calibrate_threshold(x, scale, 0.45)
        y = rs.rsparse_gemv(x, wt, scale, t, u, vs, config={"dot": True})
        assert rel_err(y, rs.rsparse_reference(x, wt, scale, t, u, vs)) < 1e-5


@pytest.mark.parametrize("r", [0, 8])
def test_bf16_storage(r):
    """bf16 x and factors: loads become fp32 at once, the result is rounded to nearest-even once."""
    _, wt, scale, u, vs = make_layer(96, 80, r, dtype=torch.bfloat16)
    x = make_x(3, 96, dtype=torch.bfloat16)
    t = rs.calibrate_threshold(x, scale, 0.45)
    y = rs.rsparse_gemv(x, wt, scale, t, u, vs)
    ref32 = rs.rsparse_reference(x.float(), wt, scale, t, u, vs)
    err = rel_err(y, ref32)
    print(f"rsparse-parity bf16 96x80 r={r}: rel err vs fp32 {err:.2e}")
    assert y.dtype == torch.bfloat16 and err < 1e-2
    # Same fp32 sums up to summation order, rounded the same way: one bf16 ulp apart at most (plus a
    # little for outputs near zero, where a different summation order moves the fp32 sum relatively more).
    ref = rs.rsparse_reference(x, wt, scale, t, u, vs).float()
    assert ((y.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-4 * ref.abs().max()).all()


def test_shapes_and_out():
    _, wt, scale, u, vs = make_layer(37, 53, 8, dtype=torch.float16)
    x = make_x(4, 37, dtype=torch.float16).view(2, 2, 37)
    t = rs.calibrate_threshold(x, scale, 0.5)
    ref = rs.rsparse_reference(x, wt, scale, t, u, vs)
    assert ref.shape == (2, 2, 53)
    for reduction in rs.REDUCTIONS:
        y = rs.rsparse_gemv(x, wt, scale, t, u, vs, reduction=reduction)
        assert y.shape == (2, 2, 53) and rel_err(y, ref) < 1e-2
        # fp32 out: no rounding to fp16 at all
        out32 = torch.empty(2, 2, 53, device=DEVICE)
        assert rs.rsparse_gemv(x, wt, scale, t, u, vs, out=out32, reduction=reduction) is out32
        assert rel_err(out32, rs.rsparse_reference(x.float(), wt, scale, t, u, vs)) < 1e-5
        # a non-contiguous out
        wide = torch.zeros(2, 2, 106, device=DEVICE, dtype=torch.float16)
        rs.rsparse_gemv(x, wt, scale, t, u, vs, out=wide[..., ::2], reduction=reduction)
        assert rel_err(wide[..., ::2], ref) < 1e-2 and not wide[..., 1::2].any()
    # 1-D x (one row)
    y1 = rs.rsparse_gemv(x[0, 0], wt, scale, t, u, vs)
    assert y1.shape == (53,) and rel_err(y1, ref[0, 0]) < 1e-2


def test_rejects_bad_arguments():
    _, wt, scale, u, vs = make_layer(37, 53, 8)
    x = make_x(2, 37)
    with pytest.raises(ValueError, match="rows"):
        rs.rsparse_gemv(make_x(17, 37), wt, scale, 0.1)
    with pytest.raises(ValueError, match="in=37"):
        rs.rsparse_gemv(make_x(2, 36), wt, scale, 0.1)
    with pytest.raises(ValueError, match="both"):
        rs.rsparse_gemv(x, wt, scale, 0.1, u, None)
    with pytest.raises(ValueError, match=r"\(out, r\)"):
        rs.rsparse_gemv(x, wt, scale, 0.1, u[:5], vs)
    with pytest.raises(ValueError, match="scale"):
        rs.rsparse_gemv(x, wt, scale[:5], 0.1)
    with pytest.raises(ValueError, match="reduction"):
        rs.rsparse_gemv(x, wt, scale, 0.1, reduction="tree")
    with pytest.raises(TypeError, match="dtype"):
        rs.rsparse_gemv(x.double(), wt, scale, 0.1)
    with pytest.raises(ValueError, match="powers of two"):
        rs.rsparse_gemv(x, wt, scale, 0.1, config={"block_n": 8})
    with pytest.raises(TypeError, match="threshold"):
        rs.rsparse_gemv(x, wt, scale, torch.tensor(0.1))
    with pytest.raises(ValueError, match="out"):
        rs.rsparse_gemv(x, wt, scale, 0.1, out=torch.empty(2, 52, device=DEVICE))
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="CUDA"):
            rs.rsparse_gemv(x.to("meta"), wt.to("meta"), scale.to("meta"), 0.1)


# ----------------------------------------------------------------------------------------------------
# the compacted design (llmx.kernels.rsparse_compact): one layer, and q/k/v-like segments
# ----------------------------------------------------------------------------------------------------


def make_segments(k, outs, ranks, *, dtype=torch.float32, device=DEVICE, seed=0):
    """(wt, scale (S, in), u flat, vst (in, sum r)) of len(outs) projections of one input, in the group layout."""
    parts = [make_layer(k, o, r, dtype=dtype, seed=seed + i, device=device)[1:] for i, (o, r) in
             enumerate(zip(outs, ranks))]
    wt = torch.cat([p[0] for p in parts], dim=1).contiguous()
    scale = torch.stack([p[1] for p in parts])
    u = torch.cat([p[2].reshape(-1) for p in parts if p[2] is not None]) if sum(ranks) else None
    vst = torch.cat([p[3].t() for p in parts if p[3] is not None], dim=1) if sum(ranks) else None
    return wt, scale, u, vst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("r", [0, 8])
def test_compact_design_matches_reference(r, rows, dtype):
    """design="compact" through rsparse_gemv (the layer's route), with and without splits over the channel blocks
    (splits > 1: atomics and the per-block ticket, which must leave its workspace zeroed), 16-row dot included."""
    import llmx.kernels.rsparse_compact as rc

    _, wt, scale, u, vs = make_layer(37, 53, r, dtype=dtype)
    x = make_x(rows, 37, dtype=dtype)
    t = rs.calibrate_threshold(x, scale, 0.45)
    ref = rs.rsparse_reference(x, wt, scale, t, u, vs)
    for cfg in (dict(split=1), dict(split=3, block_k=16, dot=True)):
        y = rs.rsparse_gemv(x, wt, scale, t, u, vs, config=dict(design="compact", **cfg))
        err = rel_err(y, ref)
        print(f"rsparse-parity compact 37x53 r={r} B={rows} {cfg} {str(dtype)[6:]}: rel err {err:.2e}")
        assert y.dtype == dtype and err < TOL[dtype]
    for key, ws in rc._WORKSPACES.items():
        assert not ws["acc"].any() and not ws["tk"].any(), key


def test_compact_lists_only_the_active_channels():
    """Kernel P's output: per channel block, the channels some row keeps, in order, their count, and x*m per row --
    what makes kernel G's work follow the active count."""
    import llmx.kernels.rsparse_compact as rc

    _, wt, scale, u, vs = make_layer(40, 32, 0)
    x = make_x(2, 40)
    t = rs.calibrate_threshold(x, scale, 0.3)
    rs.rsparse_gemv(x, wt, scale, t, config=dict(design="compact", block_p=16, split=1))
    ws = rc._WORKSPACES[(wt.device, 2, 40, 32, 1, 0, 2, 16, False)]
    keep = masks(x, scale, t)
    for p in range(3):  # 40 channels in blocks of 16
        active = keep[:, p * 16: (p + 1) * 16].any(0).nonzero().squeeze(1) + p * 16
        assert int(ws["cnt"][p]) == len(active)
        assert torch.equal(ws["idx"][p * 16: p * 16 + len(active)].long().cpu(), active.cpu())
        xc = ws["xc"].view(3, 2, 16)[p, :, : len(active)]
        assert torch.equal(xc, torch.where(keep, x, 0.0)[:, active])


@pytest.mark.parametrize("rows", [1, 3])
def test_compact_segments_each_keep_their_mask_and_rank(rows):
    """Three projections of one input in one call: different thresholds, column norms and ranks, one of them TEAL
    (scale row of ones, rank 0) and one all low-rank (threshold inf); equal to three reference calls."""
    import llmx.kernels.rsparse_compact as rc

    outs, ranks = [64, 32, 48], [8, 0, 5]
    wt, scale, u, vst = make_segments(72, outs, ranks)
    scale[1] = 1.0
    x = make_x(rows, 72)
    ts = [rs.calibrate_threshold(x, scale[0], 0.5), rs.calibrate_threshold(x, None, 0.3), float("inf")]
    ref = rc.rsparse_reference_compact(x, wt, scale, ts, u, vst, outs=outs, ranks=ranks)
    assert rel_err(ref[:, 64:96], rs.rsparse_reference(x, wt[:, 64:96], None, ts[1])) == 0
    for cfg in (None, dict(split=1, block_n=64)):  # block_n 64 must shrink to 32: no block straddles q and k
        y = rc.rsparse_gemv_compact(x, wt, scale, ts, u, vst, outs=outs, ranks=ranks, config=cfg)
        assert rel_err(y, ref) < 1e-5, cfg


def test_compact_rejects_bad_segments():
    import llmx.kernels.rsparse_compact as rc

    wt, scale, u, vst = make_segments(24, [32, 16], [4, 0])
    x = make_x(1, 24)
    with pytest.raises(ValueError, match="summing"):
        rc.rsparse_gemv_compact(x, wt, scale, [0.1, 0.1], u, vst, outs=[32, 15], ranks=[4, 0])
    with pytest.raises(ValueError, match="multiples of 16"):
        rc.rsparse_gemv_compact(x, wt, scale, [0.1, 0.1], u, vst, outs=[24, 24], ranks=[4, 0])
    with pytest.raises(ValueError, match="one threshold per segment"):
        rc.rsparse_gemv_compact(x, wt, scale, [0.1], u, vst, outs=[32, 16], ranks=[4, 0])
    with pytest.raises(ValueError, match="sum"):
        rc.rsparse_gemv_compact(x, wt, scale, [0.1, 0.1], u, vst, outs=[32, 16], ranks=[4, 4])
    with pytest.raises(ValueError, match="unknown compact config"):
        rc.rsparse_gemv_compact(x, wt, scale, [0.1, 0.1], u, vst, outs=[32, 16], ranks=[4, 0], config={"bk": 2})
    with pytest.raises(ValueError, match="design"):
        rs.rsparse_gemv(x, wt, None, 0.1, config={"design": "tree"})


@pytest.mark.slow  # a subprocess compiling 14 kernels (10-20 s): in the full suite, not in test-fast
def test_kernels_compile_for_h100_without_spilling(tmp_path):
    """Both designs' heuristic configurations (TEAL and R-Sparse, 1 and 8 rows) through Triton's real compiler and
    ptxas to an sm_90 cubin, no GPU needed: what the interpreter cannot check. None may spill registers to the
    stack (more than 64 bytes); a spilling tile is refused here before it reaches a GPU."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "scripts/kernel_resources.py", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    print(proc.stdout[-2500:])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    rows = json.loads((tmp_path / "kernel_resources_sm90_quick.json").read_text())["rows"]
    assert {(r["design"], r["kernel"]) for r in rows} == {("split", "A"), ("split", "B"), ("compact", "P"),
                                                          ("compact", "G")}
    assert all(0 < r["regs"] <= 255 and r["stack"] <= 64 for r in rows)


# ----------------------------------------------------------------------------------------------------
# CUDA only: Llama-7B layer shapes in bf16 against an fp32 reference
# ----------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (out, in) as in the notes: q/o 4096x4096, gate/up 14336x4096, down 4096x14336 (Llama-3-8B / Mistral MLP).
CUDA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def cuda_layer(out_f, in_f, rank, seed=0):
    """bf16 W^T, fp32 scale and random bf16 factors in the kernels' layout (an SVD of these sizes is slow
    and the kernels' math does not depend on the factors being singular vectors)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    wt = (0.02 * torch.randn(in_f, out_f, generator=g, device="cuda")).bfloat16()
    scale = wt.float().norm(dim=1)
    if rank == 0:
        return wt, scale, None, None
    u = (torch.randn(out_f, rank, generator=g, device="cuda") / rank**0.5).bfloat16()
    vs = (0.02 * torch.randn(in_f, rank, generator=g, device="cuda")).bfloat16().t()
    return wt, scale, u, vs


@cuda
@pytest.mark.parametrize("reduction", rs.REDUCTIONS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("out_f,in_f", CUDA_SHAPES)
def test_cuda_llama_shapes_bf16(out_f, in_f, low_rank, rows, reduction):
    if reduction == "memset" and rows == 3:
        pytest.skip("memset: rows 1 and 8 suffice")
    keep, rank = rs.rsparse_allocation(in_f, out_f, 0.5, 0.9 if low_rank else 1.0)
    if low_rank and rows == 3:
        rank = rank // 16 * 16  # aligned factor rows (vectorised loads) next to the paper's unaligned ranks
    wt, scale, u, vs = cuda_layer(out_f, in_f, rank)
    x = torch.randn(rows, in_f, device="cuda").bfloat16()
    t = rs.calibrate_threshold(x, scale, keep)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = rs.rsparse_reference(x.float(), wt, scale, t, u, vs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    errs = []
    for _ in range(3):  # repeated calls: the ticket workspace must come back clean each time
        y = rs.rsparse_gemv(x, wt, scale, t, u, vs, reduction=reduction)
        errs.append(rel_err(y, ref))
    print(f"rsparse-parity cuda {out_f}x{in_f} r={rank} B={rows} {reduction}: rel err vs fp32 "
          + " ".join(f"{e:.2e}" for e in errs))
    assert y.dtype == torch.bfloat16 and max(errs) < 1e-2
    if reduction == "ticket":
        torch.cuda.synchronize()
        ws = rs._WORKSPACES[(wt.device, rows, in_f, out_f, rank)]
        assert not ws["acc"].any() and not ws["z"].any() and not ws["cnt"].any()


@cuda
@pytest.mark.parametrize("rows", [1, 8])
def test_cuda_graph_replay(rows):
    """Captured once, replayed with new inputs: the same results as eager calls (workspace reuse in a graph)."""
    keep, rank = rs.rsparse_allocation(4096, 4096, 0.5, 0.9)
    wt, scale, u, vs = cuda_layer(4096, 4096, rank)
    x = torch.randn(rows, 4096, device="cuda").bfloat16()
    t = rs.calibrate_threshold(x, scale, keep)
    rs.rsparse_gemv(x, wt, scale, t, u, vs)  # creates the workspace outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    half = wt[:, :2048]  # a shape never called eagerly: no workspace, so the graph must fall back to memset
    with torch.cuda.graph(g):
        y = rs.rsparse_gemv(x, wt, scale, t, u, vs)
        with pytest.warns(UserWarning, match="memset"):
            y2 = rs.rsparse_gemv(x, half, None, 1.0)
    for seed in range(3):
        x.copy_(torch.randn(rows, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, rs.rsparse_reference(x.float(), wt, scale, t, u, vs)) < 1e-2
        assert rel_err(y2, rs.rsparse_reference(x.float(), half, None, 1.0)) < 1e-2


@cuda
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("split", [1, 4])
def test_cuda_compact_llama3_qkv_segments_bf16(split, rows):
    """Llama-3-8B's q/k/v (4096 -> 4096 + 1024 + 1024) as three R-Sparse segments in bf16, repeated calls (clean
    workspace) and a CUDA-graph replay with new inputs, against an fp32 reference."""
    import llmx.kernels.rsparse_compact as rc

    outs = [4096, 1024, 1024]
    parts = [cuda_layer(o, 4096, rs.rsparse_allocation(4096, o, 0.5, 0.95)[1] // 16 * 16, seed=i)
             for i, o in enumerate(outs)]
    ranks = [p[2].shape[1] for p in parts]
    wt = torch.cat([p[0] for p in parts], dim=1).contiguous()
    scale = torch.stack([p[1] for p in parts])
    u = torch.cat([p[2].reshape(-1) for p in parts])
    vst = torch.cat([p[3].t() for p in parts], dim=1).contiguous()
    x = torch.randn(rows, 4096, device="cuda").bfloat16()
    ts = [rs.calibrate_threshold(x, scale[i], 0.5 * 0.95) for i in range(3)]
    cfg = dict(split=split)

    def ref():
        return rc.rsparse_reference_compact(x.float(), wt, scale, ts, u, vst, outs=outs, ranks=ranks)

    for _ in range(3):
        y = rc.rsparse_gemv_compact(x, wt, scale, ts, u, vst, outs=outs, ranks=ranks, config=cfg)
        assert y.dtype == torch.bfloat16 and rel_err(y, ref()) < 1e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = rc.rsparse_gemv_compact(x, wt, scale, ts, u, vst, outs=outs, ranks=ranks, config=cfg)
    for seed in range(2):
        x.copy_(torch.randn(rows, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref()) < 1e-2


def sparse_tiny_llama(alpha):
    """A 2-layer Llama with every projection R-Sparse (alpha < 1) or TEAL at 50%, prompts dense, decode sparse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmx.sparse import apply_plan, calibrate, layer_shapes, uniform_plan

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval().to(DEVICE)
    g = torch.Generator().manual_seed(0)
    cal = calibrate(model, [torch.randint(0, 96, (1, 32), generator=g) for _ in range(3)])
    layers = apply_plan(model, cal, uniform_plan(layer_shapes(model), 0.5, alpha), token_mode="decode")
    return model, layers


@pytest.mark.parametrize("alpha", [1.0, 0.7])
@torch.no_grad()
def test_sparse_layers_decode_through_the_fused_kernel(alpha):
    """The product path: decode_layout() holds W once (as W^T), and decode calls of 1..16 rows run the kernel, which
    agrees with the layer's PyTorch math; greedy generation gives the same tokens either way."""
    model, layers = sparse_tiny_llama(alpha)
    assert any(layer.rank > 0 for layer in layers.values()) == (alpha < 1)
    prompt = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for layer in layers.values():
        layer.decode_layout(kernel=False)
    torch_tokens = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for name, layer in layers.items():
        assert layer.weight.data_ptr() == layer.weight_t.data_ptr() and not layer.weight.is_contiguous(), name
        x = torch.randn(3, 1, layer.in_features, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        expected = layer(x)
        layer.decode_layout(kernel=True)
        assert layer.kernel and rel_err(layer(x), expected) < 1e-5, name
        assert rel_err(layer(x[:1]), expected[:1]) < 1e-5, name
        layer.tile = rs.tile_of(dict(design="compact", block_p=16, block_k=8, block_n=16, split=2, num_warps=1))
        assert rel_err(layer(x[:1]), expected[:1]) < 1e-5, name  # a tuned tile of the compacted design
        layer.tile = None
        layer.track = True
        layer(x)
        assert layer.seen_tokens == 3 and layer.active_channels > 0  # counted on the kernel path too
        layer.track = False
    assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0), torch_tokens)


@torch.no_grad()
def test_compiled_decode_path_traces_the_kernel_whole():
    """llmx.sparse.evaluate.greedy_generate's served path: static KV cache, the decode step compiled with
    fullgraph=True (one custom operator per sparse layer, no graph break, each with its tuned tile), the same tokens
    as eager decoding.
    On CUDA the same call uses inductor with CUDA graphs (scripts/bench_rsparse_kernels.py --sections hf)."""
    from llmx.sparse.evaluate import greedy_generate

    model, layers = sparse_tiny_llama(0.7)
    for layer in layers.values():
        layer.decode_layout(kernel=True, tune=True)  # each layer's tile chosen by timing, passed through the operator
        assert rs.config_of(layer.tile) in rs.tile_candidates(layer.out_features)
    assert len(rs._TUNED) <= 10  # one tuning per shape and kept fraction, not per layer (14)
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    eager = greedy_generate(model, prompt, 4, compiled=False)
    assert not hasattr(model, "_compiled_call")
    compiled = greedy_generate(model, prompt, 4, compiled=True, backend="aot_eager")
    assert hasattr(model, "_compiled_call") and torch.equal(compiled, eager)


@torch.no_grad()
def test_teal_q_k_v_and_gate_up_fuse_into_one_launch_each():
    """fuse_shared_inputs: under uniform TEAL, q/k/v and gate/up share one threshold (one calibration sample), so
    each group decodes in one kernel call over its concatenated W^T (the layers' W^T become views of it); the
    tokens equal the unfused kernel path's, eager and compiled; R-Sparse layers are left alone."""
    from llmx.sparse.evaluate import greedy_generate
    from llmx.sparse.rsparse import fuse_shared_inputs

    model, layers = sparse_tiny_llama(1.0)
    for layer in layers.values():
        layer.decode_layout(kernel=True)
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    unfused = greedy_generate(model, prompt, 3, compiled=False)
    calls = []
    original = rs.rsparse_gemv
    rs.rsparse_gemv = lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)
    try:
        greedy_generate(model, prompt, 2, compiled=False)  # the prompt runs dense, then one decode step
        per_step_unfused = len(calls)
        assert fuse_shared_inputs(model) == 4  # 2 blocks x (q/k/v, gate/up)
        calls.clear()
        greedy_generate(model, prompt, 2, compiled=False)  # the prompt runs dense, then one decode step
    finally:
        rs.rsparse_gemv = original
    assert per_step_unfused == 14 and len(calls) == 8  # 7 -> 4 launches per block
    assert (64, 64 + 32 + 32) in calls and (64, 160 + 160) in calls
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.weight_t.data_ptr() == q.group.wt.data_ptr() and q.weight.data_ptr() == q.group.wt.data_ptr()
    assert torch.equal(greedy_generate(model, prompt, 3, compiled=False), unfused)
    assert torch.equal(greedy_generate(model, prompt, 3, compiled=True, backend="aot_eager"), unfused)


@torch.no_grad()
def test_rsparse_q_k_v_and_gate_up_fuse_as_segments():
    """R-Sparse's projections keep their own column-norm masks, thresholds and low-rank terms: fused, each group is
    one call of the compacted kernels with one segment per projection (whose W^T, U and Vs become views of the
    group's), and decoding gives the unfused path's tokens, eager and compiled, also after thresholds change."""
    import llmx.kernels.rsparse_compact as rc
    from llmx.sparse.evaluate import greedy_generate
    from llmx.sparse.rsparse import fuse_shared_inputs

    model, layers = sparse_tiny_llama(0.7)
    for layer in layers.values():
        layer.decode_layout(kernel=True)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert len({m.threshold for m in layers.values()}) > 4 and q.rank > 0  # masks and ranks differ by projection
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    qkv = [layers[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv"]
    expected = [m(x) for m in qkv]
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    unfused = greedy_generate(model, prompt, 2, compiled=False)
    assert fuse_shared_inputs(model, tune=False) == 4
    q.group.tune()  # one group's tile by timing (the interpreter's candidates: a test of the mechanism)
    assert q.group.tile is not None and rs.config_of(q.group.tile)["design"] == "compact"
    assert q.u.data_ptr() == q.group.u.data_ptr() and q.svt.data_ptr() == q.group.vst.data_ptr()
    calls = []
    original = rc.rsparse_gemv_compact
    rc.rsparse_gemv_compact = lambda *a, **k: calls.append(k["outs"]) or original(*a, **k)
    try:
        got = [m(x) for m in qkv]
    finally:
        rc.rsparse_gemv_compact = original
    assert calls == [[64, 32, 32]]  # one call for q, k and v
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-5
    assert torch.equal(greedy_generate(model, prompt, 2, compiled=False), unfused)
    assert torch.equal(greedy_generate(model, prompt, 2, compiled=True, backend="aot_eager"), unfused)
    for layer in qkv:  # sparsity matching scales thresholds after fusing: the group reads them at every call
        layer.threshold *= 1.5
    assert rel_err(q(x), rs.rsparse_reference(x, q.weight_t, q.scale, q.threshold, q.u, q.svt)) < 1e-5


@torch.no_grad()
def test_bf16_layers_choose_the_same_channels_on_both_paths():
    """A bf16 model: the kernel path and the PyTorch path compare |x| * scale in fp32 alike, so they keep the same
    channels, and the outputs agree to bf16 rounding (the kernel accumulates in fp32)."""
    model, layers = sparse_tiny_llama(0.7)
    model.to(torch.bfloat16)
    for name, layer in layers.items():
        x = torch.randn(4, 1, layer.in_features, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
        layer.decode_layout(kernel=False)
        expected = layer(x)
        layer.decode_layout(kernel=True)
        got = layer(x)
        assert got.dtype == torch.bfloat16 and rel_err(got, expected) < 2e-2, name
        ref = rs.rsparse_reference(x.float(), layer.weight_t, layer.scale, layer.threshold, layer.u, layer.svt)
        assert rel_err(got, ref) < 1e-2, name


@pytest.mark.slow  # a subprocess (5-11 s): in the full suite, not in test-fast
def test_the_device_checks_benchmark_runs_its_sections_on_cpu(tmp_path):
    """scripts/bench_rsparse_kernels.py --smoke on CPU (the PyTorch reference in place of the kernels): every section
    the device check runs gets through its Python -- a crash there would only show up on a lent GPU's scarce time."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/bench_rsparse_kernels.py", "--device", "cpu", "--smoke",
                           "--sections", "layer,fused,batch,hf", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "rsparse_kernels_smoke_cpu.json").read_text())
    assert not res["errors"] and {"layer", "fused", "batch", "hf"} <= set(res)
    assert set(res["hf"]["variants"]) == {"dense", "teal", "rsparse", "rsparse_fused"}
    assert all(r["us"]["rsparse_fused"] for r in res["fused"]["rows"])
