"""llmx.bench.backends: the OpenAI client against a real local HTTP server, the resumable cache, and
HF batched generation on the real SmolLM2-135M.

Why a real server instead of mocking httpx: retries, timeouts, Retry-After and concurrency are
properties of the wire behaviour (sockets timing out, a 429 header, requests overlapping), which a
mock would have to re-implement and could get wrong in the same way as the client. The server is a
stdlib ThreadingHTTPServer in a thread, deterministic from the prompt, and counts calls per prompt and
the maximum number of requests in flight.

The SmolLM2 tests share one session fixture (like tests/test_models.py): the first load converts the
GGUF into $LLMX_CACHE (~17 s), later loads in the session read the converted copy.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmx.bench.backends import (
    Backend,
    GenRequest,
    HFBackend,
    OpenAIBackend,
    OracleBackend,
    build_backend,
    read_cache,
    run_with_cache,
    truncate_at_stop,
)
from llmx.utils import LlmxError

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


# --- a real OpenAI-compatible server ---------------------------------------------------------------


def reply_text(prompt: str, seed, i: int) -> str:
    return f"{prompt[::-1]}#{seed}#{i}"


class FakeServer:
    """Behaviour knobs (all optional) in `config`, applied to every prompt; `per_prompt[prompt]`
    overrides them: delay (s), sleep_first (s, first call of a prompt only), fail_first (calls),
    fail_status, retry_after (header value), max_choices, status (a fixed error status), null_content."""

    def __init__(self):
        self.config: dict = {}
        self.per_prompt: dict = {}
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: dict = defaultdict(int)  # prompt -> calls received (counted on arrival)
        self.calls: dict = defaultdict(list)  # prompt -> [(monotonic time, status, body)] once answered
        self.auth: list = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                try:
                    outer.handle(self)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def n_calls(self, prompt: str) -> int:
        return len(self.calls[prompt])

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        chat = h.path == "/v1/chat/completions"
        if not chat and h.path != "/v1/completions":
            return self.send(h, 404, {"error": "no such route"})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        cfg = {**self.config, **self.per_prompt.get(prompt, {})}
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            call = self.arrivals[prompt]
            self.arrivals[prompt] += 1
            self.auth.append(h.headers.get("Authorization"))
        left = False

        def leave():
            # Counted out before the reply is written: the client may read it and send its next request
            # before this thread would reach a `finally`, which would count one request too many in flight.
            nonlocal left
            if not left:
                left = True
                with self.lock:
                    self.in_flight -= 1

        try:
            time.sleep(cfg.get("delay", 0))
            if call == 0 and cfg.get("sleep_first"):
                time.sleep(cfg["sleep_first"])
            status = 200
            if cfg.get("status"):
                status = cfg["status"]
            elif call < cfg.get("fail_first", 0):
                status = cfg.get("fail_status", 503)
            with self.lock:
                self.calls[prompt].append((time.monotonic(), status, body))
            if status != 200:
                headers = {"Retry-After": str(cfg["retry_after"])} if "retry_after" in cfg else {}
                leave()
                return self.send(h, status, {"error": {"message": f"status {status} for testing"}}, headers)
            n = min(body.get("n", 1), cfg.get("max_choices", 1 << 30))
            texts = [None if cfg.get("null_content") else reply_text(prompt, body.get("seed"), i) for i in range(n)]
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)]
            else:
                choices = [{"index": i, "text": t} for i, t in enumerate(texts)]
            leave()
            self.send(h, 200, {"object": "chat.completion" if chat else "text_completion", "choices": choices[::-1]})
        finally:
            leave()

    @staticmethod
    def send(h, status, obj, headers=None):
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def collect(backend, requests):
    out = {}
    backend.generate(requests, lambda k, r: out.__setitem__(k, r))
    return out


def client(server, **kw):
    kw.setdefault("backoff_base_s", 0.001)
    return OpenAIBackend(server.base_url, "test-model", **kw)


def test_openai_chat_replies_samples_and_body(server):
    b = client(server, api_key="sk-test", system_prompt="Be brief.", stop=["\n\n"], max_tokens=77, seed=5)
    reqs = [GenRequest(f"k{i}", f"prompt number {i}") for i in range(5)] + [GenRequest("many", "sample me", n=3)]
    out = collect(b, reqs)
    assert out == {
        **{f"k{i}": [reply_text(f"prompt number {i}", 5, 0)] for i in range(5)},
        "many": [reply_text("sample me", 5, i) for i in range(3)],  # ordered by choice index
    }
    assert server.n_calls("sample me") == 1  # the server honours n: one call
    body = server.calls["sample me"][0][2]
    assert body["model"] == "test-model" and body["n"] == 3 and body["max_tokens"] == 77 and body["seed"] == 5
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sample me"}]
    assert body["stop"] == ["\n\n"] and body["temperature"] == 0.0
    assert set(server.auth) == {"Bearer sk-test"}


def test_openai_completions_requests_missing_samples(server):
    server.config = {"max_choices": 1}  # a server that ignores n
    b = client(server, api="completions", seed=7, extra_body={"repetition_penalty": 1.1})
    out = collect(b, [GenRequest("a", "complete this", n=3)])
    assert out == {"a": [reply_text("complete this", s, 0) for s in (7, 8, 9)]}  # seed varied per follow-up
    bodies = [c[2] for c in server.calls["complete this"]]
    assert [x["n"] for x in bodies] == [3, 2, 1]
    assert bodies[0]["prompt"] == "complete this" and bodies[0]["repetition_penalty"] == 1.1


def test_openai_null_content_is_empty_string(server):
    server.config = {"null_content": True}
    assert collect(client(server), [GenRequest("a", "x", n=2)]) == {"a": ["", ""]}


def test_openai_concurrency_overlaps(server):
    server.config = {"delay": 0.3}
    b = client(server, concurrency=4)
    t0 = time.perf_counter()
    out = collect(b, [GenRequest(f"k{i}", f"p{i}") for i in range(8)])
    elapsed = time.perf_counter() - t0
    assert len(out) == 8
    assert server.max_in_flight == 4  # overlapping, and never more than `concurrency`
    assert elapsed < 8 * 0.3 * 0.6, elapsed  # ~2 rounds of 0.3 s, not 8


@pytest.mark.parametrize("status", [429, 503])
def test_openai_retries_and_honours_retry_after(server, status):
    server.config = {"fail_first": 2, "fail_status": status, "retry_after": "0.3"}
    b = client(server, concurrency=2)
    out = collect(b, [GenRequest("a", "alpha"), GenRequest("b", "beta")])
    assert out == {"a": [reply_text("alpha", None, 0)], "b": [reply_text("beta", None, 0)]}
    for p in ("alpha", "beta"):
        calls = server.calls[p]
        assert [c[1] for c in calls] == [status, status, 200]
        gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:])]
        assert all(g >= 0.3 for g in gaps), gaps  # Retry-After honoured (backoff alone would be ~1 ms)


def test_openai_backoff_without_retry_after_and_giving_up(server):
    server.config = {"fail_first": 100, "fail_status": 502}
    b = client(server, max_retries=2, backoff_base_s=0.05)
    with pytest.raises(LlmxError, match=r"'k' failed 3 times; last: HTTP 502"):
        collect(b, [GenRequest("k", "p")])
    calls = server.calls["p"]
    assert len(calls) == 3
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05, gaps  # exponential: base*[0.5,1], then 2*base*[0.5,1]


def test_openai_400_is_not_retried(server):
    server.per_prompt = {"bad": {"status": 400}}
    b = client(server)
    with pytest.raises(LlmxError, match=r"problem 'kb' failed with HTTP 400 \(not retried\).*status 400 for testing"):
        collect(b, [GenRequest("kb", "bad")])
    assert server.n_calls("bad") == 1


def test_openai_timeout_is_retried(server):
    server.config = {"sleep_first": 1.5}
    b = client(server, timeout_s=0.3)
    t0 = time.perf_counter()
    assert collect(b, [GenRequest("k", "slow")]) == {"k": [reply_text("slow", None, 0)]}
    assert time.perf_counter() - t0 < 1.5  # did not wait for the stuck first call
    assert server.arrivals["slow"] == 2 and b.calls == 2


def test_openai_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_base_s=0.001)
    with pytest.raises(LlmxError, match=r"failed 3 times; last: ConnectError"):
        collect(b, [GenRequest("k", "p")])
    assert b.calls == 3


def test_openai_error_still_delivers_finished_requests(server, tmp_path):
    """One problem's hard error does not lose replies that other workers finished: they are cached."""
    server.config = {"delay": 0.2}
    server.per_prompt = {"bad": {"status": 400}}
    reqs = [GenRequest("kb", "bad")] + [GenRequest(f"k{i}", f"p{i}") for i in range(3)]
    with pytest.raises(LlmxError, match="HTTP 400"):
        run_with_cache(client(server, concurrency=4), reqs, tmp_path / "c.jsonl")
    _, cached = read_cache(tmp_path / "c.jsonl")
    assert sorted(cached) == ["k0", "k1", "k2"]


def test_openai_rejects_bad_settings():
    with pytest.raises(LlmxError, match="api='responses'"):
        OpenAIBackend("http://x/v1", "m", api="responses")
    with pytest.raises(LlmxError, match="system_prompt needs api=chat"):
        OpenAIBackend("http://x/v1", "m", api="completions", system_prompt="hi")


# --- the resumable cache ---------------------------------------------------------------------------


class Scripted(Backend):
    """Replies derived from the prompt; optionally raises (a kill) after `fail_after` results."""

    def __init__(self, fail_after=None, temperature=0.0):
        self.fail_after = fail_after
        self.temperature = temperature
        self.asked: list = []

    def fingerprint(self):
        return {"backend": "scripted", "model": "m", "temperature": self.temperature}

    def generate(self, requests, on_result):
        self.asked += [r.key for r in requests]
        for i, r in enumerate(requests):
            if i == self.fail_after:
                raise RuntimeError("killed")
            on_result(r.key, [f"{r.prompt}/{j}" for j in range(r.n)])


def reqs10():
    return [GenRequest(f"p{i}", f"prompt {i}", n=1 + i % 2) for i in range(10)]


def test_cache_resumes_only_missing(tmp_path):
    full = run_with_cache(Scripted(), reqs10(), tmp_path / "full.jsonl")
    path = tmp_path / "c.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        run_with_cache(Scripted(fail_after=6), reqs10(), path)
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0]) == {"fingerprint": Scripted().fingerprint()}
    again = Scripted()
    seen = []
    out = run_with_cache(again, reqs10(), path, progress=lambda d, t: seen.append((d, t)))
    assert again.asked == ["p6", "p7", "p8", "p9"]
    assert out == full and list(out) == [r.key for r in reqs10()]
    assert seen == [(6, 10), (7, 10), (8, 10), (9, 10), (10, 10)]
    # A third run asks for nothing.
    third = Scripted()
    assert run_with_cache(third, reqs10(), path) == full and third.asked == []
    assert len(path.read_text().splitlines()) == 11


def test_cache_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    full = run_with_cache(Scripted(), reqs10(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # the last record, cut mid-line as a kill would
    b = Scripted()
    assert run_with_cache(b, reqs10(), path) == full
    assert b.asked == ["p9"]
    assert [json.loads(x) for x in path.read_text().splitlines()][1:] == [
        {"key": k, "replies": v} for k, v in full.items()
    ]
    # A cut header: the file counts as new.
    path.write_bytes(data[:12])
    b = Scripted()
    assert run_with_cache(b, reqs10(), path) == full and len(b.asked) == 10


def test_cache_refuses_other_fingerprint(tmp_path):
    path = tmp_path / "c.jsonl"
    run_with_cache(Scripted(temperature=0.0), reqs10()[:2], path)
    with pytest.raises(LlmxError, match=r"temperature: cached 0.0, now 0.7.*new cache path, or delete the file"):
        run_with_cache(Scripted(temperature=0.7), reqs10(), path)


def test_cache_corrupt_middle_line_and_wrong_reply_count(tmp_path):
    path = tmp_path / "c.jsonl"
    run_with_cache(Scripted(), reqs10()[:3], path)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LlmxError, match="line 2 is not valid JSON"):
        run_with_cache(Scripted(), reqs10(), path)

    class Short(Scripted):
        def generate(self, requests, on_result):
            on_result(requests[0].key, [])

    with pytest.raises(LlmxError, match="returned 0 replies for 'p0'; 1 were asked for"):
        run_with_cache(Short(), reqs10(), tmp_path / "d.jsonl")


def test_cache_more_samples_regenerates_fewer_slices(tmp_path):
    path = tmp_path / "c.jsonl"
    run_with_cache(Scripted(), [GenRequest("a", "x", n=2)], path)
    b = Scripted()
    assert run_with_cache(b, [GenRequest("a", "x", n=1)], path) == {"a": ["x/0"]} and b.asked == []
    b = Scripted()
    assert run_with_cache(b, [GenRequest("a", "x", n=3)], path) == {"a": ["x/0", "x/1", "x/2"]}
    assert b.asked == ["a"]
    assert read_cache(path)[1] == {"a": ["x/0", "x/1", "x/2"]}  # the later line wins


def test_oracle_and_build_backend(monkeypatch):
    solutions = {"a": "so 3", "b": "so 4"}
    b = build_backend(OmegaConf.create({"backend": "oracle"}), solutions=solutions)
    assert isinstance(b, OracleBackend)
    assert collect(b, [GenRequest("a", "?", n=2), GenRequest("b", "?")]) == {"a": ["so 3", "so 3"], "b": ["so 4"]}
    with pytest.raises(LlmxError, match="no reference solution"):
        collect(b, [GenRequest("zz", "?")])
    with pytest.raises(LlmxError, match=r"'vllm' is not a backend; valid backends: \['hf', 'openai', 'oracle'\]"):
        build_backend(OmegaConf.create({"backend": "vllm"}))
    monkeypatch.setenv("MY_KEY", "sk-env")
    o = build_backend(
        OmegaConf.create(
            {"backend": "openai", "base_url": "http://h:1/v1/", "model_name": "q", "api_key_env": "MY_KEY",
             "concurrency": 3, "temperature": 0.5, "stop": ["x"], "extra_body": {"top_k": 20}, "seed": None}
        )
    )
    assert isinstance(o, OpenAIBackend) and o.api_key == "sk-env" and o.concurrency == 3
    assert o.url == "http://h:1/v1/chat/completions" and o.extra_body == {"top_k": 20}
    assert o.fingerprint()["temperature"] == 0.5 and "sk-env" not in json.dumps(o.fingerprint())
    with pytest.raises(LlmxError, match="needs a model config"):
        build_backend(OmegaConf.create({"backend": "hf"}))


def test_truncate_at_stop():
    assert truncate_at_stop("a b. c\n\nd", [".", "\n\n"]) == "a b"
    assert truncate_at_stop("abc", []) == "abc"


# --- HF on the real SmolLM2-135M -------------------------------------------------------------------


def smollm2_cfg():
    from llmx.config.schema import ModelConfig

    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / "smollm2_135m.yaml"))
    return OmegaConf.to_object(node)


@pytest.fixture(scope="session")
def smollm2_gen():
    from llmx.models import load_pretrained

    cfg = smollm2_cfg()
    model, tok = load_pretrained(cfg)
    return cfg, model, tok


PROMPTS = [
    "What is 2+3?",
    "Hi",
    "Write one sentence about the sea, the sky and the wind blowing over the waves on a warm summer day.",
    "Name a color.",
]


@pytest.mark.slow
def test_hf_batched_greedy_equals_one_at_a_time(smollm2_gen):
    _, model, tok = smollm2_gen
    reqs = [GenRequest(f"k{i}", p) for i, p in enumerate(PROMPTS)]
    batched = HFBackend(model, tok, batch_size=4, max_new_tokens=16)
    single = HFBackend(model, tok, batch_size=1, max_new_tokens=16)
    out_b, out_s = collect(batched, reqs), collect(single, reqs)
    assert batched.stats["pad_tokens"] > 20 and single.stats["pad_tokens"] == 0  # left padding was exercised
    assert out_b == out_s
    assert out_b["k0"] == ["2 + 3 = 5"]
    assert all(len(v) == 1 and v[0] for v in out_b.values())
    # n > 1 with greedy decoding: one row generated, the reply repeated.
    assert collect(batched, [GenRequest("x", PROMPTS[0], n=3)]) == {"x": ["2 + 3 = 5"] * 3}
    assert batched.stats["rows"] == 1
    # Stop strings cut the reply (and end generation early).
    stopped = HFBackend(model, tok, batch_size=4, max_new_tokens=16, stop=["="])
    assert collect(stopped, reqs[:1]) == {"k0": ["2 + 3 "]}


@pytest.mark.slow
def test_hf_sampling_n_and_resume_determinism(smollm2_gen, tmp_path):
    _, model, tok = smollm2_gen

    def backend():
        return HFBackend(model, tok, batch_size=2, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3)

    out = collect(backend(), [GenRequest("j", "Tell me a joke.", n=2)])
    assert len(out["j"]) == 2 and all(isinstance(x, str) and x for x in out["j"])
    assert out["j"][0] != out["j"][1]
    reqs = [GenRequest(f"q{i}", p) for i, p in enumerate(PROMPTS * 2)]
    full = run_with_cache(backend(), reqs, tmp_path / "full.jsonl")
    assert len(set(full["q0"] + full["q4"])) == 2  # same prompt, different key: different samples
    # Each sample has its own RNG stream: batch size and batch-mates do not change it.
    one = HFBackend(model, tok, batch_size=1, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3)
    assert collect(one, reqs[:3]) == {k: full[k] for k in ("q0", "q1", "q2")}

    class Killed(Exception):
        pass

    def kill_at_5(done, total):
        if done == 5:
            raise Killed

    path = tmp_path / "c.jsonl"
    with pytest.raises(Killed):
        run_with_cache(backend(), reqs, path, progress=kill_at_5)
    assert len(read_cache(path)[1]) == 5
    assert run_with_cache(backend(), reqs, path) == full  # resumed sampled run == uninterrupted run


@pytest.mark.slow
def test_hf_refuses_overlong_prompt_before_generating(smollm2_gen, monkeypatch):
    _, model, tok = smollm2_gen
    b = HFBackend(model, tok, batch_size=2, max_new_tokens=16)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    long = GenRequest("too-long", "word " * 8500)
    with pytest.raises(LlmxError, match=r"'too-long' has \d{4} prompt tokens; .*limit of 8192 positions"):
        collect(b, [GenRequest("ok", "Hi"), long])


@pytest.mark.slow
def test_hf_build_backend(smollm2_gen):
    cfg, _, _ = smollm2_gen
    evaluator = OmegaConf.create(
        {"backend": "hf", "batch_size": 2, "max_new_tokens": 4, "temperature": 0.0, "seed": 0, "chat_template": True,
         "system_prompt": None, "stop": None, "device": "cpu"}
    )
    b = build_backend(evaluator, cfg)
    assert isinstance(b, HFBackend) and b.batch_size == 2
    fp = b.fingerprint()
    assert fp["model"] == "smollm2_135m" and fp["chat_template"] and fp["seed"] is None
    assert collect(b, [GenRequest("a", "Hi")])["a"][0]
