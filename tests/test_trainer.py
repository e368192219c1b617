"""Unit tests of the trainer core: schedule, optimizer-in-backward, loss normalisation, checkpoints."""

from __future__ import annotations

import fnmatch
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from llmx.config.schema import GaLoreOptimConfig, OptimConfig
from llmx.trainer import checkpoint as ckpt
from llmx.trainer.optim import InBackwardOptimizer, build_optimizer, lr_at, set_lr
from llmx.trainer.trainer import IGNORE_INDEX, causal_lm_loss, count_targets
from llmx.utils import LlmxError


def tiny_model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def optim_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), kw)


def galore_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(GaLoreOptimConfig), {"rank": 4, **kw})


def batches(n, b=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (b, t), generator=g) for _ in range(n)]


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warmup_then_decay_to_min(schedule):
    kw = dict(base_lr=1.0, max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup, peak at its end
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lrs[100] == pytest.approx(0.1)
    mid = lr_at(55, **kw)
    expected = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 0.5)) if schedule == "cosine" else 0.5)
    assert mid == pytest.approx(expected)


def test_constant_schedule_and_bad_name():
    assert lr_at(50, base_lr=0.3, max_steps=100, warmup_steps=0, schedule="constant", min_lr_ratio=0.1) == 0.3
    with pytest.raises(LlmxError, match="optim.schedule=step"):
        lr_at(50, base_lr=0.3, max_steps=100, warmup_steps=0, schedule="step", min_lr_ratio=0.1)


# ---------------------------------------------------------------- optimizers
def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(LlmxError, match=r"optim.name=sgd.*adamw, galore_adamw"):
        build_optimizer(tiny_model(), optim_cfg(name="sgd"))


def test_in_backward_refuses_global_clipping():
    with pytest.raises(LlmxError, match=r"grad_clip=1.0"):
        build_optimizer(tiny_model(), optim_cfg(in_backward=True, grad_clip=1.0))


def test_weight_decay_groups_exclude_norms_and_embeddings():
    opt = build_optimizer(tiny_model(), optim_cfg(weight_decay=0.1))
    wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    m = tiny_model()
    norm_and_embed = sum(p.numel() for n, p in m.named_parameters() if "norm" in n or "embed" in n)
    assert wd[0.0] == norm_and_embed and wd[0.1] == sum(p.numel() for p in m.parameters()) - norm_and_embed


@pytest.mark.parametrize("accum", [1, 3])
def test_in_backward_matches_a_normal_optimizer_step(accum):
    """Stepping inside backward (with accumulation) gives the same weights as backward-then-step."""
    ref, hooked = tiny_model(), tiny_model()
    cfg = optim_cfg(lr=1e-2, weight_decay=0.1, grad_clip=None)
    opt_ref = build_optimizer(ref, cfg)
    opt_hook = build_optimizer(hooked, OmegaConf.merge(cfg, {"in_backward": True}))
    assert isinstance(opt_hook, InBackwardOptimizer)
    data = batches(4 * accum)
    for step in range(4):
        set_lr(opt_ref, 1e-2 * (step + 1))
        set_lr(opt_hook, 1e-2 * (step + 1))
        micro = data[step * accum:(step + 1) * accum]
        for i, mb in enumerate(micro):
            causal_lm_loss(ref, mb).div(1000).backward()
            opt_hook.last_micro_batch = i == accum - 1
            causal_lm_loss(hooked, mb).div(1000).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        assert all(p.grad is None for p in hooked.parameters())  # freed inside backward
    for (n, a), b in zip(ref.named_parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


# ---------------------------------------------------------------- per-group lr (optim.lr_scales)
# Overlapping patterns: down_proj matches the first two, and the first wins.
SCALES = {"*mlp.down_proj.weight": 0.1, "*mlp.*": 0.25, "*self_attn.*_proj.weight": 0.5}


def scale_of(name):
    return next((s for pat, s in SCALES.items() if fnmatch.fnmatch(name, pat)), 1.0)


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("make_cfg", [optim_cfg, galore_cfg], ids=["adamw", "galore_adamw"])
def test_lr_scales_multiply_the_scheduled_lr_per_group(make_cfg, in_backward):
    model = tiny_model()
    opt = build_optimizer(model, make_cfg(weight_decay=0.1, lr_scales=SCALES, in_backward=in_backward, grad_clip=None))
    set_lr(opt, 0.02)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.02 * scale_of(n)), n
        assert wd_of[id(p)] == (0.0 if "norm" in n or "embed" in n else 0.1), n  # the decay split still holds
    if make_cfg is galore_cfg:  # the builder's projected groups carry the multiplier too
        assert any("rank" in g and g["lr"] != 0.02 for g in opt.param_groups)


@pytest.mark.parametrize("in_backward", [False, True])  # one optimizer per parameter, checked on the whole model
def test_lr_scales_pattern_that_matches_nothing_is_refused(in_backward):
    cfg = optim_cfg(lr_scales={"*mlp.*": 0.5, "*attention.*": 0.5}, in_backward=in_backward, grad_clip=None)
    with pytest.raises(LlmxError, match=r"optim.lr_scales: \['\*attention\.\*'\] match no trainable parameter.*"
                                        r"model\.embed_tokens\.weight"):
        build_optimizer(tiny_model(), cfg)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_lr_scales_multiplier_must_be_finite_and_positive(value):
    with pytest.raises(LlmxError, match=re.escape(f"optim.lr_scales['*mlp.*']={value}") + ".*finite number > 0"):
        build_optimizer(tiny_model(), optim_cfg(lr_scales={"*mlp.*": value}))


@pytest.mark.parametrize("make_cfg", [optim_cfg, galore_cfg], ids=["adamw", "galore_adamw"])
def test_a_tiny_lr_scale_nearly_freezes_its_parameters(make_cfg):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, make_cfg(lr_scales={"*mlp.*": 1e-6}))
    for step, mb in enumerate(batches(3)):
        set_lr(opt, lr_at(step, base_lr=1e-2, max_steps=3, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1))
        causal_lm_loss(model, mb).backward()
        opt.step()
        opt.zero_grad()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert max(v for n, v in moved.items() if ".mlp." in n) < 1e-7, moved
    assert min(v for n, v in moved.items() if ".mlp." not in n) > 1e-3, moved


# ---------------------------------------------------------------- loss
def test_causal_lm_loss_is_a_sum_over_unmasked_targets():
    model = tiny_model()
    ids = batches(1)[0]
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    full = causal_lm_loss(model, ids)
    masked = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
    assert count_targets(ids) == 4 * 15 and count_targets({"labels": labels}) == 4 * 8
    logits = model(ids).logits[:, :-1].float()
    per_tok = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(4, 15)
    torch.testing.assert_close(full, per_tok.sum())
    torch.testing.assert_close(masked, per_tok[:, 7:].sum())


# ---------------------------------------------------------------- checkpoints
def _train_a_bit(model, opt, steps=2):
    for mb in batches(steps):
        causal_lm_loss(model, mb).backward()
        opt.step()
        opt.zero_grad()


def _save(root, step, model, opt, keep_last=2):
    return ckpt.save(root, step, model, [opt], {"step": step, "tokens_seen": 0, "loader": {"pos": step}},
                     rank=0, world_size=1, keep_last=keep_last)


def test_checkpoint_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, optim_cfg(lr=1e-2))
    _train_a_bit(model, opt)
    path = _save(tmp_path, 2, model, opt)
    expected_next = torch.rand(3)
    _train_a_bit(model, opt)  # move away from the saved state

    model2 = tiny_model(seed=5)
    opt2 = build_optimizer(model2, optim_cfg(lr=1e-2))
    state = ckpt.load(path, model2, [opt2], rank=0, world_size=1)
    assert state["step"] == 2 and state["loader"] == {"pos": 2}
    torch.testing.assert_close(torch.rand(3), expected_next, rtol=0, atol=0)  # RNG restored

    model3 = tiny_model()
    opt3 = build_optimizer(model3, optim_cfg(lr=1e-2))
    _train_a_bit(model3, opt3)
    for a, b in zip(model2.parameters(), model3.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Continuing from the restored state equals continuing the original: optimizer moments came back.
    _train_a_bit(model2, opt2)
    _train_a_bit(model3, opt3)
    for a, b in zip(model2.parameters(), model3.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_failed_save_leaves_previous_checkpoint_and_no_complete_dir(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model = tiny_model()
    opt = build_optimizer(model, optim_cfg())
    good = _save(tmp_path, 1, model, opt)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert (tmp_path / ".tmp-step_00000002").exists()  # the partial write, never treated as complete
    _save(tmp_path, 3, model, opt)
    assert not list(tmp_path.glob(".tmp-*"))  # cleaned by the next save
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003"]


def test_keep_last_prunes_only_after_the_new_one_is_complete(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, optim_cfg())
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, optim_cfg())
    path = _save(tmp_path, 1, model, opt)
    shard = next(path.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmxError, match=rf"corrupt.*{shard.name}.*truncated"):
        ckpt.load(path, tiny_model(), [build_optimizer(tiny_model(), optim_cfg())], rank=0, world_size=1)


def test_resume_resolution(tmp_path):
    run_dir, other_run = tmp_path / "exp" / "run2", tmp_path / "exp" / "run1"
    run_dir.mkdir(parents=True)
    assert ckpt.resolve_resume(None, run_dir) is None
    assert ckpt.resolve_resume("auto", run_dir) is None
    with pytest.raises(LlmxError, match="resume=latest: no complete checkpoint"):
        ckpt.resolve_resume("latest", run_dir)
    with pytest.raises(LlmxError, match="no such file"):
        ckpt.resolve_resume(str(tmp_path / "nope"), run_dir)
    model = tiny_model()
    opt = build_optimizer(model, optim_cfg())
    c1 = _save(other_run / "checkpoints", 5, model, opt)
    # auto never takes another run's checkpoint (a sweep job or a requeued job resumes only itself).
    assert ckpt.resolve_resume("auto", run_dir) is None
    assert ckpt.resolve_resume(str(other_run), run_dir) == c1  # a run directory
    assert ckpt.resolve_resume(str(c1), run_dir) == c1
    c2 = _save(run_dir / "checkpoints", 3, model, opt)
    c3 = _save(run_dir / "checkpoints", 4, model, opt)
    assert ckpt.resolve_resume("latest", run_dir) == c3 and ckpt.resolve_resume("auto", run_dir) == c3
    partial = run_dir / "checkpoints" / ".tmp-step_00000009"
    partial.mkdir()
    with pytest.raises(LlmxError, match="incomplete"):
        ckpt.resolve_resume(str(partial), run_dir)
    with pytest.raises(LlmxError, match="world_size|process"):
        ckpt.load(c2, model, [opt], rank=0, world_size=2)
