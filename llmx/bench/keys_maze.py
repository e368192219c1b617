"""`keys_maze`: the Keys-Finding Maze of "Token Assorted" (Su et al. 2025, arXiv 2502.03275) as a benchmark.

The paper. "Token Assorted: Mixing Latent and Text Tokens for Improved Language Model Reasoning" trains
models from scratch on a keys-finding maze: a grid maze of interconnected rooms in which an agent must reach
a goal; colour-coded doors open only with a key of the same colour, one key is carried at a time, and the
optimal trajectory goes in phases (get a key -> open its door -> get the next key ... -> goal). Traces have a
chain of thought (CoT, 1312 tokens on average there) before the solution (645 tokens), and models are scored
by "1-Feasible-10" with top-k decoding. The generator, the serialisation and the metric's exact definition
are not public: everything below is llmx's reconstruction, and every choice is listed here.

Maze (`MazeSpec`, the generator's options). A grid of rooms[0] x rooms[1] rooms, each room_size x room_size
cells, so H = rooms[0]*room_size rows and W = rooms[1]*room_size columns of cells (at most 10 x 10, so a
coordinate is one token r0-r9 / c0-c9). Inside a room every move between neighbouring cells is free.
Between two side-by-side rooms there is a wall, except where a *connection* joins one cell pair across it
(its position along the wall is uniform). The connections are a uniform-random spanning tree of the room
grid (random-weight Kruskal) plus `loops` extra adjacent-room connections, so some locks can be bypassed
and search matters. `locked_doors` of the connections, chosen uniformly, are locked with colours drawn
uniformly from the first `colours` names of PALETTE. One key of each locked door's colour is placed per
locked door, plus `distractor_keys` keys of uniformly random colour (a distractor may share a needed
colour and then offers an alternative; the solver accounts for it). Keys lie on distinct cells, never on
the start or goal cell. Start and goal are uniform cells of two different rooms.

Stored as a JSON-able dict (an Arrow/JSONL field):
    {"height": H, "width": W, "room_size": s, "start": [r, c], "goal": [r, c],
     "connections": [{"a": [r, c], "b": [r, c], "colour": None | "red"}, ...],
     "keys": [{"cell": [r, c], "colour": "red"}, ...]}

Rules. Actions "U" (row - 1), "D" (row + 1), "L" (col - 1), "R" (col + 1) move one cell; a move off the grid
or into a wall is infeasible. Moving through a locked door that is still closed requires holding a key of
its colour: the move opens the door for good and uses the key up (the hand is empty again); opened doors
and passages are free. "P" picks up the key lying in the current cell: infeasible if no (untaken) key is
there or a key is already held (one key at a time; there is no drop action). The goal is reached when the
agent stands on the goal cell after the last action: a trajectory that goes on after passing the goal is
still feasible if every action is legal, and `reached` is judged at its end. State = (cell, held colour or
None, set of opened doors, set of keys taken).

Solving. `solve` is a breadth-first search over states with the fixed action order U, D, L, R, P; the first
goal state found gives the canonical optimal trajectory (fewest actions). It returns None for an
unsolvable maze (the generator rejects those). The independent solver used by `verify` is a Dijkstra
(heapq, unit costs) over a separately written transition function that works on the raw dict (frozensets of
cell pairs, no precompiled tables); it must agree on the optimal length, and the stored trajectory is
replayed.

op. A problem's reasoning-op count is the number of doors its optimal trajectory opens (>= 1). Rejection
sampling keeps a maze only when *every* optimal trajectory opens exactly `op` doors (all goal states at the
optimal depth agree), so op does not depend on tie-breaking. `length` (context padding) must be 0.
Subsets "train" and "test" are independent streams of the same distribution (problem_rng seeds on the
subset); exact duplicates are left for the recipe to remove.

Metrics. `is_success`: feasible, reaches the goal and has the optimal length (any optimal trajectory
counts, not only the canonical one). `one_feasible_k` (llmx's reading of the paper's 1-Feasible-k): success
if ANY of k sampled trajectories is a success in that sense.

Serialisation for from-scratch models (`tokens`, `vocab`), whitespace-separated tokens:
    prompt   <bos> start rI cJ goal rI cJ  {pass rI cJ rI cJ | door COLOUR rI cJ rI cJ}*  {key COLOUR rI cJ}*  <cot>
    cot      phases, each: a subgoal (@key COLOUR rI cJ | @door COLOUR rI cJ | @goal rI cJ) then, per action,
             the cell reached (rI cJ), "pick COLOUR" for P, and "open COLOUR" before the cell entered through
             a locked door; a phase ends after a pick or an opening; the last phase (@goal) ends at the goal.
             The cot ends with <sol>. The @door target is the cell entered through the door.
    solution the action letters, then <eos>.
Example (tests/test_keys_maze.py `tiny`: 2x3 rooms of one cell, start (0,1), goal (0,2) behind a red door,
the red key at (1,1) reached round the left, a green distractor key at (1,0), a keyless blue door (1,2)-(0,2)):
    prompt   <bos> start r0 c1 goal r0 c2 pass r0 c0 r0 c1 door red r0 c1 r0 c2 pass r0 c0 r1 c0
             pass r1 c0 r1 c1 pass r1 c1 r1 c2 door blue r1 c2 r0 c2 key green r1 c0 key red r1 c1 <cot>
    cot      @key red r1 c1 r0 c0 r1 c0 r1 c1 pick red @door red r0 c2 r1 c0 r0 c0 r0 c1 open red r0 c2
             @goal r0 c2 <sol>
    solution L D R P L U R R <eos>
Generated mazes list connections and keys sorted by cell. The CoT costs about 2 tokens per move plus 4-5 per
phase, the solution 1 per action (the paper's CoT is also about twice its solution).

Words for any LLM backend: the record's `prompt` describes the maze, the rules and the answer format
("Answer: R R D P ..."); `solution` narrates the phases and ends with that answer line; `answer` is the
action string. Without a tokenizer `n_tokens` is the length of the token-format prompt above (with one, the
words prompt measured by it).
"""

from __future__ import annotations

import heapq
import random
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from llmx.bench.base import BenchError, BenchGenerator, Unsatisfiable, register_bench
from llmx.utils import LlmxError

PALETTE = ("red", "green", "blue", "yellow", "purple", "orange")
ACTIONS = ("U", "D", "L", "R", "P")
MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
MAX_CELLS = 10  # per side: coordinates stay single tokens r0-r9 / c0-c9
SPECIALS = ("<pad>", "<bos>", "<eos>", "<cot>", "<sol>")
WORDS = ("start", "goal", "pass", "door", "key", "pick", "open", "@key", "@door", "@goal")

Cell = Tuple[int, int]


@dataclass(frozen=True)
class MazeSpec:
    rooms: Tuple[int, int] = (3, 3)  # room grid (rows, cols)
    room_size: int = 1  # cells per room side
    colours: int = 3  # door/key colours, the first names of PALETTE
    locked_doors: int = 2  # connections locked; op must be <= this
    distractor_keys: int = 1  # extra keys of random colour
    loops: int = 1  # connections beyond a spanning tree of the rooms

    @property
    def shape(self) -> Tuple[int, int]:
        return self.rooms[0] * self.room_size, self.rooms[1] * self.room_size

    def adjacencies(self) -> int:
        rr, rc = self.rooms
        return rr * (rc - 1) + (rr - 1) * rc

    def validate(self) -> "MazeSpec":
        rooms = tuple(self.rooms)
        if len(rooms) != 2 or any(not isinstance(x, int) or x < 1 for x in rooms) or rooms[0] * rooms[1] < 2:
            raise LlmxError(f"keys_maze: rooms={self.rooms!r} must be two positive ints with at least 2 rooms (1x2)")
        if not isinstance(self.room_size, int) or self.room_size < 1:
            raise LlmxError(f"keys_maze: room_size={self.room_size!r} must be an int >= 1")
        h, w = self.shape
        if h > MAX_CELLS or w > MAX_CELLS:
            raise LlmxError(f"keys_maze: rooms={rooms} x room_size={self.room_size} gives {h}x{w} cells; "
                            f"at most {MAX_CELLS}x{MAX_CELLS}")
        if not 1 <= self.colours <= len(PALETTE):
            raise LlmxError(f"keys_maze: colours={self.colours} is outside 1..{len(PALETTE)}")
        max_loops = self.adjacencies() - (rooms[0] * rooms[1] - 1)
        if not 0 <= self.loops <= max_loops:
            raise LlmxError(f"keys_maze: loops={self.loops} is outside 0..{max_loops} for {rooms[0]}x{rooms[1]} rooms")
        connections = rooms[0] * rooms[1] - 1 + self.loops
        if not 0 <= self.locked_doors <= connections:
            raise LlmxError(f"keys_maze: locked_doors={self.locked_doors} is outside 0..{connections} "
                            f"(the number of connections)")
        if self.distractor_keys < 0:
            raise LlmxError(f"keys_maze: distractor_keys={self.distractor_keys} must be >= 0")
        if self.locked_doors + self.distractor_keys + 2 > h * w:
            raise LlmxError(f"keys_maze: locked_doors + distractor_keys = {self.locked_doors + self.distractor_keys} "
                            f"keys do not fit in {h}x{w} cells besides start and goal")
        return self


# ---- rules (compiled tables, used by the BFS solver and replay) ----------------------------------------


class _Compiled:
    """Lookup tables of one maze: per cell and move, the target cell and the door there (-1 = free)."""

    WALL, OFF = -2, -3

    def __init__(self, maze: Dict[str, Any]):
        self.h, self.w, s = maze["height"], maze["width"], maze["room_size"]
        self.start = _cell(maze["start"])
        self.goal = _cell(maze["goal"])
        links: Dict[FrozenSet[Cell], int] = {}
        self.door_colour: List[str] = []
        for conn in maze["connections"]:
            pair = frozenset((_cell(conn["a"]), _cell(conn["b"])))
            if conn["colour"] is None:
                links[pair] = -1
            else:
                links[pair] = len(self.door_colour)
                self.door_colour.append(conn["colour"])
        self.key_at = {_cell(k["cell"]): i for i, k in enumerate(maze["keys"])}
        self.key_colour = [k["colour"] for k in maze["keys"]]
        self.table: Dict[Tuple[Cell, str], Tuple[Cell, int]] = {}
        for r in range(self.h):
            for c in range(self.w):
                for a, (dr, dc) in MOVES.items():
                    to = (r + dr, c + dc)
                    if not (0 <= to[0] < self.h and 0 <= to[1] < self.w):
                        self.table[(r, c), a] = (to, self.OFF)
                    elif (r // s, c // s) == (to[0] // s, to[1] // s):
                        self.table[(r, c), a] = (to, -1)
                    else:
                        self.table[(r, c), a] = (to, links.get(frozenset(((r, c), to)), self.WALL))

    def step(self, state: Tuple, action: str) -> Tuple[Optional[Tuple], str]:
        """(next state, '') or (None, why not). state = (cell, held colour, opened mask, taken mask)."""
        cell, held, opened, taken = state
        if action == "P":
            k = self.key_at.get(cell)
            if k is None or taken >> k & 1:
                return None, f"'P' with no key at {cell}"
            if held is not None:
                return None, f"'P' at {cell} while holding a {held} key"
            return (cell, self.key_colour[k], opened, taken | 1 << k), ""
        if action not in MOVES:
            return None, f"unknown action {action!r}"
        to, door = self.table[cell, action]
        if door == self.OFF:
            return None, f"'{action}' off the grid at {cell}"
        if door == self.WALL:
            return None, f"'{action}' into a wall at {cell}"
        if door >= 0 and not opened >> door & 1:
            colour = self.door_colour[door]
            if held != colour:
                holding = f"a {held} key" if held else "no key"
                return None, f"'{action}' through the locked {colour} door at {cell} holding {holding}"
            return (to, None, opened | 1 << door, taken), ""
        return (to, held, opened, taken), ""


def _cell(value: Sequence[int]) -> Cell:
    return int(value[0]), int(value[1])


def _bfs(maze: Dict[str, Any]) -> Tuple[Optional[List[str]], List[int]]:
    """(canonical optimal actions or None, doors opened by every optimal goal state found at that depth)."""
    m = _Compiled(maze)
    start = (m.start, None, 0, 0)
    if m.start == m.goal:
        return [], [0]
    parent: Dict[Tuple, Tuple[Optional[Tuple], str]] = {start: (None, "")}
    level, goals = [start], []
    while level and not goals:
        nxt = []
        for state in level:
            for a in ACTIONS:
                new, _ = m.step(state, a)
                if new is None or new in parent:
                    continue
                parent[new] = (state, a)
                if new[0] == m.goal:
                    goals.append(new)  # a goal state ends the trajectory: not expanded
                else:
                    nxt.append(new)
        level = nxt
    if not goals:
        return None, []
    actions, state = [], goals[0]
    while parent[state][0] is not None:
        state, a = parent[state]
        actions.append(a)
    return actions[::-1], sorted({bin(g[2]).count("1") for g in goals})


def solve(maze: Dict[str, Any]) -> Optional[List[str]]:
    """The canonical optimal (fewest actions) trajectory, or None if the goal cannot be reached."""
    return _bfs(maze)[0]


@dataclass
class Replay:
    feasible: bool
    reached: bool
    steps: int  # actions executed legally (all of them when feasible)
    error: str  # '' or "step N: ..." (1-based) for the first illegal action
    doors_opened: int


def replay(maze: Dict[str, Any], actions: Sequence[str]) -> Replay:
    m = _Compiled(maze)
    state = (m.start, None, 0, 0)
    for i, a in enumerate(actions):
        new, why = m.step(state, a)
        if new is None:
            return Replay(False, False, i, f"step {i + 1}: {why}", bin(state[2]).count("1"))
        state = new
    return Replay(True, state[0] == m.goal, len(actions), "", bin(state[2]).count("1"))


def is_success(maze: Dict[str, Any], actions: Sequence[str], optimal_len: int) -> bool:
    rep = replay(maze, actions)
    return rep.feasible and rep.reached and len(actions) == optimal_len


def one_feasible_k(maze: Dict[str, Any], samples: Sequence[Sequence[str]], optimal_len: int) -> bool:
    """llmx's 1-Feasible-k: any of the k samples is feasible, reaches the goal and is optimal in length."""
    return any(is_success(maze, s, optimal_len) for s in samples)


# ---- the independent solver (verify) --------------------------------------------------------------------


def dijkstra_length(maze: Dict[str, Any]) -> Optional[int]:
    """Optimal trajectory length by Dijkstra over the raw dict, sharing no code with _Compiled/_bfs."""
    s, h, w = maze["room_size"], maze["height"], maze["width"]
    doors = {}
    for conn in maze["connections"]:
        doors[frozenset((tuple(conn["a"]), tuple(conn["b"])))] = conn["colour"]
    keys = {tuple(k["cell"]): k["colour"] for k in maze["keys"]}
    goal = tuple(maze["goal"])

    def successors(cell, held, opened, taken):
        if cell in keys and cell not in taken and held is None:
            yield cell, keys[cell], opened, taken | {cell}
        r, c = cell
        for to in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if not (0 <= to[0] < h and 0 <= to[1] < w):
                continue
            if (r // s, c // s) == (to[0] // s, to[1] // s):
                yield to, held, opened, taken
                continue
            pair = frozenset((cell, to))
            if pair not in doors:
                continue
            colour = doors[pair]
            if colour is None or pair in opened:
                yield to, held, opened, taken
            elif held == colour:
                yield to, None, opened | {pair}, taken

    start = (tuple(maze["start"]), None, frozenset(), frozenset())
    best = {start: 0}
    heap = [(0, 0, start)]
    tie = 1  # states are not ordered (None vs str): a counter breaks ties
    while heap:
        d, _, state = heapq.heappop(heap)
        if d > best[state]:
            continue
        if state[0] == goal:
            return d
        for nxt in successors(*state):
            if d + 1 < best.get(nxt, 1 << 30):
                best[nxt] = d + 1
                heapq.heappush(heap, (d + 1, tie, nxt))
                tie += 1
    return None


# ---- sampling -------------------------------------------------------------------------------------------


def _room_edges(spec: MazeSpec) -> List[Tuple[Cell, Cell]]:
    rr, rc = spec.rooms
    out = [((i, j), (i, j + 1)) for i in range(rr) for j in range(rc - 1)]
    return out + [((i, j), (i + 1, j)) for i in range(rr - 1) for j in range(rc)]


def _spanning_tree(spec: MazeSpec, rng: random.Random) -> Tuple[List, List]:
    """(tree edges, the other adjacencies) of a random spanning tree by Kruskal over shuffled edges."""
    edges = _room_edges(spec)
    rng.shuffle(edges)
    root = {room: room for e in edges for room in e}

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    tree, rest = [], []
    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra == rb:
            rest.append((a, b))
        else:
            root[ra] = rb
            tree.append((a, b))
    return tree, rest


def _door_cells(a: Cell, b: Cell, s: int, rng: random.Random) -> Tuple[List[int], List[int]]:
    """The cell pair across the wall between rooms a and b (b right of or below a), uniform along it."""
    k = rng.randrange(s)
    if a[0] == b[0]:  # side by side: the wall is vertical
        return [a[0] * s + k, b[1] * s - 1], [a[0] * s + k, b[1] * s]
    return [b[0] * s - 1, a[1] * s + k], [b[0] * s, a[1] * s + k]


def random_maze(spec: MazeSpec, rng: random.Random) -> Dict[str, Any]:
    """One maze drawn as the module docstring describes (not yet solved or filtered)."""
    s = spec.room_size
    h, w = spec.shape
    tree, rest = _spanning_tree(spec, rng)
    room_pairs = tree + rng.sample(rest, spec.loops)
    conns = [dict(zip(("a", "b"), _door_cells(a, b, s, rng)), colour=None) for a, b in room_pairs]
    palette = PALETTE[:spec.colours]
    for i in rng.sample(range(len(conns)), spec.locked_doors):
        conns[i]["colour"] = rng.choice(palette)
    conns.sort(key=lambda c: (c["a"], c["b"]))
    rooms = [(i, j) for i in range(spec.rooms[0]) for j in range(spec.rooms[1])]
    start_room, goal_room = rng.sample(rooms, 2)
    start = [start_room[0] * s + rng.randrange(s), start_room[1] * s + rng.randrange(s)]
    goal = [goal_room[0] * s + rng.randrange(s), goal_room[1] * s + rng.randrange(s)]
    free = [[r, c] for r in range(h) for c in range(w) if [r, c] not in (start, goal)]
    colours = [c["colour"] for c in conns if c["colour"]]
    colours += [rng.choice(palette) for _ in range(spec.distractor_keys)]
    cells = rng.sample(free, len(colours))
    keys = sorted(({"cell": cell, "colour": col} for cell, col in zip(cells, colours)), key=lambda k: k["cell"])
    return {"height": h, "width": w, "room_size": s, "start": start, "goal": goal, "connections": conns,
            "keys": keys}


def sample_maze(spec: MazeSpec, op: int, rng: random.Random) -> Dict[str, Any]:
    """One attempt: a maze whose every optimal trajectory opens exactly `op` doors, or Unsatisfiable."""
    maze = random_maze(spec, rng)
    actions, opened = _bfs(maze)
    if actions is None:
        raise Unsatisfiable("goal unreachable")
    if opened != [op]:
        raise Unsatisfiable(f"optimal trajectories open {opened} doors, not {op}")
    return make_record(maze, actions, op)


def make_record(maze: Dict[str, Any], actions: List[str], op: int) -> Dict[str, Any]:
    prompt = words_prompt(maze)
    question = f"Find the fewest actions from {_xy(maze['start'])} to the goal {_xy(maze['goal'])}."
    answer = " ".join(actions)
    solution = "\n".join(_words_phases(maze, actions) + [f"Answer: {answer}"])
    return {"op": op, "prompt": prompt, "question": question, "solution": solution, "answer": answer,
            "maze": maze, "actions": list(actions), "optimal_len": len(actions), "doors_opened": op}


# ---- serialisation ----------------------------------------------------------------------------------------


def _xy(cell: Sequence[int]) -> str:
    return f"({cell[0]},{cell[1]})"


def _rc(cell: Sequence[int]) -> List[str]:
    return [f"r{cell[0]}", f"c{cell[1]}"]


def vocab(spec: Optional[MazeSpec] = None) -> List[str]:
    """Every token, fixed order, specials first; a spec keeps only its colours and coordinates."""
    h, w = spec.shape if spec is not None else (MAX_CELLS, MAX_CELLS)
    colours = PALETTE[:spec.colours] if spec is not None else PALETTE
    return [*SPECIALS, *(f"r{i}" for i in range(h)), *(f"c{j}" for j in range(w)), *colours, *WORDS, *ACTIONS]


def phases(maze: Dict[str, Any], actions: Sequence[str]) -> List[Dict[str, Any]]:
    """The trajectory cut after each pick and each door opening: [{"kind", "colour", "target", "items"}],
    items = ("cell", [r, c]) | ("pick", colour) | ("open", colour). Actions must be feasible."""
    m = _Compiled(maze)
    state = (m.start, None, 0, 0)
    out: List[Dict[str, Any]] = []
    items: List[Tuple[str, Any]] = []
    for i, a in enumerate(actions):
        new, why = m.step(state, a)
        if new is None:
            raise BenchError(f"phases of an infeasible trajectory: step {i + 1}: {why}")
        if a == "P":
            items.append(("pick", new[1]))
            out.append({"kind": "key", "colour": new[1], "target": list(new[0]), "items": items})
            items = []
        elif new[2] != state[2]:
            items += [("open", state[1]), ("cell", list(new[0]))]
            out.append({"kind": "door", "colour": state[1], "target": list(new[0]), "items": items})
            items = []
        else:
            items.append(("cell", list(new[0])))
        state = new
    out.append({"kind": "goal", "colour": None, "target": list(state[0]), "items": items})
    return out


def tokens(record: Dict[str, Any]) -> Tuple[List[str], List[str], List[str]]:
    """(prompt, cot, solution) token lists of a record (or of a {"maze", "actions"} dict)."""
    maze, actions = record["maze"], record["actions"]
    prompt = ["<bos>", "start", *_rc(maze["start"]), "goal", *_rc(maze["goal"])]
    for c in maze["connections"]:
        prompt += (["door", c["colour"]] if c["colour"] else ["pass"]) + _rc(c["a"]) + _rc(c["b"])
    for k in maze["keys"]:
        prompt += ["key", k["colour"], *_rc(k["cell"])]
    prompt.append("<cot>")
    cot: List[str] = []
    for ph in phases(maze, actions):
        cot += [f"@{ph['kind']}"] + ([ph["colour"]] if ph["colour"] else []) + _rc(ph["target"])
        for kind, value in ph["items"]:
            cot += _rc(value) if kind == "cell" else [kind, value]
    cot.append("<sol>")
    return prompt, cot, [*actions, "<eos>"]


def parse_solution(tokens_or_text: Union[str, Sequence[str]]) -> List[str]:
    """The actions of a model's output. Tokens after the last <sol> up to <eos>, kept as they are (a stray
    token then makes the replay infeasible); without <sol>: in text, the last line starting with "Answer:"
    (letters may be run together, "RRDP"), else every U/D/L/R/P token."""
    toks = tokens_or_text.split() if isinstance(tokens_or_text, str) else list(tokens_or_text)
    if "<sol>" in toks:
        tail = toks[len(toks) - toks[::-1].index("<sol>"):]
        return tail[:tail.index("<eos>")] if "<eos>" in tail else tail
    if isinstance(tokens_or_text, str):
        answers = [ln for ln in tokens_or_text.splitlines() if ln.strip().lower().startswith("answer:")]
        if answers:
            words = re.split(r"[\s,]+", answers[-1].split(":", 1)[1].strip())
            return [ch for word in words if word and set(word) <= set(ACTIONS) for ch in word]
    return [t for t in toks if t in ACTIONS]


def words_prompt(maze: Dict[str, Any]) -> str:
    s = maze["room_size"]
    passages = [f"{_xy(c['a'])}-{_xy(c['b'])}" for c in maze["connections"] if c["colour"] is None]
    doors = [f"{c['colour']} {_xy(c['a'])}-{_xy(c['b'])}" for c in maze["connections"] if c["colour"]]
    keys = [f"{k['colour']} at {_xy(k['cell'])}" for k in maze["keys"]]
    return (f"Maze of {maze['height']}x{maze['width']} cells (row, column), rows numbered top to bottom, columns "
            f"left to right, split into rooms of {s}x{s} cells. Inside a room you move freely; between rooms "
            f"only through these connections.\n"
            f"Passages: {', '.join(passages) or 'none'}\nLocked doors: {', '.join(doors) or 'none'}\n"
            f"Keys: {', '.join(keys) or 'none'}\nStart {_xy(maze['start'])}. Goal {_xy(maze['goal'])}.\n"
            "Actions: U (row - 1), D (row + 1), L (column - 1), R (column + 1) move one cell; P picks up the key in "
            "your cell (only with empty hands: one key at a time). Moving through a locked door needs a key of its "
            "colour; the door stays open and the key is used up.\n"
            "Find the fewest actions that reach the goal. Answer with the moves (U, D, L, R, P) separated by spaces "
            "on a line starting with 'Answer:'.")


def _words_phases(maze: Dict[str, Any], actions: Sequence[str]) -> List[str]:
    lines = []
    for i, ph in enumerate(phases(maze, actions), 1):
        what = {"key": f"get the {ph['colour']} key at {_xy(ph['target'])}",
                "door": f"go through the {ph['colour']} door into {_xy(ph['target'])}",
                "goal": f"go to the goal {_xy(ph['target'])}"}[ph["kind"]]
        steps = [_xy(value) if kind == "cell" else f"{kind} {value}" for kind, value in ph["items"]]
        lines.append(f"Phase {i}: {what}: {' '.join(steps) or 'already there'}.")
    return lines


# ---- the registered generator -------------------------------------------------------------------------------

SPEC_FIELDS = tuple(f.name for f in fields(MazeSpec))


@register_bench("keys_maze")
class KeysMaze(BenchGenerator):
    subsets = ("train", "test")

    def __init__(self, max_attempts: int = 2000, **options: Any):
        super().__init__(max_attempts=max_attempts, **options)
        unknown = sorted(set(options) - set(SPEC_FIELDS))
        if unknown:
            raise BenchError(f"keys_maze: unknown option(s) {unknown}; valid: {[*SPEC_FIELDS, 'max_attempts']}")
        if "rooms" in options:
            options["rooms"] = tuple(options["rooms"])
        self.spec = MazeSpec(**options).validate()
        self.max_attempts = int(max_attempts)

    def check_request(self, subset: str, op: int, length: int) -> None:
        super().check_request(subset, op, length)
        if length != 0:
            raise BenchError(f"keys_maze: length={length}; the task has no context padding (use lengths: ['0'])")
        if not 1 <= op <= self.spec.locked_doors:
            raise BenchError(f"keys_maze: op={op} doors opened is outside 1-{self.spec.locked_doors} "
                             f"(locked_doors={self.spec.locked_doors})")

    def generate(self, subset: str, op: int, length: int, rng: random.Random, count_tokens) -> Dict[str, Any]:
        self.check_request(subset, op, length)
        for _ in range(self.max_attempts):
            try:
                record = sample_maze(self.spec, op, rng)
                break
            except Unsatisfiable:
                continue
        else:
            raise BenchError(f"keys_maze: no maze with op={op} found in {self.max_attempts} attempts for spec "
                             f"{asdict(self.spec)}; raise locked_doors/rooms")
        n_tokens = count_tokens(record["prompt"]) if count_tokens else len(tokens(record)[0])
        record.update(length=length, n_tokens=n_tokens)
        return record

    def verify(self, record: Dict[str, Any]) -> None:
        rid, maze, actions = record.get("id", "?"), record["maze"], list(record["actions"])
        best = dijkstra_length(maze)
        if best != record["optimal_len"] or best != len(actions):
            raise BenchError(f"{rid}: Dijkstra finds optimal length {best}, the record says {record['optimal_len']} "
                             f"with {len(actions)} actions")
        rep = replay(maze, actions)
        if not (rep.feasible and rep.reached) or rep.doors_opened != record["op"]:
            raise BenchError(f"{rid}: replaying the reference gives feasible={rep.feasible} reached={rep.reached} "
                             f"doors_opened={rep.doors_opened} (op={record['op']}) {rep.error}")

    def grade(self, reply: str, record: Dict[str, Any]) -> bool:
        return is_success(record["maze"], parse_solution(reply), record["optimal_len"])

    def group_keys(self, record: Dict[str, Any]) -> List[str]:
        maze = record["maze"]
        return [f"doors={sum(1 for c in maze['connections'] if c['colour'])}", f"keys={len(maze['keys'])}"]
