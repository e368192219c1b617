"""llmx.sparse.search: LM-loss objective, TEAL's greedy allocation, the evolutionary (s, alpha) search and
the result cache.

Real checks run on SmolLM2-135M-Instruct cut to its first 2 decoder layers, with pydoc text (the cut model's
loss is not a language-model loss any more, but it is a real function of the plan with real activations);
structural checks on a tiny random GQA Llama.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from llmx.sparse.rsparse import (
    RSparseLinear,
    apply_plan,
    calibrate,
    find_linears,
    layer_shapes,
    model_sparsity,
    remove_sparsity,
    uniform_plan,
)
from llmx.sparse.search import (
    BlockPath,
    batches_fingerprint,
    block_errors,
    cached_search,
    evolutionary_search,
    lm_loss,
    plan_from_paths,
    plan_to_json,
    plan_from_json,
    project_budget,
    teal_greedy_paths,
)

TARGETS = (0.4, 0.5, 0.7)


def plan_loss(model, calib, batches, plan):
    apply_plan(model, calib, plan)
    try:
        return lm_loss(model, batches)
    finally:
        remove_sparsity(model)


def assert_dense(model):
    assert all(type(m) is nn.Linear for m in find_linears(model).values())
    assert not any(isinstance(m, RSparseLinear) for m in model.modules())


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models run thousands of tiny ops; with intra-op threads on a shared, busy CPU each op can stall
    # for a scheduler quantum in an OpenMP barrier (measured here: 30x slower). One thread is steady.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]
    return model, calibrate(model, batches), batches


@pytest.fixture(scope="module")
def smol(llmx_cache):
    from omegaconf import OmegaConf

    from llmx.config.schema import ModelConfig
    from llmx.data.sources import pydoc_corpus
    from llmx.models.pretrained import load_pretrained

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / "smollm2_135m.yaml"
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(conf))
    model, tok = load_pretrained(cfg)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.eval()
    text = "\n\n".join(t for _, t in pydoc_corpus()[:6])
    ids = tok(text, return_tensors="pt").input_ids[0]
    batches = [ids[: 4 * 64].reshape(4, 64)]
    return model, calibrate(model, batches), batches


@pytest.fixture(scope="module")
def smol_paths(smol):
    model, calib, batches = smol
    # step 0.1 and a 0.72 cap (instead of 0.05 / 0.9) halve and shorten the paths: same algorithm, test time.
    return teal_greedy_paths(model, calib, batches, step=0.1, max_sparsity=0.72)


@pytest.fixture(scope="module")
def smol_search(smol):
    model, calib, batches = smol
    return evolutionary_search(model, calib, batches, 0.5, population=4, generations=3, seed=0)


# ---- objective ---------------------------------------------------------------------------------------------


def test_lm_loss_is_token_mean_cross_entropy(tiny):
    model, _, batches = tiny
    with torch.no_grad():
        hf = float(model(batches[0], labels=batches[0]).loss)
    assert lm_loss(model, batches[:1]) == pytest.approx(hf, rel=1e-5)
    # Token-weighted over batches: a batch of 2 windows counts as much as two batches of one window.
    split = [batches[0][:1], batches[0][1:], batches[1]]
    assert lm_loss(model, split) == pytest.approx(lm_loss(model, batches), rel=1e-5)
    assert not model.training


# ---- TEAL greedy -------------------------------------------------------------------------------------------


def test_greedy_plans_hit_targets_with_alpha_one(smol, smol_paths):
    model, _, _ = smol
    shapes = layer_shapes(model)
    assert len(smol_paths) == 2 and all(len(p.names) == 7 for p in smol_paths)
    for target in TARGETS:
        plan = plan_from_paths(smol_paths, target)
        assert set(plan) == set(shapes)
        assert all(alpha == 1.0 and 0.0 <= s < 1.0 for s, alpha in plan.values())
        assert abs(model_sparsity(shapes, plan) - target) <= 0.01
    assert_dense(model)


def test_greedy_path_steps_and_recorded_errors_are_real(smol, smol_paths):
    model, calib, batches = smol
    for path in smol_paths:
        assert path.sparsity[0] == 0.0 and path.sparsity[-1] >= 0.72 - 1e-9
        steps = [b - a for a, b in zip(path.sparsity, path.sparsity[1:])]
        # Each move raises the block's size-weighted sparsity by the same amount, whichever projection moved.
        assert max(steps) == pytest.approx(min(steps), rel=1e-9)
        # Exactly one projection moves per step, by step / weight (weight = its size relative to q_proj).
        q = path.sizes["q_proj"]
        for before, after in zip(path.s, path.s[1:]):
            moved = [(p, b - a) for p, a, b in zip(path.names, before, after) if b != a]
            assert len(moved) == 1
            p, delta = moved[0]
            assert delta == pytest.approx(0.1 * q / path.sizes[p], rel=1e-9)
    # The recorded errors (computed with the replay / scored-rows shortcut) are what a plain forward gives.
    for i in (1, 20, len(smol_paths[0].sparsity) - 1):
        plan = {}
        for path in smol_paths:
            plan.update(path.plan_at(min(i, len(path.sparsity) - 1)))
        errors = block_errors(model, calib, batches, plan)
        for path, err in zip(smol_paths, errors):
            assert err == pytest.approx(path.error[min(i, len(path.sparsity) - 1)], rel=1e-3, abs=1e-4)
    assert_dense(model)


def test_greedy_beats_uniform_block_error(smol, smol_paths):
    model, calib, batches = smol
    shapes = layer_shapes(model)
    wins, total = 0, 0
    for target in TARGETS:
        greedy = block_errors(model, calib, batches, plan_from_paths(smol_paths, target))
        uniform = block_errors(model, calib, batches, uniform_plan(shapes, target, 1.0))
        wins += sum(g <= u for g, u in zip(greedy, uniform))
        total += len(greedy)
    assert wins >= 0.75 * total, (wins, total)


def test_plan_from_paths_moves_blocks_to_meet_the_target():
    def path(prefix, errors):
        names = {"q_proj": f"{prefix}.q_proj"}
        return BlockPath(prefix, names, {"q_proj": 100}, [0.0, 0.3, 0.6], errors, [[0.0], [0.3], [0.6]])

    # 0.3 and 0.6 are equally near 0.45 (up to rounding), so both blocks pick the same point and the model
    # is 0.15 off; one block moves, and it is the one whose move costs less error per unit of sparsity.
    paths = [path("a", [0.0, 1.0, 5.0]), path("b", [0.0, 1.0, 2.0])]
    plan = plan_from_paths(paths, 0.45)
    assert plan == {"a.q_proj": (0.3, 1.0), "b.q_proj": (0.6, 1.0)}
    assert plan_from_paths(paths, 0.6) == {"a.q_proj": (0.6, 1.0), "b.q_proj": (0.6, 1.0)}
    with pytest.raises(ValueError, match="outside"):
        plan_from_paths(paths, 0.8)
    again = [BlockPath.from_dict(json.loads(json.dumps(p.to_dict()))) for p in paths]
    assert plan_from_paths(again, 0.45) == plan


# ---- evolutionary search -----------------------------------------------------------------------------------


def test_project_budget_is_exact_and_stays_in_range():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 50, (40,), generator=g).double()
    w = (sizes / sizes.sum()).tolist()
    for target in (0.1, 0.5, 0.9):
        s = (torch.rand(40, generator=g, dtype=torch.float64) * 1.4 - 0.2).tolist()
        out = project_budget(s, w, target, (0.0, 0.95))
        assert abs(math.fsum(a * b for a, b in zip(w, out)) - target) < 1e-9
        assert all(0.0 <= x <= 0.95 for x in out)
    uniform = [0.5] * 40
    assert project_budget(uniform, w, 0.5, (0.0, 0.95)) == uniform
    with pytest.raises(ValueError):
        project_budget(uniform, w, 0.97, (0.0, 0.95))


def test_evolutionary_search_is_deterministic_and_keeps_the_budget(tiny):
    # Determinism and the budget on the random tiny model (three searches); the real model's search is checked
    # against the uniform plan below.
    model, calib, batches = tiny
    kw = dict(population=4, generations=3)
    plan_a, hist_a = evolutionary_search(model, calib, batches, 0.5, seed=0, **kw)
    plan_b, hist_b = evolutionary_search(model, calib, batches, 0.5, seed=0, **kw)
    plan_c, hist_c = evolutionary_search(model, calib, batches, 0.5, seed=1, **kw)
    assert plan_a == plan_b and hist_a == hist_b
    assert hist_c != hist_a  # another seed, other children
    shapes = layer_shapes(model)
    for plan, hist in ((plan_a, hist_a), (plan_c, hist_c)):
        assert set(plan) == set(shapes)
        assert abs(model_sparsity(shapes, plan) - 0.5) <= 1e-6
        assert all(0.0 <= s <= 0.95 and 0.0 <= a <= 1.0 for s, a in plan.values())
        assert len(hist) == 3
        assert all(abs(sp - 0.5) <= 1e-6 for _, _, sp in hist)
        bests = [b for b, _, _ in hist]
        assert bests == sorted(bests, reverse=True)  # elitism: never worse
        assert all(b <= m for b, m, _ in hist)
    assert_dense(model)


def test_evolutionary_search_never_loses_to_uniform(smol, smol_search):
    model, calib, batches = smol
    plan, hist = smol_search
    uniform = plan_loss(model, calib, batches, uniform_plan(layer_shapes(model), 0.5, 1.0))
    assert hist[0][0] <= uniform + 1e-9  # the uniform plan is in the initial population
    found = plan_loss(model, calib, batches, plan)
    assert found == pytest.approx(hist[-1][0], abs=1e-9)  # the returned plan is the one that scored best
    assert found <= uniform + 1e-9
    assert_dense(model)


def test_evolutionary_search_budget_init_and_alpha_choices(tiny, monkeypatch):
    import llmx.sparse.search as search

    model, calib, batches = tiny
    shapes = layer_shapes(model)
    calls = []
    real = search.lm_loss
    monkeypatch.setattr(search, "lm_loss", lambda m, b: calls.append(1) or real(m, b))
    # A lopsided init plan (MLPs sparser than attention), off the budget: it gets repaired and kept.
    init = {n: (0.7 if "mlp" in n else 0.1, 1.0) for n in shapes}
    plan, hist = evolutionary_search(model, calib, batches, 0.5, population=5, generations=4, seed=3,
                                     alpha_choices=(1.0,), init=init)
    assert len(calls) <= 5 * 4 and len(hist) == 4
    assert all(a == 1.0 for _, a in plan.values())
    assert abs(model_sparsity(shapes, plan) - 0.5) <= 1e-6
    repaired = dict(zip(shapes, ((s, 1.0) for s in project_budget(
        [init[n][0] for n in shapes], [i * o / sum(i * o for i, o in shapes.values()) for i, o in shapes.values()],
        0.5, (0.0, 0.95)))))
    assert hist[-1][0] <= plan_loss(model, calib, batches, repaired) + 1e-9
    assert_dense(model)
    with pytest.raises(ValueError):
        evolutionary_search(model, calib, batches, 0.5, init={"nope": (0.5, 1.0)})
    assert_dense(model)


def test_alpha_only_search_and_the_seeds_that_pair_greedy_s_with_low_rank(tiny, monkeypatch):
    """mode alpha (fixed_s): every evaluated plan keeps the one s profile, its seeds are that profile with alpha 1,
    0.95, 0.9, 0.8, and alphas move; the (s, alpha) search's seeds include the init plan's s with alpha 0.95, 0.9."""
    import llmx.sparse.search as search

    model, calib, batches = tiny
    shapes = layer_shapes(model)
    tried = []
    real = search.apply_plan
    monkeypatch.setattr(search, "apply_plan", lambda m, c, plan, **kw: tried.append(dict(plan)) or real(m, c, plan,
                                                                                                          **kw))
    init = {n: (0.6 if "mlp" in n else 0.2, 1.0) for n in shapes}
    weights = [i * o / sum(i * o for i, o in shapes.values()) for i, o in shapes.values()]
    profile = project_budget([init[n][0] for n in shapes], weights, 0.5, (0.0, 0.95))
    plan, hist = evolutionary_search(model, calib, batches, 0.5, population=6, generations=3, seed=0, init=init,
                                     fixed_s=True)
    assert all([p[n][0] for n in shapes] == profile for p in tried)
    assert [{a for _, a in p.values()} for p in tried[:4]] == [{1.0}, {0.95}, {0.9}, {0.8}]
    assert len({tuple(a for _, a in p.values()) for p in tried}) == len(tried)  # every evaluation a new alpha set
    assert abs(model_sparsity(shapes, plan) - 0.5) <= 1e-6 and hist[-1][0] == min(h[0] for h in hist)
    tried.clear()
    evolutionary_search(model, calib, batches, 0.5, population=6, generations=1, seed=0, init=init)
    seeds = [([round(p[n][0], 9) for n in shapes], {a for _, a in p.values()}) for p in tried[:6]]
    rounded = [round(x, 9) for x in profile]
    assert seeds[1:4] == [(rounded, {1.0}), (rounded, {0.95}), (rounded, {0.9})]
    assert seeds[0][1] == {1.0} and seeds[4][1] == {0.95} and set(seeds[4][0]) == {0.5}
    assert_dense(model)


def test_evolutionary_search_leaves_model_dense_on_error(tiny, monkeypatch):
    import llmx.sparse.search as search

    model, calib, batches = tiny
    seen = []

    def boom(m, b):
        seen.append(sum(isinstance(x, RSparseLinear) for x in m.modules()))
        raise RuntimeError("boom")

    monkeypatch.setattr(search, "lm_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        evolutionary_search(model, calib, batches, 0.5, population=2, generations=1)
    assert seen and seen[0] > 0  # it was sparse while scoring
    assert_dense(model)


# ---- cache -------------------------------------------------------------------------------------------------


def test_cached_search_skips_fn_on_second_call(tmp_path, tiny):
    _, _, batches = tiny
    key = {"model": "tiny", "calib": batches_fingerprint(batches), "target": 0.5, "search": {"population": 8}}
    calls = []

    def fn():
        calls.append(1)
        return {"plan": plan_to_json({"a": (0.5, 1.0)}), "history": [(1.0, 2.0, 0.5)]}

    first = cached_search(tmp_path, key, fn)
    second = cached_search(tmp_path, key, fn)
    assert len(calls) == 1 and first == second
    assert first["history"] == [[1.0, 2.0, 0.5]]  # as read back from JSON, hit or miss
    assert plan_from_json(first["plan"]) == {"a": (0.5, 1.0)}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert (tmp_path / f"{name}.json").exists()
    cached_search(tmp_path, {**key, "target": 0.7}, fn)  # anything in the key changes: computed again
    assert len(calls) == 2
    (tmp_path / f"{name}.json").write_text("{not json")
    assert cached_search(tmp_path, key, fn) == first and len(calls) == 3
    assert batches_fingerprint(batches) != batches_fingerprint([batches[0]])


def test_block_paths_survive_the_sorted_json_cache(tmp_path):
    """The rows of `s` follow the order of `names`; the cache writes JSON with sorted keys, so a cache hit must
    still give every module its own sparsity (a hit once gave q_proj's value to down_proj)."""
    names = {"q_proj": "l.q_proj", "k_proj": "l.k_proj", "down_proj": "l.down_proj"}
    path = BlockPath("l", names, {"q_proj": 4, "k_proj": 2, "down_proj": 8}, [0.0, 0.3], [0.0, 1.0],
                     [[0.0, 0.0, 0.0], [0.5, 0.2, 0.15]])
    calls = []

    def fn():
        calls.append(1)
        return [path.to_dict()]

    miss = BlockPath.from_dict(cached_search(tmp_path, {"k": 1}, fn)[0])
    hit = BlockPath.from_dict(cached_search(tmp_path, {"k": 1}, fn)[0])
    assert len(calls) == 1
    want = {"l.q_proj": (0.5, 1.0), "l.k_proj": (0.2, 1.0), "l.down_proj": (0.15, 1.0)}
    assert miss.plan_at(1) == want and hit.plan_at(1) == want
    with pytest.raises(ValueError, match="pairs"):
        BlockPath.from_dict({**path.to_dict(), "names": names})
