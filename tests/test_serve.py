"""llmx.serve: the OpenAI-compatible server over the real SmolLM2-135M, driven by llmx's own OpenAI client.

Why the real model and the real client instead of mocks: the point of the server is that a run through
HTTP gives exactly the replies of the in-process HFBackend, and that the client's batching, caching
and error handling work against it; both need the real tokenizer, chat template and generate.

One session-scoped server (batch_size 4, greedy, max_tokens <= 16) is shared by every test here; the
first load converts the GGUF into $LLMX_CACHE (~17 s) unless another test already did.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from omegaconf import OmegaConf

from llmx.bench.backends import GenRequest, HFBackend, OpenAIBackend, read_cache, run_with_cache
from llmx.serve import Server
from llmx.utils import LlmxError

REPO = Path(__file__).resolve().parents[1]
# Every test here drives the real SmolLM2 through HTTP: end-to-end, so outside `make test-fast`.
pytestmark = pytest.mark.slow
NAME = "smollm2"
PROMPTS = [
    "What is 2+3?",
    "Hi",
    "Write one sentence about the sea, the sky and the wind blowing over the waves on a warm summer day.",
    "Name a color.",
]
MORE = ["Tell me a joke.", "What is the capital of France?", "Count to five.", "Name an animal."]


@pytest.fixture(scope="session")
def served():
    from llmx.config.schema import ModelConfig
    from llmx.models import load_pretrained

    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml"))
    model, tok = load_pretrained(OmegaConf.to_object(node))
    backend = HFBackend(model, tok, batch_size=4, max_new_tokens=16, name=NAME)
    with Server(backend) as server:
        yield server, backend


def collect(backend, requests):
    out = {}
    backend.generate(requests, lambda k, r: out.__setitem__(k, r))
    return out


def client(server, **kw):
    kw.setdefault("max_tokens", 16)
    return OpenAIBackend(server.base_url, NAME, **kw)


def test_replies_equal_in_process_hf_chat_n_and_stop(served):
    server, hf = served
    reqs = [GenRequest(f"k{i}", p, n=2 if i == 0 else 1) for i, p in enumerate(PROMPTS)]
    direct = collect(hf, reqs)
    assert direct["k0"] == ["2 + 3 = 5"] * 2  # the model really answers (not an empty or echoed reply)
    assert collect(client(server, concurrency=4), reqs) == direct
    stopped = collect(client(server, stop=["="]), reqs[:1])
    assert stopped == collect(hf.with_sampling(stop=["="]), reqs[:1]) == {"k0": ["2 + 3 "] * 2}


def test_replies_equal_in_process_hf_completions(served):
    server, hf = served
    reqs = [GenRequest(f"k{i}", p, n=2 if i == 0 else 1) for i, p in enumerate(PROMPTS)]
    raw = hf.with_sampling(chat_template=False, max_new_tokens=8)  # a completion continues the text as given
    direct = collect(raw, reqs)
    assert direct["k0"] != collect(hf.with_sampling(max_new_tokens=8), reqs[:1])["k0"]  # not the chat reply
    assert collect(client(server, api="completions", concurrency=4, max_tokens=8), reqs) == direct


def test_reply_shape_usage_and_finish_reason(served):
    server, hf = served
    body = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 16}
    short = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
    body.update(messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=4)
    cut = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60).json()
    assert short["object"] == "chat.completion" and short["model"] == NAME
    assert short["choices"][0]["message"] == {"role": "assistant", "content": "2 + 3 = 5"}
    assert short["choices"][0]["finish_reason"] == "stop" and cut["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["prompt_tokens"] == len(hf.render(PROMPTS[0]))
    assert 0 < short["usage"]["completion_tokens"] < 16 and cut["usage"]["completion_tokens"] == 4
    models = httpx.get(f"{server.base_url}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [NAME]


def test_concurrent_requests_are_batched(served):
    server, hf = served
    before = len(server.batch_sizes)
    reqs = [GenRequest(f"c{i}", p) for i, p in enumerate(PROMPTS + MORE)]
    out = collect(client(server, concurrency=4, max_tokens=8), reqs)
    sizes = server.batch_sizes[before:]
    assert sum(sizes) == 8 and max(sizes) > 1 and max(sizes) <= hf.batch_size, sizes
    assert out == collect(hf.with_sampling(max_new_tokens=8), reqs)


def test_run_with_cache_through_server_resumes_with_only_missing_requests(served, tmp_path):
    server, _ = served
    reqs = [GenRequest(f"r{i}", p) for i, p in enumerate(PROMPTS + MORE)]
    full = run_with_cache(client(server, concurrency=4, max_tokens=4), reqs, tmp_path / "full.jsonl")

    class Killed(Exception):
        pass

    def kill_at_3(done, total):
        if done == 3:
            raise Killed

    path = tmp_path / "killed.jsonl"
    with pytest.raises(Killed):
        run_with_cache(client(server, concurrency=4, max_tokens=4), reqs, path, progress=kill_at_3)
    cached = read_cache(path)[1]
    assert len(cached) == 3
    resumed_client = client(server, concurrency=4, max_tokens=4)
    assert run_with_cache(resumed_client, reqs, path) == full
    assert resumed_client.calls == len(reqs) - len(cached)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, r"not valid JSON"),
        ({"model": NAME}, 400, r"messages=None is not valid"),
        ({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "n": 0}, 400, r"n=0 is not valid"),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}, 404, r"model='gpt-9' is not served"),
        ({"model": NAME, "messages": [{"role": "user", "content": "word " * 8500}]}, 400,
         r"prompt has \d{4} tokens; with max_tokens=16 .* context of 8192"),
    ],
    ids=["malformed-json", "no-messages", "n-0", "wrong-model", "too-long"],
)
def test_bad_request_gets_4xx_naming_it(served, body, status, message):
    server, _ = served
    url = f"{server.base_url}/chat/completions"
    resp = httpx.post(url, content=body, timeout=60) if isinstance(body, bytes) else httpx.post(url, json=body, timeout=60)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]


def test_client_fails_at_once_naming_url_and_server_message(served):
    server, _ = served
    wrong = OpenAIBackend(server.base_url, "gpt-9", max_tokens=4)
    with pytest.raises(LlmxError, match=r"/v1/chat/completions for problem 'a' failed with HTTP 404 \(not retried\): "
                                        r"model='gpt-9' is not served here; this server serves 'smollm2'"):
        collect(wrong, [GenRequest("a", "Hi")])
    assert wrong.calls == 1
    long = client(server)
    with pytest.raises(LlmxError, match=r"problem 'long' failed with HTTP 400 \(not retried\): the prompt has \d+ tokens"):
        collect(long, [GenRequest("long", "word " * 8500)])
    assert long.calls == 1


def test_bad_server_arguments_and_settings_clone(served):
    _, hf = served
    with pytest.raises(LlmxError, match=r"port=70000 is not valid"):
        Server(hf, port=70000)
    with pytest.raises(LlmxError, match=r"top_p=0.0 must be in \(0, 1\]"):
        hf.with_sampling(top_p=0.0)
    before = hf.fingerprint()
    hot = hf.with_temperature(0.7)
    # The clone's fingerprint names its own settings, not the cached one of the backend it came from.
    assert hot.fingerprint()["temperature"] == 0.7 and hf.fingerprint() == before
    assert hf.temperature == 0.0 and hot.model is hf.model


@pytest.mark.slow
def test_llmx_serve_cli_answers_a_request_and_stops_on_ctrl_c(served):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "llmx", "serve", "model=smollm2_135m", "evaluator.max_new_tokens=8",
           "evaluator.device=cpu", "--port", "0"]
    # A test run started in the background (`cmd &` in a script) ignores SIGINT, and a child inherits that, so
    # Python would install no Ctrl-C handler: the child starts with the default disposition, as a terminal's would.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    timer = threading.Timer(120, proc.kill)  # a hung server fails the test instead of hanging CI
    timer.start()
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
        base_url = line.split(" at ")[1].split()[0]
        body = {"model": "smollm2_135m", "messages": [{"role": "user", "content": PROMPTS[0]}]}
        reply = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == "2 + 3 = 5"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        timer.cancel()
        proc.kill()
    assert proc.returncode == 0, err
    assert "server stopped" in out

    bad = subprocess.run([sys.executable, "-m", "llmx", "serve", "model=llama_tiny"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "model=llama_tiny has source=preset" in bad.stderr


@pytest.mark.slow
def test_natural_reasoning_teacher_over_the_served_model(served, tmp_path):
    """The synthesize recipe's respond phase with teacher=openai against the served SmolLM2: every question of the
    dataset carries exactly the reply the in-process backend gives to the same prompt; a rerun sends nothing."""
    import json

    from llmx.reasoning.prompts import respond_prompt

    server, backend = served
    run = tmp_path / "nr"
    args = [sys.executable, "-m", "llmx", "run", "recipe=natural_reasoning_smollm2", "synth.docs.builtin_worked=4",
            "synth.docs.builtin_docs=2", "synth.uses=[]", "synth.teacher.backend=openai",
            f"synth.teacher.base_url={server.base_url}", f"synth.teacher.model_name={NAME}",
            "synth.teacher.max_new_tokens=16", "synth.teacher.concurrency=4", f"hydra.run.dir={run}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (run / "assemble" / "dataset.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and all(r["responses"][0]["response_model"] == NAME for r in rows)
    local = collect(backend.with_sampling(max_new_tokens=16),
                    [GenRequest(r["id"], respond_prompt(r["question"])) for r in rows])
    assert {r["id"]: r["responses"][0]["response"] for r in rows} == {k: v[0] for k, v in local.items()}
    served_before = len(server.batch_sizes)
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(server.batch_sizes) == served_before
