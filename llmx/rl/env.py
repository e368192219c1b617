"""The ColBench collaboration environment (SWEET-RL, arXiv 2503.15478, §3.2; the reference's
sweet_rl/environments/human_interaction_env.py), in the reset/step shape of verl's interactions and
TRL's environments.

An episode starts with the human's task description as the first "user" message. Each agent turn is
appended as an "assistant" message; the episode ends when the turn contains the end marker or after
max_rounds agent turns. Then the answer (text after the marker, or the whole last turn when the round
limit is hit, code fences stripped) is scored in the sandbox and reward = passed/total; before that the
reward is 0 and the simulator's reply, cut at reply_chars characters, is appended as a "user" message.
The reference's "OUTPUT:" handling belongs to its frontend (HTML) tasks and is left out.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmx.rl.colbench import END_MARKER, MAX_ROUNDS, REPLY_CHARS, Task, count_passed, extract_answer
from llmx.rl.sandbox import CallResult, Limits, run_many
from llmx.utils import LlmxError

Step = Tuple[List[Dict[str, str]], float, bool]


class CollabEnv:
    def __init__(self, simulator: Any, *, max_rounds: int = MAX_ROUNDS, reply_chars: int = REPLY_CHARS,
                 end_marker: str = END_MARKER, limits: Limits = Limits(),
                 expected_cache: Optional[Dict[str, List[CallResult]]] = None):
        if max_rounds < 1:
            raise LlmxError(f"max_rounds={max_rounds} must be >= 1")
        if reply_chars < 1:
            raise LlmxError(f"reply_chars={reply_chars} must be >= 1")
        self.simulator = simulator
        self.max_rounds = max_rounds
        self.reply_chars = reply_chars
        self.end_marker = end_marker
        self.limits = limits
        # task_id -> the reference's outputs; pass one dict to many envs (best-of-n rollouts of one task)
        # so that each reference runs once.
        self.expected_cache = {} if expected_cache is None else expected_cache
        self.task: Optional[Task] = None
        self.messages: List[Dict[str, str]] = []
        self.rounds = 0
        self.done = True
        self.answer = ""
        self.passed = 0
        self.total = 0
        self.reward = 0.0

    def reset(self, task: Task) -> List[Dict[str, str]]:
        self.task = task
        self.messages = [{"role": "user", "content": task.problem_description}]
        self.rounds = 0
        self.done = False
        self.answer = ""
        self.passed = self.total = 0
        self.reward = 0.0
        return self.messages

    def _take(self, agent_turn: str) -> bool:
        """Append the agent turn; True when the episode ends with it."""
        if self.done or self.task is None:
            raise LlmxError("CollabEnv.step called on a finished episode; call reset(task) first")
        self.messages.append({"role": "assistant", "content": agent_turn})
        self.rounds += 1
        if self.end_marker in agent_turn or self.rounds >= self.max_rounds:
            self.done = True
            self.answer = extract_answer(agent_turn, self.end_marker)
            return True
        return False

    def _jobs(self, scheduled: Optional[set] = None) -> List[Tuple[str, List[str]]]:
        """Sandbox jobs to score the answer: the answer, and the reference unless it is cached or
        `scheduled` (cache, task) pairs say an earlier env of the batch runs it into the same cache."""
        calls = list(self.task.test_cases.values())
        jobs = [(self.answer, calls)]
        key = (id(self.expected_cache), self.task.task_id)
        if self.task.task_id not in self.expected_cache and key not in (scheduled or ()):
            jobs.append((self.task.ground_truth, calls))
            if scheduled is not None:
                scheduled.add(key)
        return jobs

    def _finish(self, results: List[Any]) -> Step:
        if len(results) > 1:
            self.expected_cache[self.task.task_id] = results[1].calls
        expected = self.expected_cache[self.task.task_id]
        self.passed = count_passed(expected, results[0].calls)
        self.total = len(self.task.test_cases)
        self.reward = self.passed / self.total if self.total else 0.0
        return self.messages, self.reward, True

    def _reply(self, text: str) -> Step:
        self.messages.append({"role": "user", "content": text[: self.reply_chars]})
        return self.messages, 0.0, False

    def step(self, agent_turn: str) -> Step:
        if self._take(agent_turn):
            return self._finish(run_many(self._jobs(), self.limits))
        return self._reply(self.simulator.replies([(self.task, self.messages)])[0])


def step_many(envs: Sequence[CollabEnv], turns: Sequence[str], workers: int = 2) -> List[Step]:
    """step() for many envs at once: one batched simulator call for those that continue, one run_many
    for those that end. All envs must share one simulator."""
    if len(envs) != len(turns):
        raise LlmxError(f"step_many: {len(envs)} envs but {len(turns)} turns")
    if len({id(e.simulator) for e in envs}) > 1:
        raise LlmxError("step_many: the envs must share one simulator (one batched call)")
    ended = [e._take(t) for e, t in zip(envs, turns)]
    going = [e for e, end in zip(envs, ended) if not end]
    replies = iter(envs[0].simulator.replies([(e.task, e.messages) for e in going]) if going else [])
    jobs, spans, scheduled = [], [], set()
    for e, end in zip(envs, ended):
        if end:
            js = e._jobs(scheduled)
            spans.append((len(jobs), len(js)))
            jobs += js
    results = run_many(jobs, envs[0].limits, workers=workers) if jobs else []
    spans_it = iter(spans)
    out = []
    for e, end in zip(envs, ended):
        if end:
            start, n = next(spans_it)
            out.append(e._finish(results[start:start + n]))
        else:
            out.append(e._reply(next(replies)))
    return out
