"""R-Sparse / TEAL layers against dense float64 math, calibration, token modes, artifacts, model families,
and the sparsify recipe end to end on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_llmx
from llmx.sparse import (
    RSparseLinear,
    SVDCache,
    apply_plan,
    calibrate,
    find_linears,
    layer_shapes,
    model_sparsity,
    rank_for,
    reads_saved,
    remove_sparsity,
    uniform_plan,
)
from llmx.sparse.artifact import load_artifact, save_artifact
from llmx.utils import LlmxError


def linear(in_f=64, out_f=48, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = torch.randn(out_f, in_f, dtype=torch.float64).float()
    return lin


def factors(lin, r):
    return SVDCache().get("w", lin.weight, r)


def test_rsparse_layer_matches_float64_math():
    lin = linear()
    x = torch.randn(3, 5, 64)
    w = lin.weight.double()
    # Every channel active: the dense layer.
    layer = RSparseLinear(lin, 0.5, 0.9, threshold=-1.0)
    assert torch.allclose(layer(x).double(), x.double() @ w.T, atol=1e-5)
    # No channel active, full rank: the SVD reconstructs W.
    u, svt = factors(lin, 48)
    layer = RSparseLinear(lin, 0.5, 0.5, threshold=float("inf"), u=u, svt=svt)
    assert torch.allclose(layer(x).double(), x.double() @ w.T, atol=1e-4)
    # The R-Sparse split: exact columns where |x_j| ||W_j|| > t, rank-r SVD of W for the rest.
    u, svt = factors(lin, 6)
    t = 1.2
    layer = RSparseLinear(lin, 0.5, 0.7, threshold=t, u=u, svt=svt)
    scale = w.norm(dim=0)
    m = (x.double().abs() * scale > t).double()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    low = U[:, :6] @ torch.diag(S[:6]) @ Vh[:6]
    expected = (x.double() * m) @ w.T + (x.double() * (1 - m)) @ low.T
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)
    # TEAL (alpha = 1): raw |x|, no column norms, no low-rank term.
    layer = RSparseLinear(lin, 0.5, 1.0, threshold=0.8)
    expected = (x.double() * (x.double().abs() > 0.8)) @ w.T
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_budget_formula_and_gqa_shapes():
    for (i, o) in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:  # SmolLM2's q, k/v (GQA), gate/up, down
        for s, alpha in [(0.5, 0.9), (0.7, 0.5), (0.4, 1.0)]:
            r = rank_for(i, o, s, alpha)
            kept = i * (1 - s) * alpha
            assert abs(reads_saved(i, o, kept, r) - s) <= (i + o) / (i * o) + 1e-9  # rank is floored
    assert rank_for(576, 192, 0.5, 0.9) != rank_for(576, 576, 0.5, 0.9)  # k/v get their own budget
    shapes = {"a": (10, 10), "b": (10, 30)}
    assert model_sparsity(shapes, {"a": (0.2, 1), "b": (0.6, 1)}) == pytest.approx((0.2 * 100 + 0.6 * 300) / 400)


def test_one_rank_rule_exact_on_a_grid_and_shared_with_the_kernels():
    """rank_for against exact rational arithmetic on the search's grid (s and alpha in steps of 0.05, the shapes of
    SmolLM2 and Llama-3-8B); the kernels' allocation is the same function rounded to a multiple."""
    from fractions import Fraction

    from llmx.kernels.rsparse_gemv import rsparse_allocation

    grid = [round(0.05 * k, 2) for k in range(1, 20)]
    for i, o in [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 1024), (4096, 14336)]:
        for s in grid:
            for alpha in grid:
                exact = Fraction(i * o) * (1 - Fraction(str(s))) * (1 - Fraction(str(alpha))) / (i + o)
                assert rank_for(i, o, s, alpha) == int(exact), (i, o, s, alpha)
                assert rsparse_allocation(i, o, s, alpha, rank_multiple=16)[1] == int(exact) // 16 * 16


def test_one_threshold_rule_for_the_calibration_and_the_kernels():
    from llmx.kernels.rsparse_gemv import calibrate_threshold
    from llmx.sparse.rsparse import keep_threshold

    x = torch.randn(6, 64)
    mags = x.abs().reshape(-1).sort().values
    for keep in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        t = keep_threshold(mags, keep)
        assert int((mags > t).sum()) == round(keep * mags.numel())
        assert calibrate_threshold(x, None, keep) == t
    # The calibration's threshold is the same rule on its sorted subsample.
    cal = calibrate(tiny_llama(), batches(2, t=16), max_values=1 << 20)
    # Subsamples drawn with replacement: compare on the sampled multiset, exactly.
    sampled = cal.abs_x["model.layers.0.self_attn.q_proj"]
    assert cal.threshold("model.layers.0.self_attn.q_proj", 0.6, weighted=False) == keep_threshold(sampled, 0.4)
    # q, k and v read the same input: one subsample, so TEAL's thresholds at equal s are equal.
    names = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert len({cal.threshold(n, 0.5, weighted=False) for n in names}) == 1
    assert len({cal.threshold(n, 0.5, weighted=True) for n in names}) == 3  # weighted by each one's column norms


def test_svd_cache_truncates_keeps_the_weights_dtype_and_its_estimate_is_exact():
    from llmx.sparse.rsparse import svd_bytes

    model = tiny_llama()
    shapes = layer_shapes(model)
    linears = find_linears(model)
    cap = lambda i, o: rank_for(i, o, 0.4, 0.9)  # noqa: E731
    cache = SVDCache(max_rank=cap)
    for name, lin in linears.items():
        r = cap(*shapes[name])
        u, svt = cache.get(name, lin.weight, r)
        uu, ss, vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
        assert u.dtype == lin.weight.dtype and torch.equal(u, uu[:, :r].float())
        assert torch.equal(svt, (ss[:r, None] * vh[:r]).float())
    assert cache.nbytes() == svd_bytes(shapes, 4, cap) < svd_bytes(shapes, 4)
    name = next(iter(linears))
    with pytest.raises(ValueError, match="keeps rank"):
        cache.get(name, linears[name].weight, cap(*shapes[name]) + 1)


def test_token_modes():
    lin = linear()
    u, svt = factors(lin, 4)
    x = torch.randn(2, 10, 64)
    dense = lin(x)
    decode = RSparseLinear(lin, 0.5, 0.9, 1.0, u, svt, token_mode="decode")
    assert torch.equal(decode(x), dense)  # a prompt runs dense
    assert not torch.allclose(decode(x[:, :1]), dense[:, :1])  # a single token is sparse
    last = RSparseLinear(lin, 0.5, 0.9, 1.0, u, svt, token_mode="last_fraction", token_fraction=0.2)
    y = last(x)
    assert torch.allclose(y[:, :8], dense[:, :8])  # first 80% dense
    assert torch.allclose(y[:, 8:], RSparseLinear(lin, 0.5, 0.9, 1.0, u, svt)(x[:, 8:]))
    with pytest.raises(ValueError, match="token_mode='prefill'"):
        RSparseLinear(lin, 0.5, 0.9, 1.0, token_mode="prefill")


def test_decode_layout_reads_rows_and_agrees():
    lin = linear(96, 80)
    u, svt = factors(lin, 8)
    layer = RSparseLinear(lin, 0.5, 0.8, 1.5, u, svt)
    x = torch.randn(1, 1, 96)
    ref = layer(x)
    layer.decode_layout()
    assert torch.allclose(layer(x), ref, atol=1e-5)
    layer.threshold = 1e9  # no channel passes: an empty bag, only the low-rank term
    assert torch.allclose(layer(x), F.linear(F.linear(x, svt), u), atol=1e-5)


def test_kernel_oracle_agrees_with_the_layer():
    from llmx.kernels.rsparse_gemv import rsparse_reference

    lin = linear(96, 80)
    u, svt = factors(lin, 8)
    layer = RSparseLinear(lin, 0.5, 0.8, 1.5, u, svt)
    x = torch.randn(3, 96)
    y = rsparse_reference(x, lin.weight.t().contiguous(), layer.scale, 1.5, u, svt)
    assert torch.allclose(y, layer(x[:, None])[:, 0], atol=1e-5)


def tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg).eval()


def batches(n=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, t), generator=g) for _ in range(n)]


def test_calibrated_thresholds_hit_the_target_and_remove_restores_dense():
    model = tiny_llama()
    cal = calibrate(model, batches())
    ids = batches(1, seed=1)[0]
    dense_logits = model(ids).logits
    shapes = layer_shapes(model)
    assert len(shapes) == 14 and shapes["model.layers.0.self_attn.k_proj"] == (64, 32)  # GQA k/v
    layers = apply_plan(model, cal, uniform_plan(shapes, 0.5, 1.0))
    for layer in layers.values():
        layer.track = True
    for b in batches():  # the calibration data itself: the quantile threshold keeps ~50% of channels
        model(b)
    for name, layer in layers.items():
        # Layer 0's q/k/v see exactly the calibration inputs; later layers see inputs that the sparsity of
        # earlier layers has shifted, so their achieved sparsity drifts from the target.
        first = name.startswith("model.layers.0.self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj")
        assert layer.achieved() == pytest.approx(0.5, abs=0.02 if first else 0.1), name
    assert remove_sparsity(model) == 14
    assert all(isinstance(m, nn.Linear) for m in find_linears(model).values())
    assert torch.equal(model(ids).logits, dense_logits)
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(model, cal, {"model.layers.9.mlp.up_proj": (0.5, 1.0)})


def test_perplexity_and_its_standard_error_over_text_samples():
    import math
    import statistics

    import torch.nn.functional as F

    from llmx.sparse.evaluate import perplexity

    model = tiny_llama()
    windows = [torch.cat(batches(3, t=24, seed=k)) for k in range(2)]  # 2 windows of 3 rows
    got = perplexity(model, windows)
    with torch.no_grad():
        rows = [float(F.cross_entropy(model(ids[None]).logits[0, :-1].double(), ids[1:]))
                for w in windows for ids in w]
    assert got["tokens"] == 6 * 23 and got["nll"] == pytest.approx(statistics.mean(rows), rel=1e-5)
    assert got["nll_se"] == pytest.approx(statistics.stdev(rows) / math.sqrt(6), rel=1e-4)
    assert got["ppl_se"] == pytest.approx(got["ppl"] * got["nll_se"])
    assert perplexity(model, [windows[0][:1]])["nll_se"] is None  # one sample: no spread


def test_last_fraction_perplexity_scores_exactly_the_sparse_positions():
    """The predictions scored with score_fraction are those made at positions the last_fraction layers ran sparse:
    every one of them differs from the dense model, and no dense position is scored (the old scoring took one)."""
    from llmx.sparse.evaluate import perplexity, scored_positions

    model = tiny_llama()
    ids = batches(1, t=40, seed=2)[0]
    dense = model(ids).logits
    apply_plan(model, calibrate(model, batches()), uniform_plan(layer_shapes(model), 0.6, 1.0),
               token_mode="last_fraction", token_fraction=0.1)
    sparse = model(ids).logits
    differs = [p for p in range(40) if not torch.equal(sparse[0, p], dense[0, p])]
    assert differs == [36, 37, 38, 39]  # ceil(0.1 * 40) = 4 sparse positions; causality keeps the rest dense
    span = scored_positions(40, 0.1)
    assert list(range(40))[span] == [36, 37, 38]  # position 39 predicts nothing
    assert perplexity(model, [ids], 0.1)["tokens"] == 3
    with pytest.raises(ValueError, match="leaves no sparse position"):
        scored_positions(5, 0.1)


def test_match_sparsity_reaches_the_target_on_its_text_for_teal_and_rsparse():
    """One threshold scale per model brings the achieved sparsity within the tolerance (the plain calibrated
    thresholds miss it on other text); R-Sparse's rank term counts toward the reads saved."""
    from llmx.sparse.evaluate import match_sparsity

    model = tiny_llama()
    cal = calibrate(model, batches())
    text = batches(3, seed=7)
    shapes = layer_shapes(model)
    for alpha in (1.0, 0.7):
        layers = apply_plan(model, cal, uniform_plan(shapes, 0.6, alpha))
        got = match_sparsity(model, layers, text, 0.6, tol=0.002)
        for layer in layers.values():
            layer.track = True
        for ids in text:
            model(ids)
        sizes = {n: i * o for n, (i, o) in shapes.items()}
        measured = sum(layer.achieved() * sizes[n] for n, layer in layers.items()) / sum(sizes.values())
        assert measured == pytest.approx(got["achieved"], abs=1e-9) and abs(measured - 0.6) <= 0.002
        assert got["scale"] != 1.0 and got["steps"] > 1
        assert any(layer.rank > 0 for layer in layers.values()) == (alpha < 1)
        remove_sparsity(model)
    # A plan that keeps layers dense: they count toward the model's weight, saving nothing.
    plan = {n: (0.0 if "layers.0." in n else 0.6, 1.0) for n in shapes}
    layers = apply_plan(model, cal, plan)
    got = match_sparsity(model, layers, text, 0.4, shapes=shapes)
    half = sum(i * o for n, (i, o) in shapes.items() if n in layers) / sum(i * o for i, o in shapes.values())
    assert got["achieved"] == pytest.approx(0.4, abs=0.002) and half == pytest.approx(0.5)
    assert sum(layer.threshold for layer in layers.values()) > 0  # the sparse half works harder: ~0.8 each
    remove_sparsity(model)
    layers = apply_plan(model, cal, uniform_plan(shapes, 0.5, 1.0))
    with pytest.raises(RuntimeError, match="cannot reach"):
        match_sparsity(model, {n: layers[n] for n in list(layers)[:1]}, text, 0.5, max_steps=2)


def test_llama3_8b_recipe_fits_one_80gb_gpu():
    """rsparse_llama3_8b's memory on the GPU, as the recipe estimates it before the run: the bf16 model plus the SVD
    factors its searched allocation can ask for (svd_max_rank; factors on the device, in bf16). The full float64
    factors kept on the host before were ~78 GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmx.config.compose import compose
    from llmx.sparse.rsparse import svd_bytes, svd_max_rank

    cfg = compose(["recipe=rsparse_llama3_8b"])
    sp = cfg.sparsify
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))
    shapes = layer_shapes(model, list(sp.targets))
    assert len(shapes) == 224
    weights = sum(p.numel() for p in model.parameters()) * 2
    factors = svd_bytes(shapes, 2, svd_max_rank(sp.allocation.value, sp.alpha, sp.levels))
    full64 = svd_bytes(shapes, 8)
    print(f"rsparse_llama3_8b: weights {weights / 2**30:.1f} GiB + factors {factors / 2**30:.1f} GiB on the GPU "
          f"(full float64 factors: {full64 / 2**30:.1f} GiB)")
    assert 14 < weights / 2**30 < 15.5 and factors < full64 / 5 and weights + factors < 40 * 2**30


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_other_llama_family_models(family):
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = MistralForCausalLM(cfg).eval()
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                               sliding_window=16)
        model = Gemma3ForCausalLM(cfg).eval()
    cal = calibrate(model, batches())
    shapes = layer_shapes(model)
    assert len(shapes) == 7 * 2
    apply_plan(model, cal, uniform_plan(shapes, 0.5, 0.9))
    out = model(batches(1, seed=3)[0]).logits
    assert torch.isfinite(out).all()
    assert sum(isinstance(m, RSparseLinear) for m in model.modules()) == 14


def test_artifact_round_trip_and_generation(tmp_path):
    model = tiny_llama()
    cal = calibrate(model, batches())
    plan = uniform_plan(layer_shapes(model), 0.5, 0.8)
    apply_plan(model, cal, plan, token_mode="decode")
    ids = batches(1, seed=2)[0][:, :8]
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    logits = model(ids[:, :1]).logits
    save_artifact(model, tmp_path / "art", meta={"model": "tiny"})
    doc = json.loads((tmp_path / "art" / "rsparse.json").read_text())
    assert doc["token_mode"] == "decode" and len(doc["layers"]) == 14
    remove_sparsity(model)

    fresh = tiny_llama()  # the same weights (seeded): the artifact applies without calibration
    load_artifact(fresh, tmp_path / "art", decode_layout=True)
    assert torch.allclose(fresh(ids[:, :1]).logits, logits, atol=1e-5)
    assert torch.equal(fresh.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), gen)

    other = tiny_llama(rms_norm_eps=1e-5)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(LlmxError, match="made for another model"):
        load_artifact(other, tmp_path / "art")
    with pytest.raises(LlmxError, match="not an R-Sparse artifact"):
        load_artifact(fresh, tmp_path)


@pytest.mark.slow
def test_sparsify_recipes_on_smollm2_share_the_greedy_paths(tmp_path, llmx_cache):
    """teal_smollm2 computes TEAL's greedy paths once; rsparse_smollm2 (search.init_greedy) reads them from the
    cache and seeds the search with the greedy plan at the level; the searched plan keeps the budget, and the
    R-Sparse run writes its results, report and artifact for all 210 projections."""
    env = {"LLMX_CACHE": str(tmp_path / "cache")}
    # A fresh cache, so the greedy and search entries counted below are this test's; the converted SmolLM2 is
    # the session's (converting the GGUF again costs ~20 s).
    (llmx_cache / "models").mkdir(exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(llmx_cache / "models", target_is_directory=True)
    common = [f"output_root={tmp_path}", "sparsify.levels=[0.5]", "sparsify.calib_sequences=2",
              "sparsify.eval_sequences=2", "sparsify.decode_tokens=0", "sparsify.save=false", "data.seq_len=32",
              "sparsify.greedy_step=0.6", "sparsify.match_sparsity=false"]
    teal = run_llmx(["run", "recipe=teal_smollm2", *common], cwd=tmp_path, env=env, check=True, timeout=900)
    assert "teal greedy model.layers.29:" in teal.stdout
    assert len(list((tmp_path / "cache" / "teal_greedy").glob("*.json"))) == 1
    bad = run_llmx(["run", "recipe=teal_smollm2", *common, "sparsify.greedy_step=1.5"], cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "sparsify.greedy_step=1.5: must be a step in (0, 1)" in bad.stderr
    assert len(list((tmp_path / "teal_smollm2").iterdir())) == 1  # only the good run's
    rs = run_llmx(["run", "recipe=rsparse_smollm2", *common, "sparsify.search.population=3",
                   "sparsify.search.generations=1", "sparsify.save=true", "sparsify.decode_tokens=8",
                   "sparsify.match_sparsity=true", "sparsify.match_sequences=4"],
                  cwd=tmp_path, env=env, check=True, timeout=900)
    assert "teal greedy" not in rs.stdout  # the paths came from the cache
    (found,) = (tmp_path / "cache" / "rsparse_search").glob("*.json")
    record = json.loads(found.read_text())
    init = record["key"]["init"]
    assert init is not None and all(a == 1.0 for _, a in init.values())
    run = next((tmp_path / "rsparse_smollm2").iterdir())
    rows = json.loads((run / "results.json").read_text())
    assert rows[1]["planned"] == pytest.approx(0.5, abs=1e-6)
    assert len(record["result"]["history"]) == 1
    final = json.loads((run / "final.json").read_text())
    assert final["token_mode"] == "all" and final["ppl@0.5"] > 1 and final["dense_ppl"] > 1  # 62 tokens: no order
    # Matched: one threshold scale brings the sparsity on 4 unscored windows to the level; the scored 2 are near it.
    assert rows[1]["achieved_match_text"] == pytest.approx(0.5, abs=0.002) and rows[1]["threshold_scale"] != 1.0
    assert rows[1]["achieved"] == pytest.approx(0.5, abs=0.05)
    assert len(rows[1]["nll_rows"]) == 2 and len(rows[0]["nll_rows"]) == 2
    assert set(rows[1]["by_projection"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    art = json.loads((run / "artifacts" / "s0.5" / "rsparse.json").read_text())
    assert art["model"] == "smollm2_135m" and len(art["layers"]) == 210
    # The searched plan's alphas decide the ranks (alpha = 1: no low-rank part); the artifact holds them all.
    layers = art["layers"].values()
    assert all(e["rank"] == rank_for(e["in"], e["out"], e["s"], e["alpha"]) for e in layers)
    assert rows[1]["low_rank_layers"] == sum(e["rank"] > 0 for e in layers)
    assert "tokens sparsified: all" in (run / "results.md").read_text()
    assert "rsparse 50%" in rs.stdout
    # The control for the search: TEAL's s searched by the same search (alpha = 1: no low-rank term anywhere).
    run_llmx(["run", "recipe=teal_smollm2", *common, "sparsify.allocation=search", "sparsify.search.init_greedy=true",
              "sparsify.search.population=2", "sparsify.search.generations=1"],
             cwd=tmp_path, env=env, check=True, timeout=900)
    teal_rows = json.loads((max((tmp_path / "teal_smollm2").iterdir()) / "results.json").read_text())
    assert teal_rows[1]["mean_alpha"] == 1.0 and teal_rows[1]["low_rank_layers"] == 0
    methods = {json.loads(f.read_text())["key"]["method"] for f in (tmp_path / "cache" / "rsparse_search").glob("*")}
    assert methods == {"rsparse", "teal"}


def test_rsparse_table_pairs_runs_by_allocation(tmp_path):
    """scripts/rsparse_table.py: one row per run, cells from results.json, and the fixed pairs as paired NLL
    differences (mean and standard error of the per-window differences); another model's runs get their own table."""
    import math
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    def run(name, method, allocation, nll, model="m1", seed=0):
        d = tmp_path / name
        d.mkdir()
        cfg = {"model": {"name": model}, "sparsify": {"method": method, "allocation": allocation, "alpha": 0.95,
                                                       "match_sparsity": True, "token_mode": "all",
                                                       "search": {"init_greedy": True, "mode": "s_alpha",
                                                                  "seed": seed}}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        dense = {"method": "dense", "level": 0.0, "ppl": 10.0, "ppl_se": 0.5, "tokens_scored": 99,
                 "nll_rows": [2.3, 2.3, 2.3]}
        row = {"method": method, "level": 0.5, "ppl": math.exp(sum(nll) / 3), "ppl_se": 0.1, "achieved": 0.5,
               "nll_rows": nll}
        (d / "results.json").write_text(json.dumps([dense, row]))
        return d

    dirs = [run("a", "rsparse", "greedy", [2.5, 2.7, 2.6]), run("b", "teal", "greedy", [2.4, 2.5, 2.6]),
            run("c", "rsparse", "uniform", [3.0, 3.0, 3.0], model="m2")]
    script = Path(__file__).resolve().parents[1] / "scripts" / "rsparse_table.py"
    out = subprocess.run([sys.executable, str(script), *map(str, dirs), "--json", str(tmp_path / "t.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "### m1" in out and "### m2" in out and "| rsparse greedy (alpha 0.95) | 0.500:" in out
    (pair,) = json.loads((tmp_path / "t.json").read_text())["m1"]
    assert pair["rsparse"].startswith("rsparse greedy") and pair["teal"] == "teal greedy"
    assert pair["dnll"] == pytest.approx(0.1) and pair["dnll_se"] == pytest.approx(0.1 / math.sqrt(3))
    # two seeds of one search: a row and a pair each, then pooled across the seeds
    dirs += [run("s0", "rsparse", "search", [2.3, 2.5, 2.6], seed=0), run("s1", "rsparse", "search", [2.5, 2.5, 2.5],
                                                                            seed=1)]
    out = subprocess.run([sys.executable, str(script), *map(str, dirs), "--json", str(tmp_path / "t.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "| rsparse search (s_alpha from greedy, seed 1) |" in out and "2 seeds" in out
    pooled = [e for e in json.loads((tmp_path / "t.json").read_text())["m1"] if e["what"] == "over seeds"]
    assert len(pooled) == 1 and pooled[0]["per_seed"] == pytest.approx([-1 / 30, 0.0], abs=1e-9)
    assert pooled[0]["dnll"] == pytest.approx(-1 / 60) and pooled[0]["dnll_se"] == pytest.approx(1 / 60)
    # TEAL's own search (s alone) as the control: seed k against seed k only, then pooled
    dirs += [run("t0", "teal", "search", [2.3, 2.5, 2.5], seed=0), run("t1", "teal", "search", [2.5, 2.5, 2.5],
                                                                         seed=1)]
    subprocess.run([sys.executable, str(script), *map(str, dirs), "--json", str(tmp_path / "t.json")],
                   capture_output=True, text=True, check=True)
    entries = json.loads((tmp_path / "t.json").read_text())["m1"]
    vs_search = [e for e in entries if e["teal"].startswith("teal search") and e["what"] != "over seeds"]
    assert sorted((e["rsparse"][-7:], e["teal"][-7:]) for e in vs_search) == [("seed 0)", "seed 0)"),
                                                                              ("seed 1)", "seed 1)")]
    (control,) = [e for e in entries if e["what"] == "over seeds" and e["teal"].startswith("teal search")]
    assert control["teal"] == "teal search (s from greedy)" and control["dnll"] == pytest.approx(1 / 30 / 2)
