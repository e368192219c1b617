"""Throughput of the rl kind, as ratios against baselines measured in the same run.

    python scripts/bench_rl.py --policy outputs/sweet_rl_tiny/<run>/warmstart/hf [--out bench_rl.json]

1. Sandboxed test executions: every generated task's reference function and its 10 test calls, in
   llmx.rl.sandbox (one isolated process per evaluation; workers 1 and 2) against the reference's in-process
   exec + eval + alarm(1) on the same tasks: evaluations per second and the price of safety (the ratio).
2. Rollouts: episodes per second of batched multi-turn generation with the hf backend and the rule simulator
   (the policy given, sampling at T=1), with the sandboxed scoring of finished episodes included.
3. Training: tokens per second of the critic (Bradley-Terry on trajectory pairs), the actor (per-turn DPO) and
   RFT (multi-turn SFT) steps against a pretraining step (causal LM loss on packed tokens) on the same model,
   the same optimizer and the same number of tokens per step.
Run it alone on the machine (or with OMP_NUM_THREADS=1): concurrent PyTorch processes distort each other.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch


def bench_sandbox(n_tasks: int, seed: int):
    from llmx.rl.colbench import generate_tasks
    from llmx.rl.sandbox import Limits, isolation, run_calls_in_process, run_many

    tasks = generate_tasks(n_tasks, seed=seed)
    jobs = [(t.ground_truth, list(t.test_cases.values())) for t in tasks]
    rows = {}
    t0 = time.perf_counter()
    for code, calls in jobs:
        run_calls_in_process(code, calls, timeout_s=1.0)
    rows["in_process"] = len(jobs) / (time.perf_counter() - t0)
    for workers in (1, 2):
        t0 = time.perf_counter()
        results = run_many(jobs, Limits(), workers=workers)
        rows[f"sandbox_w{workers}"] = len(jobs) / (time.perf_counter() - t0)
        assert all(r.defined and all(c.ok for c in r.calls) for r in results), "a reference failed in the sandbox"
    return {"evaluations": len(jobs), "calls_per_evaluation": 10, "evals_per_s": rows,
            "sandbox_over_in_process": {k: v / rows["in_process"] for k, v in rows.items() if k != "in_process"},
            "isolation": isolation()}


TINY_PROMPT = "Ask about the details you need, one question per turn. Then say I WANT TO ANSWER: and write the function."


def bench_rollout(policy: str, n_tasks: int, seed: int, batch_size: int, system_prompt: str):
    from llmx.bench.backends import HFBackend
    from llmx.rl.train import load_policy
    from llmx.rl.colbench import generate_tasks
    from llmx.rl.env import CollabEnv
    from llmx.rl.rollout import run_episodes
    from llmx.rl.simulator import RuleSimulator

    model, tok = load_policy(policy)
    agent = HFBackend(model, tok, batch_size=batch_size, max_new_tokens=96, temperature=1.0, seed=seed,
                      system_prompt=system_prompt)
    tasks = generate_tasks(n_tasks + 50, seed=seed + 7)[50:]
    sim = RuleSimulator()  # one simulator for all episodes: step_many batches its replies
    t0 = time.perf_counter()
    recs = run_episodes(agent, lambda: CollabEnv(sim), [(f"{t.task_id}/0", t) for t in tasks])
    dt = time.perf_counter() - t0
    turns = sum(sum(m["role"] == "assistant" for m in r["dialogue_history"]) for r in recs)
    return {"episodes": len(recs), "seconds": dt, "episodes_per_s": len(recs) / dt, "agent_turns_per_s": turns / dt,
            "success_rate": sum(r["reward"] >= 1 for r in recs) / len(recs), "batch_size": batch_size}


def bench_training(policy: str, steps: int, seed: int):
    """Steps of each loss on the same model with AdamW, same tokens per step."""
    from llmx.rl.train import add_reference, load_policy, pair_loss, sft_loss
    from llmx.rl.chat import render
    from llmx.rl.colbench import generate_tasks, scripted_turns
    from llmx.rl.data import collate_pairs, collate_sequences
    from llmx.rl.env import CollabEnv
    from llmx.rl.simulator import RuleSimulator
    from llmx.trainer.trainer import causal_lm_loss

    model, tok = load_policy(policy)
    rng = random.Random(seed)
    dialogues = []
    sim = RuleSimulator()
    for t in generate_tasks(64, seed=seed + 11):
        env = CollabEnv(sim)
        env.reset(t)
        for turn in scripted_turns(t, rng):
            if env.step(turn)[2]:
                break
        dialogues.append(env.messages)
    rendered = [render(tok, d, TINY_PROMPT) for d in dialogues]
    pairs = [{"chosen_ids": a[0], "chosen_segments": a[1], "rejected_ids": b[0], "rejected_segments": b[1]}
             for a, b in zip(rendered[0::2], rendered[1::2])]
    add_reference(model, pairs, torch.device("cpu"))
    per_step = 8
    pair_batch = collate_pairs(pairs[:per_step], tok.eos_token_id)
    sft_batch = collate_sequences([{"ids": i, "segments": s} for i, s in rendered[:2 * per_step]], tok.eos_token_id)
    n_tokens = int(pair_batch["attention_mask"].sum())
    flat = torch.tensor([x for i, _ in rendered for x in i])
    width = int(pair_batch["input_ids"].shape[1])
    rows_needed = max(1, n_tokens // width)
    packed = flat[: rows_needed * width].view(rows_needed, width)
    cases = {"pretrain (causal LM, packed)": (causal_lm_loss, packed),
             "critic (Bradley-Terry, turn-normalised)": (pair_loss("turn", 0.1, 0.01), pair_batch),
             "actor / MT-DPO (DPO + NLL)": (pair_loss("none", 0.1, 0.01), pair_batch),
             "RFT (multi-turn SFT)": (sft_loss, sft_batch)}
    out = {}
    for name, (fn, batch) in cases.items():
        m, _ = load_policy(policy)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        tokens = int(batch.numel()) if torch.is_tensor(batch) else int(batch["attention_mask"].sum())
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            loss = fn(m, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        out[name] = {"tokens_per_step": tokens, "tokens_per_s": tokens * steps / dt}
    base = out["pretrain (causal LM, packed)"]["tokens_per_s"]
    for v in out.values():
        v["vs_pretrain"] = v["tokens_per_s"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="a policy's hf directory (e.g. <sweet_rl_tiny run>/warmstart/hf); "
                                     "without it only the sandbox is measured")
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system-prompt", default=TINY_PROMPT, help="the agent's system prompt (sweet_rl_tiny's by default)")
    ap.add_argument("--out", default="bench_rl.json")
    args = ap.parse_args()
    result = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "sandbox": bench_sandbox(args.tasks, args.seed)}
    s = result["sandbox"]
    print("| sandboxed test executions | evaluations/s | vs in-process exec |\n|---|---|---|")
    for k, v in s["evals_per_s"].items():
        print(f"| {k} | {v:.1f} | {s['sandbox_over_in_process'].get(k, 1.0):.3f}x |")
    if args.policy:
        result["rollout"] = r = bench_rollout(args.policy, args.episodes, args.seed, args.batch_size,
                                                   args.system_prompt)
        print(f"\nrollout: {r['episodes']} episodes in {r['seconds']:.1f} s: {r['episodes_per_s']:.2f} episodes/s, "
              f"{r['agent_turns_per_s']:.1f} agent turns/s (batch {r['batch_size']}, success {r['success_rate']:.2f})")
        result["training"] = t = bench_training(args.policy, args.steps, args.seed)
        print("\n| training step | tokens/step | tokens/s | vs pretrain |\n|---|---|---|---|")
        for k, v in t.items():
            print(f"| {k} | {v['tokens_per_step']} | {v['tokens_per_s']:.0f} | {v['vs_pretrain']:.2f}x |")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
