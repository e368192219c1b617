"""Human simulators for ColBench backend programming (SWEET-RL, arXiv 2503.15478, §3.1-3.2).

The human knows the hidden reference function and answers the agent's clarifying questions from it.

* RuleSimulator: deterministic, for tests and CPU runs on generated tasks. It matches the words of the
  agent's LAST message against each slot's keywords (family of the task) and answers with the reply
  sentence of the best-matching slot(s), at most two, in order of matches then slot order; "I don't
  know." when nothing matches or the task is not a generated one. It answers only from `task.hidden`.
* LLMSimulator: the reference's prompt contract (sweet_rl prompts/human_simulator_code_prompt.txt, in
  our own words): system "You are a helpful assistant.", a user prompt with the problem description,
  the hidden information (the reference code) and the dialogue so far; behave like a human who needs
  help, answer only with what the hidden information says, say you don't know otherwise, answer
  directly in at most two sentences. Greedy decoding (temperature 0), one batched backend call for
  many dialogues. The dialogue is rendered "agent: ..." / "human: ..." with blank lines between turns
  and ends with "human:" (the reference ends its history string with the next speaker's tag).
  The reference returns "No response." when the server rejects a request; here the backend's own
  errors propagate (a rejected request is a configuration error to fix, not a silent reply).
"""

from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional, Sequence, Tuple

from llmx.bench.backends import Backend, GenRequest, OpenAIBackend
from llmx.rl.colbench import FAMILIES, Task
from llmx.utils import LlmxError

DONT_KNOW = "I don't know."
MAX_SENTENCES = 2


def _words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _hits(words: List[str], phrase: str) -> int:
    p = _words(phrase)
    return sum(1 for i in range(len(words) - len(p) + 1) if words[i:i + len(p)] == p)


def last_agent_message(messages: Sequence[Dict[str, str]]) -> str:
    for m in reversed(messages):
        if m["role"] == "assistant":
            return m["content"]
    return ""


class RuleSimulator:
    """Keyword matching of the last agent message to the task's hidden slots."""

    def reply(self, task: Task, messages: List[Dict[str, str]]) -> str:
        fam = FAMILIES.get(task.family or "")
        if fam is None or not task.hidden:
            return DONT_KNOW
        words = _words(last_agent_message(messages))
        scored = []
        for i, slot in enumerate(fam.slots):
            n = sum(_hits(words, k) for k in slot.keywords)
            if n and slot.name in task.hidden:
                scored.append((-n, i, slot))
        if not scored:
            return DONT_KNOW
        scored.sort(key=lambda x: (x[0], x[1]))
        return " ".join(s.reply.format(value=task.hidden[s.name]) for _, _, s in scored[:MAX_SENTENCES])

    def replies(self, items: Sequence[Tuple[Task, List[Dict[str, str]]]]) -> List[str]:
        return [self.reply(t, m) for t, m in items]


SIMULATOR_SYSTEM_PROMPT = "You are a helpful assistant."

SIMULATOR_PROMPT = """You are role-playing a human who asked an agent for help writing a python function. \
Behave like that human: you need the help, you do not write code yourself.

The task you gave the agent:
{problem_description}

Hidden information, which only you can see (the function you have in mind):
{hidden_information}

Rules:
- Answer the agent's last message only with facts stated in the hidden information.
- If the hidden information does not answer it, say that you don't know.
- Never show or write code.
- Answer directly, in at most two sentences.

The conversation so far:
{dialogue_history}"""


def render_dialogue(messages: Sequence[Dict[str, str]]) -> str:
    speaker = {"assistant": "agent", "user": "human"}
    turns = [f"{speaker.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["human:"])


def check_server(base_url: str, api_key: Optional[str] = None, timeout_s: float = 5.0) -> None:
    """Raise LlmxError naming the URL when the OpenAI-compatible server does not answer GET /models."""
    import httpx

    url = f"{base_url.rstrip('/')}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise LlmxError(f"simulator server {url} is unreachable ({type(e).__name__}: {e}); start it or fix "
                        f"the base_url") from None
    if r.status_code != 200:
        raise LlmxError(f"simulator server {url} answered HTTP {r.status_code}; expected 200 with the model list")


class LLMSimulator:
    """An LLM playing the human, over an llmx.bench.backends Backend (hf or openai)."""

    def __init__(self, backend: Backend, *, prompt: str = SIMULATOR_PROMPT,
                 system_prompt: str = SIMULATOR_SYSTEM_PROMPT, check: bool = True, check_timeout_s: float = 5.0):
        if check and isinstance(backend, OpenAIBackend):
            check_server(backend.base_url, backend.api_key, check_timeout_s)
        self.backend = _configured(backend, system_prompt)
        self.prompt = prompt

    def prompt_for(self, task: Task, messages: Sequence[Dict[str, str]]) -> str:
        return self.prompt.format(problem_description=task.problem_description, hidden_information=task.ground_truth,
                                  dialogue_history=render_dialogue(messages))

    def replies(self, items: Sequence[Tuple[Task, List[Dict[str, str]]]]) -> List[str]:
        requests = [GenRequest(str(i), self.prompt_for(t, m)) for i, (t, m) in enumerate(items)]
        out: Dict[str, str] = {}

        def on_result(key: str, replies: List[str]) -> None:
            out[key] = replies[0].strip()

        if requests:
            self.backend.generate(requests, on_result)
        return [out[r.key] for r in requests]

    def reply(self, task: Task, messages: List[Dict[str, str]]) -> str:
        return self.replies([(task, messages)])[0]


def _configured(backend: Backend, system_prompt: str) -> Backend:
    """The backend at temperature 0 with the simulator's system prompt (a shallow copy; the caller's
    backend is left as it was). The completions API has no system role: the prompt goes without it."""
    b = backend.with_temperature(0.0)
    if not hasattr(b, "system_prompt") or getattr(b, "api", "chat") != "chat" or b.system_prompt == system_prompt:
        return b
    if b is backend:
        b = copy.copy(backend)
    b.system_prompt = system_prompt
    if hasattr(b, "_fingerprint"):
        b._fingerprint = None  # the HF backend caches its fingerprint, which includes the system prompt
    return b
