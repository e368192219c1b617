"""Preference and SFT training of a causal LM on dialogue items, on llmx's trainer core (single process or FSDP2).

Shared by the `rl` recipe (SWEET-RL's critic and actor, RFT, multi-turn DPO) and the `synthesize` recipe
(NaturalReasoning's distillation, RFT and DPO self-training), so there is one DPO in llmx. Items are dicts of token
ids and turn segments (llmx.rl.chat.render: segment k > 0 marks the tokens of the k-th assistant turn, the only
targets): {ids, segments} for SFT, {chosen_ids, chosen_segments, rejected_ids, rejected_segments, ref_chosen,
ref_rejected} for pairs, whose reference log-probs `add_reference` computes once with the initial model.

Losses (llmx.rl.losses holds the formulas): "sft" is the summed NLL of the target tokens; ("pairs", normalize,
beta, nll) is DPO on summed log-ratios when normalize="none" (Rafailov et al. 2023, Eq. 7; SWEET-RL Eq. 4) or
SWEET-RL's Bradley-Terry on per-turn advantages (Eq. 2-3) otherwise, plus nll x the chosen side's mean NLL.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from llmx.utils import LlmxError


def load_policy(path: str):
    """(model, tokenizer) of a saved Hugging Face directory, in float32, with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def pair_item(tok, chosen, rejected, sys_c: Optional[str], sys_r: Optional[str]) -> Dict[str, Any]:
    """A preference item from two dialogues (message lists), each rendered with its own system prompt."""
    from llmx.rl.chat import render

    ci, cs = render(tok, chosen, sys_c)
    ri, rs = render(tok, rejected, sys_r)
    return {"chosen_ids": ci, "chosen_segments": cs, "rejected_ids": ri, "rejected_segments": rs}


def schedule(t, n_items: int) -> Dict[str, Any]:
    """Learning rate, batch sizes, warm-up and the step count of `t.epochs` over n_items."""
    steps = max(1, math.ceil(t.epochs * n_items / t.batch_size))
    return {"lr": t.lr, "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size,
            "warmup_steps": t.warmup_steps, "steps": steps}


def train(cfg, info, d: Path, model, tok, items, val_items, mode, t: Dict[str, Any]) -> Dict[str, Any]:
    """Train `model` on `items` with the trainer core (resuming from d's newest checkpoint), export it to
    d/hf. mode "sft": NLL on the agent tokens; ("pairs", normalize, beta, nll): DPO / Bradley-Terry."""
    from omegaconf import open_dict

    from llmx.rl.data import ItemLoader, collate_pairs, collate_sequences, item_eval_batches
    from llmx.trainer.checkpoint import find_newest
    from llmx.trainer.trainer import Trainer

    if len(val_items) < info.world_size:
        # The trainer's evaluation needs at least one held-out item per rank; a small split gets the missing
        # ones from the end of the training items.
        need = info.world_size - len(val_items)
        items, val_items = list(items[:-need]), list(val_items) + list(items[-need:])
    if len(items) < t["batch_size"]:
        raise LlmxError(f"{d.name}: {len(items)} training items, fewer than one batch of {t['batch_size']}; "
                        "more data or a smaller batch size is needed")
    collate = collate_sequences if mode == "sft" else collate_pairs
    loss_fn = sft_loss if mode == "sft" else pair_loss(*mode[1:])
    stage_cfg = copy.deepcopy(cfg)
    with open_dict(stage_cfg):
        stage_cfg.name = f"{cfg.name}/{d.name}"
        stage_cfg.run_dir = str(d)
        stage_cfg.trainer.max_steps = t["steps"]
        stage_cfg.trainer.batch_size = t["batch_size"]
        stage_cfg.trainer.micro_batch_size = t["micro_batch_size"]
        stage_cfg.trainer.export_hf = True
        stage_cfg.trainer.eval_every = 0
        stage_cfg.trainer.eval_batches = max(1, len(val_items) // t["micro_batch_size"])
        stage_cfg.optim.lr = t["lr"]
        stage_cfg.optim.warmup_steps = min(t["warmup_steps"], t["steps"] - 1)
        stage_cfg.resume = "auto" if find_newest([d]) else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loader = ItemLoader(items, collate, pad, batch_size=t["batch_size"], micro_batch_size=t["micro_batch_size"],
                        rank=info.rank, world_size=info.world_size, seed=cfg.seed, shuffle=True)
    trainer = Trainer(stage_cfg, d, info, model, loader, val_items, tokenizer=tok, loss_fn=loss_fn,
                      eval_batches_fn=item_eval_batches(val_items, collate, pad))
    final = trainer.fit()
    return {k: v for k, v in final.items() if k in ("step", "train_loss", "val_loss", "tokens_per_s", "train_time_s",
                                                     "peak_mem_mb")}


def sft_loss(model, batch) -> torch.Tensor:
    """Summed NLL of the agent-turn tokens (the trainer divides by batch["n_targets"] over the step)."""
    from llmx.rl.losses import token_logps

    ids = batch["input_ids"]
    logps = token_logps(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids)
    return -(logps * (batch["segments"][:, 1:] > 0)).sum()


def pair_loss(normalize: str, beta: float, nll: float):
    """Per-pair DPO (normalize=none: summed log-ratios, Eq. 4) or SWEET's Bradley-Terry on turn advantages
    (Eq. 2-3), plus `nll` x the chosen sequence's mean token NLL; summed over the micro-batch's pairs."""
    from llmx.rl.losses import bt_loss, critic_score, dpo_loss, nll_loss, segment_logps, token_logps

    def loss(model, batch) -> torch.Tensor:
        ids, seg, ref = batch["input_ids"], batch["segments"], batch["ref_sums"]
        logps = token_logps(model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids)
        sums, counts = segment_logps(logps, seg, ref.shape[1])
        m = ids.shape[0] // 2
        ref = ref.to(sums.dtype)
        if normalize == "none":
            pol, r = sums.sum(-1), ref.sum(-1)
            out = dpo_loss(pol[:m], pol[m:], r[:m], r[m:], beta)[0]
        else:
            score = critic_score(sums, ref, counts, normalize)
            out = bt_loss(score[:m], score[m:], beta)
        if nll:
            out = out + nll * nll_loss(logps[:m], seg[:m, 1:] > 0)
        return out.sum()

    return loss


@torch.no_grad()
def turn_sums(model, rows: Sequence[Dict[str, Any]], device, batch_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-turn summed log-probs and token counts of `rows` ({ids, segments}) under `model`."""
    from llmx.rl.data import collate_sequences
    from llmx.rl.losses import segment_logps, token_logps

    model = model.to(device).eval()
    turns = max(max(r["segments"]) for r in rows)
    sums, counts = [], []
    pad = getattr(model.config, "pad_token_id", None) or 0
    for lo in range(0, len(rows), batch_size):
        b = collate_sequences(rows[lo: lo + batch_size], pad)
        logps = token_logps(model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits,
                            b["input_ids"].to(device))
        s, c = segment_logps(logps, b["segments"].to(device), turns)
        sums.append(s.double().cpu())
        counts.append(c.cpu())
    return torch.cat(sums), torch.cat(counts)


def add_reference(model, items: List[Dict[str, Any]], device) -> None:
    """Store the reference model's per-turn summed log-probs in each pair item (computed once, before training:
    the model passed in is the initial policy, i.e. π_ref)."""
    for side in ("chosen", "rejected"):
        rows = [{"ids": it[f"{side}_ids"], "segments": it[f"{side}_segments"]} for it in items]
        sums, _ = turn_sums(model, rows, device)
        for it, s in zip(items, sums):
            it[f"ref_{side}"] = s[: max(max(it[f"{side}_segments"]), 1)].tolist()


def pair_accuracy(model, items, normalize: str, device) -> float:
    """Share of held-out pairs whose chosen trajectory the critic scores higher (its Eq. 2 score)."""
    from llmx.rl.losses import critic_score

    if not items:
        return float("nan")
    scores = {}
    for side in ("chosen", "rejected"):
        rows = [{"ids": it[f"{side}_ids"], "segments": it[f"{side}_segments"]} for it in items]
        sums, counts = turn_sums(model, rows, device)
        ref = torch.zeros_like(sums)
        for i, it in enumerate(items):
            ref[i, : len(it[f"ref_{side}"])] = torch.tensor(it[f"ref_{side}"], dtype=ref.dtype)
        scores[side] = critic_score(sums, ref, counts, normalize)
    return float((scores["chosen"] > scores["rejected"]).double().mean())
