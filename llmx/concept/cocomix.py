"""The CoCoMix student ("LLM Pretraining with Continuous Concepts", Tack et al., 2025, arXiv 2502.08524, section 3.2),
for any Hugging Face Llama-family causal LM, in plain PyTorch.

Before decoder block `insert_layer`, the hidden state h_t of every token predicts the teacher's concepts and is
joined by a continuous concept vector c_t built from that prediction:

    x_t = LN(h_t) - b_pre                     LN without affine (unbiased std + eps), as the SAE normalises
    l_t = W_pred x_t + b_pred                 concept logits over the SAE's n latents
    c_t = (W_comp TopK_32(l_t) + b_comp + b_pre) * (sigma_t + eps) + mu_t     back to h's scale

    mix = "interleave": the rest of the model reads [h_1, c_1, h_2, c_2, ...] (causal), and the LM head reads the
          final states at the concept slots, so token t's next-token logits see its own concept (the paper's
          method and the reference's forward);
    mix = "add":        h_t + c_t, same length (the paper's "adding instead of interleaving" ablation);
    mix = "none":       the sequence is unchanged, only the concept loss trains the predictor's input (the
          "prediction only" ablation);
    mix = "pause":      the pause-token baseline: one learned vector p interleaved after every token,
          [h_1, p, h_2, p, ...], read at the p slots like the concepts; no concept head, no concept loss.
          It spends exactly CoCoMix's extra compute with no concept content (Goyal et al., 2024, insert pause
          tokens at the input; insert_layer=0 is that form with one pause after every token).

Loss (`cocomix_loss`): L_NTP + lambda * L_concept, L_concept = mean over the `top` labels j of CE(l_t, label_t,j)
(lambda = 0.1, top = 4 in the paper); labels come from `llmx.concept.attribution.concept_labels`.

Choices llmx makes (GPT-2's learned positions are added once at the input; Llama rotates q and k in every layer):

* Positions after interleaving (`concept_position`): "same" gives c_t the position of h_t (position ids
  0,0,1,1,...), so relative distances above the insert layer are those of the layers below and the RoPE range is
  unchanged; "sequential" numbers the 2T slots 0..2T-1.
* TopK keeps the 32 largest logits with their signed values (the reference masks the dense logits); the
  compression is computed from the 32 (index, value) pairs, which gives the same result and gradient as the
  dense masked matmul at 32/n of its cost.
* The de-normalisation multiplies by sigma + eps, the same scale LN divided by (the reference divides by
  sigma + eps and multiplies by sigma; the difference is eps).
* Attention must be causal with no mask argument: SDPA (or flash attention) implementations; eager attention is
  refused because it would see the doubled sequence without a causal mask. Batches are unpadded packed blocks.

The student keeps the backbone's modules under their Hugging Face names (model.*, lm_head.*) and adds the concept
head as `concept.*`: llmx's FSDP2 `parallelize` shards it like any Llama, and the backbone's state dict exports as
an HF checkpoint unchanged.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmx.utils import LlmxError

MIXES = ("interleave", "add", "none", "pause")
POSITIONS = ("same", "sequential")


def layer_norm_stats(h: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(normalised h, mu, sigma + eps): LN without affine, unbiased std, as OpenAI's SAEs and CoCoMix normalise."""
    mu = h.mean(-1, keepdim=True)
    scale = (h - mu).std(-1, keepdim=True) + eps
    return (h - mu) / scale, mu, scale


class ConceptHead(nn.Module):
    """Concept predictor and compressor: h [B, T, d] -> (concept logits [B, T, n], concept vectors [B, T, d])."""

    def __init__(self, d_model: int, n_concepts: int, k: int = 32, eps: float = 1e-5):
        super().__init__()
        if not 1 <= k <= n_concepts:
            raise LlmxError(f"cocomix: concept k={k} must be in [1, n_concepts={n_concepts}]")
        self.k, self.eps = k, eps
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.predictor = nn.Linear(d_model, n_concepts)
        # The compressor is Linear(n -> d) stored row per concept ([n, d]) so that the 32 rows a token uses are
        # gathered without transposing the whole matrix; initialised as nn.Linear(n, d) would be.
        bound = n_concepts ** -0.5
        self.compress_weight = nn.Parameter(torch.empty(n_concepts, d_model).uniform_(-bound, bound))
        self.compress_bias = nn.Parameter(torch.empty(d_model).uniform_(-bound, bound))
        self.steer: Optional[Tuple[int, float]] = None  # (concept, added logit): steering, section 4.4 of the paper

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        x, mu, scale = layer_norm_stats(h, self.eps)
        logits = self.predictor(x - self.pre_bias)
        if self.steer is not None:
            concept, amount = self.steer
            logits = logits + amount * F.one_hot(torch.tensor(concept, device=logits.device),
                                                 logits.shape[-1]).to(logits.dtype)
        vals, idx = logits.topk(self.k, dim=-1)
        flat = F.embedding_bag(idx.reshape(-1, self.k), self.compress_weight,
                               per_sample_weights=vals.reshape(-1, self.k), mode="sum")
        c = flat.reshape(h.shape) + self.compress_bias + self.pre_bias
        return logits, c * scale + mu


class CoCoMixLM(nn.Module):
    """A Llama-family HF causal LM with CoCoMix's concept head at block `insert_layer`.

    forward(input_ids [B, T]) -> (token logits [B, T, vocab], concept logits [B, T, n], None for "pause")."""

    def __init__(self, lm: nn.Module, n_concepts: int, insert_layer: int, k: int = 32, mix: str = "interleave",
                 concept_position: str = "same"):
        super().__init__()
        inner = getattr(lm, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(lm, "lm_head"):
            raise LlmxError(f"cocomix: {type(lm).__name__} is not a Llama-family HF causal LM "
                            "(model.embed_tokens, model.layers, model.rotary_emb, model.norm, lm_head)")
        if not 0 <= insert_layer < len(layers):
            raise LlmxError(f"cocomix: insert_layer={insert_layer} outside the model's {len(layers)} blocks "
                            f"(valid: 0..{len(layers) - 1})")
        if mix not in MIXES:
            raise LlmxError(f"cocomix: mix={mix!r}; valid: {', '.join(MIXES)}")
        if concept_position not in POSITIONS:
            raise LlmxError(f"cocomix: concept_position={concept_position!r}; valid: {', '.join(POSITIONS)}")
        attn = getattr(lm.config, "_attn_implementation", None)
        if attn not in ("sdpa", "flash_attention_2", "flash_attention_3"):
            raise LlmxError(f"cocomix: attention implementation {attn!r} needs an explicit mask; load the model "
                            "with attn_implementation='sdpa'")
        # The backbone's modules under their HF names (model.*, lm_head.*; a tied head stays tied), so that
        # llmx's parallelize finds model.layers and the backbone's state dict is an HF LlamaForCausalLM's.
        self.model, self.lm_head, self.config = inner, lm.lm_head, lm.config
        d = lm.config.hidden_size
        if mix == "pause":
            self.concept = None
            self.pause = nn.Parameter(torch.randn(d) * getattr(lm.config, "initializer_range", 0.02))
        else:
            self.concept = ConceptHead(d, n_concepts, k)
        self.insert_layer, self.mix, self.concept_position = insert_layer, mix, concept_position

    def forward(self, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
        inner = self.model
        h = inner.embed_tokens(input_ids)
        b, t, d = h.shape
        pos = torch.arange(t, device=h.device)[None]
        rope = inner.rotary_emb(h, pos)
        concept_logits = None
        for i, layer in enumerate(inner.layers):
            if i == self.insert_layer:
                if self.mix == "pause":
                    c = self.pause.to(h.dtype).expand_as(h)
                else:
                    concept_logits, c = self.concept(h)
                if self.mix == "add":
                    h = h + c
                elif self.mix in ("interleave", "pause"):
                    h = torch.stack([h, c], dim=2).reshape(b, 2 * t, d)
                    pos = (pos.repeat_interleave(2, dim=1) if self.concept_position == "same"
                           else torch.arange(2 * t, device=h.device)[None])
                    rope = inner.rotary_emb(h, pos)
            h = layer(h, position_ids=pos, position_embeddings=rope)
        h = inner.norm(h)
        if self.mix in ("interleave", "pause"):
            h = h[:, 1::2]
        return self.lm_head(h), concept_logits


def cocomix_loss(logits: Tensor, concept_logits: Tensor, input_ids: Tensor, concept_labels: Optional[Tensor],
                 lam: float = 0.1) -> Dict[str, Tensor]:
    """L_NTP + lam * L_concept; concept_labels [B, T, top] with -100 where undefined (None: NTP only)."""
    ntp = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    if concept_labels is None:
        return {"loss": ntp, "ntp": ntp.detach()}
    if concept_labels.shape[:2] != input_ids.shape:
        raise LlmxError(f"cocomix: concept labels of shape {tuple(concept_labels.shape)} do not match the batch "
                        f"{tuple(input_ids.shape)}")
    flat = concept_logits.flatten(0, 1).float()
    labels = concept_labels.flatten(0, 1)
    valid = labels[:, 0] != -100
    if not bool(valid.any()):  # e.g. a one-token block: nothing to predict, no NaN
        concept = flat.sum() * 0.0
    else:
        concept = torch.stack([F.cross_entropy(flat[valid], labels[valid, j])
                               for j in range(labels.shape[-1])]).mean()
    return {"loss": ntp + lam * concept, "ntp": ntp.detach(), "concept": concept.detach()}


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, input_ids: Tensor, alpha: float = 0.5,
            temperature: float = 1.0) -> Dict[str, Tensor]:
    """The knowledge-distillation baseline: (1 - alpha) * L_NTP + alpha * T^2 * KL(p_teacher^T || p_student^T),
    KL per next-token position averaged over the batch (Hinton et al., 2015); teacher and student share the
    tokenizer. The paper compares with KD but states neither alpha nor T: both are config (0.5, 1.0)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise LlmxError(f"kd: student vocabulary {student_logits.shape[-1]} differs from the teacher's "
                        f"{teacher_logits.shape[-1]}: the student must use the teacher's tokenizer")
    s = student_logits[:, :-1].flatten(0, 1).float()
    ntp = F.cross_entropy(s, input_ids[:, 1:].flatten())
    t = teacher_logits[:, :-1].flatten(0, 1).float().detach()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    return {"loss": (1 - alpha) * ntp + alpha * kl, "ntp": ntp.detach(), "kd": kl.detach()}


def concept_head_parameters(d_model: int, n_concepts: int) -> int:
    """Parameters CoCoMix adds to its backbone: predictor (n x d + n), compressor (n x d + d), b_pre (d)."""
    return 2 * n_concepts * d_model + n_concepts + 2 * d_model


def matched_config(config, target: int, multiple: int = 1, max_steps: int = 4096):
    """A copy of the HF Llama-family `config` widened to the parameter count closest to `target` (the NTP/KD
    baselines at CoCoMix's size), counted exactly on the meta device. hidden_size grows in steps of
    2 x num_attention_heads (an even head dimension for RoPE) while the count stays <= target, with
    intermediate_size scaled alike; then intermediate_size alone (in steps of `multiple`) takes the count to the
    closest value, since one hidden step can exceed the whole concept head at small scale. Depth, heads and
    vocabulary are kept. Returns (config, parameter count)."""
    import copy

    from transformers import AutoModelForCausalLM

    def count(cfg) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in model.parameters())

    def shaped(hidden: int, inter: int):
        cfg = copy.deepcopy(config)
        cfg.hidden_size, cfg.intermediate_size = hidden, inter
        if getattr(config, "head_dim", None) is not None:
            cfg.head_dim = hidden // config.num_attention_heads
        return cfg

    ratio = config.intermediate_size / config.hidden_size
    step = 2 * config.num_attention_heads
    hidden = config.hidden_size
    for _ in range(max_steps):
        wider = hidden + step
        if count(shaped(wider, max(multiple, round(wider * ratio / multiple) * multiple))) > target:
            break
        hidden = wider
    inter = config.intermediate_size if hidden == config.hidden_size else \
        max(multiple, round(hidden * ratio / multiple) * multiple)
    base = count(shaped(hidden, inter))
    per_unit = count(shaped(hidden, inter + multiple)) - base
    inter = max(multiple, inter + round((target - base) / per_unit) * multiple)
    best = min((shaped(hidden, i) for i in (inter - multiple, inter, inter + multiple) if i >= multiple),
               key=lambda cfg: abs(count(cfg) - target))
    return best, count(best)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, new_tokens: int) -> Tensor:
    """Greedy continuation of input_ids [1, T] by a CoCoMixLM (or any module returning (logits, ...)); the whole
    prefix is recomputed per token (no KV cache: the interleaved sequence changes length at the insert layer)."""
    ids = input_ids
    for _ in range(new_tokens):
        out = model(ids)
        logits = out[0] if isinstance(out, tuple) else out.logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, input_ids.shape[1]:]


@torch.no_grad()
def steered(model: "CoCoMixLM", input_ids: Tensor, concept: int, amount: float, new_tokens: int) -> Tensor:
    """Greedy continuation with concept `concept`'s predicted logit raised by `amount` at every position."""
    if model.concept is None:
        raise LlmxError("cocomix: steering needs a concept head (method pause has none)")
    model.concept.steer = (concept, amount)
    try:
        return greedy_generate(model, input_ids, new_tokens)
    finally:
        model.concept.steer = None
