"""Tests of llmx.data: tokenizer, sources, packing + cache, StepLoader, eval_batches, streaming.

Everything runs on real data (the embedded pydoc corpus, small files written to tmp_path, the
arithmetic generator) with a per-test cache directory; the only patches make a second build *fail*
if it tries to train or tokenize again, which is how the cache-hit tests prove a hit.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmx.config.schema import DataConfig
from llmx.data import (
    PackedDataset,
    StepLoader,
    StreamingPackedDataset,
    build_datasets,
    build_tokenizer,
    eval_batches,
    register_generator,
)
from llmx.data import packing, sources, split, synthetic, tokenizer as tokmod
from llmx.utils import LlmxError


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    # cache_dir is set per config; LLMX_CACHE too, so nothing can reach the user's ~/.cache/llmx.
    monkeypatch.setenv("LLMX_CACHE", str(tmp_path / "env_cache"))

    def make(**overrides):
        tok = overrides.pop("tokenizer", {})
        base = OmegaConf.structured(DataConfig(name="test", cache_dir=str(tmp_path / "cache")))
        return OmegaConf.merge(base, {"tokenizer": {"vocab_size": 512, **tok}, **overrides})

    return make


def token_stream(tok, docs):
    out = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def all_blocks(ds):
    return torch.stack([ds[i] for i in range(len(ds))]) if len(ds) else torch.zeros(0, dtype=torch.long)


def write_jsonl(path: Path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def subdirs(path: Path):
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.exists() else []


# ------------------------------------------------------------------------------------------ tokenizer


def test_trained_tokenizer_roundtrip_deterministic_and_loadable(make_cfg, tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(make_cfg(tokenizer={"vocab_size": 1024}))
    # A second, independent training (fresh cache) must give the identical tokenizer.
    other = build_tokenizer(make_cfg(cache_dir=str(tmp_path / "other"), tokenizer={"vocab_size": 1024}))
    assert tok.backend_tokenizer.to_str() == other.backend_tokenizer.to_str()
    assert len(tok) == 1024 and tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id

    texts = [t for _, t in sources.pydoc_corpus()]
    texts += ["  leading spaces, tabs\tand\nnewlines\n\n", "unicode: héllo wörld ✓ 日本語 🙂", " x = f(a , b) ."]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # BPE actually compresses (well below one token per byte on its training text).
    corpus = "".join(texts[:20])
    assert len(tok(corpus)["input_ids"]) < 0.5 * len(corpus.encode())

    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    assert again.eos_token_id == tok.eos_token_id


def test_tokenizer_cache_hit_and_miss(make_cfg, monkeypatch):
    cfg = make_cfg()
    root = Path(cfg.cache_dir) / "tokenizers"
    first = build_tokenizer(cfg)
    assert len(subdirs(root)) == 1
    meta = json.loads((root / subdirs(root)[0] / "llmx_tokenizer.json").read_text())
    assert meta["vocab_size"] == 512 and meta["train_documents"] > 50

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite a cached tokenizer")

    with monkeypatch.context() as m:
        m.setattr(tokmod, "_train", no_training)
        second = build_tokenizer(cfg)
    assert second.get_vocab() == first.get_vocab() and len(subdirs(root)) == 1

    build_tokenizer(make_cfg(tokenizer={"vocab_size": 600}))  # changed vocab size: a new entry
    build_tokenizer(make_cfg(tokenizer={"train_chars": 10_000}))  # changed training text: a new entry
    assert len(subdirs(root)) == 3
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_tokenizer_sources_pretrained_and_model(make_cfg, tmp_path):
    trained = build_tokenizer(make_cfg())
    trained.save_pretrained(tmp_path / "tok")
    loaded = build_tokenizer(make_cfg(tokenizer={"source": "pretrained", "path": str(tmp_path / "tok")}))
    assert loaded.get_vocab() == trained.get_vocab()

    with pytest.raises(LlmxError, match="needs data.tokenizer.path"):
        build_tokenizer(make_cfg(tokenizer={"source": "pretrained"}))
    with pytest.raises(LlmxError, match=re.escape(str(tmp_path / "missing"))):
        build_tokenizer(make_cfg(tokenizer={"source": "pretrained", "path": str(tmp_path / "missing")}))

    cfg = make_cfg(tokenizer={"source": "model"})
    with pytest.raises(LlmxError, match=re.escape("data.tokenizer.source=model needs a pretrained model (model.source=hf|gguf)")):
        build_tokenizer(cfg)
    assert build_tokenizer(cfg, model_tokenizer=trained) is trained

    with pytest.raises(LlmxError, match="vocab_size=100"):
        build_tokenizer(make_cfg(tokenizer={"vocab_size": 100}))
    # The dataclass is accepted as well as the DictConfig.
    dc = DataConfig(name="x", cache_dir=make_cfg().cache_dir)
    dc.tokenizer.vocab_size = 512
    assert build_tokenizer(dc).get_vocab() == trained.get_vocab()


# ------------------------------------------------------------------------------------ pydoc + packing


def test_pydoc_split_is_stable_and_disjoint(make_cfg):
    cfg = make_cfg(val_fraction=0.1)
    corpus = sources.pydoc_corpus()
    # Recompute the held-out topics independently: sha256 of the topic, not Python's hash().
    expected_val = {t for t, _ in corpus if int(hashlib.sha256(t.encode()).hexdigest()[:16], 16) / 2**64 < 0.1}
    assert 0 < len(expected_val) < len(corpus)
    val = list(sources.documents(cfg, "validation").load())
    train = list(sources.documents(cfg, "train").load())
    assert val and train and not set(train) & set(val)
    # Paragraph-level provenance (documents are deduplicated and cut, see llmx.data.split): every held-out
    # paragraph comes from a held-out topic, and every held-out topic still has text in training's stead.
    val_text = [text for t, text in corpus if t in expected_val]
    train_text = [text for t, text in corpus if t not in expected_val]
    for doc in val:
        assert all(any(p in text for text in val_text) for p in split.paragraphs(doc))
    for doc in train:
        assert all(any(p in text for text in train_text) for p in split.paragraphs(doc))
    assert list(sources.documents(cfg, "validation").load()) == val  # stable
    # Tiny fraction: still one held-out topic rather than none.
    assert list(sources.documents(make_cfg(val_fraction=1e-9), "validation").load())


def test_train_cap_takes_evenly_spaced_blocks_of_the_same_cache(make_cfg):
    cfg = make_cfg(seq_len=64)
    tok = build_tokenizer(cfg)
    full, _ = build_datasets(cfg, tok)
    capped, _ = build_datasets(make_cfg(seq_len=64, train_max_sequences=10), tok)
    assert len(capped) == 10 and capped.cache_path == full.cache_path
    n = len(full)
    for i in range(10):
        assert torch.equal(capped[i], full[i * n // 10])
    assert torch.equal(capped[9], full[9 * n // 10]) and 9 * n // 10 > n // 2  # spread, not a prefix
    with pytest.raises(LlmxError, match="train_max_sequences=0 must be >= 1"):
        build_datasets(make_cfg(seq_len=64, train_max_sequences=0), tok)


def test_packing_reproduces_token_stream(make_cfg):
    cfg = make_cfg(seq_len=64, val_max_sequences=5)
    tok = build_tokenizer(cfg)
    train, val = build_datasets(cfg, tok)
    assert isinstance(train, PackedDataset) and len(train) > 100
    blocks = all_blocks(train)
    assert blocks.dtype == torch.long and blocks.shape == (len(train), 64)
    assert train[0].shape == (64,) and torch.equal(train[-1], blocks[-1])

    docs = list(sources.documents(cfg, "train").load())
    stream = token_stream(tok, docs)
    flat = blocks.flatten().tolist()
    assert flat == stream[: len(flat)]  # blocks are exactly a prefix of the stream...
    assert 0 <= len(stream) - len(flat) < 64  # ...dropping only the last partial block
    # EOS separates documents: one per document inside the packed prefix, and nowhere else.
    eos_positions = [i for i, t in enumerate(flat) if t == tok.eos_token_id]
    doc_ends = []
    pos = 0
    for d in docs:
        pos += len(tok(d, add_special_tokens=False)["input_ids"]) + 1
        doc_ends.append(pos - 1)
    assert eos_positions == [e for e in doc_ends if e < len(flat)]

    assert len(val) == 5 and val.hf.num_rows > 5  # capped view over the full cached split
    val_stream = token_stream(tok, sources.documents(cfg, "validation").load())
    assert all_blocks(val).flatten().tolist() == val_stream[: 5 * 64]
    with pytest.raises(IndexError):
        val[5]


def test_dataset_cache_hit_and_miss(make_cfg, monkeypatch):
    cfg = make_cfg(seq_len=64)
    tok = build_tokenizer(cfg)
    root = Path(cfg.cache_dir) / "datasets"
    train, val = build_datasets(cfg, tok)
    assert not train.from_cache and not val.from_cache
    assert len(subdirs(root)) == 2 and train.cache_path.parent == root
    first = all_blocks(train)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite a cached dataset")

    with monkeypatch.context() as m:
        m.setattr(packing, "_tokenize_and_pack", no_tokenizing)
        train2, val2 = build_datasets(make_cfg(seq_len=64, val_max_sequences=3), tok)  # the cap is not in the key
    assert train2.from_cache and val2.from_cache and train2.cache_path == train.cache_path
    assert torch.equal(all_blocks(train2), first) and len(val2) == 3

    # Each changed input misses: seq_len, tokenizer, the documents (val_fraction moves documents).
    assert not build_datasets(make_cfg(seq_len=32), tok)[0].from_cache
    assert not build_datasets(cfg, build_tokenizer(make_cfg(tokenizer={"vocab_size": 600})))[0].from_cache
    assert not build_datasets(make_cfg(seq_len=64, val_fraction=0.2), tok)[0].from_cache
    assert len(subdirs(root)) == 2 + 2 + 2 + 2
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


# -------------------------------------------------------------------------------------------- files


def test_files_source_txt_jsonl_json_parquet(make_cfg, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = [t for _, t in sources.pydoc_corpus()]
    d = tmp_path / "data"
    (d / "txt").mkdir(parents=True)
    for i in range(3):
        (d / "txt" / f"doc{i}.txt").write_text(corpus[i])
    write_jsonl(d / "a.jsonl", corpus[3:10] + [""])  # the empty text is skipped
    (d / "b.json").write_text(json.dumps([{"text": t} for t in corpus[10:13]]))
    pq.write_table(pa.table({"text": corpus[13:20], "n": list(range(7))}), d / "c.parquet")
    write_jsonl(tmp_path / "val.jsonl", corpus[20:24])

    cfg = make_cfg(source="files", paths=[str(d / "txt" / "*.txt"), str(d / "a.jsonl"), str(d / "b.json"), str(d / "c.parquet")],
                   val_paths=[str(tmp_path / "val.jsonl")], seq_len=32)
    assert list(sources.documents(cfg, "train").load()) == corpus[:20]
    assert list(sources.documents(cfg, "validation").load()) == corpus[20:24]
    # A directory means every supported file under it (sorted), held out by the split rule (llmx.data.split).
    cfg_dir = make_cfg(source="files", paths=[str(d)], val_fraction=0.2)
    files = sources.resolve_paths([str(d)], "data.paths")
    assert [f.name for f in files] == ["a.jsonl", "b.json", "c.parquet", "doc0.txt", "doc1.txt", "doc2.txt"]
    texts = [t for f in files for t in sources.read_documents(f, "text")]
    assert sorted(texts) == sorted(corpus[:20])
    expect_train, expect_val, _ = split.split_documents(texts, texts, 0.2)
    assert list(sources.documents(cfg_dir, "train").load()) == expect_train
    assert list(sources.documents(cfg_dir, "validation").load()) == expect_val

    tok = build_tokenizer(cfg)
    train, val = build_datasets(cfg, tok)
    assert all_blocks(train).flatten().tolist() == token_stream(tok, corpus[:20])[: len(train) * 32]
    assert all_blocks(val).flatten().tolist() == token_stream(tok, corpus[20:24])[: len(val) * 32]
    assert build_datasets(cfg, tok)[0].from_cache

    # Editing a file (size and mtime change) misses the cache.
    with open(d / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    train3, _ = build_datasets(cfg, tok)
    assert not train3.from_cache and train3.cache_path != train.cache_path


def test_files_errors_name_the_bad_value(make_cfg, tmp_path):
    (tmp_path / "present.jsonl").write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    (tmp_path / "notes.csv").write_text("a,b\n")

    pattern = str(tmp_path / "*.txt")
    with pytest.raises(LlmxError) as e:
        sources.documents(make_cfg(source="files", paths=[pattern]), "train")
    assert f"data.paths: no file matches '{pattern}'" in str(e.value) and "present.jsonl" in str(e.value)
    with pytest.raises(LlmxError, match=r"data.val_paths: no file matches '.*nowhere/v.jsonl'; '.*' contains: notes.csv, present.jsonl"):
        sources.documents(make_cfg(source="files", paths=[str(tmp_path / "present.jsonl")],
                                   val_paths=[str(tmp_path / "nowhere" / "v.jsonl")]), "train")

    with pytest.raises(LlmxError) as e:
        sources.documents(make_cfg(source="files", paths=[str(tmp_path / "notes.csv")]), "train")
    assert "notes.csv" in str(e.value) and all(x in str(e.value) for x in (".txt", ".jsonl", ".json", ".parquet"))

    with pytest.raises(LlmxError) as e:
        list(sources.documents(make_cfg(source="files", paths=[str(tmp_path / "present.jsonl")]), "train").load())
    assert "'text'" in str(e.value) and "['body', 'title']" in str(e.value) and "present.jsonl:1" in str(e.value)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(LlmxError, match=r"no column 'text'.*\['content'\]"):
        list(sources.documents(make_cfg(source="files", paths=[str(tmp_path / "p.parquet")]), "train").load())
    with pytest.raises(LlmxError, match="data.paths is empty"):
        sources.documents(make_cfg(source="files"), "train")


# ---------------------------------------------------------------------------------------- StepLoader


def toy(n, seq_len=4):
    # Block i is filled with i, so a batch shows which sequences it holds.
    return [torch.full((seq_len,), i, dtype=torch.long) for i in range(n)]


def ids(batches):
    return [int(x) for b in batches for x in b[:, 0]]


def test_step_loader_epochs_and_no_global_rng():
    data = toy(40)
    loader = StepLoader(data, batch_size=16, micro_batch_size=4, seed=3)
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    steps = [loader.next_step() for _ in range(5)]  # 80 sequences: two epochs, step 3 spans both
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(len(s) == 4 and all(mb.shape == (4, 4) for mb in s) for s in steps)
    seen = [i for s in steps for i in ids(s)]
    assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:]) == list(range(40))
    assert seen[:40] != list(range(40)) and seen[:40] != seen[40:]  # shuffled, differently per epoch
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 40

    torch.manual_seed(123)  # the global RNG does not matter
    again = StepLoader(data, batch_size=16, micro_batch_size=4, seed=3)
    assert [i for _ in range(5) for i in ids(again.next_step())] == seen
    other_seed = StepLoader(data, batch_size=16, micro_batch_size=4, seed=4)
    assert ids(other_seed.next_step()) != seen[:16]
    plain = StepLoader(data, batch_size=16, micro_batch_size=8, shuffle=False)
    assert [i for _ in range(3) for i in ids(plain.next_step())] == list(range(40)) + list(range(8))


def test_step_loader_resume_is_exact():
    data = toy(40)
    loader = StepLoader(data, batch_size=12, micro_batch_size=3, seed=7)
    steps = [loader.next_step() for _ in range(7)]
    replay = StepLoader(data, batch_size=12, micro_batch_size=3, seed=7)
    for _ in range(3):
        replay.next_step()
    state = replay.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    json.dumps(state)  # small and serializable

    resumed = StepLoader(data, batch_size=12, micro_batch_size=3, seed=999)  # the saved seed wins
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for k in range(3, 7):
        got = resumed.next_step()
        assert all(torch.equal(a, b) for a, b in zip(got, steps[k])), f"step {k + 1} differs after resume"

    with pytest.raises(LlmxError, match="40 sequences.*41"):
        StepLoader(toy(41), batch_size=12, micro_batch_size=3).load_state_dict(state)


def test_planned_indices_are_what_the_steps_read_and_leave_the_loader_alone():
    data = toy(40)
    loader = StepLoader(data, batch_size=12, micro_batch_size=3, seed=7, rank=1, world_size=2)
    loader.next_step()
    plan = loader.planned_indices(5)  # crosses an epoch boundary; every rank's share
    assert loader.state_dict()["position"] == 12
    single = StepLoader(data, batch_size=12, micro_batch_size=6, seed=7)
    single.next_step()
    assert plan == [i for _ in range(5) for i in ids(single.next_step())]
    assert loader.state_dict()["position"] == 12


@pytest.mark.parametrize("accum", [1, 2])
def test_sharding_matches_single_process(accum):
    data = toy(50)
    batch, world = 8, 2
    micro = batch // (world * accum)
    single = StepLoader(data, batch_size=batch, micro_batch_size=micro, seed=1)
    ranks = [StepLoader(data, batch_size=batch, micro_batch_size=micro, rank=r, world_size=world, seed=1)
             for r in range(world)]
    assert all(r.accum_steps == accum for r in ranks)
    for _ in range(9):  # crosses an epoch boundary
        expected = torch.cat(single.next_step())
        shares = [rk.next_step() for rk in ranks]
        assert all(len(s) == accum and all(mb.shape == (micro, 4) for mb in s) for s in shares)
        assert torch.equal(torch.cat([mb for s in shares for mb in s]), expected)


def test_step_loader_errors():
    with pytest.raises(LlmxError) as e:
        StepLoader(toy(100), batch_size=12, micro_batch_size=4, world_size=2)
    assert all(s in str(e.value) for s in ("batch_size=12", "micro_batch_size=4", "world_size=2"))
    with pytest.raises(LlmxError, match=re.escape("data has 40 sequences of 128 tokens, fewer than batch_size=64")):
        StepLoader(toy(40, seq_len=128), batch_size=64, micro_batch_size=8)


def test_eval_batches_deterministic_and_sharded():
    val = toy(30)
    one = [ids([b]) for b in eval_batches(val, micro_batch_size=4, max_batches=3)]
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert one == [ids([b]) for b in eval_batches(val, micro_batch_size=4, max_batches=3)]
    assert sum(map(len, (ids([b]) for b in eval_batches(val, micro_batch_size=4)))) == 30

    # max_batches counts micro-batches of all ranks: the same 12 blocks whatever the process count, each exactly
    # once, strided over ranks.
    for w in (2, 3, 4):
        per_rank = [[ids([b]) for b in eval_batches(val, micro_batch_size=4, rank=r, world_size=w, max_batches=3)]
                    for r in range(w)]
        assert sorted(i for r in per_rank for b in r for i in b) == list(range(12)), w
    assert per_rank[1] == [[1, 5, 9]]
    # 30 blocks over 4 ranks: none dropped; ranks 0-1 hold 8 blocks, ranks 2-3 hold 7 (the trainer evens out
    # the number of forwards).
    tail = [[ids([b]) for b in eval_batches(val, micro_batch_size=4, rank=r, world_size=4)] for r in range(4)]
    assert [[len(b) for b in r] for r in tail] == [[4, 4], [4, 4], [4, 3], [4, 3]]
    assert sorted(i for r in tail for b in r for i in b) == list(range(30))
    assert [[len(b) for b in eval_batches(toy(3), micro_batch_size=4, rank=r, world_size=4)] for r in range(4)] == [
        [1], [1], [1], []]
    assert list(eval_batches(toy(0), micro_batch_size=4)) == []


# ----------------------------------------------------------------------------------------- synthetic


def test_arithmetic_generator(make_cfg):
    docs = list(synthetic.arithmetic(0, "train", n_docs=5, lines_per_doc=10, max_operand=50, ops=["+", "-", "*", "/"]))
    assert docs == list(synthetic.arithmetic(0, "train", n_docs=5, lines_per_doc=10, max_operand=50, ops=["+", "-", "*", "/"]))
    assert docs != list(synthetic.arithmetic(1, "train", n_docs=5, lines_per_doc=10, max_operand=50, ops=["+", "-", "*", "/"]))
    assert docs[:1] != list(synthetic.arithmetic(0, "validation", n_docs=5, lines_per_doc=10, max_operand=50))[:1]
    assert len(docs) == 5 and len(list(synthetic.arithmetic(0, "validation", n_docs=100))) == 5
    ops_seen = set()
    for line in "\n".join(docs).splitlines():
        m = re.fullmatch(r"Q: (\d+) ([-+*/]) (\d+) = \? A: (-?\d+)", line)
        assert m, line
        a, op, b, ans = int(m[1]), m[2], int(m[3]), int(m[4])
        ops_seen.add(op)
        assert ans == {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        if op == "/":
            assert a == ans * b
    assert ops_seen == {"+", "-", "*", "/"}

    cfg = make_cfg(source="synthetic", generator="arithmetic", seq_len=32,
                   generator_args={"n_docs": 40, "lines_per_doc": 8, "seed": 5})
    tok = build_tokenizer(cfg)
    train, val = build_datasets(cfg, tok)
    expected = list(synthetic.arithmetic(5, "train", n_docs=40, lines_per_doc=8))
    assert all_blocks(train).flatten().tolist() == token_stream(tok, expected)[: len(train) * 32]
    assert len(val) > 0 and build_datasets(cfg, tok)[0].from_cache

    with pytest.raises(LlmxError, match=r"n_doc.*signature: arithmetic\(seed"):
        sources.documents(make_cfg(source="synthetic", generator="arithmetic", generator_args={"n_doc": 3}), "train")
    with pytest.raises(LlmxError, match=r"'nope'.*'arithmetic'"):
        sources.documents(make_cfg(source="synthetic", generator="nope"), "train")
    with pytest.raises(LlmxError, match="ops"):
        sources.documents(make_cfg(source="synthetic", generator="arithmetic", generator_args={"ops": ["%"]}), "train")


def test_register_custom_generator(make_cfg):
    @register_generator("test_counting")
    def counting(seed, split, n=3):
        start = 0 if split == "train" else 1000
        return [" ".join(str(start + seed + i + j) for j in range(20)) for i in range(n)]

    try:
        cfg = make_cfg(source="synthetic", generator="test_counting", generator_args={"n": 30, "seed": 2})
        assert list(sources.documents(cfg, "train").load())[0].startswith("2 3 4")
        train, val = build_datasets(cfg, build_tokenizer(cfg))
        assert len(train) > 0 and len(val) > 0
        assert list(sources.documents(cfg, "validation").load())[0].startswith("1002 1003")
        with pytest.raises(ValueError, match="already registered"):
            register_generator("arithmetic")(counting)
    finally:
        synthetic.GENERATORS.pop("test_counting", None)


# ----------------------------------------------------------------------------------- hub (streaming)


@pytest.fixture
def hub_json(tmp_path, make_cfg, monkeypatch):
    """data.source=hub through the real load_dataset, offline: builder "json" over local files."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    texts = [t for _, t in sources.pydoc_corpus()][:40]
    path = write_jsonl(tmp_path / "hub.jsonl", texts)

    def make(**kw):
        return make_cfg(source="hub", hub_name="json", paths=[str(path)], hub_val_split=None, val_fraction=0.1, **kw)

    return make, texts


def test_hub_streaming_matches_packing_and_resumes(hub_json):
    make, texts = hub_json
    cfg = make(streaming=True, seq_len=256, val_max_sequences=4)
    tok = build_tokenizer(cfg)
    train, val = build_datasets(cfg, tok)
    assert isinstance(train, StreamingPackedDataset) and isinstance(val, PackedDataset) and len(val) == 4

    is_val = [sources.stable_fraction(t) < 0.1 for t in texts]
    train_docs = [t for t, v in zip(texts, is_val) if not v]
    assert 0 < sum(is_val) < len(texts)
    stream = token_stream(tok, train_docs)
    blocks = list(train)
    assert all(b.dtype == torch.long and b.shape == (256,) for b in blocks)
    assert torch.cat(blocks).tolist() == stream[: len(blocks) * 256] and len(stream) - len(blocks) * 256 < 256
    val_stream = token_stream(tok, [t for t, v in zip(texts, is_val) if v])
    assert all_blocks(val).flatten().tolist() == val_stream[: 4 * 256]

    # Packing carries the remainder across tokenizer batches (here 3 documents per batch).
    small = StreamingPackedDataset(lambda: train_docs, tok, 100, docs_per_batch=3)
    assert torch.cat(list(small)).tolist() == stream[: len(stream) // 100 * 100]

    # Non-streaming hub data is held out by the full split rule (dedup, window filter), cached. A stream is
    # held out by hash only, so the two agree on which documents are held out, not on their text.
    train_ns, _ = build_datasets(make(streaming=False, seq_len=256), tok)
    expect_train, _, stats = split.split_documents(texts, texts, 0.1)
    assert stats.duplicate_paragraphs > 0 and len(expect_train) == len(train_docs)
    ns_stream = token_stream(tok, expect_train)
    assert all_blocks(train_ns).flatten().tolist() == ns_stream[: len(train_ns) * 256]
    assert build_datasets(make(streaming=False, seq_len=256), tok)[0].from_cache

    # StepLoader over the stream: 7 steps of 64 blocks run past the end (a second pass); resume after 3.
    n_blocks = len(blocks)
    assert 3 * 64 < n_blocks < 7 * 64
    loader = StepLoader(train, batch_size=64, micro_batch_size=16, seed=0)
    steps = [loader.next_step() for _ in range(7)]
    assert torch.equal(torch.cat(steps[0]), torch.stack(blocks[:64]))
    assert loader.state_dict()["epoch"] >= 1

    train2, _ = build_datasets(cfg, tok)
    replay = StepLoader(train2, batch_size=64, micro_batch_size=16)
    for _ in range(3):
        replay.next_step()
    state = json.loads(json.dumps(replay.state_dict()))
    assert state["dataset"] == {"blocks": 3 * 64}

    train3, _ = build_datasets(cfg, tok)
    resumed = StepLoader(train3, batch_size=64, micro_batch_size=32)  # M may differ: the state is global
    resumed.load_state_dict(state)
    for k in range(3, 7):
        assert torch.equal(torch.cat(resumed.next_step()), torch.cat(steps[k])), f"step {k + 1} differs"

    # Resume from a state taken in the second pass over the stream.
    replay = StepLoader(build_datasets(cfg, tok)[0], batch_size=64, micro_batch_size=16)
    for _ in range(6):
        replay.next_step()
    assert replay.state_dict()["epoch"] == 1
    resumed = StepLoader(build_datasets(cfg, tok)[0], batch_size=64, micro_batch_size=16)
    resumed.load_state_dict(replay.state_dict())
    assert torch.equal(torch.cat(resumed.next_step()), torch.cat(steps[6]))

    # Two ranks over the stream together see the single-process step.
    ranks = [StepLoader(build_datasets(cfg, tok)[0], batch_size=64, micro_batch_size=16, rank=r, world_size=2)
             for r in range(2)]
    assert torch.equal(torch.cat([mb for r in ranks for mb in r.next_step()]), torch.cat(steps[0]))


def test_hub_errors(hub_json, make_cfg):
    make, _ = hub_json
    with pytest.raises(LlmxError, match="needs data.hub_name"):
        sources.documents(make_cfg(source="hub"), "train")
    with pytest.raises(LlmxError, match=r"no column 'body'.*columns present: \['text', 'id'\]"):
        sources.documents(make(text_field="body"), "train")
    # A validation split the data files do not have: the message says how to hold out documents instead.
    with pytest.raises(LlmxError, match="hub_val_split=null"):
        sources.documents(OmegaConf.merge(make(), {"hub_val_split": "validation"}), "validation")
