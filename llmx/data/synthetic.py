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
    template: str = "Q: {a} {op} {b} = ? A: {answer}",
) -> Iterator[str]:
    """Documents of `lines_per_doc` lines "Q: 17 + 25 = ? A: 42", operands in [0, max_operand].

    `template` formats each line from a, op, b and answer: "{a} {op} {b} = {answer}" gives plain equations
    (the same sums, without the question format).

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
            lines.append(template.format(a=a, op=op, b=b, answer=answer))
        yield "\n".join(lines)


# Facts about fictional people, for continued-pretraining experiments (the merge recipe's corpus B): text
# whose every attribute value is arbitrary, so a model can predict it only by having learned the fact.
_FACT_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "va", "shi", "qu", "zel", "dor", "fen", "ba", "ni", "sar",
                   "vo", "el", "tam", "ri", "gul", "pe", "os", "wyn", "ha", "jun")
FACT_VALUES = {
    "city": ("Quenmar", "Dalvish", "Orrin", "Teskar", "Mirrow", "Pallendra", "Ushvale", "Vorne", "Kelloway",
             "Ashmere", "Brindle", "Zuurhold"),
    "job": ("baker", "glassblower", "ferryman", "cartographer", "beekeeper", "tailor", "astronomer", "locksmith",
            "potter", "harpist", "miner", "gardener"),
    "pet": ("cat", "parrot", "tortoise", "goat", "ferret", "goldfish", "hound", "lizard"),
}
# The first template of each attribute is also the recall probe: its text up to the value is the prompt.
FACT_TEMPLATES = {
    "city": ("{name} lives in {v}.", "The home of {name} is {v}.", "{name} has a house in {v}."),
    "job": ("{name} works as a {v}.", "By trade, {name} is a {v}.", "{name} earns a living as a {v}."),
    "pet": ("{name} keeps a {v} as a pet.", "The pet of {name} is a {v}.", "{name} owns a {v}."),
}


def facts_world(seed: int, n_entities: int) -> List[Dict[str, str]]:
    """The fictional people of `facts` for this seed: [{"name": ..., "city": ..., "job": ..., "pet": ...}].
    Worlds of different seeds (same n_entities) share no name."""
    # One fixed order of every name; world `seed` takes the seed-th block of n_entities, so worlds of different
    # seeds (and the same n_entities) are about different people.
    everyone = random.Random("facts-names").sample([a + b for a in _FACT_SYLLABLES for b in _FACT_SYLLABLES],
                                                   len(_FACT_SYLLABLES) ** 2)
    if n_entities < 1 or (seed + 1) * n_entities > len(everyone):
        raise LlmxError(f"facts: n_entities={n_entities} with seed={seed} needs more than the {len(everyone)} names; "
                        f"(seed + 1) * n_entities must be <= {len(everyone)}")
    names = everyone[seed * n_entities:(seed + 1) * n_entities]
    rng = random.Random(f"facts-world:{seed}")
    return [{"name": n.capitalize(), **{k: rng.choice(v) for k, v in FACT_VALUES.items()}} for n in names]


def facts_probes(seed: int, n_entities: int) -> List[tuple]:
    """(prompt, answer) for every fact of the world: ("Kalo lives in", " Quenmar"), one per attribute."""
    probes = []
    for person in facts_world(seed, n_entities):
        for attr, templates in FACT_TEMPLATES.items():
            prompt = templates[0].split("{v}")[0].format(name=person["name"])
            probes.append((prompt.rstrip(" "), " " + person[attr]))
    return probes


@register_generator("facts")
def facts(
    seed: int,
    split: str,
    n_docs: int = 1000,
    n_entities: int = 32,
    facts_per_doc: int = 8,
    n_val_docs: Optional[int] = None,
) -> Iterator[str]:
    """Documents of `facts_per_doc` sentences stating facts about `n_entities` fictional people
    ("Kalo lives in Quenmar. By trade, Renva is a potter. ..."), each person with a city, a job and a pet.

    The world (who has which attribute) depends on `seed` only, so both splits state the same facts; the
    documents (which facts, in which order and wording) differ per split. The validation loss therefore
    measures knowledge of the facts, not of particular documents. Validation has n_val_docs documents
    (default: n_docs // 20, at least 1).
    """
    if min(n_docs, facts_per_doc) < 1:
        raise LlmxError(f"facts: n_docs and facts_per_doc must be >= 1, got {n_docs}, {facts_per_doc}")
    world = facts_world(seed, n_entities)
    count = n_docs if split == "train" else (n_val_docs if n_val_docs is not None else max(1, n_docs // 20))
    rng = random.Random(f"facts:{seed}:{split}")
    for _ in range(count):
        sentences = []
        for _ in range(facts_per_doc):
            person, attr = rng.choice(world), rng.choice(list(FACT_TEMPLATES))
            sentences.append(rng.choice(FACT_TEMPLATES[attr]).format(name=person["name"], v=person[attr]))
        yield " ".join(sentences)


@register_generator("mixture")
def mixture(seed: int, split: str, parts: Sequence[Dict[str, Any]] = ()) -> Iterator[str]:
    """The documents of several registered generators, interleaved in proportion to their counts:
    parts = [{generator: arithmetic, args: {n_docs: 100, ...}}, {generator: facts, args: {...}}]. A part's
    seed is args.seed (default: this generator's seed)."""
    if not parts:
        raise LlmxError("mixture: parts is empty; give [{generator: <name>, args: {...}}, ...]")
    streams = []
    for i, part in enumerate(parts):
        part = dict(part)
        unknown = set(part) - {"generator", "args"}
        if "generator" not in part or unknown:
            raise LlmxError(f"mixture: parts[{i}] must be {{generator: <name>, args: {{...}}}}, got {sorted(part)}")
        args = dict(part.get("args") or {})
        streams.append(generate(part["generator"], int(args.pop("seed", seed)), split, args))
    # Document k of part i sits at (k + 0.5) / len_i along the mixture: every part is spread evenly.
    order = sorted(((k + 0.5) / len(s), i, k) for i, s in enumerate(streams) for k in range(len(s)))
    for _, i, k in order:
        yield streams[i][k]
