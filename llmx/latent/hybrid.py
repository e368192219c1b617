"""Token Assorted's hybrid sequences and vocabulary extension (Su et al., 2025, "Token Assorted: Mixing Latent and
Text Tokens for Improved Language Model Reasoning", arXiv 2502.03275, section 3 and Figure 3.1).

A training sample X = P ⊕ C ⊕ S (prompt, chain of thought, solution) becomes

    P ⊕ <boLatent> z_1 ... z_{m/L} <eoLatent> ⊕ C[m:] ⊕ S

where z_j is the VQ-VAE code (llmx.latent.vqvae) of the j-th chunk of L chain-of-thought tokens (one latent per
chunk: compression r = L = 16), and m, a multiple of L, is drawn per example. Only whole chunks are replaced:
m is capped at the largest multiple of L that fits in C. With m = 0 the sequence is plain CoT, without
delimiters (the paper's Figure 3.1 shows the delimiters around latents only).

Mixing (`mix`), the method and the paper's Table 4.4 ablations:
  random      Latent-AR, the method: m drawn uniformly from `m_set` for every example in every epoch (single
              stage, no curriculum)
  all         All-Replace: every whole chunk of C replaced
  curriculum  Curriculum-Replace: epoch e of E uses the (e * len(m_set) // E)-th value of the sorted m_set, so
              training goes from little to much replacement in stages
  poisson     Poisson-Replace: as many chunks as `random` replaces, but at uniformly random chunk positions of C
              (not from the left); each run of adjacent replaced chunks is wrapped in its own delimiters
  none        no latents (the CoT baseline)

The paper's m-set for math is reported only by a secondary source ({0, 72, 128, 160, 192, 224, 256}); 72 is not
a multiple of 16, so values are rounded down to whole chunks here. Every value is config.

Vocabulary extension (pretrained models): the tokenizer gains `<boLatent>`, `<eoLatent>` and `<latent_0>` ...
`<latent_{K-1}>` as added special tokens, and the embedding matrix (and an untied LM head) gains rows drawn from a
Gaussian fitted per dimension to the existing rows, mean + `noise` * std * N(0, 1) (Hewitt 2021's argument: rows
near the mean keep the new tokens' initial logits near the average, so the pretrained distribution over old
tokens barely moves; the noise makes the K latent rows distinct). The paper says only that the vocabulary is
extended with new embeddings. The tokenizer is saved with the model, so an HF export loads and generates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from llmx.utils import LlmxError

BEGIN, END = "<boLatent>", "<eoLatent>"
MIXES = ("random", "all", "curriculum", "poisson", "none")
Example = Tuple[List[int], List[int], List[int]]  # prompt, CoT, solution token ids


def latent_tokens(codebook_size: int) -> List[str]:
    """The tokens a vocabulary gains: the two delimiters, then one token per code."""
    return [BEGIN, END] + [f"<latent_{i}>" for i in range(codebook_size)]


@dataclass(frozen=True)
class LatentIds:
    """Where the latent tokens sit in a vocabulary: <boLatent>, <eoLatent>, and code i at `first_code + i`."""

    begin: int
    end: int
    first_code: int
    codebook_size: int

    def code(self, i: int) -> int:
        if not 0 <= i < self.codebook_size:
            raise LlmxError(f"latent code {i} is outside the codebook of {self.codebook_size} codes")
        return self.first_code + i

    def is_latent(self, token_id: int) -> bool:
        return token_id in (self.begin, self.end) or self.first_code <= token_id < self.first_code + self.codebook_size


def latent_ids(tok, codebook_size: int) -> LatentIds:
    """The latent tokens' ids in `tok`; a clear error when the tokenizer was extended for another codebook."""
    names = latent_tokens(codebook_size)
    ids = tok.convert_tokens_to_ids(names)
    unk = getattr(tok, "unk_token_id", None)
    missing = [n for n, i in zip(names, ids) if i is None or (i == unk and n != getattr(tok, "unk_token", None))]
    if missing:
        raise LlmxError(f"the tokenizer lacks {len(missing)} of the {len(names)} latent tokens (first: {missing[0]}); "
                        f"it was not extended for a codebook of {codebook_size} codes")
    extra = tok.convert_tokens_to_ids(f"<latent_{codebook_size}>")
    if extra is not None and extra != unk:
        raise LlmxError(f"the tokenizer has <latent_{codebook_size}>: it was extended for a codebook larger than "
                        f"{codebook_size} codes (latent.codebook_size)")
    codes = ids[2:]
    if codes != list(range(codes[0], codes[0] + codebook_size)):
        raise LlmxError("the tokenizer's latent tokens are not consecutive ids")
    return LatentIds(ids[0], ids[1], codes[0], codebook_size)


# ------------------------------------------------------------------------------------------ hybrid samples


def whole_chunks(cot_len: int, chunk_len: int) -> int:
    return cot_len // chunk_len


def choose_m(mix: str, m_set: Sequence[int], chunk_len: int, rng: random.Random, epoch: int = 0,
             epochs: int = 1) -> int:
    """The number of leading CoT tokens to replace (before capping at the example's whole chunks)."""
    if mix == "none":
        return 0
    if mix == "all":
        return 1 << 30
    values = sorted(int(m) // chunk_len * chunk_len for m in m_set)
    if mix == "curriculum":
        return values[min(len(values) - 1, epoch * len(values) // max(1, epochs))]
    return rng.choice(values)  # random and poisson


def hybrid(example: Example, codes: Sequence[int], m: int, chunk_len: int, ids: LatentIds, mix: str = "random",
           rng: Optional[random.Random] = None) -> Tuple[List[int], List[int]]:
    """(prompt ids, response ids) of one hybrid sample; `codes` are the codes of C's whole chunks, in order."""
    prompt, cot, solution = example
    n_chunks = whole_chunks(len(cot), chunk_len)
    if len(codes) != n_chunks:
        raise LlmxError(f"{len(codes)} latent codes for a chain of thought of {len(cot)} tokens ({n_chunks} whole "
                        f"chunks of {chunk_len})")
    k = min(max(0, m) // chunk_len, n_chunks)
    if k == 0:
        return list(prompt), list(cot) + list(solution)
    if mix != "poisson":
        latent = [ids.begin] + [ids.code(c) for c in codes[:k]] + [ids.end]
        return list(prompt), latent + list(cot[k * chunk_len:]) + list(solution)
    chosen = set((rng or random.Random(0)).sample(range(n_chunks), k))
    out: List[int] = []
    for j in range(n_chunks):
        if j in chosen:
            if j - 1 not in chosen:
                out.append(ids.begin)
            out.append(ids.code(codes[j]))
            if j + 1 not in chosen:
                out.append(ids.end)
        else:
            out.extend(cot[j * chunk_len:(j + 1) * chunk_len])
    return list(prompt), out + list(cot[n_chunks * chunk_len:]) + list(solution)


def training_pairs(examples: Sequence[Example], codes: Sequence[Sequence[int]], variant: str, mix: str,
                   m_set: Sequence[int], chunk_len: int, ids: Optional[LatentIds], epochs: int, seed: int
                   ) -> List[Tuple[List[int], List[int]]]:
    """`epochs` passes over the examples, each shuffled by (seed, epoch), as (prompt, response) id pairs.

    variant: sol_only (P ⊕ S), cot (P ⊕ C ⊕ S), latent (the hybrid, m drawn afresh every epoch by `mix`)."""
    if variant not in VARIANTS:
        raise LlmxError(f"latent.variant={variant!r}; valid: {list(VARIANTS)}")
    if variant == "latent" and (ids is None or mix not in MIXES):
        raise LlmxError(f"latent.mix={mix!r}; valid: {list(MIXES)}")
    out = []
    for epoch in range(epochs):
        rng = random.Random(f"{seed}/{epoch}")
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in order:
            p, c, s = examples[i]
            if variant == "sol_only":
                out.append((list(p), list(s)))
            elif variant == "cot":
                out.append((list(p), list(c) + list(s)))
            else:
                m = choose_m(mix, m_set, chunk_len, rng, epoch, epochs)
                out.append(hybrid(examples[i], codes[i], m, chunk_len, ids, mix, rng))
    return out


VARIANTS = ("sol_only", "cot", "latent")


def strip_latents(token_ids: Sequence[int], ids: LatentIds) -> List[int]:
    """The text tokens of a generated response (latent tokens and delimiters removed)."""
    return [t for t in token_ids if not ids.is_latent(t)]


def check_codes(codes: Sequence[Sequence[int]], codebook_size: int, where: str) -> None:
    """Refuse a dataset whose latent codes do not fit the codebook (a VQ-VAE of another size made them)."""
    for i, row in enumerate(codes):
        bad = [c for c in row if not 0 <= int(c) < codebook_size]
        if bad:
            raise LlmxError(f"{where}: example {i} has latent id {bad[0]}, outside the codebook of {codebook_size} "
                            "codes; the codes were made by another VQ-VAE (re-encode, or set latent.codebook_size)")


# ------------------------------------------------------------------------------------------ vocabulary extension


def extend_vocabulary(model, tok, codebook_size: int, noise: float = 1.0, seed: int = 0) -> LatentIds:
    """Add the latent tokens to `tok` and the matching rows to `model` (see the module docstring)."""
    names = latent_tokens(codebook_size)
    already = [n for n in names if n in tok.get_vocab()]
    if already:
        raise LlmxError(f"the tokenizer already has latent tokens ({already[0]}, ...); load it with latent_ids instead")
    tok.add_tokens(names, special_tokens=True)
    new = torch.tensor(tok.convert_tokens_to_ids(names))
    old = model.get_input_embeddings().weight.shape[0]
    if len(tok) > old:  # a model may already have spare rows past the tokenizer (padded vocabularies)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
            w = layer.weight
            base = w[: int(new.min())].float()
            fresh = base.mean(0) + noise * base.std(0) * torch.randn(len(names), w.shape[1], generator=gen)
            w[new] = fresh.to(w.dtype)
    return latent_ids(tok, codebook_size)
