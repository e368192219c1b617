"""One interface for benchmark generators (the `generate-bench` recipe kind).

A generator is a class registered under a name:

    @register_bench("my_task")
    class MyTask(BenchGenerator):
        subsets = ("easy", "hard")
        def generate(self, subset, op, length, rng, count_tokens) -> dict: ...
        def verify(self, record) -> None: ...        # an independent solver; raises BenchError
        def grade(self, reply, record) -> bool: ...

and every generated problem is a plain dict (a row of the Arrow dataset) with at least the fields of
`REQUIRED_FIELDS`: `prompt` is exactly what a model is sent, `answer` the canonical gold answer as a
string, `solution` a step-by-step reference solution, `op` the reasoning-op count and `length` the
context-length target in tokens (0 = no added context), `n_tokens` the prompt's measured length.

Determinism. Each problem gets its own `random.Random` seeded from (seed, generator, subset, length,
op, index) through sha256 (`problem_rng`), so a problem does not depend on which other problems were
generated, in which order, or by how many processes: the dataset for (seed, config) is one fixed set,
and a bigger run is a superset of a smaller one.

Length targeting. `fill_to_length` interleaves distractor statements with the core statements and
measures the rendered prompt with the configured tokenizer until it is within `tol` of the target.
Statements carry random sort keys drawn once, and distractors come from a prefix-stable stream, so
adding or dropping distractors while searching never reshuffles what is already placed.

Later papers' synthetic tasks (shortest paths on graphs, keys-finding mazes) plug in here as further
registered generators; the recipe, dataset writer, graders and evaluation loop do not change.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from llmx.utils import LlmxError

REQUIRED_FIELDS = ("id", "subset", "op", "length", "index", "prompt", "question", "solution", "answer", "n_tokens")

CountTokens = Callable[[str], int]


class BenchError(LlmxError):
    """A generated problem that its own solver disputes, or a generator asked for something it cannot do."""


class Unsatisfiable(Exception):
    """Raised inside a generator by one sampling attempt that failed a constraint; the caller retries."""


class BenchGenerator:
    """Base class: subclasses set `subsets` and implement generate, verify and grade."""

    name: str = ""
    subsets: Tuple[str, ...] = ()
    max_attempts: int = 2000  # rejection-sampling attempts per problem before giving up with an error

    def __init__(self, **options: Any):
        self.options = options

    def generate(self, subset: str, op: int, length: int, rng: random.Random, count_tokens: Optional[CountTokens]) -> Dict[str, Any]:
        raise NotImplementedError

    def verify(self, record: Dict[str, Any]) -> None:
        raise NotImplementedError

    def grade(self, reply: str, record: Dict[str, Any]) -> bool:
        raise NotImplementedError

    def group_keys(self, record: Dict[str, Any]) -> List[str]:
        """Extra breakdowns to score besides (subset, length, op), e.g. ["mode=reverse"]."""
        return []

    def check_request(self, subset: str, op: int, length: int) -> None:
        """Refuse an impossible (subset, op, length) before any work starts; generators extend this."""
        if subset not in self.subsets:
            raise BenchError(f"{self.name}: unknown subset {subset!r}; valid subsets: {list(self.subsets)}")
        if op < 1:
            raise BenchError(f"{self.name}: op={op} must be >= 1")
        if length < 0:
            raise BenchError(f"{self.name}: length={length} must be >= 0 tokens")


BENCHES: Dict[str, Type[BenchGenerator]] = {}


def register_bench(name: str) -> Callable[[Type[BenchGenerator]], Type[BenchGenerator]]:
    def decorator(cls: Type[BenchGenerator]) -> Type[BenchGenerator]:
        old = BENCHES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"bench {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        BENCHES[name] = cls
        return cls

    return decorator


def get_bench(name: str, **options: Any) -> BenchGenerator:
    import llmx.bench  # noqa: F401  (registers the built-in generators)

    if name not in BENCHES:
        raise LlmxError(f"bench.generator={name!r} is not registered; registered generators: {sorted(BENCHES)}")
    return BENCHES[name](**options)


def problem_id(subset: str, length: int, op: int, index: int) -> str:
    return f"{subset}-{length_name(length)}-op{op}-{index}"


def problem_rng(seed: int, generator: str, subset: str, length: int, op: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{generator}|{subset}|{length}|{op}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "little"))


LENGTH_NAMES = {"0": 0, "zero_context": 0, "4k": 4000, "8k": 8000, "16k": 16000, "32k": 32000, "64k": 64000, "128k": 128000}


def parse_length(value: Any) -> int:
    """'0', 0, '8k', '16k', ..., or a plain token count -> tokens. The names follow the reference's
    (8k = 8000 tokens, not 8192)."""
    text = str(value).strip().lower()
    if text in LENGTH_NAMES:
        return LENGTH_NAMES[text]
    try:
        if text.endswith("k"):
            return int(float(text[:-1]) * 1000)
        n = int(text)
    except ValueError:
        raise LlmxError(f"context length {value!r} is not a token count; use 0, 4k, 8k, 16k, 32k, 64k, 128k or an integer") from None
    if n < 0:
        raise LlmxError(f"context length {value!r} must be >= 0")
    return n


def length_name(tokens: int) -> str:
    if tokens == 0:
        return "0"
    return f"{tokens // 1000}k" if tokens % 1000 == 0 else str(tokens)


def interleave(core: Sequence[str], extra: Sequence[str], rng: random.Random) -> List[str]:
    """`core` and `extra` statements in one random order."""
    keys = [rng.random() for _ in range(len(core) + len(extra))]
    return [s for _, s in sorted(zip(keys, list(core) + list(extra)), key=lambda t: t[0])]


def fill_to_length(
    render: Callable[[List[str]], str],
    core: Sequence[str],
    noise: Callable[[int], List[str]],
    target: int,
    count_tokens: CountTokens,
    rng: random.Random,
    tol: float = 0.03,
    max_rounds: int = 12,
    allow_over: bool = False,
    count_piece: Optional[CountTokens] = None,
) -> Tuple[str, int, int]:
    """Interleave `noise(k)` (a prefix-stable stream: noise(k) is noise(k+1)[:k]) with `core` until
    render(statements) measures `target` tokens within `tol`. Returns (prompt, n_tokens, k).

    The core statements keep random positions drawn once; each distractor's position is drawn when it
    first appears, so the search changes only how many distractors there are. A problem longer than the
    target alone raises Unsatisfiable, or with `allow_over` is returned without distractors. `count_piece`
    estimates what one statement adds to the measure (default: its own tokens) for the first step."""
    core_keys = [rng.random() for _ in core]
    noise_keys: List[float] = []

    def build(k: int) -> Tuple[str, int]:
        stmts = noise(k)
        while len(noise_keys) < k:
            noise_keys.append(rng.random())
        keyed = sorted(zip(core_keys + noise_keys[:k], list(core) + stmts), key=lambda t: t[0])
        text = render([s for _, s in keyed])
        return text, count_tokens(text)

    text, n = build(0)
    n0 = n
    if target <= 0:
        return text, n, 0
    if n > target * (1 + tol):
        if allow_over:
            return text, n, 0
        raise Unsatisfiable(f"the problem alone has {n} tokens, more than the target {target}")
    lo, hi = 0, None  # k with n(lo) < target; k with n(hi) > target
    k = 0
    for _ in range(max_rounds):
        if abs(n - target) <= tol * target:
            return text, n, k
        if n < target:
            lo = k
            per = (n - n0) / k if k else None
            if per is None or per <= 0:
                probe = noise(8)
                piece = count_piece or (lambda s: count_tokens(s + "\n"))
                per = max(1.0, sum(piece(s) for s in probe) / len(probe))
            step = max(1, int((target - n) / per))
            k = k + step if hi is None else (k + min(step, max(1, (hi - k) // 2)))
        else:
            hi = k
            k = lo + max(1, (hi - lo) // 2) if hi - lo > 1 else lo
        if hi is not None and k >= hi:
            k = hi - 1
        text, n = build(k)
    if abs(n - target) <= tol * target:
        return text, n, k
    raise BenchError(f"could not reach {target} tokens within {tol:.0%} (got {n} with {k} distractors)")
