"""Losses of SWEET-RL and its baselines, as pure functions over tensors (plain PyTorch).

SWEET-RL (Zhou et al., "SWEET-RL: Training Multi-Turn LLM Agents on Collaborative Reasoning Tasks",
arXiv 2503.15478), Section 4. Notation: o_t the dialogue before agent turn t, a_t = a_t^{1:L} its L tokens,
c the training-time information (the hidden reference solution), π_θ the critic LLM being trained, π_ref
the frozen seed model, σ the logistic function.

    Eq. 3  A_θ(o_t, a_t, c) = (1/L) Σ_l log π_θ(a_t^l | o_t, a_t^{<l}, c) / π_ref(a_t^l | o_t, a_t^{<l}, c)
    Eq. 2  J_A(θ) = −log σ( Σ_t β A_θ(o_t^+, a_t^+, c) − Σ_t β A_θ(o_t^−, a_t^−, c) )   (Bradley-Terry)
    Eq. 4  J_π(φ) = −log σ( β log π_φ(a^+|o_t)/π_ref(a^+|o_t) − β log π_φ(a^−|o_t)/π_ref(a^−|o_t) )
           (per-turn DPO)

The pieces: `token_logps` (log p of each next token), `segment_logps` (their sums and counts per agent turn),
`turn_advantages` (Eq. 3), `critic_score` (the sum inside Eq. 2, without β), `bt_loss` (Eq. 2), `dpo_loss`
(Eq. 4; also the multi-turn DPO baseline), `nll_loss` (the NLL term), `ValueHead` + `value_loss` (the
"value function" critic ablation).

Where the paper and the reference code differ (notes §2.1-2.3), the paper is the default and an argument
selects the other:
  * Critic normalisation. The paper sums per-turn means (Eq. 2+3): `normalize="turn"`. The reference's
    critic (OpenRLHF fork, `--mean_log_prob` with a mask over every agent turn) takes ONE mean over all agent
    tokens of the trajectory: `normalize="trajectory"`. The paper's "without normalisation" ablation (which
    it reports collapses to ever shorter turns) sums over all agent tokens: `normalize="none"`.
  * Critic NLL coefficient: 0.01 in the paper's Table 5, 0 in the reference README's critic command (the
    fork's default `--nll_loss_coef 0`). The coefficient belongs to the caller (the recipe's critic NLL
    setting); `nll_loss` only computes the term.
  * NLL reduction: the fork averages the token NLL within each sequence, then over sequences (a long and a
    short sequence weigh the same); TRL's "sft" term averages over all tokens of the batch. `nll_loss`
    returns the per-sequence means (the fork's); `.mean()` of it is the fork's term. Sequences with no
    target token give 0.
  * β = 0.1 for critic and actor (Table 5), the default of `bt_loss` and `dpo_loss`.

Conventions: every loss returns one value per example, shape [B], so the caller picks the batch reduction
(the paper and the fork take the mean). Log-probabilities are computed in float32 (float64 stays float64,
for tests). The rewards returned by `dpo_loss` are detached: they are for logging and pair accuracy, as in
TRL and OpenRLHF.

Memory of `token_logps`: the naive `logits.float().log_softmax(-1).gather(...)` materialises a float32
[B, T, V] copy of the logits and a float32 [B, T, V] output (which autograd keeps, and whose gradient is
float32 [B, T, V] again): for bf16 logits, 4x then 6x the logits themselves. Only log p(target) =
z_target − logsumexp(z) is needed, so `token_logps` is a custom autograd function that copies `chunk_size`
positions at a time into one float32 buffer, keeps only their logsumexp and target log-prob, and recomputes
each chunk's softmax in the backward; the gradient comes back in the logits' dtype, as autograd requires.
Extra memory: one chunk of float32 (16 MiB by default) in the forward, plus the gradient in the backward.
Measured (extra peak RSS, fresh process, [4, 512, 32000] bf16 logits = 125 MiB, 1 CPU thread): forward
16 MiB against 500 MiB naive; forward + backward 141 MiB against 750 MiB.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMALIZE_CHOICES = ("turn", "trajectory", "none")
# float32 elements of token_logps' one chunk buffer (16 MiB): 131 positions of a 32k vocabulary, 32 of a 128k
# one; large enough that the Python loop over chunks costs little against the work per chunk
CHUNK_ELEMENTS = 2**22


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_chunks(batch: int, length: int, chunk: int):
    for b in range(batch):
        for start in range(0, length, chunk):
            yield b, slice(start, min(start + chunk, length))


class _TokenLogProb(torch.autograd.Function):
    """log softmax(z)[target] per position, one float32 chunk at a time (see the module docstring).

    Each pass allocates ONE float32 buffer of chunk x V and works in it in place: a fresh temporary per
    chunk would leave the CPU allocator (glibc) with freed blocks it does not hand back, which measured
    several times the chunk in peak RSS.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:
        # logits [B, T, V] whole (position T-1 predicts nothing), targets [B, T-1]: slicing here rather than
        # in the caller spares autograd a second [B, T, V] gradient buffer for the slice
        batch, length = targets.shape
        math = _math_dtype(logits.dtype)
        out = torch.empty(batch, length, dtype=math, device=logits.device)
        lse = torch.empty(batch, length, dtype=math, device=logits.device)
        buffer = torch.empty(min(chunk, length), logits.shape[-1], dtype=math, device=logits.device)
        for b, sl in _row_chunks(batch, length, chunk):
            z = buffer[: sl.stop - sl.start]
            z.copy_(logits[b, sl])
            top = z.amax(dim=-1, keepdim=True)
            target = z.gather(-1, targets[b, sl, None]).squeeze(-1)
            lse[b, sl] = z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
            out[b, sl] = target - lse[b, sl]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        length = targets.shape[1]
        buffer = torch.empty(min(ctx.chunk, length), logits.shape[-1], dtype=lse.dtype, device=logits.device)
        for b, sl in _row_chunks(targets.shape[0], length, ctx.chunk):
            g = grad_out[b, sl, None].to(lse.dtype)
            gz = buffer[: sl.stop - sl.start]
            # d/dz_j [z_y − lse(z)] = 1[j = y] − softmax(z)_j
            gz.copy_(logits[b, sl]).sub_(lse[b, sl, None]).exp_().mul_(-g)
            gz.scatter_add_(-1, targets[b, sl, None], g)
            grad[b, sl] = gz
        return grad, None, None


def token_logps(logits: Tensor, input_ids: Tensor, *, chunk_size: Optional[int] = None) -> Tensor:
    """log p(x_{t+1} | x_{<=t}) for every position: [B, T, V] logits, [B, T] ids -> [B, T-1] (float32 or wider).

    Memory-conscious (module docstring): never holds a float32 copy of the whole logits, forward or backward.
    chunk_size: positions converted to float32 at a time (default: CHUNK_ELEMENTS // V).
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"token_logps: logits must be [B, T, V] and input_ids [B, T] with the same B, T; "
            f"got logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(f"token_logps: need at least 2 tokens per sequence to predict one; got T={input_ids.shape[1]}")
    vocab = logits.shape[-1]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"token_logps: chunk_size must be >= 1, got {chunk_size}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(
            f"token_logps: input_ids must lie in [0, {vocab}) (the logits' vocabulary); "
            f"got min {int(input_ids.min())}, max {int(input_ids.max())}"
        )
    return _TokenLogProb.apply(logits, input_ids[:, 1:].long(), chunk_size)


def segment_logps(tok_logps: Tensor, segments: Tensor, n_segments: int) -> Tuple[Tensor, Tensor]:
    """Sum and count of the token log-probs of each agent turn: -> (sums [B, S], counts [B, S], counts int64).

    segments[b, t] = k in 1..n_segments marks token t of input_ids as a token of agent turn k, 0 = not a
    target. Token t's log-prob is tok_logps[:, t-1], so segments[:, 0] must be 0 (the first token has none).
    A turn absent from a sequence has sum 0 and count 0.
    """
    batch, length = segments.shape if segments.dim() == 2 else (None, None)
    if segments.dim() != 2 or tok_logps.shape != (batch, length - 1):
        raise ValueError(
            f"segment_logps: segments must be [B, T] (aligned to input_ids) and tok_logps [B, T-1]; "
            f"got segments {tuple(segments.shape)}, tok_logps {tuple(tok_logps.shape)}"
        )
    if n_segments < 1:
        raise ValueError(f"segment_logps: n_segments must be >= 1, got {n_segments}")
    if segments.numel() and (int(segments.min()) < 0 or int(segments.max()) > n_segments):
        raise ValueError(
            f"segment_logps: segment ids must lie in 0..{n_segments} (0 = not a target); "
            f"got min {int(segments.min())}, max {int(segments.max())}"
        )
    if bool((segments[:, 0] != 0).any()):
        raise ValueError("segment_logps: segments[:, 0] must be 0: the first token of a sequence has no log-prob")
    seg = segments[:, 1:].long()
    sums = tok_logps.new_zeros(batch, n_segments + 1).scatter_add(1, seg, tok_logps)
    counts = torch.zeros(batch, n_segments + 1, dtype=torch.long, device=seg.device)
    counts.scatter_add_(1, seg, torch.ones_like(seg))
    return sums[:, 1:], counts[:, 1:]  # column 0 collected the non-target tokens


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize={normalize!r}: valid values are {', '.join(NORMALIZE_CHOICES)}")


def turn_advantages(pol_sums: Tensor, ref_sums: Tensor, counts: Tensor, normalize: str = "turn") -> Tensor:
    """Per-turn advantage [B, S] from the per-turn log-prob sums of the critic and the reference.

    "turn": (pol − ref) / L_t, the paper's Eq. 3; "none": pol − ref (the no-normalisation ablation);
    "trajectory": (pol − ref) / Σ_t L_t, each turn's share of the reference code's single mean, so that
    the three modes all give critic_score = Σ_t A_t. Turns with no tokens get 0.
    """
    _check_normalize(normalize)
    if not (pol_sums.shape == ref_sums.shape == counts.shape) or pol_sums.dim() != 2:
        raise ValueError(
            f"turn_advantages: pol_sums, ref_sums, counts must all be [B, S]; got {tuple(pol_sums.shape)}, "
            f"{tuple(ref_sums.shape)}, {tuple(counts.shape)}"
        )
    diff = pol_sums - ref_sums
    if normalize == "none":
        return diff
    lengths = counts if normalize == "turn" else counts.sum(dim=1, keepdim=True).expand_as(counts)
    return diff / lengths.clamp(min=1).to(diff.dtype)


def critic_score(pol_sums: Tensor, ref_sums: Tensor, counts: Tensor, normalize: str = "turn") -> Tensor:
    """Σ_t A_t per trajectory, [B]: the paper's Eq. 2+3 ("turn"), the reference's one mean over all agent
    tokens ("trajectory"), or the plain sum of log-ratios ("none"). β is applied by `bt_loss`."""
    return turn_advantages(pol_sums, ref_sums, counts, normalize).sum(dim=1)


def bt_loss(score_chosen: Tensor, score_rejected: Tensor, beta: float = 0.1) -> Tensor:
    """Bradley-Terry loss of Eq. 2 per pair, [B]: −log σ(β (s⁺ − s⁻))."""
    if score_chosen.shape != score_rejected.shape:
        raise ValueError(
            f"bt_loss: chosen and rejected scores must have the same shape; got {tuple(score_chosen.shape)} "
            f"and {tuple(score_rejected.shape)}"
        )
    return -F.logsigmoid(beta * (score_chosen - score_rejected))


def dpo_loss(
    pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float = 0.1
) -> Tuple[Tensor, Tensor, Tensor]:
    """DPO (Eq. 4) from summed log-probs, [B] each: (loss, chosen_reward, rejected_reward).

    reward = β (log π − log π_ref), detached; loss = −log σ(reward⁺ − reward⁻).
    """
    shapes = {tuple(t.shape) for t in (pol_chosen, pol_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: the four log-prob tensors must have one shape; got {sorted(shapes)}")
    chosen = beta * (pol_chosen - ref_chosen)
    rejected = beta * (pol_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def nll_loss(tok_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean token NLL of each sequence over its target tokens, [B] (the fork's reduction; module docstring).

    mask is either [B, T-1] (aligned to tok_logps) or [B, T] (aligned to input_ids, like `segments`; its
    first column is dropped: the first token has no log-prob). Nonzero = target.
    """
    if mask.dim() == 2 and mask.shape == (tok_logps.shape[0], tok_logps.shape[1] + 1):
        mask = mask[:, 1:]
    if mask.shape != tok_logps.shape:
        raise ValueError(
            f"nll_loss: mask must be [B, T-1] like tok_logps {tuple(tok_logps.shape)} or [B, T]; "
            f"got {tuple(mask.shape)}"
        )
    weight = (mask != 0).to(tok_logps.dtype)
    return -(tok_logps * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


class ValueHead(nn.Module):
    """Scalar critic on a causal LM backbone: Linear(mean of the last hidden states over the real tokens).

    The paper's value-function ablation (and its frontend critic: "a regression head on top of the mean
    representations of all ... tokens"). The backbone's decoder (`base_model`, e.g. LlamaModel) is called
    directly so that no [B, T, V] logits are computed; a model without a separate decoder is called with
    output_hidden_states=True. Position ids follow the attention mask, so left padding does not shift the
    positions of the real tokens (rotary models do not care; absolute-position models would). The head
    starts at zero bias and small weights: initial values near 0 (probability 0.5), whatever the backbone's
    hidden scale.
    """

    def __init__(self, backbone: nn.Module, hidden_size: Optional[int] = None, init_std: float = 1e-3):
        super().__init__()
        self.backbone = backbone
        if hidden_size is None:
            config = backbone.config
            hidden_size = (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        decoder = getattr(self.backbone, "base_model", self.backbone)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if decoder is not self.backbone:
            return decoder(**kwargs).last_hidden_state
        return self.backbone(**kwargs, output_hidden_states=True).hidden_states[-1]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Value logits [B] (apply a sigmoid for the predicted success probability)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"ValueHead: attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("ValueHead: every sequence needs at least one token with attention_mask = 1")
        hidden = self.hidden_states(input_ids, attention_mask).float()
        weight = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weight).sum(dim=1) / weight.sum(dim=1)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)


def value_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy with logits per example, [B]; labels in [0, 1] (success, or fraction of tests)."""
    if logits.shape != labels.shape:
        raise ValueError(f"value_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must match")
    if labels.numel() and (float(labels.min()) < 0 or float(labels.max()) > 1):
        raise ValueError(
            f"value_loss: labels must lie in [0, 1]; got min {float(labels.min())}, max {float(labels.max())}"
        )
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
