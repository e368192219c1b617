"""Batched multi-turn rollouts: many ColBench episodes at once, the agent behind any llmx backend.

The agent is an `llmx.bench.backends.Backend` given whole dialogues: `HFBackend` (a local transformers model,
left-padded batched generation) or `OpenAIBackend` (a vLLM/SGLang server, concurrent requests), so the same
code collects 15k trajectories from a served 8B model and a few hundred from a tiny CPU policy. Each round,
every unfinished episode's dialogue goes to the agent in one `generate` call and every reply to the
environments in one `step_many` call (one batched simulator call, one batch of sandboxed test runs).

Sampling is seeded per episode and round (the backend's per-key seed), so an episode is the same whether it
runs alone or in a batch, first time or after a restart. Finished episodes are appended to a JSONL file as
chunks complete; a rerun skips the keys already written (`JsonlLog`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from llmx.bench.backends import Backend, GenRequest
from llmx.rl.data import JsonlLog


def _generate(agent: Backend, requests: List[GenRequest]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    agent.generate(requests, lambda key, replies: out.__setitem__(key, replies))
    return out


def run_episodes(agent: Backend, make_env: Callable[[], Any], jobs: Sequence[Tuple[str, Any]],
                 workers: int = 2) -> List[Dict[str, Any]]:
    """Play one episode per (key, task) to the end; returns trajectory records in the order of `jobs`.
    `workers`: sandboxed test runs in parallel."""
    from llmx.rl.env import step_many

    envs = [make_env() for _ in jobs]
    obs = [env.reset(task) for env, (_, task) in zip(envs, jobs)]
    reward = [0.0] * len(jobs)
    live = list(range(len(jobs)))
    cut: set = set()
    rnd = 0
    while live:
        # A dialogue that no longer fits the agent's context ends there, unanswered (reward 0), rather than
        # failing the whole batch.
        too_long = [i for i in live if not fits(agent, obs[i])]
        cut.update(too_long)
        live = [i for i in live if i not in cut]
        if not live:
            break
        replies = _generate(agent, [GenRequest(key=f"{jobs[i][0]}#{rnd}", prompt=obs[i]) for i in live])
        results = step_many([envs[i] for i in live], [replies[f"{jobs[i][0]}#{rnd}"][0] for i in live], workers=workers)
        still = []
        for i, (o, r, done) in zip(live, results):
            obs[i], reward[i] = o, r
            if not done:
                still.append(i)
        live, rnd = still, rnd + 1
    return [trajectory_record(key, task, env, reward[i], i in cut)
            for i, ((key, task), env) in enumerate(zip(jobs, envs))]


def fits(agent: Backend, messages) -> bool:
    limit = getattr(agent, "max_positions", None)
    if not limit or not hasattr(agent, "render"):
        return True
    return len(agent.render(messages)) + agent.max_new_tokens <= limit


def trajectory_record(key: str, task: Any, env: Any, reward: float, cut: bool = False) -> Dict[str, Any]:
    last = env.messages[-1]
    answered = last["role"] == "assistant" and env.end_marker in last["content"]
    return {"key": key, "task": task.to_json(), "dialogue_history": env.messages, "answer": env.answer,
            "reward": reward, "success": reward >= 1.0, "answered": answered, "context_full": cut}


def collect(agent: Backend, make_env: Callable[[], Any], tasks: Sequence[Any], copies: int, out_path,
            chunk: int = 256, log: Optional[Callable[[str], None]] = None, workers: int = 2) -> List[Dict[str, Any]]:
    """`copies` episodes of every task (key "<task_id>/<copy>"), appended to `out_path` chunk by chunk;
    episodes already in the file are kept, not replayed."""
    journal = JsonlLog(out_path)
    jobs = [(f"{t.task_id}/{c}", t) for c in range(copies) for t in tasks]
    todo = [j for j in jobs if j[0] not in journal.done]
    try:
        for lo in range(0, len(todo), chunk):
            for rec in run_episodes(agent, make_env, todo[lo: lo + chunk], workers=workers):
                journal.write(rec)
            if log:
                log(f"{len(jobs) - len(todo) + min(lo + chunk, len(todo))}/{len(jobs)} episodes")
    finally:
        journal.close()
    order = {key: n for n, (key, _) in enumerate(jobs)}
    return sorted((r for r in journal.records if r["key"] in order), key=lambda r: order[r["key"]])


def sample_turns(agent: Backend, turns: Sequence[Dict[str, Any]], n: int, out_path, chunk: int = 64,
                 log: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """For each turn record {"key", "messages" (the dialogue before the turn), ...}: `n` candidate agent turns
    sampled from `agent`, appended to `out_path` as {**turn, "candidates": [...]} (resumable)."""
    journal = JsonlLog(out_path)
    todo = [t for t in turns if t["key"] not in journal.done]
    try:
        for lo in range(0, len(todo), chunk):
            part = todo[lo: lo + chunk]
            got = _generate(agent, [GenRequest(key=t["key"], prompt=t["messages"], n=n) for t in part])
            for t in part:
                journal.write({**t, "candidates": got[t["key"]]})
            if log:
                log(f"{len(turns) - len(todo) + lo + len(part)}/{len(turns)} turns sampled")
    finally:
        journal.close()
    keys = {t["key"] for t in turns}
    return [r for r in journal.records if r["key"] in keys]
