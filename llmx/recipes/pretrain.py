"""Pretrain recipe: a causal LM trained on packed text with the llmx trainer core.

    llmx run                                   # pretrain_tiny: ~1.6M-param Llama on the pydoc corpus, CPU
    llmx run recipe=pretrain_llama60m          # GaLore paper's 60M Llama on C4 (GPU, hub access)
    llmx run launcher=torchrun launcher.nproc_per_node=2   # FSDP2 over 2 processes (gloo on CPU)

Feature -> config flag:
    model preset or pretrained weights        model=llama_tiny|llama_60m|...|smollm2_135m
    data source, sequence length, tokenizer   data=pydoc|files|c4, data.seq_len, data.tokenizer.*
    optimizer, lr schedule, clipping          optim=adamw, optim.lr, optim.schedule, optim.grad_clip
    lr per parameter group (name patterns)    ++optim.lr_scales={*mlp.*_proj.weight:0.5}
    optimizer inside backward                 optim.in_backward=true
    global batch / micro-batch (accumulation) trainer.batch_size, trainer.micro_batch_size
    bf16 mixed precision (GPU)                trainer.precision=auto|bf16|fp32
    activation checkpointing, compile         trainer.activation_checkpointing, trainer.compile
    evaluation, checkpoints, resume           trainer.eval_every, trainer.ckpt_every, resume=auto
    Hugging Face export at the end            trainer.export_hf

Read top to bottom: seed, build tokenizer and model, build data, train, report.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from llmx.data import StepLoader, build_datasets, build_tokenizer
from llmx.models import build_model, count_parameters, load_pretrained
from llmx.trainer.distributed import barrier, destroy_distributed, init_distributed
from llmx.trainer.trainer import Trainer


def check_config(cfg) -> None:
    """The checks of the recipe file main() hands cfg to, before any work (llmx.launch.check_before_run)."""
    if cfg.cocomix.method:
        from llmx.recipes.cocomix import check_config as check
    elif cfg.sae.train:
        from llmx.recipes.sae import check_config as check
    elif str(getattr(cfg.data.source, "value", cfg.data.source)) == "latent_cot":
        from llmx.recipes.token_assorted import check_config as check
    elif str(getattr(cfg.data.source, "value", cfg.data.source)) == "graph_paths":
        from llmx.recipes.spectral_journey import check_config as check
    else:
        return
    check(cfg)


def main(cfg) -> dict:
    if cfg.cocomix.method:
        # CoCoMix and its baselines: teacher, SAE, concept labels and the student in one file.
        from llmx.recipes.cocomix import main as cocomix_main

        return cocomix_main(cfg)
    if cfg.sae.train:
        # A sparse autoencoder on a frozen model's residual stream (CoCoMix's concepts): llmx/recipes/sae.py.
        from llmx.recipes.sae import main as sae_main

        return sae_main(cfg)
    source = str(getattr(cfg.data.source, "value", cfg.data.source))
    if source == "graph_paths":
        # Shortest paths on graphs (Spectral Journey): its own data, evaluation and probes in one file.
        from llmx.recipes.spectral_journey import main as spectral_journey_main

        return spectral_journey_main(cfg)
    if source == "latent_cot":
        # Token Assorted: VQ-VAE latents mixed with chain-of-thought text, and its evaluation, in one file.
        from llmx.recipes.token_assorted import main as token_assorted_main

        return token_assorted_main(cfg)
    info = init_distributed(cfg.trainer.device)
    try:
        run_dir = Path(cfg.run_dir)
        # Every rank seeds identically, so a model built on CPU is the same on every rank before
        # FSDP shards it: 1-process and N-process runs start from the same weights.
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        # 1. Tokenizer and model. A pretrained model brings its own tokenizer; a preset is sized to the
        #    tokenizer's vocabulary. Rank 0 goes first so that caches (BPE training, GGUF conversion,
        #    tokenized Arrow files) are built once and the other ranks read them.
        def build():
            if cfg.model.source == "preset":
                tok = build_tokenizer(cfg.data)
                big = cfg.model.init_device == "meta" or (
                    cfg.model.init_device == "auto" and info.distributed and _preset_is_large(cfg, len(tok))
                )
                model = build_model(cfg.model, vocab_size=len(tok), device="meta" if big else "cpu")
            else:
                model, model_tok = load_pretrained(cfg.model)
                tok = build_tokenizer(cfg.data, model_tokenizer=model_tok)
            train, val = build_datasets(cfg.data, tok)
            return tok, model, train, val

        if info.is_main:
            tokenizer, model, train, val = build()
        barrier()
        if not info.is_main:
            torch.manual_seed(cfg.seed)
            tokenizer, model, train, val = build()
        torch.manual_seed(cfg.seed)  # the data/model builders may have drawn random numbers on rank 0 only

        if info.is_main:
            n_seq = f"{len(train)}" if hasattr(train, "__len__") else "streamed"
            print(
                f"llmx: {cfg.name}: {cfg.model.name} ({count_parameters(model) / 1e6:.2f}M parameters), "
                f"{n_seq} training sequences of {cfg.data.seq_len} tokens, world size {info.world_size}, "
                f"device {info.device.type}",
                flush=True,
            )

        # 2. Data order: the global batch is split over ranks and micro-batches by the loader.
        loader = StepLoader(
            train,
            batch_size=cfg.trainer.batch_size,
            micro_batch_size=cfg.trainer.micro_batch_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
        )

        # 3. Train.
        trainer = Trainer(cfg, run_dir, info, model, loader, val, tokenizer=tokenizer)
        final = trainer.fit()

        # 4. Report (rank 0): the loss curve next to metrics.jsonl.
        if info.is_main:
            from llmx.logging.plots import plot_run

            plot_run(run_dir)
            print(
                f"llmx: done: step {final['step']}, val loss {final['val_loss']:.4f}, "
                f"val ppl {final['val_ppl']:.2f}, {final['tokens_per_s'] or 0:.0f} tokens/s",
                flush=True,
            )
        return final
    finally:
        destroy_distributed()


def _preset_is_large(cfg, vocab_size: int) -> bool:
    m = cfg.model
    per_layer = 4 * m.hidden_size * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
    total = m.num_hidden_layers * per_layer + 2 * vocab_size * m.hidden_size
    return total > cfg.trainer.meta_init_threshold
