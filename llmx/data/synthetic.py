"""Synthetic text generators for `data.source=synthetic`.

A generator is a plain function registered under a name:

    @register_generator("my_task")
    def my_task(seed: int, split: str, *, n_docs: int = 100, ...) -> Iterable[str]:
        ...  # yield documents (str); deterministic in (seed, split, args)

and selected with `data.generator=my_task data.generator_args={n_docs: 500, seed: 1}`. `seed` is
taken out of generator_args (default 0) and passed positionally; `split` is "train" or
"validation", and a generator must give the two splits different documents (e.g. by seeding its RNG
with both). Everything else in generator_args is passed as keyword arguments, checked against the
signature before the call so that a typo names the accepted arguments.

The generated documents are tokenized, packed and cached like any other source; the cache key is
their content, so changing a generator's code or arguments invalidates the cache by itself.

Generators in other modules register when those modules are imported; to make one selectable from
the config alone, define it here or import its module at the bottom of this file.

Seeding uses `random.Random(<str>)`, which hashes the string with sha512: the same documents in
every process, independent of PYTHONHASHSEED and of the global RNG.
"""

from __future__ import annotations

import inspect
import random
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from llmx.utils import LlmxError

Generator = Callable[..., Iterable[str]]
GENERATORS: Dict[str, Generator] = {}


def register_generator(name: str) -> Callable[[Generator], Generator]:
    """Register `fn(seed, split, **args) -> Iterable[str]` as data.generator=`name`."""

    def decorator(fn: Generator) -> Generator:
        old = GENERATORS.get(name)
        # Re-registering the same function (a module reloaded) is fine; two functions under one name is a bug.
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"generator {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        GENERATORS[name] = fn
        return fn

    return decorator


def get_generator(name: str) -> Generator:
    if name not in GENERATORS:
        raise LlmxError(f"data.generator={name!r} is not registered; registered generators: {sorted(GENERATORS)}")
    return GENERATORS[name]


def generate(name: str, seed: int, split: str, args: Dict[str, Any]) -> List[str]:
    """Run a registered generator and check what it returns."""
    fn = get_generator(name)
    try:
        inspect.signature(fn).bind(seed, split, **args)
    except TypeError as e:
        raise LlmxError(f"data.generator_args for {name!r}: {e}; signature: {name}{inspect.signature(fn)}") from e
    docs = list(fn(seed, split, **args))
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise LlmxError(f"generator {name!r} yielded {type(doc).__name__} as document {i}; documents must be str")
    return docs


ARITHMETIC_OPS = ("+", "-", "*", "/")


@register_generator("arithmetic")
def arithmetic(
    seed: int,
    split: str,
    n_docs: int = 1000,
    lines_per_doc: int = 16,
    max_operand: int = 99,
    ops: Sequence[str] = ("+", "-", "*"),
    n_val_docs: Optional[int] = None,
) -> Iterator[str]:
    """Documents of `lines_per_doc` lines "Q: 17 + 25 = ? A: 42", operands in [0, max_operand].

    "/" is exact integer division (the dividend is built as divisor * quotient, divisor >= 1).
    The train split has n_docs documents; validation has n_val_docs (default: n_docs // 20, at least 1),
    drawn from a differently seeded stream. With a small max_operand the two splits share questions.
    """
    ops = list(ops)
    bad = [op for op in ops if op not in ARITHMETIC_OPS]
    if not ops or bad:
        raise LlmxError(f"arithmetic: ops must be a non-empty subset of {list(ARITHMETIC_OPS)}, got {ops}")
    if min(n_docs, lines_per_doc, max_operand) < 1:
        raise LlmxError(
            f"arithmetic: n_docs, lines_per_doc and max_operand must be >= 1, got {n_docs}, {lines_per_doc}, {max_operand}"
        )
    count = n_docs if split == "train" else (n_val_docs if n_val_docs is not None else max(1, n_docs // 20))
    rng = random.Random(f"arithmetic:{seed}:{split}")
    for _ in range(count):
        lines = []
        for _ in range(lines_per_doc):
            op = rng.choice(ops)
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            if op == "+":
                answer = a + b
            elif op == "-":
                answer = a - b
            elif op == "*":
                answer = a * b
            else:
                b = max(b, 1)
                a, answer = a * b, a
            lines.append(f"Q: {a} {op} {b} = ? A: {answer}")
        yield "\n".join(lines)
