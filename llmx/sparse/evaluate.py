"""Quality and speed of a (sparsified) causal LM: token-level perplexity and batch-1 decode speed.

Perplexity is exp(mean next-token NLL) over fixed windows of held-out text, token-level (not lm-eval's
word perplexity, which differs a lot for the same model). With token_mode=last_fraction only the
predictions made at sparsified positions (the last fraction of each window, less the last position, which has no
target) are scored, against the dense model on the same tokens, so the figure says what sparsity did; with "all"
every predicted token is scored.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmx.sparse.rsparse import sparse_tail


@torch.inference_mode()
def scored_positions(t: int, score_fraction: Optional[float] = None) -> slice:
    """The positions of a t-token window whose next-token predictions are scored: all but the last (it has no
    target); with score_fraction, those the last_fraction layers computed sparsely (llmx.sparse.rsparse.sparse_tail),
    so that no dense position is scored."""
    if score_fraction is None:
        return slice(0, t - 1)
    first = t - sparse_tail(t, score_fraction)
    if first >= t - 1:
        raise ValueError(f"score_fraction={score_fraction} leaves no sparse position with a target in {t} tokens")
    return slice(first, t - 1)


@torch.inference_mode()
def perplexity(model: nn.Module, windows: Sequence[torch.Tensor], score_fraction: Optional[float] = None) -> Dict[str, float]:
    """windows: token-id tensors (B x T). score_fraction: score only the sparse positions (scored_positions).
    nll_se: the standard error of the mean NLL over the windows' rows (each a text sample of equal length), so
    ppl_se = ppl * nll_se to first order."""
    total, count, per_row = 0.0, 0, []
    device = next(model.parameters()).device
    for ids in windows:
        ids = ids.to(device)
        span = scored_positions(ids.shape[1], score_fraction)
        logits = model(input_ids=ids).logits[:, span].float()
        target = ids[:, span.start + 1: span.stop + 1]
        loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # B x scored
        total += float(loss.sum())
        count += target.numel()
        per_row += loss.mean(dim=1).tolist()
    nll, n = total / count, len(per_row)
    # Rows of one window length: their mean NLLs average to nll, and their spread gives its standard error.
    se = math.sqrt(sum((x - nll) ** 2 for x in per_row) / (n - 1) / n) if n > 1 else None
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "nll_se": se,
            "ppl_se": None if se is None else math.exp(nll) * se}


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> Dict[str, float]:
    """Greedy batch-1 decoding with the KV cache: new tokens per second (best of `repeats`, after a warm-up)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return {"tokens_per_s": new_tokens / best, "seconds": best, "tokens": out[0, prompt.shape[1]:].tolist()}
