"""The fused GaLore-Adam step (llmx.kernels.galore_step) against its PyTorch reference, and the reference
against a float64 re-implementation and galore-torch.

Without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before the kernel
module is imported (hence the environment line above the imports). What the interpreter cannot show:
bf16 tensor-core products (it cannot feed bf16 to tl.dot, so the kernel's "bf16" mode rounds the
operands to bf16 and multiplies in fp32 there), TF32 rounding (its "tf32" dot is exact fp32), and the
GPU's memory ordering in the split-K fix-up (programs run one after another). The CUDA tests at the
bottom cover those, at a 7B layer shape.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

import llmx.kernels.galore_step as gs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not gs.fused_available("cpu"):
    # Imported earlier in this session without the interpreter (its kernels are then bound to a GPU
    # driver): re-run the module's @triton.jit decorators now that the variable is set.
    gs = importlib.reload(gs)

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, scale=0.25)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the expected tensor."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def fro_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return (torch.linalg.norm(actual.double() - expected) / torch.linalg.norm(expected)).item()


def make_problem(m, n, r, side, *, seed=0, device=DEVICE, dtype=torch.float32, warm_moments=False):
    """Weight, orthonormal basis, zero (or warm) moments, and three gradients; all fp32 unless dtype says."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(m, n, generator=g)  # an LLM's init scale: W's rounding stays far below the update
    basis = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=g, dtype=torch.float64))[0]
    basis = (basis if side == "left" else basis.T).float().contiguous()
    low = (r, n) if side == "left" else (m, r)
    grads = [torch.randn(m, n, generator=g) for _ in range(3)]
    if warm_moments:
        # Moments of a run in progress: V bounded away from zero keeps N = M / sqrt(V) well conditioned
        # (at t = 1 from zero moments N is sign(low), which flips under any rounding of small entries).
        sigma2 = float(min(m, n) if side == "left" else n)  # variance of an entry of low
        exp_avg = 0.3 * math.sqrt(sigma2) * torch.randn(low, generator=g)
        exp_avg_sq = sigma2 * (0.5 + torch.rand(low, generator=g))
    else:
        exp_avg, exp_avg_sq = torch.zeros(low), torch.zeros(low)
    to = dict(device=device, dtype=dtype)
    return dict(param=w.to(**to), basis=basis.to(device), exp_avg=exp_avg.to(device), exp_avg_sq=exp_avg_sq.to(device),
                grads=[x.to(**to) for x in grads])


def clone_problem(p, dtype=None):
    out = {k: v.clone() if torch.is_tensor(v) else [x.clone() for x in v] for k, v in p.items()}
    if dtype is not None:
        out = {k: v.to(dtype) if torch.is_tensor(v) else [x.to(dtype) for x in v] for k, v in out.items()}
    return out


def run_steps(fn, p, side, weight_decay, steps=(1, 2, 3), **kw):
    for t, grad in zip(steps, p["grads"]):
        fn(p["param"], grad, p["basis"], side, p["exp_avg"], p["exp_avg_sq"], step=t, weight_decay=weight_decay,
           **{**HP, **kw})


# ----------------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------------


def float64_step(w, grad, basis, side, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, scale, weight_decay):
    """galore-torch's AdamW step for one projected matrix, written out in float64 (returns new tensors)."""
    w, grad, basis, exp_avg, exp_avg_sq = (x.double() for x in (w, grad, basis, exp_avg, exp_avg_sq))
    low = basis.T @ grad if side == "left" else grad @ basis.T
    exp_avg = beta1 * exp_avg + (1 - beta1) * low
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * low * low
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    norm = exp_avg / (exp_avg_sq.sqrt() + eps)
    update = (basis @ norm if side == "left" else norm @ basis) * scale
    w = w - step_size * update
    if weight_decay > 0:
        w = w - lr * weight_decay * w
    return w, exp_avg, exp_avg_sq


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reference_matches_float64(side, weight_decay):
    p = make_problem(48, 40, 8, side, device="cpu")
    w0 = p["param"].clone()
    w, m, v = p["param"].double(), p["exp_avg"].double(), p["exp_avg_sq"].double()
    for t, grad in enumerate(p["grads"], start=1):
        w, m, v = float64_step(w, grad, p["basis"], side, m, v, step=t, weight_decay=weight_decay, **HP)
    run_steps(gs.galore_adam_step_reference, p, side, weight_decay)
    assert rel_err(p["exp_avg"], m) < 1e-6
    assert rel_err(p["exp_avg_sq"], v) < 1e-6
    assert rel_err(p["param"] - w0, w - w0.double()) < 1e-5  # the update itself, not W (which barely moves)


@pytest.mark.parametrize("side,shape", [("left", (24, 40)), ("right", (40, 24))])  # galore-torch's own choice
def test_reference_matches_galore_torch(side, shape):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = galore_torch.GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 100, "scale": HP["scale"],
                                     "proj_type": "std"}], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]),
                                   eps=HP["eps"], weight_decay=0.1, no_deprecation_warning=True)
    mine = w.detach().clone()
    grads = [torch.randn(*shape) for _ in range(3)]
    for t, grad in enumerate(grads, start=1):
        w.grad = grad.clone()
        opt.step()
        state = opt.state[w]
        if t == 1:  # the basis galore-torch computed from the first gradient (kept for 100 steps)
            basis = state["projector"].ortho_matrix.clone()
            exp_avg, exp_avg_sq = torch.zeros_like(state["exp_avg"]), torch.zeros_like(state["exp_avg_sq"])
        gs.galore_adam_step_reference(mine, grad, basis, side, exp_avg, exp_avg_sq, step=t, weight_decay=0.1, **HP)
    assert torch.allclose(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert torch.allclose(mine, w.detach(), rtol=1e-5, atol=1e-7)


def test_reference_rejects_bad_arguments():
    p = make_problem(32, 24, 8, "left", device="cpu")
    args = (p["param"], p["grads"][0], p["basis"])
    kw = dict(step=1, weight_decay=0.0, **HP)
    with pytest.raises(ValueError, match="side"):
        gs.galore_adam_step_reference(*args, "full", p["exp_avg"], p["exp_avg_sq"], **kw)
    with pytest.raises(ValueError, match="basis"):
        gs.galore_adam_step_reference(*args, "right", p["exp_avg"], p["exp_avg_sq"], **kw)
    with pytest.raises(ValueError, match="low-rank shape"):
        gs.galore_adam_step_reference(*args, "left", p["exp_avg"].T, p["exp_avg_sq"], **kw)
    with pytest.raises(ValueError, match="step"):
        gs.galore_adam_step_reference(*args, "left", p["exp_avg"], p["exp_avg_sq"], **{**kw, "step": 0})


# ----------------------------------------------------------------------------------------------------
# the fused kernels (the interpreter on CPU)
# ----------------------------------------------------------------------------------------------------


def test_fused_available():
    assert gs.fused_available(DEVICE)
    assert not gs.fused_available("meta")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("side,m,n,r", [("left", 70, 45, 16), ("right", 70, 45, 16),
                                        ("left", 96, 200, 32), ("right", 96, 200, 32)])
def test_fused_matches_reference_fp32(side, m, n, r, weight_decay):
    """Shapes that are not multiples of the tiles, three consecutive steps (t = 1..3), exact fp32 dots."""
    p = make_problem(m, n, r, side)
    ref = clone_problem(p)
    w0 = p["param"].clone()
    run_steps(gs.galore_adam_step_fused, p, side, weight_decay, precision="ieee")
    run_steps(gs.galore_adam_step_reference, ref, side, weight_decay)
    assert rel_err(p["exp_avg"], ref["exp_avg"]) < 1e-5
    assert rel_err(p["exp_avg_sq"], ref["exp_avg_sq"]) < 1e-5
    assert rel_err(p["param"] - w0, ref["param"] - w0) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("split_k", [1, 2, 3, 64])  # 64 exceeds the K steps: it is capped, no empty splits
def test_fused_split_k(side, split_k):
    """The serial split-K fix-up (the last program to arrive sums the partials in order) gives the same step."""
    p = make_problem(100, 72, 16, side)  # K = 100 (left) or 72 (right): 7 or 5 steps of 16
    ref = clone_problem(p)
    run_steps(gs.galore_adam_step_fused, p, side, 0.1, precision="ieee", split_k=split_k)
    run_steps(gs.galore_adam_step_reference, ref, side, 0.1)
    for name in ("exp_avg", "exp_avg_sq", "param"):
        assert rel_err(p[name], ref[name]) < 1e-5, name


# On a GPU, tf32 really rounds the dot operands to 10 mantissa bits (6.4e-5 measured on an H100).
@pytest.mark.parametrize("precision,tol", [("tf32", 1e-5 if DEVICE == "cpu" else 1e-3), ("bf16", 1e-2)])
def test_fused_precisions_in_interpreter(precision, tol):
    """tf32 is exact fp32 in the interpreter (a looser bound on a GPU, where it is real tf32); bf16 rounds
    the dot operands (emulated in the interpreter: see the module doc)."""
    p = make_problem(70, 96, 16, "left", warm_moments=True)
    ref = clone_problem(p)
    w0 = p["param"].clone()
    run_steps(gs.galore_adam_step_fused, p, "left", 0.1, precision=precision)
    run_steps(gs.galore_adam_step_reference, ref, "left", 0.1)
    assert fro_err(p["exp_avg"], ref["exp_avg"]) < tol
    assert fro_err(p["exp_avg_sq"], ref["exp_avg_sq"]) < tol
    assert fro_err(p["param"] - w0, ref["param"] - w0) < tol
    if precision == "bf16":
        assert fro_err(p["exp_avg"], ref["exp_avg"]) > 1e-6  # the operands really were rounded


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.float16])  # fp16: both operands 16-bit, fp16 dot
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_fp16_params(side, basis_dtype):
    """fp16 param and grad (fp32 moments) against the reference run on fp32 copies of the same values."""
    p = make_problem(70, 45, 16, side, dtype=torch.float16)
    p["basis"] = p["basis"].to(basis_dtype)
    ref = clone_problem(p, dtype=torch.float32)
    ref16 = clone_problem(p)
    w0 = p["param"].float()
    run_steps(gs.galore_adam_step_fused, p, side, 0.1, precision="ieee")
    run_steps(gs.galore_adam_step_reference, ref, side, 0.1)
    run_steps(gs.galore_adam_step_reference, ref16, side, 0.1)
    assert p["param"].dtype == torch.float16
    # fp16 grads upcast exactly, so the moments match like fp32 ones.
    assert rel_err(p["exp_avg"], ref["exp_avg"]) < 1e-5
    assert rel_err(p["exp_avg_sq"], ref["exp_avg_sq"]) < 1e-5
    # The weight is rounded to fp16 after every step: three half-ulps (2**-11 relative) at most.
    wmax = ref["param"].abs().max().item()
    assert (p["param"].float() - ref["param"]).abs().max() <= 3 * 2**-11 * wmax
    assert rel_err(p["param"].float() - w0, ref["param"] - w0) < 2e-2
    # Against the reference on the same fp16 tensors: both round once per step, from nearly equal fp32.
    assert (p["param"].float() - ref16["param"].float()).abs().max() <= 2**-10 * wmax


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.bfloat16])  # bf16: the down-projection's dot is bf16
def test_fused_bf16_storage_in_interpreter(basis_dtype):
    """bf16 param, grad and moments: the kernels load them as fp32 and round-to-nearest-even on store."""
    p = make_problem(64, 48, 16, "right", dtype=torch.bfloat16)
    p["exp_avg"], p["exp_avg_sq"] = p["exp_avg"].bfloat16(), p["exp_avg_sq"].bfloat16()
    p["basis"] = p["basis"].to(basis_dtype)
    ref = clone_problem(p)
    run_steps(gs.galore_adam_step_fused, p, "right", 0.1, precision="ieee")
    run_steps(gs.galore_adam_step_reference, ref, "right", 0.1)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert p[name].dtype == torch.bfloat16
        # Same fp32 values rounded the same way; a value within rounding of a tie may land one ulp apart.
        ulp = ref[name].float().abs() * 2**-7
        assert ((p[name].float() - ref[name].float()).abs() <= ulp + 1e-30).all(), name
        assert (p[name] == ref[name]).float().mean() > 0.99, name


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_mutates_exactly_its_tensors(side):
    p = make_problem(40, 56, 8, side, seed=3)
    grad = p["grads"][0]
    before = {k: v.clone() for k, v in p.items() if torch.is_tensor(v)}
    grad_before = grad.clone()
    ptrs = {k: v.data_ptr() for k, v in p.items() if torch.is_tensor(v)}
    out = gs.galore_adam_step_fused(p["param"], grad, p["basis"], side, p["exp_avg"], p["exp_avg_sq"], step=1,
                                    weight_decay=0.1, **HP)
    assert out is None
    assert {k: v.data_ptr() for k, v in p.items() if torch.is_tensor(v)} == ptrs
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert not torch.equal(p[name], before[name]), f"{name} was not updated in place"
    assert torch.equal(p["basis"], before["basis"]) and torch.equal(grad, grad_before)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_handles_strided_views(side):
    """Transposed param/moments/grad/basis views and a sliced grad give the same step as contiguous tensors."""
    m, n, r = 48, 72, 16
    p = make_problem(m, n, r, side, seed=5, warm_moments=True)
    ref = clone_problem(p)
    # Views onto transposed storage: updates must land in the storage behind them.
    w_store = p["param"].T.contiguous()
    m_store, v_store = p["exp_avg"].T.contiguous(), p["exp_avg_sq"].T.contiguous()
    basis_view = p["basis"].T.contiguous().T
    wide = torch.zeros(m, 2 * n, device=DEVICE)
    wide[:, ::2] = p["grads"][0]
    grad_views = [wide[:, ::2], p["grads"][1].T.contiguous().T, p["grads"][2]]
    assert not (w_store.T.is_contiguous() or basis_view.is_contiguous() or grad_views[0].is_contiguous())
    for t, g in enumerate(grad_views, start=1):
        gs.galore_adam_step_fused(w_store.T, g, basis_view, side, m_store.T, v_store.T, step=t, weight_decay=0.1,
                                  **HP)
    run_steps(gs.galore_adam_step_reference, ref, side, 0.1)
    assert rel_err(w_store.T, ref["param"]) < 1e-6
    assert rel_err(m_store.T, ref["exp_avg"]) < 1e-5
    assert rel_err(v_store.T, ref["exp_avg_sq"]) < 1e-5


def test_fused_rejects_bad_arguments():
    p = make_problem(32, 24, 8, "left")
    args = (p["param"], p["grads"][0], p["basis"], "left")
    kw = dict(step=1, weight_decay=0.0, **HP)
    with pytest.raises(ValueError, match="broadcast"):
        gs.galore_adam_step_fused(*args, p["exp_avg"][:1].expand(8, 24), p["exp_avg_sq"], **kw)
    with pytest.raises(ValueError, match="precision"):
        gs.galore_adam_step_fused(*args, p["exp_avg"], p["exp_avg_sq"], precision="fp8", **kw)
    with pytest.raises(ValueError, match="side"):
        gs.galore_adam_step_fused(*args[:3], "full", p["exp_avg"], p["exp_avg_sq"], **kw)
    with pytest.raises(ValueError, match="param"):
        gs.galore_adam_step_fused(p["param"].T, *args[1:], p["exp_avg"], p["exp_avg_sq"], **kw)
    with pytest.raises(TypeError, match="dtype"):
        gs.galore_adam_step_fused(*args, p["exp_avg"].double(), p["exp_avg_sq"], **kw)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="CUDA"):
            gs.galore_adam_step_fused(*(x.to("meta") if torch.is_tensor(x) else x for x in args),
                                      p["exp_avg"].to("meta"), p["exp_avg_sq"].to("meta"), **kw)


# ----------------------------------------------------------------------------------------------------
# CUDA only: a 7B layer (Llama-2-7B MLP, 4096 x 11008) at rank 1024, and a small rank for split-K
# ----------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Relative Frobenius errors against the fp32 reference (cuBLAS, TF32 off), warm moments, three steps.
# tf32 rounds operands to 10 mantissa bits (relative 2**-11), bf16 to 7 (2**-8); errors average over the
# reduction, so these bounds hold with a margin of several times. torchao saw ~1e-3 on exp_avg with TF32.
CUDA_TOL = {"ieee": 3e-5, "tf32": 5e-3, "bf16": 3e-2}


@cuda
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("side,m,n", [("left", 4096, 11008), ("right", 11008, 4096)])
def test_cuda_7b_shape(side, m, n, precision):
    p = make_problem(m, n, 1024, side, warm_moments=True)
    ref = clone_problem(p)
    w0 = p["param"].clone()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        run_steps(gs.galore_adam_step_reference, ref, side, 0.1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    run_steps(gs.galore_adam_step_fused, p, side, 0.1, precision=precision)
    errs = {name: fro_err(p[name], ref[name]) for name in ("exp_avg", "exp_avg_sq")}
    errs["update"] = fro_err(p["param"] - w0, ref["param"] - w0)
    print(f"galore-parity {side} {m}x{n} r=1024 {precision}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert all(v < CUDA_TOL[precision] for v in errs.values()), errs


@cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_bf16_params(precision):
    """bf16 weights, grads and moments (mixed-precision training) against the reference on the same tensors."""
    p = make_problem(4096, 11008, 1024, "left", dtype=torch.bfloat16, warm_moments=True)
    p["exp_avg"], p["exp_avg_sq"] = p["exp_avg"].bfloat16(), p["exp_avg_sq"].bfloat16()
    ref = clone_problem(p)
    w0 = p["param"].float()
    # lr 0.1 makes a step ~15 bf16 ulps of W, so that the update, not W's rounding, is what gets compared:
    # where the two fp32 results straddle a rounding boundary they still land one ulp apart.
    run_steps(gs.galore_adam_step_reference, ref, "left", 0.1, lr=0.1)
    run_steps(gs.galore_adam_step_fused, p, "left", 0.1, lr=0.1, precision=precision)
    errs = {name: fro_err(p[name].float(), ref[name].float()) for name in ("exp_avg", "exp_avg_sq")}
    errs["update"] = fro_err(p["param"].float() - w0, ref["param"].float() - w0)
    print(f"galore-parity bf16 tensors {precision}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    assert errs["exp_avg"] < 1e-2 and errs["exp_avg_sq"] < 1e-2 and errs["update"] < 5e-2, errs
    wmax = ref["param"].float().abs().max()
    assert (p["param"].float() - ref["param"].float()).abs().max() <= 4 * 2**-8 * wmax


@cuda
@pytest.mark.parametrize("side,m,n", [("left", 4096, 4096), ("right", 11008, 4096)])
def test_cuda_split_k_small_rank(side, m, n):
    """r = 128 leaves fewer output tiles than SMs, so the default splits K; the result must be deterministic."""
    p = make_problem(m, n, 128, side, warm_moments=True)
    runs = []
    for split_k in (None, None, 1):
        q = clone_problem(p)
        run_steps(gs.galore_adam_step_fused, q, side, 0.1, precision="tf32", split_k=split_k)
        runs.append(q)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(runs[0][name], runs[1][name]), f"{name} differs between identical runs"
    # Split or not, only the summation order differs (tf32 rounds the same operands the same way).
    assert fro_err(runs[0]["exp_avg"], runs[2]["exp_avg"]) < 1e-5
    assert fro_err(runs[0]["param"] - p["param"], runs[2]["param"] - p["param"]) < 3e-5
