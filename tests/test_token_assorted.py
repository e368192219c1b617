"""Token Assorted: hybrid latent/text sequences and the vocabulary extension (llmx.latent.hybrid), the packing they
train on, top-k sampling, and the recipe end to end on Keys-Finding Mazes. The VQ-VAE and the maze generator
have their own files (test_latent_vqvae.py, test_keys_maze.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import run_llmx
from llmx.data.instruct import IGNORE_INDEX, pack_token_pairs
from llmx.latent import hybrid as hy
from llmx.utils import LlmxError

IDS = hy.LatentIds(begin=100, end=101, first_code=200, codebook_size=8)


def example(cot_len=40, seed=0):
    rng = random.Random(seed)
    return ([1, 2, 3], [rng.randrange(10, 90) for _ in range(cot_len)], [7, 8, 9])


def test_hybrid_replaces_the_leftmost_whole_chunks():
    p, c, s = example(40)
    codes = [3, 5]  # 40 tokens = 2 whole chunks of 16 and a tail of 8
    prompt, resp = hy.hybrid((p, c, s), codes, 16, 16, IDS)
    assert prompt == p and resp == [100, 203, 101] + c[16:] + s
    prompt, resp = hy.hybrid((p, c, s), codes, 1000, 16, IDS)  # capped at the whole chunks: the tail stays text
    assert resp == [100, 203, 205, 101] + c[32:] + s
    assert hy.hybrid((p, c, s), codes, 0, 16, IDS)[1] == c + s  # m = 0 is plain CoT, no delimiters
    with pytest.raises(LlmxError, match="3 latent codes"):
        hy.hybrid((p, c, s), [1, 2, 3], 16, 16, IDS)
    with pytest.raises(LlmxError, match="latent code 9 is outside the codebook of 8"):
        hy.hybrid((p, c, s), [9, 1], 16, 16, IDS)


def test_poisson_replace_scatters_chunks_and_keeps_the_rest_in_order():
    p, c, s = example(80)
    codes = [0, 1, 2, 3, 4]
    seen_positions = set()
    for seed in range(20):
        _, resp = hy.hybrid((p, c, s), codes, 32, 16, IDS, mix="poisson", rng=random.Random(seed))
        assert sum(IDS.first_code <= t < IDS.first_code + 8 for t in resp) == 2
        assert resp.count(100) == resp.count(101) >= 1
        # Undo the replacement: each latent stands for its chunk, so the CoT comes back exactly.
        out = []
        for t in resp:
            if t in (100, 101):
                continue
            if t >= 200:
                j = t - 200
                seen_positions.add(j)
                out.extend(c[j * 16:(j + 1) * 16])
            else:
                out.append(t)
        assert out == c + s
    assert len(seen_positions) > 2  # not always the leftmost chunks


def test_choose_m_modes():
    rng = random.Random(0)
    draws = {hy.choose_m("random", [0, 16, 32, 50], 16, rng) for _ in range(200)}
    assert draws == {0, 16, 32, 48}  # 50 rounds down to whole chunks
    assert hy.choose_m("none", [16], 16, rng) == 0 and hy.choose_m("all", [0], 16, rng) >= 1 << 20
    stages = [hy.choose_m("curriculum", [32, 0, 16], 16, rng, epoch=e, epochs=6) for e in range(6)]
    assert stages == [0, 0, 16, 16, 32, 32]


def test_training_pairs_variants_and_fresh_m_per_epoch():
    examples = [example(48, seed=i) for i in range(30)]
    codes = [[i % 8, (i + 1) % 8, (i + 2) % 8] for i in range(30)]
    sol = hy.training_pairs(examples, codes, "sol_only", "random", [0], 16, IDS, 1, seed=0)
    assert sorted(map(tuple, (r for _, r in sol))) == [(7, 8, 9)] * 30
    cot = hy.training_pairs(examples, codes, "cot", "random", [0], 16, IDS, 2, seed=0)
    assert len(cot) == 60 and all(len(r) == 51 for _, r in cot)
    mixed = hy.training_pairs(examples, codes, "latent", "random", [0, 16, 32, 48], 16, IDS, 4, seed=0)
    # m = 0: plain CoT (51); m = 16, 32, 48: 1-3 latents + 2 delimiters + the rest of the CoT + 3 solution tokens.
    assert {len(r) for _, r in mixed} == {51, 3 + 32 + 3, 4 + 16 + 3, 5 + 3}
    # Each epoch draws m afresh: an example's first CoT token is text in some epochs and a delimiter in others.
    per_epoch = [{r[0] == IDS.begin for _, r in mixed[e * 30:(e + 1) * 30]} for e in range(4)]
    assert all(x == {True, False} for x in per_epoch)
    again = hy.training_pairs(examples, codes, "latent", "random", [0, 16, 32, 48], 16, IDS, 4, seed=0)
    assert again == mixed  # deterministic per seed
    with pytest.raises(LlmxError, match="latent.variant='latents'"):
        hy.training_pairs(examples, codes, "latents", "random", [0], 16, IDS, 1, seed=0)


def test_check_codes_names_the_bad_latent_id():
    hy.check_codes([[0, 7], []], 8, "training set")
    with pytest.raises(LlmxError, match="example 1 has latent id 8, outside the codebook of 8"):
        hy.check_codes([[0], [8]], 8, "training set")


def test_pack_token_pairs_packs_whole_examples_and_masks_prompts():
    pairs = [([1, 2], [3, 4, 5]), ([6], [7, 8]), ([9, 9, 9], [10] * 4)]
    items, stats = pack_token_pairs(pairs, 12, pad=0)
    assert len(items) == 2 and stats["examples"] == 3 and stats["tokens"] == 15 and stats["response_tokens"] == 9
    ids, labels = items[0]
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX, 7, 8] + [IGNORE_INDEX] * 4
    assert items[1][0].tolist() == [9, 9, 9, 10, 10, 10, 10, 0, 0, 0, 0, 0]
    assert items[1][1].tolist()[:8] == [IGNORE_INDEX] * 3 + [10] * 4 + [IGNORE_INDEX]


def tiny_hf(tmp_path):
    from llmx.recipes.token_assorted import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(29)])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg), tok


def test_extend_vocabulary_keeps_old_rows_and_exports_a_model_that_generates_latents(tmp_path):
    from llmx.models import export_hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_hf(tmp_path)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = hy.extend_vocabulary(model, tok, codebook_size=6, noise=1.0, seed=0)
    assert (ids.begin, ids.end, ids.first_code) == (32, 33, 34) and len(tok) == 40
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape == (40, 32) and w_out.shape == (40, 32)
    assert torch.equal(w_in[:32], old_in) and torch.equal(w_out[:32], old_out)
    new = w_in[32:].detach()
    assert torch.allclose(new.mean(0), old_in.mean(0), atol=3 * old_in.std(0).max())
    assert (torch.cdist(new, new) + torch.eye(8) * 1e3).min() > 0  # distinct rows
    with pytest.raises(LlmxError, match="already has latent tokens"):
        hy.extend_vocabulary(model, tok, 6)

    # Teach the model to emit latents, export, reload: the tokenizer keeps the ids and the model generates them.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    seq = torch.tensor([[1, 5, ids.begin, ids.code(4), ids.code(1), ids.end, 7, 2]])
    for _ in range(60):
        loss = model(input_ids=seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = export_hf(model, tok, tmp_path / "hf")
    tok2, model2 = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert hy.latent_ids(tok2, 6) == ids
    gen = model2.generate(seq[:, :2], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen[0, 2:6].tolist() == [ids.begin, ids.code(4), ids.code(1), ids.end]
    with pytest.raises(LlmxError, match="codebook larger than 5"):
        hy.latent_ids(tok2, 5)
    with pytest.raises(LlmxError, match="lacks 2 of the 10 latent tokens"):
        hy.latent_ids(tok2, 8)


def test_top_k_sampling_draws_only_the_k_best_tokens():
    from llmx.bench.backends import RowSeededSampler

    scores = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8, 0.5]]).repeat(4, 1)
    sampler = RowSeededSampler([1, 2, 3, 4], temperature=5.0, top_p=1.0, top_k=2)
    picks = {int(sampler(None, scores).argmax(-1)[i]) for _ in range(30) for i in range(4)}
    assert picks == {1, 2}
    wide = RowSeededSampler([1, 2, 3, 4], temperature=5.0, top_p=1.0, top_k=0)
    assert len({int(wide(None, scores).argmax(-1)[i]) for _ in range(30) for i in range(4)}) > 2


# ------------------------------------------------------------------------------------------ the recipe


def test_bad_values_are_refused_before_any_work(tmp_path):
    from llmx.config.compose import compose

    cases = {
        "latent.variant=latents": "latent.variant='latents'",
        "latent.mix=scatter": "latent.mix='scatter'",
        "latent.m_set=[0,20]": "m_set=[0, 20]",
        "latent.compression=4": "compression=4",
        "data.latent.task=mazes": "data.latent.task='mazes'",
        "data.latent.ops=[4]": "op=4",
        "+data.latent.options.doors=2": "doors",
        "model=smollm2_135m": "use a preset model",
    }
    from llmx.recipes.token_assorted import check_config

    for override, message in cases.items():
        cfg = compose(["recipe=token_assorted_maze_tiny", override])
        with pytest.raises(LlmxError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_config(cfg)
    check_config(compose(["recipe=token_assorted_maze_tiny"]))


@pytest.mark.slow
def test_maze_recipe_end_to_end_latent_then_cot(tmp_path):
    """The tiny recipe through the CLI: VQ-VAE trained and cached, hybrid rows, training, 1-Feasible-k; the
    CoT variant reuses nothing of the VQ-VAE and trains the same number of tokens."""
    runs = {}
    for variant in ("latent", "cot"):
        run_dir = tmp_path / variant
        proc = run_llmx(["run", "recipe=token_assorted_maze_tiny", f"latent.variant={variant}", "logger.progress=false",
                         f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=True)
        runs[variant] = (json.loads((run_dir / "results.json").read_text()), proc.stdout)
    latent, log = runs["latent"]
    assert "vqvae: validation token accuracy" in log
    assert latent["vqvae"]["codebook_usage"] > 0 and latent["vqvae"]["token_acc"] > 0
    assert latent["metric"] == "1-Feasible-4" and 0 <= latent["accuracy"] <= 1 and latent["test_examples"] == 16
    cot = runs["cot"][0]
    assert cot["train_tokens"] == latent["train_tokens"] == 30 * 8 * 256
    # Latents shorten the training responses: m in {0, 16, 32} replaces up to two chunks by 2 + k tokens.
    assert latent["packing"]["mean_response_tokens"] < cot["packing"]["mean_response_tokens"]
    answers = [json.loads(x) for x in (tmp_path / "latent" / "test_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and all("greedy" in a for a in answers)
    assert (tmp_path / "latent" / "hf" / "tokenizer.json").is_file() or not (tmp_path / "latent" / "hf").exists()


def test_metamathqa_style_jsonl_splits_cot_and_solution(tmp_path):
    from types import SimpleNamespace

    from llmx.recipes.token_assorted import read_jsonl

    d = SimpleNamespace(prompt_field="query", response_field="response", answer_marker="The answer is:")
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"query": "What is 2+3?", "response": "Add 2 and 3.\nThe sum is 5.\nThe answer is: 5"})
                 + "\n\n" + json.dumps({"query": "q", "response": "r The answer is: x The answer is: 7"}) + "\n")
    rows = read_jsonl([str(f)], d)
    assert rows[0] == {"prompt": "What is 2+3?", "cot": "Add 2 and 3.\nThe sum is 5.", "final": "The answer is: 5",
                       "answer": "5"}
    assert rows[1]["answer"] == "7" and rows[1]["cot"] == "r The answer is: x"  # the last marker ends the CoT
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "response": "The answer is: 1"}) + "\n")
    with pytest.raises(LlmxError, match=r"bad.jsonl:1: a record needs 'query'"):
        read_jsonl([str(bad)], d)
    bad.write_text(json.dumps({"query": "q", "response": "no marker"}) + "\n")
    with pytest.raises(LlmxError, match="has no 'The answer is:'"):
        read_jsonl([str(bad)], d)


@pytest.mark.slow
def test_maze_bench_recipe_grades_the_oracle_perfectly(tmp_path):
    run_dir = tmp_path / "bench"
    run_llmx(["run", "recipe=token_assorted_maze_bench", "bench.per_op=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
             check=True)
    summary = json.loads((run_dir / "final.json").read_text())
    assert summary["acc"] == 1.0 and summary["problems_evaluated"] == 6


@pytest.mark.slow
def test_two_process_fsdp_run_evaluates_its_export(tmp_path):
    run = tmp_path / "run"
    proc = run_llmx(["run", "recipe=token_assorted_maze_tiny", "launcher=torchrun", "launcher.nproc_per_node=2",
                     "trainer.max_steps=10", "trainer.micro_batch_size=4", "trainer.eval_every=10", "trainer.ckpt_every=10",
                     "logger.progress=false",
                     f"hydra.run.dir={run}"], cwd=tmp_path, check=True)
    results = json.loads((run / "results.json").read_text())
    assert results["final"]["step"] == 10 and results["test_examples"] == 16 and 0 <= results["accuracy"] <= 1
    assert results["train_tokens"] == 10 * 8 * 256
