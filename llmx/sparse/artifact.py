"""Save a sparsified model's R-Sparse state and load it onto the dense model again, for generation.

An artifact directory holds `rsparse.json` (per layer: s, alpha, threshold, rank, shapes; token mode; the
model it was made for; model-level sparsity) and `factors.safetensors` (the rank-r factors U and S V^T of
the layers that have them). The dense weights are not copied: they come from the model itself, whose
identity (name and a hash of its weights' shapes and first values) is checked on load, so an artifact is
never applied to a different model by mistake. Written atomically (a temporary directory renamed into
place).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

from llmx.sparse.rsparse import RSparseLinear, _set_module, find_linears
from llmx.utils import LlmxError, atomic_write_json, publish_dir, read_format_json, sha256_text

FORMAT = "llmx-rsparse-1"


def model_fingerprint(model: nn.Module) -> str:
    """Cheap identity of a model's targeted weights: names, shapes and a few values of each."""
    parts = []
    for name, mod in sorted(find_linears(model).items()):
        w = mod.weight.detach()
        parts.append(f"{name}:{tuple(w.shape)}:{w.reshape(-1)[:4].float().tolist()}")
    return sha256_text(*parts)[:16]


def save_artifact(model: nn.Module, out_dir: os.PathLike | str, *, meta: Optional[Dict[str, Any]] = None,
                  replace: bool = True) -> Path:
    from safetensors.torch import save_file

    layers = {n: m for n, m in model.named_modules() if isinstance(m, RSparseLinear)}
    if not layers:
        raise LlmxError("save_artifact: the model has no RSparseLinear layers (apply a plan first)")
    factors, entries = {}, {}
    for name, m in layers.items():
        entries[name] = {"s": m.s, "alpha": m.alpha, "threshold": m.threshold, "rank": m.rank,
                         "in": m.in_features, "out": m.out_features}
        if m.rank > 0:
            factors[f"{name}.u"] = m.u.detach().cpu().contiguous()
            factors[f"{name}.svt"] = m.svt.detach().cpu().contiguous()
    first = next(iter(layers.values()))
    doc = {"format": FORMAT, "model_fingerprint": model_fingerprint(model), "token_mode": first.token_mode,
           "token_fraction": first.token_fraction, "layers": entries, **(meta or {})}
    with publish_dir(out_dir, replace=replace) as tmp:
        if factors:
            save_file(factors, str(tmp / "factors.safetensors"))
        atomic_write_json(tmp / "rsparse.json", doc)
    return Path(out_dir)


def load_artifact(model: nn.Module, art_dir: os.PathLike | str, *, token_mode: Optional[str] = None,
                  token_fraction: Optional[float] = None, decode_layout: bool = False) -> Dict[str, RSparseLinear]:
    """Apply a saved artifact to the dense `model` (in place); returns the RSparseLinear layers."""
    art_dir = Path(art_dir)
    doc = read_format_json(art_dir / "rsparse.json", FORMAT, f"{art_dir}: not an R-Sparse artifact (no rsparse.json)")
    fp = model_fingerprint(model)
    if doc["model_fingerprint"] != fp:
        raise LlmxError(f"{art_dir} was made for another model (fingerprint {doc['model_fingerprint']}, this model "
                        f"{fp}); load the model it names: {doc.get('model', '?')}")
    factors = {}
    if any(e["rank"] > 0 for e in doc["layers"].values()):
        from safetensors.torch import load_file

        path = art_dir / "factors.safetensors"
        if not path.is_file():
            raise LlmxError(f"{art_dir}: rsparse.json lists low-rank layers but factors.safetensors is missing")
        factors = load_file(str(path))
    linears = find_linears(model)
    out = {}
    for name, e in doc["layers"].items():
        if name not in linears:
            raise LlmxError(f"{art_dir}: layer {name} is not in this model")
        dense = linears[name]
        u = svt = None
        if e["rank"] > 0:
            dev, dt = dense.weight.device, dense.weight.dtype
            u, svt = factors[f"{name}.u"].to(dev, dt), factors[f"{name}.svt"].to(dev, dt)
        layer = RSparseLinear(dense, e["s"], e["alpha"], e["threshold"], u, svt,
                              token_mode or doc["token_mode"],
                              doc["token_fraction"] if token_fraction is None else token_fraction)
        if decode_layout:
            layer.decode_layout()
        _set_module(model, name, layer)
        out[name] = layer
    return out


def artifact_size_bytes(art_dir: os.PathLike | str) -> int:
    return sum(p.stat().st_size for p in Path(art_dir).iterdir() if p.is_file())

