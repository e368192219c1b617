"""GaLore's optimizer state under FSDP2, counted on the meta device in a fake world of W ranks
(llmx.optim.galore.memory): the layout per rank against a count from the shapes, and every collective
on the parameters' device (a CPU tensor sent beside meta ones is the bug NCCL would hit on CUDA)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from llmx.config.compose import compose
from llmx.models import build_model
from llmx.optim.galore.memory import optimizer_state_per_rank

# llama_tiny with a 1024-token vocabulary: hidden 128, ffn 512, 4 layers, 4 heads (4 kv heads)
MODEL = ["model=llama_tiny", "model.vocab_size=1024"]
H, F, L, V, R = 128, 512, 4, 1024, 32


def _cfg(*overrides):
    return compose(["recipe=galore2_tiny", *MODEL, "optim.rank=32", *overrides])


def _count(cfg, world):
    return optimizer_state_per_rank(lambda: build_model(cfg.model, device="meta"), cfg.optim, world)


def _chunk(rows, world):
    return -(-rows // world)


def test_state_per_rank_matches_the_sharded_layout():
    cfg = _cfg()
    for world in (1, 4, 6):
        got = _count(cfg, world)
        c = lambda rows: _chunk(rows, world)  # noqa: E731 - rank 0's rows of a dim-0 split
        # std projection: q/k/v/o (128x128) and gate/up (512x128) are right (moments m x r, basis r x n),
        # down (128x512) is left (moments r x n, basis m x r); all split on dim 0 over the ranks.
        moments = L * 2 * (4 * c(H) * R + 2 * c(F) * R + c(R) * F)
        bases = L * (4 * c(R) * H + 2 * c(R) * H + c(H) * R)
        plain = 2 * (c(V) * H + c(H) + L * 2 * c(H))  # tied embedding, final norm, 2 norms per layer
        assert got["moments"] == 4 * (moments + plain), world
        assert got["bases"] == 4 * bases, world
        assert got["largest_grad"] == 4 * F * H


def test_sharded_state_against_adamw():
    galore = {w: _count(_cfg(), w)["state"] for w in (1, 8)}
    adamw = {w: _count(compose(["recipe=pretrain_tiny", *MODEL]), w)["state"] for w in (1, 8)}
    # every tensor is split: 8 ranks hold about 1/8 of it (rounding up the chunks)
    assert galore[8] < galore[1] / 8 * 1.15
    assert galore[8] / adamw[8] < 0.6 and galore[1] / adamw[1] < 0.6


def test_every_collective_stays_on_the_parameter_device(monkeypatch):
    """Run the product path (parallelize, owner-rank refresh, reduce-scatter / all-gather steps) on meta
    parameters: a CPU tensor in any op beside meta ones raises, and every c10d collective is recorded."""
    seen = []
    for name in ("gather", "scatter", "broadcast", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        fn = getattr(dist, name)

        def record(*args, _fn=fn, _name=name, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, list) for t in a if torch.is_tensor(t)]
            seen.extend((_name, t.device.type) for t in tensors)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(dist, name, record)
    for overrides in ([], ["optim.proj_type=full", "optim.moments=reproject"], ["optim.quant_bits=8"],
                      ["optim.optim_bits=8"], ["optim.in_backward=true", "optim.grad_clip=null"]):
        _count(_cfg(*overrides, "optim.svd=randomized"), 4)
    kinds = {k for k, _ in seen}
    assert {"gather", "scatter", "broadcast"} <= kinds, kinds
    assert {d for _, d in seen} == {"meta"}, [s for s in seen if s[1] != "meta"][:5]
