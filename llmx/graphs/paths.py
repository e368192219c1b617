"""Shortest paths on small random graphs: the data of Spectral Journey (Cohen, Gromov, Yang, Tian, 2025,
arXiv 2502.08794, "Spectral Journey: How Transformers Predict the Shortest Path").

Only the paper's abstract is available (no code, no full text): the task is "decoder-only transformers
trained from scratch to predict shortest paths on simple, connected, undirected graphs" of up to 10 nodes.
Everything below is llmx's reconstruction; every choice is an argument of `GraphTask`.

Graphs. A graph of n nodes (n drawn per example from `nodes`) is sampled by `sampler`:
  gnp        G(n, p) with p ~ U(edge_prob), redrawn until connected (the default)
  tree_plus  a uniform random labelled tree (Pruefer sequence) plus every other pair with probability
             p ~ U(edge_prob): connected by construction, with longer paths at low p
Its nodes get n distinct labels drawn at random from the `node_tokens` label tokens, so a label says nothing
about a node's place in the graph. The query (source, target), by `query`:
  by_distance  a distance d uniform over 1..diameter, then a uniform pair at distance d (the default: with
               uniform pairs half the queries are a single edge, and paths of 4+ edges are under 5%)
  uniform      a uniform pair of distinct nodes

Ties. A pair can have several shortest paths. `target`:
  canonical  the training target is the lexicographically smallest shortest path (by label sequence)
  random     a shortest path drawn uniformly per example
and evaluation grades either "canonical" (the exact canonical path) or "any" (any shortest path); every
figure llmx reports names both.

Train/test split up to isomorphism. Each graph has an isomorphism invariant, the Weisfeiler-Lehman hash of
networkx (isomorphic graphs always share it); sha256(salt | hash) puts the whole isomorphism class in the
test split with probability `test_fraction`. No test graph is therefore isomorphic to a training graph,
whatever labels, edge order or query either carries. (Two non-isomorphic graphs that share a WL hash,
which happens for some regular graphs, just land in the same split.) Small sizes have few classes (3 nodes:
2, 4: 6, 5: 21, 6: 112), so a size can have no test class at all; `test_classes` counts them.

Token format (one example, one row; `encode`):
    <bos> u1 v1 u2 v2 ... um vm <q> s t <p> s x1 ... t <eos>
the edge list in random order, each edge in a random orientation, then the query and the path. The loss is
on the path tokens after <p> (the source included) and on <eos>. Labels are the tokens "0" ... "V-1".
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from llmx.utils import LlmxError

Edge = Tuple[int, int]
SPECIALS = ("<pad>", "<bos>", "<q>", "<p>", "<eos>")
SAMPLERS = ("gnp", "tree_plus")
QUERIES = ("by_distance", "uniform")
TARGETS = ("canonical", "random")
GRADINGS = ("canonical", "any")


@dataclass(frozen=True)
class GraphTask:
    nodes: Tuple[int, int] = (3, 10)  # inclusive range of graph sizes
    node_tokens: int = 10  # label tokens "0".."node_tokens-1"; must be >= nodes[1]
    sampler: str = "gnp"
    edge_prob: Tuple[float, float] = (0.25, 0.6)
    target: str = "canonical"
    query: str = "by_distance"
    test_fraction: float = 0.2
    split_salt: str = "llmx-graphs"

    def __post_init__(self):
        lo, hi = self.nodes
        if not 2 <= lo <= hi:
            raise LlmxError(f"graphs.nodes={list(self.nodes)}: need 2 <= min <= max")
        if hi > self.node_tokens:
            raise LlmxError(f"graphs.nodes={list(self.nodes)}: graphs of {hi} nodes need {hi} label tokens, but "
                            f"graphs.node_tokens={self.node_tokens} covers labels 0-{self.node_tokens - 1}; raise "
                            f"node_tokens to >= {hi} or lower the node range")
        if self.sampler not in SAMPLERS:
            raise LlmxError(f"graphs.sampler={self.sampler!r}; valid samplers: {list(SAMPLERS)}")
        if self.query not in QUERIES:
            raise LlmxError(f"graphs.query={self.query!r}; valid queries: {list(QUERIES)}")
        if self.target not in TARGETS:
            raise LlmxError(f"graphs.target={self.target!r}; valid targets: {list(TARGETS)}")
        p_lo, p_hi = self.edge_prob
        if not 0.0 < p_lo <= p_hi <= 1.0:
            raise LlmxError(f"graphs.edge_prob={list(self.edge_prob)}: need 0 < min <= max <= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise LlmxError(f"graphs.test_fraction={self.test_fraction}: must be in (0, 1) so both splits exist")

    @property
    def vocab(self) -> List[str]:
        return [str(i) for i in range(self.node_tokens)] + list(SPECIALS)

    @property
    def max_len(self) -> int:
        """Tokens of the longest possible example (a complete graph on nodes[1] nodes, a Hamiltonian path)."""
        n = self.nodes[1]
        return 1 + n * (n - 1) + 3 + 1 + n + 1


# ------------------------------------------------------------------------------------------ graphs


def _gnp(n: int, p: float, rng: random.Random) -> List[Edge]:
    while True:
        edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < p]
        if is_connected(n, edges):
            return edges


def _tree_plus(n: int, p: float, rng: random.Random) -> List[Edge]:
    edges = set(_pruefer_tree(n, rng))
    for u in range(n):
        for v in range(u + 1, n):
            if (u, v) not in edges and rng.random() < p:
                edges.add((u, v))
    return sorted(edges)


def _pruefer_tree(n: int, rng: random.Random) -> List[Edge]:
    if n == 2:
        return [(0, 1)]
    seq = [rng.randrange(n) for _ in range(n - 2)]
    degree = [1] * n
    for x in seq:
        degree[x] += 1
    edges = []
    for x in seq:
        leaf = min(i for i in range(n) if degree[i] == 1)
        edges.append((min(leaf, x), max(leaf, x)))
        degree[leaf] -= 1
        degree[x] -= 1
    u, v = [i for i in range(n) if degree[i] == 1]
    edges.append((u, v))
    return edges


def is_connected(n: int, edges: Sequence[Edge]) -> bool:
    return len(bfs_distances(n_adjacency(edges, n), 0)) == n


def n_adjacency(edges: Sequence[Edge], n: Optional[int] = None) -> Dict[int, List[int]]:
    adj: Dict[int, List[int]] = {i: [] for i in range(n)} if n is not None else {}
    for u, v in edges:
        adj.setdefault(u, []).append(v)
        adj.setdefault(v, []).append(u)
    return adj


def bfs_distances(adj: Dict[int, List[int]], source: int) -> Dict[int, int]:
    dist = {source: 0}
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            for v in adj[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        frontier = nxt
    return dist


def shortest_paths(edges: Sequence[Edge], source: int, target: int) -> List[List[int]]:
    """Every shortest path from source to target, in lexicographic order of their label sequences."""
    adj = n_adjacency(edges)
    to_target = bfs_distances(adj, target)
    if source not in to_target:
        return []
    paths: List[List[int]] = []

    def walk(path: List[int]) -> None:
        u = path[-1]
        if u == target:
            paths.append(list(path))
            return
        for v in sorted(adj[u]):
            if to_target.get(v) == to_target[u] - 1:
                path.append(v)
                walk(path)
                path.pop()

    walk([source])
    return paths


def is_shortest_path(edges: Sequence[Edge], source: int, target: int, path: Sequence[int]) -> bool:
    """The path exists in the graph, joins source to target without repeating a node, and is minimal."""
    adj = n_adjacency(edges)
    if not path or path[0] != source or path[-1] != target or source not in adj or target not in adj:
        return False
    if len(set(path)) != len(path) or any(v not in adj[u] for u, v in zip(path, path[1:])):
        return False
    return len(path) - 1 == bfs_distances(adj, source).get(target, -1)


def iso_key(n: int, edges: Sequence[Edge]) -> str:
    """An isomorphism invariant: networkx's Weisfeiler-Lehman hash (n rounds: enough to separate the graphs
    WL can separate at this size)."""
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    with warnings.catch_warnings():  # networkx 3.5+ warns on every call that its hashes changed in 3.5
        warnings.simplefilter("ignore", UserWarning)
        return f"{n}:{len(edges)}:" + nx.weisfeiler_lehman_graph_hash(g, iterations=n)


def split_of(key: str, test_fraction: float, salt: str) -> str:
    digest = hashlib.sha256(f"{salt}|{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "little") / 2**64 < test_fraction else "train"


# ------------------------------------------------------------------------------------------ examples


def sample_example(task: GraphTask, n: int, split: str, rng: random.Random, max_attempts: int = 2000) -> Dict:
    """One example of `split` with n nodes: a labelled graph, a query, its path and facts for grading."""
    if split not in ("train", "test"):
        raise LlmxError(f"split={split!r}; valid splits: ['train', 'test']")
    for _ in range(max_attempts):
        p = rng.uniform(*task.edge_prob)
        raw = _gnp(n, p, rng) if task.sampler == "gnp" else _tree_plus(n, p, rng)
        key = iso_key(n, raw)
        if split_of(key, task.test_fraction, task.split_salt) == split:
            break
    else:
        raise LlmxError(f"no {split} graph of {n} nodes in {max_attempts} draws: the isomorphism split with "
                        f"test_fraction={task.test_fraction} leaves this size (almost) no {split} classes; "
                        f"drop {n} from the {split} sizes or change graphs.split_salt / test_fraction")
    labels = rng.sample(range(task.node_tokens), n)
    edges = [(labels[u], labels[v]) if rng.random() < 0.5 else (labels[v], labels[u]) for u, v in raw]
    rng.shuffle(edges)
    source, target = _query(task, labels, edges, rng)
    paths = shortest_paths(edges, source, target)
    path = paths[0] if task.target == "canonical" else rng.choice(paths)
    return {"n": n, "edges": [list(e) for e in edges], "source": source, "target": target, "path": path,
            "canonical": paths[0], "n_paths": len(paths), "distance": len(path) - 1, "iso": key}


def _query(task: GraphTask, labels: List[int], edges: List[Edge], rng: random.Random) -> Tuple[int, int]:
    if task.query == "uniform":
        s, t = rng.sample(labels, 2)
        return s, t
    adj = n_adjacency(edges)
    by_d: Dict[int, List[Tuple[int, int]]] = {}
    for s in sorted(labels):
        for t, d in bfs_distances(adj, s).items():
            if d > 0:
                by_d.setdefault(d, []).append((s, t))
    return rng.choice(by_d[rng.choice(sorted(by_d))])


def query_key(example: Dict) -> str:
    """Invariant of (graph, source, target) up to relabelling: WL hash with the two query nodes marked."""
    import networkx as nx

    g = nx.Graph()
    g.add_edges_from(map(tuple, example["edges"]))
    role = {v: "x" for v in g.nodes}
    role[example["source"]], role[example["target"]] = "s", "t"
    nx.set_node_attributes(g, role, "role")
    return nx.weisfeiler_lehman_graph_hash(g, node_attr="role", iterations=example["n"])


def dedup_by_isomorphism(examples: Sequence[Dict]) -> List[Dict]:
    """Keep the first example of each (graph, query) class up to relabelling (`query_key`)."""
    seen, out = set(), []
    for ex in examples:
        k = query_key(ex)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out


def check_disjoint(train: Sequence[Dict], test: Sequence[Dict]) -> None:
    """Raise when a test graph is isomorphic to a training graph, checked exactly (networkx VF2) against one
    representative of each training class in the test graph's bucket of invariants (size, edge count,
    degree sequence, WL hash: isomorphic graphs share them all)."""
    import networkx as nx

    reps: Dict[tuple, List] = {}
    for ex in train:
        g, key = _graph(ex), _bucket(ex)
        if not any(nx.is_isomorphic(g, h) for h in reps.get(key, [])):
            reps.setdefault(key, []).append(g)
    overlaps = [ex for ex in test if any(nx.is_isomorphic(_graph(ex), h) for h in reps.get(_bucket(ex), []))]
    if overlaps:
        ex = overlaps[0]
        raise LlmxError(f"the test set overlaps the training set: {len(overlaps)} of {len(test)} test graphs are "
                        f"isomorphic to a training graph (e.g. n={ex['n']}, edges={ex['edges']}); use a test set "
                        f"built with the same graphs.split_salt and test_fraction as training, or another salt for "
                        f"both")


def _graph(ex: Dict):
    import networkx as nx

    g = nx.Graph()
    g.add_edges_from(map(tuple, ex["edges"]))
    return g


def _bucket(ex: Dict) -> tuple:
    deg: Dict[int, int] = {}
    for u, v in ex["edges"]:
        deg[u] = deg.get(u, 0) + 1
        deg[v] = deg.get(v, 0) + 1
    return ex["n"], len(ex["edges"]), tuple(sorted(deg.values())), iso_key(ex["n"], _relabel(ex))


def _relabel(ex: Dict) -> List[Edge]:
    index = {v: i for i, v in enumerate(sorted({x for e in ex["edges"] for x in e}))}
    return [(index[u], index[v]) for u, v in ex["edges"]]


# ------------------------------------------------------------------------------------------ tokens


def prompt_tokens(example: Dict) -> List[str]:
    toks = ["<bos>"]
    for u, v in example["edges"]:
        toks += [str(u), str(v)]
    return toks + ["<q>", str(example["source"]), str(example["target"]), "<p>"]


def encode(example: Dict, task: GraphTask) -> Tuple[List[int], List[int]]:
    """Token ids of the prompt and of the target (the path and <eos>)."""
    index = {t: i for i, t in enumerate(task.vocab)}
    prompt = [index[t] for t in prompt_tokens(example)]
    return prompt, [index[str(v)] for v in example["path"]] + [index["<eos>"]]


def decode_path(ids: Sequence[int], task: GraphTask) -> List[int]:
    """Node labels up to the first special token (<eos> or anything else that is not a label)."""
    out = []
    for i in ids:
        if i >= task.node_tokens:
            break
        out.append(int(i))
    return out


def grade(example: Dict, path: Sequence[int], grading: str = "any") -> bool:
    if grading == "canonical":
        return list(path) == list(example["canonical"])
    if grading == "any":
        return is_shortest_path([tuple(e) for e in example["edges"]], example["source"], example["target"], path)
    raise LlmxError(f"grading={grading!r}; valid gradings: {list(GRADINGS)}")


def step_correct(example: Dict, prefix: Sequence[int], nxt: int, grading: str = "any") -> bool:
    """Is `nxt` a correct next node after the (correct) `prefix` of the path? "any": a neighbour one step
    closer to the target; "canonical": the canonical path's next node."""
    if grading == "canonical":
        return nxt == example["canonical"][len(prefix)]
    adj = n_adjacency([tuple(e) for e in example["edges"]])
    if nxt not in adj.get(prefix[-1], []):
        return False
    to_target = bfs_distances(adj, example["target"])
    return to_target[nxt] == to_target[prefix[-1]] - 1


def make_split(task: GraphTask, split: str, per_size: int, seed: int, sizes: Optional[Sequence[int]] = None,
               dedup: bool = False, start: int = 0) -> List[Dict]:
    """`per_size` examples of each size, example i from its own RNG (seed, split, n, start + i): a bigger set
    is a superset of a smaller one, and sets with disjoint index ranges share no draw. With dedup, isomorphic
    repeats of a (graph, query) are dropped (fewer remain)."""
    out = []
    for n in sizes or range(task.nodes[0], task.nodes[1] + 1):
        for i in range(start, start + per_size):
            out.append(sample_example(task, n, split, example_rng(seed, split, n, i)))
    return dedup_by_isomorphism(out) if dedup else out


def example_rng(seed: int, split: str, n: int, index: int) -> random.Random:
    """The RNG of the `shortest_path` benchmark generator's problem (split, op=n, index): the recipe's sets
    and `generate_bench`'s are the same problems."""
    from llmx.bench.base import problem_rng

    return problem_rng(seed, "shortest_path", split, 0, n, index)


def hf_tokenizer(task: GraphTask):
    """A transformers tokenizer of the task's vocabulary (whitespace-separated tokens, ids as `encode`'s), so a
    trained model exports and reloads as a plain Hugging Face model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(task.vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>")
