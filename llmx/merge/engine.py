"""The streaming merge: validate every input, then compute and write the output one tensor at a time.

`paramdelta(post, base, new_base, out_dir)` and `merge(method, out_dir, models=..., base=...)` share one
engine (`_run`):

1. Validation, before anything is written. Every input directory is opened and checked (llmx.merge.io:
   missing shards, truncated files, pickle weights, no weights, no such path); the configs are compared on
   the fields that decide the architecture and the tensor shapes (ARCH_FIELDS: model_type, architectures,
   hidden_size, num_hidden_layers, heads, intermediate_size, ...; also inside `text_config`; fields such
   as rope_scaling or max_position_embeddings may differ, as between Llama 3 and 3.1); the tensor names,
   shapes and dtypes are compared with those of the donor (the new base for ParamΔ, the base or the first
   model otherwise); the method's parameters, include/exclude patterns (each must match some tensor) and
   the output path are checked. All problems found are raised together as one MergeError.
2. The output is written into a temporary sibling directory `.<out_dir name>.tmp-<pid>`: config.json,
   tokenizer files, the safetensors shards (written as each tensor is computed, llmx.merge.io), and the
   manifest `llmx_merge.json`; every file and the directory are fsynced (fsync=True), then it is renamed
   to out_dir and the parent directory fsynced. A failure at any point removes the temporary directory:
   out_dir is either absent, or complete. An existing out_dir is an error unless overwrite=True, in which
   case it is exchanged with the complete new one in one atomic step (renameat2 RENAME_EXCHANGE), then
   deleted; where the system lacks that, it is renamed aside and the new one renamed in, and a crash
   between the two leaves `.<name>.old-<pid>`, which the next merge into out_dir puts back.

Memory. Tensors are processed in the order the donor stores them, every method on row chunks of the
same rows of every input: each chunk is read with one positioned read into a buffer kept for that input,
converted into a compute_dtype buffer kept for that input (unless already in compute_dtype), combined
(llmx.merge.methods), cast into an output buffer and written. The files' SHA-256 are computed on other
threads that read the files themselves (llmx.merge.io, Hashing), never from these buffers, which the
arithmetic changes in place. The buffers are reused from chunk to
chunk (fresh memory for every chunk would cost a page fault per 4 KiB, which was half the time of a merge).
TIES and DARE first make their statistics passes over the chunks of a tensor (TIES's exact magnitude
threshold, DARE's L1 rescale; methods.SparseMerge), then merge chunk by chunk; a tensor that fits in one
chunk is read once. A chunk holds at most `chunk_bytes` (1 MiB: the buffers stay in the CPU caches; 16 MiB
chunks took 1.7-2x the CPU time) of compute dtype per input, and fewer
elements when every input's buffers and the election's temporaries would pass MEMORY_BUDGET (128 MiB; many
models): the working memory is fixed whatever the size of the model or of its largest tensor. The manifest
reports it (`memory.workspace_bytes`, `chunk_elements`) and the process's real memory: its peak resident
size during the merge (VmHWM, reset at the start where Linux allows), the growth of that peak over the
size at the start, and the anonymous resident memory at the end. Nothing grows with the model.

Tensor names, include/exclude. Patterns are shell-style (fnmatch, case-sensitive: `*` matches any run of
characters including dots, so `model.layers.*.mlp.*` and `*norm*` work); a pattern that starts with
`re:` is a Python regular expression searched in the name (`re:layers\\.(0|1)\\.`). A tensor is merged
when it matches some include pattern (include=None: every tensor) and no exclude pattern; other tensors
are copied unchanged (cast only when `dtype` is given) from the donor: the new base for ParamΔ, the base
(or the first model when there is none) for the other methods. Tensors that are not floating point
(integer buffers) are always copied from the donor.

Vocabulary (vocab_policy). The vocabulary tensors are the input embedding and the output head (names
ending in embed_tokens.weight, wte.weight, word_embeddings.weight, embed_in.weight; lm_head.weight,
embed_out.weight), whose dim 0 is the vocabulary. When their row counts differ between inputs (special
tokens added by post-training, a padded vocabulary):
  - "error" (default): a MergeError naming every input's shapes;
  - "post": the output has the post-trained model's rows; rows that exist in every input (0 .. S-1, S the
    smallest count) are merged by the formula, the remaining rows are copied from the post-trained model;
  - "new_base": the same with the new base's row count, the extra rows copied from the new base (rows of
    other inputs beyond it are dropped, and the manifest says how many).
Nothing is ever truncated silently (mergekit takes the top-left submatrix with a warning). For merge(),
"post" means the first model and "new_base" the base; "model<i>" or "base" may also be named directly.
config.json's vocab_size is set to the output's row count when that differs from the config source's.
The manifest's `vocab` entry records the policy, every input's row count and what was done.

Tied embeddings. A model whose config ties the output head to the input embedding usually stores no
lm_head tensor. When all inputs are tied, the output is tied too (nothing to do). When some are tied and
some not, each tied input's head is its embedding (that is what it computes with), so the head is merged
from the untied inputs' lm_head and the tied inputs' embed_tokens; the output stores lm_head and its
config says tie_word_embeddings=false. The manifest's `tied_embeddings` entry says which inputs were tied.

Files. config.json from the new base (ParamΔ) or `config_from` (default: the base, else the first model),
with vocab_size / tie_word_embeddings / dtype updated as above; the tokenizer and chat template
(TOKENIZER_FILES) and generation_config.json from the post-trained model (ParamΔ) or `tokenizer_from`
(default: the first model). Arithmetic in compute_dtype (float32), saved in the donor's dtype of each
tensor unless `dtype` is given. The inputs' floating-point dtypes may differ (real ParamΔ triples mix fp32
and bf16 releases): each is read in its own dtype and converted to compute_dtype; the manifest's
`mixed_input_dtypes` lists where they differ. Integer tensors must agree (they are copied).

The manifest `llmx_merge.json`: method, formula, parameters, every input (role, path, weight, format,
each weight file's size and SHA-256, config.json's SHA-256), config and tokenizer sources, include/exclude
and what they matched, vocabulary policy and action, tied embeddings, dtypes, tensor counts, output files
(size, SHA-256), llmx version, seed, timings. Read it with `load_manifest(out_dir)`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from llmx.merge import methods as M
from llmx.merge.io import (Checkpoint, FileHashes, Growing, ShardedWriter, dtype_name, open_checkpoint, ordered_names,
                           parse_size)
from llmx.utils import LlmxError, cache_dir

MANIFEST = "llmx_merge.json"
MANIFEST_FORMAT = "llmx-merge-1"
METHODS = ("task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "paramdelta")
VOCAB_POLICIES = ("error", "post", "new_base")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# config.json fields that decide the architecture or tensor shapes; others (rope_scaling,
# max_position_embeddings, eos_token_id, transformers_version, ...) may differ between the inputs.
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "tie_word_embeddings",
               "num_local_experts", "num_experts", "num_experts_per_tok", "n_routed_experts",
               "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "kv_lora_rank",
               "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_embd", "n_layer", "n_head")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
# Parameters of each method (mergekit's names) and their defaults.
METHOD_PARAMS: Dict[str, Dict[str, Any]] = {
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "linear": {"normalize": True},
    "ties": {"density": 1.0, "lambda": 1.0, "normalize": True, "zero_sign": "positive", "divisor": "signed"},
    "dare_linear": {"density": 1.0, "lambda": 1.0, "rescale": True, "normalize": False},
    "dare_ties": {"density": 1.0, "lambda": 1.0, "rescale": True, "normalize": True, "zero_sign": "positive",
                  "divisor": "signed"},
    "paramdelta": {"new_base": None},
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "paramdelta")
# Methods that need statistics of a whole tensor before merging it (methods.SparseMerge).
SPARSE = ("ties", "dare_linear", "dare_ties")
# Working memory the chunk size is chosen to fit (see Memory in the module docstring).
MEMORY_BUDGET = 128 * 2**20
MAX_LISTED = 60

PathLike = Union[str, os.PathLike]


class MergeError(LlmxError):
    """Bad merge input: `problems` lists everything found (the message shows up to MAX_LISTED of them)."""

    def __init__(self, problems: Sequence[str], what: str = "merge"):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        if len(self.problems) > MAX_LISTED:
            shown.append(f"... and {len(self.problems) - MAX_LISTED} more (MergeError.problems lists them all)")
        n = len(self.problems)
        super().__init__(f"{what}: {n} problem{'s' if n != 1 else ''}, nothing was written:\n  - "
                         + "\n  - ".join(shown))


def load_manifest(out_dir: PathLike) -> Dict[str, Any]:
    """The manifest (llmx_merge.json) of a merge output directory."""
    path = Path(out_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise MergeError([f"{out_dir}: no {MANIFEST}; not an llmx.merge output (or an unfinished one)"],
                         what="load_manifest")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------- the API


def paramdelta(post: PathLike, base: PathLike, new_base: PathLike, out_dir: PathLike, *, scale: float = 1.0,
               include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
               vocab_policy: str = "error", dtype: Optional[torch.dtype] = None,
               compute_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
               shard_size: Union[str, int] = "5GB", log: Optional[Callable[[str], None]] = None,
               overwrite: bool = False, hash_inputs: bool = True, hash_cache: bool = True, fsync: bool = True,
               chunk_bytes: Union[str, int] = "1MiB",
               on_tensor: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """ParamΔ (arXiv 2504.21023): out_dir = new_base + scale * (post - base), streamed tensor by tensor.

    post: the post-trained model (its delta from `base` is transplanted); base: the model it was trained
    from; new_base: the updated base. config.json comes from new_base, tokenizer files and chat template
    from post. See the module docstring for include/exclude (fnmatch patterns, "re:" for a regex; excluded
    tensors are copied from new_base), vocab_policy ("error" | "post" | "new_base"), tied embeddings,
    dtypes, the output's atomic publication and the manifest. hash_inputs=False skips the inputs' SHA-256
    (the manifest then has none); hash_cache=False computes every hash even when a Hugging Face cache blob
    name or llmx's hash cache already knows it (llmx.merge.io, Hashing); chunk_bytes bounds the rows computed at once per input (see Memory);
    on_tensor(name, index, total) is called after each tensor is written.
    Returns out_dir. Raises MergeError (listing every problem) before writing anything on bad input.
    """
    problems = []
    if not _finite(scale):
        problems.append(f"scale={scale!r}: must be a finite number")
    job = _Job(method="paramdelta", out_dir=out_dir,
               inputs=[("post", post, None), ("base", base, None), ("new_base", new_base, None)],
               donor="new_base", config_from=None, tokenizer_from=None, tokenizer_role="post",
               policy_roles={"post": "post", "new_base": "new_base"}, params={"scale": float(scale)},
               formula=f"new_base + {float(scale):g} * (post - base)   [ParamΔ: Θ = Θ_post − Θ_base + Θ'_base]",
               problems=problems)
    job.compute = lambda name, get: M.paramdelta(get("post"), get("base"), get("new_base"), scale=float(scale),
                                                 dtype=job.compute_dtype)
    return _run(job, include=include, exclude=exclude, vocab_policy=vocab_policy, dtype=dtype,
                compute_dtype=compute_dtype, allow_pickle=allow_pickle, shard_size=shard_size, log=log,
                overwrite=overwrite, hash_inputs=hash_inputs, hash_cache=hash_cache, fsync=fsync, on_tensor=on_tensor, seed=None,
                chunk_bytes=chunk_bytes)


def merge(method: str, out_dir: PathLike, *, models: Sequence[Tuple[PathLike, float]],
          base: Optional[PathLike] = None, params: Optional[Dict[str, Any]] = None,
          config_from: Optional[PathLike] = None, tokenizer_from: Optional[PathLike] = None,
          include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
          vocab_policy: str = "error", dtype: Optional[torch.dtype] = None,
          compute_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
          shard_size: Union[str, int] = "5GB", seed: int = 0, log: Optional[Callable[[str], None]] = None,
          overwrite: bool = False, hash_inputs: bool = True, hash_cache: bool = True, fsync: bool = True,
          chunk_bytes: Union[str, int] = "1MiB",
          on_tensor: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """Merge `models` [(path, weight), ...] with `method`, streamed tensor by tensor into out_dir.

    method: task_arithmetic (base + λ Σ w_i (θ_i − base)), linear (Σ w_i θ_i / Σ w_i), ties, dare_linear,
    dare_ties (llmx.merge.methods has the equations), or paramdelta (models=[(post, scale)], base=the old
    base, params={"new_base": path}; the same as paramdelta()). params, mergekit's names:
      task_arithmetic: lambda (1.0), normalize (False)     linear: normalize (True)
      ties: density (1.0; a float or one per model), lambda (1.0), normalize (True), zero_sign ("positive"
            | "zero"), divisor ("signed" | "abs")
      dare_linear: density, lambda, rescale (True: 1/density | False | "l1"), normalize (False)
      dare_ties: density, lambda, rescale (True), normalize (True), zero_sign, divisor
    (llmx.merge.methods documents each, and where the defaults follow mergekit or the papers.)
    base is required except for linear, which takes none. The DARE masks are seeded from (seed, tensor
    name, model index). config.json comes from config_from (default: base, else the first model),
    tokenizer files from tokenizer_from (default: the first model); excluded and non-float tensors are
    copied from the base (else the first model). Everything else as paramdelta(). Returns out_dir.
    """
    problems: List[str] = []
    params = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) or type(v).__name__ == "ListConfig"
                  else v) for k, v in dict(params or {}).items()}  # OmegaConf lists -> lists
    if method not in METHODS:
        raise MergeError([f"method={method!r}: not a merge method; valid: {', '.join(METHODS)}"])
    models = list(models or [])
    pairs: List[Tuple[PathLike, float]] = []
    for i, m in enumerate(models):
        try:
            path, weight = m
        except (TypeError, ValueError):
            problems.append(f"models[{i}]={m!r}: expected a (path, weight) pair")
            continue
        if isinstance(weight, bool) or not _finite(weight):
            problems.append(f"models[{i}] ({path}): weight {weight!r} is not a finite number")
            continue
        pairs.append((path, float(weight)))
    if not models:
        problems.append(f"models is empty: {method} needs at least one (path, weight)")
    if method in NEEDS_BASE and base is None:
        problems.append(f"method {method} needs a base (the models' deltas are taken from it)")
    if method == "linear" and base is not None:
        problems.append("method linear averages the models and takes no base; use task_arithmetic to add "
                        "deltas to a base")
    unknown = sorted(set(params) - set(METHOD_PARAMS[method]))
    if unknown:
        problems.append(f"params {unknown}: not parameters of {method}; valid: "
                        f"{', '.join(METHOD_PARAMS[method]) or 'none'}")

    if method == "paramdelta":
        if len(models) != 1:
            problems.append(f"paramdelta takes models=[(post, scale)], one model; got {len(models)}")
        if params.get("new_base") is None:
            problems.append('paramdelta needs params={"new_base": <path of the updated base>}')
        for key, value in (("config_from", config_from), ("tokenizer_from", tokenizer_from)):
            if value is not None:
                problems.append(f"{key}: paramdelta takes config.json from new_base and the tokenizer from post")
        if problems:
            raise MergeError(problems)
        (post, scale), = pairs
        return paramdelta(post, base, params["new_base"], out_dir, scale=scale, include=include, exclude=exclude,
                          vocab_policy=vocab_policy, dtype=dtype, compute_dtype=compute_dtype,
                          allow_pickle=allow_pickle, shard_size=shard_size, log=log, overwrite=overwrite,
                          hash_inputs=hash_inputs, hash_cache=hash_cache, fsync=fsync, chunk_bytes=chunk_bytes,
                          on_tensor=on_tensor)

    p = {**METHOD_PARAMS[method], **params}
    n = len(pairs)
    weights = [w for _, w in pairs]
    if "normalize" in p and not isinstance(p["normalize"], bool):
        problems.append(f"params.normalize={p['normalize']!r}: must be true or false")
    if "rescale" in p and not (isinstance(p["rescale"], bool) or p["rescale"] == "l1"):
        problems.append(f"params.rescale={p['rescale']!r}: valid: true (1/density, the DARE paper's), false, "
                        "'l1' (keep each tensor's L1 norm, mergekit's)")
    for key, valid in (("zero_sign", M.ZERO_SIGNS), ("divisor", M.DIVISORS)):
        if key in p and p[key] not in valid:
            problems.append(f"params.{key}={p[key]!r}: valid: {', '.join(valid)}")
    if "lambda" in p and (isinstance(p["lambda"], bool) or not isinstance(p["lambda"], (int, float))
                          or not _finite(p["lambda"])):
        problems.append(f"params.lambda={p['lambda']!r}: must be a finite number")
    if "density" in p:
        d = p["density"]
        values = d if isinstance(d, (list, tuple)) else [d]
        if isinstance(d, (list, tuple)) and len(d) != n:
            problems.append(f"params.density: {len(d)} values for {n} models (give one number, or one per model)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in values):
            problems.append(f"params.density={d!r}: each density must be in (0, 1] (the fraction of each delta kept)")
    if p.get("normalize") and n and sum(weights) == 0 and method in ("task_arithmetic", "linear", "dare_linear"):
        problems.append(f"params.normalize=true divides by the sum of the weights, which is 0 ({weights})")

    roles = [f"model{i}" for i in range(n)]
    inputs = ([("base", base, None)] if base is not None else []) + [(r, path, w) for r, (path, w) in
                                                                      zip(roles, pairs)]
    donor = "base" if base is not None else "model0"
    policy_roles = {"post": "model0", **({"new_base": "base"} if base is not None else {}),
                    **{r: r for r, _, _ in inputs}}
    job = _Job(method=method, out_dir=out_dir, inputs=inputs, donor=donor, config_from=config_from,
               tokenizer_from=tokenizer_from, tokenizer_role="model0", policy_roles=policy_roles,
               params={"weights": weights, **p}, formula=_formula(method, p, weights), problems=problems)
    lam = float(p.get("lambda", 1.0)) if not isinstance(p.get("lambda", 1.0), bool) else 1.0

    def compute(name, get):
        ms = [get(r) for r in roles]
        if method == "task_arithmetic":
            return M.task_arithmetic(get("base"), ms, weights, lam=lam, normalize=p["normalize"],
                                     dtype=job.compute_dtype)
        return M.linear(ms, weights, normalize=p["normalize"], dtype=job.compute_dtype)

    if method in SPARSE:
        extra = {k: p[k] for k in ("rescale", "zero_sign", "divisor") if k in p}
        job.sparse = lambda name, numel: M.SparseMerge(method, numel, weights, density=p["density"], lam=lam,
                                                       normalize=p["normalize"], seed=seed, name=name, **extra)
    job.compute = compute
    return _run(job, include=include, exclude=exclude, vocab_policy=vocab_policy, dtype=dtype,
                compute_dtype=compute_dtype, allow_pickle=allow_pickle, shard_size=shard_size, log=log,
                overwrite=overwrite, hash_inputs=hash_inputs, hash_cache=hash_cache, fsync=fsync, on_tensor=on_tensor,
                seed=seed if method.startswith("dare") else None, chunk_bytes=chunk_bytes)


def _formula(method: str, p: Dict[str, Any], weights: Sequence[float]) -> str:
    lam = p.get("lambda", 1.0)
    w = "w = [" + ", ".join(f"{x:g}" for x in weights) + "]"
    if method == "task_arithmetic":
        core = "sum_i w_i (model_i - base)" + (" / sum_i w_i" if p["normalize"] else "")
        return f"base + {lam:g} * {core}; {w}"
    if method == "linear":
        return "sum_i w_i model_i" + (" / sum_i w_i" if p["normalize"] else "") + f"; {w}"
    merge_opts = f"normalize={p['normalize']}, zero_sign={p.get('zero_sign')}, divisor={p.get('divisor')}"
    if method == "ties":
        return (f"base + {lam:g} * disjoint_merge(elect_sign(trim_topk(w_i (model_i - base), density="
                f"{p['density']})), {merge_opts}); {w}")
    drop = f"dare(model_i - base, density={p['density']}, rescale={p['rescale']})"
    if method == "dare_linear":
        return f"base + {lam:g} * sum_i w_i {drop}" + (" / sum_i w_i" if p["normalize"] else "") + f"; {w}"
    return f"base + {lam:g} * disjoint_merge(elect_sign(w_i {drop}), {merge_opts}); {w}"


# ------------------------------------------------------------------------------------------- the engine


@dataclass
class _Job:
    method: str
    out_dir: PathLike
    inputs: List[Tuple[str, PathLike, Optional[float]]]  # (role, path, weight)
    donor: str  # role: config (unless config_from), excluded and non-float tensors, output order
    config_from: Optional[PathLike]
    tokenizer_from: Optional[PathLike]
    tokenizer_role: str
    policy_roles: Dict[str, str]
    params: Dict[str, Any]
    formula: str
    problems: List[str] = field(default_factory=list)
    compute: Optional[Callable] = None  # elementwise methods: compute(name, get) -> the chunk merged
    sparse: Optional[Callable] = None  # TIES/DARE: sparse(name, numel) -> methods.SparseMerge for the tensor
    compute_dtype: torch.dtype = torch.float32
    cks: Dict[str, Checkpoint] = field(default_factory=dict)


@dataclass
class _Entry:
    """One output tensor: how it is made."""

    name: str
    dtype: torch.dtype  # saved dtype
    shape: Tuple[int, ...]
    action: str  # "merge" | "copy"
    vocab: Optional[Tuple[int, int]] = None  # (shared rows S, output rows T) when the inputs' rows differ


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _as_dtype(value, what: str, problems: List[str]) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, str):
        value = getattr(torch, value.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        problems.append(f"{what}={value!r}: must be a floating-point torch dtype (float32, bfloat16, float16, "
                        "float64)")
        return None
    return value


def _compile_patterns(patterns, what: str, problems: List[str]) -> Optional[List[Tuple[str, Callable]]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            problems.append(f"{what}: {pat!r} is not a pattern (a non-empty string)")
            continue
        if pat.startswith("re:"):
            try:
                rx = re.compile(pat[3:])
            except re.error as e:
                problems.append(f"{what}: {pat!r} is not a valid regular expression ({e})")
                continue
            out.append((pat, lambda name, rx=rx: rx.search(name) is not None))
        else:
            out.append((pat, lambda name, pat=pat: fnmatch.fnmatchcase(name, pat)))
    return out


def _arch_fields(cfg: Optional[dict], skip_tie: bool) -> Dict[str, Any]:
    if not cfg:
        return {}
    out = {}
    for scope, c in (("", cfg), ("text_config.", cfg.get("text_config") or {})):
        if not isinstance(c, dict):
            continue
        for k in ARCH_FIELDS:
            if k in c and not (skip_tie and k == "tie_word_embeddings"):
                out[scope + k] = c[k]
    return out


def _vocab_key(cfg: dict) -> Tuple[dict, str]:
    if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict):
        return cfg, "vocab_size"
    return cfg["text_config"], "vocab_size"


def _run(job: _Job, *, include, exclude, vocab_policy, dtype, compute_dtype, allow_pickle, shard_size, log,
         overwrite, hash_inputs, hash_cache, fsync, on_tensor, seed, chunk_bytes) -> Path:
    t_start = time.perf_counter()
    log = log or (lambda msg: None)
    problems = list(job.problems)
    out_dtype = _as_dtype(dtype, "dtype", problems)
    job.compute_dtype = _as_dtype(compute_dtype, "compute_dtype", problems) or torch.float32
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as e:
        problems.append(f"shard_size: {e}")
        shard_bytes = 5 * 10**9
    try:
        chunk = parse_size(chunk_bytes)
    except ValueError as e:
        problems.append(f"chunk_bytes: {e}")
        chunk = 2**20
    inc = _compile_patterns(include, "include", problems)
    exc = _compile_patterns(exclude, "exclude", problems)
    if vocab_policy not in VOCAB_POLICIES and vocab_policy not in job.policy_roles:
        problems.append(f"vocab_policy={vocab_policy!r}: valid: {', '.join(VOCAB_POLICIES)}"
                        + (" (or an input's role: " + ", ".join(r for r, _, _ in job.inputs) + ")"
                           if job.method != "paramdelta" else ""))
    elif vocab_policy != "error" and vocab_policy not in job.policy_roles:
        problems.append(f"vocab_policy={vocab_policy!r} takes rows from the new base, and this merge has no "
                        "base; name an input instead: " + ", ".join(r for r, _, _ in job.inputs))

    out_dir = Path(job.out_dir).expanduser().absolute()
    if out_dir.parent.is_dir():
        _restore_interrupted(out_dir, log)
    hashes = FileHashes(cache=cache_dir() / "merge_sha256.json", reuse=hash_cache)
    cks: Dict[str, Checkpoint] = {}
    for role, path, _ in job.inputs:
        cks[role] = open_checkpoint(path, role, allow_pickle=allow_pickle)
    job.cks = cks
    try:
        extra_cfg = {}
        for key, value in (("config_from", job.config_from), ("tokenizer_from", job.tokenizer_from)):
            if value is None:
                continue
            d = Path(value).expanduser()
            if not d.is_dir():
                problems.append(f"{key}={value}: no such directory")
            elif key == "config_from":
                try:
                    extra_cfg = json.loads((d / "config.json").read_text())
                except (OSError, ValueError) as e:
                    problems.append(f"config_from={value}: no readable config.json ({type(e).__name__}: {e})")
        for role, ck in cks.items():
            problems += ck.problems
            if ck.path.exists() and out_dir.resolve() == ck.path.resolve():
                problems.append(f"out_dir={out_dir} is the input {role}; write the merge somewhere else")
        if out_dir.exists() and not overwrite:
            problems.append(f"out_dir={out_dir} already exists; remove it, choose another, or pass overwrite=True "
                            "(the old directory is replaced only once the new one is complete)")
        elif out_dir.exists() and not out_dir.is_dir():
            problems.append(f"out_dir={out_dir} exists and is not a directory")

        plan, report = _plan(job, cks, problems, inc, exc, vocab_policy, out_dtype, extra_cfg)
        if problems:
            raise MergeError(problems, what=f"{job.method}")
        t_validated = time.perf_counter()
        log(f"{job.method}: {job.formula}")
        log(f"{job.method}: {len(plan)} tensors ({report['tensors']['merged']} merged, "
            f"{report['tensors']['copied']} copied), validated in {t_validated - t_start:.1f} s; writing {out_dir}")
        chunk_elems = _chunk_elems(chunk, job, cks)
        if hash_inputs:  # in the order the merge reads them: file k of every input, then file k + 1
            for k in range(max(len(ck.files) for ck in cks.values())):
                for ck in cks.values():
                    if k < len(ck.files):
                        hashes.submit(ck.files[k])
        return _write(job, cks, plan, report, out_dir, shard_bytes=shard_bytes, chunk_elems=chunk_elems,
                      hashes=hashes, hash_inputs=hash_inputs, log=log,
                      overwrite=overwrite, fsync=fsync, on_tensor=on_tensor, seed=seed, t_start=t_start,
                      t_validated=t_validated, vocab_policy=vocab_policy, include=include, exclude=exclude,
                      compute_dtype=job.compute_dtype, out_dtype=out_dtype)
    finally:
        for ck in cks.values():
            ck.close()
        hashes.close()


def _chunk_elems(chunk_bytes: int, job: _Job, cks: Dict[str, Checkpoint]) -> int:
    """Elements per input per chunk: chunk_bytes of compute dtype, fewer if the buffers of every input would
    pass MEMORY_BUDGET (many models). Per element: each input's read buffer (its largest dtype) and its copy
    in compute dtype, the output, and for TIES/DARE about six temporaries of the election."""
    cd = torch.empty((), dtype=job.compute_dtype).element_size()
    read = sum(max((i.dtype.itemsize for i in ck.tensors.values()), default=4) for ck in cks.values())
    per_elem = read + cd * len(cks) + cd * (6 if job.sparse is not None else 1)
    return max(1, min(chunk_bytes // cd, MEMORY_BUDGET // per_elem))


def _plan(job: _Job, cks: Dict[str, Checkpoint], problems: List[str], inc, exc, vocab_policy: str,
          out_dtype: Optional[torch.dtype], extra_cfg: dict) -> Tuple[List[_Entry], Dict[str, Any]]:
    """Compare the inputs, decide each output tensor; append every problem found to `problems`."""
    good = {r: ck for r, ck in cks.items() if not ck.problems}
    report: Dict[str, Any] = {"tensors": {"merged": 0, "copied": 0}}
    # Broken inputs cannot be compared; the readable ones still are, so that one error says everything.
    if not good:
        return [], report
    ref_role = job.donor if job.donor in good else next(iter(good))
    ref = good[ref_role]

    # Tied embeddings: an input without an output head but with an embedding, beside inputs with one.
    union = set().union(*(ck.tensors for ck in good.values()))
    embeds = sorted(n for n in union if n.endswith(EMBED_SUFFIXES))
    heads = sorted(n for n in union if n.endswith(HEAD_SUFFIXES))
    tied_roles: List[str] = []
    mixed_tie = False
    if len(embeds) == 1 and len(heads) == 1:
        e, h = embeds[0], heads[0]
        tied_roles = [r for r, ck in good.items() if h not in ck.tensors and e in ck.tensors]
        if tied_roles and len(tied_roles) < len(good):
            mixed_tie = True
            for r in tied_roles:
                good[r].aliases[h] = e
    if embeds and not heads:
        tied = {"inputs_tied": sorted(good), "output": "tied (no input stores an output head)"}
    elif mixed_tie:
        tied = {"inputs_tied": tied_roles, "output": "untied: the head is merged from the untied inputs' "
                f"{heads[0]} and the tied inputs' {embeds[0]}; config tie_word_embeddings=false"}
    else:
        tied = {"inputs_tied": [], "output": "untied (every input stores an output head)" if heads else "n/a"}
    report["tied_embeddings"] = tied

    # Architecture (config.json).
    ref_arch = _arch_fields(ref.config, mixed_tie)
    for role, ck in good.items():
        if role == ref_role or ck.config is None:
            continue
        arch = _arch_fields(ck.config, mixed_tie)
        diffs = [f"{k}: {ref_role}={ref_arch[k]!r}, {role}={arch[k]!r}" for k in sorted(set(ref_arch) & set(arch))
                 if ref_arch[k] != arch[k]]
        if diffs:
            problems.append(f"architecture differs between {ref_role} ({ref.path}) and {role} ({ck.path}): "
                            + "; ".join(diffs))
    if extra_cfg:
        arch = _arch_fields(extra_cfg, mixed_tie)
        diffs = [f"{k}: {ref_role}={ref_arch[k]!r}, config_from={arch[k]!r}" for k in
                 sorted(set(ref_arch) & set(arch)) if ref_arch[k] != arch[k]]
        if diffs:
            problems.append("architecture of config_from differs from the inputs': " + "; ".join(diffs))

    # Names, shapes, dtypes.
    def names(ck):
        return set(ck.tensors) | set(ck.aliases)

    ref_names = names(ref)
    for role, ck in good.items():
        if role == ref_role:
            continue
        mine = names(ck)
        if ref_names - mine:
            problems.append(f"{role} ({ck.path}) lacks {len(ref_names - mine)} tensor(s) that {ref_role} has: "
                            + _names(ref_names - mine))
        if mine - ref_names:
            problems.append(f"{role} ({ck.path}) has {len(mine - ref_names)} tensor(s) that {ref_role} lacks: "
                            + _names(mine - ref_names))
    vocab_names = [n for n in ref_names if n.endswith(EMBED_SUFFIXES + HEAD_SUFFIXES)]
    rows: Dict[str, Dict[str, int]] = {}  # vocab tensor -> role -> rows
    shape_problems, dtype_problems = [], []
    mixed: Dict[str, List[str]] = {}  # floating dtypes that differ between inputs: computed in compute_dtype
    for name in sorted(ref_names):
        ri = ref.info(name)
        for role, ck in good.items():
            if role == ref_role or name not in names(ck):
                continue
            ci = ck.info(name)
            if ci.shape != ri.shape:
                if (name in vocab_names and len(ci.shape) == len(ri.shape) >= 1 and ci.shape[1:] == ri.shape[1:]):
                    rows.setdefault(name, {ref_role: ri.shape[0]})[role] = ci.shape[0]
                else:
                    shape_problems.append(f"{name}: shape {list(ri.shape)} in {ref_role}, {list(ci.shape)} in {role}")
            if ci.dtype != ri.dtype and ci.dtype.is_floating_point and ri.dtype.is_floating_point:
                mixed.setdefault(f"{role}: {dtype_name(ci.dtype)}, {ref_role}: {dtype_name(ri.dtype)}", []).append(name)
            elif ci.dtype != ri.dtype:
                dtype_problems.append(f"{name}: dtype {dtype_name(ri.dtype)} in {ref_role}, {dtype_name(ci.dtype)} "
                                      f"in {role}")
    if shape_problems:
        problems.append(f"{len(shape_problems)} tensor(s) differ in shape:")
        problems += ["  " + s for s in shape_problems]
    if dtype_problems:
        problems.append(f"{len(dtype_problems)} tensor(s) differ in dtype between an integer and another type "
                        "(floating-point dtypes may differ; integer tensors are copied and must agree):")
        problems += ["  " + s for s in dtype_problems]

    # Vocabulary.
    vocab: Dict[str, Any] = {"policy": vocab_policy, "tensors": sorted(vocab_names)}
    target_role = job.policy_roles.get(vocab_policy) if vocab_policy != "error" else None
    shared = out_rows = None
    if rows:
        for name in vocab_names:  # every input's rows, also of vocab tensors whose shapes agreed
            for role, ck in good.items():
                if name in names(ck):
                    rows.setdefault(name, {})[role] = ck.info(name).shape[0]
        per_role: Dict[str, set] = {}
        for name, by_role in rows.items():
            for role, n in by_role.items():
                per_role.setdefault(role, set()).add(n)
        shapes = "; ".join(f"{name}: " + ", ".join(f"{r}={list(cks[r].info(name).shape)}" for r in by_role)
                           for name, by_role in sorted(rows.items()))
        vocab["rows"] = {r: sorted(v)[0] if len(v) == 1 else sorted(v) for r, v in per_role.items()}
        if any(len(v) > 1 for v in per_role.values()):
            problems.append(f"vocabulary sizes are inconsistent within an input ({shapes}); the embedding and "
                            "the output head must have the same number of rows")
        elif vocab_policy == "error":
            choices = [p for p in ("post", "new_base") if p in job.policy_roles]
            problems.append(f"vocabulary sizes differ ({shapes}). Choose vocab_policy: "
                            + ", ".join(f"'{c}' (output rows from {job.policy_roles[c]})" for c in choices)
                            + ": rows every input has are merged, the remaining rows copied from that model")
        elif target_role in good:
            shared = min(min(v) for v in per_role.values())
            out_rows = min(per_role[target_role])
            dropped = {r: min(v) - out_rows for r, v in per_role.items() if min(v) > out_rows}
            vocab.update(shared_rows=shared, output_rows=out_rows, rows_from=target_role,
                         action=f"rows 0..{shared - 1} merged; rows {shared}..{out_rows - 1} copied from "
                                f"{target_role}" if out_rows > shared else f"rows 0..{shared - 1} merged",
                         dropped_rows=dropped)
            if dropped:
                vocab["action"] += "; dropped rows beyond " + str(out_rows) + " of " + ", ".join(
                    f"{r} ({n} rows)" for r, n in dropped.items())
    else:
        n = [ref.info(v).shape[0] for v in vocab_names if ref.info(v).shape]
        vocab["rows"] = n[0] if n else None
        vocab["action"] = "same vocabulary size in every input: merged as is"

    # Include / exclude.
    def matched(pats, name):
        return any(fn(name) for _, fn in pats)

    all_names = sorted(ref_names)
    for what, pats in (("include", inc), ("exclude", exc)):
        for pat, fn in pats or []:
            if not any(fn(n) for n in all_names):
                problems.append(f"{what} pattern {pat!r} matches no tensor (fnmatch syntax, or 're:' + a regex; "
                                f"names look like {', '.join(all_names[:3])})")

    # The plan, in the donor's storage order (a tied alias right after its embedding).
    order = ordered_names(ref)
    for alias, target in ref.aliases.items():
        order.insert(order.index(target) + 1, alias)
    plan: List[_Entry] = []
    excluded: List[str] = []
    for name in order:
        info = ref.info(name)
        merge_it = info.dtype.is_floating_point and (inc is None or matched(inc, name)) and not (
            exc and matched(exc, name))
        if info.dtype.is_floating_point and not merge_it:
            excluded.append(name)
        shape = info.shape
        v = None
        if name in rows and out_rows is not None:
            v = (shared, out_rows)
            shape = (out_rows,) + tuple(shape[1:])
        saved = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(_Entry(name, saved, tuple(shape), "merge" if merge_it else "copy", v))
    report["tensors"] = {"total": len(plan), "merged": sum(e.action == "merge" for e in plan),
                         "copied": sum(e.action == "copy" for e in plan),
                         "copied_excluded": len(excluded),
                         "copied_not_float": sum(not ref.info(e.name).dtype.is_floating_point for e in plan),
                         "excluded_names": excluded if len(excluded) <= 2000 else excluded[:2000] + ["..."]}
    report["vocab"] = vocab
    report["mixed_tie"] = mixed_tie
    report["mixed_dtypes"] = {k: {"tensors": len(v), "names": v[:20]} for k, v in mixed.items()}
    report["ref_role"] = ref_role
    return plan, report


def _names(names, limit: int = 20) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _write(job: _Job, cks: Dict[str, Checkpoint], plan: List[_Entry], report: Dict[str, Any], out_dir: Path, *,
           shard_bytes: int, chunk_elems: int, hashes: FileHashes, hash_inputs: bool, log, overwrite: bool,
           fsync: bool,
           on_tensor, seed,
           t_start: float, t_validated: float, vocab_policy: str, include, exclude, compute_dtype: torch.dtype,
           out_dtype: Optional[torch.dtype]) -> Path:
    donor = cks[job.donor]
    cd = compute_dtype
    created = [p for p in reversed(out_dir.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = None
    threads = torch.get_num_threads()
    try:
        # config.json and tokenizer files.
        cfg_src = Path(job.config_from).expanduser() if job.config_from is not None else donor.path
        cfg = json.loads((cfg_src / "config.json").read_text())
        changed = {}
        vocab = report["vocab"]
        if vocab.get("output_rows") is not None:
            holder, key = _vocab_key(cfg)
            if holder.get(key) != vocab["output_rows"]:
                changed["vocab_size"] = [holder.get(key), vocab["output_rows"]]
                holder[key] = vocab["output_rows"]
        if report["mixed_tie"]:
            for c in (cfg, cfg.get("text_config")):
                if isinstance(c, dict) and c.get("tie_word_embeddings", True) is not False:
                    changed["tie_word_embeddings"] = [c.get("tie_word_embeddings"), False]
                    c["tie_word_embeddings"] = False
            if "tie_word_embeddings" not in cfg:
                cfg["tie_word_embeddings"] = False
        if out_dtype is not None:
            name = dtype_name(out_dtype)
            for key in ("dtype", "torch_dtype"):
                if key in cfg or (key == "dtype" and "torch_dtype" not in cfg):
                    changed[key] = [cfg.get(key), name]
                    cfg[key] = name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tok_src = (Path(job.tokenizer_from).expanduser() if job.tokenizer_from is not None
                   else cks[job.tokenizer_role].path)
        tok_files = []
        for f in TOKENIZER_FILES:
            if (tok_src / f).is_file():
                shutil.copyfile(tok_src / f, tmp / f)
                tok_files.append(f)

        # Tensors. One intra-op thread: on cache-sized chunks splitting each op costs more than it gains, and
        # the other cores hash the files and write back the output (measured: 5.0 s against 6.3 s).
        torch.set_num_threads(1)
        ws = _Workspace()
        mem = _ProcMemory()
        def follow(path: Path) -> Growing:  # each shard hashed (then fsynced) by a thread as it is written
            growing = Growing()
            hashes.submit(path, fsync=fsync, growing=growing)
            return growing

        writer = ShardedWriter(tmp, [(e.name, e.dtype, e.shape) for e in plan], shard_bytes, on_open=follow,
                               writeback=True)
        total = len(plan)
        written, next_log = 0, 0.1
        t_loop = time.perf_counter()
        policy_ck = cks[job.policy_roles[vocab_policy]] if vocab_policy in job.policy_roles else None
        for i, e in enumerate(plan):
            for piece in _pieces(job, e, donor, policy_ck, ws, chunk_elems):
                if piece.dtype != e.dtype:
                    out = ws.buf("out", e.dtype, piece.numel()).view(piece.shape)
                    out.copy_(piece)
                else:
                    out = piece
                del piece
                writer.write(e.name, out)
                written += out.numel() * out.element_size()
                del out
            if on_tensor is not None:
                on_tensor(e.name, i, total)
            if written >= next_log * writer.total_size or i == total - 1:
                secs = time.perf_counter() - t_loop
                log(f"{job.method}: {i + 1}/{total} tensors, {written / 1e9:.2f}/{writer.total_size / 1e9:.2f} GB, "
                    f"{written / 1e9 / max(secs, 1e-9):.2f} GB/s")
                next_log = math.floor(written / writer.total_size * 10 + 1) / 10
        layout = writer.close()
        torch.set_num_threads(threads)
        t_tensors = time.perf_counter()
        for f in layout["files"]:
            f["sha256"] = hashes.result(tmp / f["name"])
        input_hashes = {r: {f.name: (hashes.result(f), hashes.sources[f]) for f in ck.files} for r, ck in cks.items()
                        } if hash_inputs else {}
        t_hashed = time.perf_counter()

        manifest = _manifest(job, cks, plan, report, layout, changed, tok_src, tok_files, cfg_src,
                             vocab_policy=vocab_policy, include=include, exclude=exclude, compute_dtype=cd,
                             out_dtype=out_dtype, seed=seed, shard_bytes=shard_bytes, input_hashes=input_hashes,
                             chunk_elems=chunk_elems,
                             mem=mem.read(), ws=ws, timings={"validate_s": t_validated - t_start,
                                                 "tensors_s": t_tensors - t_loop,
                                                 "finish_input_hashes_s": t_hashed - t_tensors,
                                                 "total_s": time.perf_counter() - t_start})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if fsync:  # every file and the directory entry on disk before the output is published
            _fsync_tree(tmp)
        _publish(tmp, out_dir, overwrite)
        if fsync:
            _fsync_path(out_dir.parent)
        hashes.remember([(f, hashes.result(f)) for ck in cks.values() for f in ck.files
                         if hash_inputs and hashes.sources[f] == "computed"]
                        + [(out_dir / f["name"], f["sha256"]) for f in layout["files"]])
    except BaseException:
        torch.set_num_threads(threads)
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise
    secs = time.perf_counter() - t_start
    log(f"{job.method}: wrote {out_dir} ({layout['total_size'] / 1e9:.3f} GB in {len(layout['files'])} shard(s)) "
        f"in {secs:.1f} s")
    return out_dir


def _proc_status() -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon of this process in bytes (Linux; empty elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class _ProcMemory:
    """The process's real resident memory over the merge: its peak (VmHWM, reset when the merge starts where
    the kernel allows: /proc/self/clear_refs), the growth of that peak over the resident size at the start,
    and the anonymous part (RssAnon: not file pages) at the end."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start = _proc_status()

    def read(self) -> Dict[str, Any]:
        now = _proc_status()
        if "VmHWM" not in now:
            return {"peak_rss_bytes": None}
        return {"rss_at_start_bytes": self.start["VmRSS"], "peak_rss_bytes": now["VmHWM"],
                "peak_rss_growth_bytes": now["VmHWM"] - self.start["VmRSS"],
                "peak_rss_since": "merge start" if self.reset else "process start",
                "rss_anon_at_end_bytes": now.get("RssAnon")}


class _Workspace:
    """Scratch buffers reused from chunk to chunk (one per purpose, grown when a chunk needs more), so that
    the streaming loop does not allocate, and fault in, fresh memory for every chunk."""

    def __init__(self):
        self.bufs: Dict[Any, torch.Tensor] = {}

    def buf(self, key, dtype: torch.dtype, numel: int) -> torch.Tensor:
        b = self.bufs.get(key)
        if b is None or b.dtype != dtype or b.numel() < numel:
            self.bufs.pop(key, None)
            b = self.bufs[key] = torch.empty(numel, dtype=dtype)
        return b[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


def _pieces(job: _Job, e: _Entry, donor: Checkpoint, policy_ck: Optional[Checkpoint], ws: _Workspace,
            chunk_elems: int):
    """The output tensor `e` as consecutive row ranges, each computed (or copied) from the inputs' same rows.

    Rows [0, S) are merged (S: every input's rows; all rows without a vocabulary mismatch), rows [S, T) are
    copied from the vocabulary policy's model; a copied tensor comes from the donor (its first rows, as many
    as it has, the rest from the policy's model). Every method works on chunks of at most `chunk_elems`
    elements per input (at least one row), in reused buffers, so that a 1 GB embedding costs no more than a
    chunk; TIES and DARE first make their statistics passes over the chunks (methods.SparseMerge). A piece is
    valid until the next."""
    if not e.shape:  # a scalar
        segments = [("merge" if e.action == "merge" else donor, 0, 1)]
    elif e.shape[0] == 0:
        yield torch.empty(e.shape, dtype=e.dtype)
        return
    else:
        rows = e.shape[0]
        head = (e.vocab[0] if e.vocab else rows) if e.action == "merge" else (
            min(donor.info(e.name).shape[0], rows) if e.vocab else rows)
        segments = [("merge" if e.action == "merge" else donor, 0, head)]
        if head < rows:  # rows beyond the shared ones: from the vocabulary policy's model
            segments.append((policy_ck, head, rows))
    row_shape = tuple(e.shape[1:])
    row_elems = max(1, math.prod(row_shape))
    step = max(1, chunk_elems // row_elems)
    for what, a, b in segments:
        ranges = [(r0, min(r0 + step, b)) for r0 in range(a, b, step)]

        def read(role, r0, r1, key=None):  # rows [r0, r1) of this role's tensor, in compute dtype
            ck = job.cks[role] if isinstance(role, str) else role
            whole = not e.shape or (e.vocab is None and (r0, r1) == (0, e.shape[0]))
            shape = ((r1 - r0),) + row_shape if e.shape else ()
            numel = math.prod(shape)
            raw = ck.read(e.name, rows=None if whole else (r0, r1),
                          out=ws.buf(("raw", ck.role), torch.uint8, numel * ck.info(e.name).dtype.itemsize))
            if key is None or raw.dtype == job.compute_dtype:  # (hashes read the files themselves)
                return raw.view(shape)
            work = ws.buf(key, job.compute_dtype, numel).view(shape)
            return work.copy_(raw)

        if what != "merge":
            for r0, r1 in ranges:
                yield read(what, r0, r1)
        elif job.sparse is None:
            for r0, r1 in ranges:
                yield job.compute(e.name, lambda role, r0=r0, r1=r1: lambda: read(role, r0, r1, ("work", role)))
        else:
            yield from _sparse_pieces(job, e.name, ranges, row_elems, read)


def _sparse_pieces(job: _Job, name: str, ranges, row_elems: int, read):
    """TIES/DARE over the chunks `ranges`: the statistics passes, then the merged chunks. A tensor that fits
    in one chunk is read once."""
    roles = [r for r, _, _ in job.inputs if r != "base"]
    first = ranges[0][0]
    sm = job.sparse(name, (ranges[-1][1] - first) * row_elems)

    def load(r0, r1):
        base = read("base", r0, r1, ("work", "base"))
        return base, [read(r, r0, r1, ("work", r)).sub_(base) for r in roles]

    loaded = load(*ranges[0]) if len(ranges) == 1 else None
    for _ in range(sm.passes):
        for r0, r1 in ranges:
            sm.observe((r0 - first) * row_elems, (loaded or load(r0, r1))[1])
        sm.end_pass()
    for r0, r1 in ranges:
        base, deltas = loaded or load(r0, r1)
        yield sm.merge((r0 - first) * row_elems, base, deltas)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            _fsync_path(f)
    _fsync_path(d)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished tmp directory to out_dir. An existing out_dir (overwrite) is swapped with tmp in one
    atomic step where the system allows it, so that a crash at any moment leaves out_dir complete, old or
    new; elsewhere it is renamed aside first (a crash between the two renames leaves it at
    .<name>.old-<pid>, which the next merge into out_dir restores)."""
    if out_dir.exists():
        if not overwrite:
            raise MergeError([f"out_dir={out_dir} appeared while merging; the merge is discarded"])
        if _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old output
            return
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def _restore_interrupted(out_dir: Path, log) -> None:
    """An overwrite interrupted between its two renames (systems without an atomic exchange) left the old
    output at .<name>.old-<pid>: put it back."""
    if out_dir.exists():
        return
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if (old / MANIFEST).is_file():
            os.rename(old, out_dir)
            log(f"restored {out_dir} from {old.name}, left by an interrupted overwrite")
            return


def _llmx_version() -> str:
    try:
        from importlib.metadata import version

        return version("llmx")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def _manifest(job: _Job, cks, plan, report, layout, changed, tok_src, tok_files, cfg_src, *, vocab_policy,
              include, exclude, compute_dtype, out_dtype, seed, shard_bytes, input_hashes, mem, timings,
              chunk_elems, ws):
    import hashlib

    def file_sha(p: Path) -> Optional[str]:
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    inputs = []
    for role, path, weight in job.inputs:
        ck = cks[role]
        hashes = input_hashes.get(role, {})
        entry = {"role": role, "path": str(ck.path), "format": ck.kind,
                 "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": hashes.get(f.name, (None,))[0],
                            "sha256_from": hashes.get(f.name, (None, None))[1]} for f in ck.files],
                 "tensors": len(ck.tensors), "config_sha256": file_sha(ck.path / "config.json")}
        if weight is not None:
            entry["weight"] = weight
        inputs.append(entry)
    in_dtypes: Dict[str, int] = {}
    for e in plan:
        k = dtype_name(cks[report["ref_role"]].info(e.name).dtype)
        in_dtypes[k] = in_dtypes.get(k, 0) + 1
    out_dtypes: Dict[str, int] = {}
    for e in plan:
        out_dtypes[dtype_name(e.dtype)] = out_dtypes.get(dtype_name(e.dtype), 0) + 1
    largest = max((cks[report["ref_role"]].info(e.name).nbytes for e in plan), default=0)
    return {
        "format": MANIFEST_FORMAT,
        "llmx_version": _llmx_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": job.method,
        "formula": job.formula,
        "params": job.params,
        "seed": seed,
        "inputs": inputs,
        "donor": job.donor,
        "config_from": str(cfg_src),
        "config_changes": changed,
        "tokenizer_from": str(tok_src),
        "tokenizer_files": tok_files,
        "include": list(include) if include is not None else None,
        "exclude": list(exclude) if exclude is not None else None,
        "tensors": report["tensors"],
        "vocab": report["vocab"],
        "tied_embeddings": report["tied_embeddings"],
        "dtypes": {"inputs": in_dtypes, "output": out_dtypes, "compute": dtype_name(compute_dtype),
                   "requested_output": dtype_name(out_dtype) if out_dtype is not None else None},
        "output": {**layout, "shard_size": shard_bytes},
        "memory": {"workspace_bytes": ws.nbytes, "budget_bytes": MEMORY_BUDGET, "chunk_elements": chunk_elems,
                   "largest_input_tensor_bytes": largest, "inputs": len(job.inputs), **mem},
        "mixed_input_dtypes": report["mixed_dtypes"],
        "hashes": "sha256" if input_hashes else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
