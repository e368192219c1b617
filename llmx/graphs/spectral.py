"""Line-graph spectral analysis for the shortest-path task: embeddings, an SLN-style navigator and an RSA probe.

Reconstruction of the analysis in Cohen, Gromov, Yang and Tian, "Spectral Journey: How Transformers Predict
the Shortest Path" (arXiv 2502.08794). Only the abstract is known: 2-layer decoder-only models trained on
shortest paths in small connected undirected graphs learn edge embeddings correlated with the spectral
decomposition of the graph's LINE GRAPH, and the "Spectral Line Navigator" (SLN) finds shortest paths by
greedily choosing nodes in that spectral space. Everything below is therefore "SLN-style": each choice the
abstract leaves open is a documented function argument, not a claim about the paper.

Graphs are `edges`, a sequence of (u, v) int pairs (arbitrary labels, undirected, no self loops, no
duplicates, connected). The order of `edges` is the row order of every per-edge array, i.e. the edge order of
the model's input sequence, so model hidden states of the edges line up with the embedding rows.

Reconstruction choices:

* Line graph: one vertex per edge, two adjacent iff the edges share an endpoint (`line_graph_adjacency`).
* Laplacian (`kind`): "combinatorial" D - A (default) or "normalized" I - D^-1/2 A D^-1/2. An isolated
  vertex (only the line graph of a one-edge graph has one) gets an all-zero row, as in networkx.
* Eigenvectors: `np.linalg.eigh`, ascending eigenvalues, i.e. low frequencies first (Laplacian eigenmaps).
  The first eigenvector (eigenvalue 0: constant for "combinatorial", proportional to sqrt(degree) for
  "normalized") carries no position information and is skipped by default. When fewer than k eigenvectors
  exist the embedding is padded with zero columns, so its shape is always [m, k]; zero columns change no
  distance. Each column's sign is flipped so that its largest-|.| entry is positive, only for
  reproducibility: inside a repeated eigenvalue the basis is still arbitrary, which is why the probe is
  rotation-invariant (RSA) and the navigator uses distances only.
* Scaling (`scale`): "none" (default) uses the orthonormal eigenvectors as they are. Beware that with ALL
  non-trivial eigenvectors and scale "none" the embedding is degenerate: the rows of an orthogonal matrix
  are orthonormal, so for the combinatorial Laplacian every pair of distinct edges is at distance sqrt(2)
  (for the normalized one the distances depend on degrees only). "resistance" divides each eigenvector by
  sqrt(eigenvalue), so that with all of them the squared distance between two edges is their effective
  resistance in the line graph (commute-time embedding); with few of them it is the usual low-pass
  truncation. Full-spectrum SLN is only meaningful with "resistance", which is therefore `sln_path`'s
  default, while `spectral_embedding` and `probe_scores` default to the plain eigenvectors ("none"). On
  200 random connected 5-10 node graphs (one query each at BFS distance >= 2; four draws) full-spectrum
  SLN finds a shortest path 95-100% of the time with "resistance" but only 53-66% with "none", against
  57-62% for a random self-avoiding walk; with k = 2 or 4 both scalings reach 84-100%.
* SLN-style greedy rule (`sln_path`): the target set T is the set of edges incident to the target node. From
  the current node u, each edge e = (u, v) to an unvisited v is a candidate; an edge to the target is taken
  at once; otherwise the v whose edge e is closest to T in the embedding wins, with rule "nearest" (min over
  t in T of ||x_e - x_t||) or "mean" (||x_e - mean_T x_t||). Ties (within `TIE_ATOL`, so that symmetric
  graphs tie exactly despite round-off) go to the smaller node label. The walk never revisits a node; when
  it is stuck or exceeds max_steps it returns its partial path, which `is_shortest_path` grades invalid.
* Probe: representation similarity analysis per graph (`rsa_score`): Spearman rank correlation between the
  condensed pairwise Euclidean distance matrices of the model's edge representations and of the embedding.
  Distances make it invariant to eigenvector signs and to rotations inside the kept subspace (degenerate
  eigenvalues), and ranks make it invariant to any monotone rescaling, so it only asks whether the model's
  geometry orders edge pairs like the spectral geometry does. There is deliberately no linear probe: a
  per-graph regression of m <= 45 rows from d = 64..128 features overfits, and eigenvector signs and bases
  are arbitrary across graphs, so a cross-graph regression target is ill-defined.
* Controls (`probe_scores`): "random_subspace" replaces the spectral embedding by k random orthonormal
  directions orthogonal to the all-ones vector (same dimension, no graph information); "adjacency" compares
  the representations with the hop distances of the line graph directly, to see whether the spectrum
  explains more than plain adjacency.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.spatial.distance import pdist, squareform
from scipy.stats import spearmanr

from llmx.graphs.paths import bfs_distances, is_shortest_path, n_adjacency

__all__ = ["is_shortest_path", "line_graph_adjacency", "laplacian", "spectral_embedding", "line_graph_distances",
           "shortest_path_length", "sln_path", "random_walk_path", "sln_agreement", "rsa_score",
           "rsa_against_distances", "random_subspace", "probe_scores"]

KINDS = ("combinatorial", "normalized")
SCALES = ("none", "resistance")
RULES = ("nearest", "mean")
CONTROLS = ("none", "random_subspace", "adjacency")
# Greedy scores closer than this are ties: mirror-symmetric edges get equal distances up to round-off only.
TIE_ATOL = 1e-9
# Eigenvalues below this are treated as zero (the trivial one, or all of them for a one-edge graph).
ZERO_EIG = 1e-9

Edge = Tuple[int, int]


def _check_choice(name: str, value, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _as_edges(edges: Iterable[Sequence[int]]) -> List[Edge]:
    out = [(int(u), int(v)) for u, v in edges]
    if not out:
        raise ValueError("the graph has no edges")
    seen = set()
    for u, v in out:
        if u == v:
            raise ValueError(f"self loop ({u}, {v})")
        key = frozenset((u, v))
        if key in seen:
            raise ValueError(f"duplicate edge ({u}, {v})")
        seen.add(key)
    return out


# ---------------------------------------------------------------------------------------------------------
# Line graph and its spectrum


def line_graph_adjacency(edges) -> np.ndarray:
    """[m, m] float64 adjacency of the line graph: A[i, j] = 1 iff edges i and j (i != j) share an endpoint."""
    edges = _as_edges(edges)
    ends = np.array(edges)
    # Edge i and j share an endpoint iff any of the four endpoint pairs match.
    share = (ends[:, None, :, None] == ends[None, :, None, :]).any(axis=(2, 3))
    np.fill_diagonal(share, False)
    return share.astype(np.float64)


def laplacian(adjacency, kind: str = "combinatorial") -> np.ndarray:
    """Laplacian of a symmetric adjacency: "combinatorial" D - A or "normalized" I - D^-1/2 A D^-1/2."""
    _check_choice("kind", kind, KINDS)
    adj = np.asarray(adjacency, dtype=np.float64)
    deg = adj.sum(axis=1)
    comb = np.diag(deg) - adj
    if kind == "combinatorial":
        return comb
    # D^-1/2 (D - A) D^-1/2 rather than I - ...: an isolated vertex then gets a zero row, not a 1 on the diagonal.
    inv_sqrt = np.zeros_like(deg)
    inv_sqrt[deg > 0] = 1.0 / np.sqrt(deg[deg > 0])
    return inv_sqrt[:, None] * comb * inv_sqrt[None, :]


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    if vectors.shape[1] == 0:
        return vectors
    rows = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[rows, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def spectral_embedding(edges, k: Optional[int], kind: str = "combinatorial", skip_trivial: bool = True,
                       scale: str = "none") -> np.ndarray:
    """[m, k] line-graph Laplacian eigenvectors (ascending eigenvalues), one row per edge in `edges` order.

    k=None keeps all available eigenvectors (m - 1 with skip_trivial). Missing columns (k larger than what
    is available) are zeros. See the module docstring for the sign convention and `scale`.
    """
    _check_choice("kind", kind, KINDS)
    _check_choice("scale", scale, SCALES)
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    lap = laplacian(line_graph_adjacency(edges), kind)
    values, vectors = np.linalg.eigh(lap)
    start = 1 if skip_trivial else 0
    values, vectors = values[start:], _fix_signs(vectors[:, start:])
    if scale == "resistance":
        # Pseudo-inverse square root: a zero eigenvalue (kept trivial one, one-edge graph) gets weight 0.
        weights = np.zeros_like(values)
        weights[values > ZERO_EIG] = 1.0 / np.sqrt(values[values > ZERO_EIG])
        vectors = vectors * weights
    if k is None:
        return vectors
    out = np.zeros((lap.shape[0], k))
    keep = min(k, vectors.shape[1])
    out[:, :keep] = vectors[:, :keep]
    return out


def line_graph_distances(edges) -> np.ndarray:
    """[m, m] hop distances between edges in the line graph (BFS; the line graph of a connected graph is connected)."""
    adj = line_graph_adjacency(edges)
    m = adj.shape[0]
    nbrs = {i: list(np.flatnonzero(adj[i])) for i in range(m)}
    dist = np.zeros((m, m))
    for i in range(m):
        hops = bfs_distances(nbrs, i)
        if len(hops) < m:
            raise ValueError("the line graph is disconnected (is the graph connected?)")
        for j, d in hops.items():
            dist[i, j] = d
    return dist


# ---------------------------------------------------------------------------------------------------------
# Paths


def shortest_path_length(edges, source: int, target: int) -> int:
    """Number of edges on a shortest source-target path (BFS)."""
    nbrs = n_adjacency(_as_edges(edges))
    for node in (source, target):
        if node not in nbrs:
            raise ValueError(f"node {node} is not in the graph")
    dist = bfs_distances(nbrs, source)
    if target not in dist:
        raise ValueError(f"{target} is unreachable from {source}")
    return dist[target]


def _distance_to_targets(x_e: np.ndarray, targets: np.ndarray, rule: str) -> float:
    if rule == "nearest":
        return float(np.linalg.norm(targets - x_e, axis=1).min())
    return float(np.linalg.norm(x_e - targets.mean(axis=0)))


def sln_path(edges, source: int, target: int, k: Optional[int] = None, kind: str = "combinatorial",
             rule: str = "nearest", max_steps: Optional[int] = None, scale: str = "resistance") -> List[int]:
    """SLN-style greedy navigation in the line-graph spectral embedding (module docstring has the rule).

    Returns the visited nodes from `source`; it ends at `target` on success, otherwise it is the partial path
    where the walk got stuck (no unvisited neighbour) or ran out of `max_steps` (default: number of nodes).
    k=None uses all non-trivial eigenvectors; scale defaults to "resistance" because the unscaled full
    spectrum puts all edges at equal distance (module docstring).
    """
    _check_choice("rule", rule, RULES)
    edges = _as_edges(edges)
    if source == target:
        raise ValueError(f"source and target are both {source}")
    nbrs = n_adjacency(edges)
    for node in (source, target):
        if node not in nbrs:
            raise ValueError(f"node {node} is not in the graph")
    emb = spectral_embedding(edges, k, kind, scale=scale)
    row = {frozenset(e): i for i, e in enumerate(edges)}
    targets = emb[[row[frozenset((target, v))] for v in nbrs[target]]]
    max_steps = len(nbrs) if max_steps is None else max_steps

    path = [source]
    while path[-1] != target and len(path) - 1 < max_steps:
        u = path[-1]
        options = sorted(v for v in nbrs[u] if v not in path)
        if not options:
            break
        if target in options:
            path.append(target)
            continue
        scores = [_distance_to_targets(emb[row[frozenset((u, v))]], targets, rule) for v in options]
        best = min(scores)
        # `options` is sorted, so the first score within the tolerance is the smallest tied label.
        path.append(next(v for v, s in zip(options, scores) if s <= best + TIE_ATOL))
    return path


def random_walk_path(edges, source: int, target: int, rng: np.random.Generator,
                     max_steps: Optional[int] = None) -> List[int]:
    """Baseline for SLN: the same self-avoiding walk, choosing a uniformly random unvisited neighbour
    (an edge to the target is still taken at once, as in `sln_path`)."""
    edges = _as_edges(edges)
    if source == target:
        raise ValueError(f"source and target are both {source}")
    nbrs = n_adjacency(edges)
    max_steps = len(nbrs) if max_steps is None else max_steps
    path = [source]
    while path[-1] != target and len(path) - 1 < max_steps:
        options = sorted(v for v in nbrs[path[-1]] if v not in path)
        if not options:
            break
        path.append(target if target in options else options[int(rng.integers(len(options)))])
    return path


def sln_agreement(model_paths, sln_paths) -> Dict[str, float]:
    """Step-by-step agreement of two lists of paths (same queries, same order).

    Per pair, steps i = 1, 2, ... are compared while the prefixes path[:i] agree: step i agrees when both
    choose the same path[i]; the first disagreement (including one path ending while the other goes on)
    is counted and ends the comparison. Paths with different first nodes contribute no step.
    step_agreement = agreeing / compared steps over all pairs (nan when none); full_path_agreement = share
    of identical pairs.
    """
    model_paths, sln_paths = list(model_paths), list(sln_paths)
    if len(model_paths) != len(sln_paths):
        raise ValueError(f"{len(model_paths)} model paths but {len(sln_paths)} SLN paths")
    agree = compared = identical = 0
    for a, b in zip(model_paths, sln_paths):
        a, b = [int(x) for x in a], [int(x) for x in b]
        identical += a == b
        if not a or not b or a[0] != b[0]:
            continue
        for i in range(1, max(len(a), len(b))):
            compared += 1
            if i < len(a) and i < len(b) and a[i] == b[i]:
                agree += 1
            else:
                break
    return {"step_agreement": agree / compared if compared else float("nan"), "n_steps": compared,
            "full_path_agreement": identical / len(model_paths) if model_paths else float("nan")}


# ---------------------------------------------------------------------------------------------------------
# Probe


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def rsa_score(reps, embedding, metric: str = "euclidean") -> float:
    """Spearman correlation of the pairwise distances of `reps` [m, d] and `embedding` [m, k]; nan if m < 3
    or either set of distances is constant."""
    reps, embedding = np.asarray(reps, dtype=np.float64), np.asarray(embedding, dtype=np.float64)
    if reps.shape[0] != embedding.shape[0]:
        raise ValueError(f"{reps.shape[0]} representations but {embedding.shape[0]} embedding rows")
    if reps.shape[0] < 3:
        return float("nan")
    return _spearman(pdist(reps, metric), pdist(embedding, metric))


def rsa_against_distances(reps, dist_matrix, metric: str = "euclidean") -> float:
    """Like `rsa_score`, against a precomputed symmetric [m, m] distance matrix (e.g. `line_graph_distances`)."""
    reps, dist = np.asarray(reps, dtype=np.float64), np.asarray(dist_matrix, dtype=np.float64)
    if dist.shape != (reps.shape[0], reps.shape[0]):
        raise ValueError(f"distance matrix {dist.shape} does not match {reps.shape[0]} representations")
    if reps.shape[0] < 3:
        return float("nan")
    return _spearman(pdist(reps, metric), squareform(dist, checks=False))


def random_subspace(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[m, k]: min(k, m - 1) random orthonormal columns orthogonal to the all-ones vector, zero-padded to k
    like `spectral_embedding` (the non-trivial Laplacian eigenvectors live in the same complement)."""
    keep = min(k, m - 1)
    gauss = rng.standard_normal((m, keep))
    gauss -= gauss.mean(axis=0)  # project out the all-ones direction
    out = np.zeros((m, k))
    if keep > 0:
        out[:, :keep] = np.linalg.qr(gauss)[0]
    return out


def probe_scores(per_graph, k: Optional[int], kind: str = "combinatorial", control: str = "none",
                 rng: Optional[np.random.Generator] = None, scale: str = "none") -> Dict[str, float]:
    """Mean and standard error over graphs of the RSA between model edge representations and a target geometry.

    per_graph: list of (edges, reps) with reps [m, d] in `edges` order. control "none": the spectral
    embedding (k, kind, scale); "random_subspace": `random_subspace` of the same size (rng defaults to
    np.random.default_rng(0), for reproducibility); "adjacency": line-graph hop distances. Graphs whose
    score is nan (m < 3, constant distances) are skipped; n counts the rest.
    """
    _check_choice("control", control, CONTROLS)
    _check_choice("kind", kind, KINDS)
    rng = np.random.default_rng(0) if rng is None else rng
    scores = []
    for edges, reps in per_graph:
        m = len(edges)
        if control == "adjacency":
            score = rsa_against_distances(reps, line_graph_distances(edges))
        elif control == "random_subspace":
            score = rsa_score(reps, random_subspace(m, m - 1 if k is None else k, rng))
        else:
            score = rsa_score(reps, spectral_embedding(edges, k, kind, scale=scale))
        if not np.isnan(score):
            scores.append(score)
    n = len(scores)
    mean = float(np.mean(scores)) if n else float("nan")
    sem = float(np.std(scores, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "sem": sem, "n": n}
