"""The keys_maze benchmark generator (Token Assorted's Keys-Finding Maze, llmx's reconstruction)."""

from __future__ import annotations

import random

import pytest

from llmx.bench import build_plan, generate_dataset, get_bench, load_bench
from llmx.bench.base import BenchError, problem_rng
from llmx.bench.keys_maze import (
    MazeSpec, dijkstra_length, is_success, one_feasible_k, parse_solution, random_maze, replay, solve, tokens, vocab,
)
from llmx.utils import LlmxError


def tiny(blue_or_green: str = "blue") -> dict:
    """2x3 rooms of one cell. Start (0,1), goal (0,2) behind a red door; the red key at (1,1) is reached
    round the left; a green key lies at (1,0) on the way. (1,1)-(1,2) is a passage and (1,2)-(0,2) a door of
    colour `blue_or_green`: blue has no key (no bypass), green makes the green key a shortcut."""
    return {
        "height": 2, "width": 3, "room_size": 1, "start": [0, 1], "goal": [0, 2],
        "connections": [
            {"a": [0, 0], "b": [0, 1], "colour": None},
            {"a": [0, 1], "b": [0, 2], "colour": "red"},
            {"a": [0, 0], "b": [1, 0], "colour": None},
            {"a": [1, 0], "b": [1, 1], "colour": None},
            {"a": [1, 1], "b": [1, 2], "colour": None},
            {"a": [1, 2], "b": [0, 2], "colour": blue_or_green},
        ],
        "keys": [{"cell": [1, 0], "colour": "green"}, {"cell": [1, 1], "colour": "red"}],
    }


def test_hand_built_maze():
    # Blue door has no key: left, down, right to the red key, pick, back round, through the red door.
    assert solve(tiny()) == list("LDRPLURR")
    assert dijkstra_length(tiny()) == 8
    rep = replay(tiny(), list("LDRPLURR"))
    assert (rep.feasible, rep.reached, rep.steps, rep.error, rep.doors_opened) == (True, True, 8, "", 1)
    # A green bypass door: the "distractor" green key at (1,0) is now the shortcut.
    assert solve(tiny("green")) == list("LDPRRU")
    assert dijkstra_length(tiny("green")) == 6
    # Unsolvable: no red key at all.
    maze = tiny()
    maze["keys"] = maze["keys"][:1]
    assert solve(maze) is None and dijkstra_length(maze) is None


def test_replay_errors_name_the_step():
    maze = tiny()
    cases = {
        "D": "step 1: 'D' into a wall at (0, 1)",
        "U": "step 1: 'U' off the grid at (0, 1)",
        "P": "step 1: 'P' with no key at (0, 1)",
        "R": "step 1: 'R' through the locked red door at (0, 1) holding no key",
        "LDPURR": "step 6: 'R' through the locked red door at (0, 1) holding a green key",
        "LDPRP": "step 5: 'P' at (1, 1) while holding a green key",
        "LDRPLURRX": "step 9: unknown action 'X'",
    }
    for actions, error in cases.items():
        rep = replay(maze, list(actions))
        assert not rep.feasible and not rep.reached and rep.error == error, (actions, rep)
        assert rep.steps == int(error.split()[1].rstrip(":")) - 1
    # Taking a key twice: the key is gone after the first P.
    rep = replay(maze, list("LDRPLURRLLDRP"))
    assert not rep.feasible and rep.error.startswith("step 13: 'P' with no key")
    # Legal but not at the goal; legal and goes on past the goal (reached is judged at the end).
    assert replay(maze, list("LR")).feasible and not replay(maze, list("LR")).reached
    rep = replay(maze, list("LDRPLURRLR"))  # back through the opened door with empty hands
    assert rep.feasible and rep.reached and rep.doors_opened == 1
    rep = replay(maze, list("LDRPLURRLLDP"))  # the door used the red key up: the hand is free for green
    assert rep.feasible and not rep.reached and rep.steps == 12
    assert not is_success(maze, list("LDRPLURRLR"), 8) and is_success(maze, list("LDRPLURR"), 8)


def test_one_feasible_k():
    maze = tiny()
    assert one_feasible_k(maze, [list("D"), list("LDRPLURRLR"), list("LDRPLURR")], 8)
    assert not one_feasible_k(maze, [list("D"), list("LDRPLURRLR"), list("LDRPLUR")], 8)
    assert not one_feasible_k(maze, [], 8)


def test_solver_matches_independent_solver():
    rng = random.Random(7)
    specs = [MazeSpec(), MazeSpec(rooms=(2, 3), room_size=2, locked_doors=3, colours=2, loops=2),
             MazeSpec(rooms=(4, 4), locked_doors=4, distractor_keys=2, loops=3)]
    checked = 0
    for i in range(60):
        maze = random_maze(specs[i % 3], rng)
        actions = solve(maze)
        assert (None if actions is None else len(actions)) == dijkstra_length(maze)
        if actions is not None:
            rep = replay(maze, actions)
            assert rep.feasible and rep.reached
            checked += 1
    assert checked >= 40


def test_generated_records_are_deterministic_and_open_op_doors():
    bench = get_bench("keys_maze", rooms=[3, 3], locked_doors=3)
    for op in (1, 2, 3):
        for index in range(4):
            rec = bench.generate("train", op, 0, problem_rng(0, "keys_maze", "train", 0, op, index), None)
            again = bench.generate("train", op, 0, problem_rng(0, "keys_maze", "train", 0, op, index), None)
            assert rec == again
            assert rec["op"] == rec["doors_opened"] == op == replay(rec["maze"], rec["actions"]).doors_opened
            assert rec["answer"] == " ".join(rec["actions"]) and rec["optimal_len"] == len(rec["actions"])
            bench.verify(rec)
            assert bench.grade(rec["solution"], rec) and bench.grade("Answer: " + "".join(rec["actions"]), rec)
            assert not bench.grade("Answer: " + rec["answer"] + " L", rec)
    other = bench.generate("test", 1, 0, problem_rng(0, "keys_maze", "test", 0, 1, 0), None)
    assert other["maze"] != bench.generate("train", 1, 0, problem_rng(0, "keys_maze", "train", 0, 1, 0), None)["maze"]


def test_verify_catches_a_wrong_reference():
    bench = get_bench("keys_maze")
    rec = bench.generate("train", 1, 0, problem_rng(1, "keys_maze", "train", 0, 1, 0), None)
    bad = dict(rec, actions=rec["actions"] + ["U", "D"], optimal_len=rec["optimal_len"] + 2)
    with pytest.raises(BenchError, match="Dijkstra finds optimal length"):
        bench.verify(bad)
    bad = dict(rec, op=2)
    with pytest.raises(BenchError, match="op=2"):
        bench.verify(bad)


def test_tokens_round_trip():
    bench = get_bench("keys_maze", rooms=(3, 3), room_size=2)
    spec = MazeSpec(rooms=(3, 3), room_size=2)
    words = set(vocab(spec))
    full = vocab()
    assert full[:5] == ["<pad>", "<bos>", "<eos>", "<cot>", "<sol>"] and len(full) == len(set(full))
    cot_total = sol_total = 0
    for i in range(20):
        op = 1 + i % 2
        rec = bench.generate("train", op, 0, problem_rng(3, "keys_maze", "train", 0, op, i), None)
        prompt, cot, sol = tokens(rec)
        assert prompt[0] == "<bos>" and prompt[-1] == "<cot>" and cot[-1] == "<sol>" and sol[-1] == "<eos>"
        assert set(prompt + cot + sol) <= words
        assert parse_solution(prompt + cot + sol) == rec["actions"]
        assert parse_solution(" ".join(prompt + cot + sol + ["<pad>"])) == rec["actions"]
        assert cot.count("open") == op and rec["n_tokens"] == len(prompt)
        cot_total += len(cot)
        sol_total += len(sol)
    assert cot_total > 1.5 * sol_total


def test_tiny_tokens_exact():
    prompt, cot, sol = tokens({"maze": tiny(), "actions": list("LDRPLURR")})
    assert " ".join(prompt) == ("<bos> start r0 c1 goal r0 c2 pass r0 c0 r0 c1 door red r0 c1 r0 c2 pass r0 c0 r1 c0 "
                                "pass r1 c0 r1 c1 pass r1 c1 r1 c2 door blue r1 c2 r0 c2 key green r1 c0 "
                                "key red r1 c1 <cot>")
    assert " ".join(cot) == ("@key red r1 c1 r0 c0 r1 c0 r1 c1 pick red @door red r0 c2 r1 c0 r0 c0 r0 c1 open red "
                             "r0 c2 @goal r0 c2 <sol>")
    assert sol == list("LDRPLURR") + ["<eos>"]


def test_parse_solution_forms():
    assert parse_solution("thinking U D\nAnswer: R R, D P") == ["R", "R", "D", "P"]
    assert parse_solution("Answer: RRDP") == ["R", "R", "D", "P"]
    assert parse_solution("go R then U") == ["R", "U"]
    assert parse_solution(["<sol>", "R", "<sol>", "L", "x", "<eos>", "U"]) == ["L", "x"]


def test_bad_spec_and_options_are_refused():
    for kwargs, needle in [({"rooms": (1, 1)}, "rooms=(1, 1)"), ({"room_size": 0}, "room_size=0"),
                           ({"colours": 7}, "colours=7"), ({"loops": 9}, "loops=9"),
                           ({"locked_doors": 20}, "locked_doors=20"), ({"rooms": (4, 4), "room_size": 3}, "12x12"),
                           ({"distractor_keys": -1}, "distractor_keys=-1")]:
        with pytest.raises(LlmxError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            MazeSpec(**kwargs).validate()
    with pytest.raises(BenchError, match="unknown option.*'doors'.*valid"):
        get_bench("keys_maze", doors=3)
    with pytest.raises(LlmxError, match="colours=0"):
        get_bench("keys_maze", colours=0)
    bench = get_bench("keys_maze", locked_doors=2)
    with pytest.raises(BenchError, match="op=3 doors opened is outside 1-2"):
        bench.check_request("train", 3, 0)
    with pytest.raises(BenchError, match="length=4000"):
        bench.check_request("train", 1, 4000)
    # Four doors on the optimal route of a 3x3 maze are rare: three attempts (seed 0) find none.
    hopeless = get_bench("keys_maze", locked_doors=4, max_attempts=3)
    with pytest.raises(BenchError, match=r"no maze with op=4 found in 3 attempts for spec .*raise locked_doors"):
        hopeless.generate("train", 4, 0, random.Random(0), None)


def test_generate_dataset_round_trip(tmp_path):
    manifest = generate_dataset("keys_maze", build_plan(["train", "test"], ["0"], "1-2", 5), tmp_path / "b",
                                seed=0, workers=1, progress=False, formats=("arrow", "jsonl"))
    assert manifest["problems"] == 20 and manifest["verified"]
    _, sets = load_bench(tmp_path / "b")
    assert sorted(sets) == ["test_0", "train_0"]
    bench = get_bench("keys_maze")
    for ds in sets.values():
        for split, rows in ds.items():
            for r in rows:
                r = dict(r)
                assert split == f"ops_{r['op']}" and r["doors_opened"] == r["op"]
                bench.verify(r)
                assert bench.grade(r["solution"], r)
                assert parse_solution(sum(tokens(r), [])) == r["actions"]
