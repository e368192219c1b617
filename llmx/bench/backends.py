"""Model backends for benchmark evaluation: prompts in, replies out, with a resumable on-disk cache.

Why a backend interface instead of calling a model inline: the same generated benchmark is graded
against a local Hugging Face model (batched `generate`, on CPU or one GPU), an OpenAI-compatible
server (vLLM, SGLang, llama.cpp, a hosted API), and the reference solutions themselves (the oracle
backend, which checks that the graders accept correct answers before a model is blamed for failing).
All three deliver `(key, replies)` through one callback as each problem finishes, so the evaluation
loop, the cache and the progress display do not care where replies come from.

Why a JSONL cache appended and fsynced per problem: evaluating thousands of long-context problems
takes hours and gets killed (preemption, OOM, Ctrl-C). Each finished problem is one line, forced to
disk before the next is accepted, so a killed run loses at most the line being written, and a rerun
asks the backend only for what is missing. The first line records the backend's fingerprint (model
identity and sampling parameters); a rerun with different settings is refused rather than silently
mixing replies from two configurations in one score. Execution-only settings (batch size,
concurrency, retries, URL, API key) are left out of the fingerprint: they change speed, not the
distribution the replies are drawn from.

Why HF requests are sorted by prompt length: GSM-Infinite mixes prompts from a few hundred to many
thousands of tokens; batching similar lengths together keeps left padding (wasted compute) small.

Why HF sampling gives each row its own seeded RNG (RowSeededSampler) instead of seeding torch once
per batch: with one RNG per batch, a row's sample depends on its batch-mates, so a resumed run, which
batches only the unfinished requests, would need the exact same batch boundaries to reproduce an
uninterrupted run, and a kill between two results of one batch shifts them. Seeding each sample from
(seed, key, sample index) makes replies independent of batching, order, batch_size and resumption
(up to float rounding of padded vs unpadded attention, which decides only exact near-ties).
"""

from __future__ import annotations

import copy
import email.utils
import fcntl
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from llmx.utils import LlmxError

OnResult = Callable[[str, List[str]], None]
Progress = Callable[[int, int], None]

BACKENDS = ("hf", "openai", "oracle")


@dataclass
class GenRequest:
    key: str  # unique per problem (the problem id)
    prompt: Any  # user message text, or a whole dialogue: a list of {"role", "content"} messages
    n: int = 1  # samples wanted for this problem


class Backend:
    """Turns prompts into replies. Subclasses implement fingerprint() and generate()."""

    def fingerprint(self) -> Dict[str, Any]:
        """Model identity and sampling parameters (JSON-serializable); stored in the cache header."""
        raise NotImplementedError

    def generate(self, requests: Sequence[GenRequest], on_result: OnResult) -> None:
        """Call on_result(key, replies) once per request as it finishes (any order), len(replies) == n.

        on_result is always called from the thread that called generate."""
        raise NotImplementedError

    def with_temperature(self, temperature: float) -> "Backend":
        """This backend sampling at `temperature` (the same model, not reloaded); itself when the temperature
        is already that or the backend does not sample (oracle)."""
        if not hasattr(self, "temperature") or self.temperature == float(temperature):
            return self
        clone = copy.copy(self)
        clone.temperature = float(temperature)
        return clone


def chat_messages(prompt: Any, system_prompt: Optional[str]) -> List[Dict[str, str]]:
    """The message list for a prompt that is one user message or already a dialogue, with the system
    prompt first (unless the dialogue brings its own)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _stop_list(stop: Any) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    return [str(s) for s in stop if str(s)]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def _seed_from(*parts: Any) -> int:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --- oracle ---------------------------------------------------------------------------------------


class OracleBackend(Backend):
    """Replies with each problem's reference solution: every problem must grade correct, or a grader
    (or the generator) is broken."""

    def __init__(self, solutions: Mapping[str, str]):
        self.solutions = dict(solutions)

    def fingerprint(self) -> Dict[str, Any]:
        return {"backend": "oracle"}

    def generate(self, requests: Sequence[GenRequest], on_result: OnResult) -> None:
        missing = [r.key for r in requests if r.key not in self.solutions]
        if missing:
            raise LlmxError(f"oracle backend: no reference solution for {len(missing)} problem(s), e.g. {missing[:3]}")
        for r in requests:
            on_result(r.key, [self.solutions[r.key]] * r.n)


# --- Hugging Face ---------------------------------------------------------------------------------


def _weights_digest(model: Any) -> str:
    """A cheap identity of the weights: the first 256 values of every tensor, hashed (a fine-tuned
    checkpoint with the same config gets a different digest; reading all 135M+ values is not needed)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise LlmxError(f"hf backend: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise LlmxError(f"hf backend: temperature={temperature} must be >= 0")
    if not 0 < top_p <= 1:
        raise LlmxError(f"hf backend: top_p={top_p} must be in (0, 1]")


class HFBackend(Backend):
    """Batched `model.generate` on a local transformers causal LM, with left padding."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat_template: bool = True,
        system_prompt: Optional[str] = None,
        device: Any = "cpu",
        dtype: Any = None,
        stop: Any = None,
        name: Optional[str] = None,
    ):
        import torch

        if batch_size < 1:
            raise LlmxError(f"hf backend: batch_size={batch_size} must be >= 1")
        _check_sampling(max_new_tokens, temperature, top_p)
        self.device = torch.device(device)
        if dtype is not None:
            from llmx.models.pretrained import resolve_dtype

            model = model.to(dtype=resolve_dtype(dtype))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token_id is None:
            raise LlmxError("hf backend: the tokenizer has neither a pad nor an eos token")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        if top_k < 0:
            raise LlmxError(f"hf backend: top_k={top_k} must be >= 0 (0: no top-k filter)")
        self.top_k = int(top_k)
        self.seed = int(seed)
        self.use_chat_template = bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        self.stop = _stop_list(stop)
        self.name = name or Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.sort_by_length = True  # batch similar prompt lengths together (off only to measure its effect)
        self.stats: Dict[str, Any] = {}  # of the last generate(): rows, pad tokens, tokens, seconds
        self._fingerprint: Optional[Dict[str, Any]] = None

    def with_sampling(
        self,
        *,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        stop: Any = None,
        chat_template: Optional[bool] = None,
    ) -> "HFBackend":
        """This backend (the same model and tokenizer, not reloaded) with other generation settings;
        None keeps a setting. The original is not changed, so several settings can be served at once."""
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        temperature = self.temperature if temperature is None else float(temperature)
        top_p = self.top_p if top_p is None else float(top_p)
        _check_sampling(max_new_tokens, temperature, top_p)
        clone = copy.copy(self)
        clone.max_new_tokens, clone.temperature, clone.top_p = max_new_tokens, temperature, top_p
        if stop is not None:
            clone.stop = _stop_list(stop)
        if chat_template is not None:
            clone.use_chat_template = bool(chat_template) and bool(getattr(self.tokenizer, "chat_template", None))
        clone.stats = {}
        clone._fingerprint = None  # the parent's would name its own settings
        return clone

    def with_temperature(self, temperature: float) -> "HFBackend":
        return self if self.temperature == float(temperature) else self.with_sampling(temperature=temperature)

    def fingerprint(self) -> Dict[str, Any]:
        if self._fingerprint is None:
            cfg = self.model.config.to_dict()
            for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
                cfg.pop(k, None)
            template = self.tokenizer.chat_template if self.use_chat_template else None
            self._fingerprint = {
                "backend": "hf",
                "model": self.name,
                "model_config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
                "weights": _weights_digest(self.model),
                # The module tree as printed: an R-Sparse artifact changes no weight, only its layers' settings.
                "modules": hashlib.sha256(repr(self.model).encode()).hexdigest()[:16],
                "dtype": str(self.model.dtype).replace("torch.", ""),
                "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
                "system_prompt": self.system_prompt,
                "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p if self.temperature > 0 else 1.0,
                **({"top_k": self.top_k} if self.top_k and self.temperature > 0 else {}),
                "seed": self.seed if self.temperature > 0 else None,
                "sampler": RowSeededSampler.VERSION if self.temperature > 0 else "greedy",
                "stop": self.stop,
            }
        return self._fingerprint

    def render(self, prompt: Any) -> List[int]:
        """Token ids of the full model input for one user message or a dialogue (list of messages)."""
        tok = self.tokenizer
        if self.use_chat_template:
            text = tok.apply_chat_template(chat_messages(prompt, self.system_prompt), tokenize=False,
                                           add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        if not isinstance(prompt, str):
            raise LlmxError("hf backend: a dialogue (list of messages) needs a tokenizer with a chat template")
        if self.system_prompt:
            prompt = f"{self.system_prompt}\n\n{prompt}"
        return list(tok(prompt)["input_ids"])

    def plan(self, requests: Sequence[GenRequest]) -> List[List[Tuple[str, int, List[int]]]]:
        """Tokenize every prompt and refuse over-long ones (before any generation); expand requests
        into rows (key, sample index, ids); sort rows by length, longest first (an out-of-memory
        batch shows up at once, and similar lengths share batches); chunk into batch_size rows."""
        items = [(r, self.render(r.prompt)) for r in requests]
        if self.max_positions:
            long = [(r.key, len(ids)) for r, ids in items if len(ids) + self.max_new_tokens > self.max_positions]
            if long:
                key, n = long[0]
                more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
                raise LlmxError(
                    f"hf backend: problem {key!r}{more} has {n} prompt tokens; with max_new_tokens="
                    f"{self.max_new_tokens} that exceeds the model's limit of {self.max_positions} positions "
                    f"(max_position_embeddings of {self.name})"
                )
        rows = [(r.key, j, ids) for r, ids in items for j in range(self._rows(r))]
        if self.sort_by_length:
            rows.sort(key=lambda row: (-len(row[2]), row[0], row[1]))
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _rows(self, r: GenRequest) -> int:
        # Greedy decoding is deterministic: one row per request, the reply repeated n times.
        return r.n if self.temperature > 0 else 1

    def generate(self, requests: Sequence[GenRequest], on_result: OnResult) -> None:
        by_key = {}
        for r in requests:
            if r.n < 1:
                raise LlmxError(f"hf backend: request {r.key!r} asks for n={r.n} samples")
            by_key[r.key] = r
        batches = self.plan(requests)
        stats = {"rows": 0, "prompt_tokens": 0, "pad_tokens": 0, "new_tokens": 0, "seconds": 0.0}
        self.stats = stats
        partial: Dict[str, List[Optional[str]]] = {}
        for batch in batches:
            t0 = time.perf_counter()
            new_ids = self.generate_rows([ids for _, _, ids in batch], [(key, j) for key, j, _ in batch])
            stats["seconds"] += time.perf_counter() - t0
            width = max(len(ids) for _, _, ids in batch)
            stats["rows"] += len(batch)
            stats["prompt_tokens"] += sum(len(ids) for _, _, ids in batch)
            stats["pad_tokens"] += sum(width - len(ids) for _, _, ids in batch)
            stats["new_tokens"] += sum(len(x) for x in new_ids)
            for (key, j, _), ids in zip(batch, new_ids):
                r = by_key[key]
                slots = partial.setdefault(key, [None] * self._rows(r))
                slots[j] = truncate_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)
                if all(x is not None for x in slots):
                    del partial[key]
                    replies = [str(x) for x in slots]
                    on_result(key, replies if len(replies) == r.n else replies * r.n)

    def generate_rows(self, rows: List[List[int]], ids: List[Tuple[str, int]]) -> List[List[int]]:
        """Left-pad `rows`, run model.generate, return each row's new tokens up to (not incl.) EOS/pad.

        `ids` (key, sample index) seed each row's sampling noise."""
        import torch
        from transformers import LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, x in enumerate(rows):
            if x:
                input_ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                attention[i, width - len(x) :] = 1
        # Sampling is greedy decoding over Gumbel-perturbed scores (see RowSeededSampler), so HF's
        # own warpers are off in both cases.
        kwargs: Dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens, pad_token_id=pad, do_sample=False, temperature=None, top_p=None, top_k=None
        )
        if self.temperature > 0:
            seeds = [_seed_from(self.seed, key, j) for key, j in ids]
            sampler = RowSeededSampler(seeds, self.temperature, self.top_p, self.top_k)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        if self.stop:  # stop early; the reply is cut at the stop string after decoding
            kwargs.update(stop_strings=self.stop, tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
            )
        new = out[:, width:].tolist()
        eos = self.model.generation_config.eos_token_id
        ends = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {pad}
        ends.discard(None)
        result = []
        for seq in new:
            n = next((j for j, t in enumerate(seq) if t in ends), len(seq))
            result.append(seq[:n])
        return result


class RowSeededSampler:
    """A logits processor that turns greedy decoding into sampling with a private RNG per row.

    Why: `model.generate(do_sample=True)` draws every row from one global RNG, so a row's sample
    depends on which rows share its batch and in which order; a resumed run (which batches only the
    unfinished requests) or a different batch_size would then give different replies. Here row i
    adds Gumbel noise from its own generator, seeded from (seed, key, sample index), to its
    temperature-scaled, top-k- and top-p-filtered logits; argmax of logits/T + Gumbel is an exact sample from
    softmax(logits/T) (the Gumbel-max trick). A row's t-th token uses the t-th draw of its own stream,
    whatever else is in the batch."""

    VERSION = "gumbel-per-row-v1"  # in the fingerprint: a change here must not mix with old caches

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int = 0):
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seeds = list(seeds)
        self.generators: Optional[List[Any]] = None  # made on the scores' device at the first step

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scores = scores.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            from transformers import TopPLogitsWarper

            scores = TopPLogitsWarper(self.top_p)(input_ids, scores)
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


# --- OpenAI-compatible HTTP ---------------------------------------------------------------------


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(resp: Any) -> str:
    """The server's own words for a failed request: error.message of an OpenAI-style error body, else
    the start of the body."""
    try:
        message = resp.json()["error"]["message"]
        if isinstance(message, str) and message:
            return message[:2000]
    except (ValueError, KeyError, TypeError):
        pass
    return resp.text[:500]


class OpenAIBackend(Backend):
    """An OpenAI-compatible server (`/chat/completions` or `/completions`) over plain HTTP (httpx)."""

    RETRY_STATUS = (408, 409, 429)  # and every 5xx
    MAX_RETRY_AFTER_S = 600.0

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: Optional[str] = None,
        api: str = "chat",
        concurrency: int = 16,
        max_retries: int = 6,
        timeout_s: float = 600,
        max_tokens: int = 4096,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        system_prompt: Optional[str] = None,
        stop: Any = None,
        extra_body: Optional[Mapping[str, Any]] = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ):
        if api not in ("chat", "completions"):
            raise LlmxError(f"openai backend: api={api!r}; valid: 'chat', 'completions'")
        if not base_url:
            raise LlmxError("openai backend: base_url is required (e.g. http://localhost:8000/v1)")
        if not model:
            raise LlmxError("openai backend: the served model name is required")
        if api == "completions" and system_prompt:
            raise LlmxError("openai backend: system_prompt needs api=chat (the completions API has no roles)")
        if concurrency < 1:
            raise LlmxError(f"openai backend: concurrency={concurrency} must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/{'chat/completions' if api == 'chat' else 'completions'}"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.api = api
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = None if seed is None else int(seed)
        self.system_prompt = system_prompt
        self.stop = _stop_list(stop)
        self.extra_body = dict(extra_body or {})
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.calls = 0  # HTTP attempts made, retries included
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def fingerprint(self) -> Dict[str, Any]:
        return {
            "backend": "openai",
            "model": self.model,
            "api": self.api,
            "system_prompt": self.system_prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "extra_body": self.extra_body,
        }

    def _body(self, prompt: str, n: int, seed: Optional[int]) -> Dict[str, Any]:
        body: Dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            body["messages"] = chat_messages(prompt, self.system_prompt)
        elif isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            raise LlmxError("openai backend: a dialogue (list of messages) needs api=chat")
        body.update(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, n=n)
        if seed is not None:
            body["seed"] = seed
        if self.stop:
            body["stop"] = self.stop
        body.update(self.extra_body)
        return body

    def _post(self, client: Any, key: str, body: Dict[str, Any]) -> List[str]:
        """One HTTP attempt -> the choices' texts; _Retryable for transient failures."""
        import httpx

        with self._lock:
            self.calls += 1
        try:
            resp = client.post(self.url, json=body)
        except httpx.TransportError as e:  # connection errors and timeouts
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        status = resp.status_code
        if status in self.RETRY_STATUS or status >= 500:
            raise _Retryable(f"HTTP {status}: {resp.text[:300]}", _parse_retry_after(resp.headers.get("retry-after")))
        if status >= 400:
            raise LlmxError(
                f"openai backend: POST {self.url} for problem {key!r} failed with HTTP {status} "
                f"(not retried): {_error_message(resp)}"
            )
        try:
            choices = resp.json()["choices"]
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            if self.api == "chat":
                return [(c.get("message") or {}).get("content") or "" for c in choices]
            return [c.get("text") or "" for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _Retryable(f"malformed response ({type(e).__name__}): {resp.text[:300]}") from e

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise LlmxError("openai backend: stopped")

    def _one(self, client: Any, req: GenRequest) -> List[str]:
        replies: List[str] = []
        failures = 0
        while len(replies) < req.n:
            # Follow-up calls (a server that returned fewer than n choices) vary the seed, or a
            # seeded server would repeat the samples it already gave.
            seed = None if self.seed is None else self.seed + len(replies)
            body = self._body(req.prompt, req.n - len(replies), seed)
            try:
                got = self._post(client, req.key, body)
                if not got:
                    raise _Retryable("the response has no choices")
            except _Retryable as e:
                failures += 1
                if failures > self.max_retries:
                    raise LlmxError(
                        f"openai backend: POST {self.url} for problem {req.key!r} failed {failures} times; last: {e}"
                    ) from None
                if e.retry_after is not None:
                    delay = min(e.retry_after, self.MAX_RETRY_AFTER_S) * (1 + 0.1 * random.random())
                else:
                    delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1)) * random.uniform(0.5, 1)
                self._sleep(delay)
                continue
            replies += [truncate_at_stop(t, self.stop) for t in got[: req.n - len(replies)]]
        return replies

    def generate(self, requests: Sequence[GenRequest], on_result: OnResult) -> None:
        import httpx

        if not requests:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self._stopping.clear()
        with httpx.Client(headers=headers, timeout=self.timeout_s, limits=limits) as client:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="llmx-openai")
            futures = {pool.submit(self._one, client, r): r for r in requests}
            error: Optional[BaseException] = None
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        if f.cancelled():
                            continue
                        exc = f.exception()
                        if exc is not None:
                            if error is None:
                                # Stop new work, but let in-flight requests finish and be delivered
                                # (and so cached) before the error propagates.
                                error = exc
                                self._stopping.set()
                                for g in pending:
                                    g.cancel()
                            continue
                        on_result(futures[f].key, f.result())
            except BaseException:  # KeyboardInterrupt, or on_result failed: stop at once
                self._stopping.set()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
            if error is not None:
                raise error


# --- building from config -------------------------------------------------------------------------


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            value = cfg.get(name, default)
        except Exception:  # a structured OmegaConf node without that field
            value = default
    else:
        value = getattr(cfg, name, default)
    return default if value is None else value


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def build_backend(evaluator_cfg: Any, model_cfg: Any = None, solutions: Optional[Mapping[str, str]] = None) -> Backend:
    """The backend that `evaluator_cfg.backend` names ("hf" | "openai" | "oracle").

    hf loads `model_cfg` with llmx.models.pretrained.load_pretrained; oracle needs `solutions`
    (problem id -> reference solution)."""
    cfg = evaluator_cfg
    kind = _get(cfg, "backend", "") or ""
    kind = str(getattr(kind, "value", kind))  # the schema's EvalBackend enum, or a plain string
    stop = _plain(_get(cfg, "stop"))
    system_prompt = _get(cfg, "system_prompt")
    if kind == "oracle":
        if solutions is None:
            raise LlmxError("evaluator.backend=oracle needs the problems' reference solutions")
        return OracleBackend(solutions)
    if kind == "hf":
        if model_cfg is None:
            raise LlmxError("evaluator.backend=hf needs a model config (model=...)")
        import torch

        from llmx.models.pretrained import load_pretrained

        model, tokenizer = load_pretrained(model_cfg)
        device = _get(cfg, "device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return HFBackend(
            model,
            tokenizer,
            batch_size=int(_get(cfg, "batch_size", 8)),
            max_new_tokens=int(_get(cfg, "max_new_tokens", 512)),
            temperature=float(_get(cfg, "temperature", 0.0)),
            top_p=float(_get(cfg, "top_p", 1.0)),
            seed=int(_get(cfg, "seed", 0)),
            chat_template=bool(_get(cfg, "chat_template", True)),
            system_prompt=system_prompt,
            device=device,
            dtype=_get(cfg, "dtype"),
            stop=stop,
            name=_get(model_cfg, "name"),
        )
    if kind == "openai":
        key_env = _get(cfg, "api_key_env", "OPENAI_API_KEY")
        seed = _get(cfg, "seed")
        return OpenAIBackend(
            _get(cfg, "base_url"),
            _get(cfg, "model_name"),
            api_key=os.environ.get(key_env) if key_env else None,
            api=str(_get(cfg, "api", "chat")),
            concurrency=int(_get(cfg, "concurrency", 16)),
            max_retries=int(_get(cfg, "max_retries", 6)),
            timeout_s=float(_get(cfg, "timeout_s", 600)),
            max_tokens=int(_get(cfg, "max_tokens", _get(cfg, "max_new_tokens", 4096))),
            temperature=float(_get(cfg, "temperature", 0.0)),
            top_p=float(_get(cfg, "top_p", 1.0)),
            seed=None if seed is None else int(seed),
            system_prompt=system_prompt,
            stop=stop,
            extra_body=_plain(_get(cfg, "extra_body")),
        )
    raise LlmxError(f"evaluator.backend={kind!r} is not a backend; valid backends: {list(BACKENDS)}")


# --- the resumable cache --------------------------------------------------------------------------


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{name}: absent in the cache, now {new[k]!r}")
            elif k not in new:
                out.append(f"{name}: cached {old[k]!r}, now absent")
            else:
                out += _differences(old[k], new[k], name)
        return out
    return [] if old == new else [f"{prefix or 'fingerprint'}: cached {old!r}, now {new!r}"]


def _read_cache(f: Any, path: Path) -> Tuple[Optional[Dict[str, Any]], Dict[str, List[str]], int]:
    """(header, key -> replies, byte length of the valid prefix) of an open cache file."""
    f.seek(0)
    data = f.read()
    header: Optional[Dict[str, Any]] = None
    records: Dict[str, List[str]] = {}
    valid = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        last = end < 0
        line = data[pos:] if last else data[pos:end]
        lineno += 1
        try:
            obj = json.loads(line) if line.strip() else None
            if obj is not None and not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            if last:  # a line cut short by a kill: drop it
                break
            raise LlmxError(
                f"{path}: line {lineno} is not valid JSON (the cache is corrupt); delete the file to start over"
            ) from None
        if obj is not None:
            if header is None:
                if "fingerprint" not in obj:
                    raise LlmxError(f"{path}: the first line has no fingerprint; not an llmx generation cache")
                header = obj
            elif isinstance(obj.get("key"), str) and isinstance(obj.get("replies"), list):
                records[obj["key"]] = [str(x) for x in obj["replies"]]  # a later line for a key wins
            else:
                raise LlmxError(f"{path}: line {lineno} has no key/replies; the cache is corrupt")
        if last:
            valid = len(data)  # complete JSON without its newline: keep it, the newline is added back
            break
        pos = end + 1
        valid = pos
    return header, records, valid


def run_with_cache(
    backend: Backend,
    requests: Sequence[GenRequest],
    cache_path: os.PathLike | str,
    *,
    progress: Optional[Progress] = None,
) -> Dict[str, List[str]]:
    """Replies for every request (key -> list of n replies), generating only those not yet cached.

    The cache file is locked for the run, so two processes cannot append to it at once."""
    path = Path(cache_path)
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise LlmxError(f"run_with_cache: duplicate request keys {dup[:5]}")
    fingerprint = _canonical(backend.fingerprint())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LlmxError(f"{path} is in use by another llmx process") from None
        header, cached, valid = _read_cache(f, path)
        size = f.seek(0, os.SEEK_END)
        if valid < size:  # drop a truncated last line
            f.truncate(valid)
            size = valid
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # a complete last record whose newline was not written
                f.write(b"\n")
        if header is None:
            f.truncate(0)
            f.write((json.dumps({"fingerprint": fingerprint}, sort_keys=True) + "\n").encode())
        else:
            diffs = _differences(header["fingerprint"], fingerprint)
            if diffs:
                raise LlmxError(
                    f"{path} holds replies from a different backend configuration ("
                    + "; ".join(diffs)
                    + "). Use a new cache path, or delete the file to regenerate everything."
                )
        f.flush()
        os.fsync(f.fileno())

        results: Dict[str, List[str]] = {}
        todo: List[GenRequest] = []
        for r in requests:
            got = cached.get(r.key)
            if got is not None and len(got) >= r.n:
                results[r.key] = got[: r.n]
            else:  # not done, or done with fewer samples than now asked: generate all n again
                todo.append(r)
        wanted = {r.key: r.n for r in todo}
        total = len(requests)
        if progress:
            progress(len(results), total)

        def on_result(key: str, replies: List[str]) -> None:
            if key not in wanted:
                raise LlmxError(f"backend returned a reply for {key!r}, which was not asked for (or twice)")
            replies = [str(x) for x in replies]
            if len(replies) != wanted[key]:
                raise LlmxError(f"backend returned {len(replies)} replies for {key!r}; {wanted[key]} were asked for")
            line = json.dumps({"key": key, "replies": replies}, ensure_ascii=False) + "\n"
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
            del wanted[key]
            results[key] = replies
            if progress:
                progress(len(results), total)

        if todo:
            backend.generate(todo, on_result)
        if wanted:
            missing = sorted(wanted)
            raise LlmxError(f"backend finished without replies for {len(missing)} problem(s), e.g. {missing[:3]}")
    return {k: results[k] for k in keys}


def read_cache(cache_path: os.PathLike | str) -> Tuple[Dict[str, Any], Dict[str, List[str]]]:
    """(fingerprint, key -> replies) of a cache file, for reports; tolerates a truncated last line."""
    path = Path(cache_path)
    if not path.is_file():
        raise LlmxError(f"{path}: no such generation cache")
    with open(path, "rb") as f:
        header, records, _ = _read_cache(f, path)
    if header is None:
        raise LlmxError(f"{path}: empty generation cache")
    return header["fingerprint"], records


__all__ = [
    "Backend",
    "GenRequest",
    "HFBackend",
    "OpenAIBackend",
    "OracleBackend",
    "build_backend",
    "read_cache",
    "run_with_cache",
    "truncate_at_stop",
]
