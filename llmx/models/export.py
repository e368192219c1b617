"""Export to a directory that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load.

The weights are re-homed into a fresh module built on the meta device from a cleaned copy of the config
(`load_state_dict(assign=True)`: no copy, no init). Two reasons: a GGUF-loaded model carries a
quantization config whose quantizer refuses `save_pretrained`, and under FSDP2 rank 0 holds a full CPU
state dict but no unsharded module. Ties are re-applied afterwards so tied embeddings are saved once and
come back tied.

The export is written to a hidden temporary directory next to out_dir and renamed into place at the
end, so a crash never leaves a half-written export (an existing out_dir is replaced).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from llmx.utils import LlmxError, publish_dir


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps in _orig_mod, DDP in module; their state-dict keys carry those prefixes.
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _clean_config(hf_config: Any, tokenizer: Any) -> Any:
    config = copy.deepcopy(hf_config)
    config.__dict__.pop("quantization_config", None)
    # Presets leave special-token ids to the tokenizer; fill only what the config does not say.
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, key, None) is None and getattr(tokenizer, key, None) is not None:
                setattr(config, key, getattr(tokenizer, key))
    return config


def _write(clean: torch.nn.Module, tokenizer: Any, out_dir: os.PathLike | str) -> Path:
    out = Path(out_dir).expanduser()
    with publish_dir(out, replace=True) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def export_hf_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    hf_config: Any,
    tokenizer: Any,
    out_dir: os.PathLike | str,
    dtype: Optional[torch.dtype] = None,
    generation_config: Any = None,
) -> Path:
    """Export a full (unsharded, CPU) state dict of a transformers causal LM described by hf_config."""
    from transformers import AutoModelForCausalLM

    config = _clean_config(hf_config, tokenizer)
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config)
    result = clean.load_state_dict(dict(state_dict), strict=False, assign=True)
    clean.tie_weights()
    # A tied output head may be absent from the state dict; it now shares the input embedding.
    still_meta = {k for k, v in clean.state_dict().items() if v.is_meta}
    missing = [k for k in result.missing_keys if k in still_meta]
    if missing or result.unexpected_keys:
        raise LlmxError(
            f"export_hf: state dict does not match {type(clean).__name__}: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if generation_config is not None:
        clean.generation_config = copy.deepcopy(generation_config)
    if tokenizer is not None and clean.generation_config is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(clean.generation_config, key, None) is None and getattr(config, key, None) is not None:
                setattr(clean.generation_config, key, getattr(config, key))
    if dtype is not None:
        clean.to(dtype)
    return _write(clean, tokenizer, out_dir)


def export_hf(model: torch.nn.Module, tokenizer: Any, out_dir: os.PathLike | str, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Export a transformers causal LM (plain, compiled, DDP, or GGUF-loaded) and its tokenizer."""
    model = _unwrap(model)
    return export_hf_from_state_dict(
        model.state_dict(),
        model.config,
        tokenizer,
        out_dir,
        dtype=dtype,
        generation_config=getattr(model, "generation_config", None),
    )
