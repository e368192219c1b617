"""ColBench tasks, the offline generator, the simulators and the collaboration environment (llmx/rl)."""

from __future__ import annotations

import json
import random
import re
import socket

import pytest

from llmx.rl import colbench
from llmx.rl.colbench import (
    END_MARKER,
    FAMILIES,
    JUNK_QUESTIONS,
    Family,
    Slot,
    Task,
    expected_outputs,
    generate_tasks,
    load_tasks,
    render,
    save_tasks,
    score,
    scripted_turns,
)
from llmx.rl import env as env_module
from llmx.rl.env import CollabEnv, step_many
from llmx.rl.sandbox import run_many
from llmx.rl.simulator import DONT_KNOW, LLMSimulator, RuleSimulator, render_dialogue
from llmx.utils import LlmxError


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks(40, seed=0)


def official(**over):
    d = {"problem_description": "Write f(x).", "ground_truth": "def f(x):\n    return x + 1\n",
         "test_cases": json.dumps({"test1": "f(1)", "test2": "f(2)"})}
    d.update(over)
    return d


# --- records ----------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(x + "\n" for x in lines))
    return path


@pytest.mark.parametrize("bad, pattern", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    (json.dumps({k: v for k, v in official().items() if k != "ground_truth"}),
     r"bad\.jsonl:2: missing field 'ground_truth'"),
    (json.dumps(official(test_cases=["f(1)"])), r"bad\.jsonl:2: field 'test_cases' must be a non-empty dict"),
    (json.dumps(official(test_cases="[1, 2")), r"bad\.jsonl:2: field 'test_cases' is a string but not JSON"),
    (json.dumps(official(test_cases={"t": 3})), r"bad\.jsonl:2: field 'test_cases': 't' is not a call string"),
    (json.dumps([1]), r"bad\.jsonl:2: a task must be a JSON object"),
])
def test_loader_errors_name_file_line_field(tmp_path, bad, pattern):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(official()), bad, json.dumps(official())])
    with pytest.raises(LlmxError, match=pattern):
        load_tasks(path)


def test_official_record_and_round_trip(tmp_path, tasks):
    lines = [json.dumps(official()), "", json.dumps(official(test_cases={"a": "f(0)"}))]
    path = write_lines(tmp_path / "official.jsonl", lines)
    got = load_tasks(path)
    assert [t.test_cases for t in got] == [{"test1": "f(1)", "test2": "f(2)"}, {"a": "f(0)"}]
    assert got[0].task_id.startswith("task-") and got[0].family is None and got[0].hidden == {}
    out = tmp_path / "sub" / "tasks.jsonl"
    save_tasks(out, got + tasks[:3])
    again = load_tasks(out)
    assert again == got + tasks[:3]
    assert not list(out.parent.glob(".*tmp"))  # written atomically, no temporary left behind


# --- scoring ----------------------------------------------------------------------------------------


def test_score_explicit_namespace_helper_and_fences():
    # The Python 3.13 hazard: exec then eval without one explicit namespace loses `helper`.
    code = "def helper(x):\n    return x * 2\n\ndef f(x):\n    return helper(x) + 1\n"
    task = Task("t", "d", code, {"a": "f(1)", "b": "f(5)", "c": "g(0)"})
    assert [c.value for c in expected_outputs(task)] == [3, 11, None]
    assert score(task, code) == (2, 3)  # a reference that fails never counts (the reference's rule)
    fenced = colbench.extract_answer(f"Sure.\n{END_MARKER}\n```python\n{code}```")
    assert fenced == code.strip()
    assert score(task, fenced) == (2, 3)
    assert score(task, "def f(x):\n    return 3\n") == (1, 3)
    assert score(task, "def f(x) return") == (0, 3)


# --- the generator ----------------------------------------------------------------------------------


def test_generator_deterministic_unique_prefix(tasks):
    again = generate_tasks(40, seed=0, verify=False)
    assert again == tasks
    assert generate_tasks(10, seed=0, verify=False) == tasks[:10]
    assert generate_tasks(3, seed=0, chunk=1) == tasks[:3]  # one sandbox child per reference
    other = generate_tasks(40, seed=1, verify=False)
    assert [t.task_id for t in other] != [t.task_id for t in tasks]
    keys = {(t.family, json.dumps(t.hidden, sort_keys=True)) for t in tasks}
    assert len(keys) == len({t.task_id for t in tasks}) == 40
    assert len(FAMILIES) >= 6 and len({t.family for t in tasks}) >= 6
    for t in tasks:
        fam = FAMILIES[t.family]
        assert 3 <= len(fam.slots) <= 4 and len(t.test_cases) == 10
        assert 3 <= len(t.ground_truth.splitlines()) <= 8
        for slot in fam.slots:
            assert str(t.hidden[slot.name]) not in t.problem_description.split("(")[1].split(")")[1].split()


def test_generator_refuses_too_many_and_unknown_family():
    with pytest.raises(LlmxError, match=r"only \d+ distinct verified tasks exist in families \['grade'\], 500 asked"):
        generate_tasks(500, 0, families=["grade"], verify=False)
    with pytest.raises(LlmxError, match="unknown task family 'nope'; valid: "):
        generate_tasks(5, 0, families=["nope"])


def test_every_one_slot_change_fails_some_test(tasks):
    # In the sandbox, on the generated tests: the reference scores 10/10, every one-slot change less.
    jobs, wanted = [], []
    for t in tasks[:2]:
        fam = FAMILIES[t.family]
        calls = list(t.test_cases.values())
        jobs.append((t.ground_truth, calls))
        wanted.append(10)
        for slot in fam.slots:
            for v in slot.candidates:
                if v != t.hidden[slot.name]:
                    jobs.append((render(fam, {**t.hidden, slot.name: v}), calls))
                    wanted.append(-1)
    results = run_many(jobs)
    ref = None
    for (code, _), r, w in zip(jobs, results, wanted):
        assert all(c.ok and c.value is not None for c in r.calls) or w < 0
        if w == 10:
            ref = r.calls
            continue
        assert colbench.count_passed(ref, r.calls) < 10, code


def broken_family(name="broken"):
    # The second slot is dead code: no test input can tell its values apart.
    return Family(
        name, "f(x)", "does something with x.",
        "def f(x):\n    unused = {dead}\n    return x * {k}\n",
        (Slot("k", (2, 3), ("k",), ("What is k?",), "k is {value}."),
         Slot("dead", (1, 2), ("dead",), ("What is dead?",), "dead is {value}.")),
        lambda r: (r.randint(1, 50),),
    )


def test_generator_rejects_a_family_that_cannot_tell_a_slot(monkeypatch):
    monkeypatch.setitem(FAMILIES, "broken", broken_family())
    with pytest.raises(LlmxError, match=r"only 0 distinct verified tasks.*broken: no test input tells slot 'dead'"):
        generate_tasks(1, 0, families=["broken"])
    ok = broken_family("ok")
    ok = Family("ok", ok.signature, ok.description, "def f(x):\n    return x * {k} + {dead}\n", ok.slots, ok.inputs)
    monkeypatch.setitem(FAMILIES, "ok", ok)
    assert len(generate_tasks(4, 0, families=["ok"])) == 4


def test_generator_sandbox_check_rejects_a_reference_that_fails_there(monkeypatch):
    # Works in-process (the module-level name exists here) but not in the sandbox's fresh namespace.
    fam = broken_family("leaky")
    fam = Family("leaky", fam.signature, fam.description,
                 "def f(x):\n    return x * {k} + {dead} + LEAK\n", fam.slots, fam.inputs)
    monkeypatch.setitem(FAMILIES, "leaky", fam)
    monkeypatch.setattr(colbench, "render", lambda f, v: "LEAK = 0\n" + f.template.format(**v)
                        if f.name == "leaky" else f.template.format(**v))
    monkeypatch.setattr(colbench, "make_task", lambda f, h, tests: Task(
        colbench._task_id(f.name, h), "d", f.template.format(**h),
        {f"t{i}": colbench._call(f, a) for i, a in enumerate(tests)}, f.name, dict(h)))
    for chunk in (1, 100):
        with pytest.raises(LlmxError, match=r"the reference fails in the sandbox: NameError"):
            generate_tasks(2, 0, families=["leaky"], chunk=chunk)
    assert len(generate_tasks(2, 0, families=["leaky"], verify=False)) == 2


# --- the rule simulator -------------------------------------------------------------------------------


def ask(text):
    return [{"role": "user", "content": "task"}, {"role": "assistant", "content": text}]


def test_rule_simulator_questions_hit_their_own_slot_only():
    sim = RuleSimulator()
    for name, fam in FAMILIES.items():
        t = generate_tasks(1, 0, families=[name], verify=False)[0]
        for slot in fam.slots:
            want = slot.reply.format(value=t.hidden[slot.name])
            assert str(t.hidden[slot.name]) in want
            for q in slot.questions:
                assert len(q.split()) < 15
                assert sim.reply(t, ask(q)) == want, (name, q)
        for q in JUNK_QUESTIONS:
            assert sim.reply(t, ask(q)) == DONT_KNOW


def test_rule_simulator_answers_only_from_hidden(tasks):
    sim = RuleSimulator()
    t = next(t for t in tasks if t.family == "shipping_cost")
    other = Task(t.task_id, t.problem_description, t.ground_truth, t.test_cases, t.family, {**t.hidden, "rate": 99})
    assert sim.reply(other, ask("What is the rate per kg?")) == "The rate is 99 per kg."
    assert sim.reply(t, ask("Tell me about the weather.")) == DONT_KNOW
    both = sim.reply(t, ask("What is the rate per kg, when is it free, and what does express add?"))
    assert len(re.findall(r"[.!?](\s|$)", both)) == 2  # at most two sentences
    # Only the LAST agent message counts; an official task (no hidden slots) gets "I don't know."
    msgs = ask("What is the rate per kg?") + [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Ok?"}]
    assert sim.reply(t, msgs) == DONT_KNOW
    assert sim.reply(Task("o", "d", "def f(): pass", {"a": "f()"}), ask("What is the rate?")) == DONT_KNOW


# --- the environment ----------------------------------------------------------------------------------


def run_episode(env, task, turns):
    obs = env.reset(task)
    assert obs == [{"role": "user", "content": task.problem_description}]
    for turn in turns:
        obs, reward, done = env.step(turn)
        if done:
            return obs, reward
        assert reward == 0.0
    raise AssertionError("episode did not end")


def test_env_asking_every_slot_succeeds_guessing_wrong_fails(tasks):
    t = tasks[0]
    fam = FAMILIES[t.family]
    env = CollabEnv(RuleSimulator())
    obs, reward = run_episode(env, t, scripted_turns(t, random.Random(0), ask_prob=1.0, junk_prob=0.0))
    assert reward == 1.0 and env.passed == env.total == 10
    assert len(obs) == 2 * len(fam.slots) + 2 and obs[-1]["role"] == "assistant"
    assert all(str(t.hidden[s.name]) in " ".join(m["content"] for m in obs[2::2]) for s in fam.slots)
    wrong = {s.name: next(v for v in s.candidates if v != t.hidden[s.name]) for s in fam.slots}
    obs, reward = run_episode(env, t, [f"{END_MARKER}\n```python\n{render(fam, wrong)}```"])
    assert reward < 1.0 and len(obs) == 2


def test_env_max_rounds_truncation_and_finished_episode(tasks):
    t = tasks[0]

    class Long:
        def replies(self, items):
            return ["y" * 1000 for _ in items]

    env = CollabEnv(Long(), max_rounds=3, reply_chars=50)
    env.reset(t)
    assert env.step("Question one?")[0][-1]["content"] == "y" * 50
    assert env.step("Question two?")[2] is False
    code = render(FAMILIES[t.family], t.hidden)
    obs, reward, done = env.step(code)  # no marker, but the round limit: the last turn is the answer
    assert done and reward == 1.0 and len(obs) == 6 and env.answer == code.strip()
    with pytest.raises(LlmxError, match="finished episode"):
        env.step("more")


def test_step_many_one_simulator_call(tasks, monkeypatch):
    class Counting(RuleSimulator):
        calls = []

        def replies(self, items):
            self.calls.append(len(items))
            return super().replies(items)

    sim = Counting()
    envs = [CollabEnv(sim) for _ in range(4)]
    for e, t in zip(envs, tasks):
        e.reset(t)
    turns = ["What is it?", f"{END_MARKER}\n{tasks[1].ground_truth}", "Hmm?", f"{END_MARKER}\ndef nothing(): pass"]
    out = step_many(envs, turns)
    assert sim.calls == [2]
    assert [o[1:] for o in out] == [(0.0, False), (1.0, True), (0.0, False), (0.0, True)]
    assert out[0][0][-1] == {"role": "user", "content": DONT_KNOW}
    # Envs sharing a reference cache run each task's reference once, even within one batch.
    cache = {}
    envs = [CollabEnv(sim, expected_cache=cache) for _ in range(3)]
    for e in envs:
        e.reset(tasks[2])
    code = f"{END_MARKER}\n{tasks[2].ground_truth}"
    jobs = []
    real = env_module.run_many
    monkeypatch.setattr(env_module, "run_many", lambda js, *a, **k: jobs.append(len(js)) or real(js, *a, **k))
    assert [o[1] for o in step_many(envs, [code, END_MARKER + "def f(): pass", code])] == [1.0, 0.0, 1.0]
    assert jobs == [4] and list(cache) == [tasks[2].task_id]
    envs[0].reset(tasks[2])
    assert envs[0].step(code)[1] == 1.0 and jobs == [4, 1]


# --- the LLM simulator ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the human answers the agent"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    return LlamaForCausalLM(cfg), fast


def test_llm_simulator_prompt_and_batching(tiny_hf, tasks):
    from llmx.bench.backends import HFBackend

    model, tok = tiny_hf
    backend = HFBackend(model, tok, batch_size=2, max_new_tokens=5, temperature=1.0, system_prompt="other")
    sim = LLMSimulator(backend)
    assert backend.temperature == 1.0 and backend.system_prompt == "other"  # the caller's backend is untouched
    assert sim.backend.temperature == 0.0 and sim.backend.system_prompt == "You are a helpful assistant."
    t = tasks[0]
    msgs = ask("What is the rate?")
    prompt = sim.prompt_for(t, msgs)
    for part in (t.problem_description, t.ground_truth, "agent: What is the rate?", "don't know", "two sentences"):
        assert part in prompt
    assert prompt.endswith("human: task\n\nagent: What is the rate?\n\nhuman:")
    assert render_dialogue(msgs).count("\n\n") == 2
    text = tok.decode(sim.backend.render(prompt))
    assert text.startswith("<system>You are a helpful assistant.\n<user>")
    items = [(t, msgs), (tasks[1], ask("Anything?")), (tasks[2], ask("Hello?"))]
    batched = sim.replies(items)
    assert sim.backend.stats["rows"] == 3 and len(batched) == 3 and all(isinstance(x, str) for x in batched)
    assert [sim.reply(*it) for it in items] == batched  # greedy: batching does not change a reply


def test_llm_simulator_unreachable_server_named():
    from llmx.bench.backends import OpenAIBackend

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(LlmxError, match=re.escape(f"simulator server {url}/models is unreachable")):
        LLMSimulator(OpenAIBackend(url, "m"), check_timeout_s=2.0)


def test_llm_simulator_server_check_status():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from llmx.bench.backends import OpenAIBackend

    class Handler(BaseHTTPRequestHandler):
        status = 404

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(self.status if self.path == "/v1/models" else 500)
            self.end_headers()
            self.wfile.write(b'{"data": []}')

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        with pytest.raises(LlmxError, match=re.escape(f"simulator server {url}/models answered HTTP 404")):
            LLMSimulator(OpenAIBackend(url, "m"))
        Handler.status = 200
        sim = LLMSimulator(OpenAIBackend(url, "m", temperature=0.7))
        assert sim.backend.temperature == 0.0 and sim.backend.system_prompt == "You are a helpful assistant."
    finally:
        server.shutdown()
        server.server_close()


def test_scripted_turns_shape_and_rates(tasks):
    t = tasks[0]
    fam = FAMILIES[t.family]
    a = scripted_turns(t, random.Random(5), ask_prob=0.5, junk_prob=0.5)
    assert a == scripted_turns(t, random.Random(5), ask_prob=0.5, junk_prob=0.5)
    assert a[-1].startswith(END_MARKER + "\n") and all(END_MARKER not in x for x in a[:-1])
    assert len(scripted_turns(t, random.Random(0), ask_prob=0.0, junk_prob=0.0)) == 1
    full = scripted_turns(t, random.Random(0), ask_prob=1.0, junk_prob=0.0, paraphrase=False)
    assert sorted(full[:-1]) == sorted(s.questions[0] for s in fam.slots)
    assert len(scripted_turns(t, random.Random(0), ask_prob=1.0, junk_prob=1.0, max_rounds=4)) == 4
    # Over many tasks, in lockstep through step_many: asking everything always succeeds, asking nothing rarely.
    for ask_prob, check in ((1.0, lambda s: s == 1.0), (0.0, lambda s: s < 0.5)):
        rng = random.Random(1)
        scripts = [scripted_turns(x, rng, ask_prob=ask_prob) for x in tasks[:20]]
        sim = RuleSimulator()
        envs = [CollabEnv(sim) for _ in scripts]
        for e, x in zip(envs, tasks):
            e.reset(x)
        rewards = {}
        for k in range(max(map(len, scripts))):
            live = [i for i in range(len(envs)) if i not in rewards]
            for i, (_, r, done) in zip(live, step_many([envs[i] for i in live], [scripts[i][k] for i in live])):
                if done:
                    rewards[i] = r
        assert len(rewards) == 20
        assert check(sum(r == 1.0 for r in rewards.values()) / 20), ask_prob
