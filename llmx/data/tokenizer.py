"""Tokenizers: train a byte-level BPE on the training split, or load a pretrained one.

`source=trained` trains a GPT-2 style byte-level BPE with the `tokenizers` library: the ByteLevel
pre-tokenizer (GPT-2 regex, no prefix space, no normalizer) maps every byte to a symbol, so any text
encodes without unknown tokens and `decode(encode(x)) == x` exactly. The only special token is
"<|endoftext|>" (id 0): it separates documents in the packed stream and doubles as the pad token
(as in GPT-2). Training is deterministic (same text and vocab_size -> identical tokenizer.json, also
across processes), which is what makes caching by content sound.

The result is cached under `cache_dir/tokenizers/<sha256(text hash, vocab_size, ALGORITHM_VERSION)>/`
as a `save_pretrained` directory (loadable with AutoTokenizer), written to a temporary directory
and renamed into place, so concurrent ranks or runs never see a half-written tokenizer. Bump
ALGORITHM_VERSION when the training recipe changes.

Note: the BPE trainer stops early when the text has no more pairs to merge, so `len(tokenizer)` can
be below data.tokenizer.vocab_size on small corpora; size the model's embedding from `len(tokenizer)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from llmx.config.schema import TokenizerSource
from llmx.data.sources import TRAIN, as_data_config, documents
from llmx.utils import LlmxError, atomic_write_json, cache_dir, publish_dir, sha256_text

ALGORITHM_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + EOS


def build_tokenizer(data_cfg: Any, model_tokenizer: Any = None):
    """The tokenizer that data.tokenizer.source asks for (see the module docstring)."""
    cfg = as_data_config(data_cfg)
    source = TokenizerSource(cfg.tokenizer.source)
    if source is TokenizerSource.model:
        if model_tokenizer is None:
            raise LlmxError("data.tokenizer.source=model needs a pretrained model (model.source=hf|gguf)")
        return model_tokenizer
    if source is TokenizerSource.pretrained:
        return _pretrained(cfg.tokenizer.path)
    texts, text_sha = training_text(cfg)
    return train_bpe(texts, cfg.tokenizer.vocab_size, cache_dir(cfg.cache_dir) / "tokenizers", text_sha)


def _pretrained(path: Optional[str]):
    if not path:
        raise LlmxError("data.tokenizer.source=pretrained needs data.tokenizer.path (a tokenizer directory or hub id)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise LlmxError(f"data.tokenizer.path={path!r}: could not load a tokenizer: {e}") from e


def training_text(data_cfg: Any) -> Tuple[List[str], str]:
    """The training documents, truncated to data.tokenizer.train_chars in total, and their sha256."""
    cfg = as_data_config(data_cfg)
    budget = cfg.tokenizer.train_chars
    texts: List[str] = []
    h = hashlib.sha256()
    for doc in documents(cfg, TRAIN).load():
        if budget <= 0:
            break
        doc = doc[:budget]
        budget -= len(doc)
        texts.append(doc)
        h.update(doc.encode())
        h.update(b"\0")
    if not texts:
        raise LlmxError("data: the training split has no documents to train a tokenizer on")
    return texts, h.hexdigest()


def _train(texts: List[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def train_bpe(texts: List[str], vocab_size: int, root: Path, text_sha: Optional[str] = None):
    """Train (or load from `root`) a byte-level BPE on `texts`; returns a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise LlmxError(f"data.tokenizer.vocab_size={vocab_size} is below {MIN_VOCAB} (256 byte symbols + {EOS_TOKEN})")
    if text_sha is None:
        text_sha = sha256_text(*texts)
    key = sha256_text(text_sha, str(vocab_size), f"bytelevel-bpe-v{ALGORITHM_VERSION}")[:24]
    final = root / key
    if not (final / "tokenizer.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_train(texts, vocab_size),
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            # Cleanup would strip spaces before punctuation; transformers 5 skips it for BPE but warns.
            clean_up_tokenization_spaces=False,
        )
        # A concurrent process that published the same key first wins; its copy is identical.
        with publish_dir(final) as tmp:
            fast.save_pretrained(tmp)
            atomic_write_json(
                Path(tmp) / "llmx_tokenizer.json",
                {
                    "algorithm_version": ALGORITHM_VERSION,
                    "vocab_size_requested": vocab_size,
                    "vocab_size": len(fast),
                    "train_documents": len(texts),
                    "train_chars": sum(map(len, texts)),
                    "text_sha256": text_sha,
                    "train_seconds": round(time.perf_counter() - start, 3),
                },
            )
    # Always load from disk, so that a cache hit and a fresh training return the same object.
    return PreTrainedTokenizerFast.from_pretrained(str(final))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what a tokenizer does to text: its tokenizer.json (or vocabulary) and EOS id.

    Truncation and padding settings are left out: transformers changes them on the backend during
    calls, and they do not affect how we tokenize documents.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return sha256_text(type(tokenizer).__name__, body, str(tokenizer.eos_token_id))
