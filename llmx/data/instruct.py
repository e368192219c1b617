"""Instruction data for supervised fine-tuning: (prompt, response) pairs, rendered with the model's chat
template, loss on the response tokens only, packed into fixed-length sequences.

Sources (one or more, each a dict of the `sources` list):
  {kind: file, path: a.jsonl}      local .jsonl / .json records in the Alpaca format (instruction, input,
                                   output: GPT4-Alpaca and most instruction sets), prompt/response, or chat
                                   messages [{role, content}, ...] whose last message is the assistant's.
                                   Held out by a stable hash of the prompt (val_fraction).
  {kind: pydoc_qa}                 generated offline from the embedded pydoc corpus (Python's documentation
                                   topics, PSF license): "Explain <section> in Python." answered by the
                                   section's text (the first max_words words). Held out by topic, with the
                                   same hash and fraction (0.25) as the pydoc data group. Topics overlap:
                                   a training answer that shares a 64-character window with a held-out
                                   topic or with the pydoc data group's validation text (llmx.data.split)
                                   is dropped, so no held-out answer and none of pydoc_eval's validation
                                   text is trained on.
  {kind: gsm_infinite}             GSM-Infinite word problems (llmx.bench.gsm_infinite, `args`: subset, ops)
                                   answered by their step-by-step solutions. Train and validation problems
                                   come from separate random streams; validation problems seen in training
                                   are dropped.

A packed item is a [2, seq_len] LongTensor (input ids; labels with IGNORE_INDEX on prompts and padding),
so StepLoader stacks them as it does text blocks; `PairLoader` and `pair_eval_batches` turn micro-batches
into the {input_ids, labels} dicts the trainer's loss takes.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llmx.utils import LlmxError

IGNORE_INDEX = -100
KINDS = ("file", "pydoc_qa", "gsm_infinite")
Pair = Tuple[str, str]


# ---------------------------------------------------------------------------------------------- sources


def _get(src: Any, key: str, default: Any = None) -> Any:
    return src.get(key, default) if hasattr(src, "get") else getattr(src, key, default)


def instruction_pairs(sources: Sequence[Any], split: str, seed: int = 0) -> List[Pair]:
    """The (prompt, response) pairs of `split` ("train" or "validation") over all sources, in order."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not sources:
        raise LlmxError("instruction data: no sources; give at least one of kind " + ", ".join(KINDS))
    out: List[Pair] = []
    for n, src in enumerate(sources):
        kind = _get(src, "kind")
        if kind not in KINDS:
            raise LlmxError(f"instruction data source {n}: kind={kind!r}; valid: {', '.join(KINDS)}")
        args = dict(_get(src, "args", None) or {})
        limit = _get(src, "n", None)
        if kind == "file":
            pairs = _file_pairs(_get(src, "path"), split, float(_get(src, "val_fraction", 0.1)))
        elif kind == "pydoc_qa":
            pairs = _pydoc_pairs(split, **args)
        else:
            pairs = _gsm_pairs(split, seed, int(limit or 1000) if split == "train" else int(_get(src, "n_val", 200)),
                               **args)
        out += pairs[:limit] if (limit and kind != "gsm_infinite") else pairs
    return out


def _file_pairs(path: Optional[str], split: str, val_fraction: float) -> List[Pair]:
    from llmx.data.sources import validation_mask

    if not path:
        raise LlmxError("instruction data source kind=file needs path (a .jsonl or .json file)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise LlmxError(f"instruction data: {path} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if p.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise LlmxError(f"instruction data: {path} is not valid JSON{'' if p.suffix == '.json' else ' lines'}: {e}") from e
    pairs = [_record_pair(r, f"{path} record {i}") for i, r in enumerate(records)]
    mask = validation_mask([q for q, _ in pairs], val_fraction)
    return [pr for pr, is_val in zip(pairs, mask) if is_val == (split == "validation")]


def _record_pair(r: Any, where: str) -> Pair:
    if not isinstance(r, dict):
        raise LlmxError(f"{where}: expected an object, got {type(r).__name__}")
    if "instruction" in r and "output" in r:  # Alpaca
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        return prompt, r["output"]
    if "prompt" in r and "response" in r:
        return r["prompt"], r["response"]
    if "messages" in r:
        msgs = r["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise LlmxError(f"{where}: the last message must be the assistant's")
        prompt = "\n\n".join(m["content"] for m in msgs[:-1] if m.get("role") != "system")
        return prompt, msgs[-1]["content"]
    raise LlmxError(f"{where}: no instruction/output, prompt/response or messages fields (has {sorted(r)})")


_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}\s*$")
_PROMPTS = ("Explain {t} in Python.", "What does the Python reference say about {t}?",
            "Describe {t} in Python.")


def _pydoc_sections(text: str) -> List[Tuple[str, str]]:
    """(title, body) of every underlined section of a pydoc topic."""
    lines = text.splitlines()
    heads = [i - 1 for i in range(1, len(lines)) if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()]
    out = []
    for k, h in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        body = "\n".join(lines[h + 2:end]).strip()
        if body:
            out.append((lines[h].strip(), body))
    return out


def _clip_words(text: str, max_words: int) -> str:
    """The first paragraphs of `text` within max_words words (at least the first paragraph's sentences)."""
    words = 0
    kept: List[str] = []
    for para in text.split("\n\n"):
        n = len(para.split())
        if kept and words + n > max_words:
            break
        if not kept and n > max_words:  # one long paragraph: cut at the last sentence end that fits
            cut = " ".join(para.split()[:max_words])
            stop = cut.rfind(". ")
            return cut[: stop + 1] if stop > 0 else cut
        kept.append(para)
        words += n
    return "\n\n".join(kept)


def _pydoc_pairs(split: str, val_fraction: float = 0.25, max_words: int = 120, window: int = 64) -> List[Pair]:
    import numpy as np

    from llmx.data import split as splitting
    from llmx.data.sources import documents, pydoc_corpus, validation_mask

    corpus = pydoc_corpus()
    mask = validation_mask([topic for topic, _ in corpus], val_fraction)
    held_out: List[str] = []
    if split != "validation":
        held_out = [text for (_, text), is_val in zip(corpus, mask) if is_val]
        held_out += documents({"name": "pydoc", "source": "pydoc", "val_fraction": val_fraction,
                               "overlap_window": window}, "validation").load()
    forbidden = np.unique(np.concatenate([splitting.window_hashes(t, window) for t in held_out] or [np.zeros(0, np.uint64)]))
    pairs = []
    for (topic, text), is_val in zip(corpus, mask):
        if is_val != (split == "validation"):
            continue
        for title, body in _pydoc_sections(text):
            answer = _clip_words(body, max_words)
            # An answer shorter than the window has no window to check: it is compared whole.
            if not is_val and (splitting.shares_window(answer, forbidden, window)
                               or (len(answer) < window and any(answer in t for t in held_out))):
                continue
            title = title.replace('"', "")
            title = "the " + title[4:] if title.startswith("The ") else title
            pairs.append((_PROMPTS[len(pairs) % len(_PROMPTS)].format(t=title), answer))
    return pairs


def _gsm_pairs(split: str, seed: int, n: int, subset: str = "medium", ops: Sequence[int] = (2, 3, 4)) -> List[Pair]:
    from llmx.bench.gsm_infinite import GSMInfinite

    gen = GSMInfinite()
    rng = random.Random(f"{seed}/{split}")
    seen = set()
    if split == "validation":  # drop problems that also occur in the training stream
        train_rng = random.Random(f"{seed}/train")
        seen = {gen.generate(subset, ops[k % len(ops)], 0, train_rng, None)["problem"] for k in range(2 * n)}
    pairs = []
    for k in range(n):
        r = gen.generate(subset, ops[k % len(ops)], 0, rng, None)
        if r["problem"] in seen:
            continue
        pairs.append((f"{r['problem']} {r['question']}\nSolve it step by step; end with 'Answer: <number>'.",
                      r["solution"]))
    return pairs


# ---------------------------------------------------------------------------------------------- packing


def render(tok, prompt: str, response: str, chat_template: bool = True) -> Tuple[List[int], List[int]]:
    """Token ids of the prompt (with the template's generation prompt) and of the response (ending the
    turn). Without a chat template: "<prompt>\\n" and "<response>" + EOS."""
    if chat_template and getattr(tok, "chat_template", None):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                       tokenize=False)
        if not full.startswith(head):
            raise LlmxError("the tokenizer's chat template does not render the prompt as a prefix of the whole "
                            "conversation; set chat_template=false")
        p_text, r_text = head, full[len(head):]
    else:
        p_text, r_text = prompt + "\n", response + (tok.eos_token or "")
    return tok(p_text, add_special_tokens=False)["input_ids"], tok(r_text, add_special_tokens=False)["input_ids"]


def pack_pairs(tok, pairs: Sequence[Pair], seq_len: int, chat_template: bool = True) -> Tuple[List[torch.Tensor], Dict[str, int]]:
    """Text pairs rendered with the tokenizer (`render`) and packed by `pack_token_pairs`."""
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    return pack_token_pairs([render(tok, p, r, chat_template) for p, r in pairs], seq_len, pad)


def pack_token_pairs(pairs: Sequence[Tuple[List[int], List[int]]], seq_len: int, pad: int
                     ) -> Tuple[List[torch.Tensor], Dict[str, int]]:
    """[2, seq_len] items holding whole (prompt ids, response ids) examples (prompt labels masked), padded
    with `pad`; an example longer than seq_len keeps its prompt and the start of its response. Also counts
    examples, truncated, skipped (prompt alone too long), response tokens and tokens (padding excluded)."""
    items: List[torch.Tensor] = []
    ids: List[int] = []
    labels: List[int] = []
    stats = {"examples": 0, "truncated": 0, "skipped": 0, "response_tokens": 0, "tokens": 0}

    def flush():
        if ids:
            n = seq_len - len(ids)
            items.append(torch.tensor([ids + [pad] * n, labels + [IGNORE_INDEX] * n], dtype=torch.long))
            ids.clear()
            labels.clear()

    for p, r in pairs:
        if len(p) + 8 > seq_len:
            stats["skipped"] += 1
            continue
        if len(p) + len(r) > seq_len:
            r = r[: seq_len - len(p)]
            stats["truncated"] += 1
        if len(ids) + len(p) + len(r) > seq_len:
            flush()
        ids += p + r
        labels += [IGNORE_INDEX] * len(p) + r
        stats["examples"] += 1
        stats["response_tokens"] += len(r)
        stats["tokens"] += len(p) + len(r)
    flush()
    return items, stats


def pair_batch(mb: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"input_ids": mb[:, 0], "labels": mb[:, 1]}


class PairLoader:
    """StepLoader over [2, T] items, yielding {input_ids, labels} micro-batches (resumable like it)."""

    def __init__(self, dataset, **kw):
        from llmx.data import StepLoader

        self.inner = StepLoader(dataset, **kw)

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        return [pair_batch(mb) for mb in self.inner.next_step()]

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def pair_eval_batches(val, **kw) -> Iterator[Dict[str, torch.Tensor]]:
    from llmx.data import eval_batches

    return (pair_batch(mb) for mb in eval_batches(val, **kw))
