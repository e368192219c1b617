"""rl recipe: SWEET-RL on ColBench backend programming, with the paper's baselines and ablations.

    llmx run recipe=sweet_rl_tiny                 # CPU: a tiny policy warm-started here, rule simulator
    llmx run recipe=sweet_rl_llama3_8b rl.tasks.train_path=... evaluator.base_url=http://node:8000/v1

Paper: Zhou et al., "SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning Tasks",
arXiv 2503.15478. Stages, each in its own directory of the run, cached and resumable (a rerun with
hydra.run.dir=<run dir> skips what is done; a stage changed by the config is refused):

  tasks      train/test tasks (generated offline, or read from ColBench JSONL), written to tasks/
  warmstart  (tiny only) SFT of a from-scratch policy on a scripted collaborator's episodes
  collect    `rl.copies` episodes per training task with the initial policy (T=1.0): the offline data
  evaluate   rewards -> trajectory pairs (best successful copy vs every lower copy; 10% of tasks held out)
  critic     Bradley-Terry on trajectory pairs, turn advantage = mean log π_θ/π_ref over the turn's tokens,
             with the reference solution c in the critic's context only (Eq. 2-3; rl.critic.normalize)
  sample     `rl.candidates` candidate turns from the initial policy for every agent turn of
             `rl.data_fraction` of the trajectories
  rank       candidates scored by the critic; per turn `rl.pairs_per_turn` pairs top half vs bottom half
  actor      per-turn DPO (β 0.1) + 0.01 NLL from the initial policy (Eq. 4)
  eval       each method's policy on the test tasks: success rate, % tests passed, turns, turn length

Baselines on the same data: zero_shot (the initial policy), rft (SFT on successful trajectories), mtdpo
(DPO on the trajectory pairs, every agent turn). Ablations: sweet_no_info (critic without c),
sweet_no_norm (summed, not averaged, log-ratios), sweet_value (a value head predicting success from the
history and c, scoring a candidate by the value after it). Choices where the paper and the reference
differ follow the paper, the other is a config: critic normalisation (rl.critic.normalize=turn; the
reference code: trajectory), the reference term with c (rl.critic.reference_with_info=true; the code: false),
critic NLL 0.01 (Table 5; the README: 0).

All training runs on llmx's trainer core (single process or FSDP2 under torchrun; the value-head ablation is
single-process). Reference log-probs are computed once per stage with the initial model before training.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from llmx.rl.train import add_reference, load_policy, pair_accuracy, pair_item, schedule, train, turn_sums
from llmx.utils import (LlmxError, atomic_write_json, atomic_write_text, cached_stage, enum_value, plain,
                        sha256_text)

CRITICS = {"sweet": "critic", "sweet_no_info": "critic_no_info", "sweet_no_norm": "critic_no_norm",
           "sweet_value": "critic_value"}


def main(cfg) -> Dict[str, Any]:
    run = Run(cfg)
    return run.main()


# --- config checks -----------------------------------------------------------------------------------


def check_config(cfg) -> None:
    r = cfg.rl
    methods = [enum_value(m) for m in r.methods]
    if not methods:
        raise LlmxError("rl.methods is empty; valid methods: zero_shot, rft, mtdpo, sweet, sweet_no_info, "
                        "sweet_no_norm, sweet_value")
    if r.tasks.source not in ("generate", "file"):
        raise LlmxError(f"rl.tasks.source={r.tasks.source!r}; valid: generate, file")
    if r.tasks.source == "file":
        for key in ("train_path", "test_path"):
            p = r.tasks[key]
            if not p or not Path(p).is_file():
                raise LlmxError(f"rl.tasks.{key}={p!r}: no such file (rl.tasks.source=file needs ColBench JSONL files)")
    if r.env.simulator not in ("rule", "llm"):
        raise LlmxError(f"rl.env.simulator={r.env.simulator!r}; valid: rule, llm")
    if r.env.simulator == "rule" and r.tasks.source == "file":
        raise LlmxError("rl.env.simulator=rule answers from generated tasks' hidden slots; ColBench files need "
                        "rl.env.simulator=llm (and an evaluator group for the simulator's backend)")
    if r.agent.backend not in ("hf", "openai"):
        raise LlmxError(f"rl.agent.backend={r.agent.backend!r}; valid: hf, openai")
    if r.agent.backend == "openai" and methods != ["zero_shot"]:
        raise LlmxError("rl.agent.backend=openai serves a fixed model: it collects data and evaluates zero_shot "
                        "only; trained policies are evaluated with rl.agent.backend=hf")
    if r.candidates < 2 or r.pairs_per_turn < 1:
        raise LlmxError(f"rl.candidates={r.candidates} must be >= 2 and rl.pairs_per_turn={r.pairs_per_turn} >= 1")
    if any(n < 1 for n in r.best_of_n) or r.best_of_n_tasks < 0:
        raise LlmxError(f"rl.best_of_n={list(r.best_of_n)} needs every N >= 1 and rl.best_of_n_tasks="
                        f"{r.best_of_n_tasks} >= 0 (0: every test task)")
    if not 0 < r.data_fraction <= 1:
        raise LlmxError(f"rl.data_fraction={r.data_fraction} must be in (0, 1]")
    for name in ("critic", "actor", "rft", "mtdpo"):
        t = r[name]
        if t.batch_size % t.micro_batch_size:
            raise LlmxError(f"rl.{name}.batch_size={t.batch_size} must be a multiple of "
                            f"rl.{name}.micro_batch_size={t.micro_batch_size}")
        if t.epochs <= 0 or t.lr <= 0:
            raise LlmxError(f"rl.{name}: epochs={t.epochs} and lr={t.lr} must be > 0")
    if r.offline_data:
        from llmx.rl.data import read_trajectories

        if not Path(r.offline_data).is_file():
            raise LlmxError(f"rl.offline_data={r.offline_data!r}: no such file")
        read_trajectories(r.offline_data)  # a file of another format fails here, naming the line
    if r.warmstart.steps and enum_value(cfg.model.source) != "preset":
        raise LlmxError("rl.warmstart.steps > 0 trains a policy from scratch: it needs a preset model (model.source=preset)")
    if not r.warmstart.steps and enum_value(cfg.model.source) == "preset":
        raise LlmxError("a preset model is untrained: set rl.warmstart.steps > 0 (the tiny recipe) or use a "
                        "pretrained instruct model (model.source=hf|gguf)")


# --- the run -----------------------------------------------------------------------------------------


class Run:
    def __init__(self, cfg):
        check_config(cfg)
        self.cfg = cfg
        self.r = cfg.rl
        self.dir = Path(cfg.run_dir)
        self.methods = [enum_value(m) for m in self.r.methods]
        from llmx.trainer.distributed import init_distributed

        self.info = init_distributed(cfg.trainer.device)
        self.simulator = self._simulator()  # an unreachable server fails here, before any work

    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(f"llmx: {msg}", flush=True)

    # -- pieces shared by the stages --
    def _simulator(self):
        from llmx.rl.simulator import LLMSimulator, RuleSimulator

        if self.r.env.simulator == "rule":
            return RuleSimulator()
        from llmx.bench.backends import build_backend

        return LLMSimulator(build_backend(self.cfg.evaluator, self.cfg.model))

    def limits(self):
        from llmx.rl.sandbox import Limits

        return Limits(call_timeout_s=self.r.env.call_timeout_s, memory_mb=self.r.env.memory_mb)

    def make_env(self):
        from llmx.rl.env import CollabEnv

        e = self.r.env
        return CollabEnv(self.simulator, max_rounds=e.max_rounds, reply_chars=e.reply_chars,
                         end_marker=e.end_marker, limits=self.limits())

    def system_prompt(self) -> str:
        from llmx.rl.colbench import AGENT_SYSTEM_PROMPT

        return self.r.agent.system_prompt if self.r.agent.system_prompt is not None else AGENT_SYSTEM_PROMPT

    def stage(self, name: str, upstream: Dict[str, Any], fn: Callable[[Path], Dict[str, Any]],
              all_ranks: bool = False) -> Dict[str, Any]:
        """llmx.utils.cached_stage in the run directory's `name`. At scale, run the data stages in one process and
        the training stages under torchrun, in the same run directory: each finds the other's stages done."""
        return cached_stage(self.dir / name, upstream, fn, say=self.say, is_main=self.info.is_main,
                            all_ranks=all_ranks)

    def agent(self, policy: str, temperature: float, seed: int):
        from llmx.bench.backends import HFBackend, OpenAIBackend

        a = self.r.agent
        if a.backend == "openai":
            return OpenAIBackend(a.base_url, a.model_name, concurrency=a.concurrency, max_tokens=a.max_new_tokens,
                                 temperature=temperature, seed=seed, system_prompt=self.system_prompt())
        model, tok = load_policy(policy)
        return HFBackend(model, tok, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, temperature=temperature,
                         seed=seed, system_prompt=self.system_prompt(), device=self.info.device)

    # -- stages --
    def main(self) -> Dict[str, Any]:
        r = self.r
        tasks = self.stage("tasks", {"tasks": plain(r.tasks), "seed": self.cfg.seed}, self._tasks)
        warm, train, test = (self._read_tasks(self.dir / "tasks" / f"{s}.jsonl") for s in ("warmstart", "train", "test"))
        self.say(f"tasks: {len(warm)} warm-start, {len(train)} train, {len(test)} test")
        policy0, up0 = self._initial_policy(warm)
        if r.offline_data:
            collect = self.stage("collect", {"offline_data": sha256_text(Path(r.offline_data).read_text())},
                                 self._offline)
        else:
            collect = self.stage("collect", {**up0, "stage": "collect", "copies": r.copies, "agent": plain(r.agent),
                                             "env": plain(r.env), "tasks": tasks["sha"]},
                                 lambda d: self._collect(d, policy0, train))
        records = self._trajectories()
        pairs_train, pairs_held = split_pairs(records, self.cfg.seed)
        self.say(f"data: {len(records)} trajectories, success {collect['success_rate']:.3f}; "
                 f"{len(pairs_train)} trajectory pairs ({len(pairs_held)} held out)")
        up = {**up0, "collect": collect["sha"]}
        results: Dict[str, Any] = {"data": collect, "methods": {}, "critics": {}}
        for method in self.methods:
            policy, critic_summary = self._method(method, policy0, up, records, pairs_train, pairs_held)
            if critic_summary:
                results["critics"][method] = critic_summary
            results["methods"][method] = self.stage(
                f"eval_{method}", {**up, "method": method, "policy": policy, "eval_copies": r.eval_copies,
                                   "tasks": tasks["sha"]},
                lambda d, p=policy: self._evaluate(d, p, test))
        if any(m in CRITICS for m in self.methods):
            results["critics_on_test"] = self._critics_on_test(policy0, up, results)
        if r.best_of_n:
            results["best_of_n"] = self._best_of_n(policy0, up, test, records, pairs_train, pairs_held)
        if self.info.is_main:
            atomic_write_json(self.dir / "results.json", results)
            atomic_write_text(self.dir / "results.md", results_table(results))
            print(results_table(results), flush=True)
        return {f"{m}/{k}": v for m, s in results["methods"].items() for k, v in s.items() if k in
                ("success_rate", "tests_passed", "mean_turn_tokens")}

    def _tasks(self, d: Path) -> Dict[str, Any]:
        from llmx.rl.colbench import generate_tasks, load_tasks, save_tasks

        t = self.r.tasks
        if t.source == "file":
            train = load_tasks(t.train_path)[: t.n_train]
            test = load_tasks(t.test_path)[: t.n_test]
            warm = []
        else:
            n = t.n_warmstart + t.n_train + t.n_test
            tasks = generate_tasks(n, seed=t.seed, limits=self.limits())
            if len(tasks) < n:
                raise LlmxError(f"the task generator made {len(tasks)} distinct tasks, fewer than the {n} asked for")
            # Test tasks first, so that a larger training set never takes a test task.
            test, train, warm = (tasks[: t.n_test], tasks[t.n_test: t.n_test + t.n_train],
                                 tasks[t.n_test + t.n_train:])
        overlap = {x.task_id for x in test} & {x.task_id for x in train + warm}
        if overlap:
            raise LlmxError(f"{len(overlap)} test tasks are also training tasks (e.g. {sorted(overlap)[0]})")
        for name, part in (("warmstart", warm), ("train", train), ("test", test)):
            save_tasks(d / f"{name}.jsonl", part)
        sha = sha256_text(*[(d / f"{s}.jsonl").read_text() for s in ("warmstart", "train", "test")])
        return {"warmstart": len(warm), "train": len(train), "test": len(test), "sha": sha}

    def _read_tasks(self, path: Path):
        from llmx.rl.colbench import load_tasks

        return load_tasks(path)

    def _initial_policy(self, warm) -> Tuple[str, Dict[str, Any]]:
        if not self.r.warmstart.steps:
            from llmx.models import pretrained_dir

            path = pretrained_dir(self.cfg.model)
            return path, {"policy0": str(path)}
        up = {"stage": "warmstart", "model": plain(self.cfg.model), "warmstart": plain(self.r.warmstart),
              "seed": self.cfg.seed, "system": self.system_prompt()}
        self.stage("warmstart", up, lambda d: self._warmstart(d, warm), all_ranks=True)
        return str(self.dir / "warmstart" / "hf"), {"policy0": up}

    def _warmstart(self, d: Path, warm) -> Dict[str, Any]:
        """Scripted episodes -> a BPE with the tiny chat template -> a preset model SFT'd on the agent turns."""
        from llmx.data.tokenizer import train_bpe
        from llmx.models import build_model
        from llmx.rl.chat import render, tiny_chat_template
        from llmx.rl.colbench import scripted_turns

        w = self.r.warmstart
        rng = random.Random(self.cfg.seed)
        episodes = [t for _ in range(w.episodes_per_task) for t in warm]
        dialogues = [self._scripted_dialogue(t, scripted_turns(t, rng, ask_prob=w.ask_prob, junk_prob=w.junk_prob,
                                                                    guess=w.guess))
                     for t in episodes]
        texts = [f"{self.system_prompt()}\n" + "\n".join(m["content"] for m in dlg) for dlg in dialogues]
        tok = train_bpe(texts, w.vocab_size, d / "tokenizer")
        tok.chat_template = tiny_chat_template()
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.model, vocab_size=len(tok))
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.eos_token_id
        items = [dict(zip(("ids", "segments"), render(tok, dlg, self.system_prompt()))) for dlg in dialogues]
        n_val = max(2, len(items) // 20)  # >= 2: the same split on 1 and 2 ranks
        tcfg = {"lr": w.lr, "batch_size": w.batch_size, "micro_batch_size": max(1, w.batch_size // self.info.world_size),
                "warmup_steps": 20,
                "steps": w.steps}
        final = train(self.cfg, self.info, d, model, tok, items[n_val:], items[:n_val], "sft", tcfg)
        return {"episodes": len(dialogues), "vocab": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
                "scripted_success": sum(self._scripted_reward(t, dlg) >= 1 for t, dlg in zip(episodes[:200], dialogues))
                / max(1, min(200, len(episodes))), **final}

    def _scripted_dialogue(self, task, turns: List[str]) -> List[Dict[str, str]]:
        env = self.make_env()
        env.reset(task)
        for turn in turns:
            _, _, done = env.step(turn)
            if done:
                break
        return env.messages

    def _scripted_reward(self, task, dialogue) -> float:
        from llmx.rl.colbench import score

        answer = dialogue[-1]["content"]
        marker = self.r.env.end_marker
        if marker not in answer:
            return 0.0
        passed, total = score(task, answer.split(marker, 1)[1], limits=self.limits())
        return passed / max(1, total)

    def _collect(self, d: Path, policy: str, train) -> Dict[str, Any]:
        from llmx.rl.rollout import collect

        agent = self.agent(policy, self.r.agent.temperature, seed=self.cfg.seed)
        records = collect(agent, self.make_env, train, self.r.copies, d / "trajectories.jsonl", log=self.say,
                          workers=self.r.env.workers)
        s = episode_stats(records, agent)
        s["sha"] = sha256_text((d / "trajectories.jsonl").read_text())
        by_task: Dict[str, float] = {}
        for rec in records:
            by_task[rec["task"]["task_id"]] = max(by_task.get(rec["task"]["task_id"], 0.0), rec["reward"])
        s["best_of_copies_success"] = sum(v >= 1 for v in by_task.values()) / max(1, len(by_task))
        return s

    def _offline(self, d: Path) -> Dict[str, Any]:
        from llmx.rl.data import read_trajectories

        records = read_trajectories(self.r.offline_data)
        write_jsonl(d / "trajectories.jsonl", records)
        s = episode_stats(records, None)
        s["sha"] = sha256_text((d / "trajectories.jsonl").read_text())
        s["source"] = str(self.r.offline_data)
        return s

    def _trajectories(self) -> List[Dict[str, Any]]:
        from llmx.rl.data import read_trajectories

        return read_trajectories(self.dir / "collect" / "trajectories.jsonl")

    def _evaluate(self, d: Path, policy: str, test) -> Dict[str, Any]:
        from llmx.rl.rollout import collect

        agent = self.agent(policy, self.r.agent.temperature, seed=self.cfg.seed + 1)
        records = collect(agent, self.make_env, test, self.r.eval_copies, d / "trajectories.jsonl", log=self.say,
                          workers=self.r.env.workers)
        return episode_stats(records, agent)

    # -- methods --
    def _method(self, method, policy0, up, records, pairs_train, pairs_held) -> Tuple[str, Optional[Dict[str, Any]]]:
        if method == "zero_shot":
            return policy0, None
        if method == "rft":
            return self._rft(policy0, up, records), None
        if method == "mtdpo":
            return self._mtdpo(policy0, up, pairs_train, pairs_held), None
        critic_dir, critic_summary = self._critic(method, policy0, up, pairs_train, pairs_held)
        return self._sweet_actor(method, policy0, up, records, critic_dir), critic_summary

    def _rft(self, policy0, up, records) -> str:
        from llmx.rl.chat import render

        def run(d: Path) -> Dict[str, Any]:
            model, tok = load_policy(policy0)
            wins = [rec for rec in records if rec["reward"] >= 1.0]
            if not wins:
                raise LlmxError("rft: no successful trajectory in the offline data")
            items = [dict(zip(("ids", "segments"), render(tok, rec["dialogue_history"], self.system_prompt())))
                     for rec in wins]
            n_val = max(2, len(items) // 10)
            t = schedule(self.r.rft, len(items) - n_val)
            return {"trajectories": len(items),
                    **train(self.cfg, self.info, d, model, tok, items[n_val:], items[:n_val], "sft", t)}

        self.stage("rft", {**up, "rft": plain(self.r.rft)}, run, all_ranks=True)
        return str(self.dir / "rft" / "hf")

    def _mtdpo(self, policy0, up, pairs_train, pairs_held) -> str:
        def run(d: Path) -> Dict[str, Any]:
            model, tok = load_policy(policy0)
            sysp = self.system_prompt()
            items = [pair_item(tok, c["dialogue_history"], r["dialogue_history"], sysp, sysp)
                     for c, r in pairs_train]
            held = [pair_item(tok, c["dialogue_history"], r["dialogue_history"], sysp, sysp)
                    for c, r in pairs_held]
            add_reference(model, items + held, self.info.device)
            mode = ("pairs", enum_value(self.r.mtdpo_normalize), self.r.mtdpo.beta, self.r.mtdpo.nll)
            t = schedule(self.r.mtdpo, len(items))
            return {"pairs": len(items), **train(self.cfg, self.info, d, model, tok, items, held, mode, t)}

        self.stage("mtdpo", {**up, "mtdpo": plain(self.r.mtdpo), "norm": enum_value(self.r.mtdpo_normalize)}, run,
                   all_ranks=True)
        return str(self.dir / "mtdpo" / "hf")

    def critic_setup(self, method: str) -> Dict[str, Any]:
        c = self.r.critic
        return {"info": method != "sweet_no_info", "normalize": "none" if method == "sweet_no_norm" else enum_value(c.normalize),
                "value": method == "sweet_value", "critic": plain(c)}

    def critic_system(self, task: Dict[str, Any], with_info: bool) -> str:
        from llmx.rl.chat import with_training_info

        sysp = self.system_prompt()
        return with_training_info(sysp, task["ground_truth"], self.r.critic.info_template) if with_info else sysp

    def _critic(self, method, policy0, up, pairs_train, pairs_held) -> Tuple[Path, Dict[str, Any]]:
        setup = self.critic_setup(method)
        name = CRITICS[method]

        def run(d: Path) -> Dict[str, Any]:
            model, tok = load_policy(policy0)

            def item(c, r):
                return pair_item(tok, c["dialogue_history"], r["dialogue_history"],
                                 self.critic_system(c["task"], setup["info"]),
                                 self.critic_system(r["task"], setup["info"]))

            if setup["value"]:
                return self.train_value_critic(d, model, tok, pairs_train, pairs_held, setup)
            items = [item(c, r) for c, r in pairs_train]
            held = [item(c, r) for c, r in pairs_held]
            add_reference(model, items + held, self.info.device)
            c = self.r.critic
            mode = ("pairs", setup["normalize"], c.beta, c.nll)
            final = train(self.cfg, self.info, d, model, tok, items, held, mode, schedule(c, len(items)))
            trained, _ = load_policy(str(d / "hf"))
            acc = pair_accuracy(trained, held, setup["normalize"], self.info.device)
            return {"pairs": len(items), "held_out_pairs": len(held), "held_out_accuracy": acc, **final}

        summary = self.stage(name, {**up, "critic": setup}, run, all_ranks=not setup["value"])
        return self.dir / name, summary

    def _sweet_actor(self, method, policy0, up, records, critic_dir: Path) -> str:
        setup = self.critic_setup(method)
        rng = random.Random(self.cfg.seed)
        chosen = [rec for rec in records if rng.random() < self.r.data_fraction]
        turns = [{"key": f"{rec['key']}@{i}", "messages": rec["dialogue_history"][:i], "task": rec["task"]}
                 for rec in chosen for i, m in enumerate(rec["dialogue_history"]) if m["role"] == "assistant"]
        up_s = {**up, "stage": "sample", "n": self.r.candidates, "fraction": self.r.data_fraction}

        def sample(d: Path) -> Dict[str, Any]:
            from llmx.rl.rollout import sample_turns

            agent = self.agent(policy0, self.r.agent.temperature, seed=self.cfg.seed + 2)
            got = sample_turns(agent, turns, self.r.candidates, d / "candidates.jsonl", log=self.say)
            return {"turns": len(got), "trajectories": len(chosen)}

        self.stage("sample", up_s, sample)
        name = CRITICS[method]
        rank_name = f"rank_{name}"

        def rank(d: Path) -> Dict[str, Any]:
            from llmx.rl.data import read_jsonl

            sampled = read_jsonl(self.dir / "sample" / "candidates.jsonl")
            scores = self.score_candidates(sampled, critic_dir, policy0, setup)
            prng = random.Random(self.cfg.seed)
            from llmx.rl.data import turn_pairs

            out = []
            for t, s in zip(sampled, scores):
                for ci, ri in turn_pairs(s, self.r.pairs_per_turn, prng):
                    if t["candidates"][ci] != t["candidates"][ri]:
                        out.append({"messages": t["messages"], "chosen": t["candidates"][ci],
                                    "rejected": t["candidates"][ri]})
            write_jsonl(d / "pairs.jsonl", out)
            return {"turns": len(sampled), "pairs": len(out)}

        self.stage(rank_name, {**up_s, "critic": setup}, rank)
        actor_name = f"actor_{name}"

        def actor(d: Path) -> Dict[str, Any]:
            from llmx.rl.data import read_jsonl

            pairs = read_jsonl(self.dir / rank_name / "pairs.jsonl")
            model, tok = load_policy(policy0)
            sysp = self.system_prompt()
            items = [self.turn_pair_item(tok, p, sysp) for p in pairs]
            n_val = max(2, len(items) // 20)  # >= 2: the same split on 1 and 2 ranks
            add_reference(model, items, self.info.device)
            a = self.r.actor
            mode, t = ("pairs", "none", a.beta, a.nll), schedule(a, len(items) - n_val)
            return {"pairs": len(items), **train(self.cfg, self.info, d, model, tok, items[n_val:], items[:n_val], mode, t)}

        self.stage(actor_name, {**up_s, "critic": setup, "actor": plain(self.r.actor), "pairs_per_turn": self.r.pairs_per_turn},
                   actor, all_ranks=True)
        return str(self.dir / actor_name / "hf")

    # -- items, scoring, training --
    def turn_pair_item(self, tok, pair: Dict[str, Any], sysp: str) -> Dict[str, Any]:
        """A per-turn pair: the shared history, then the chosen or the rejected turn, the only target."""
        item = pair_item(tok, pair["messages"] + [{"role": "assistant", "content": pair["chosen"]}],
                         pair["messages"] + [{"role": "assistant", "content": pair["rejected"]}], sysp, sysp)
        for side in ("chosen", "rejected"):
            seg = item[f"{side}_segments"]
            last = max(seg)
            item[f"{side}_segments"] = [1 if s == last else 0 for s in seg]
        return item

    def score_candidates(self, sampled, critic_dir: Path, policy0: str, setup) -> List[List[float]]:
        """Each candidate's advantage under the critic: mean (or sum, no_norm) over the candidate's tokens of
        log π_critic − log π_ref, both with c in context (paper) unless configured otherwise; value critic:
        the value of the history followed by the candidate."""
        from llmx.rl.chat import render

        _, tok = load_policy(policy0)
        rows, ref_rows = [], []
        for t in sampled:
            for cand in t["candidates"]:
                dlg = t["messages"] + [{"role": "assistant", "content": cand}]
                ids, seg = render(tok, dlg, self.critic_system(t["task"], setup["info"]))
                last = max(seg)
                rows.append({"ids": ids, "segments": [1 if s == last else 0 for s in seg]})
                ref_info = setup["info"] and self.r.critic.reference_with_info
                rid, rseg = render(tok, dlg, self.critic_system(t["task"], ref_info))
                ref_rows.append({"ids": rid, "segments": [1 if s == max(rseg) else 0 for s in rseg]})
        if setup["value"]:
            flat = value_scores(critic_dir / "value.pt", policy0, rows, self.info.device)
        else:
            critic, _ = load_policy(str(critic_dir / "hf"))
            ref, _ = load_policy(policy0)
            pol_s, counts = turn_sums(critic, rows, self.info.device)
            ref_s, _ = turn_sums(ref, ref_rows, self.info.device)
            flat = [(p - q) / (max(n, 1) if setup["normalize"] != "none" else 1.0)
                    for p, q, n in zip(pol_s[:, 0].tolist(), ref_s[:, 0].tolist(), counts[:, 0].tolist())]
        out, k = [], 0
        for t in sampled:
            out.append(flat[k: k + len(t["candidates"])])
            k += len(t["candidates"])
        return out

    def train_value_critic(self, d: Path, model, tok, pairs_train, pairs_held, setup) -> Dict[str, Any]:
        """The "w/ value function" ablation: a value head on the policy's backbone, trained (BCE) to predict a
        trajectory's success from its history up to each agent turn and c; scored by held-out pair accuracy
        (the value after the last turn of the chosen vs the rejected trajectory). Single process."""
        from llmx.rl.chat import render
        from llmx.rl.losses import ValueHead, value_loss

        def examples(pairs):
            seen, out = set(), []
            for c, r in pairs:
                for rec in (c, r):
                    if rec["key"] in seen:
                        continue
                    seen.add(rec["key"])
                    dlg = rec["dialogue_history"]
                    for i, m in enumerate(dlg):
                        if m["role"] == "assistant":
                            ids, _ = render(tok, dlg[: i + 1], self.critic_system(rec["task"], True))
                            out.append((ids, float(rec["reward"] >= 1.0)))
            return out

        train = examples(pairs_train)
        c = self.r.critic
        head = ValueHead(model).to(self.info.device)
        opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=c.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        steps = max(1, math.ceil(c.epochs * len(train) / c.batch_size))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        head.train()
        losses = []
        for step in range(steps):
            idx = torch.randint(len(train), (c.batch_size,), generator=gen).tolist()
            ids, mask = _pad_rows([train[i][0] for i in idx], pad)
            y = torch.tensor([train[i][1] for i in idx])
            loss = value_loss(head(ids.to(self.info.device), mask.to(self.info.device)), y.to(self.info.device)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        torch.save(head.state_dict(), d / "value.pt")
        head.eval()

        def final_value(rec):
            ids, _ = render(tok, rec["dialogue_history"], self.critic_system(rec["task"], True))
            x, m = _pad_rows([ids], pad)
            with torch.no_grad():
                return float(head(x.to(self.info.device), m.to(self.info.device))[0])

        acc = sum(final_value(cc) > final_value(rr) for cc, rr in pairs_held) / max(1, len(pairs_held))
        return {"examples": len(train), "steps": steps, "train_loss": sum(losses[-20:]) / len(losses[-20:]),
                "held_out_pairs": len(pairs_held), "held_out_accuracy": acc}

    def _critics_on_test(self, policy0, up, results) -> Dict[str, Any]:
        """Each critic's pair accuracy on tasks it never saw: the reference's pair rule applied to the test
        episodes of the baselines (zero-shot, RFT, multi-turn DPO: policies no critic shaped). A larger and
        unseen set than the held-out training pairs (a tenth of a few hundred)."""
        from llmx.rl.chat import render
        from llmx.rl.data import read_trajectories, task_id, trajectory_pairs

        sources = [m for m in ("zero_shot", "rft", "mtdpo") if m in results["methods"]]
        files = [self.dir / f"eval_{m}" / "trajectories.jsonl" for m in sources]
        pairs = trajectory_pairs([rec for f in files for rec in read_trajectories(f)])
        data = sha256_text("".join(f.read_text() for f in files))
        out = {}
        for method in (m for m in self.methods if m in CRITICS):
            setup, name = self.critic_setup(method), CRITICS[method]

            def run(d: Path, setup=setup, name=name) -> Dict[str, Any]:
                if not pairs:
                    return {"pairs": 0, "tasks": 0, "accuracy": float("nan")}
                model, tok = load_policy(policy0)
                if setup["value"]:
                    rows = [{"ids": render(tok, rec["dialogue_history"], self.critic_system(rec["task"], True))[0]}
                            for pair in pairs for rec in pair]
                    v = value_scores(self.dir / name / "value.pt", policy0, rows, self.info.device)
                    acc = sum(a > b for a, b in zip(v[0::2], v[1::2])) / len(pairs)
                else:
                    items = [pair_item(tok, c["dialogue_history"], r["dialogue_history"],
                                       self.critic_system(c["task"], setup["info"]),
                                       self.critic_system(r["task"], setup["info"])) for c, r in pairs]
                    add_reference(model, items, self.info.device)
                    trained, _ = load_policy(str(self.dir / name / "hf"))
                    acc = pair_accuracy(trained, items, setup["normalize"], self.info.device)
                return {"pairs": len(pairs), "tasks": len({task_id(c) for c, _ in pairs}), "accuracy": acc}

            out[method] = self.stage(f"testpairs_{name}", {**up, "critic": setup, "sources": sources, "data": data},
                                     run)
        return out

    def _best_of_n(self, policy0, up, test, records, pairs_train, pairs_held) -> Dict[str, Any]:
        """Fig. 3a: the initial policy, each turn the best of N candidates by a critic (with c / without c).
        N=1 involves no critic: it runs once and both critics' rows share it."""
        from llmx.rl.rollout import collect

        probe = test[: self.r.best_of_n_tasks or len(test)]
        out = {}
        for method in ("sweet", "sweet_no_info"):
            critic_dir, _ = self._critic(method, policy0, up, pairs_train, pairs_held)
            setup = self.critic_setup(method)
            for n in self.r.best_of_n:
                def run(d: Path, n=n, critic_dir=critic_dir, setup=setup) -> Dict[str, Any]:
                    agent = CriticPicker(self, self.agent(policy0, self.r.agent.temperature, self.cfg.seed + 3),
                                         critic_dir, policy0, setup, n, {t.task_id: t for t in probe})
                    recs = collect(agent, self.make_env, probe, 1, d / "trajectories.jsonl", log=self.say,
                                   workers=self.r.env.workers)
                    return episode_stats(recs, agent)

                name, key = (f"bestofn_{CRITICS[method]}_{n}", {"critic": setup}) if n > 1 else ("bestofn_1", {})
                out[f"{CRITICS[method]}/N={n}"] = self.stage(name, {**up, **key, "n": n, "tasks": len(probe)}, run)
        return out


def value_scores(path: Path, policy0: str, rows, device) -> List[float]:
    from llmx.rl.losses import ValueHead

    model, tok = load_policy(policy0)
    head = ValueHead(model)
    head.load_state_dict(torch.load(path, weights_only=True))
    head.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    with torch.no_grad():
        for lo in range(0, len(rows), 16):
            ids, mask = _pad_rows([r["ids"] for r in rows[lo: lo + 16]], pad)
            out += head(ids.to(device), mask.to(device)).float().cpu().tolist()
    return out


def _pad_rows(rows, pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from llmx.rl.data import pad_to

    return pad_to(rows, pad), pad_to([[1] * len(r) for r in rows], 0)


class CriticPicker:
    """An agent backend that samples N turns from the policy and keeps the one the critic scores highest."""

    def __init__(self, run: Run, base, critic_dir: Path, policy0: str, setup, n: int, tasks: Dict[str, Any]):
        self.run, self.base, self.critic_dir, self.policy0, self.setup, self.n, self.tasks = \
            run, base, critic_dir, policy0, setup, n, tasks

    def __getattr__(self, name: str):  # tokenizer, render, context limits: the sampling backend's
        return getattr(self.base, name)

    def generate(self, requests, on_result) -> None:
        from llmx.bench.backends import GenRequest

        got: Dict[str, List[str]] = {}
        self.base.generate([GenRequest(r.key, r.prompt, self.n) for r in requests], lambda k, v: got.__setitem__(k, v))
        if self.n == 1:
            for r in requests:
                on_result(r.key, got[r.key])
            return
        sampled = [{"messages": list(r.prompt), "candidates": got[r.key],
                    "task": self.tasks[r.key.rsplit("/", 1)[0]].to_json()} for r in requests]
        scores = self.run.score_candidates(sampled, self.critic_dir, self.policy0, self.setup)
        for r, t, s in zip(requests, sampled, scores):
            on_result(r.key, [t["candidates"][max(range(len(s)), key=lambda i: s[i])]])


# --- helpers ----------------------------------------------------------------------------------------------


def split_pairs(records, seed: int, held_share: float = 0.1):
    """Trajectory pairs, split by task (a stable hash of task id and seed): held-out pairs never share a task
    with training pairs."""
    from llmx.rl.data import task_id, trajectory_pairs

    pairs = trajectory_pairs(records)
    held = lambda p: int(sha256_text(f"{seed}:{task_id(p[0])}")[:8], 16) / 16**8 < held_share  # noqa: E731
    return [p for p in pairs if not held(p)], [p for p in pairs if held(p)]


def write_jsonl(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def episode_stats(records: Sequence[Dict[str, Any]], agent) -> Dict[str, Any]:
    """Success rate, % tests passed (with standard errors over episodes), and the dialogue's shape: agent turns,
    whether the agent answered before the round limit, mean agent turn length in tokens (the collapse detector:
    the paper's no-normalisation ablation collapses to short turns)."""
    n = len(records)
    if not n:
        return {"episodes": 0}
    succ = [float(r["reward"] >= 1.0) for r in records]
    rew = [float(r["reward"]) for r in records]
    turns = [[m["content"] for m in r["dialogue_history"] if m["role"] == "assistant"] for r in records]
    tok = getattr(agent, "tokenizer", None)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) if tok is not None else len(t.split())
               for ts in turns for t in ts]
    se = lambda xs: (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / max(1, len(xs) - 1) / len(xs)) ** 0.5  # noqa: E731
    return {"episodes": n, "success_rate": sum(succ) / n, "success_se": se(succ), "tests_passed": sum(rew) / n,
            "tests_passed_se": se(rew), "mean_turns": sum(map(len, turns)) / n,
            "answered": sum(bool(r.get("answered", True)) for r in records) / n,
            "mean_turn_tokens": sum(lengths) / max(1, len(lengths)),
            "turn_length_unit": "tokens" if tok is not None else "words"}


def results_table(results: Dict[str, Any]) -> str:
    lines = ["| method | success | % tests passed | agent turns | turn length |", "|---|---|---|---|---|"]
    for m, s in results["methods"].items():
        lines.append(f"| {m} | {s['success_rate']:.3f} ± {s['success_se']:.3f} | {100 * s['tests_passed']:.1f} | "
                     f"{s['mean_turns']:.2f} | {s['mean_turn_tokens']:.1f} |")
    if results.get("critics"):
        lines += ["", "| critic | held-out pair accuracy | pairs | test-task pair accuracy | pairs |",
                  "|---|---|---|---|---|"]
        for m, s in results["critics"].items():
            t = results.get("critics_on_test", {}).get(m, {"accuracy": float("nan"), "pairs": 0})
            lines.append(f"| {m} | {s['held_out_accuracy']:.3f} | {s['held_out_pairs']} | {t['accuracy']:.3f} | "
                         f"{t['pairs']} |")
    if results.get("best_of_n"):
        lines += ["", "| best-of-N | success | % tests passed |", "|---|---|---|"]
        for k, s in results["best_of_n"].items():
            lines.append(f"| {k} | {s['success_rate']:.3f} | {100 * s['tests_passed']:.1f} |")
    return "\n".join(lines) + "\n"
