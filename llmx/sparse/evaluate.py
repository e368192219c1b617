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
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llmx.sparse.rsparse import RSparseLinear, achieved_sparsity, sparse_tail


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
    ppl_se = ppl * nll_se to first order; nll_rows: each row's mean NLL (two models on the same windows compare
    row by row: a paired difference, much tighter than either standard error)."""
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
            "ppl_se": None if se is None else math.exp(nll) * se, "nll_rows": per_row}


def greedy_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, compiled: Optional[bool] = None,
                    backend: str = "inductor", mode: str = "reduce-overhead") -> torch.Tensor:
    """Greedy decoding of exactly `new_tokens` tokens, as it is served: with `compiled` (default: on CUDA) a static KV
    cache and the single-token step compiled whole (fullgraph; mode reduce-overhead captures it in a CUDA graph), so
    that launch overhead, norms and RoPE do not hide the GEMVs -- the sparse layers' kernel is one traced operator.
    The prompt runs eagerly. Off CUDA, compiled=True compiles with `backend` (tests use aot_eager)."""
    from transformers import CompileConfig

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled if compiled is not None else prompt.is_cuda:
        config = CompileConfig(fullgraph=True, backend=backend, mode=None if backend != "inductor" else mode)
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        kwargs.update(cache_implementation="static", compile_config=config)
    else:
        kwargs.update(disable_compile=True)
    return model.generate(prompt, **kwargs)


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3,
                 compiled: Optional[bool] = None) -> Dict[str, float]:
    """Greedy decoding with the KV cache (greedy_generate; compiled on CUDA): new tokens per second, best of
    `repeats` after a warm-up of the same length (which also compiles)."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    compiled = device.type == "cuda" if compiled is None else compiled
    if compiled:  # compiled around other layers before: trace afresh rather than pile up recompilations, which stop
        torch._dynamo.reset()  # at dynamo's recompile limit (8) and then fall back to eager without a word
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
    greedy_generate(model, prompt, new_tokens, compiled=compiled)  # warm-up (and compilation)
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = greedy_generate(model, prompt, new_tokens, compiled=compiled)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"tokens_per_s": new_tokens / best, "seconds": best, "tokens": out[0, prompt.shape[1]:].tolist(),
            "compiled": compiled}


@torch.inference_mode()
def match_sparsity(model: nn.Module, layers: Mapping[str, RSparseLinear], windows: Sequence[torch.Tensor],
                   target: float, *, tol: float = 0.002, max_steps: int = 30,
                   shapes: Optional[Mapping[str, Tuple[int, int]]] = None) -> Dict[str, float]:
    """Scale every layer's threshold by one factor c so that the weight reads saved on `windows`, weighted by layer
    size over `shapes` (every targeted layer, {name: (in, out)}: those a plan keeps dense count as saving nothing;
    default: `layers`), are within `tol` of `target`: methods compared at the sparsity they achieve, not the one
    they plan (calibration and evaluation text differ, so thresholds from one miss the target on the other by up
    to a few points). Regula falsi on log c; the layers keep the matched thresholds. Use windows that are not scored:
    no loss is read, but the scored text should not set its own thresholds.
    Returns {"scale": c, "achieved": sparsity on windows, "steps": forward passes}."""
    base = {n: layer.threshold for n, layer in layers.items()}
    shapes = shapes if shapes is not None else {n: (m.in_features, m.out_features) for n, m in layers.items()}
    body = model.get_decoder() if hasattr(model, "get_decoder") else model  # the layers' inputs need no lm_head
    device = next(model.parameters()).device
    steps = 0

    def gap(c: float) -> float:  # achieved - target at scale 2^c; rises with c
        nonlocal steps
        steps += 1
        for n, layer in layers.items():
            layer.threshold = base[n] * 2.0 ** c
            layer.track, layer.seen_tokens, layer.active_channels = True, 0, 0.0
        for ids in windows:
            body(input_ids=ids.to(device))
        achieved = achieved_sparsity(layers, shapes)
        for layer in layers.values():
            layer.track, layer.seen_tokens, layer.active_channels = False, 0, 0.0
        return achieved - target

    # Bracket the root of gap in log2 c from c = 0 by doubling steps, then regula falsi (Illinois): a handful of
    # forward passes where bisection over [-8, 8] took about a dozen.
    a, fa = 0.0, gap(0.0)
    c, fc = a, fa
    step = -0.25 if fa > 0 else 0.25
    while abs(fc) > tol and fa * fc > 0 and abs(c) < 8 and steps < max_steps:
        a, fa = c, fc
        c, step = c + step, step * 2
        fc = gap(c)
    b, fb, side = c, fc, 0
    while abs(fc) > tol and fa * fb < 0 and steps < max_steps:
        c = b - fb * (b - a) / (fb - fa)
        fc = gap(c)
        if fc * fb < 0:
            a, fa = b, fb
            side = 0
        else:
            side += 1
            if side > 1:  # the same end kept twice: halve the other's weight (Illinois)
                fa /= 2
        b, fb = c, fc
    if abs(fc) > tol:
        for n, layer in layers.items():
            layer.threshold = base[n]
        raise RuntimeError(f"threshold scale 2^{c:.3f} reaches sparsity {fc + target:.4f}, not {target} ± {tol}: the "
                           "layers cannot reach the target on this text")
    return {"scale": 2.0 ** c, "achieved": fc + target, "steps": steps}
