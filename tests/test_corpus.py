"""Held-out splits with no leakage (llmx.data.split) and the pylib corpus (llmx.data.pylib).

The leakage checks are exact and independent of the code under test: every 64-character window of every
validation document is looked up, as a Python string, in the set of the training text's windows (or
the other way round for the large corpus). The pylib corpus itself is built once per session from the
real installed packages (the slow test); the fast tests build corpora from small distributions written
to tmp_path, which importlib.metadata finds like any installed one.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import REPO, run_llmx
from llmx.config.schema import DataConfig
from llmx.data import pylib, sources, split
from llmx.utils import LlmxError

W = 64


def windows(text: str, w: int = W) -> set:
    return {text[i:i + w] for i in range(len(text) - w + 1)}


def leaked_windows(train, val, w: int = W) -> int:
    """Validation windows that occur in a training document: exact string comparison."""
    train_windows = set().union(*(windows(t, w) for t in train)) if train else set()
    return sum(1 for v in val for x in windows(v, w) if x in train_windows)


def data_cfg(tmp_path, **overrides):
    base = OmegaConf.structured(DataConfig(name="test", cache_dir=str(tmp_path / "cache")))
    return OmegaConf.merge(base, overrides)


# ------------------------------------------------------------------------------------ window hashes


def test_window_hashes_equal_the_polynomial_in_exact_integers():
    rng = random.Random(0)
    alphabet = "ab \n\té✓日🙂"
    text = "".join(rng.choice(alphabet) for _ in range(300))
    base = int(split._BASE)
    for w in (8, 64):
        got = split.window_hashes(text, w)
        assert got.dtype == np.uint64 and len(got) == len(text) - w + 1
        for i in (0, 1, 77, len(text) - w):
            expect = sum(ord(c) * pow(base, w - 1 - k, 2**64) for k, c in enumerate(text[i:i + w])) % 2**64
            assert int(got[i]) == expect
    assert len(split.window_hashes("short", 64)) == 0
    # Equal windows hash equally wherever they are; different ones (here) do not.
    same = "".join(chr(ord("A") + i % 50) for i in range(64))
    a = split.window_hashes("x" * 10 + same + "y", 64)
    b = split.window_hashes("zz" + same, 64)
    assert a[10] == b[2] and len(set(a.tolist())) == len(a)


def test_hits_in_never_matches_across_text_boundaries():
    target = "a" * 32 + "b" * 32
    wanted = np.unique(split.window_hashes(target, 64))
    # The window exists only across the boundary of two texts: not a hit.
    assert len(split.hits_in(["x" + "a" * 32, "b" * 32 + "x"], wanted, 64)) == 0
    assert len(split.hits_in(["x" + target + "x"], wanted, 64)) == 1


# ------------------------------------------------------------------------------------ split rule


def test_split_dedups_paragraphs_and_cuts_validation_at_leaks():
    shared = "A paragraph that appears in two documents, long enough to be deduplicated."
    leak = "This sentence is copied from the training text into a held-out paragraph, verbatim."
    keys = [f"doc{i}" for i in range(40)]
    texts = [f"Document {i} says something of its own, {i * 'x'} at length.\n\n{shared}\n\nShort\n\nEnd {i}."
             for i in range(40)]
    val_keys = [k for k, is_val in zip(keys, sources.validation_mask(keys, 0.3)) if is_val]
    v = keys.index(val_keys[0])
    texts[v] = f"First paragraph of {v}, unique and kept as its own document.\n\nIt has {leak}\n\nLast paragraph, unique, kept."
    holder = next(f"train-{i}" for i in range(100) if sources.stable_fraction(f"train-{i}") >= 0.3)
    keys.append(holder)
    texts.append(f"Training document with the source: {leak}")

    train, val, stats = split.split_documents(keys, texts, 0.3, window=W, min_dedup_chars=32)
    every = train + val
    assert sum(t.count(shared) for t in every) == 1  # kept once, at its first occurrence
    assert stats.duplicate_paragraphs == 38  # 39 documents hold it
    assert all(t.count("Short") == 1 for t in every if "Document" in t)  # short paragraphs are never deduplicated
    # The leaking paragraph is gone and its document is cut in two around it.
    assert not any(leak in t for t in val)
    assert f"First paragraph of {v}, unique and kept as its own document." in val
    assert "Last paragraph, unique, kept." in val
    assert stats.leaked_paragraphs >= 1 and stats.val_documents == len(val)
    assert leaked_windows(train, val) == 0


@pytest.mark.parametrize("val_fraction", [0.05, 0.25])
def test_pydoc_split_has_no_validation_window_in_the_training_text(tmp_path, val_fraction):
    cfg = data_cfg(tmp_path, source="pydoc", val_fraction=val_fraction)
    train = list(sources.documents(cfg, "train").load())
    val = list(sources.documents(cfg, "validation").load())
    assert train and val
    assert leaked_windows(train, val) == 0
    # The rule did real work on this corpus: its topics repeat each other.
    corpus = sources.pydoc_corpus()
    mask = sources.validation_mask([t for t, _ in corpus], val_fraction)
    raw_train = [t for (_, t), m in zip(corpus, mask) if not m]
    raw_val = [t for (_, t), m in zip(corpus, mask) if m]
    assert leaked_windows(raw_train, raw_val) > 1000
    # Every held-out paragraph comes from a held-out topic.
    assert all(any(p in t for t in raw_val) for v in val for p in split.paragraphs(v))


def test_files_hash_split_has_no_validation_window_in_the_training_text(tmp_path):
    corpus = [t for _, t in sources.pydoc_corpus()]
    rows = []
    for i, text in enumerate(corpus):  # documents that quote each other, as web text does
        rows.append(text)
        rows.append(corpus[(i * 7) % len(corpus)][:3000] + "\n\n" + f"Note {i}: a new paragraph of this copy.")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    cfg = data_cfg(tmp_path, source="files", paths=[str(path)], val_fraction=0.2)
    train = list(sources.documents(cfg, "train").load())
    val = list(sources.documents(cfg, "validation").load())
    assert train and val and leaked_windows(train, val) == 0
    # With explicit validation files the user's split is kept as it is.
    cfg2 = data_cfg(tmp_path, source="files", paths=[str(path)], val_paths=[str(path)])
    assert list(sources.documents(cfg2, "validation").load()) == rows


@pytest.mark.parametrize("bad,msg", [({"val_fraction": 1.0}, "data.val_fraction=1.0"),
                                     ({"overlap_window": 4}, "data.overlap_window=4"),
                                     ({"dedup_min_chars": -1}, "data.dedup_min_chars=-1")])
def test_bad_split_settings_are_refused_before_any_work(tmp_path, bad, msg):
    with pytest.raises(LlmxError, match=msg.replace(".", r"\.")):
        sources.documents(data_cfg(tmp_path, source="pydoc", **bad), "train")


# ------------------------------------------------------------------------------------ pylib extraction


def test_module_text_keeps_docstrings_and_block_comments_in_source_order():
    src = b'''#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""Module docstring."""
import os  # trailing comments are code-adjacent noise: not kept

# A block comment above the class,
# on two lines.
class A:
    """Class docstring.

        Indented detail.
    """

    def f(self):  # noqa: E501
        # type: ignore
        """Method docstring."""
        x = "not a docstring"
        # pragma: no cover
        return x
'''
    text = pylib.module_text(src)
    assert text == ("Module docstring.\n\nA block comment above the class,\non two lines.\n\n"
                    "Class docstring.\n\nIndented detail.\n\nMethod docstring.")
    assert pylib.module_text(b"def broken(:\n") is None


def _fake_distribution(site: Path, name: str, version: str, modules: dict, licence: str) -> None:
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{licence}\n")
    record = []
    for rel, body in modules.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        record.append(f"{rel},,")
    (dist / "RECORD").write_text("\n".join(record + [f"{dist.name}/METADATA,,", f"{dist.name}/RECORD,,"]) + "\n")


DOC = '"""{}"""\n\n# {}\ndef f():\n    """{}"""\n'


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    mods = {f"fakepkg/mod{i}.py": DOC.format(f"Module {i} explains " + "things " * 40, f"comment {i} " * 5,
                                             f"Function of module {i}.") for i in range(6)}
    mods["fakepkg/tests/test_x.py"] = DOC.format("Skipped: under tests/. " * 20, "c", "d")
    mods["fakepkg/tiny.py"] = '"""Too short."""\n'
    _fake_distribution(site, "fakepkg", "1.0", mods, "License-Expression: BSD-3-Clause")
    # A licence given as its full text (as scipy does) is named by its classifier instead.
    _fake_distribution(site, "textlicence", "2.0", {"textlicence/m.py": DOC.format("x " * 150, "c", "d")},
                       "License: Copyright (c) 2001 Someone.\n        All rights reserved.\n"
                       "Classifier: License :: OSI Approved :: BSD License")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_pylib_build_is_deterministic_records_licences_and_skips_tests(tmp_path, fake_site, monkeypatch):
    monkeypatch.setattr(pylib, "stdlib_files", lambda: [])  # the real stdlib is the slow test's
    out1, out2 = tmp_path / "a", tmp_path / "b"
    out1.mkdir(), out2.mkdir()
    m1 = pylib.build(["fakepkg"], out1, num_proc=1)
    pylib.build(["FakePkg"], out2, num_proc=2)
    assert (out1 / "corpus.jsonl.gz").read_bytes() == (out2 / "corpus.jsonl.gz").read_bytes()
    docs = pylib.load(out1)
    assert [k for k, _ in docs] == [f"fakepkg/fakepkg/mod{i}.py" for i in range(6)]
    assert docs[0][1].startswith("Module 0 explains") and docs[0][1].endswith("Function of module 0.")
    (row,) = [s for s in m1["sources"] if s["name"] == "fakepkg"]
    assert row["licence"] == "BSD-3-Clause" and row["version"] == "1.0" and row["documents"] == 6
    assert row["files"] == 7  # the tests/ module is not even a candidate; tiny.py is read and dropped
    assert pylib.licence(importlib.metadata.distribution("textlicence")) == "BSD License"


def test_pylib_fingerprint_follows_installed_files_and_missing_packages_are_named(tmp_path, fake_site):
    before = pylib.fingerprint(["fakepkg"])
    assert pylib.fingerprint(["fakepkg"]) == before
    record = fake_site / "fakepkg-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text().replace("mod0.py,,", "mod0.py,sha256=changed,1"))
    assert pylib.fingerprint(["fakepkg"]) != before
    with pytest.raises(LlmxError, match=r"'no-such-dist' is not installed.*installed: .*fakepkg"):
        pylib.fingerprint(["fakepkg", "no-such-dist"])


# ------------------------------------------------------------------------------------ the real corpus


@pytest.fixture(scope="session")
def pylib_split(llmx_cache):
    """The default pylib corpus and split, built from this environment's installed packages (once)."""
    cfg = OmegaConf.structured(DataConfig(name="pylib", source="pylib"))
    path = sources.pylib_split_dir(cfg)
    read = lambda name: [json.loads(line) for line in gzip.open(path / f"{name}.jsonl.gz", "rt", encoding="utf-8")]
    return read("train"), read("validation"), json.loads((path / "stats.json").read_text()), path


@pytest.mark.slow
def test_pylib_default_corpus_has_no_leak_and_the_size_it_promises(pylib_split):
    train, val, stats, path = pylib_split
    assert stats["train_chars"] > 30_000_000 and stats["val_chars"] > 500_000
    assert stats["duplicate_paragraphs"] > 0 and stats["leaked_paragraphs"] > 0
    # Exact: every training window looked up in the set of validation windows.
    val_windows = set().union(*(windows(v) for v in val))
    assert not any(doc[i:i + W] in val_windows for doc in train for i in range(len(doc) - W + 1))
    manifest = json.loads((path.parent / "manifest.json").read_text())
    names = {s["name"] for s in manifest["sources"]}
    assert {"stdlib", "torch", "transformers", "numpy"} <= names
    assert all(s["licence"] != "not declared" for s in manifest["sources"])


@pytest.mark.slow
def test_default_recipe_trains_on_pylib_with_over_10m_distinct_tokens(tmp_path, pylib_split):
    run = tmp_path / "run"
    run_llmx(["run", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.ckpt_every=0",
              "trainer.export_hf=false", "logger.progress=false", f"hydra.run.dir={run}"], cwd=tmp_path, check=True,
             timeout=600)
    final = json.loads((run / "final.json").read_text())
    assert final["step"] == 2 and final["val_loss"] > 0
    from llmx.utils import cache_dir

    metas = [json.loads(p.read_text()) for p in (cache_dir() / "datasets").glob("*/llmx_meta.json")]
    train_meta = [m for m in metas if m["split"] == "train" and m["source_key"].startswith("pylib:")]
    assert train_meta and max(m["tokens"] for m in train_meta) >= 10_000_000
