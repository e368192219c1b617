"""Near-duplicate removal for NaturalReasoning's synthesized questions (Yuan et al., 2025, arXiv 2502.13124).

The paper deduplicates its backtranslated questions before decontamination; secondary accounts give the method
as locality-sensitive MinHash at the word level with similarity threshold 0.55, "to filter out closely related
variations". We use datasketch's MinHash and MinHashLSH rather than hashing of our own.

What counts as the same question:
  * Text is normalised (lowercase, punctuation replaced by spaces, whitespace collapsed) and cut into word
    shingles: runs of `shingle` consecutive words. The similarity is the Jaccard index of two shingle sets.
  * Default shingle=3. The paper's questions are about 55 words long (mean). At Jaccard 0.55 two texts of L
    words that differ in k scattered words need roughly n*k <= 0.29*L, so for L=55: unigrams would call texts
    with 16 different words duplicates (and ignore word order entirely, so two different questions that share
    a vocabulary collide), 5-grams only those with about 3 edits (near-verbatim copies), 3-grams those with
    about 5 edits: a reworded or renumbered variant of the same question, which is what the paper removes.
  * A text shorter than `shingle` words is one shingle of all its words, so short texts still compare; a text
    with no words has an empty set, and empty texts are duplicates of each other (as exact_duplicates says).

How a pass decides (deterministic and order-defined): items are visited in input order; each is compared with
the items kept so far, and is removed if one of them has an estimated Jaccard >= threshold; otherwise it is
kept and indexed. So the first occurrence wins, and a removed item never removes a later one (in a chain
A~B~C with A and C dissimilar, A and C are both kept). The LSH index only proposes candidates: its banding
has false positives (and misses some pairs near the threshold, fewer with LSH_WEIGHTS), so every candidate is
checked with the MinHash estimate (the share of equal signature slots, as MinHash.jaccard computes it), and the
removed item names the kept item it is most similar to (ties: the earliest).

Memory: datasketch's in-memory LSH keeps a set per bucket, about 10 KB per kept item at 28 bands (1.0 GB peak
at 100k documents, scripts/bench_dedup.py): millions of items need sharded sketching and a machine sized for
the global pass.

Sharded runs: the signatures are the expensive part and depend on nothing but the text and (num_perm, shingle,
seed), so shards compute them independently (`sketch`, each item with a stable, unique, sortable id), and one
global pass runs over the union in id order (`merge_sketches` then `dedup_sketches`). That gives exactly the
result of one unsharded pass over the items sorted by id. Deduplicating inside each shard first and then across
shard survivors would not: a chain split across shards can keep different items.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional, Sequence, Set

import numpy as np

from llmx.utils import LlmxError

DEFAULT_THRESHOLD = 0.55  # the paper's near-duplicate similarity threshold
DEFAULT_SHINGLE = 3
DEFAULT_NUM_PERM = 128
DEFAULT_SEED = 1
# datasketch picks LSH bands by minimising weighted false-positive and false-negative areas under its S-curve.
# Even weights (its default) give, at num_perm=128 and 0.55, 21 bands of 6 rows: a pair at Jaccard 0.6 becomes
# a candidate only 63% of the time. Candidates are verified anyway, so a false positive costs one comparison
# while a false negative keeps a duplicate: weighting misses 9:1 gives 28 bands of 4 rows, 98% at 0.6.
LSH_WEIGHTS = (0.1, 0.9)

_PUNCT = re.compile(r"[^\w\s]+")


def normalize(text: str) -> str:
    """Lowercase, punctuation replaced by spaces (so "end.Next" stays two words), whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def words(text: str) -> List[str]:
    return normalize(text).split()


def word_ngrams(tokens: Sequence[str], n: int) -> List[str]:
    """Runs of n consecutive words, in order; fewer than n words give one run of all of them, none give none."""
    if not tokens:
        return []
    if len(tokens) <= n:
        return [" ".join(tokens)]
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def shingles(text: str, n: int = DEFAULT_SHINGLE) -> Set[str]:
    return set(word_ngrams(words(text), n))


@dataclass
class Duplicate:
    item: int  # position of the removed item
    of: int  # position of the kept item it duplicates
    jaccard: float  # estimated (near_duplicates) or 1.0 (exact_duplicates)


@dataclass
class DedupResult:
    kept: List[int]
    removed: List[Duplicate]
    n_input: int
    method: str
    params: Dict[str, Any] = field(default_factory=dict)
    ids: Optional[List[Hashable]] = None  # item ids when the pass ran over sketches; positions index into it

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    @property
    def n_removed(self) -> int:
        return len(self.removed)

    def kept_ids(self) -> List[Hashable]:
        return [self.ids[i] for i in self.kept] if self.ids is not None else list(self.kept)

    def report(self, examples: int = 20) -> Dict[str, Any]:
        """Counts, parameters and the first `examples` removals, JSON-ready."""
        name = (lambda i: self.ids[i]) if self.ids is not None else (lambda i: i)
        return {
            "stage": "dedup",
            "method": self.method,
            **self.params,
            "input": self.n_input,
            "kept": self.n_kept,
            "removed": self.n_removed,
            "removed_fraction": round(self.n_removed / self.n_input, 6) if self.n_input else 0.0,
            "examples": [{"item": name(d.item), "duplicate_of": name(d.of), "jaccard": d.jaccard}
                         for d in self.removed[:examples]],
        }


@dataclass
class Sketches:
    """MinHash signatures of items (one uint32 row each) with their ids and the settings that made them."""
    ids: List[Hashable]
    values: np.ndarray  # (items, num_perm) uint32, datasketch's affine32 scheme
    num_perm: int
    shingle: int
    seed: int

    def __len__(self) -> int:
        return len(self.ids)


def _check_texts(texts: Sequence[str]) -> List[str]:
    if isinstance(texts, (str, bytes)):
        raise LlmxError("dedup expects a list of texts, got a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise LlmxError(f"dedup: item {i} is a {type(t).__name__}, not a str")
    return texts


def _check_params(threshold: Any = DEFAULT_THRESHOLD, num_perm: Any = DEFAULT_NUM_PERM,
                  shingle: Any = DEFAULT_SHINGLE) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise LlmxError(f"dedup threshold={threshold!r}: must be a Jaccard similarity in (0, 1], "
                        f"the paper's is {DEFAULT_THRESHOLD}")
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 2:
        raise LlmxError(f"dedup num_perm={num_perm!r}: must be an int >= 2 (LSH needs two bands), "
                        f"default {DEFAULT_NUM_PERM}")
    if isinstance(shingle, bool) or not isinstance(shingle, int) or shingle < 1:
        raise LlmxError(f"dedup shingle={shingle!r}: must be an int >= 1 (words per shingle), "
                        f"default {DEFAULT_SHINGLE}")


def sketch(texts: Sequence[str], ids: Optional[Sequence[Hashable]] = None, *, num_perm: int = DEFAULT_NUM_PERM,
           shingle: int = DEFAULT_SHINGLE, seed: int = DEFAULT_SEED) -> Sketches:
    """MinHash signatures of `texts` (ids default to positions). Each shard of a sharded run calls this."""
    from datasketch import MinHash

    texts = _check_texts(texts)
    _check_params(num_perm=num_perm, shingle=shingle)
    ids = list(range(len(texts))) if ids is None else list(ids)
    if len(ids) != len(texts):
        raise LlmxError(f"dedup: {len(ids)} ids for {len(texts)} texts; give one id per text")
    values = np.empty((len(texts), num_perm), dtype=np.uint32)
    # MinHash.generator builds the permutations once and copies them for every text (MinHash(...) per text
    # redraws them: several times slower at this size); update_batch hashes a text's shingles in one numpy step.
    batches = ([s.encode() for s in shingles(t, shingle)] for t in texts)
    for row, m in enumerate(MinHash.generator(batches, num_perm=num_perm, seed=seed, scheme="affine32")):
        values[row] = m.hashvalues
    return Sketches(ids, values, num_perm, shingle, seed)


def merge_sketches(parts: Sequence[Sketches]) -> Sketches:
    """The union of shards' sketches in id order (ids must be unique and comparable; settings must agree)."""
    if not parts:
        raise LlmxError("merge_sketches: no sketches given")
    first = parts[0]
    for p in parts[1:]:
        if (p.num_perm, p.shingle, p.seed) != (first.num_perm, first.shingle, first.seed):
            raise LlmxError(f"merge_sketches: shards made with different settings (num_perm, shingle, seed): "
                            f"{(first.num_perm, first.shingle, first.seed)} and {(p.num_perm, p.shingle, p.seed)}")
    ids = [i for p in parts for i in p.ids]
    if len(set(ids)) != len(ids):
        seen: Set[Hashable] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise LlmxError(f"merge_sketches: id {dup!r} occurs in more than one item; ids must be unique")
    try:
        order = sorted(range(len(ids)), key=ids.__getitem__)
    except TypeError as e:
        raise LlmxError(f"merge_sketches: ids must be mutually comparable to define the order ({e})") from None
    values = np.concatenate([p.values for p in parts])[order]
    return Sketches([ids[i] for i in order], values, first.num_perm, first.shingle, first.seed)


def _lsh(threshold: float, num_perm: int):
    from datasketch import MinHashLSH

    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError:
        # At thresholds near 1 datasketch's optimiser picks a single band; two bands lose nothing there,
        # since every candidate is verified and identical signatures collide in every band.
        return MinHashLSH(num_perm=num_perm, params=(2, num_perm // 2))


def dedup_sketches(sketches: Sketches, threshold: float = DEFAULT_THRESHOLD) -> DedupResult:
    """The global pass (module docstring) over sketches in their order; positions index `sketches.ids`."""
    from datasketch import LeanMinHash

    _check_params(threshold, sketches.num_perm, sketches.shingle)
    values = sketches.values
    lsh = _lsh(threshold, sketches.num_perm)
    kept: List[int] = []
    removed: List[Duplicate] = []
    for i in range(len(sketches)):
        m = LeanMinHash(seed=sketches.seed, hashvalues=values[i], scheme="affine32")
        candidates = np.array(sorted(lsh.query(m)), dtype=np.int64)
        if len(candidates):
            estimates = (values[candidates] == values[i]).mean(axis=1)
            best = int(np.argmax(estimates))  # the first maximum: the earliest kept item among ties
            if estimates[best] >= threshold:
                removed.append(Duplicate(i, int(candidates[best]), float(estimates[best])))
                continue
        lsh.insert(i, m, check_duplication=False)
        kept.append(i)
    params = {"threshold": threshold, "num_perm": sketches.num_perm, "shingle": sketches.shingle,
              "seed": sketches.seed, "lsh_bands": lsh.b, "lsh_rows": lsh.r}
    return DedupResult(kept, removed, len(sketches), "minhash_lsh", params, ids=list(sketches.ids))


def near_duplicates(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD, num_perm: int = DEFAULT_NUM_PERM,
                    shingle: int = DEFAULT_SHINGLE, seed: int = DEFAULT_SEED) -> DedupResult:
    """Keep the first of every group of texts whose word-shingle Jaccard is >= threshold (MinHash + LSH)."""
    _check_params(threshold, num_perm, shingle)
    result = dedup_sketches(sketch(texts, num_perm=num_perm, shingle=shingle, seed=seed), threshold)
    result.ids = None  # positions are the ids
    return result


def exact_duplicates(texts: Sequence[str]) -> DedupResult:
    """The baseline: keep the first of texts whose normalised forms are identical (by a 128-bit hash)."""
    texts = _check_texts(texts)
    first: Dict[bytes, int] = {}
    kept: List[int] = []
    removed: List[Duplicate] = []
    for i, t in enumerate(texts):
        key = hashlib.blake2b(normalize(t).encode(), digest_size=16).digest()
        j = first.setdefault(key, i)
        if j == i:
            kept.append(i)
        else:
            removed.append(Duplicate(i, j, 1.0))
    return DedupResult(kept, removed, len(texts), "exact")
