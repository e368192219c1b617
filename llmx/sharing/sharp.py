"""SHARP: share adjacent-layer MLPs, with low-rank recovery parameters (Wang, Huang, Chen, Zhao, Du, Tian;
arXiv 2502.07832, 2025).

A replaced layer i keeps its own attention and norms, but its MLP reuses the weights of a reference layer
j < i plus a few trainable recovery parameters. With the default parameterization (`lora`) every
projection P in {gate, up, down} of layer i becomes

    W_P^(i) = W_P^(j) + B_P^(i) A_P^(i),      A: r x d_in, B: d_out x r                     (SHARP, Sec. 3)

so only the recovery factors are stored for layer i. Two stages set them:

  1. Single Layer Warmup (SLW): each replaced layer alone, min_{A,B} E_x || MLP_i^shared(x) - MLP_i(x) ||^2,
     where x are the inputs of layer i's MLP in the original model on calibration text (so the layers are
     independent, and can be warmed up in any order or in parallel);
  2. SFT: all recovery parameters together, next-token loss on instruction data (llmx.recipes.sharp).

Where the paper (only its abstract and reviews are available to us, see ../shared/notes/merge-and-sharp.md)
is unclear, this module chooses, and each choice is a parameter:
  - reference: the nearest earlier layer that is not replaced. With every second layer replaced each
    reference serves one layer (the paper's "moderate" sharing); a run of k replaced layers shares one
    reference k ways ("aggressive"). Layer 0 cannot be replaced.
  - recovery parameterizations (the paper: "different recovery parameterizations perform similarly when
    parameter counts are matched"): `lora` on any subset of gate/up/down (default all three); `parallel`, a
    rank-r linear map added to the shared MLP's output, MLP_i(x) = MLP_j(x) + U V x; `none` (Direct Sharing,
    the paper's baseline). `matched_rank` gives the rank at which a parameterization has as many parameters
    as lora on all three projections at rank r.
  - initialisation: `zero` (LoRA's: A random, B = 0, so training starts exactly at Direct Sharing; the
    paper's default reading) or `svd` (A, B from the rank-r truncated SVD of W^(i) - W^(j): the best
    weight-space approximation, then refined by SLW). `parallel` always starts at zero.
  - SLW's L2 loss is the mean squared error over tokens and features; its data are the recipe's choice.
    Rows are real tokens only (padding is dropped by capture_mlp_io's `keep` masks), and the held-out rows
    that report the error are whole calibration sequences (`groups`), never the tail of trained ones.
  - recovery parameters are kept in float32 whatever the model's dtype (`recovery_dtype`): master weights,
    so that small Adam updates are not rounded away in bf16; they are cast to the input's dtype in forward.

Controls (`reference`; none of them is in the paper, all answer "does the adjacent layer's weight matter?"):
  - `adjacent`: SHARP (the nearest earlier kept layer).
  - `permuted`: the same reference with its residual-stream coordinates permuted by a fixed random P:
    MLP_ref'(x) = P^T MLP_j(P x), i.e. W_gate, W_up with permuted columns and W_down with permuted rows.
    It keeps every singular value and the gate/up pairing of the reference's weights, but not their
    alignment with the residual stream. (Permuting the hidden units instead is an exact symmetry of a gated
    MLP: the function would not change, so that is no control.) Applied on the fly: nothing is copied.
  - `distant`: a random kept layer at distance >= 2 (seeded): real MLP weights of this model, not adjacent.
  - `prune`: no reference at all. The layer's MLP is deleted and replaced by a gated MLP whose three
    projections are rank-r factors B A (LowRankMLP): exactly as many parameters as lora recovery on
    gate/up/down at rank r, so "no sharing, just low rank". It needs init=svd (the truncated SVD of the
    layer's own weights, i.e. of W_i - 0): from B = 0 every gradient is zero.

Storage: a replaced layer's MLP holds a plain reference to layer j's MLP (not a registered submodule), so
`model.state_dict()` and `model.parameters()` contain each shared weight once: the trainer's checkpoints
and `save_compact` are compact without special cases. Sharing is therefore single-process: FSDP shards per
block and would free block j's weights before block i runs.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llmx.utils import LlmxError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
RECOVERY = ("lora", "parallel", "none")
INITS = ("zero", "svd")
REFERENCES = ("adjacent", "permuted", "distant", "prune")


# ---------------------------------------------------------------------------------------------- layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (Llama, Mistral, Qwen, Gemma 3, ...)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LlmxError(f"{type(model).__name__}: no model.layers; SHARP needs a decoder-only HF model")
    return layers


def _check_mlp(mlp: nn.Module, where: str) -> None:
    missing = [p for p in (*PROJECTIONS, "act_fn") if not hasattr(mlp, p)]
    if missing:
        raise LlmxError(f"{where} ({type(mlp).__name__}) has no {missing}: SHARP shares gated MLPs "
                        "(gate_proj, up_proj, down_proj, act_fn), as in Llama, Mistral, Qwen and Gemma")


def select_layers(spec: Any, num_layers: int) -> List[int]:
    """The replaced layers from a spec: a list of indices, or a slice string "start:stop:step" over the
    layer indices (Python slice semantics; negative numbers count from the end; a number with a decimal
    point is a fraction of the depth, so "0.5::2" is every second layer of the later half at any depth).
    Layer 0 is never valid: it has no earlier layer to share with."""
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not re.fullmatch(r"[-+0-9.: ]*", spec):
            raise LlmxError(f"sharp.layers={spec!r}: expected a list of layer indices or a slice 'start:stop:step' "
                            "(e.g. '15::2', '-12:', '0.5::2')")

        def num(s: str, what: str) -> Optional[int]:
            s = s.strip()
            if not s:
                return None
            try:
                return round(float(s) * num_layers) if "." in s else int(s)
            except ValueError:
                raise LlmxError(f"sharp.layers={spec!r}: {what} {s!r} is not a number") from None

        step = num(parts[2], "step") if len(parts) == 3 else None
        if step is not None and step <= 0:
            raise LlmxError(f"sharp.layers={spec!r}: the step must be positive")
        chosen = list(range(num_layers))[slice(num(parts[0], "start"), num(parts[1], "stop"), step)]
    else:
        try:
            chosen = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise LlmxError(f"sharp.layers={spec!r}: expected a list of layer indices or a slice string") from None
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise LlmxError(f"sharp.layers: {bad} out of range; the model has layers 0..{num_layers - 1}")
        if len(set(chosen)) != len(chosen):
            raise LlmxError(f"sharp.layers: {sorted(chosen)} lists a layer twice")
    chosen = sorted(chosen)
    if not chosen:
        raise LlmxError(f"sharp.layers={spec!r} selects no layer of {num_layers}")
    if chosen[0] == 0:
        raise LlmxError(f"sharp.layers={spec!r} includes layer 0, which has no earlier layer to share with")
    return chosen


def reference_map(replaced: Sequence[int], mode: str = "adjacent", num_layers: Optional[int] = None,
                  seed: int = 0) -> Dict[int, int]:
    """replaced layer -> its reference: the nearest earlier layer that keeps its own MLP; with
    mode='distant', a random kept layer (of num_layers) at distance >= 2 instead (the control)."""
    out, kept = {}, set(replaced)
    for i in sorted(replaced):
        j = i - 1
        while j in kept:
            j -= 1
        out[i] = j
    if mode != "distant":
        return out
    if num_layers is None:
        raise LlmxError("reference_map(mode='distant') needs num_layers")
    gen = torch.Generator().manual_seed(seed)
    for i in out:
        pool = [j for j in range(num_layers) if j not in kept and abs(i - j) >= 2 and j != out[i]]
        if not pool:
            raise LlmxError(f"sharp.reference=distant: layer {i} has no kept layer at distance >= 2")
        out[i] = pool[int(torch.randint(len(pool), (1,), generator=gen))]
    return out


# ---------------------------------------------------------------------------------------------- modules


class LowRank(nn.Module):
    """x -> x A^T B^T, the rank-r update B A of a d_in -> d_out weight, kept factored."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        if not self.A.is_meta and self.A.numel():  # rank 0 (prune with no recovery) has nothing to draw
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # LoRA's init: B = 0 makes the update start at 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 master weights, computed in the input's dtype (autocast casts the same way).
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))

    def weight(self) -> torch.Tensor:
        return self.B @ self.A


class SharedMLP(nn.Module):
    """Layer i's MLP: the reference MLP's weights plus recovery parameters (see the module docstring)."""

    def __init__(self, reference: nn.Module, recovery: str = "lora", rank: int = 16,
                 targets: Sequence[str] = PROJECTIONS, *, permutation: Optional[torch.Tensor] = None,
                 recovery_dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        _check_mlp(reference, "the reference MLP")
        if recovery not in RECOVERY:
            raise LlmxError(f"sharp.recovery={recovery!r}; valid: {', '.join(RECOVERY)}")
        if recovery != "none" and rank < 1:
            raise LlmxError(f"sharp.rank={rank}: recovery '{recovery}' needs a rank >= 1")
        bad = [t for t in targets if t not in PROJECTIONS]
        if recovery == "lora" and (bad or not targets):
            raise LlmxError(f"sharp.targets={list(targets)}: valid projections are {list(PROJECTIONS)} (at least one)")
        # A list, not an attribute: a registered submodule would put the shared weights in this layer's
        # state_dict and parameters a second time.
        self._reference = [reference]
        self.recovery, self.rank = recovery, rank if recovery != "none" else 0
        w = reference.gate_proj.weight
        kw = {"dtype": recovery_dtype or w.dtype, "device": w.device}
        # The `permuted` control (module docstring): the reference seen through a fixed residual permutation.
        self.register_buffer("perm", None if permutation is None else permutation.to(w.device), persistent=False)
        self.register_buffer("inv_perm", None if permutation is None else torch.argsort(permutation).to(w.device),
                             persistent=False)
        if recovery == "lora":
            self.lora = nn.ModuleDict({t: LowRank(getattr(reference, t).in_features, getattr(reference, t).out_features,
                                                  rank, **kw) for t in PROJECTIONS if t in targets})
        elif recovery == "parallel":
            hidden = reference.gate_proj.in_features
            self.parallel = LowRank(hidden, hidden, rank, **kw)
            with torch.no_grad():
                if not self.parallel.A.is_meta:
                    # Zero-initialise: training starts at Direct Sharing, as LoRA's B = 0 does.
                    self.parallel.B.zero_()

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    def _ref(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The reference's projection, through the permutation P when there is one: W P (gate, up), P^T W (down)."""
        proj = getattr(self.reference, name)
        if self.perm is None:
            return proj(x)
        return proj(x[..., self.perm]) if name != "down_proj" else proj(x)[..., self.inv_perm]

    def reference_weight(self, name: str) -> torch.Tensor:
        w = getattr(self.reference, name).weight
        if self.perm is None:
            return w
        # x[..., perm] = P x, so W (P x) = (W P) x with W P = W[:, inv_perm]; (z)[inv_perm] = P^T z.
        return w[:, self.inv_perm] if name != "down_proj" else w[self.inv_perm]

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = self._ref(name, x)
        if self.recovery == "lora" and name in self.lora:
            y = y + self.lora[name](x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.reference
        if self.recovery == "parallel":
            h = ref.act_fn(self._ref("gate_proj", x)) * self._ref("up_proj", x)
            return self._ref("down_proj", h) + self.parallel(x)
        return self._proj("down_proj", ref.act_fn(self._proj("gate_proj", x)) * self._proj("up_proj", x))

    def recovery_params(self) -> List[nn.Parameter]:
        """The recovery factors only (adapt_mlps also registers the layer's own MLP under `_own`)."""
        mods = [self.lora] if self.recovery == "lora" else [self.parallel] if self.recovery == "parallel" else []
        return [p for m in mods for p in m.parameters()]

    def recovery_parameters(self) -> int:
        return sum(p.numel() for p in self.recovery_params())

    @torch.no_grad()
    def init_svd(self, original: nn.Module) -> None:
        """A, B from the truncated SVD of W_original - W_reference, per target (lora only)."""
        if self.recovery != "lora":
            raise LlmxError(f"sharp.init=svd initialises lora recovery; recovery={self.recovery} starts at zero")
        for name, low in self.lora.items():
            delta = (getattr(original, name).weight.float() - self.reference_weight(name).float())
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[: self.rank].sqrt()
            low.B.copy_((u[:, : self.rank] * root).to(low.B.dtype))
            low.A.copy_((root[:, None] * vh[: self.rank]).to(low.A.dtype))


class LowRankMLP(nn.Module):
    """The `prune` control: the layer's own MLP deleted, a gated MLP of rank-r factors in its place,
    down(act(gate(x)) * up(x)) with every projection B A. Same parameter count as lora recovery on gate, up,
    down at rank r; rank 0 is the MLP deleted outright (output 0)."""

    recovery = "lowrank"

    def __init__(self, original: nn.Module, rank: int, *, recovery_dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        _check_mlp(original, "the pruned MLP")
        w = original.gate_proj.weight
        kw = {"dtype": recovery_dtype or w.dtype, "device": w.device}
        self.rank = rank
        self.act_fn = original.act_fn
        self.lora = nn.ModuleDict({t: LowRank(getattr(original, t).in_features, getattr(original, t).out_features,
                                              rank, **kw) for t in PROJECTIONS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.lora
        return low["down_proj"](self.act_fn(low["gate_proj"](x)) * low["up_proj"](x))

    def recovery_params(self) -> List[nn.Parameter]:
        return list(self.lora.parameters())

    def recovery_parameters(self) -> int:
        return sum(p.numel() for p in self.recovery_params())

    @torch.no_grad()
    def init_svd(self, original: nn.Module) -> None:
        """Each projection from the truncated SVD of the original's own weight (W_i - 0)."""
        for name, low in self.lora.items():
            u, s, vh = torch.linalg.svd(getattr(original, name).weight.float(), full_matrices=False)
            root = s[: self.rank].sqrt()
            low.B.copy_((u[:, : self.rank] * root).to(low.B.dtype))
            low.A.copy_((root[:, None] * vh[: self.rank]).to(low.A.dtype))


RECOVERED = (SharedMLP, LowRankMLP)


def lora_rank_cost(mlp: nn.Module, targets: Sequence[str] = PROJECTIONS) -> int:
    """Parameters per unit of rank of lora recovery on `targets`."""
    return sum(getattr(mlp, t).in_features + getattr(mlp, t).out_features for t in targets)


def matched_rank(mlp: nn.Module, rank: int, recovery: str, targets: Sequence[str] = PROJECTIONS) -> int:
    """The rank at which `recovery` has (at most, and as nearly as possible) as many parameters as lora on
    gate, up and down at `rank`: how the paper's "parameter counts are matched" comparison is set up."""
    budget = rank * lora_rank_cost(mlp)
    if recovery == "lora":
        per = lora_rank_cost(mlp, targets)
    elif recovery == "parallel":
        per = 2 * mlp.gate_proj.in_features
    else:
        return 0
    return max(1, budget // per)


def share_mlps(model: nn.Module, replaced: Sequence[int], *, recovery: str = "lora", rank: int = 16,
               targets: Sequence[str] = PROJECTIONS, init: str = "zero", reference: str = "adjacent",
               seed: int = 0, recovery_dtype: Optional[torch.dtype] = torch.float32) -> Dict[int, int]:
    """Replace the MLPs of `replaced` layers in place by SharedMLPs over their references (or, with
    reference='prune', by LowRankMLPs); the replaced layers' own MLP weights are dropped (init='svd' reads
    them first). `seed` draws the controls' permutation / distant layer. Returns {replaced: reference}
    (-1 for prune)."""
    _check_share_args(recovery, targets, init, reference)
    layers = decoder_layers(model)
    refs = reference_map(replaced, reference, len(layers), seed)
    if max(refs) >= len(layers):
        raise LlmxError(f"sharp.layers: layer {max(refs)} out of range; the model has {len(layers)} layers")
    for i, j in refs.items():
        if isinstance(layers[i].mlp, RECOVERED) or isinstance(layers[j].mlp, RECOVERED):
            raise LlmxError(f"layer {i} or its reference {j} is already shared; share_mlps applies once")
        _check_mlp(layers[i].mlp, f"layer {i}'s MLP")
    gen = torch.Generator().manual_seed(seed)
    for i, j in refs.items():
        original = layers[i].mlp
        if reference == "prune":
            new = LowRankMLP(original, rank if recovery == "lora" else 0, recovery_dtype=recovery_dtype)
        else:
            hidden = original.gate_proj.in_features
            perm = torch.randperm(hidden, generator=gen) if reference == "permuted" else None
            new = SharedMLP(layers[j].mlp, recovery, rank, targets, permutation=perm, recovery_dtype=recovery_dtype)
        if init == "svd":
            new.init_svd(original)
        new.train(original.training)
        layers[i].mlp = new
    return {i: -1 for i in refs} if reference == "prune" else refs


def _check_share_args(recovery: str, targets: Sequence[str], init: str, reference: str) -> None:
    if init not in INITS:
        raise LlmxError(f"sharp.init={init!r}; valid: {', '.join(INITS)}")
    if reference not in REFERENCES:
        raise LlmxError(f"sharp.reference={reference!r}; valid: {', '.join(REFERENCES)}")
    if init == "svd" and recovery != "lora":
        raise LlmxError(f"sharp.init=svd needs recovery=lora (got {recovery}); use init=zero")
    if reference == "prune" and (recovery not in ("lora", "none") or set(targets) != set(PROJECTIONS)):
        raise LlmxError(f"sharp.reference=prune needs recovery=lora on all of {list(PROJECTIONS)} (or none: the "
                        f"MLP deleted); got recovery={recovery}, targets={list(targets)}")
    if reference == "prune" and recovery == "lora" and init != "svd":
        raise LlmxError("sharp.reference=prune needs init=svd: a low-rank MLP whose factors B start at 0 has zero "
                        "gradients everywhere")


def adapt_mlps(model: nn.Module, layer_ids: Sequence[int], *, recovery: str = "lora", rank: int = 16,
               targets: Sequence[str] = PROJECTIONS) -> None:
    """The same recovery modules on the layers' *own* MLPs, nothing shared: the control that separates
    what SFT adds from what sharing takes away (a replaced layer's reference is itself)."""
    layers = decoder_layers(model)
    for i in layer_ids:
        own = layers[i].mlp
        layers[i].mlp = SharedMLP(own, recovery, rank, targets)
        layers[i].mlp._own = own  # keeps the weights in the model's state_dict and parameters


def shared_layers(model: nn.Module) -> Dict[int, SharedMLP]:
    return {i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, RECOVERED)}


def recovery_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in shared_layers(model).values() for p in m.recovery_params()]


def freeze_all_but_recovery(model: nn.Module) -> int:
    """requires_grad only on recovery parameters; returns their count."""
    model.requires_grad_(False)
    params = recovery_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def mlp_storage(model: nn.Module) -> Dict[str, int]:
    """Stored MLP parameters (each shared weight once, recovery parameters included) and all stored
    parameters of the model (tied embeddings once)."""
    mlp = 0
    for layer in decoder_layers(model):
        m = layer.mlp
        mlp += m.recovery_parameters() if isinstance(m, RECOVERED) else sum(p.numel() for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied and shared tensors
    return {"mlp": mlp, "total": total}


# ---------------------------------------------------------------------------------------------- SLW


@torch.no_grad()
def capture_mlp_io(model: nn.Module, layer_ids: Sequence[int], batches: Sequence[torch.Tensor],
                   max_tokens: Optional[int] = None, keep: Optional[Sequence[torch.Tensor]] = None
                   ) -> Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Inputs and outputs of the MLPs of `layer_ids` in `model` as it is (call it before sharing) over
    `batches` of token ids: {layer: (X [N, d], Y [N, d], G [N])} on the CPU, at most max_tokens rows each.
    G is each row's sequence number (the batches' rows counted in order), so that held-out rows can be whole
    sequences. `keep` (a bool mask shaped like each batch) drops positions such as padding."""
    layers = decoder_layers(model)
    store: Dict[int, List[List[torch.Tensor]]] = {i: [[], []] for i in layer_ids}
    mask: List[Optional[torch.Tensor]] = [None]

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().reshape(-1, t.shape[-1])
        return (t[mask[0]] if mask[0] is not None else t).cpu()

    def hook(i):
        def fn(module, args, out):
            store[i][0].append(rows(args[0]))
            store[i][1].append(rows(out))
        return fn

    if keep is not None and len(keep) != len(batches):
        raise LlmxError(f"capture_mlp_io: {len(keep)} keep masks for {len(batches)} batches")
    handles = [layers[i].mlp.register_forward_hook(hook(i)) for i in layer_ids]
    device = next(model.parameters()).device
    was_training = model.training
    groups, seen = [], 0
    model.eval()
    try:
        for b, ids in enumerate(batches):
            m = None if keep is None else keep[b].reshape(ids.shape).bool()
            mask[0] = None if m is None else m.reshape(-1).to(device)
            model(input_ids=ids.to(device))
            per_row = m.sum(-1) if m is not None else torch.full((ids.shape[0],), ids.shape[-1])
            groups += [torch.full((int(n),), seen + r) for r, n in enumerate(per_row.reshape(-1).tolist())]
            seen += per_row.numel()
            if max_tokens and sum(x.shape[0] for x in store[layer_ids[0]][0]) >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    g = torch.cat(groups)[:max_tokens]
    return {i: (torch.cat(x)[:max_tokens], torch.cat(y)[:max_tokens], g) for i, (x, y) in store.items()}


def padding_mask(item: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """True for the real tokens of a packed [2, T] (ids, labels) item: everything before its padding, the
    run of unlabelled positions after the last labelled one (llmx.data.instruct.pack_pairs pads at the end)."""
    labelled = (item[1] != ignore_index).nonzero()
    end = int(labelled[-1]) + 1 if len(labelled) else item.shape[-1]
    keep = torch.zeros(item.shape[-1], dtype=torch.bool)
    keep[:end] = True
    return keep


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    if isinstance(module, SharedMLP):  # recovery 'none' has no parameters of its own
        return module.reference.gate_proj.weight.device
    return torch.device("cpu")


def relative_error(module: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """||module(x) - y||^2 / ||y||^2 over all rows."""
    num = den = 0.0
    device = _device(module)
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            xs, ys = x[s:s + chunk].to(device), y[s:s + chunk].to(device).float()
            num += float((module(xs).float() - ys).pow(2).sum())
            den += float(ys.pow(2).sum())
    return num / max(den, 1e-30)


def _split_by_group(x, y, groups, holdout: float):
    """(train rows, held-out rows): the held-out rows are the last `holdout` share of the groups, whole."""
    if holdout <= 0:
        return (x, y), (x, y)
    if groups is None:
        groups = torch.arange(x.shape[0])
    ids = torch.unique(groups)
    if len(ids) < 2:
        raise LlmxError(f"SLW: {len(ids)} calibration sequence; holding out whole sequences needs at least 2")
    n_hold = min(len(ids) - 1, max(1, round(len(ids) * holdout)))
    held = torch.isin(groups, ids[len(ids) - n_hold:])
    return (x[~held], y[~held]), (x[held], y[held])


def single_layer_warmup(shared: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
                        batch_tokens: int, holdout: float = 0.1, seed: int = 0,
                        groups: Optional[torch.Tensor] = None,
                        log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Stage 1 for one layer: Adam on its recovery parameters, minimising the mean squared error between
    the shared MLP's output and the original MLP's output `y` on its inputs `x`. The rows of the last
    `holdout` share of the `groups` (sequence numbers from capture_mlp_io; without them each row is its
    own group) are never trained on; the relative error on them is reported before and after."""
    (x_tr, y_tr), (x_ho, y_ho) = _split_by_group(x, y, groups, holdout)
    before = relative_error(shared, x_ho, y_ho)
    params = shared.recovery_params()
    base = {"rel_err_before": before, "train_rows": x_tr.shape[0], "held_out_rows": x_ho.shape[0]}
    if not params or steps <= 0:
        return {**base, "rel_err_after": before, "steps": 0, "seconds": 0.0}
    device = _device(shared)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    # Normalise by the target's mean square, so one lr suits every layer whatever its output scale.
    scale = float(y_tr.float().pow(2).mean()) or 1.0
    t0 = time.perf_counter()
    shared.train()
    for step in range(steps):
        rows = torch.randint(0, x_tr.shape[0], (min(batch_tokens, x_tr.shape[0]),), generator=gen)
        xb, yb = x_tr[rows].to(device), y_tr[rows].to(device)
        loss = (shared(xb).float() - yb.float()).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Cosine decay to 10%: the last steps settle instead of bouncing at the peak lr.
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps)))
        if log and (step + 1) % max(1, steps // 4) == 0:
            log(f"step {step + 1}/{steps}: train relative error {float(loss):.4f}")
    shared.eval()
    after = relative_error(shared, x_ho, y_ho)
    return {**base, "rel_err_after": after, "steps": steps, "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------- similarity


@torch.no_grad()
def adjacent_similarity(model: nn.Module, batches: Sequence[torch.Tensor],
                        keep: Optional[Sequence[torch.Tensor]] = None) -> List[Dict[str, float]]:
    """Per layer i >= 1, on real tokens of `batches`: the mean cosine between the outputs of MLP_{i-1} and
    MLP_i in the model's own forward pass, and Direct Sharing's error on layer i's own inputs X_i,
    ||MLP_{i-1}(X_i) - MLP_i(X_i)||^2 / ||MLP_i(X_i)||^2 (above 1: worse than deleting the MLP), with the
    cosine of those two outputs."""
    layers = decoder_layers(model)
    io = capture_mlp_io(model, list(range(len(layers))), batches, keep=keep)
    out = []
    for i in range(1, len(layers)):
        (_, y_prev, _), (x, y, _) = io[i - 1], io[i]
        shared = torch.cat([layers[i - 1].mlp(x[s:s + 4096]).float() for s in range(0, x.shape[0], 4096)])
        out.append({"layer": i,
                    "cos_adjacent_outputs": float(F.cosine_similarity(y_prev.float(), y.float(), dim=-1).mean()),
                    "direct_sharing_rel_err": float((shared - y.float()).pow(2).sum() / y.float().pow(2).sum()),
                    "cos_direct_sharing": float(F.cosine_similarity(shared, y.float(), dim=-1).mean())})
    return out
