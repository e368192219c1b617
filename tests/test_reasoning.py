"""NaturalReasoning (llmx.reasoning, recipe kind synthesize): strict parsers, documents, the stages with their counts,
resumption after a kill, sharding over 2 processes, the self-training scorers, and bad input.

The pipeline tests use the rules backend (llmx.reasoning.rules): deterministic, a few ms per document, and it
answers in the exact reply formats, so what is tested is llmx's own logic (caching, ids, sharding, merging,
filtering, statistics). Real models are exercised by the openai-path test (tests/test_serve.py serves SmolLM2) and
the uses test below (a tiny Llama trained through the trainer core)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from llmx.bench.backends import Backend, read_cache
from llmx.reasoning import pipeline, prompts, selftrain
from llmx.reasoning.documents import doc_id, iter_documents, shard_of
from llmx.reasoning.rules import RuleBackend
from llmx.utils import LlmxError

# --- parsers ---------------------------------------------------------------------------------------------------


def test_rubric_parser_is_strict():
    good = "completeness: 2\ncomplexity: 1\ncorrectness: -1\nreasoning: 1"
    assert prompts.parse_rubric(good) == {"completeness": 2, "complexity": 1, "correctness": -1, "reasoning": 1}
    assert prompts.parse_rubric("**Completeness**: 2\n\nComplexity: 1\ncorrectness: 0\nreasoning: +1")["reasoning"] == 1
    for bad in (good.replace("2", "3", 1),  # out of range
                good.rsplit("\n", 1)[0],  # a criterion missing
                good + "\nreasoning: 1",  # twice
                good + "\nThe document is good.",  # prose
                "Scores: " + good,  # a prefix
                good.replace("-1", "high")):
        assert prompts.parse_rubric(bad) is None, bad
    assert prompts.MIN_SCORE == -2 and prompts.MAX_SCORE == 6


def test_synthesis_parser_and_reference_answers():
    s = prompts.parse_synthesized("Question: How many legs do 3 spiders have\nin total?\nAnswer: 24")
    assert s.question == "How many legs do 3 spiders have\nin total?" and s.reference_answer == "24"
    assert prompts.parse_synthesized("Question: Why is the sky blue?\nAnswer: None.").reference_answer is None
    for bad in ("Answer: 3\nQuestion: x?", "Question: x?", "Here: Question: x?\nAnswer: 2", "Question:\nAnswer: 2",
                "Question: a?\nAnswer: 1\nQuestion: b?\nAnswer: 2"):
        assert prompts.parse_synthesized(bad) is None, bad


def test_final_answer_extraction_and_matching():
    assert prompts.extract_final_answer(r"so \boxed{\frac{1}{2}} and later \boxed{x^{2}}") == "x^{2}"
    assert prompts.extract_final_answer("Steps...\nFinal answer: 1,200 apples\n") == "1,200 apples"
    assert prompts.extract_final_answer("The answer is: 7") == "7"
    assert prompts.extract_final_answer("I think it is seven.") is None
    assert prompts.answers_match("1,200 apples", "1200") and prompts.answers_match("3.0", "3")
    assert prompts.answers_match("Paris.", "paris") and not prompts.answers_match("12", "13")
    assert not prompts.answers_match(None, "1") and not prompts.answers_match("", "")
    assert [prompts.answer_bucket(a) for a in (None, "7", "two words", " ".join("w" * 10))] == \
        ["none", "single_word", "short", "long"]


# --- documents -------------------------------------------------------------------------------------------------


def test_documents_from_files_stream_with_stable_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("one whole document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "first"}) + "\n"
                                      + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "second"}) + "\n")
    pq.write_table(pa.table({"text": ["third", None, "fourth"]}), tmp_path / "c.parquet", row_group_size=1)
    docs = list(iter_documents("files", paths=[str(tmp_path / "*")]))
    assert [d.text for d in docs] == ["one whole document", "first", "second", "third", "fourth"]  # dup, empty dropped
    assert all(d.id == doc_id(d.text) for d in docs)
    assert [d.text for d in iter_documents("hub", hub_name="json", paths=[str(tmp_path / "b.jsonl")])] == \
        ["first", "second"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(LlmxError, match="hold no non-empty document"):
        list(iter_documents("files", paths=[str(tmp_path / "empty")]))
    with pytest.raises(LlmxError, match="no field 'body'"):
        list(iter_documents("files", paths=[str(tmp_path / "b.jsonl")], text_field="body"))
    with pytest.raises(LlmxError, match="valid: files, hub, builtin"):
        list(iter_documents("web"))


def test_builtin_documents_are_deterministic_and_shards_partition():
    a = list(iter_documents("builtin", builtin_worked=12, builtin_docs=6))
    assert [d.id for d in a] == [d.id for d in iter_documents("builtin", builtin_worked=12, builtin_docs=6)]
    worked = [d for d in a if "answer" in d.meta]
    assert len(worked) == 12 and all(f"Answer: {d.meta['answer']}" in d.text for d in worked)
    shards = [[d.id for d in a if shard_of(d.id, 3) == i] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(d.id for d in a) and all(shards)


# --- stages ----------------------------------------------------------------------------------------------------


class Replies(Backend):
    """A backend that replies from a fixed table (key -> reply): the judge drifting off format."""

    def __init__(self, table):
        self.table = table

    def fingerprint(self):
        return {"backend": "table", "replies": sorted(self.table.items())}

    def generate(self, requests, on_result):
        for r in requests:
            on_result(r.key, [self.table[r.key]] * r.n)


class Killed(Exception):
    pass


class DiesAfter(Backend):
    """The rules backend, killed after k replies (as a preempted job is)."""

    def __init__(self, k):
        self.inner, self.k = RuleBackend(), k

    def fingerprint(self):
        return self.inner.fingerprint()

    def generate(self, requests, on_result):
        for i, r in enumerate(requests):
            if i == self.k:
                raise Killed
            on_result(r.key, [self.inner.reply(r.prompt)] * r.n)


@pytest.fixture(scope="module")
def docs():
    return list(iter_documents("builtin", builtin_worked=30, builtin_docs=20))


def test_annotate_counts_unparsed_and_refuses_a_judge_that_never_parses(docs, tmp_path):
    good = "completeness: 2\ncomplexity: 2\ncorrectness: 1\nreasoning: 1"
    table = {d.id: (good if k % 3 else "This document is about numbers.") for k, d in enumerate(docs)}
    kept, rep = pipeline.annotate(docs, Replies(table), tmp_path / "a.jsonl", min_score=4)
    assert rep["unparsed"] == len(docs) // 3 + (len(docs) % 3 > 0) and rep["kept"] == len(kept) == len(docs) - rep["unparsed"]
    kept, rep = pipeline.annotate(docs, Replies({d.id: good.replace("2", "0") for d in docs}), tmp_path / "b.jsonl",
                                  min_score=4)
    assert kept == [] and rep["below_threshold"] == len(docs) and rep["score_histogram"] == {2: len(docs)}
    with pytest.raises(LlmxError, match=f"none of the {len(docs)} replies parses.*numbers"):
        pipeline.annotate(docs, Replies({d.id: "This document is about numbers." for d in docs}), tmp_path / "c.jsonl",
                          min_score=4)


def test_rules_stages_keep_worked_solutions_and_their_answers(docs, tmp_path):
    kept, rep = pipeline.annotate(docs, RuleBackend(), tmp_path / "a.jsonl", min_score=4)
    assert {d["id"] for d in kept} == {d.id for d in docs if "answer" in d.meta}  # the rules keep worked solutions
    questions, rep = pipeline.synthesize(kept, RuleBackend(), tmp_path / "s.jsonl")
    truth = {d.id: d.meta["answer"] for d in docs if "answer" in d.meta}
    assert all(prompts.answers_match(q["reference_answer"], truth[q["doc_id"]]) for q in questions)
    assert rep["with_reference_answer"] == len(questions) == len(kept)


def test_a_killed_stage_resumes_to_the_uninterrupted_result(docs, tmp_path):
    full, _ = pipeline.annotate(docs, RuleBackend(), tmp_path / "full.jsonl", min_score=4)
    with pytest.raises(Killed):
        pipeline.annotate(docs, DiesAfter(17), tmp_path / "cut.jsonl", min_score=4)
    _, cached = read_cache(tmp_path / "cut.jsonl")
    assert len(cached) == 17

    asked = []

    class Counting(RuleBackend):
        def generate(self, requests, on_result):
            asked.extend(r.key for r in requests)
            super().generate(requests, on_result)

    resumed, _ = pipeline.annotate(docs, Counting(), tmp_path / "cut.jsonl", min_score=4)
    assert resumed == full and len(asked) == len(docs) - 17


def test_dedup_is_independent_of_order_and_counts_same_text(docs, tmp_path):
    kept, _ = pipeline.annotate(docs, RuleBackend(), tmp_path / "a.jsonl", min_score=4)
    questions, _ = pipeline.synthesize(kept, RuleBackend(), tmp_path / "s.jsonl")
    near = dict(questions[0], question=questions[0]["question"].replace("What is", "Tell me"), doc_id="x")
    near["id"] = doc_id(near["question"])
    same = dict(questions[1], doc_id="y")
    batch = questions + [near, same]
    a, rep = pipeline.dedup(batch)
    b, _ = pipeline.dedup(list(reversed(batch)))
    assert [q["id"] for q in a] == [q["id"] for q in b]
    ids = {q["id"] for q in a}
    assert (near["id"] in ids) != (questions[0]["id"] in ids)  # one of the two near-duplicates is kept
    assert rep["same_text"] == 1 and rep["removed"] == len(batch) - len(a) >= 2


def test_decontaminate_removes_questions_sharing_a_13_gram_with_a_named_benchmark(docs, tmp_path):
    kept, _ = pipeline.annotate(docs, RuleBackend(), tmp_path / "a.jsonl", min_score=4)
    questions, _ = pipeline.synthesize(kept, RuleBackend(), tmp_path / "s.jsonl")
    leaked = " ".join(questions[3]["question"].split()[-13:])
    math = tmp_path / "math_test.jsonl"
    math.write_text(json.dumps({"problem": f"Compute this: {leaked}", "solution": "x", "level": "Level 1"}) + "\n"
                    + json.dumps({"problem": "What is 2 + 2?", "solution": "4", "level": "Level 1"}) + "\n")
    out, rep = pipeline.decontaminate(questions, [str(math)], n=13)
    contaminated = [q for q in questions if leaked in " ".join(q["question"].split())]
    assert len(out) == len(questions) - len(contaminated) and questions[3] not in out
    assert rep["removed"] == len(contaminated) and sum(rep["removed_per_benchmark"].values()) == len(contaminated)


def test_card_statistics():
    rows = [{"question": "a b c", "reference_answer": None, "responses": [{"response": "x y"}], "meta": {}},
            {"question": "a b c d e", "reference_answer": "42", "responses": [{"response": "x"}], "meta": {"domain": "math"}}]
    s = pipeline.card_statistics(rows)
    assert s["reference_answer"]["none"] == {"count": 1, "share": 0.5} and s["reference_answer"]["single_word"]["count"] == 1
    assert s["question_words"] == {"mean": 4.0, "median": 4.0} and s["response_words"]["median"] == 1.5
    assert s["domains"] == {"math": 1}


# --- self-training scorers -------------------------------------------------------------------------------------


def test_self_consistency_picks_the_majority_and_a_dissenting_worst():
    rs = ["... Final answer: 5", "Final answer: 7", "no idea", r"\boxed{5}", "Final answer: 5.0"]
    c = selftrain.self_consistency(rs, random.Random(0))
    assert (c.best, c.majority, c.votes) == (0, "5", 3) and c.worst in (1, 2)
    assert selftrain.self_consistency(["Final answer: 1"] * 3, random.Random(0)).worst is None
    assert selftrain.self_consistency(["hmm", "?"], random.Random(0)).best is None
    assert selftrain.by_score([0.5, -1.0, 2.0]) == selftrain.Choice(2, 1)
    assert selftrain.by_score([1.0, 1.0]).worst is None


def test_random_control_picks_any_answered_response():
    rs = ["Final answer: 5", "no idea", "Final answer: 7", "also no idea", "Final answer: 5"]
    picks = [selftrain.random_choice(rs, random.Random(seed)) for seed in range(40)]
    assert {c.best for c in picks} == {0, 2, 4}  # every answered one, never an unanswered one
    assert all(c.worst is not None and c.worst != c.best for c in picks)
    assert selftrain.random_choice(rs, random.Random(3)) == selftrain.random_choice(rs, random.Random(3))
    assert selftrain.random_choice(["hmm", "?"], random.Random(0)).best is None
    assert selftrain.random_choice(["Final answer: 1"], random.Random(0)) == selftrain.Choice(0, None)


def test_self_scores_equal_an_unpadded_float64_forward(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmx.data.tokenizer import train_bpe
    from llmx.rl.chat import tiny_chat_template

    tok = train_bpe(["yes no maybe the answer is correct question proposed reply"] * 30, 280, tmp_path)
    tok.chat_template = tiny_chat_template()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)).double()
    responses = ["yes", "the answer is no, maybe yes", "maybe"]
    got = selftrain.self_scores(model, tok, "Is it correct?", responses, "cpu", batch_size=3)
    yes, no = selftrain.yes_no_ids(tok)
    for r, g in zip(responses, got):
        text = tok.apply_chat_template([{"role": "user", "content": prompts.judge_prompt("Is it correct?", r)}],
                                       tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
        assert abs(g - float(logp[yes] - logp[no])) < 1e-6


# --- the recipe ------------------------------------------------------------------------------------------------

RULES = ["run", "recipe=natural_reasoning_smollm2", "synth.docs.builtin_worked=40", "synth.docs.builtin_docs=20",
         "synth.uses=[]"]


def _run(args, cwd):
    from conftest import run_llmx

    return run_llmx(args, cwd=cwd, timeout=300, check=True)


@pytest.fixture(scope="module")
def rules_run(tmp_path_factory):
    from conftest import REPO

    run = tmp_path_factory.mktemp("nr") / "one"
    _run(RULES + [f"hydra.run.dir={run}"], REPO)
    return run


@pytest.mark.slow
def test_recipe_writes_the_dataset_manifest_and_card(rules_run):
    import datasets

    from conftest import REPO

    ds = datasets.load_from_disk(str(rules_run / "assemble" / "dataset"))
    man = json.loads((rules_run / "assemble" / "manifest.json").read_text())
    c = man["counts"]
    assert c["annotate"]["input"] == c["documents"] >= 55 and c["annotate"]["kept"] == 40  # the 40 worked solutions
    assert c["annotate"]["below_threshold"] == c["documents"] - 40
    assert c["synthesize"]["kept"] == 40 and c["dedup"]["kept"] == c["decontaminate"]["input"]
    assert len(ds["train"]) + len(ds["eval"]) == c["respond"]["kept"] == man["card"]["questions"]
    row = ds["train"][0]
    assert set(row) >= {"question", "reference_answer", "responses"} and row["responses"][0]["response_model"] == "oracle"
    assert row["responses"][0]["response"].endswith(f"Final answer: {row['reference_answer']}")
    proc = _run(RULES + [f"hydra.run.dir={rules_run}"], REPO)  # a rerun skips every phase
    assert proc.stdout.count("done in an earlier run") == 4  # generate, filter, respond, assemble


@pytest.mark.slow
def test_two_sharded_processes_give_the_unsharded_dataset(rules_run, tmp_path):
    from conftest import REPO, run_llmx

    work = tmp_path / "work"
    common = RULES + [f"synth.work_dir={work}", "synth.shard_count=2"]

    def both(phase):
        procs = [subprocess.Popen([sys.executable, "-m", "llmx", *common, f"synth.phase={phase}", f"synth.shard_index={i}",
                                   f"hydra.run.dir={tmp_path / f'{phase}{i}'}"], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        for p in procs:
            out = p.communicate(timeout=300)[0]
            assert p.returncode == 0, out

    early = run_llmx(common + ["synth.phase=filter", f"hydra.run.dir={tmp_path / 'early'}"], cwd=REPO)
    assert early.returncode != 0 and "2 of 2 generate shards are not finished" in early.stdout + early.stderr
    both("generate")
    _run(common + ["synth.phase=filter", f"hydra.run.dir={tmp_path / 'f'}"], REPO)
    both("respond")
    _run(common + ["synth.phase=assemble", f"hydra.run.dir={tmp_path / 'a'}"], REPO)
    sharded = json.loads((work / "assemble" / "manifest.json").read_text())
    single = json.loads((rules_run / "assemble" / "manifest.json").read_text())
    assert sharded["sha256"] == single["sha256"]
    assert (work / "assemble" / "dataset.jsonl").read_text() == (rules_run / "assemble" / "dataset.jsonl").read_text()


@pytest.mark.parametrize("override,message", [
    ("synth.phase=everything", "synth.phase='everything'; valid: all, generate"),
    ("synth.shard_index=2", r"synth.shard_index=2 must be in \[0, synth.shard_count=1\)"),
    ("synth.shard_count=2", "needs synth.work_dir"),
    ("synth.judge.backend=oracle", "synth.judge.backend='oracle'; valid: hf, openai, rules"),
    ("synth.writer.backend=openai", "needs synth.writer.base_url and synth.writer.model_name"),
    ("synth.uses=[sft]", r"\['sft'\] unknown; valid: distill, rft, dpo"),
    ("synth.docs.source=files synth.teacher.backend=rules", "synth.teacher.backend='rules'; valid: hf, openai, oracle"),
    ("synth.docs.source=files synth.teacher.backend=hf", "synth.docs.paths is empty"),
    ("synth.docs.source=files", "oracle answers with the builtin documents' worked solutions"),
    ("synth.benchmarks=[/nonexistent/math.jsonl]", "/nonexistent/math.jsonl"),
])
def test_bad_config_is_named_before_any_work(override, message):
    from llmx.config.compose import compose
    from llmx.recipes.synthesize import check_config

    cfg = compose(["recipe=natural_reasoning_smollm2", *override.split()])
    with pytest.raises(LlmxError, match=message):
        check_config(cfg)


def test_unknown_benchmark_format_is_named(tmp_path):
    from llmx.config.compose import compose
    from llmx.recipes.synthesize import check_config

    bad = tmp_path / "bench.jsonl"
    bad.write_text(json.dumps({"prompt_text": "x"}) + "\n")
    with pytest.raises(LlmxError, match="bench.jsonl"):
        check_config(compose(["recipe=natural_reasoning_smollm2", f"synth.benchmarks=[{bad}]"]))


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, saved as a Hugging Face directory."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmx.config.schema import ModelConfig
    from llmx.models import pretrained_dir

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("conf/model/smollm2_135m.yaml"))
        tok = AutoTokenizer.from_pretrained(pretrained_dir(cfg))
    except (LlmxError, OSError) as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id))
    d = tmp_path_factory.mktemp("student")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.slow
def test_uses_train_through_the_trainer_core_and_are_evaluated(tiny_student, tmp_path):
    """Distillation, RFT and DPO (self-scored: a random student never states a final answer, so self-consistency
    would drop every question) each train and are evaluated on the same held-out questions as the base model."""
    from conftest import REPO

    run = tmp_path / "uses"
    _run(["run", "recipe=natural_reasoning_smollm2", "model.source=hf", f"model.path={tiny_student}", "model.name=tiny",
          "synth.docs.builtin_worked=16", "synth.docs.builtin_docs=1", "synth.uses=[distill,rft,dpo]",
          "synth.selftrain.scorer=self_score", "synth.selftrain.samples=2", "synth.selftrain.max_new_tokens=8",
          "synth.eval_max_new_tokens=8", "synth.train.batch_size=4", "synth.train.micro_batch_size=2",
          "trainer.log_every=100", f"hydra.run.dir={run}"], REPO)
    final = json.loads((run / "final.json").read_text())["train"]
    assert set(final) == {"base", "distill", "rft", "dpo"}
    assert len({r["questions"] for r in final.values()}) == 1 and final["base"]["questions"] == 4
    assert all(0 <= r["accuracy"] <= 1 for r in final.values())
    rft = json.loads((run / "train" / "rft" / "stage.json").read_text())["summary"]
    dpo = json.loads((run / "train" / "dpo" / "stage.json").read_text())["summary"]
    distill = json.loads((run / "train" / "distill" / "stage.json").read_text())["summary"]
    train_questions = json.loads((run / "assemble" / "stage.json").read_text())["summary"]["train"]
    assert distill["examples"] == train_questions == rft["kept"] and rft["examples"] == rft["kept"]
    assert 0 < dpo["pairs"] <= dpo["with_pair"] <= dpo["kept"]
    for use in ("distill", "rft", "dpo"):
        assert (run / "train" / use / "hf" / "config.json").is_file()
