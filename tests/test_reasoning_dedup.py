"""NaturalReasoning near-duplicate removal (llmx.reasoning.dedup) against brute-force exact Jaccard."""

from __future__ import annotations

import itertools
import random

import pytest

from llmx.reasoning.dedup import (
    dedup_sketches,
    exact_duplicates,
    merge_sketches,
    near_duplicates,
    normalize,
    shingles,
    sketch,
)
from llmx.utils import LlmxError


def jaccard(a: str, b: str, n: int = 3) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def random_text(rng: random.Random, length: int) -> str:
    return " ".join(f"w{rng.randrange(10**6)}" for _ in range(length))


def variant(base: str, target: float, rng: random.Random) -> str:
    """`base` with random words replaced, one at a time, until the exact shingle Jaccard drops to `target`."""
    tokens = base.split()
    for pos in rng.sample(range(len(tokens)), len(tokens)):
        tokens[pos] = f"new{rng.randrange(10**6)}"
        text = " ".join(tokens)
        if jaccard(base, text) <= target:
            return text
    raise AssertionError("unreachable: replacing every word gives Jaccard 0")


@pytest.fixture(scope="module")
def planted():
    """150 unrelated texts, then a variant of each at a planted Jaccard; the variants come after all bases."""
    rng = random.Random(7)
    bases = [random_text(rng, rng.randint(50, 90)) for _ in range(150)]
    targets = [0.9, 0.75, 0.35, 0.2, 0.0] * 30
    variants = [variant(b, t, rng) if t else random_text(rng, 60) for b, t in zip(bases, targets)]
    return bases + variants


def test_normalisation_and_shingles():
    assert normalize("  What IS   2+2?\n(Explain.)") == "what is 2 2 explain"
    assert shingles("A b, c. D", 3) == {"a b c", "b c d"}
    assert shingles("Only two", 3) == {"only two"}  # shorter than a shingle: the whole text
    assert shingles(" ?! ", 3) == set()


def test_planted_pairs_against_exact_jaccard(planted):
    result = near_duplicates(planted)
    n = len(planted) // 2
    removed = {d.item: d for d in result.removed}
    exact = {i: jaccard(planted[i], planted[i + n]) for i in range(n)}
    clear_dups = [i for i in range(n) if exact[i] >= 0.68]
    clear_distinct = [i for i in range(n) if exact[i] <= 0.4]
    assert len(clear_dups) >= 55 and len(clear_distinct) >= 85  # the planted mix is as intended
    assert all(i + n in removed and removed[i + n].of == i for i in clear_dups)  # recall on clear pairs: 1
    assert not any(i + n in removed for i in clear_distinct)
    for d in result.removed:  # precision: every removal is a real near-duplicate, estimate close to exact
        truth = jaccard(planted[d.item], planted[d.of])
        assert truth >= 0.45 and abs(d.jaccard - truth) <= 0.15
    assert result.kept == sorted(set(range(2 * n)) - set(removed))
    assert result.n_kept + result.n_removed == result.n_input == 2 * n
    assert result.report()["removed"] == result.n_removed


def test_no_kept_pair_is_a_clear_duplicate_by_brute_force(planted):
    sets = {i: shingles(planted[i], 3) for i in near_duplicates(planted).kept}
    worst = max(len(sets[a] & sets[b]) / len(sets[a] | sets[b]) for a, b in itertools.combinations(sets, 2))
    assert worst < 0.7


def test_first_occurrence_wins_and_runs_are_deterministic(planted):
    rng = random.Random(1)
    base = random_text(rng, 60)
    copy = variant(base, 0.9, rng)
    assert near_duplicates([base, copy]).kept == [0]
    swapped = near_duplicates([copy, base])
    assert swapped.kept == [0] and swapped.removed[0].item == 1 and swapped.removed[0].of == 0
    a, b = near_duplicates(planted), near_duplicates(planted)
    assert a.kept == b.kept and a.removed == b.removed


def test_a_removed_item_does_not_remove_later_ones():
    """A chain A~B~C with A, C dissimilar: B goes, C stays (B is never indexed)."""
    rng = random.Random(3)
    a = random_text(rng, 100)
    b = variant(a, 0.67, rng)
    c = variant(b, 0.67, rng)
    assert jaccard(a, b) >= 0.62 and jaccard(b, c) >= 0.62 and jaccard(a, c) <= 0.47
    result = near_duplicates([a, b, c], num_perm=256)
    assert result.kept == [0, 2] and [(d.item, d.of) for d in result.removed] == [(1, 0)]


def test_sharded_sketches_merge_to_the_unsharded_result(planted):
    order = list(range(len(planted)))
    random.Random(5).shuffle(order)
    shards = [order[k::3] for k in range(3)]
    parts = [sketch([planted[i] for i in shard], ids=shard) for shard in shards]
    merged = dedup_sketches(merge_sketches(parts))
    whole = near_duplicates(planted)
    assert merged.kept_ids() == whole.kept
    assert [(merged.ids[d.item], merged.ids[d.of], d.jaccard) for d in merged.removed] == \
           [(d.item, d.of, d.jaccard) for d in whole.removed]


def test_merge_rejects_clashing_ids_and_settings():
    one = sketch(["a b c d"], ids=["x"])
    with pytest.raises(LlmxError, match="id 'x'"):
        merge_sketches([one, sketch(["e f g h"], ids=["x"])])
    with pytest.raises(LlmxError, match="different settings"):
        merge_sketches([one, sketch(["e f g h"], ids=["y"], shingle=2)])
    with pytest.raises(LlmxError, match="2 ids for 1 texts"):
        sketch(["a"], ids=[1, 2])


def test_exact_baseline_and_empty_input():
    texts = ["What is 2+2?", "what is 2 + 2", "What is 2+3?", "", " . "]
    result = exact_duplicates(texts)
    assert result.kept == [0, 2, 3] and [(d.item, d.of) for d in result.removed] == [(1, 0), (4, 3)]
    assert near_duplicates(texts, threshold=1.0).kept == [0, 2, 3]
    for empty in (near_duplicates([]), exact_duplicates([])):
        assert empty.kept == [] and empty.removed == [] and empty.n_input == 0
        assert empty.report()["removed_fraction"] == 0.0


@pytest.mark.parametrize("threshold", [0, -0.1, 1.01, "0.5", True, None])
def test_bad_threshold_is_a_clear_error(threshold):
    with pytest.raises(LlmxError, match=r"threshold=.*\(0, 1\]"):
        near_duplicates(["a b c"], threshold=threshold)


def test_bad_settings_and_items_are_clear_errors():
    with pytest.raises(LlmxError, match="num_perm=1"):
        near_duplicates(["a"], num_perm=1)
    with pytest.raises(LlmxError, match="shingle=0"):
        near_duplicates(["a"], shingle=0)
    with pytest.raises(LlmxError, match="item 1 is a int"):
        near_duplicates(["a", 3])
    with pytest.raises(LlmxError, match="single string"):
        exact_duplicates("abc")
