"""Models: Llama presets built from config, pretrained weights (HF directories, GGUF), and HF export.

Every model is a plain transformers causal LM so that recipes, FSDP2 and `from_pretrained` all see the
same module tree and the same parameter names.

Preset shapes come from conf/model/*.yaml. llama_60m ... llama_7b copy the model-size table of the GaLore
paper (Zhao et al., 2024; hidden / ffn / layers / heads = 512/1376/8/8, 768/2048/12/12, 1024/2736/24/16,
2048/5461/24/32, 4096/11008/32/32, vocab 32000, untied embeddings) so that results are comparable with
the paper's. llama_tiny leaves vocab_size null: its vocabulary is whatever tokenizer the data trains.

`build_model(..., device="meta")` builds without allocating memory: the trainer does that for models
too big to initialize on one host (FSDP2 shards first, then materializes each shard), and it is how the
7B preset is checked in tests. On a real device initialization uses torch's global RNG only, so
`torch.manual_seed` before the call makes it reproducible.

transformers is imported inside the functions: `import llmx.models` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from llmx.config.schema import ModelSource
from llmx.models.export import export_hf, export_hf_from_state_dict
from llmx.models.pretrained import load_pretrained, pretrained_dir, resolve_dtype
from llmx.utils import LlmxError

__all__ = [
    "build_model",
    "count_parameters",
    "export_hf",
    "export_hf_from_state_dict",
    "hf_config_for",
    "load_pretrained",
    "pretrained_dir",
    "resolve_dtype",
]

SUPPORTED_ARCHS = ("llama",)


def hf_config_for(model_cfg: Any, vocab_size: Optional[int] = None):
    """The transformers config of a preset. `vocab_size` fills in a null model_cfg.vocab_size."""
    from transformers import LlamaConfig

    if ModelSource(model_cfg.source) != ModelSource.preset:
        raise LlmxError(
            f"model {model_cfg.name}: hf_config_for builds preset configs only (source={ModelSource(model_cfg.source).value}); "
            "a pretrained model's config is model.config"
        )
    if model_cfg.arch not in SUPPORTED_ARCHS:
        raise LlmxError(
            f"model.arch={model_cfg.arch!r} is not supported for presets; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    vocab = model_cfg.vocab_size if model_cfg.vocab_size is not None else vocab_size
    if vocab is None:
        raise LlmxError(
            f"model {model_cfg.name}: vocab_size is null (tokenizer-defined) and no tokenizer vocab_size was given"
        )
    hidden, heads = model_cfg.hidden_size, model_cfg.num_attention_heads
    kv_heads = model_cfg.num_key_value_heads if model_cfg.num_key_value_heads is not None else heads
    for key, value in [
        ("vocab_size", vocab),
        ("hidden_size", hidden),
        ("intermediate_size", model_cfg.intermediate_size),
        ("num_hidden_layers", model_cfg.num_hidden_layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("max_position_embeddings", model_cfg.max_position_embeddings),
    ]:
        if value <= 0:
            raise LlmxError(f"model {model_cfg.name}: {key}={value} must be positive")
    if hidden % heads:
        raise LlmxError(
            f"model {model_cfg.name}: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
        )
    if heads % kv_heads:
        raise LlmxError(
            f"model {model_cfg.name}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}"
        )
    if (hidden // heads) % 2:
        # Rotary embeddings rotate pairs of channels.
        raise LlmxError(
            f"model {model_cfg.name}: head_dim = hidden_size/num_attention_heads = {hidden}/{heads} = "
            f"{hidden // heads} must be even for rotary embeddings"
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)},
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        initializer_range=model_cfg.initializer_range,
        # Special-token ids belong to the tokenizer, which a preset does not know; export_hf fills them in.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(model_cfg: Any, vocab_size: Optional[int] = None, device: Any = "cpu"):
    """A causal LM for model_cfg: a fresh preset, or pretrained weights (source=hf/gguf).

    device="meta" gives shapes without memory. For pretrained sources that means the architecture only
    (weights are not loaded); the caller loads them, e.g. from `pretrained_dir(model_cfg)`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    device = getattr(device, "value", device)  # InitDevice members
    if str(device) == "auto":
        raise LlmxError("build_model: resolve init_device=auto to cpu or meta before building")
    source = ModelSource(model_cfg.source)
    dtype = resolve_dtype(model_cfg.dtype)
    if source == ModelSource.preset:
        config = hf_config_for(model_cfg, vocab_size)
    elif str(device) == "meta":
        config = AutoConfig.from_pretrained(pretrained_dir(model_cfg))
        config.__dict__.pop("quantization_config", None)
    else:
        model, _ = load_pretrained(model_cfg)
        return model.to(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=model_cfg.attn_implementation, dtype=dtype
        )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters: tied weights count once (module.parameters() dedups by identity)."""
    return sum(p.numel() for p in model.parameters())
