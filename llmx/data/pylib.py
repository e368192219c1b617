"""The `pylib` corpus: the documentation text of the installed Python standard library and packages.

An offline source of tens of millions of characters of technical English, built on first use from the
files already installed with llmx (no network), then cached.

What a document is: one Python module (one `.py` file). Its text is the module's docstrings (module,
class, function; `inspect.cleandoc` indentation rules, via `ast.get_docstring`) and its block comments
(runs of full-line `#` comments, the `#` and one space removed), in source order, separated by blank
lines. Code is left out. A module with less than `MIN_MODULE_CHARS` of such text is skipped. Shebang,
encoding and tool-directive comments (`# noqa`, `# type:`, `# pragma`, `# fmt:`, ...) are dropped.

Which files: the standard library of the running interpreter (`sysconfig`'s stdlib path) and the
distributions named in `data.pylib.packages` (their RECORD file lists). Everything under a directory
named `test`, `tests`, `idle_test` or `_vendor`/`vendored`, and the interpreter's own `site-packages`,
is skipped: test code is mostly boilerplate and vendored code duplicates another package. Files are
visited in sorted order, so the corpus is a function of the installed files alone.

Key of a document: `<distribution>/<path inside site-packages>` (`stdlib/<path>` for the standard
library), the same on every machine. The split and deduplication (llmx.data.split) use it.

Fingerprint (the cache key): EXTRACTOR_VERSION, the Python version, each stdlib file's path and size,
and for each distribution its name, version and the sha256 of its RECORD (which lists every installed
file with its own hash). The same installed versions therefore give the same corpus, and any change
to an installed file rebuilds it.

Licences: each distribution's licence (License-Expression, License, or its licence classifiers) is
recorded, with its version and the characters it contributes, in the cache's `manifest.json` beside
`corpus.jsonl.gz`. The default list (llmx.config.schema.PYLIB_PACKAGES) holds only permissively
licensed packages (PSF-2.0, BSD, MIT, Apache-2.0, MIT-CMU, matplotlib's PSF-style licence). The corpus is
built on the user's machine from files already there; llmx ships none of it.

Cost with the pinned versions (2 cores): about 45 s to extract (a process pool over the files), 6 s to
split (llmx.data.split), then the usual tokenize-and-pack (about 15 s), once per installed versions.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from llmx.utils import LlmxError, atomic_write_json, publish_dir, sha256_text

EXTRACTOR_VERSION = 1
STDLIB = "stdlib"
MIN_MODULE_CHARS = 200
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "_vendor", "vendored", "__pycache__", "site-packages"})
_DIRECTIVE = re.compile(r"^(!|-\*-|\s*(noqa|type:|pragma|fmt:|pylint:|mypy:|isort:|ruff:|flake8|coding[:=]|vim:|pyright:))")


# ------------------------------------------------------------------------------------ one module


def _comment_blocks(lines: List[str]) -> List[Tuple[int, str]]:
    """(first line number, text) of every run of full-line comments, directives dropped."""
    blocks: List[Tuple[int, str]] = []
    run: List[str] = []
    start = 0
    for i, line in enumerate(lines + [""], 1):
        s = line.strip()
        if s.startswith("#"):
            body = s[1:]
            body = body[1:] if body.startswith(" ") else body
            if _DIRECTIVE.match(body):
                continue
            if not run:
                start = i
            run.append(body.rstrip())
            continue
        text = "\n".join(run).strip()
        if text and any(c.isalpha() for c in text):
            blocks.append((start, text))
        run = []
    return blocks


def _docstrings(tree: ast.AST) -> List[Tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append((node.body[0].lineno, doc.strip()))
    return out


def module_text(source: bytes) -> Optional[str]:
    """A module's docstrings and block comments in source order, or None if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old code
            tree = ast.parse(source)
        text = source.decode("utf-8")
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    # Sorted by line: a comment above a function comes before the function's docstring.
    parts = sorted(_docstrings(tree) + _comment_blocks(text.splitlines()), key=lambda p: p[0])
    return "\n\n".join(t for _, t in parts)


def _read_module(path: str) -> Optional[str]:
    text = module_text(Path(path).read_bytes())
    return text if text and len(text) >= MIN_MODULE_CHARS else None


# ------------------------------------------------------------------------------------ which files


def _kept(rel: Path) -> bool:
    return rel.suffix == ".py" and not SKIP_DIRS.intersection(rel.parts[:-1])


def stdlib_files() -> List[Tuple[str, Path]]:
    """(key, path) of the standard library's modules, sorted by key."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(f"{STDLIB}/{p.relative_to(root).as_posix()}", p) for p in root.rglob("*.py")]
    return sorted((k, p) for k, p in files if _kept(Path(k)))


def _distribution(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise LlmxError(
            f"data.pylib.packages: {name!r} is not installed in this environment ({sys.prefix}); "
            f"remove it from the list or install it (installed: {', '.join(sorted(installed_distributions()))})"
        ) from None


def installed_distributions() -> List[str]:
    return sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()} - {""})


def distribution_files(name: str) -> List[Tuple[str, Path]]:
    """(key, path) of a distribution's modules from its RECORD, sorted by key."""
    dist = _distribution(name)
    prefix = dist.metadata["Name"].lower()  # each .metadata access re-parses METADATA: once, not per file
    out = []
    for f in dist.files or []:
        rel = Path(str(f))
        if _kept(rel) and not rel.parts[0].endswith((".dist-info", ".egg-info")) and ".." not in rel.parts:
            path = Path(dist.locate_file(f))
            if path.is_file():
                out.append((f"{prefix}/{rel.as_posix()}", path))
    return sorted(out)


def licence(dist: metadata.Distribution) -> str:
    """The licence a distribution declares: License-Expression; else License when it is a name (one short
    line, not the licence's full text); else its licence classifiers; else License's first line."""
    md = dist.metadata
    if md.get("License-Expression"):
        return md["License-Expression"]
    text = (md.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80 and text.upper() != "UNKNOWN":
        return text
    classifiers = [c.split(" :: ")[-1] for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or (text.splitlines()[0] if text else "not declared")


def fingerprint(packages: Sequence[str]) -> str:
    """What the corpus depends on; see the module docstring."""
    parts = [f"pylib-v{EXTRACTOR_VERSION}", sys.version]
    parts += [f"{k}:{p.stat().st_size}" for k, p in stdlib_files()]
    for name in sorted({n.lower() for n in packages}):
        dist = _distribution(name)
        record = dist.read_text("RECORD") or ""
        parts.append(f"{name}=={dist.version}:{hashlib.sha256(record.encode()).hexdigest()}")
    return sha256_text(*parts)


# ------------------------------------------------------------------------------------ build and load


def _extract(files: List[Tuple[str, Path]], num_proc: int) -> List[Optional[str]]:
    """Each file's text (None when it has too little), in one process pool for the whole corpus."""
    paths = [str(p) for _, p in files]
    if num_proc > 1:
        with ProcessPoolExecutor(num_proc) as pool:
            return list(pool.map(_read_module, paths, chunksize=64))
    return [_read_module(p) for p in paths]


def build(packages: Sequence[str], out: Path, num_proc: int = 1) -> Dict:
    """Extract the corpus into out/corpus.jsonl.gz and write out/manifest.json; returns the manifest."""
    start = time.perf_counter()
    sources = [(STDLIB, f"Python {sys.version.split()[0]}", "PSF-2.0", stdlib_files())]
    for name in sorted({n.lower() for n in packages}):
        dist = _distribution(name)
        sources.append((name, dist.version, licence(dist), distribution_files(name)))
    texts = iter(_extract([f for *_, files in sources for f in files], num_proc))
    docs: List[Tuple[str, str]] = []
    table = []
    for name, version, lic, files in sources:
        got = [(k, t) for (k, _), t in zip(files, texts) if t]
        docs += got
        table.append({"name": name, "version": version, "licence": lic, "files": len(files),
                      "documents": len(got), "chars": sum(len(t) for _, t in got)})
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        for key, text in docs:
            gz.write((json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n").encode())
    (out / "corpus.jsonl.gz").write_bytes(buf.getvalue())
    manifest = {
        "extractor_version": EXTRACTOR_VERSION,
        "python": sys.version,
        "documents": len(docs),
        "chars": sum(len(t) for _, t in docs),
        "build_seconds": round(time.perf_counter() - start, 1),
        "sources": table,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def corpus_dir(packages: Sequence[str], root: Path, num_proc: int = 1) -> Path:
    """The cached corpus directory for these packages, built (atomically) if missing."""
    final = root / "corpora" / f"pylib-{fingerprint(packages)[:20]}"
    if not (final / "manifest.json").exists():
        print(f"llmx: building the pylib corpus from {len(packages)} packages and the standard library "
              f"(once per installed versions; about a minute on 2 cores) -> {final}", file=sys.stderr, flush=True)
        with publish_dir(final) as tmp:
            m = build(packages, tmp, num_proc)
        print(f"llmx: pylib corpus: {m['documents']:,} modules, {m['chars'] / 1e6:.1f}M characters "
              f"in {m['build_seconds']:.0f} s; licences in {final / 'manifest.json'}", file=sys.stderr, flush=True)
    return final


def load(path: Path) -> List[Tuple[str, str]]:
    """(key, text) documents of a built corpus directory, in file order."""
    with gzip.open(path / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        return [(r["key"], r["text"]) for r in map(json.loads, f)]


def default_num_proc() -> int:
    return max(1, min(8, os.cpu_count() or 1))
