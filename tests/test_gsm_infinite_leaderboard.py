"""GSM-Infinite leaderboard comparability: lengths measured with a tokenizer file offline, the reference's
length measure as an option, per-subset sampling temperatures, and the leaderboard recipe's settings."""

from __future__ import annotations

import json

import pytest

from llmx.bench.base import BenchError, get_bench, problem_rng
from llmx.bench.dataset import build_plan, generate_dataset, load_bench, load_counter
from llmx.utils import LlmxError


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A real tokenizer.json (the `tokenizers` library's format, as a downloaded Llama-3 one) whose tokens
    are whitespace-separated words, so its counts can be checked independently."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def words(text: str) -> int:
    return len(text.split())


def test_a_tokenizer_file_measures_lengths_offline(word_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_counter(word_tokenizer)("assign V000001 = V000002 + 1.") == 6
    cells = build_plan(["symbolic", "medium"], ["3000"], "3", 2)
    manifest = generate_dataset("gsm_infinite", cells, tmp_path / "b", tokenizer_path=word_tokenizer, progress=False)
    assert manifest["tokenizer"] == word_tokenizer
    _, sets = load_bench(tmp_path / "b")
    for dsd in sets.values():
        for r in dsd["ops_3"].to_list():
            assert r["n_tokens"] == words(r["prompt"]) and abs(r["n_tokens"] - 3000) <= 0.03 * 3000


def test_reference_length_measure(word_tokenizer):
    count = load_counter(word_tokenizer)
    ref = get_bench("gsm_infinite", length_measure="reference")
    # Symbolic: the reference's int(length * 828 / 9668) filler variables, one of them the unassigned root.
    rec = ref.generate("symbolic", 5, 8000, problem_rng(0, "gsm_infinite", "symbolic", 8000, 5, 0), count)
    assert rec["n_noise"] == int(8000 * 828 / 9668) - 1 == 684
    assert rec["n_tokens"] == words(rec["prompt"]) and len(rec["problem"].split("\n")) == 5 + 684
    rec.update(id="s", subset="symbolic", index=0)
    ref.verify(rec)
    # Realistic: instruction + 6 x (problem + question + solution) + problem + question measures the target
    # minus 1000 tokens, so the prompt itself is several times shorter than "8k".
    for subset, op, length in [("medium", 4, 8000), ("hard", 4, 8000), ("medium", 2, 32000)]:
        rec = ref.generate(subset, op, length, problem_rng(0, "gsm_infinite", subset, length, op, 0), count)
        instruction = rec["prompt"].split("\n\nProblem: ")[0]
        pq = words(rec["prompt"]) - words(instruction)
        measured = words(instruction) + 6 * (pq + words(rec["solution"])) + pq
        assert abs(measured - (length - 1000)) <= 0.03 * (length - 1000)
        assert rec["n_tokens"] == words(rec["prompt"]) < length / 4 and rec["n_noise"] > 0
        rec.update(id="r", subset=subset, index=0)
        ref.verify(rec)
    # A target below the problem itself: no distractors, as the reference (its misslength is negative).
    rec = ref.generate("hard", 20, 1500, problem_rng(0, "gsm_infinite", "hard", 1500, 20, 0), count)
    assert rec["n_noise"] == 0
    with pytest.raises(BenchError, match=r"length_measure='llama'.*'tokens'.*'reference'"):
        get_bench("gsm_infinite", length_measure="llama")


def test_leaderboard_recipe_settings():
    from omegaconf import OmegaConf

    from llmx.config.compose import compose

    cfg = compose(["recipe=gsm_infinite_leaderboard"])
    assert cfg.bench.tokenizer == "meta-llama/Meta-Llama-3-8B-Instruct"  # the reference's length tokenizer
    assert cfg.bench.options.length_measure == "reference"
    assert cfg.evaluator.temperature == 0.0 and dict(cfg.evaluator.temperature_by_subset) == {"symbolic": 1.0}
    assert cfg.evaluator.max_new_tokens == 4096 and cfg.bench.lengths == ["0", "8k", "16k", "32k"]
    OmegaConf.to_object(cfg)
    # SmolLM2's offline tokenizer stays the default elsewhere.
    assert compose(["recipe=gsm_infinite_tiny"]).bench.tokenizer is None


@pytest.mark.parametrize("override,message", [
    ("++evaluator.temperature_by_subset={easy: 1.0}", r"temperature_by_subset names \['easy'\]; valid subsets: "
                                                    r"\['symbolic', 'medium', 'hard'\]"),
    ("evaluator.temperature_by_subset={symbolic: -1}", r"temperature_by_subset.symbolic=-1.0 must be a number >= 0"),
    ("evaluator.temperature=-0.5", r"evaluator.temperature=-0.5 must be a number >= 0"),
])
def test_leaderboard_recipe_refuses_bad_temperatures(override, message):
    from llmx.config.compose import compose
    from llmx.recipes.generate_bench import subset_temperatures

    cfg = compose(["recipe=gsm_infinite_leaderboard", override])
    with pytest.raises(LlmxError, match=message):
        subset_temperatures(cfg.evaluator, get_bench("gsm_infinite").subsets)


def test_each_subset_is_sampled_at_its_temperature(tmp_path):
    """The recipe's sampling step against a real HTTP server: symbolic at 1.0, the rest greedy, one cache each."""
    from omegaconf import OmegaConf

    from llmx.bench.backends import OpenAIBackend
    from llmx.config.compose import compose
    from llmx.recipes.generate_bench import _replies, subset_temperatures
    from test_bench_backends import FakeServer

    server = FakeServer()
    try:
        cfg = compose(["recipe=gsm_infinite_leaderboard", f"output_root={tmp_path}", "logger.progress=false"])
        records = [{"id": f"{s}-{i}", "subset": s, "prompt": f"{s} problem {i}"} for s in ("symbolic", "medium", "hard")
                   for i in range(2)]
        manifest = {"generator": "gsm_infinite", "options": {}, "seed": 0, "plan": [], "tokenizer": None}
        backend = OpenAIBackend(server.base_url, "stand-in", temperature=cfg.evaluator.temperature)
        temperatures = subset_temperatures(cfg.evaluator, ("symbolic", "medium", "hard"))
        replies, caches = _replies(cfg, backend, records, temperatures, manifest)
        assert set(replies) == {r["id"] for r in records}
        for r in records:
            (_, _, body), = server.calls[r["prompt"]]
            assert body["temperature"] == (1.0 if r["subset"] == "symbolic" else 0.0), r["id"]
        assert set(caches) == {"0", "1"} and caches["0"] != caches["1"]
        assert json.loads(open(caches["1"]).readline())["fingerprint"]["temperature"] == 1.0
        assert backend.temperature == 0.0  # the configured backend itself is not changed
        OmegaConf.to_object(cfg)
    finally:
        server.close()
