"""CoCoMix recipe: pretrain a Llama student from scratch with continuous concepts (llmx.concept.cocomix), or one of
its baselines and ablations on the same data, tokenizer and evaluation. Dispatched from the pretrain kind when
cocomix.method is set.

    llmx run recipe=sae_smollm2                      # once: the teacher's SAE (published to the cache)
    llmx run recipe=cocomix_tiny                     # CoCoMix, online attribution labels
    llmx run -m recipe=cocomix_tiny cocomix.method=cocomix,ntp,kd,pause seed=1,2,3
    llmx run -m recipe=cocomix_tiny cocomix.lam=0.03,0.1,0.3 cocomix.insert_layer=1,2

Feature -> config flag:
    method (CoCoMix, NTP, KD, pause tokens)      cocomix.method=cocomix|ntp|kd|pause
    the paper's ablations                        cocomix.method=prediction_only|add, cocomix.selection=activation
    teacher (any HF causal LM) and its SAE       cocomix.teacher=..., cocomix.sae=<cached name or directory>
    concept loss weight, labels, kept logits     cocomix.lam, cocomix.top, cocomix.k
    labels online (each step) or cached          cocomix.labels=online|cached
    insert layer, concept positions (RoPE)       cocomix.insert_layer, cocomix.concept_position
    baselines at CoCoMix's parameter count       cocomix.match_parameters
    KD weight and temperature                    cocomix.kd_alpha, cocomix.kd_temperature
    FSDP2, activation checkpointing, bf16        launcher=torchrun, trainer.activation_checkpointing, trainer.precision

Read top to bottom: 1. check the config (shapes on the meta device, the SAE's provenance) before any weights load,
2. teacher, tokenizer, SAE and text, 3. the student (widened for NTP/KD), 4. labels (cached: built once, before
training, resumable), 5. train with the llmx trainer; validation loss is next-token loss only, for every method,
6. concept prediction on held-out text, the concepts predicted per token, a steering demonstration, results.json.
Outputs: results.json, final.json, student.safetensors (+ cocomix.json: how to rebuild the student).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llmx.concept.attribution import LabelCache, build_label_cache, concept_labels, labels_fingerprint
from llmx.concept.cocomix import (MIXES, POSITIONS, CoCoMixLM, cocomix_loss, concept_head_parameters, kd_loss,
                                  matched_config, steered, greedy_generate)
from llmx.concept.sae import load_sae
from llmx.data import StepLoader, build_datasets, build_tokenizer
from llmx.models import build_model, count_parameters, load_pretrained, pretrained_dir
from llmx.trainer.distributed import barrier, destroy_distributed, init_distributed
from llmx.trainer.trainer import Trainer, causal_lm_loss, count_targets
from llmx.utils import LlmxError, add_to_final, atomic_write_json, cache_dir, enum_value

METHODS = ("cocomix", "ntp", "kd", "pause", "prediction_only", "add")
MIX = {"cocomix": "interleave", "prediction_only": "none", "add": "add", "pause": "pause"}
CONCEPT_METHODS = ("cocomix", "prediction_only", "add")


def check_config(cfg) -> None:
    c = cfg.cocomix
    if c.method not in METHODS:
        raise LlmxError(f"cocomix.method={c.method!r}; valid: {', '.join(METHODS)}")
    if enum_value(cfg.model.source) != "preset":
        raise LlmxError(f"CoCoMix pretrains its student from scratch: model must be a preset (model.source=preset), "
                        f"not {enum_value(cfg.model.source)!r}")
    if enum_value(cfg.data.tokenizer.source) != "model":
        raise LlmxError("CoCoMix's student reads the teacher's tokens (its labels and KD are per teacher token): "
                        f"data.tokenizer.source must be model, not {enum_value(cfg.data.tokenizer.source)!r}")
    layers = cfg.model.num_hidden_layers
    if not 0 <= c.insert_layer < layers:
        raise LlmxError(f"cocomix.insert_layer={c.insert_layer} is outside the student's {layers} blocks "
                        f"(valid: 0..{layers - 1})")
    checks = [(c.selection in ("attribution", "activation"), f"cocomix.selection={c.selection!r}; valid: "
               "attribution, activation"),
              (c.labels in ("online", "cached"), f"cocomix.labels={c.labels!r}; valid: online, cached"),
              (c.concept_position in POSITIONS, f"cocomix.concept_position={c.concept_position!r}; valid: "
               f"{', '.join(POSITIONS)}"),
              (1 <= c.top <= c.k, f"cocomix.top={c.top} must be in [1, cocomix.k={c.k}]"),
              (c.lam >= 0, f"cocomix.lam={c.lam} must be >= 0"),
              (0 <= c.kd_alpha <= 1, f"cocomix.kd_alpha={c.kd_alpha} must be in [0, 1]"),
              (c.kd_temperature > 0, f"cocomix.kd_temperature={c.kd_temperature} must be > 0"),
              (c.label_batch_size >= 1, f"cocomix.label_batch_size={c.label_batch_size} must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise LlmxError(msg)
    assert set(MIX.values()) <= set(MIXES)


def sae_path(cfg) -> Path:
    """cocomix.sae as a directory, or the SAE an sae recipe published under that name."""
    given = Path(os.path.expanduser(cfg.cocomix.sae))
    if (given / "config.json").is_file():
        return given
    cached = cache_dir(cfg.data.cache_dir) / "sae" / cfg.cocomix.sae
    if (cached / "config.json").is_file():
        return cached
    raise LlmxError(f"cocomix.sae={cfg.cocomix.sae!r} is neither an SAE directory nor an SAE published in "
                    f"{cached.parent}; "
                    f"train it first (llmx run recipe=sae_smollm2 sae.name={cfg.cocomix.sae})")


def check_sae(cfg, path: Path, teacher_cfg=None) -> Dict[str, Any]:
    """The saved SAE's config, refused unless it reads this teacher: its name and k first, then (teacher_cfg, from
    the meta device) its width and block."""
    import json

    saved = json.loads((path / "config.json").read_text())["config"]
    if saved.get("teacher") != cfg.cocomix.teacher.name:
        raise LlmxError(f"the SAE {path} was trained on {saved.get('teacher')!r}, not the teacher "
                        f"{cfg.cocomix.teacher.name!r}")
    if saved["k"] < cfg.cocomix.top:
        raise LlmxError(f"cocomix.top={cfg.cocomix.top} exceeds the SAE's k={saved['k']} active latents")
    if teacher_cfg is not None and (saved["d_model"] != teacher_cfg.hidden_size
                                    or not 0 <= saved["layer"] < teacher_cfg.num_hidden_layers):
        raise LlmxError(f"the SAE {path} (width {saved['d_model']}, block {saved['layer']}) does not fit the teacher "
                        f"(width {teacher_cfg.hidden_size}, {teacher_cfg.num_hidden_layers} blocks)")
    return saved


class Parts:
    """Running sums of the loss's parts (rank 0's micro-batches) for each logged row: train_ntp, train_concept and
    train_kd are means over the log_every steps since the last row, while the row's `loss` is its last step's."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.n = 0

    def add(self, out: Dict[str, torch.Tensor]) -> None:
        for k, v in out.items():
            if k != "loss":
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def pop(self) -> Dict[str, float]:
        row = {f"train_{k}": v / max(1, self.n) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return row


def main(cfg) -> Dict[str, Any]:
    c = cfg.cocomix
    check_config(cfg)
    concepts = c.method in CONCEPT_METHODS
    # Baselines read the SAE's width too: they are matched to the CoCoMix student that uses it.
    needs_sae = concepts or c.match_parameters
    found = sae_path(cfg) if needs_sae else None
    if needs_sae:
        check_sae(cfg, found)
    meta_teacher = build_model(c.teacher, device="meta")
    saved_sae = check_sae(cfg, found, meta_teacher.config) if needs_sae else None
    info = init_distributed(cfg.trainer.device)
    try:
        run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # 2. Teacher, tokenizer, SAE, text. Rank 0 first: the GGUF conversion and tokenized data are cached.
        def load():
            if c.method in ("ntp", "pause"):  # the teacher's tokenizer only: no teacher weights in memory
                from transformers import AutoTokenizer

                teacher, tok = None, AutoTokenizer.from_pretrained(pretrained_dir(c.teacher, weights=False))
            else:
                teacher, tok = load_pretrained(c.teacher)
            tok = build_tokenizer(cfg.data, model_tokenizer=tok)
            return teacher, tok, *build_datasets(cfg.data, tok)

        if info.is_main:
            teacher, tok, train, val = load()
        barrier()
        if not info.is_main:
            teacher, tok, train, val = load()
        if teacher is not None:
            teacher = teacher.to(info.device).eval().requires_grad_(False)
        sae = load_sae(sae_path(cfg)).to(info.device) if concepts else None
        # 3. The student, identical on every rank before FSDP shards it.
        torch.manual_seed(cfg.seed)
        net = build_student(cfg, len(tok), saved_sae)
        if info.is_main:
            print(f"llmx: {cfg.name}: {c.method} student {count_parameters(net) / 1e6:.3f}M parameters "
                  f"(width {net.config.hidden_size}, MLP {net.config.intermediate_size}), teacher {c.teacher.name}"
                  + (f", SAE {saved_sae['n_latents']} latents at teacher block {saved_sae['layer']}, "
                     f"labels {c.labels} ({c.selection})" if concepts else "")
                  + f"; {len(train)} training blocks of {cfg.data.seq_len} tokens, world size {info.world_size}",
                  flush=True)
        # 4. Labels cached ahead of training (rank 0 builds, resumably, while the others wait: under torchrun a
        #    long build needs a generous process-group timeout, or labels=online; every rank reads).
        loader = StepLoader(train, batch_size=cfg.trainer.batch_size, micro_batch_size=cfg.trainer.micro_batch_size,
                            rank=info.rank, world_size=info.world_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        cache = None
        if concepts and c.labels == "cached":
            # Exactly the blocks this run's max_steps will read (every rank's share), each once.
            visit = sorted(set(loader.planned_indices(cfg.trainer.max_steps)))
            blocks = torch.stack([train[i] for i in visit]).long()
            fp = labels_fingerprint(teacher, sae, tok, blocks, c.top, c.selection)
            where = (cache_dir(cfg.data.cache_dir) / "concept_labels"
                     / f"{fp['teacher']}-{fp['sae']}-{fp['blocks']}-top{c.top}-{c.selection}")
            if info.is_main:
                build_label_cache(where, teacher, sae, blocks, fp, top=c.top, selection=c.selection,
                                  batch_size=c.label_batch_size,
                                  progress=lambda i, n: print(f"llmx: concept labels: {i}/{n} blocks", flush=True))
            barrier()
            cache = LabelCache(where, fp, len(blocks), cfg.data.seq_len)

        parts = Parts()

        def loss_fn(model, batch):
            if c.method == "ntp" or (c.method == "kd" and not model.training):
                return causal_lm_loss(model, batch)
            if c.method == "kd":
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch).logits
                out = kd_loss(model(input_ids=batch).logits, t_logits, batch, c.kd_alpha, c.kd_temperature)
            else:
                logits, concept_logits = model(batch)
                labels = None
                if concepts and model.training:
                    labels = cache.lookup(batch) if cache is not None else concept_labels(
                        teacher, sae, batch, top=c.top, selection=c.selection)
                out = cocomix_loss(logits, concept_logits, batch, labels, lam=c.lam)
            if not model.training:
                return out["ntp"] * count_targets(batch)
            parts.add(out)
            return out["loss"] * count_targets(batch)

        # 5. Train: the loss's parts (NTP, concept, KD) are logged beside the total; validation is NTP alone.
        trainer = Trainer(cfg, run_dir, info, net, loader, val, tokenizer=tok, loss_fn=loss_fn,
                          step_metrics=parts.pop)
        final = trainer.fit()
        # 6. After training (rank 0; FSDP gathers a full copy first).
        student = full_copy(trainer.model, cfg, len(tok), saved_sae, info)
        if not info.is_main:
            return final
        results = {"method": c.method, "parameters": count_parameters(student), "teacher": c.teacher.name,
                   "final": {k: final.get(k) for k in ("step", "val_loss", "val_ppl", "tokens_per_s", "peak_mem_mb",
                                                        "tokens_seen")}}
        if concepts:
            results["concepts"] = inspect(cfg, student, teacher, sae, tok, val)
        save_student(student, cfg, saved_sae, run_dir)
        atomic_write_json(run_dir / "results.json", results)
        headline = {"method": c.method, "student_parameters": results["parameters"]}
        if concepts:
            headline["concept_top1_in_labels"] = results["concepts"]["top1_in_labels"]
        add_to_final(run_dir, final, headline)
        print(f"llmx: {c.method}: val loss {final['val_loss']:.4f} (next-token), {results['parameters'] / 1e6:.2f}M "
              f"parameters; results in {run_dir}", flush=True)
        return {**final, **headline}
    finally:
        destroy_distributed()


def build_student(cfg, vocab: int, saved_sae: Optional[Dict[str, Any]]):
    """The student: a preset Llama with the concept head (CoCoMix and its ablations); the baselines (NTP, KD, and
    pause tokens, which add one vector) widened to CoCoMix's parameter count, counted exactly, when
    match_parameters is on."""
    from transformers import AutoModelForCausalLM

    c = cfg.cocomix
    lm = build_model(cfg.model, vocab_size=vocab)
    if c.method in CONCEPT_METHODS:
        return CoCoMixLM(lm, n_concepts=saved_sae["n_latents"], insert_layer=c.insert_layer, k=c.k,
                         mix=MIX[c.method], concept_position=c.concept_position)
    if c.match_parameters:
        d = lm.config.hidden_size
        target = count_parameters(lm) + concept_head_parameters(d, saved_sae["n_latents"])
        wide, _ = matched_config(lm.config, target - (d if c.method == "pause" else 0))
        lm = AutoModelForCausalLM.from_config(wide, attn_implementation=cfg.model.attn_implementation)
    if c.method == "pause":
        return CoCoMixLM(lm, n_concepts=1, insert_layer=c.insert_layer, mix="pause",
                         concept_position=c.concept_position)
    return lm


def full_copy(model, cfg, vocab: int, saved_sae, info):
    """The trained student as one plain module on rank 0 (under FSDP2 its state is gathered into a fresh copy)."""
    if not info.distributed:
        return model.eval()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    torch.manual_seed(cfg.seed)
    copy = build_student(cfg, vocab, saved_sae)
    copy.load_state_dict(state)
    return copy.eval()


def save_student(student, cfg, saved_sae, run_dir: Path) -> None:
    """student.safetensors (every parameter, the concept head included) and cocomix.json (how to rebuild it)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    if getattr(student.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the tie restores it
    tmp = run_dir / ".student.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, run_dir / "student.safetensors")
    atomic_write_json(run_dir / "cocomix.json", {
        "method": cfg.cocomix.method, "mix": MIX.get(cfg.cocomix.method), "insert_layer": cfg.cocomix.insert_layer,
        "k": cfg.cocomix.k, "concept_position": cfg.cocomix.concept_position,
        "n_concepts": saved_sae["n_latents"] if saved_sae else None, "hf_config": student.config.to_dict()})


@torch.no_grad()
def inspect(cfg, student, teacher, sae, tok, val) -> Dict[str, Any]:
    """How well the student predicts the teacher's concepts on held-out blocks, the concepts it predicts for the
    first tokens of one block (each described by the tokens on which the SAE fires most), and a steering
    demonstration: the same prompt continued with and without the most-predicted concept's logit raised."""
    c = cfg.cocomix
    device = next(student.parameters()).device
    blocks = torch.stack([val[i] for i in range(min(8, len(val)))]).long().to(device)
    _, concept_logits = student(blocks)
    labels = concept_labels(teacher, sae, blocks, top=c.top, selection=c.selection)
    valid = labels[..., 0] >= 0
    top1 = concept_logits.argmax(-1)
    in_labels = (labels == top1[..., None]).any(-1)[valid].float().mean()
    # Describe each latent by the tokens where the SAE fires most strongly over these blocks.
    from llmx.concept.sae import block_output

    idx, vals = sae.encode(block_output(teacher, sae.cfg.layer, blocks))
    flat_tok = blocks.reshape(-1)
    best: Dict[int, list] = {}
    for pos, (i_row, v_row) in enumerate(zip(idx.reshape(-1, idx.shape[-1]).tolist(),
                                              vals.reshape(-1, vals.shape[-1]).tolist())):
        for i, v in zip(i_row, v_row):
            best.setdefault(i, []).append((v, pos))
    def describe(i: int) -> str:
        hits = sorted(best.get(i, []), reverse=True)[:3]
        return ", ".join(repr(tok.decode([int(flat_tok[p])])) for _, p in hits) or "(silent here)"

    sample = blocks[0, :12]
    pred = concept_logits[0, :12].topk(3, dim=-1).indices.tolist()
    per_token = [{"token": tok.decode([int(t)]), "concepts": p, "described_by": [describe(i) for i in p]}
                 for t, p in zip(sample.tolist(), pred)]
    out = {"top1_in_labels": float(in_labels), "labelled_positions": int(valid.sum()), "per_token": per_token}
    if c.steer_tokens > 0:
        prompt = blocks[:1, :16]
        counts = torch.bincount(concept_logits[0, :16].argmax(-1), minlength=concept_logits.shape[-1])
        concept = int(counts.argmax())
        plain = greedy_generate(student, prompt, c.steer_tokens)
        amount = float(concept_logits.std() * 10)
        push = steered(student, prompt, concept, amount, c.steer_tokens)
        out["steering"] = {"prompt": tok.decode(prompt[0]), "concept": concept, "described_by": describe(concept),
                           "added_logit": amount, "plain": tok.decode(plain[0]), "steered": tok.decode(push[0])}
    for row in per_token:
        print(f"llmx: concepts  {row['token']!r:>14} -> {row['concepts']}  ({'; '.join(row['described_by'])})",
              flush=True)
    return out
