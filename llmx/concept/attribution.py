"""CoCoMix's concept labels (Tack et al., 2025, arXiv 2502.08524, section 3.1): which SAE concepts of the teacher
matter for its next-token prediction at each position.

For the teacher's residual h_t at the SAE's block and its SAE code z_t (TopK-sparse), the attribution of concept i
is the first-order effect of removing it on the teacher's next-token loss:

    a_t,i = (dL_NTP/dh_t . W_dec[:, i]) * z_t,i

with L_NTP the teacher's mean next-token cross-entropy over the batch (as the reference computes it). The labels
of position t are the `top` (4) concepts with the largest a_t,i. `selection="activation"` (the paper's ablation)
ranks by z_t,i instead and needs no backward pass.

Choices where the reference is silent or its behaviour is an artefact (each a parameter or documented here):

* The reference takes the top 4 of the DENSE attribution over all latents; inactive latents score exactly 0, so
  whenever fewer than 4 active latents have a positive score it labels arbitrary inactive latents (the lowest
  indices). llmx ranks the k ACTIVE latents only (the only ones with a defined attribution).
* A position whose gradient is identically zero has no attribution; in the reference that is the last position
  of every block (its residual influences no prediction) and it is labelled with latents 0-3. llmx labels such
  positions -100 (ignored by the concept loss), as it does padded positions.
* With a normalising SAE, dh/dz_i = sigma_t W_dec[:, i]: the per-token factor sigma_t > 0 does not change the
  ranking within a position, so it is left out, as in the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmx.concept.sae import TopKSAE
from llmx.utils import LlmxError

SELECTIONS = ("attribution", "activation")
IGNORE = -100


def _residual_and_grad(teacher: nn.Module, layer: int, input_ids: Tensor, attention_mask: Optional[Tensor]):
    """The teacher's residual after block `layer` and dL_NTP/dh (teacher weights need no gradient)."""
    from llmx.trainer.distributed import decoder_layers

    blocks = decoder_layers(teacher)
    if not 0 <= layer < len(blocks):
        raise LlmxError(f"concept labels: SAE layer {layer} outside the teacher's {len(blocks)} blocks")
    box = []

    def hook(_mod, _inp, out):
        h = (out[0] if isinstance(out, tuple) else out).detach().requires_grad_(True)
        box.append(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = blocks[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            labels = input_ids[:, 1:]
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
            (grad,) = torch.autograd.grad(loss, box[0])
    finally:
        handle.remove()
    return box[0].detach(), grad


@torch.no_grad()
def _scores(sae: TopKSAE, grad: Tensor, idx: Tensor, val: Tensor, chunk: int = 8) -> Tensor:
    """(grad_t . W_dec[:, idx_t,j]) * val_t,j for the k active latents, k columns at a time (never [B, T, n])."""
    w = sae.decoder.weight.t()  # [n, d]
    g = grad.to(w.dtype)
    out = torch.empty_like(val)
    for j in range(0, idx.shape[-1], chunk):
        cols = w[idx[..., j:j + chunk]]  # [B, T, c, d]
        out[..., j:j + chunk] = torch.einsum("btd,btcd->btc", g, cols)
    return out * val


def concept_labels(teacher: nn.Module, sae: TopKSAE, input_ids: Tensor, top: int = 4,
                   selection: str = "attribution", attention_mask: Optional[Tensor] = None) -> Tensor:
    """Concept labels [B, T, top] (int64; -100 where undefined) of token blocks input_ids [B, T]."""
    if selection not in SELECTIONS:
        raise LlmxError(f"concept labels: selection={selection!r}; valid: {', '.join(SELECTIONS)}")
    if not 1 <= top <= sae.cfg.k:
        raise LlmxError(f"concept labels: top={top} must be in [1, the SAE's k={sae.cfg.k}]")
    if selection == "activation":
        from llmx.concept.sae import block_output

        with torch.no_grad():
            h = block_output(teacher, sae.cfg.layer, input_ids, attention_mask)
        grad = None
    else:
        h, grad = _residual_and_grad(teacher, sae.cfg.layer, input_ids, attention_mask)
    with torch.no_grad():
        idx, val = sae.encode(h.to(sae.pre_bias.dtype))
        score = val if grad is None else _scores(sae, grad, idx, val)
        labels = idx.gather(-1, score.topk(top, dim=-1).indices)
        undefined = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        if grad is not None:
            undefined |= (grad == 0).all(-1)
        if attention_mask is not None:
            undefined |= attention_mask == 0
        return labels.masked_fill(undefined[..., None], IGNORE)
