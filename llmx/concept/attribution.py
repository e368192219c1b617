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

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmx.concept.sae import TopKSAE
from llmx.utils import LlmxError

SELECTIONS = ("attribution", "activation")
IGNORE = -100


def _residual_and_grad(teacher: nn.Module, layer: int, input_ids: Tensor, attention_mask: Optional[Tensor]):
    """The teacher's residual after block `layer` and dL_NTP/dh (teacher weights need no gradient)."""
    from llmx.concept.sae import teacher_blocks

    blocks = teacher_blocks(teacher)
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


# ---------------------------------------------------------------------------------------------- label cache
# Labels can be computed once, ahead of training, for a fixed set of token blocks (the teacher's forward and
# backward then cost nothing per step). The cache is a directory of shards, labels_00000.npy ... (int32
# [blocks, T, top]: SAEs can exceed 32k latents) with keys_00000.npy ... (a content key per block, so a batch is
# looked up by its tokens), and meta.json with a fingerprint of everything the labels depend on: the teacher's
# weights, the SAE, the tokenizer, top, selection and the token blocks themselves. A consumer names what it uses;
# any difference is refused with the part that differs.
CACHE_FORMAT = "llmx-concept-labels/1"


def _digest(*parts) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def teacher_fingerprint(model: nn.Module) -> str:
    """Names, shapes and the first values of every parameter (cheap; any retraining or other model changes it)."""
    parts = []
    for name, p in sorted(model.named_parameters()):
        parts.append(f"{name}:{tuple(p.shape)}:{p.detach().reshape(-1)[:8].float().tolist()}")
    return _digest(*parts)


def sae_fingerprint(sae: TopKSAE) -> str:
    import json

    state = sae.state_dict()
    return _digest(json.dumps(sae.cfg.__dict__, sort_keys=True),
                   *(_tensor_bytes(state[k]) for k in sorted(state) if k != "tokens_since_fired"))


def blocks_fingerprint(blocks: Tensor) -> str:
    return _digest(tuple(blocks.shape), _tensor_bytes(blocks.to(torch.int64)))


def labels_fingerprint(teacher: nn.Module, sae: TopKSAE, tokenizer, blocks: Tensor, top: int,
                       selection: str) -> Dict[str, str]:
    from llmx.data.tokenizer import tokenizer_fingerprint

    return {"teacher": teacher_fingerprint(teacher), "sae": sae_fingerprint(sae),
            "tokenizer": tokenizer_fingerprint(tokenizer), "blocks": blocks_fingerprint(blocks),
            "top": str(top), "selection": selection}


def _shard_path(root: Path, i: int, kind: str = "labels") -> Path:
    return root / f"{kind}_{i:05d}.npy"


def block_key(row: Tensor) -> int:
    """A 63-bit content key of one token block: labels are a function of the block's tokens alone, so the cache
    is addressed by content and the training loop needs no block indices."""
    import hashlib

    digest = hashlib.blake2b(row.to(torch.int64).cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _save_npy(path: Path, array) -> None:
    import numpy as np

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def build_label_cache(out_dir, teacher: nn.Module, sae: TopKSAE, blocks: Tensor, fingerprint: Dict[str, str],
                      top: int = 4, selection: str = "attribution", batch_size: int = 8, shard_blocks: int = 256,
                      progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Labels of every block of `blocks` [N, T] into out_dir. Resumable: finished shards are kept, so a killed
    build continues where it stopped; a directory made for other inputs is refused."""
    import numpy as np

    from llmx.utils import atomic_write_json

    root = Path(out_dir)
    n, t = blocks.shape
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "blocks": n, "seq_len": t, "top": top,
            "shard_blocks": shard_blocks}
    if (root / "meta.json").is_file():
        _check_meta(root, fingerprint, n, t)
    else:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / "meta.json", {**meta, "complete": False})
    device = next(teacher.parameters()).device
    shards = range(math.ceil(n / shard_blocks))
    for s in shards:
        path = _shard_path(root, s)
        if path.is_file():
            continue
        rows = blocks[s * shard_blocks:(s + 1) * shard_blocks]
        out = [concept_labels(teacher, sae, rows[i:i + batch_size].to(device), top=top, selection=selection).cpu()
               for i in range(0, len(rows), batch_size)]
        # Keys first: a shard counts as done once its labels file exists.
        _save_npy(_shard_path(root, s, "keys"), np.array([block_key(r) for r in rows], dtype=np.int64))
        _save_npy(path, torch.cat(out).to(torch.int32).numpy())
        if progress:
            progress(min(n, (s + 1) * shard_blocks), n)
    atomic_write_json(root / "meta.json", {**meta, "complete": True})
    return root


def _check_meta(root: Path, fingerprint: Dict[str, str], n: int, t: int) -> Dict[str, Any]:
    from llmx.utils import read_format_json

    meta = read_format_json(root / "meta.json", CACHE_FORMAT, f"{root} is not a concept-label cache (no meta.json)")
    for key, want in fingerprint.items():
        have = meta["fingerprint"].get(key)
        if have != want:
            raise LlmxError(f"concept labels in {root} do not match this run's {key} (cached {key} fingerprint {have}, "
                            f"this run's {want}); delete the directory or point the run at a matching cache")
    if (meta["blocks"], meta["seq_len"]) != (n, t):
        raise LlmxError(f"concept labels in {root} cover {meta['blocks']} blocks of {meta['seq_len']} tokens; "
                        f"this run has {n} of {t}")
    return meta


class LabelCache:
    """Read side of a complete cache: cache.lookup(blocks [B, T]) -> int64 labels [B, T, top]."""

    def __init__(self, root, fingerprint: Dict[str, str], n_blocks: int, seq_len: int):
        import numpy as np

        self.root = Path(root)
        meta = _check_meta(self.root, fingerprint, n_blocks, seq_len)
        if not meta.get("complete"):
            raise LlmxError(f"concept labels in {self.root} are incomplete: build_label_cache resumes the build")
        n_shards = math.ceil(n_blocks / meta["shard_blocks"])
        self.shards = [np.load(_shard_path(self.root, s), mmap_mode="r") for s in range(n_shards)]
        self.where = {}
        for s in range(n_shards):
            for row, key in enumerate(np.load(_shard_path(self.root, s, "keys")).tolist()):
                self.where[key] = (s, row)

    def lookup(self, blocks: Tensor) -> Tensor:
        import numpy as np

        rows = []
        for r in blocks:
            hit = self.where.get(block_key(r))
            if hit is None:
                raise LlmxError(f"a token block is not in the concept-label cache {self.root}: it was built for other "
                                "data (the fingerprint covers the blocks; was the cache edited?)")
            rows.append(self.shards[hit[0]][hit[1]])
        return torch.from_numpy(np.stack(rows)).to(torch.int64).to(blocks.device)
