"""The compact SHARP checkpoint: each shared MLP weight stored once, and its loader.

A directory holding
    config.json            the base model's Hugging Face config (unchanged)
    tokenizer files        when a tokenizer is given
    sharp.json             format version, {replaced layer: reference layer}, recovery, rank, targets
    model.safetensors      the model's state_dict: kept layers in full, replaced layers without MLP weights,
                           their recovery factors (layers.<i>.mlp.lora.<proj>.{A,B} / mlp.parallel.{A,B});
                           tied embeddings once

`load_compact` builds the architecture from config.json with empty (meta) weights, re-applies the sharing
from sharp.json, and assigns the stored tensors: a replaced layer's MLP never exists in full, on disk or in
memory. Writing goes through a temporary directory renamed into place (llmx.utils.publish_dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from llmx.sharing.sharp import PROJECTIONS, SharedMLP, share_mlps, shared_layers
from llmx.utils import LlmxError, publish_dir, read_format_json

FORMAT = "llmx-sharp/1"


def sharing_spec(model: nn.Module) -> Dict[str, Any]:
    shared = shared_layers(model)
    if not shared:
        raise LlmxError("the model has no shared MLP (apply llmx.sharing.share_mlps first)")
    controls = [i for i, m in shared.items() if not isinstance(m, SharedMLP) or m.perm is not None]
    if controls:
        raise LlmxError(f"layers {controls} hold a control (reference=prune or permuted), not SHARP's sharing; "
                        "the compact format stores SHARP's sharing (reference=adjacent)")
    refs = {}
    layers = getattr(model, "model", model).layers
    for i, m in shared.items():
        refs[str(i)] = next(j for j, layer in enumerate(layers) if layer.mlp is m.reference)
    first = next(iter(shared.values()))
    targets = list(first.lora.keys()) if first.recovery == "lora" else list(PROJECTIONS)
    for i, m in shared.items():
        same = m.recovery == first.recovery and m.rank == first.rank and (
            m.recovery != "lora" or list(m.lora.keys()) == targets)
        if not same:
            raise LlmxError(f"layer {i}: every shared layer must use one recovery, rank and target set to be saved")
    return {"format": FORMAT, "references": refs, "recovery": first.recovery, "rank": first.rank, "targets": targets}


def _unique_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state_dict with every storage once (the first name wins) and {dropped name: kept name}."""
    out, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().contiguous()
    return out, aliases


def save_compact(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, dtype: Optional[torch.dtype] = None,
                 meta: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> Path:
    """Write the compact checkpoint of a shared model (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LlmxError(f"{out_dir} exists; pass overwrite=True (it is replaced only once the new one is complete)")
    spec = sharing_spec(model)
    state, aliases = _unique_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    spec["aliases"] = aliases
    spec["meta"] = meta or {}
    with publish_dir(out_dir, replace=True) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "sharp.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return out_dir


def compact_skeleton(path: str | Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """(the shared model with its parameters on the meta device, sharp.json) of a compact checkpoint: its
    architecture without reading a weight."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    spec_file = path / "sharp.json"
    spec = read_format_json(spec_file, FORMAT, f"{path}: no sharp.json; not a compact SHARP checkpoint (save one "
                            "with save_compact)")
    config = AutoConfig.from_pretrained(path)
    # Parameters on the meta device (no random init of weights that are about to be replaced); buffers such
    # as the rotary frequencies are computed for real, since they are not stored.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    refs = {int(i): int(j) for i, j in spec["references"].items()}
    made = share_mlps(model, sorted(refs), recovery=spec["recovery"], rank=spec["rank"], targets=spec["targets"])
    if made != refs:
        raise LlmxError(f"{spec_file}: references {refs} are not the nearest earlier kept layers {made}")
    return model, spec


def load_compact(path: str | Path, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                 with_tokenizer: bool = False):
    """The model of a compact checkpoint (and its tokenizer when with_tokenizer), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file() and (path / "sharp.json").is_file():
        raise LlmxError(f"{path}: model.safetensors is missing")
    model, spec = compact_skeleton(path)
    config = model.config
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt file
        raise LlmxError(f"{weights}: cannot read ({e})") from e
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    for alias, kept in spec.get("aliases", {}).items():
        if kept not in state:
            raise LlmxError(f"{weights}: {kept} (stored for {alias}) is missing")
        state[alias] = state[kept]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise LlmxError(f"{weights} does not match config.json + sharp.json: missing {missing[:8]}, "
                        f"unexpected {unexpected[:8]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise LlmxError(f"{path}: parameters without stored values: {on_meta[:8]}")
    model.to(device).eval()
    if with_tokenizer:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(path)
    return model
