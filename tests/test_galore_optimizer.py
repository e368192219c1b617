"""GaLoreAdamW / GaLoreAdamW8bit (llmx.optim.galore): agreement with galore-torch, moments at a subspace
switch, tensor-only checkpoints, 8-bit states, the config builder, and the trainer (layer-wise mode with
accumulation, kill-and-resume)."""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import REPO, TINY, run_llmx, train_losses
from llmx.optim import GaLoreAdamW, GaLoreAdamW8bit

LR = 1e-2


def mlp(seed=0, sizes=(48, 20, 64, 8)):
    """Linear layers of both orientations: 20x48 (m < n: left under std) and 64x20 (m > n: right)."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def galore_groups(m, rank=4, **extra):
    weights = [m[0].weight, m[2].weight]
    rest = [p for p in m.parameters() if all(p is not w for w in weights)]
    return [{"params": rest, "weight_decay": 0.01},
            {"params": weights, "rank": rank, "update_proj_gap": 3, "scale": 0.25, "weight_decay": 0.1, **extra}]


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, model[0].in_features, generator=g)
    y = torch.randn(32, model[-1].out_features, generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_matches_galore_torch(proj_type):
    from galore_torch import GaLoreAdamW as Reference

    ours_model, ref_model = mlp(), mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's AdamW announces its own deprecation
        ref = Reference(galore_groups(ref_model, proj_type=proj_type), lr=LR)
    ours = GaLoreAdamW(galore_groups(ours_model, proj_type=proj_type), lr=LR)
    worst = 0.0
    for _ in range(8):  # refreshes at steps 0, 3, 6
        train(ours_model, ours, 1)
        train(ref_model, ref, 1)
        worst = max(worst, max_diff(ours_model, ref_model))
    print(f"max |ours - galore_torch| over 8 steps ({proj_type}): {worst:.3g}")
    assert worst <= 1e-6
    sides = {ours._projectors[p].side for p in (ours_model[0].weight, ours_model[2].weight)}
    assert sides == {"std": {"left", "right"}, "reverse_std": {"left", "right"}}.get(proj_type, {proj_type})


def test_state_is_tensor_only_and_resume_is_exact():
    model = mlp()
    opt = GaLoreAdamW(galore_groups(model), lr=LR)
    train(model, opt, 4)
    sd = roundtrip(opt.state_dict())  # weights_only: no pickled projector objects
    state = sd["state"][4]  # the first GaLore weight (after the 4 plain parameters)
    assert {"step", "exp_avg", "exp_avg_sq", "projector.P", "projector.side"} <= set(state)
    assert all(torch.is_tensor(v) for st in sd["state"].values() for v in st.values())

    resumed_model = copy.deepcopy(model)
    resumed = GaLoreAdamW(galore_groups(resumed_model), lr=LR)
    resumed.load_state_dict(sd)
    # Steps 5 and 6 use the basis of the refresh at step 3: only a restored projector gives the same.
    assert train(resumed_model, resumed, 4) == train(model, opt, 4)
    assert max_diff(model, resumed_model) == 0.0


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)], ids=["left", "right"])
def test_moment_policies_at_a_refresh(shape):
    """reproject rotates M by R = P_new^T P_old (left: R M) or P_old P_new^T (right: M R), V by R∘R;
    reset zeroes both and restarts the bias correction."""
    left = shape[0] < shape[1]
    gens = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gens) for _ in range(4)]
    for policy in ("keep", "reproject", "reset"):
        p = nn.Parameter(torch.zeros(shape))
        opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": 3, "scale": 1.0}], lr=LR, moments=policy)
        for g in grads[:3]:
            p.grad = g.clone()
            opt.step()
        st = opt.state[p]
        m_old, v_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
        p_old = st["projector.P"].clone()
        p.grad = grads[3].clone()
        opt.step()  # step 3: refresh
        p_new = st["projector.P"]
        if left:
            low, r = p_new.T @ grads[3], p_new.T @ p_old
            rotated = (r @ m_old, (r * r) @ v_old)
        else:
            low, r = grads[3] @ p_new.T, p_old @ p_new.T
            rotated = (m_old @ r, v_old @ (r * r))
        expected_m, expected_v = {"keep": (m_old, v_old), "reproject": rotated,
                                  "reset": (torch.zeros_like(m_old), torch.zeros_like(v_old))}[policy]
        torch.testing.assert_close(st["exp_avg"], 0.9 * expected_m + 0.1 * low, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], 0.999 * expected_v + 0.001 * low * low, rtol=1e-5, atol=1e-9)
        assert (st["exp_avg_sq"] >= 0).all()
        if policy == "reset":
            assert int(st["moment_step"]) == 1 and int(st["step"]) == 4


def test_tucker_projector_for_conv_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    x = torch.randn(6, 4, 7, 7)
    opt = GaLoreAdamW([{"params": [conv.bias]}, {"params": [conv.weight], "rank": 2, "update_proj_gap": 2}],
                      lr=LR, moments="reproject")
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = conv(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    st = opt.state[conv.weight]
    assert opt._projectors[conv.weight].side == "tucker" and tuple(st["exp_avg"].shape) == (2, 2, 2, 2)
    assert {"projector.U0", "projector.U3"} <= set(st) and losses[-1] < losses[0]
    clone = copy.deepcopy(conv)
    opt2 = GaLoreAdamW([{"params": [clone.bias]}, {"params": [clone.weight], "rank": 2, "update_proj_gap": 2}],
                       lr=LR, moments="reproject")
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for c, o in ((conv, opt), (clone, opt2)):
        o.zero_grad()
        c(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(conv.weight, clone.weight)


def test_8bit_states_close_smaller_and_exact_on_resume():
    sizes = (96, 40, 128, 16)
    a, b = mlp(sizes=sizes), mlp(sizes=sizes)
    start = copy.deepcopy(a)
    o32 = GaLoreAdamW(galore_groups(a, rank=8), lr=LR)
    o8 = GaLoreAdamW8bit(galore_groups(b, rank=8), lr=LR, min_8bit_size=256)
    train(a, o32, 1)
    train(b, o8, 1)
    # After one step both saw the same gradient: the only difference is the quantization of M and V.
    for p, q in zip(a.parameters(), b.parameters()):
        m32, v32 = o32._read_moments(o32.state[p])
        m8, v8 = o8._read_moments(o8.state[q])
        assert (m8 - m32).abs().max() <= 0.01 * m32.abs().max()
        assert (v8 - v32).abs().max() <= 0.01 * v32.abs().max()
    train(a, o32, 5)
    train(b, o8, 5)
    moved = max_diff(a, start)
    assert max_diff(a, b) < 0.2 * moved, (max_diff(a, b), moved)

    def state_bytes(opt):
        return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                   if k.startswith("exp_avg"))

    b32, b8 = state_bytes(o32), state_bytes(o8)
    print(f"moment bytes: 32-bit {b32}, 8-bit {b8} ({b8 / b32:.2f}x)")
    assert b8 < 0.4 * b32
    assert o8.state[b[0].weight]["exp_avg"].dtype == torch.uint8  # 8 x 96 low-rank moment

    resumed_model = copy.deepcopy(b)
    resumed = GaLoreAdamW8bit(galore_groups(resumed_model, rank=8), lr=LR, min_8bit_size=256)
    resumed.load_state_dict(roundtrip(o8.state_dict()))
    assert resumed.state[resumed_model[0].weight]["exp_avg"].dtype == torch.uint8  # not cast to fp32
    assert train(resumed_model, resumed, 3) == train(b, o8, 3)
    assert max_diff(b, resumed_model) == 0.0


def test_fused_path_matches_the_pytorch_path():
    """fused=True through the Triton kernels, run on CPU in Triton's interpreter (set before import)."""
    code = """
import copy, torch, llmx.kernels.galore_step as ks
from torch import nn
from llmx.optim import GaLoreAdamW
calls = []
fused = ks.galore_adam_step_fused
ks.galore_adam_step_fused = lambda *a, **k: (calls.append(a[3]), precisions.append(k["precision"]), fused(*a, **k))
precisions = []
torch.manual_seed(0)
a = nn.Sequential(nn.Linear(48, 20), nn.Tanh(), nn.Linear(20, 64))
b = copy.deepcopy(a)
def groups(m):
    return [{"params": [m[0].bias, m[2].bias]},
            {"params": [m[0].weight, m[2].weight], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "weight_decay": 0.1}]
oa, ob = GaLoreAdamW(groups(a), lr=1e-2), GaLoreAdamW(groups(b), lr=1e-2, fused=True)
x = torch.randn(16, 48)
for _ in range(6):
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad(); m(x).pow(2).mean().backward(); o.step()
d = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
assert sorted(set(calls)) == ["left", "right"] and len(calls) == 12, calls
assert d < 1e-6, d
# bf16 operands with a bf16 basis, fused and PyTorch: the same rounding of the same operands
c, e = copy.deepcopy(a), copy.deepcopy(a)
def bf16(m):
    return [{**g, "precision": "bf16", "basis_dtype": "bf16"} if "rank" in g else g for g in groups(m)]
oc, oe = GaLoreAdamW(bf16(c), lr=1e-2), GaLoreAdamW(bf16(e), lr=1e-2, fused=True)
for _ in range(3):
    for m, o in ((c, oc), (e, oe)):
        o.zero_grad(); m(x).pow(2).mean().backward(); o.step()
assert precisions[12:] == ["bf16"] * 6, precisions
d16 = max((p - q).abs().max().item() for p, q in zip(c.parameters(), e.parameters()))
assert d16 < 1e-3, d16
print("fused ok", d, d16)
"""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fused ok" in proc.stdout, proc.stderr[-3000:]


def test_same_shape_parameters_draw_different_sketches():
    """Two weights with identical gradients: each draws its own Gaussian test matrix (seeded from its
    name), so their randomized bases differ; the same name gives the same basis again."""
    torch.manual_seed(0)
    w = torch.randn(48, 40)
    x = torch.randn(8, 40)

    def bases(names):
        ps = [nn.Parameter(w.clone()) for _ in names]
        opt = GaLoreAdamW([{"params": ps, "param_names": names, "rank": 4, "svd": "randomized", "power_iters": 0}])
        for p in ps:
            (x @ p.T).pow(2).sum().backward()
        opt.step()
        return [opt._projectors[p].basis()["P"] for p in ps]

    a, b = bases(["layers.0.q_proj.weight", "layers.1.q_proj.weight"])
    assert not torch.allclose(a, b, atol=1e-3)
    (again,) = bases(["layers.1.q_proj.weight"])
    assert torch.equal(again, b)


def test_projection_precision_and_basis_dtype():
    from llmx.optim.galore import GaLoreProjector

    g = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    ref = GaLoreProjector(8, "std")
    ref.refresh(g, 0)
    low = ref.project(g)
    half = GaLoreProjector(8, "std", precision="bf16", basis_dtype="bf16")
    half.refresh(g, 0)
    assert half.state_dict()["P"].dtype == torch.bfloat16 and half.project(g).dtype == torch.float32
    err = float((half.project(g) - low).norm() / low.norm())
    assert 1e-5 < err < 2e-2, err  # rounded operands, not exact, not wrong
    upd = torch.randn(64, 8)
    w1, w2 = torch.zeros(64, 48), torch.zeros(64, 48)
    ref.add_back_(w1, upd, -0.5)
    half.add_back_(w2, upd, -0.5)
    assert float((w2 - w1).norm() / w1.norm()) < 2e-2
    with pytest.raises(ValueError, match=r"precision must be one of \('ieee', 'tf32', 'bf16'\), got 'fp8'"):
        GaLoreProjector(8, precision="fp8")
    with pytest.raises(ValueError, match="basis_dtype must be one of"):
        GaLoreProjector(8, basis_dtype="fp16")


def test_config_refuses_an_unknown_precision():
    from llmx.config.compose import ConfigError, compose

    with pytest.raises(ConfigError, match="precision"):
        compose(["recipe=galore2_tiny", "optim.precision=fp8"])


# ---------------------------------------------------------------------------------------------------
# the config builder
# ---------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16, bias=False)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(16, 40, bias=False), "down_proj": nn.Linear(40, 16, bias=False)})
        self.norm = nn.LayerNorm(16)


def galore_cfg(**overrides):
    from omegaconf import OmegaConf

    from llmx.config.schema import GaLoreOptimConfig

    cfg = OmegaConf.structured(GaLoreOptimConfig)
    for k, v in {"rank": 4, "update_proj_gap": 3, **overrides}.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_builder_splits_by_name_and_picks_ranks():
    from llmx.trainer.optim import build_optimizer, builder_for

    model = nn.Sequential(Block(), Block())
    cfg = galore_cfg(rank_overrides={"*down_proj*": 2}, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert type(opt) is GaLoreAdamW and builder_for("galore_adamw") is builder_for("galore_adamw")
    ranks = {id(p): g.get("rank") for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert ranks[id(named["0.mlp.down_proj.weight"])] == 2
    assert ranks[id(named["1.self_attn.q_proj.weight"])] == 4
    assert ranks[id(named["0.norm.weight"])] is None
    galore_group = next(g for g in opt.param_groups if "rank" in g)
    assert galore_group["proj_type"] == "std" and galore_group["svd"] == "exact"  # plain strings, not Enums
    roundtrip(opt.state_dict())

    assert type(build_optimizer(model, galore_cfg(optim_bits=8))) is GaLoreAdamW8bit


def test_builder_rejects_a_pattern_that_matches_nothing():
    from llmx.trainer.optim import build_optimizer
    from llmx.utils import LlmxError

    with pytest.raises(LlmxError, match=r"\*attention\.\*.*0\.self_attn\.q_proj\.weight"):
        build_optimizer(nn.Sequential(Block()), galore_cfg(targets=["*mlp.*", "*attention.*"]))


def test_builder_per_parameter_for_optimizer_in_backward():
    from llmx.trainer.optim import InBackwardOptimizer, build_optimizer

    model = nn.Sequential(Block())
    opt = build_optimizer(model, galore_cfg(in_backward=True, grad_clip=None))
    assert isinstance(opt, InBackwardOptimizer)
    kinds = {}
    for o, (name, _) in zip(opt.optimizers, model.named_parameters()):
        kinds[name] = "rank" in o.param_groups[0]
    assert kinds == {"0.self_attn.q_proj.weight": True, "0.mlp.up_proj.weight": True,
                     "0.mlp.down_proj.weight": True, "0.norm.weight": False, "0.norm.bias": False}
    opt.remove_hooks()


# ---------------------------------------------------------------------------------------------------
# through the trainer
# ---------------------------------------------------------------------------------------------------

GALORE = ["optim=galore", "optim.rank=8", "optim.update_proj_gap=3"]


def test_layerwise_with_accumulation_matches_the_usual_step(tmp_path):
    from llmx.config.compose import compose
    from llmx.launch import run_job

    short = [*TINY, *GALORE, "trainer.max_steps=6", "trainer.ckpt_every=0", "trainer.save_final=false",
             "trainer.export_hf=false", "trainer.eval_every=0", "optim.grad_clip=null"]
    assert "trainer.micro_batch_size=4" in TINY and "trainer.batch_size=8" in TINY  # 2 micro-batches a step
    losses = {}
    for name, extra in (("plain", []), ("layerwise", ["optim.in_backward=true"])):
        result = run_job(compose([*short, *extra]), tmp_path / name)
        assert result.status == "ok", result.message
        losses[name] = train_losses(tmp_path / name)
    assert sorted(losses["plain"]) == list(range(1, 7))
    for step, loss in losses["plain"].items():
        assert abs(losses["layerwise"][step] - loss) <= 1e-5 * max(1.0, abs(loss)), step
    assert losses["plain"][6] < losses["plain"][1]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    """Checkpoint at step 8, killed at 10, resumed: steps 9-12 equal an uninterrupted run's. Step 9 uses the
    basis of the refresh before step 7, so the projector must come back from the checkpoint."""
    args = ["run", *TINY, *GALORE, "trainer.export_hf=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.Popen([sys.executable, "-m", "llmx", *args, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = run_llmx([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={"LLMX_DEBUG_KILL_AT_STEP": "10"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(train_losses(tmp_path / "run")) == 10
    resumed = run_llmx([*args, f"hydra.run.dir={tmp_path / 'run'}", "resume=auto"], cwd=tmp_path, check=True)
    assert "step_00000008" in resumed.stdout
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "ref")
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 13))
