"""`llmx serve`: an OpenAI-compatible HTTP server over a local Hugging Face model (an HFBackend).

Why llmx has its own server: vLLM and SGLang need a GPU, and a judge, teacher or simulator model is
often wanted by several processes at once (llmx runs, Slurm array jobs) that should share one copy of
the weights instead of each loading its own. The server speaks the subset of the OpenAI API that
llmx's own client (llmx.bench.backends.OpenAIBackend) and most other clients use:
`POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models` (the API's request and reply
shapes: https://platform.openai.com/docs/api-reference/chat). It is the stdlib's ThreadingHTTPServer,
so it adds no dependency.

Why one generation thread that batches: a model on CPU or one GPU answers a batch of B requests in much
less than B times the time of one (the weights are read once per step for the whole batch). Handler
threads only parse and validate a request, put it on a queue and wait; the generation thread takes
everything waiting, groups requests with the same generation settings (max_tokens, temperature, top_p,
stop, chat or completions) and runs up to `batch_size` rows through one `generate`, the continuous
batching idea of Orca (Yu et al., OSDI 2022) at request rather than token granularity. Throughput
therefore grows with the number of clients waiting. All tokenizer and model calls happen on that one
thread, so neither needs to be thread-safe.

Why per-request settings go through `HFBackend.with_sampling`: a clone that shares the model and
tokenizer, so one request's temperature or stop strings never leak into another's.

Determinism: greedy replies equal those of HFBackend called in-process on the same prompts (up to float
rounding of padded attention, which decides only exact near-ties). A sampled request is seeded from its
`seed` and its prompt (HFBackend's per-row RNG), so the same request with the same seed gets the same
samples whatever it was batched with; without a seed it gets a random one.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from llmx.bench.backends import HFBackend, truncate_at_stop
from llmx.utils import LlmxError

MAX_BODY_BYTES = 64 << 20
MAX_N = 128
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: HTTP status, the message for the client, the OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code


@dataclass
class Job:
    """One HTTP request waiting for the generation thread."""

    api: str  # "chat" | "completions"
    prompt: Any  # the messages (chat) or the prompt text (completions)
    n: int
    settings: Tuple[int, float, float, Tuple[str, ...]]  # max_tokens, temperature, top_p, stop: the batch key
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    texts: List[str] = field(default_factory=list)
    finish: List[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[RequestError] = None

    @property
    def group(self) -> Tuple[Any, ...]:
        return (self.api, self.settings)

    @property
    def rows(self) -> int:
        # Greedy decoding is deterministic: one row, its reply repeated n times (as HFBackend does).
        return self.n if self.settings[1] > 0 else 1


# --- request parsing (handler threads; no tokenizer) ------------------------------------------------


def _number(body: Dict[str, Any], name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(400, f"{name}={value!r} is not valid: it must be {what} in [{low:g}, {high:g}]")
    return value


def _messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"messages={messages!r} is not valid: a chat completion needs a non-empty list of "
                                "{'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}]={m!r} is not valid: each message needs a role in {list(ROLES)} "
                                    "and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _stop(body: Dict[str, Any]) -> Tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise RequestError(400, f"stop={stop!r} is not valid: it must be a string or a list of strings")


def parse_request(api: str, body: Any, backend: HFBackend, model_name: str) -> Job:
    """The Job for an OpenAI request body, or RequestError naming the bad field and what is valid."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model={model!r} is not served here; this server serves {model_name!r}",
                           code="model_not_found")
    if body.get("stream"):
        raise RequestError(400, "stream=true is not supported by llmx serve; send stream=false")
    if api == "chat":
        prompt: Any = _messages(body)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, f"prompt={prompt!r} is not valid: a completion needs a non-empty string prompt")
    # Newer OpenAI clients send max_completion_tokens instead of max_tokens.
    max_tokens = _number(body, "max_tokens", None, 1, 1 << 20, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", backend.max_new_tokens, 1, 1 << 20, integer=True)
    temperature = float(_number(body, "temperature", backend.temperature, 0, 2))
    top_p = float(_number(body, "top_p", backend.top_p, 0, 1))
    if top_p == 0:
        raise RequestError(400, "top_p=0 is not valid: it must be in (0, 1]")
    top_p = top_p if temperature > 0 else 1.0  # greedy ignores it: do not split batches over it
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    if seed is None:
        seed = random.getrandbits(63)
    return Job(api, prompt, n, (max_tokens, temperature, top_p, _stop(body)), seed)


# --- the generation thread ----------------------------------------------------------------------------


class Generator:
    """Drains the job queue, batches compatible jobs, generates, and wakes each job's handler."""

    def __init__(self, backend: HFBackend, batch_wait_s: float):
        self.backend = backend
        self.batch_wait_s = batch_wait_s
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.batch_sizes: List[int] = []  # rows of every model.generate call, in order
        self.batch_jobs: List[int] = []  # requests served by every batch
        self._pending: List[Job] = []
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name="llmx-serve-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self._closed:
            raise RequestError(503, "the server is shutting down", "server_error")
        self.queue.put(job)

    def close(self) -> None:
        self._closed = True
        self.queue.put(None)
        self.thread.join()
        for job in self._pending + self._drain():
            job.error = RequestError(503, "the server shut down before this request was generated", "server_error")
            job.done.set()

    def _drain(self) -> List[Job]:
        jobs = []
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _loop(self) -> None:
        while True:
            if not self._pending:
                job = self.queue.get()
                if job is None:
                    return
                self._pending.append(job)
                # Clients that sent at the same moment arrive a little apart: wait a moment for them.
                time.sleep(self.batch_wait_s)
            self._pending += self._drain()
            if self._closed:
                return
            batch = self._take_batch()
            try:
                self._run(batch)
            except Exception as e:  # a failed generate fails its requests, not the server
                for job in batch:
                    if not job.done.is_set():
                        job.error = RequestError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            for job in batch:
                job.done.set()

    def _take_batch(self) -> List[Job]:
        """The oldest job and the next compatible ones, up to batch_size rows (the oldest always goes, even
        alone over the limit: its rows are then split over several generate calls)."""
        first = self._pending[0]
        batch, rows = [first], first.rows
        for job in self._pending[1:]:
            if job.group == first.group and rows + job.rows <= self.backend.batch_size:
                batch.append(job)
                rows += job.rows
        chosen = set(map(id, batch))
        self._pending = [j for j in self._pending if id(j) not in chosen]
        return batch

    def _run(self, batch: List[Job]) -> None:
        max_tokens, temperature, top_p, stop = batch[0].settings
        backend = self.backend.with_sampling(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=list(stop),
            chat_template=batch[0].api == "chat",
        )
        if batch[0].api == "completions":
            backend.system_prompt = None  # a completion continues the text as given
        rows, owners = [], []
        for job in batch:
            ids = self._render(backend, job)
            if ids is None:
                continue
            key = f"{job.seed}:{hashlib.sha256(json.dumps(job.prompt).encode()).hexdigest()}"
            for j in range(job.rows):
                rows.append((ids, (key, j)))
                owners.append(job)
        size = backend.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            new = backend.generate_rows([ids for ids, _ in chunk], [seed for _, seed in chunk])
            self.batch_sizes.append(len(chunk))
            self.batch_jobs.append(len({id(o) for o in owners[start : start + size]}))
            for job, ids in zip(owners[start : start + size], new):
                self._collect(backend, job, ids)
        for job in batch:
            if job.error is None and job.rows < job.n:
                job.texts, job.finish = job.texts * job.n, job.finish * job.n
                job.completion_tokens *= job.n

    def _render(self, backend: HFBackend, job: Job) -> Optional[List[int]]:
        """The prompt's token ids, or None with job.error set when it does not fit the model's context."""
        try:
            ids = backend.render(job.prompt)
        except LlmxError as e:  # e.g. a dialogue for a model without a chat template
            job.error = RequestError(400, str(e))
            return None
        job.prompt_tokens = len(ids)
        limit = backend.max_positions
        if limit and len(ids) + backend.max_new_tokens > limit:
            job.error = RequestError(
                400,
                f"the prompt has {len(ids)} tokens; with max_tokens={backend.max_new_tokens} that exceeds the "
                f"model's context of {limit} positions (send a shorter prompt or a smaller max_tokens)",
            )
            return None
        return ids

    def _collect(self, backend: HFBackend, job: Job, new_ids: List[int]) -> None:
        text = backend.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = truncate_at_stop(text, backend.stop)
        hit_limit = len(new_ids) >= backend.max_new_tokens and cut == text
        job.texts.append(cut)
        job.finish.append("length" if hit_limit else "stop")
        job.completion_tokens += len(new_ids)


# --- HTTP ----------------------------------------------------------------------------------------------


def _reply_body(job: Job, model_name: str) -> Dict[str, Any]:
    if job.api == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(job.texts, job.finish))]
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                   for i, (t, f) in enumerate(zip(job.texts, job.finish))]
        kind, prefix = "text_completion", "cmpl"
    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
             "total_tokens": job.prompt_tokens + job.completion_tokens}
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage}


def _handler(server: "Server") -> type:
    routes = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Dict[str, Any]) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: RequestError) -> None:
            self._send(e.status, {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                model = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "llmx"}
                self._send(200, {"object": "list", "data": [model]})
            else:
                self._error(RequestError(404, f"GET {self.path} is not served; GET /v1/models is"))

        def do_POST(self) -> None:
            try:
                api = routes.get(self.path.rstrip("/"))
                body = self._read_json()  # read even a bad path's body: the connection stays usable
                if api is None:
                    raise RequestError(404, f"POST {self.path} is not served; valid: {sorted(routes)}")
                job = parse_request(api, body, server.backend, server.model_name)
                server.generator.submit(job)
                job.done.wait()
                if job.error is not None:
                    raise job.error
                self._send(200, _reply_body(job, server.model_name))
            except RequestError as e:
                self._error(e)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up and left
                pass

        def _read_json(self) -> Any:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise RequestError(400, f"Content-Length={self.headers.get('Content-Length')!r} is not a number")
            if length > MAX_BODY_BYTES:
                raise RequestError(413, f"the body has {length} bytes; at most {MAX_BODY_BYTES} are accepted")
            raw = self.rfile.read(length)
            try:
                return json.loads(raw)
            except ValueError as e:
                raise RequestError(400, f"the request body is not valid JSON ({e}): {raw[:100]!r}") from None

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client closing a kept-alive connection (a killed run, a closed pool) is normal, not an error.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Server:
    """An OpenAI-compatible server over `backend`, running in background threads from construction.

        with Server(backend) as server:        # port 0: any free port
            client = OpenAIBackend(server.base_url, server.model_name)

    `batch_sizes` lists the rows of every generate call (how much batching happened). `batch_wait_s`: how
    long the generation thread waits, after a request finds it idle, for others sent at the same time (without
    it, clients that got their replies a few ms apart fall out of step and are served in small batches)."""

    def __init__(
        self,
        backend: HFBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: Optional[str] = None,
        batch_wait_s: float = 0.02,
    ):
        if not isinstance(backend, HFBackend):
            raise LlmxError(f"llmx serve needs an hf backend, not {type(backend).__name__}")
        if not 0 <= port <= 65535:
            raise LlmxError(f"port={port} is not valid: it must be in [0, 65535] (0: any free port)")
        if batch_wait_s < 0:
            raise LlmxError(f"batch_wait_s={batch_wait_s} must be >= 0")
        self.backend = backend
        self.model_name = model_name or backend.name
        self.created = int(time.time())
        try:
            self.httpd = _HTTPServer((host, port), _handler(self))
        except OSError as e:
            raise LlmxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self.generator = Generator(backend, batch_wait_s)
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="llmx-serve-http",
                                             daemon=True)
        self._http_thread.start()
        self._closed = threading.Event()

    @property
    def base_url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def batch_sizes(self) -> List[int]:
        return self.generator.batch_sizes

    def wait(self) -> None:
        """Block until close() (from another thread or a signal handler)."""
        while not self._closed.wait(0.5):
            pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.httpd.shutdown()  # stop accepting; handlers still waiting are answered 503 below
        self.generator.close()
        self.httpd.server_close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["RequestError", "Server", "parse_request"]
