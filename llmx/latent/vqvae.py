"""The VQ-VAE of "Token Assorted: Mixing Latent and Text Tokens for Improved Language Model Reasoning"
(Su et al., 2025, arXiv 2502.03275), in plain PyTorch.

A sample is X = P + C + S (prompt, chain of thought, solution). The VQ-VAE maps a chunk of L text tokens to
L/r vectors (encoder f_enc), replaces each by its nearest codebook vector (argmin_i ||e_i - x||^2), and a
decoder f_dec reconstructs the L tokens from the quantised vectors conditioned on a prompt embedding g(P).
Loss = token reconstruction + codebook (VQ) loss + beta * commitment. It is trained on the chunks of the whole
X and applied only to C, whose codes then replace the leading chunks of the CoT for the language model.

Stated by the paper (or secondary sources): L = 16, r = 16 (one latent per chunk), codebook 1024 (64-1024
across tasks), ~50M parameters, Adam lr 1e-5, batch 32, 100k steps. Everything else is left open; the
choices made here, each a `VQVAEConfig` field or documented behaviour:

* Architecture: pre-norm (norm_first) bidirectional nn.TransformerEncoder stacks, GELU, feed-forward
  `ff_mult * dim`, `layers` layers in the encoder and again in the decoder, `prompt_layers` in g(P).
  One token-embedding table is shared by g(P) and f_enc (both read text); the decoder has its own output head.
* g(P): token embedding + learned positions, `prompt_layers` transformer layers, final LayerNorm, masked mean
  pooling to one vector. Prompts longer than `max_prompt_len` keep their LAST `max_prompt_len` tokens (the
  end of a prompt, next to the CoT, is assumed the most informative). An empty prompt gives a zero vector.
* f_enc: token embedding + learned positions over the L chunk tokens (when `encoder_prompt`, g(P) is
  prepended as one extra token the chunk attends to), final LayerNorm, then every group of r consecutive
  positions is mean-pooled over its non-pad tokens (a group with none gives the zero vector) and passed
  through a linear pre-quantisation projection.
* Quantiser: squared Euclidean nearest neighbour, straight-through estimator (zq = z + sg(zq - z)).
  Commitment loss beta * mean ||z - sg(e)||^2 over real latents. `codebook_update`:
  "ema": the codebook is a buffer-like parameter (no gradient) updated in training mode by exponential moving
  averages of cluster sizes N_i and sums m_i (decay `ema_decay`), with Laplace smoothing
  N_i <- (N_i + eps) / (n + K eps) * n and e_i = m_i / N_i (van den Oord et al. 2017, appendix; VQ-VAE-2).
  N starts at 1 and m at the initial codebook, so an unused code decays in numerator and denominator alike
  and stays where it is (instead of blowing up, as with N = 0) until a dead-code restart moves it.
  "loss": the codebook is learned by gradient through the term mean ||sg(z) - e||^2.
* Codebook init: N(0, 1/dim) per coordinate (vectors of norm ~1, like the projected encoder outputs).
* Dead codes: in training mode a code not chosen for `dead_code_steps` consecutive quantiser calls is
  restarted at a random (detached) encoder output of the current batch, its EMA statistics reset to it;
  0 disables.
* f_dec: non-autoregressive. The sequence [g(P), zq_1..zq_n, q_1..q_L] (plus a learned type embedding for
  g(P) and learned positions for the latents and the L query slots) goes through `layers` transformer layers
  with full attention; a LayerNorm + linear head reads token logits at the query slots.
* Reconstruction loss: token cross-entropy averaged over non-pad positions of the chunk.
* Data: training chunks cover the whole X, each part chunked from its own start: P at 0, L, 2L, ..., then C,
  then S (a part's last chunk may be partial and is padded; padding is masked out of the loss), each paired
  with its example's prompt. Chunking C from its start trains on exactly the chunks that are encoded at
  application, where the chunks of C are aligned at the start of C and only FULL chunks are encoded: latents
  replace whole chunks, a trailing partial chunk of C stays text. Prompts are right-padded in a batch (mask
  True = real token).
* Training (`train_vqvae`): AdamW (betas 0.9/0.95, weight decay 0), constant lr after a linear warmup of
  min(100, steps // 10) steps, gradient clipping at 1.0, batches drawn by a seeded permutation per epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmx.utils import LlmxError, load_weights_dir, save_weights_dir

FORMAT = "llmx.vqvae/1"
Item = Tuple[List[int], Tensor, Tensor]  # (prompt ids, chunk ids [L], chunk mask [L])


@dataclass
class VQVAEConfig:
    vocab_size: int
    pad_id: int
    chunk_len: int = 16
    compression: int = 16
    codebook_size: int = 1024
    dim: int = 128
    layers: int = 2
    prompt_layers: int = 1
    heads: int = 4
    ff_mult: int = 4
    max_prompt_len: int = 256
    beta: float = 0.25
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_steps: int = 100
    dropout: float = 0.0
    encoder_prompt: bool = False

    def __post_init__(self) -> None:
        if self.chunk_len <= 0 or self.compression <= 0 or self.chunk_len % self.compression:
            raise LlmxError(f"vqvae: chunk_len ({self.chunk_len}) must be a positive multiple of "
                            f"compression ({self.compression})")
        if self.codebook_update not in ("ema", "loss"):
            raise LlmxError(f"vqvae: codebook_update must be 'ema' or 'loss', not {self.codebook_update!r}")
        if self.dim % self.heads:
            raise LlmxError(f"vqvae: dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0 <= self.pad_id < self.vocab_size:
            raise LlmxError(f"vqvae: pad_id ({self.pad_id}) outside the vocabulary (size {self.vocab_size})")

    @property
    def latents(self) -> int:
        """Latent vectors per chunk, L / r."""
        return self.chunk_len // self.compression

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VQVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlmxError(f"vqvae: unknown config keys {unknown}")
        return cls(**d)


def _stack(cfg: VQVAEConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ff_mult * cfg.dim, cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    # nested tensors would change eval outputs at padded positions and vary with the batch: keep them off
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(cfg.dim), enable_nested_tensor=False)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [..., T, D] over T where mask [..., T]; zero where the mask is empty."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def _attn_pad(mask: Tensor) -> Tensor:
    """key_padding_mask (True = ignore) from a validity mask; a row with no valid key attends to its first
    position anyway (its output is masked out later) so that attention never normalises over nothing."""
    pad = ~mask
    empty = pad.all(-1)
    if empty.any():
        pad = pad.clone()
        pad[empty, 0] = False
    return pad


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.dim, cfg.latents
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.prompt_pos = nn.Parameter(torch.randn(cfg.max_prompt_len, d) * 0.02)
        self.prompt_enc = _stack(cfg, cfg.prompt_layers)
        self.enc_pos = nn.Parameter(torch.randn(cfg.chunk_len, d) * 0.02)
        self.enc_prompt_type = nn.Parameter(torch.randn(d) * 0.02)
        self.encoder = _stack(cfg, cfg.layers)
        self.pre_quant = nn.Linear(d, d)
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, d) / math.sqrt(d),
                                     requires_grad=cfg.codebook_update == "loss")
        self.register_buffer("ema_size", torch.ones(cfg.codebook_size))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("unused_steps", torch.zeros(cfg.codebook_size, dtype=torch.long))
        self.dec_prompt_type = nn.Parameter(torch.randn(d) * 0.02)
        self.dec_latent_pos = nn.Parameter(torch.randn(n, d) * 0.02)
        self.dec_queries = nn.Parameter(torch.randn(cfg.chunk_len, d) * 0.02)
        self.decoder = _stack(cfg, cfg.layers)
        self.head = nn.Linear(d, cfg.vocab_size)

    # g(P)
    def prompt_embedding(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """[B, P] ids and mask (True = token) -> [B, dim]. Keeps the last max_prompt_len positions."""
        keep = self.cfg.max_prompt_len
        if prompt_ids.shape[1] > keep:
            prompt_ids, prompt_mask = _keep_last(prompt_ids, prompt_mask, keep)
        if prompt_ids.shape[1] == 0:
            return self.prompt_pos.new_zeros(prompt_ids.shape[0], self.cfg.dim)
        x = self.tok(prompt_ids) + self.prompt_pos[: prompt_ids.shape[1]]
        h = self.prompt_enc(x, src_key_padding_mask=_attn_pad(prompt_mask))
        return _masked_mean(h, prompt_mask)

    # f_enc
    def encode(self, chunk_ids: Tensor, chunk_mask: Tensor, prompt_emb: Optional[Tensor] = None) -> Tensor:
        """[B, L] -> [B, L/r, dim] (before quantisation). prompt_emb is used only when cfg.encoder_prompt."""
        cfg = self.cfg
        self._check_chunk(chunk_ids)
        x = self.tok(chunk_ids) + self.enc_pos
        pad = _attn_pad(chunk_mask)
        if cfg.encoder_prompt:
            if prompt_emb is None:
                raise LlmxError("vqvae: encoder_prompt=True needs the prompt embedding")
            x = torch.cat([(prompt_emb + self.enc_prompt_type).unsqueeze(1), x], 1)
            pad = torch.cat([pad.new_zeros(pad.shape[0], 1), ~chunk_mask], 1)
        h = self.encoder(x, src_key_padding_mask=pad)[:, -cfg.chunk_len:]
        b, r = h.shape[0], cfg.compression
        pooled = _masked_mean(h.reshape(b, cfg.latents, r, cfg.dim), chunk_mask.reshape(b, cfg.latents, r))
        return self.pre_quant(pooled)

    # quantiser
    def quantize(self, z: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        """z [B, n, dim] -> (codes [B, n], straight-through zq [B, n, dim], {"commit_loss", "codebook_loss"}).
        mask [B, n] (True = latent of real tokens) limits the losses and codebook statistics."""
        cfg = self.cfg
        flat = z.reshape(-1, cfg.dim)
        m = torch.ones(flat.shape[0], dtype=torch.bool, device=z.device) if mask is None else mask.reshape(-1)
        codes = self._nearest(flat.detach())
        e = F.embedding(codes, self.codebook)
        w = m.to(z.dtype)
        denom = w.sum().clamp_min(1.0) * cfg.dim
        commit = cfg.beta * (((flat - e.detach()) ** 2).sum(-1) * w).sum() / denom
        if cfg.codebook_update == "loss":
            book = (((flat.detach() - e) ** 2).sum(-1) * w).sum() / denom
        else:
            book = z.new_zeros(())
        if self.training:
            with torch.no_grad():
                if cfg.codebook_update == "ema":
                    self._ema_update(flat.detach()[m], codes[m])
                self._restart_dead(flat.detach()[m], codes[m])
        zq = flat + (e - flat).detach()
        return codes.reshape(z.shape[:-1]), zq.reshape(z.shape), {"commit_loss": commit, "codebook_loss": book}

    def _nearest(self, flat: Tensor) -> Tensor:
        book = self.codebook.detach()
        d2 = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(-1)
        return d2.argmin(-1)

    def _ema_update(self, flat: Tensor, codes: Tensor) -> None:
        cfg, k = self.cfg, self.cfg.codebook_size
        onehot = F.one_hot(codes, k).to(flat.dtype)
        self.ema_size.mul_(cfg.ema_decay).add_(onehot.sum(0), alpha=1 - cfg.ema_decay)
        self.ema_sum.mul_(cfg.ema_decay).add_(onehot.t() @ flat, alpha=1 - cfg.ema_decay)
        n = self.ema_size.sum()
        size = (self.ema_size + cfg.ema_eps) / (n + k * cfg.ema_eps) * n  # Laplace smoothing
        self.codebook.data.copy_(self.ema_sum / size.unsqueeze(1))

    def _restart_dead(self, flat: Tensor, codes: Tensor) -> None:
        steps = self.cfg.dead_code_steps
        used = torch.zeros_like(self.unused_steps, dtype=torch.bool)
        used[codes] = True
        self.unused_steps.add_(1).masked_fill_(used, 0)
        if steps <= 0 or flat.shape[0] == 0:
            return
        dead = (self.unused_steps >= steps).nonzero().flatten()
        if dead.numel() == 0:
            return
        pick = flat[torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)]
        self.codebook.data[dead] = pick
        self.ema_sum[dead] = pick
        self.ema_size[dead] = 1.0
        self.unused_steps[dead] = 0

    # f_dec
    def decode(self, zq: Tensor, prompt_emb: Tensor) -> Tensor:
        """zq [B, n, dim], g(P) [B, dim] -> token logits [B, L, vocab]."""
        b = zq.shape[0]
        seq = torch.cat([(prompt_emb + self.dec_prompt_type).unsqueeze(1), zq + self.dec_latent_pos,
                         self.dec_queries.expand(b, -1, -1)], 1)
        h = self.decoder(seq)[:, -self.cfg.chunk_len:]
        return self.head(h)

    def forward(self, chunk_ids: Tensor, chunk_mask: Tensor, prompt_ids: Tensor, prompt_mask: Tensor
                ) -> Dict[str, Tensor]:
        """Returns loss, recon_loss, commit_loss, codebook_loss, codes [B, n], logits [B, L, V], token_acc."""
        cfg = self.cfg
        g = self.prompt_embedding(prompt_ids, prompt_mask)
        z = self.encode(chunk_ids, chunk_mask, g)
        lat_mask = chunk_mask.reshape(chunk_mask.shape[0], cfg.latents, cfg.compression).any(-1)
        codes, zq, vq = self.quantize(z, lat_mask)
        logits = self.decode(zq, g)
        recon, acc = _token_stats(logits, chunk_ids, chunk_mask)
        loss = recon + vq["commit_loss"] + vq["codebook_loss"]
        return {"loss": loss, "recon_loss": recon, "commit_loss": vq["commit_loss"],
                "codebook_loss": vq["codebook_loss"], "codes": codes, "logits": logits, "token_acc": acc}

    @torch.no_grad()
    def codes_for(self, chunk_ids: Tensor, chunk_mask: Tensor, prompt_ids: Optional[Tensor] = None,
                  prompt_mask: Optional[Tensor] = None) -> Tensor:
        """Codes [B, n] of chunks, in eval mode (no codebook updates); the prompt is read only when
        cfg.encoder_prompt."""
        g = None
        if self.cfg.encoder_prompt:
            if prompt_ids is None or prompt_mask is None:
                raise LlmxError("vqvae: encoder_prompt=True: codes_for needs prompt_ids and prompt_mask")
        with _eval(self):
            if self.cfg.encoder_prompt:
                g = self.prompt_embedding(prompt_ids, prompt_mask)
            codes, _, _ = self.quantize(self.encode(chunk_ids, chunk_mask, g))
        return codes

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Codes [B, n] + prompts -> reconstructed token ids [B, L] (argmax of each slot)."""
        with _eval(self):
            g = self.prompt_embedding(prompt_ids, prompt_mask)
            return self.decode(F.embedding(codes, self.codebook), g).argmax(-1)

    def _check_chunk(self, chunk_ids: Tensor) -> None:
        if chunk_ids.dim() != 2 or chunk_ids.shape[1] != self.cfg.chunk_len:
            raise LlmxError(f"vqvae: chunks must be [B, {self.cfg.chunk_len}], got {list(chunk_ids.shape)}")


class _eval:
    """Context manager: eval mode inside, the previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)


def _keep_last(ids: Tensor, mask: Tensor, keep: int) -> Tuple[Tensor, Tensor]:
    """Per row, the last `keep` real tokens, right-padded (rows are right-padded on input)."""
    lengths = mask.sum(1)
    start = (lengths - keep).clamp_min(0)
    idx = (start.unsqueeze(1) + torch.arange(keep, device=ids.device)).clamp_max(ids.shape[1] - 1)
    new_mask = torch.arange(keep, device=ids.device) < lengths.clamp_max(keep).unsqueeze(1)
    return ids.gather(1, idx), new_mask


def _token_stats(logits: Tensor, ids: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Masked mean cross-entropy and token accuracy."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    w = mask.reshape(-1).to(logits.dtype)
    n = w.sum().clamp_min(1.0)
    acc = ((logits.argmax(-1).reshape(-1) == ids.reshape(-1)).to(w.dtype) * w).sum() / n
    return (ce * w).sum() / n, acc.detach()


# ---- data ----

def chunk_sequence(ids: Sequence[int], chunk_len: int, pad_id: int = 0) -> Tuple[Tensor, Tensor]:
    """Token ids -> (chunks [N, L] padded with pad_id, mask [N, L] True = token), N = ceil(len / L)."""
    n = -(-len(ids) // chunk_len)
    chunks = torch.full((n * chunk_len,), pad_id, dtype=torch.long)
    chunks[: len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    mask = torch.arange(n * chunk_len) < len(ids)
    return chunks.reshape(n, chunk_len), mask.reshape(n, chunk_len)


def training_chunks(examples: Sequence[Tuple[List[int], List[int], List[int]]], chunk_len: int, pad_id: int
                    ) -> List[Item]:
    """The chunks of every X = P + C + S, each part chunked from its own start, with the example's prompt."""
    items: List[Item] = []
    for prompt, cot, sol in examples:
        for part in (prompt, cot, sol):
            chunks, mask = chunk_sequence(list(part), chunk_len, pad_id)
            items.extend((list(prompt), c, m) for c, m in zip(chunks, mask))
    return items


def cot_chunks(prompt: List[int], cot: List[int], chunk_len: int) -> List[Item]:
    """The FULL chunks of C (aligned at the start of C), each with the prompt; a partial tail is dropped."""
    full = len(cot) // chunk_len
    if full == 0:
        return []
    chunks = torch.tensor(list(cot[: full * chunk_len]), dtype=torch.long).reshape(full, chunk_len)
    mask = torch.ones(chunk_len, dtype=torch.bool)
    return [(list(prompt), c, mask) for c in chunks]


def collate(items: Sequence[Item], pad_id: int, max_prompt_len: Optional[int] = None) -> Dict[str, Tensor]:
    """Batch items: prompts right-padded to the batch's longest (after keeping the last max_prompt_len)."""
    prompts = [p[-max_prompt_len:] if max_prompt_len and len(p) > max_prompt_len else p for p, _, _ in items]
    width = max(1, max(len(p) for p in prompts))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, : len(p)] = True
    return {"chunk_ids": torch.stack([c for _, c, _ in items]), "chunk_mask": torch.stack([m for _, _, m in items]),
            "prompt_ids": ids, "prompt_mask": mask}


def _batches(model: VQVAE, items: Sequence[Item], batch_size: int):
    cfg = model.cfg
    for i in range(0, len(items), batch_size):
        yield collate(items[i: i + batch_size], cfg.pad_id, cfg.max_prompt_len)


# ---- training and evaluation ----

def train_vqvae(model: VQVAE, train_items: Sequence[Item], val_items: Sequence[Item], steps: int,
                batch_size: int = 32, lr: float = 1e-3, seed: int = 0, log_every: int = 50,
                log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Train for `steps` steps; returns history {"step", "loss", "recon_loss", "token_acc", "val", "steps_per_s"}
    ("val": evaluate_vqvae dicts with their "step", every log_every steps and at the end)."""
    if not train_items:
        raise LlmxError("vqvae: no training chunks")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    hist: Dict[str, Any] = {"step": [], "loss": [], "recon_loss": [], "token_acc": [], "val": []}
    order: List[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(train_items), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        out = model(**collate([train_items[i] for i in idx], model.cfg.pad_id, model.cfg.max_prompt_len))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            _log_step(model, hist, step, out, val_items, batch_size, log)
    hist["steps_per_s"] = steps / (time.perf_counter() - t0)
    model.eval()
    return hist


def _log_step(model: VQVAE, hist: Dict[str, Any], step: int, out: Dict[str, Tensor], val_items: Sequence[Item],
              batch_size: int, log: Optional[Callable[[str], None]]) -> None:
    for k in ("loss", "recon_loss", "token_acc"):
        hist[k].append(float(out[k].detach()))
    hist["step"].append(step)
    msg = f"vqvae step {step}: loss {float(out['loss'].detach()):.4f} acc {float(out['token_acc']):.3f}"
    if val_items:
        val = dict(evaluate_vqvae(model, val_items, batch_size), step=step)
        hist["val"].append(val)
        msg += f" | val acc {val['token_acc']:.3f} exact {val['chunk_exact']:.3f} usage {val['codebook_usage']:.3f}"
    if log:
        log(msg)


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, items: Sequence[Item], batch_size: int = 64) -> Dict[str, float]:
    """token_acc, chunk_exact, codebook_usage (fraction of codes used), perplexity (exp entropy of the code
    distribution), recon_loss (token-weighted), chunks, over `items`, in eval mode."""
    counts = torch.zeros(model.cfg.codebook_size, dtype=torch.long)
    ce = correct = tokens = exact = 0.0
    with _eval(model):
        for b in _batches(model, items, batch_size):
            out = model(**b)
            m = b["chunk_mask"]
            n = float(m.sum())
            ce += float(out["recon_loss"]) * n
            hit = (out["logits"].argmax(-1) == b["chunk_ids"]) | ~m
            correct += float((hit & m).sum())
            tokens += n
            exact += float(hit.all(-1).sum())
            lat = m.reshape(m.shape[0], model.cfg.latents, -1).any(-1)
            counts += torch.bincount(out["codes"][lat], minlength=model.cfg.codebook_size)
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"token_acc": correct / max(tokens, 1.0), "chunk_exact": exact / max(len(items), 1),
            "codebook_usage": float((counts > 0).double().mean()), "perplexity": math.exp(entropy),
            "recon_loss": ce / max(tokens, 1.0), "chunks": len(items)}


@torch.no_grad()
def encode_cot(model: VQVAE, examples: Sequence[Tuple[List[int], List[int], Any]], batch_size: int = 256
               ) -> List[List[int]]:
    """Per example (prompt, cot, ...), the codes of its full CoT chunks in order (n codes per chunk)."""
    items: List[Item] = []
    owner: List[int] = []
    for i, ex in enumerate(examples):
        chunks = cot_chunks(ex[0], ex[1], model.cfg.chunk_len)
        items += chunks
        owner += [i] * len(chunks)
    result: List[List[int]] = [[] for _ in examples]
    k = 0
    for b in _batches(model, items, batch_size):
        for row in model.codes_for(**b).tolist():
            result[owner[k]].extend(row)
            k += 1
    return result


# ---- save / load ----

def save_vqvae(model: VQVAE, out_dir: str | Path, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write model.safetensors (all parameters and buffers, EMA statistics included) and config.json
    ({"format", "config", "extra"}) into out_dir, atomically (published as a whole directory)."""
    return save_weights_dir(model, out_dir, FORMAT, model.cfg.to_dict(), extra)


def load_vqvae(path: str | Path, expect: Optional[Dict[str, Any]] = None) -> VQVAE:
    """Load a saved VQ-VAE (eval mode). `expect`: keys of the config or of `extra` that must match."""
    config, state = load_weights_dir(path, FORMAT, "vqvae", expect)
    model = VQVAE(VQVAEConfig.from_dict(config))
    model.load_state_dict(state)
    return model.eval()
