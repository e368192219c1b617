"""Quality and speed of a (sparsified) causal LM: token-level perplexity and batch-1 decode speed.

Perplexity is exp(mean next-token NLL) over fixed windows of held-out text, token-level (not lm-eval's
word perplexity, which differs a lot for the same model). With token_mode=last_fraction only the
sparsified tokens (the last fraction of each window) are scored, against the dense model on the same
tokens, so the figure says what sparsity did; with "all" every predicted token is scored.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def perplexity(model: nn.Module, windows: Sequence[torch.Tensor], score_fraction: Optional[float] = None) -> Dict[str, float]:
    """windows: token-id tensors (B x T). score_fraction: score only the last ceil(f * T) positions."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for ids in windows:
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        if score_fraction is not None:
            n = max(1, math.ceil(score_fraction * ids.shape[1]))
            logits, target = logits[:, -n:], target[:, -n:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


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
