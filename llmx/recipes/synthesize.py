"""synthesize recipe: NaturalReasoning, from a folder of documents to a question dataset and a trained student.

    llmx run recipe=natural_reasoning_smollm2                      # CPU: SmolLM2-135M judge and writer
    # a cluster: shard the documents over a Slurm array against served models, then merge (README)
    llmx run -m recipe=natural_reasoning_dclm launcher=slurm synth.phase=generate synth.shard_count=64 \\
        'synth.shard_index=range(0,64)' synth.work_dir=/shared/nr

Paper: Yuan et al., "NaturalReasoning: Reasoning in the Wild with 2.8M Challenging Questions", arXiv 2502.13124.
Phases (synth.phase; `all` runs them in order in one process), each writing into synth.work_dir:

  generate   documents of shard i/n (by a hash of their text) -> annotate (four-criterion rubric, kept at
             >= synth.min_score) -> synthesize (a backtranslated question, a reference answer or none)
  filter     every shard's questions, merged in id order -> dedup (MinHash/LSH, Jaccard 0.55 on word
             3-shingles) -> decontaminate (13-gram overlap with synth.benchmarks)
  respond    the filtered questions of shard i/n -> synth.responses_per_question teacher responses
  assemble   every shard's responses -> an HF dataset (question, reference_answer, responses) split into
             train and eval by document, the manifest and the dataset card's statistics
  train      the uses (synth.uses): distill (SFT of the model group's model on the teacher's responses), rft and
             dpo (self-training: synth.selftrain.samples responses per question from the model itself, scored
             by self-consistency or by its own yes/no judgement, or at random among the answered ones (the
             control, `synth.selftrain.scorer=random`); RFT on the best, DPO best against worst, with
             the `rl` kind's DPO), each evaluated with the untrained model on the held-out documents' questions

Every LLM call is cached per phase and shard, keyed by the item's id (a hash of its text), so a killed phase
continues where it stopped and gives the dataset an uninterrupted run gives. A phase whose output exists with the
same inputs is skipped; with different inputs it is refused (use a new work_dir).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmx.utils import LlmxError, atomic_write_json, atomic_write_text, cached_stage, plain, sha256_text

PHASES = ("generate", "filter", "respond", "assemble", "train")
USES = ("distill", "rft", "dpo")
SCORERS = ("self_consistency", "self_score", "random")
EXECUTION_ONLY = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout_s", "batch_size", "device")
BACKENDS = {"judge": ("hf", "openai", "rules"), "writer": ("hf", "openai", "rules"), "teacher": ("hf", "openai", "oracle")}


def main(cfg) -> Dict[str, Any]:
    check_config(cfg)
    return Run(cfg).main()


def check_config(cfg) -> None:
    from llmx.reasoning.documents import check_source

    s = cfg.synth
    if s.phase not in ("all",) + PHASES:
        raise LlmxError(f"synth.phase={s.phase!r}; valid: all, {', '.join(PHASES)}")
    if s.shard_count < 1 or not 0 <= s.shard_index < s.shard_count:
        raise LlmxError(f"synth.shard_index={s.shard_index} must be in [0, synth.shard_count={s.shard_count})")
    if s.shard_count > 1 and not s.work_dir:
        raise LlmxError("synth.shard_count > 1 needs synth.work_dir: a directory every shard and phase shares")
    if s.shard_count > 1 and s.phase == "all":
        raise LlmxError("synth.phase=all runs every document in one process; with shards run the phases one by one "
                        "(generate and respond per shard, filter, assemble and train once)")
    for stage, valid in BACKENDS.items():
        b = s[stage].backend
        if b not in valid:
            raise LlmxError(f"synth.{stage}.backend={b!r}; valid: {', '.join(valid)}")
        if b == "openai" and not (s[stage].base_url and s[stage].model_name):
            raise LlmxError(f"synth.{stage}.backend=openai needs synth.{stage}.base_url and synth.{stage}.model_name")
    if s.teacher.backend == "oracle" and s.docs.source != "builtin":
        raise LlmxError("synth.teacher.backend=oracle answers with the builtin documents' worked solutions: it needs "
                        "synth.docs.source=builtin")
    bad = [u for u in s.uses if u not in USES]
    if bad:
        raise LlmxError(f"synth.uses={list(s.uses)}: {bad} unknown; valid: {', '.join(USES)}")
    if s.selftrain.scorer not in SCORERS:
        raise LlmxError(f"synth.selftrain.scorer={s.selftrain.scorer!r}; valid: {', '.join(SCORERS)}")
    if not 0 < s.dedup_threshold <= 1:
        raise LlmxError(f"synth.dedup_threshold={s.dedup_threshold} must be in (0, 1]")
    if not 0 <= s.eval_fraction < 1:
        raise LlmxError(f"synth.eval_fraction={s.eval_fraction} must be in [0, 1)")
    if s.train.batch_size % s.train.micro_batch_size:
        raise LlmxError(f"synth.train.batch_size={s.train.batch_size} must be a multiple of "
                        f"synth.train.micro_batch_size={s.train.micro_batch_size}")
    if s.phase in ("all", "generate"):
        check_source(s.docs.source, list(s.docs.paths), s.docs.hub_name)
    if s.phase in ("all", "filter") and s.benchmarks:
        from llmx.reasoning.decontaminate import load_benchmark

        for p in s.benchmarks:
            load_benchmark(p)  # an unknown format or an empty file fails here, before any LLM call


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Run:
    def __init__(self, cfg):
        from llmx.trainer.distributed import init_distributed

        self.cfg, self.s = cfg, cfg.synth
        self.work = Path(self.s.work_dir or cfg.run_dir).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        self.tag = f"{self.s.shard_index}-of-{self.s.shard_count}"
        self.info = init_distributed(self.s.judge.device)
        self._model: Optional[Tuple[Any, Any]] = None

    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(f"llmx: {msg}", flush=True)

    def stage(self, d: Path, upstream: Dict[str, Any], fn, all_ranks: bool = False) -> Dict[str, Any]:
        return cached_stage(d, upstream, fn, say=self.say, is_main=self.info.is_main, all_ranks=all_ranks)

    def main(self) -> Dict[str, Any]:
        phases = PHASES if self.s.phase == "all" else (self.s.phase,)
        out = {ph: getattr(self, ph)() for ph in phases}
        if self.info.is_main:
            atomic_write_json(Path(self.cfg.run_dir) / "final.json", out)
        return out

    # -- backends --
    def model(self):
        """The model group's model and tokenizer, loaded once for every hf stage of this process."""
        if self._model is None:
            from llmx.models.pretrained import load_pretrained

            self._model = load_pretrained(self.cfg.model)
        return self._model

    def backend(self, stage: str, solutions: Optional[Dict[str, str]] = None):
        from llmx.bench.backends import HFBackend, OpenAIBackend, OracleBackend
        from llmx.reasoning.rules import RuleBackend

        c = self.s[stage]
        t = c.temperature
        if c.backend == "rules":
            return RuleBackend()
        if c.backend == "oracle":
            return OracleBackend(solutions or {})
        if c.backend == "openai":
            import os

            return OpenAIBackend(c.base_url, c.model_name, api_key=os.environ.get(c.api_key_env), concurrency=c.concurrency,
                                 max_retries=c.max_retries, timeout_s=c.timeout_s, max_tokens=c.max_new_tokens,
                                 temperature=t, seed=c.seed)
        model, tok = self.model()
        return HFBackend(model, tok, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens, temperature=t,
                         seed=c.seed, chat_template=c.chat_template, device=self.info.device, name=self.cfg.model.name)

    def llm_key(self, stage: str) -> Dict[str, Any]:
        """What decides a stage's replies: the model and its sampling, not how fast it is asked (batch size,
        concurrency, retries, URL: a rerun may change those and still continue)."""
        c = {k: v for k, v in plain(self.s[stage]).items() if k not in EXECUTION_ONLY}
        if c["backend"] == "hf":
            c["model"] = plain(self.cfg.model)
        return c

    # -- phases --
    def documents(self):
        from llmx.reasoning.documents import iter_documents

        d = self.s.docs
        docs = iter_documents(d.source, paths=list(d.paths), text_field=d.text_field, hub_name=d.hub_name,
                              hub_config=d.hub_config, split=d.split, builtin_worked=d.builtin_worked,
                              builtin_docs=d.builtin_docs, seed=self.cfg.seed)
        for k, doc in enumerate(docs):
            if d.limit is not None and k >= d.limit:
                return
            yield doc

    def generate(self) -> Dict[str, Any]:
        from llmx.reasoning import pipeline
        from llmx.reasoning.documents import shard_of

        s = self.s
        up = {"docs": plain(s.docs), "seed": self.cfg.seed, "judge": self.llm_key("judge"),
              "writer": self.llm_key("writer"), "min_score": s.min_score, "shard": self.tag}

        def run(d: Path) -> Dict[str, Any]:
            docs = [x for x in self.documents() if shard_of(x.id, s.shard_count) == s.shard_index]
            self.say(f"generate {self.tag}: {len(docs)} documents")
            kept, rep_a = pipeline.annotate(docs, self.backend("judge"), d / "annotate_cache.jsonl",
                                            min_score=s.min_score, max_chars=s.docs.max_chars)
            self.say(f"annotate: {json.dumps({k: v for k, v in rep_a.items() if k != 'score_histogram'})}")
            questions, rep_s = pipeline.synthesize(kept, self.backend("writer"), d / "synthesize_cache.jsonl",
                                                   max_chars=s.docs.max_chars)
            write_jsonl(d / "questions.jsonl", questions)
            return {"documents": len(docs), "annotate": rep_a, "synthesize": rep_s, "questions": len(questions)}

        return self.stage(self.work / f"generate_{self.tag}", up, run)

    def _shard_dirs(self, phase: str) -> List[Path]:
        dirs = [self.work / f"{phase}_{i}-of-{self.s.shard_count}" for i in range(self.s.shard_count)]
        missing = [str(p) for p in dirs if not (p / "stage.json").is_file()]
        if missing:
            raise LlmxError(f"{len(missing)} of {len(dirs)} {phase} shards are not finished: {missing[:5]}; run "
                            f"synth.phase={phase} for them first")
        return dirs

    def filter(self) -> Dict[str, Any]:
        from llmx.reasoning import pipeline

        s = self.s
        shards = self._shard_dirs("generate")
        up = {"shards": [json.loads((p / "stage.json").read_text())["key"] for p in shards],
              "dedup": [s.dedup_threshold, s.dedup_num_perm, s.dedup_shingle], "benchmarks": list(s.benchmarks),
              "ngram": s.ngram}

        def run(d: Path) -> Dict[str, Any]:
            questions = [q for p in shards for q in read_jsonl(p / "questions.jsonl")]
            kept, rep_d = pipeline.dedup(questions, threshold=s.dedup_threshold, num_perm=s.dedup_num_perm,
                                         shingle=s.dedup_shingle)
            kept, rep_c = pipeline.decontaminate(kept, list(s.benchmarks), n=s.ngram)
            write_jsonl(d / "questions.jsonl", kept)
            return {"input": len(questions), "dedup": rep_d, "decontaminate": rep_c, "kept": len(kept)}

        return self.stage(self.work / "filter", up, run)

    def oracle_solutions(self, questions: Sequence[Dict[str, Any]]) -> Dict[str, str]:
        """The teacher=oracle replies: each question's source document's worked solution."""
        return {q["id"]: f"{q['meta']['solution']}\nFinal answer: {q['meta']['answer']}" for q in questions
                if "solution" in q["meta"]}

    def respond(self) -> Dict[str, Any]:
        from llmx.reasoning import pipeline
        from llmx.reasoning.documents import shard_of

        s = self.s
        src = self.work / "filter"
        if not (src / "stage.json").is_file():
            raise LlmxError(f"{src} is not finished: run synth.phase=filter first")
        up = {"filter": json.loads((src / "stage.json").read_text())["key"], "teacher": self.llm_key("teacher"),
              "n": s.responses_per_question, "shard": self.tag}

        def run(d: Path) -> Dict[str, Any]:
            questions = [q for q in read_jsonl(src / "questions.jsonl")
                         if shard_of(q["id"], s.shard_count) == s.shard_index]
            solutions = self.oracle_solutions(questions) if s.teacher.backend == "oracle" else None
            without = 0
            if solutions is not None:  # a question from a document without a worked solution has no oracle answer
                without = sum(q["id"] not in solutions for q in questions)
                questions = [q for q in questions if q["id"] in solutions]
            name = s.teacher.model_name or (self.cfg.model.name if s.teacher.backend == "hf" else s.teacher.backend)
            rows, rep = pipeline.respond(questions, self.backend("teacher", solutions), d / "respond_cache.jsonl",
                                         model_name=name, n=s.responses_per_question)
            write_jsonl(d / "questions.jsonl", rows)
            return {**rep, "no_teacher_answer": without}

        return self.stage(self.work / f"respond_{self.tag}", up, run)

    def assemble(self) -> Dict[str, Any]:
        from llmx.data.sources import stable_fraction
        from llmx.reasoning import pipeline

        s = self.s
        shards = self._shard_dirs("respond")
        up = {"shards": [json.loads((p / "stage.json").read_text())["key"] for p in shards],
              "eval_fraction": s.eval_fraction}

        def run(d: Path) -> Dict[str, Any]:
            import datasets

            from llmx.utils import publish_dir

            rows = sorted((q for p in shards for q in read_jsonl(p / "questions.jsonl")), key=lambda q: q["id"])
            split = {"train": [], "eval": []}
            for q in rows:
                split["eval" if stable_fraction(q["doc_id"]) < s.eval_fraction else "train"].append(q)
            fields = ("id", "doc_id", "question", "reference_answer", "responses")
            with publish_dir(d / "dataset", replace=True) as tmp:
                datasets.DatasetDict({k: datasets.Dataset.from_list([{f: q[f] for f in fields} for q in v])
                                      for k, v in split.items()}).save_to_disk(str(tmp))
            write_jsonl(d / "dataset.jsonl", [{**q, "split": k} for k, v in split.items() for q in v])
            reports = {ph: [json.loads((p / "stage.json").read_text())["summary"] for p in self._shard_dirs(ph)]
                       for ph in ("generate", "respond")}
            reports["filter"] = json.loads((self.work / "filter" / "stage.json").read_text())["summary"]
            counts = stage_counts(reports)
            card = pipeline.card_statistics(rows)
            atomic_write_json(d / "manifest.json", {"paper": "NaturalReasoning (arXiv 2502.13124)",
                                                    "config": plain(s), "counts": counts, "card": card,
                                                    "splits": {k: len(v) for k, v in split.items()},
                                                    "sha256": sha256_text((d / "dataset.jsonl").read_text())})
            self.say("stage counts:\n" + counts_table(counts))
            return {"questions": len(rows), "train": len(split["train"]), "eval": len(split["eval"]),
                    "counts": counts, "card": card}

        return self.stage(self.work / "assemble", up, run)

    # -- the uses --
    def train(self) -> Dict[str, Any]:
        if not self.s.uses:
            return {}
        src = self.work / "assemble"
        if not (src / "stage.json").is_file():
            raise LlmxError(f"{src} is not finished: run synth.phase=assemble first")
        rows = read_jsonl(src / "dataset.jsonl")
        train_rows = [r for r in rows if r["split"] == "train"]
        evals = self.eval_items(rows)
        if not evals:
            raise LlmxError("no held-out question with a reference answer to evaluate on: raise synth.eval_fraction")
        up = {"assemble": json.loads((src / "stage.json").read_text())["key"], "model": plain(self.cfg.model),
              "train": plain(self.s.train), "seed": self.cfg.seed}
        results = {"base": self.evaluate("base", None, evals, up)}
        for use in self.s.uses:
            path = self.distill(train_rows, up) if use == "distill" else self.selftrain(use, train_rows, up)
            results[use] = self.evaluate(use, path, evals, up)
        self.say("held-out accuracy:\n" + accuracy_table(results))
        return results

    def eval_items(self, rows) -> List[Dict[str, Any]]:
        """Questions from held-out documents with an answer to check against: for the builtin documents the
        worked problem itself and its generator's answer; otherwise the held-out questions' reference answers."""
        from llmx.data.sources import stable_fraction

        if self.s.docs.source == "builtin":
            return [{"id": d.id, "question": d.meta["problem"], "answer": d.meta["answer"]} for d in self.documents()
                    if "answer" in d.meta and stable_fraction(d.id) < self.s.eval_fraction]
        return [{"id": r["id"], "question": r["question"], "answer": r["reference_answer"]} for r in rows
                if r["split"] == "eval" and r["reference_answer"] is not None]

    def student(self, path: Optional[str]):
        from llmx.rl.train import load_policy

        if path is None:
            from llmx.models.pretrained import load_pretrained

            return load_pretrained(self.cfg.model)
        return load_policy(path)

    def evaluate(self, name: str, path: Optional[str], evals, up) -> Dict[str, Any]:
        """Greedy answers to the held-out questions, checked by their extracted final answer."""
        from llmx.bench.backends import GenRequest, HFBackend, run_with_cache
        from llmx.reasoning.prompts import answers_match, extract_final_answer, respond_prompt

        def run(d: Path) -> Dict[str, Any]:
            model, tok = self.student(path)
            b = HFBackend(model, tok, batch_size=self.s.eval_batch_size, max_new_tokens=self.s.eval_max_new_tokens,
                          device=self.info.device)
            replies = run_with_cache(b, [GenRequest(e["id"], respond_prompt(e["question"])) for e in evals],
                                     d / "replies.jsonl")
            got = [extract_final_answer(replies[e["id"]][0]) for e in evals]
            correct = [answers_match(g, e["answer"]) for g, e in zip(got, evals)]
            acc = sum(correct) / len(correct)
            return {"questions": len(evals), "accuracy": acc, "stderr": (acc * (1 - acc) / len(correct)) ** 0.5,
                    "answered": sum(g is not None for g in got) / len(got),
                    "response_words": sum(len(replies[e["id"]][0].split()) for e in evals) / len(evals)}

        return self.stage(self.work / "train" / f"eval_{name}", {**up, "use": name, "n": len(evals)}, run)

    def sft_items(self, tok, pairs) -> Tuple[List[Dict[str, Any]], int]:
        """Rendered (question, response) items no longer than synth.train.seq_len; and how many were longer."""
        from llmx.reasoning.prompts import respond_prompt
        from llmx.rl.chat import render

        items = []
        for q, r in pairs:
            ids, seg = render(tok, [{"role": "user", "content": respond_prompt(q)}, {"role": "assistant", "content": r}])
            items.append({"ids": ids, "segments": seg})
        kept = [it for it in items if len(it["ids"]) <= self.s.train.seq_len]
        return kept, len(items) - len(kept)

    def fit(self, d: Path, model, tok, items, mode) -> Dict[str, Any]:
        from llmx.rl.train import schedule, train

        n_val = max(1, len(items) // 10)
        return train(self.cfg, self.info, d, model, tok, items[n_val:], items[:n_val], mode,
                     schedule(self.s.train, len(items) - n_val))

    def distill(self, rows, up) -> str:
        """SFT of the model group's model on the teacher's first response to every training question."""
        def run(d: Path) -> Dict[str, Any]:
            model, tok = self.student(None)
            items, too_long = self.sft_items(tok, [(r["question"], r["responses"][0]["response"]) for r in rows])
            return {"examples": len(items), "too_long": too_long, **self.fit(d, model, tok, items, "sft")}

        self.stage(self.work / "train" / "distill", {**up, "use": "distill"}, run, all_ranks=True)
        return str(self.work / "train" / "distill" / "hf")

    def samples(self, rows, up) -> Dict[str, List[str]]:
        """synth.selftrain.samples responses of the untrained model to every training question."""
        from llmx.bench.backends import GenRequest, HFBackend, run_with_cache
        from llmx.reasoning.prompts import respond_prompt

        st = self.s.selftrain
        d = self.work / "train" / "samples"

        def run(d: Path) -> Dict[str, Any]:
            model, tok = self.student(None)
            b = HFBackend(model, tok, batch_size=self.s.eval_batch_size, max_new_tokens=st.max_new_tokens,
                          temperature=st.temperature, seed=self.cfg.seed, device=self.info.device)
            run_with_cache(b, [GenRequest(r["id"], respond_prompt(r["question"]), n=st.samples) for r in rows],
                           d / "samples.jsonl")
            return {"questions": len(rows), "samples": st.samples}

        # The samples depend on the student, the sampling settings and the run's seed, not on how they are scored or
        # trained on: another scorer or training setting reuses them.
        sampling = {k: getattr(st, k) for k in ("samples", "temperature", "max_new_tokens")}
        self.stage(d, {**{k: v for k, v in up.items() if k != "train"}, "selftrain": sampling}, run)
        from llmx.bench.backends import read_cache

        return read_cache(d / "samples.jsonl")[1]

    def choices(self, rows, samples) -> Tuple[list, Dict[str, Any]]:
        """(question, responses, Choice) per training question the scorer keeps, and the counts."""
        from llmx.reasoning import selftrain as stl

        st = self.s.selftrain
        rng = random.Random(f"{self.cfg.seed}/selftrain")
        model, tok = self.student(None) if (st.scorer == "self_score" or st.self_score_filter) else (None, None)
        out, counts = [], Counter()
        for r in rows:
            resp = samples[r["id"]]
            scores = stl.self_scores(model, tok, r["question"], resp, self.info.device) if model is not None else None
            if st.scorer == "self_score":
                c = stl.by_score(scores)
            elif st.scorer == "random":
                c = stl.random_choice(resp, rng)
            else:
                c = stl.self_consistency(resp, rng)
            if c.best is None:
                counts["no_answer"] += 1
            elif st.self_score_filter and scores[c.best] < 0:
                counts["self_score_filtered"] += 1
            else:
                out.append((r["question"], resp, c))
                counts["kept"] += 1
                counts["with_pair"] += c.worst is not None
        return out, dict(counts)

    def selftrain(self, use: str, rows, up) -> str:
        """RFT (SFT on the best sampled response) or DPO (best against worst, the rl kind's DPO) on the model's
        own responses, chosen by synth.selftrain.scorer."""
        from llmx.rl.train import add_reference, pair_item

        samples = self.samples(rows, up)
        st, t = self.s.selftrain, self.s.train

        def run(d: Path) -> Dict[str, Any]:
            chosen, counts = self.choices(rows, samples)
            model, tok = self.student(None)
            if use == "rft":
                items, too_long = self.sft_items(tok, [(q, resp[c.best]) for q, resp, c in chosen])
                return {**counts, "examples": len(items), "too_long": too_long, **self.fit(d, model, tok, items, "sft")}
            from llmx.reasoning.prompts import respond_prompt

            def dialogue(q, r):
                return [{"role": "user", "content": respond_prompt(q)}, {"role": "assistant", "content": r}]

            items = [pair_item(tok, dialogue(q, resp[c.best]), dialogue(q, resp[c.worst]), None, None)
                     for q, resp, c in chosen if c.worst is not None]
            items = [it for it in items if max(len(it["chosen_ids"]), len(it["rejected_ids"])) <= t.seq_len]
            add_reference(model, items, self.info.device)
            return {**counts, "pairs": len(items), **self.fit(d, model, tok, items, ("pairs", "none", t.beta, t.nll))}

        self.stage(self.work / "train" / use, {**up, "use": use, "selftrain": plain(st)}, run, all_ranks=True)
        return str(self.work / "train" / use / "hf")


def stage_counts(reports: Dict[str, Any]) -> Dict[str, Any]:
    """Items in and out of every stage, summed over shards, with what each removed and why."""
    gen, resp, filt = reports["generate"], reports["respond"], reports["filter"]
    add = lambda stage, key: sum(r[stage].get(key, 0) for r in gen)  # noqa: E731
    return {
        "documents": sum(r["documents"] for r in gen),
        "annotate": {"input": add("annotate", "input"), "unparsed": add("annotate", "unparsed"),
                     "below_threshold": add("annotate", "below_threshold"), "kept": add("annotate", "kept"),
                     "seconds": round(add("annotate", "seconds"), 1)},
        "synthesize": {"input": add("synthesize", "input"), "unparsed": add("synthesize", "unparsed"),
                       "kept": add("synthesize", "kept"), "with_reference_answer": add("synthesize", "with_reference_answer"),
                       "seconds": round(add("synthesize", "seconds"), 1)},
        "dedup": {k: filt["dedup"][k] for k in ("input", "same_text", "removed", "kept", "seconds")},
        "decontaminate": {k: filt["decontaminate"].get(k) for k in ("input", "removed", "kept", "seconds", "removed_per_benchmark")},
        "respond": {"input": sum(r["input"] + r["no_teacher_answer"] for r in resp),
                    "no_teacher_answer": sum(r["no_teacher_answer"] for r in resp),
                    "kept": sum(r["kept"] for r in resp), "responses": sum(r["responses"] for r in resp),
                    "empty_responses": sum(r["empty_responses"] for r in resp),
                    "seconds": round(sum(r["seconds"] for r in resp), 1)},
    }


def counts_table(c: Dict[str, Any]) -> str:
    rows = [("documents", c["documents"], "", "")]
    for stage in ("annotate", "synthesize", "dedup", "decontaminate", "respond"):
        x = c[stage]
        removed = {k: v for k, v in x.items() if k in ("unparsed", "below_threshold", "removed", "same_text",
                                                        "empty_responses", "no_teacher_answer") and v}
        rows.append((stage, x.get("input"), x.get("kept"), json.dumps(removed) if removed else ""))
    lines = ["| stage | in | out | removed |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    return "\n".join(lines)


def accuracy_table(results: Dict[str, Any]) -> str:
    lines = ["| model | accuracy | answered | response words |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f} ({r['questions']}) | "
                     f"{100 * r['answered']:.0f}% | {r['response_words']:.0f} |")
    return "\n".join(lines)
