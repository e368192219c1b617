"""TopK sparse autoencoder over a teacher's residual stream, the concept extractor of CoCoMix ("LLM Pretraining
with Continuous Concepts", Tack et al., 2025, arXiv 2502.08524), in plain PyTorch.

The SAE is the TopK autoencoder of Gao et al. ("Scaling and evaluating sparse autoencoders", 2024, arXiv
2406.04093), in the layout OpenAI released for GPT-2 small and CoCoMix uses (v5_32k: 32,768 latents, k = 32,
at the output of block 5). For a residual vector x (one token):

    x~ = (x - mu) / (sigma + eps)                 mu, sigma: mean and (unbiased) std over x's features
    z  = ReLU(TopK_k(W_enc (x~ - b_pre) + b_lat)) the k largest pre-activations kept, the rest zero
    x^ = (W_dec z + b_pre) * (sigma + eps) + mu   (`normalize`: off makes x~ = x)

Training (Gao et al., section 2 and appendix A), with the choices llmx makes where the paper leaves room:

* Loss: normalised MSE in the normalised space, ||x~ - x^~||^2 / ||x~ - mean(x~)||^2 over the batch, plus
  `aux_coef` (1/32) times the AuxK loss: the top `aux_k` pre-activations among the dead latents reconstruct
  the main reconstruction's error e = x~ - x^~ (no bias), scored by the same normalised MSE against e. The
  AuxK term keeps dead latents receiving gradient; it is zero while no latent is dead.
* Dead latents: a latent is dead when it has not fired for `dead_tokens` training tokens (the buffer
  `tokens_since_fired` counts tokens, not steps, so the threshold does not depend on the batch size).
* Decoder columns have unit norm: the gradient component parallel to each column is removed before the
  optimiser step and the columns are renormalised after it (so Adam's state never fights the constraint).
* Init: decoder columns random unit vectors, W_enc = W_dec^T, b_lat = 0, b_pre = the mean of a sample of
  normalised inputs (Gao et al. use the geometric median; the mean is what a streaming user can compute in one
  pass, and b_pre is trained anyway).

Reported quality (`evaluate_sae`): normalised MSE (normalised space), explained variance in the ORIGINAL space
(1 - sum ||x - x^||^2 / sum ||x - mean x||^2), L0 (mean number of non-zero latents per token, <= k), the
fraction of latents that never fired over the evaluation tokens, and the fraction dead by the training
counter.

Saved as `model.safetensors` (keys pre_bias, latent_bias, encoder.weight [n, d], decoder.weight [d, n],
tokens_since_fired) and `config.json` (format, `SAEConfig`, extra). The tensor names are those of OpenAI's
`sparse_autoencoder.Autoencoder`, so an SAE trained there (a `torch.load`-ed state dict, such as the GPT-2
small v5_32k files CoCoMix uses) converts with `from_openai_state_dict(sd, teacher=..., layer=...)` and then
`save_sae`; OpenAI's layout normalises exactly when its activation is TopK, and so does the conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmx.utils import LlmxError, load_weights_dir, save_weights_dir

FORMAT = "llmx-topk-sae/1"


@dataclass
class SAEConfig:
    d_model: int
    n_latents: int
    k: int = 32
    normalize: bool = True
    eps: float = 1e-5
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000
    # Provenance: what the SAE reads. Consumers check these against their teacher before any work.
    teacher: str = ""
    layer: int = -1
    hook: str = "resid_post"

    def __post_init__(self):
        if self.d_model < 1 or self.n_latents < 1:
            raise LlmxError(f"sae: d_model={self.d_model} and n_latents={self.n_latents} must be >= 1")
        if not 1 <= self.k <= self.n_latents:
            raise LlmxError(f"sae: k={self.k} must be in [1, n_latents={self.n_latents}]")
        if self.aux_k < 0 or self.dead_tokens < 1:
            raise LlmxError(f"sae: aux_k={self.aux_k} must be >= 0 and dead_tokens={self.dead_tokens} >= 1")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlmxError(f"sae: unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def topk_relu(pre: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Indices and ReLU'd values of the k largest entries of the last dimension."""
    vals, idx = pre.topk(k, dim=-1)
    return idx, F.relu(vals)


def nmse(pred: Tensor, target: Tensor) -> Tensor:
    """sum ||pred - target||^2 / sum ||target - mean(target)||^2 over the rows of a [N, d] batch."""
    return (pred - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.n_latents
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.latent_bias = nn.Parameter(torch.zeros(n))
        self.encoder = nn.Linear(d, n, bias=False)
        self.decoder = nn.Linear(n, d, bias=False)
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        with torch.no_grad():
            w = torch.randn(d, n)
            self.decoder.weight.copy_(w / w.norm(dim=0, keepdim=True))
            self.encoder.weight.copy_(self.decoder.weight.t())

    def normalise(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(x~, mu, sigma + eps); identity when `normalize` is off."""
        if not self.cfg.normalize:
            return x, torch.zeros_like(x[..., :1]), torch.ones_like(x[..., :1])
        mu = x.mean(-1, keepdim=True)
        scale = (x - mu).std(-1, keepdim=True) + self.cfg.eps
        return (x - mu) / scale, mu, scale

    def pre_activations(self, xn: Tensor) -> Tensor:
        return F.linear(xn - self.pre_bias, self.encoder.weight, self.latent_bias)

    def decode_sparse(self, idx: Tensor, val: Tensor, bias: bool = True) -> Tensor:
        """W_dec z (+ b_pre) in the normalised space, from the k (index, value) pairs of each row."""
        shape = idx.shape[:-1]
        out = F.embedding_bag(idx.reshape(-1, idx.shape[-1]), self.decoder.weight.t(),
                              per_sample_weights=val.reshape(-1, val.shape[-1]).to(self.decoder.weight.dtype),
                              mode="sum")
        out = out.reshape(*shape, -1)
        return out + self.pre_bias if bias else out

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The active latents of each row of x [..., d]: (indices, values), each [..., k]."""
        return topk_relu(self.pre_activations(self.normalise(x)[0]), self.cfg.k)

    def dense(self, idx: Tensor, val: Tensor) -> Tensor:
        """z as a dense [..., n_latents] tensor."""
        return torch.zeros(*idx.shape[:-1], self.cfg.n_latents, dtype=val.dtype, device=val.device
                           ).scatter(-1, idx, val)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x^ of x [..., d] in the original space."""
        xn, mu, scale = self.normalise(x)
        idx, val = topk_relu(self.pre_activations(xn), self.cfg.k)
        return self.decode_sparse(idx, val) * scale + mu

    def loss(self, x: Tensor) -> Dict[str, Tensor]:
        """Training loss on a [N, d] batch; in training mode also advances the dead-latent counter."""
        xn, _, _ = self.normalise(x)
        pre = self.pre_activations(xn)
        idx, val = topk_relu(pre, self.cfg.k)
        recon = self.decode_sparse(idx, val)
        mse = nmse(recon, xn)
        dead = self.tokens_since_fired >= self.cfg.dead_tokens
        aux = torch.zeros((), device=x.device)
        if self.cfg.aux_k and bool(dead.any()):
            k_aux = min(self.cfg.aux_k, int(dead.sum()))
            a_idx, a_val = topk_relu(pre.masked_fill(~dead, float("-inf")), k_aux)
            aux = nmse(self.decode_sparse(a_idx, a_val, bias=False), xn - recon.detach()).nan_to_num(0.0)
        if self.training:
            with torch.no_grad():
                fired = torch.zeros_like(dead)
                fired[idx[val > 0]] = True
                self.tokens_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        return {"loss": mse + self.cfg.aux_coef * aux, "nmse": mse.detach(), "aux": aux.detach(),
                "dead_fraction": dead.float().mean()}


@torch.no_grad()
def init_from_data(sae: TopKSAE, sample: Tensor) -> None:
    """b_pre <- the mean of the normalised sample [N, d]."""
    sae.pre_bias.copy_(sae.normalise(sample.to(sae.pre_bias.dtype))[0].mean(0))


def tangent_grad(w: Tensor, g: Tensor) -> Tensor:
    """g without its component along each (unit) column of w: the gradient that keeps the column norms."""
    w = w.detach()
    return g - w * (w * g).sum(0, keepdim=True)


@torch.no_grad()
def renormalise_decoder(sae: TopKSAE) -> None:
    w = sae.decoder.weight
    w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-12))


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float = 1.0) -> Dict[str, float]:
    """One optimiser step on the batch x [N, d], keeping the decoder columns unit-norm."""
    sae.train()
    out = sae.loss(x)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    w = sae.decoder.weight
    if w.grad is not None:
        w.grad.copy_(tangent_grad(w, w.grad))
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    opt.step()
    renormalise_decoder(sae)
    return {k: float(v.detach()) for k, v in out.items()}


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, batches: Iterable[Tensor]) -> Dict[str, float]:
    """Quality over held-out activations (each batch [N, d]): see the module docstring."""
    sae.eval()
    n = sae.cfg.n_latents
    fired = torch.zeros(n, dtype=torch.bool, device=sae.pre_bias.device)
    sq_norm = sq_orig = 0.0
    tokens, l0 = 0, 0.0
    sums: Dict[str, Any] = {}
    for x in batches:
        x = x.to(sae.pre_bias.dtype)
        xn, mu, scale = sae.normalise(x)
        idx, val = topk_relu(sae.pre_activations(xn), sae.cfg.k)
        recon_n = sae.decode_sparse(idx, val)
        sq_norm += float((recon_n - xn).pow(2).sum())
        sq_orig += float((recon_n * scale + mu - x).pow(2).sum())
        for name, t in (("xn", xn), ("x", x)):  # running sums for the total variance of each space
            s = sums.setdefault(name, [0.0, torch.zeros_like(t[0], dtype=torch.float64)])
            s[0] += float(t.double().pow(2).sum())
            s[1] += t.double().sum(0)
        tokens += x.shape[0]
        l0 += float((val > 0).sum())
        fired[idx[val > 0]] = True
    if not tokens:
        raise LlmxError("sae: evaluate_sae got no activations")

    def total_var(name):
        sq, s = sums[name]
        return max(sq - float(s.pow(2).sum()) / tokens, 1e-12)

    return {"nmse": sq_norm / total_var("xn"), "explained_variance": 1.0 - sq_orig / total_var("x"),
            "l0": l0 / tokens, "never_fired_fraction": 1.0 - float(fired.float().mean()),
            "dead_fraction": float((sae.tokens_since_fired >= sae.cfg.dead_tokens).float().mean()),
            "tokens": tokens}


def save_sae(sae: TopKSAE, out_dir: str | Path, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write model.safetensors and config.json into out_dir, atomically (published as a whole directory)."""
    return save_weights_dir(sae, out_dir, FORMAT, asdict(sae.cfg), extra)


def load_sae(path: str | Path, expect: Optional[Dict[str, Any]] = None) -> TopKSAE:
    """Load a saved SAE (eval mode). `expect`: config or `extra` keys that must match (teacher, layer,
    d_model, ...), checked before the tensors are read."""
    config, state = load_weights_dir(path, FORMAT, "sae", expect)
    sae = TopKSAE(SAEConfig.from_dict(config))
    sae.load_state_dict(state)
    return sae.eval()


def from_openai_state_dict(sd: Dict[str, Any], teacher: str, layer: int, hook: str = "resid_post",
                           **overrides) -> TopKSAE:
    """An SAE in OpenAI's `sparse_autoencoder` layout (the dict `torch.load` returns) as a TopKSAE."""
    missing = [k for k in ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight") if k not in sd]
    if missing:
        raise LlmxError(f"sae: not an OpenAI sparse_autoencoder state dict: {missing} missing")
    activation = sd.get("activation", "ReLU")
    if activation != "TopK":
        raise LlmxError(f"sae: activation {activation!r}; llmx's SAE is TopK (OpenAI's v5 'TopK' files)")
    n, d = sd["encoder.weight"].shape
    k = int(sd.get("activation_state_dict", {}).get("k", 32))
    sae = TopKSAE(SAEConfig(d_model=d, n_latents=n, k=k, normalize=True, teacher=teacher, layer=layer, hook=hook,
                            **overrides))
    with torch.no_grad():
        for name in ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight"):
            sae.get_parameter(name).copy_(sd[name].float())
    return sae.eval()


def teacher_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM: model.layers (Llama, Mistral, Qwen, Gemma), transformer.h
    (GPT-2, CoCoMix's teacher) or gpt_neox.layers (Pythia)."""
    for outer, inner in (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers")):
        blocks = getattr(getattr(model, outer, None), inner, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise LlmxError(f"{type(model).__name__}: cannot find its decoder blocks (model.layers, transformer.h or "
                    "gpt_neox.layers)")


def block_output(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 stop: bool = True) -> Tensor:
    """The residual stream after decoder block `layer` (0-based; "resid_post") of a Hugging Face causal LM,
    [B, T, d]. With `stop`, the forward pass ends at that block (the later blocks are not run)."""
    blocks = teacher_blocks(model)
    if not 0 <= layer < len(blocks):
        raise LlmxError(f"sae: layer {layer} outside the model's {len(blocks)} blocks (valid: 0..{len(blocks) - 1})")
    box = []

    class _Stop(Exception):
        pass

    def hook(_mod, _inp, out):
        box.append(out[0] if isinstance(out, tuple) else out)
        if stop:
            raise _Stop

    handle = blocks[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box[0]
