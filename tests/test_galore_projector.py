"""GaLore / GaLore 2 projectors (llmx.optim.galore): formulas, equality with galore-torch 1.0, the
reverse_std square case it gets wrong, refresh schedule, randomized SVD accuracy and determinism, fp32
computation for bf16 gradients, Q-GaLore quantization, FSDP2 row shards, Tucker, and tensor-only state."""

from __future__ import annotations

import io

import pytest
import torch

from llmx.config.schema import ProjType, SVDMethod
from llmx.optim.galore import (
    GaLoreProjector,
    TuckerProjector,
    captured_energy,
    dequantize_groupwise,
    exact_basis,
    quantize_groupwise,
    randomized_basis,
)
from llmx.optim.galore.projector import sketch_seed
from llmx.optim.galore.quant import quantized_nbytes

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def decaying(m, n, decay=1.0, seed=0):
    """m x n matrix with singular values i^-decay and random singular vectors."""
    k = min(m, n)
    u = torch.linalg.qr(rand(m, k, seed=seed)).Q
    v = torch.linalg.qr(rand(n, k, seed=seed + 1)).Q
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


def expected_side(shape, proj_type):
    m, n = shape
    return {
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
    }.get(proj_type, proj_type)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor), k
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def llama_grad():
    """mlp.down_proj.weight.grad (128 x 344) of a tiny random Llama after one backward on random tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (4, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    return model.model.layers[0].mlp.down_proj.weight.grad.detach().clone()


# ---------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_exact_basis_is_the_top_singular_subspace(shape):
    g = decaying(*shape)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    r = 12
    left, right, full = (exact_basis(g, r, side) for side in ("left", "right", "full"))
    assert left["P"].shape == (shape[0], r) and right["P"].shape == (r, shape[1])
    torch.testing.assert_close(left["P"] @ left["P"].T, u[:, :r] @ u[:, :r].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(right["P"].T @ right["P"], vh[:r].T @ vh[:r], atol=1e-5, rtol=0)
    torch.testing.assert_close(left["P"].T @ left["P"], torch.eye(r), atol=1e-5, rtol=0)
    assert torch.equal(full["A"], left["P"]) and torch.equal(full["B"], right["P"])
    # Compact copies, not views that would keep the whole U / Vh alive.
    assert left["P"].is_contiguous() and left["P"].untyped_storage().nbytes() == left["P"].numel() * 4


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_projection_formulas(proj_type, shape):
    g, low_in = rand(*shape, seed=1), None
    r, alpha = 16, 0.25
    proj = GaLoreProjector(r, proj_type, scale=alpha)
    proj.refresh(g, 0)
    side = expected_side(shape, proj_type)
    assert proj.side == side
    b = exact_basis(g, r, side)
    low = proj.project(g)
    if side == "right":
        want, low_in = g @ b["P"].T, rand(shape[0], r, seed=2)
        back = low_in @ b["P"]
    elif side == "left":
        want, low_in = b["P"].T @ g, rand(r, shape[1], seed=2)
        back = b["P"] @ low_in
    else:
        want, low_in = b["A"].T @ g @ b["B"].T, rand(r, r, seed=2)
        back = b["A"] @ low_in @ b["B"]
    assert low.shape == want.shape
    torch.testing.assert_close(low, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(proj.project_back(low_in), alpha * back, atol=1e-6, rtol=0)
    assert proj.project_back(low).shape == shape
    assert set(proj.basis()) == set(b) and all(torch.equal(proj.basis()[k], b[k]) for k in b)
    # The exact basis captures all of the best rank-r energy.
    assert captured_energy(g, proj) == pytest.approx(1.0, abs=1e-5)


def test_config_enums_and_bad_arguments():
    proj = GaLoreProjector(8, ProjType.reverse_std, svd=SVDMethod.randomized)
    assert proj.proj_type == "reverse_std" and proj.svd == "randomized"
    for kwargs in ({"proj_type": "diag"}, {"svd": "lanczos"}, {"quant_bits": 2}, {"update_proj_gap": 0}):
        with pytest.raises(ValueError):
            GaLoreProjector(8, **kwargs)
    proj = GaLoreProjector(65)
    with pytest.raises(ValueError, match=r"rank 65.*\(64, 256\)"):
        proj.refresh(rand(64, 256), 0)
    with pytest.raises(RuntimeError):
        proj.project(rand(64, 256))
    proj = GaLoreProjector(8, "left")
    proj.refresh(rand(32, 40), 0)
    with pytest.raises(ValueError, match="expects shape"):
        proj.project_back(rand(32, 8))  # a right-projection shape given to a left projector
    with pytest.raises(ValueError):
        proj.project(rand(40, 32))


# ------------------------------------------------------------------------------------ galore-torch


REF_CASES = [
    ("std", (96, 48)),
    ("std", (48, 96)),
    ("reverse_std", (96, 48)),
    ("reverse_std", (48, 96)),
    ("left", (96, 48)),
    ("left", (48, 96)),
    ("right", (96, 48)),
    ("full", (48, 96)),
    ("full", (64, 64)),
]


@pytest.mark.parametrize("proj_type,shape", REF_CASES)
def test_matches_galore_torch(proj_type, shape):
    from galore_torch.galore_projector import GaLoreProjector as Ref

    r, gap, alpha = 16, 3, 0.25
    ref = Ref(r, update_proj_gap=gap, scale=alpha, proj_type=proj_type)
    ours = GaLoreProjector(r, proj_type, update_proj_gap=gap, scale=alpha)
    for step in range(5):  # refreshes at 0 and 3, reuse in between
        g = rand(*shape, seed=10 + step)
        if ours.needs_refresh(step):
            ours.refresh(g, step)
        low_ref, low = ref.project(g, step), ours.project(g)
        assert low.shape == low_ref.shape
        assert (low - low_ref).abs().max() <= 1e-6
        upd = torch.tanh(low)  # stand-in for the Adam-normalized update
        assert (ours.project_back(upd) - ref.project_back(upd)).abs().max() <= 1e-6
    assert ours.refreshes == 2


def test_reverse_std_with_square_low_rank_gradient():
    """ms-swift PR #10146: galore-torch's reverse_std chooses the back-projection side from the low-rank
    shape, which is wrong when it is square. [64, 256] at rank 64: right projection, low is 64 x 64."""
    from galore_torch.galore_projector import GaLoreProjector as Ref

    g = rand(64, 256, seed=3)
    ref = Ref(64, proj_type="reverse_std")
    low_ref = ref.project(g, 0)
    assert low_ref.shape == (64, 64)
    try:
        back_ref = ref.project_back(low_ref)
        ref_ok = back_ref.shape == g.shape
    except RuntimeError:
        ref_ok = False
    assert not ref_ok, "galore-torch was expected to fail here"

    ours = GaLoreProjector(64, "reverse_std")
    ours.refresh(g, 0)
    assert ours.side == "right"
    low = ours.project(g)
    torch.testing.assert_close(low, low_ref, atol=1e-6, rtol=0)
    back = ours.project_back(low)
    assert back.shape == (64, 256)
    # The rank-64 subspace holds the whole row space of a 64 x 256 matrix: project_back(project(g)) = g.
    torch.testing.assert_close(back, g, atol=1e-4, rtol=0)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("r", [64, 16])
def test_square_gradients(proj_type, r):
    g = rand(64, 64, seed=4)
    proj = GaLoreProjector(r, proj_type)
    proj.refresh(g, 0)
    low = proj.project(g)
    assert low.shape == {"left": (r, 64), "right": (64, r), "full": (r, r)}[proj.side]
    back = proj.project_back(low)
    assert back.shape == (64, 64)
    if r == 64:  # a full-rank orthogonal basis reconstructs exactly
        torch.testing.assert_close(back, g, atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------- schedule


def test_refresh_schedule_and_fixed_side():
    gap = 4
    proj = GaLoreProjector(8, "std", update_proj_gap=gap)
    assert proj.needs_refresh(5)  # no basis yet: refresh whatever the step
    refreshed = []
    for step in range(10):
        g = rand(48, 32, seed=step)  # tall: std projects the right side
        if proj.needs_refresh(step):
            proj.refresh(g, step)
            refreshed.append(step)
        assert proj.side == "right"
    assert refreshed == [0, 4, 8] and proj.refreshes == 3
    p_before = proj.basis()["P"].clone()
    proj.refresh(rand(48, 32, seed=99), 12)
    assert proj.side == "right" and not torch.allclose(proj.basis()["P"], p_before)
    with pytest.raises(ValueError, match="differs"):
        proj.refresh(rand(32, 48), 16)  # a new shape would change the side: refused
    assert proj.side == "right"


# ------------------------------------------------------------------------------------------ randomized


@pytest.mark.parametrize("shape", [(256, 384), (384, 256)])
@pytest.mark.parametrize("power_iters", [1, 2])
def test_randomized_energy_on_decaying_spectrum(shape, power_iters):
    g = decaying(*shape, decay=1.0)
    for side in ("left", "right"):
        proj_type = side
        proj = GaLoreProjector(32, proj_type, svd="randomized", oversample=10, power_iters=power_iters)
        proj.refresh(g, 0)
        assert captured_energy(g, proj) >= 0.99
        p = proj.basis()["P"]
        gram = p.T @ p if side == "left" else p @ p.T
        torch.testing.assert_close(gram, torch.eye(32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [16, 32])
@pytest.mark.parametrize("oversample,power_iters", [(10, 2), (20, 1)])
def test_randomized_energy_on_a_real_gradient(llama_grad, rank, oversample, power_iters):
    assert llama_grad.shape == (128, 344)
    for seed in range(3):
        proj = GaLoreProjector(rank, "std", svd="randomized", oversample=oversample, power_iters=power_iters, seed=seed)
        proj.refresh(llama_grad, 0)
        assert proj.side == "left"
        assert captured_energy(llama_grad, proj) >= 0.99


def test_randomized_full_and_exact_when_sketch_covers_the_range():
    g = decaying(64, 200)
    b = randomized_basis(g, 8, "full", oversample=200, power_iters=0, generator=torch.Generator().manual_seed(0))
    e = exact_basis(g, 8, "full")
    # Width clamps to min(m, n) = 64, the whole column space: the same subspaces as the exact SVD.
    torch.testing.assert_close(b["A"] @ b["A"].T, e["A"] @ e["A"].T, atol=1e-4, rtol=0)
    torch.testing.assert_close(b["B"].T @ b["B"], e["B"].T @ e["B"], atol=1e-4, rtol=0)


def test_randomized_is_deterministic_per_seed_and_refresh_index():
    g = rand(96, 80, seed=5)  # flat spectrum: different sketches give visibly different bases
    gap = 10

    def basis(step, seed=0):
        proj = GaLoreProjector(
            8, "right", update_proj_gap=gap, svd="randomized", oversample=2, power_iters=0, seed=seed
        )
        proj.refresh(g, step)
        return proj.basis()["P"]

    assert torch.equal(basis(0), basis(0))
    assert torch.equal(basis(10), basis(19))  # same refresh index 1
    assert not torch.allclose(basis(0), basis(10), atol=1e-3)
    assert not torch.allclose(basis(0, seed=0), basis(0, seed=1), atol=1e-3)
    assert len({sketch_seed(s, i) for s in range(4) for i in range(1000)}) == 4000


# -------------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_bf16_gradient_gets_an_fp32_basis(svd):
    g32 = decaying(128, 96)
    g = g32.to(torch.bfloat16)
    proj = GaLoreProjector(16, "std", svd=svd, power_iters=2)
    proj.refresh(g, 0)
    assert proj.state_dict()["P"].dtype == torch.bfloat16
    if svd == "exact":
        # Computed from the upcast gradient in fp32, then rounded once to bf16.
        assert torch.equal(proj.state_dict()["P"], exact_basis(g.float(), 16, "right")["P"].to(torch.bfloat16))
    ref = exact_basis(g32, 16, "right")["P"]
    p = proj.basis()["P"]
    torch.testing.assert_close(p.T @ p, ref.T @ ref, atol=2e-2, rtol=0)  # bf16 rounding of g and P
    low = proj.project(g)
    # the products are accumulated and returned in fp32; the update goes back in the gradient's dtype
    assert low.dtype == torch.float32 and proj.project_back(low).dtype == torch.bfloat16
    assert captured_energy(g, proj) >= 0.98


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [64, 256])
def test_quantization_error_bound(bits, group_size):
    t = rand(1000, seed=6) * torch.linspace(0.01, 3.0, 1000)  # groups with different ranges; 1000 % 64 != 0
    codes, scale, zero = quantize_groupwise(t, bits, group_size)
    groups = -(-1000 // group_size)
    assert codes.dtype == torch.uint8 and scale.shape == zero.shape == (groups,)
    assert codes.numel() == groups * group_size // (8 // bits)
    back = dequantize_groupwise(codes, scale, zero, bits, group_size, t.shape)
    assert back.shape == t.shape and back.dtype == torch.float32
    err = torch.zeros(groups * group_size)
    err[:1000] = (back - t).abs()
    per_group = err.view(groups, group_size).amax(dim=1)
    assert (per_group <= scale / 2 * (1 + 1e-5) + 1e-7).all()
    # A constant tensor comes back exactly.
    c = torch.full((3, 5), 0.3)
    assert torch.equal(dequantize_groupwise(*quantize_groupwise(c, bits, 4), bits, 4, c.shape), c)


def test_int4_packs_two_codes_per_byte():
    t = torch.tensor([0.0, 15.0, 1.0, 14.0, 7.0])  # one group: min 0, max 15, scale 1, codes = values
    codes, scale, zero = quantize_groupwise(t, 4, 8)
    assert scale.tolist() == [1.0] and zero.tolist() == [0.0]
    # Low nibble first; the group is padded with its last value (7) to 8 codes = 4 bytes.
    assert codes.tolist() == [0 | 15 << 4, 1 | 14 << 4, 7 | 7 << 4, 7 | 7 << 4]
    assert torch.equal(dequantize_groupwise(codes, scale, zero, 4, 8, t.shape), t)
    with pytest.raises(ValueError):
        quantize_groupwise(t, 3, 8)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_quantized_projector_close_to_fp32(bits, tol, proj_type):
    g = decaying(256, 384)
    q = GaLoreProjector(32, proj_type, quant_bits=bits, quant_group_size=256)
    f = GaLoreProjector(32, proj_type)
    q.refresh(g, 0)
    f.refresh(g, 0)
    a, b = q.project_back(q.project(g)), f.project_back(f.project(g))
    assert float((a - b).norm() / b.norm()) < tol
    sd = q.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert all(v.dtype == torch.uint8 for k, v in sd.items() if k.endswith(".codes"))
    full_bytes = sum(t.numel() * 4 for t in f.state_dict().values() if t.dtype == torch.float32)
    q_bytes = sum(t.numel() * t.element_size() for k, t in sd.items() if "." in k)
    assert q_bytes < full_bytes * (bits / 32 + 0.05)
    assert q_bytes == sum(quantized_nbytes(t.numel(), bits, 256) for t in f.state_dict().values() if t.ndim == 2)
    loaded = GaLoreProjector(32, proj_type, quant_bits=bits, quant_group_size=256)
    loaded.load_state_dict(roundtrip(sd))
    assert_same_state(loaded.state_dict(), sd)
    assert torch.equal(loaded.project(g), q.project(g))


# -------------------------------------------------------------------------------------------- row shards


@pytest.mark.parametrize(
    "proj_type,shape", [("right", (96, 48)), ("left", (96, 48)), ("std", (48, 96)), ("full", (96, 64))]
)
def test_row_shards(proj_type, shape):
    g = rand(*shape, seed=7)
    proj = GaLoreProjector(16, proj_type, scale=0.5)
    proj.refresh(g, 0)
    full_low = proj.project(g)
    shards = [slice(0, 40), slice(40, shape[0])]
    parts = [proj.project(g[s], rows=s) for s in shards]
    if proj.side == "right":
        torch.testing.assert_close(torch.cat(parts), full_low, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(parts[0] + parts[1], full_low, atol=1e-5, rtol=0)  # the all-reduce
    upd = torch.tanh(full_low)
    full_back = proj.project_back(upd)
    for s in shards:
        shard_upd = upd[s] if proj.side == "right" else upd
        torch.testing.assert_close(proj.project_back(shard_upd, rows=s), full_back[s], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ Tucker


def low_multilinear_rank(shape, ranks, seed=0):
    core = rand(*ranks, seed=seed)
    x = core
    for k, (d, r) in enumerate(zip(shape, ranks)):
        u = torch.linalg.qr(rand(d, r, seed=seed + 1 + k)).Q
        x = torch.movedim(torch.tensordot(u, x, dims=([1], [k])), 0, k)
    return x


def test_tucker_reconstructs_a_low_multilinear_rank_tensor():
    shape, ranks = (6, 5, 4, 7), (3, 2, 4, 3)
    g = low_multilinear_rank(shape, ranks)
    proj = TuckerProjector(list(ranks), scale=1.0)
    proj.refresh(g, 0)
    core = proj.project(g)
    assert core.shape == ranks
    torch.testing.assert_close(proj.project_back(core), g, atol=1e-5, rtol=0)
    assert TuckerProjector(5).ranks_for(shape) == [5, 5, 4, 5]  # an int rank is clamped per mode
    with pytest.raises(ValueError):
        TuckerProjector([3, 6, 4, 3]).refresh(g, 0)


def test_tucker_refreshes_and_projects_back_its_argument():
    shape, ranks, gap = (6, 5, 4, 7), (3, 2, 2, 3), 5
    g1, g2 = low_multilinear_rank(shape, ranks, seed=0), low_multilinear_rank(shape, ranks, seed=50)
    proj = TuckerProjector(list(ranks), update_proj_gap=gap, scale=0.5)
    refreshed = []
    for step in range(11):
        if proj.needs_refresh(step):
            proj.refresh(g1 if step < gap else g2, step)
            refreshed.append(step)
    assert refreshed == [0, 5, 10] and proj.refreshes == 3
    # The basis follows g2 now (the reference computes it once and keeps g1's forever).
    torch.testing.assert_close(proj.project_back(proj.project(g2)), 0.5 * g2, atol=1e-5, rtol=0)
    # project_back maps the tensor it is given (the reference returns the stored projected gradient).
    core = proj.project(g2)
    upd = torch.tanh(core)
    torch.testing.assert_close(proj.project_back(2 * upd), 2 * proj.project_back(upd), atol=1e-6, rtol=0)
    assert torch.count_nonzero(proj.project_back(torch.zeros(ranks))) == 0
    back = proj.project_back(upd)
    # Explicit formula: upd x_k U_k over all modes, times scale.
    want = upd
    for k, u in enumerate(proj.basis().values()):
        want = torch.movedim(torch.tensordot(u, want, dims=([1], [k])), 0, k)
    torch.testing.assert_close(back, 0.5 * want, atol=1e-6, rtol=0)
    # Row shards of dim 0: partial sums of the core, rows of the back-projection.
    s = [slice(0, 2), slice(2, 6)]
    partial = [proj.project(g2[rows], rows=rows) for rows in s]
    torch.testing.assert_close(partial[0] + partial[1], core, atol=1e-5, rtol=0)
    torch.testing.assert_close(proj.project_back(upd, rows=s[1]), back[s[1]], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize(
    "kwargs",
    [
        {"proj_type": "std"},
        {"proj_type": "reverse_std", "svd": "randomized", "seed": 3},
        {"proj_type": "full", "svd": "randomized"},
        {"proj_type": "left", "quant_bits": 4, "quant_group_size": 64},
    ],
)
def test_state_dict_is_tensors_only_and_round_trips(kwargs):
    g = rand(48, 80, seed=8).to(torch.bfloat16)
    proj = GaLoreProjector(8, update_proj_gap=3, **kwargs)
    fresh = GaLoreProjector(8, update_proj_gap=3, **kwargs)
    fresh.load_state_dict(roundtrip(proj.state_dict()))  # before the first refresh
    assert fresh.side is None and fresh.needs_refresh(1)
    for step in range(4):
        if proj.needs_refresh(step):
            proj.refresh(g if step == 0 else g * -1.5, step)
    sd = proj.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh.load_state_dict(roundtrip(sd))
    assert_same_state(fresh.state_dict(), sd)
    assert fresh.side == proj.side and fresh.refreshes == 2 and not fresh.needs_refresh(4)
    assert torch.equal(fresh.project(g), proj.project(g))
    low = proj.project(g)
    assert torch.equal(fresh.project_back(low), proj.project_back(low))
    # A different rank, or state saved with the other quantization setting, is refused.
    with pytest.raises(ValueError):
        GaLoreProjector(4, update_proj_gap=3, **kwargs).load_state_dict(sd)
    with pytest.raises(ValueError, match="quant_bits"):
        other = dict(kwargs, quant_bits=None if kwargs.get("quant_bits") else 8)
        GaLoreProjector(8, update_proj_gap=3, **other).load_state_dict(sd)


def test_tucker_state_dict_round_trips():
    g = rand(6, 5, 4, 3, seed=9)
    proj = TuckerProjector(2, update_proj_gap=2)
    proj.refresh(g, 0)
    sd = proj.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = TuckerProjector(2, update_proj_gap=2)
    fresh.load_state_dict(roundtrip(sd))
    assert_same_state(fresh.state_dict(), sd)
    assert torch.equal(fresh.project(g), proj.project(g)) and not fresh.needs_refresh(1)
