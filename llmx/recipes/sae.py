"""SAE recipe: a TopK sparse autoencoder on a model's residual stream, the concept extractor CoCoMix reads
(llmx.concept.sae has the method and every choice). Dispatched from the pretrain kind when sae.train is true.

    llmx run recipe=sae_smollm2                           # SmolLM2-135M, block 10, 4096 latents, pylib text (CPU)
    llmx run recipe=sae_smollm2 sae.layer=5 sae.n_latents=8192 trainer.max_steps=4000
    llmx run recipe=sae_smollm2 resume=auto               # continue a stopped run exactly

Feature -> config flag:
    model read (any HF causal LM, frozen)     model=smollm2_135m|gemma3_270m|..., model.path
    block, width, sparsity                    sae.layer, sae.n_latents, sae.k
    input normalisation                       sae.normalize
    dead latents (AuxK)                       sae.aux_k, sae.aux_coef, sae.dead_tokens
    text, tokens per step, steps, lr          data=..., data.seq_len, trainer.batch_size (blocks per step),
                                              trainer.max_steps, optim.lr
    progress bar, checkpoints, resume         logger.progress, trainer.ckpt_every, resume=auto
    where CoCoMix finds it                    sae.name (cache_dir/sae/<name>)

Read top to bottom: 1. check the config against the model's shape (meta device, no weights), 2. load the model
and text, 3. the SAE and its b_pre from the first blocks, 4. train with the llmx trainer: each step runs the
frozen model up to the block on the step's token blocks and trains the SAE on their residuals, 5. quality on
held-out blocks, save (run_dir/sae) and publish (cache_dir/sae/<name>), results.json.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from llmx.concept.sae import (SAEConfig, TopKSAE, block_output, evaluate_sae, init_from_data, renormalise_decoder,
                              save_sae, tangent_grad, teacher_blocks)
from llmx.data import StepLoader, build_datasets, build_tokenizer
from llmx.models import build_model, load_pretrained
from llmx.trainer.distributed import destroy_distributed, init_distributed
from llmx.trainer.trainer import Trainer, count_targets
from llmx.utils import LlmxError, add_to_final, atomic_write_json, cache_dir


def check_config(cfg) -> None:
    """The SAE's own values, before any work (llmx.launch.check_before_run); check_shape waits for the model."""
    s = cfg.sae
    if not 1 <= s.k <= s.n_latents:
        raise LlmxError(f"sae.k={s.k} must be in [1, sae.n_latents={s.n_latents}]")
    if not 0 <= s.skip_first < cfg.data.seq_len:
        raise LlmxError(f"sae.skip_first={s.skip_first} must be in [0, data.seq_len={cfg.data.seq_len})")
    for key in ("init_blocks", "eval_blocks", "dead_tokens"):
        if getattr(s, key) < 1:
            raise LlmxError(f"sae.{key}={getattr(s, key)} must be >= 1")


def check_shape(cfg, num_layers: int, hidden: int) -> None:
    s = cfg.sae
    if not 0 <= s.layer < num_layers:
        raise LlmxError(f"sae.layer={s.layer} is outside {cfg.model.name}'s {num_layers} blocks "
                        f"(valid: 0..{num_layers - 1})")
    if s.n_latents < hidden:
        raise LlmxError(f"sae.n_latents={s.n_latents} is below {cfg.model.name}'s width {hidden}: an SAE "
                        "dictionary is overcomplete (4-64x the width is usual)")


def sae_dir(cfg) -> Path:
    """Where the finished SAE is published, and where CoCoMix looks for it by name."""
    return cache_dir(cfg.data.cache_dir) / "sae" / (cfg.sae.name or cfg.name)


def residuals(model, layer: int, blocks: torch.Tensor, skip_first: int) -> torch.Tensor:
    """The residuals after block `layer` of every token of blocks [B, T] but the first skip_first, as [N, d]."""
    with torch.no_grad():
        h = block_output(model, layer, blocks.to(next(model.parameters()).device))
    return h[:, skip_first:].reshape(-1, h.shape[-1]).float()


def main(cfg) -> Dict[str, Any]:
    s = cfg.sae
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlmxError("the SAE recipe runs in one process (the SAE is small next to the model it reads); "
                        "use launcher=local and more blocks per step (trainer.batch_size)")
    meta = build_model(cfg.model, vocab_size=cfg.model.vocab_size or 8, device="meta")
    check_config(cfg)
    check_shape(cfg, len(teacher_blocks(meta)), meta.config.hidden_size)
    info = init_distributed(cfg.trainer.device)
    hooks = []
    try:
        run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # 2. The frozen model and its text (pretrained models bring their tokenizer).
        if cfg.model.source == "preset":
            tok = build_tokenizer(cfg.data)
            model = build_model(cfg.model, vocab_size=len(tok))
        else:
            model, model_tok = load_pretrained(cfg.model)
            tok = build_tokenizer(cfg.data, model_tokenizer=model_tok)
        model = model.to(info.device).eval().requires_grad_(False)
        train, val = build_datasets(cfg.data, tok)
        if len(val) < 1:
            raise LlmxError("sae: no held-out blocks for the quality figures: check data.val_fraction")
        # 3. The SAE; b_pre from the first init_blocks training blocks.
        torch.manual_seed(cfg.seed)
        sae = TopKSAE(SAEConfig(d_model=model.config.hidden_size, n_latents=s.n_latents, k=s.k,
                                normalize=s.normalize, aux_k=s.aux_k, aux_coef=s.aux_coef, dead_tokens=s.dead_tokens,
                                teacher=cfg.model.name, layer=s.layer))
        first = torch.stack([train[i] for i in range(min(s.init_blocks, len(train)))]).long()
        init_from_data(sae, residuals(model, s.layer, first, s.skip_first))
        if info.is_main:
            print(f"llmx: {cfg.name}: SAE on {cfg.model.name} block {s.layer} (width {sae.cfg.d_model}): "
                  f"{s.n_latents} latents, k={s.k}; {len(train)} training blocks of {cfg.data.seq_len} tokens",
                  flush=True)
        # The decoder's columns stay unit-norm: the gradient loses its component along each column as it is
        # computed, and the columns are renormalised after every optimiser step.
        w = sae.decoder.weight
        hooks.append(w.register_hook(lambda g: tangent_grad(w, g)))
        hooks.append(register_optimizer_step_post_hook(lambda *_: renormalise_decoder(sae)))

        def loss_fn(net, batch):
            out = net.loss(residuals(model, s.layer, batch, s.skip_first))
            # The trainer divides by the batch's target count: scale so that it logs the per-token mean.
            return (out["loss"] if net.training else out["nmse"]) * count_targets(batch)

        loader = StepLoader(train, batch_size=cfg.trainer.batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                            rank=info.rank, world_size=info.world_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        final = Trainer(cfg, run_dir, info, sae, loader, val, tokenizer=tok, loss_fn=loss_fn).fit()
        if not info.is_main:
            return final
        # 5. Quality on held-out blocks, save and publish.
        held = [torch.stack([val[i] for i in range(j, min(j + 4, s.eval_blocks, len(val)))]).long()
                for j in range(0, min(s.eval_blocks, len(val)), 4)]
        quality = evaluate_sae(sae, (residuals(model, s.layer, b, s.skip_first) for b in held))
        extra = {"metrics": quality, "tokens_seen": final["tokens_seen"], "steps": final["step"],
                 "data": cfg.data.name, "seq_len": cfg.data.seq_len}
        save_sae(sae, run_dir / "sae", extra=extra)
        published = save_sae(sae, sae_dir(cfg), extra=extra)
        results = {"quality": quality, "published": str(published), "layer": s.layer, "n_latents": s.n_latents,
                   "k": s.k, "model": cfg.model.name, "final": {k: final.get(k) for k in ("step", "val_loss",
                                                                                      "tokens_per_s")}}
        atomic_write_json(run_dir / "results.json", results)
        headline = {f"sae_{k}": v for k, v in quality.items() if k != "tokens"}
        add_to_final(run_dir, final, headline)
        print(f"llmx: SAE: normalised MSE {quality['nmse']:.3f}, explained variance "
              f"{quality['explained_variance']:.3f}, L0 {quality['l0']:.1f}, never fired "
              f"{quality['never_fired_fraction']:.3f}, dead {quality['dead_fraction']:.3f} "
              f"({quality['tokens']} held-out tokens); saved to {run_dir / 'sae'} and {published}", flush=True)
        return {**final, **headline}
    finally:
        for h in hooks:
            h.remove()
        destroy_distributed()
