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


def reference_map(replaced: Sequence[int]) -> Dict[int, int]:
    """replaced layer -> its reference: the nearest earlier layer that keeps its own MLP."""
    out, kept = {}, set(replaced)
    for i in sorted(replaced):
        j = i - 1
        while j in kept:
            j -= 1
        out[i] = j
    return out


# ---------------------------------------------------------------------------------------------- modules


class LowRank(nn.Module):
    """x -> x A^T B^T, the rank-r update B A of a d_in -> d_out weight, kept factored."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, dtype=None, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        if not self.A.is_meta:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # LoRA's init: B = 0 makes the update start at 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    def weight(self) -> torch.Tensor:
        return self.B @ self.A


class SharedMLP(nn.Module):
    """Layer i's MLP: the reference MLP's weights plus recovery parameters (see the module docstring)."""

    def __init__(self, reference: nn.Module, recovery: str = "lora", rank: int = 16,
                 targets: Sequence[str] = PROJECTIONS):
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
        kw = {"dtype": w.dtype, "device": w.device}
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

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self.reference, name)(x)
        if self.recovery == "lora" and name in self.lora:
            y = y + self.lora[name](x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.reference
        if self.recovery == "parallel":
            return ref(x) + self.parallel(x)
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
            delta = (getattr(original, name).weight.float() - getattr(self.reference, name).weight.float())
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s[: self.rank].sqrt()
            low.B.copy_((u[:, : self.rank] * root).to(low.B.dtype))
            low.A.copy_((root[:, None] * vh[: self.rank]).to(low.A.dtype))


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
               targets: Sequence[str] = PROJECTIONS, init: str = "zero") -> Dict[int, int]:
    """Replace the MLPs of `replaced` layers in place by SharedMLPs over their references; the replaced
    layers' own MLP weights are dropped (init='svd' reads them first). Returns {replaced: reference}."""
    if init not in INITS:
        raise LlmxError(f"sharp.init={init!r}; valid: {', '.join(INITS)}")
    if init == "svd" and recovery != "lora":
        raise LlmxError(f"sharp.init=svd needs recovery=lora (got {recovery}); use init=zero")
    layers = decoder_layers(model)
    refs = reference_map(replaced)
    if max(refs) >= len(layers):
        raise LlmxError(f"sharp.layers: layer {max(refs)} out of range; the model has {len(layers)} layers")
    for i, j in refs.items():
        if isinstance(layers[i].mlp, SharedMLP) or isinstance(layers[j].mlp, SharedMLP):
            raise LlmxError(f"layer {i} or its reference {j} is already shared; share_mlps applies once")
        _check_mlp(layers[i].mlp, f"layer {i}'s MLP")
    for i, j in refs.items():
        original = layers[i].mlp
        shared = SharedMLP(layers[j].mlp, recovery, rank, targets)
        if init == "svd":
            shared.init_svd(original)
        shared.train(original.training)
        layers[i].mlp = shared
    return refs


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
    return {i: layer.mlp for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, SharedMLP)}


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
        mlp += m.recovery_parameters() if isinstance(m, SharedMLP) else sum(p.numel() for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied and shared tensors
    return {"mlp": mlp, "total": total}


# ---------------------------------------------------------------------------------------------- SLW


@torch.no_grad()
def capture_mlp_io(model: nn.Module, layer_ids: Sequence[int], batches: Sequence[torch.Tensor],
                   max_tokens: Optional[int] = None) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and outputs of the MLPs of `layer_ids` in `model` as it is (call it before sharing) over
    `batches` of token ids: {layer: (X [N, d], Y [N, d])} on the CPU, at most max_tokens rows each."""
    layers = decoder_layers(model)
    store: Dict[int, List[List[torch.Tensor]]] = {i: [[], []] for i in layer_ids}

    def hook(i):
        def fn(module, args, out):
            store[i][0].append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu())
            store[i][1].append(out.detach().reshape(-1, out.shape[-1]).cpu())
        return fn

    handles = [layers[i].mlp.register_forward_hook(hook(i)) for i in layer_ids]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids.to(device))
            if max_tokens and sum(x.shape[0] for x in store[layer_ids[0]][0]) >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: (torch.cat(x)[:max_tokens], torch.cat(y)[:max_tokens]) for i, (x, y) in store.items()}


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


def single_layer_warmup(shared: SharedMLP, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
                        batch_tokens: int, holdout: float = 0.1, seed: int = 0,
                        log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Stage 1 for one layer: Adam on its recovery parameters, minimising the mean squared error between
    the shared MLP's output and the original MLP's output `y` on its inputs `x`. The last `holdout` of the
    rows is never trained on; the relative error on it is reported before and after."""
    n_hold = max(1, int(x.shape[0] * holdout)) if holdout > 0 else 0
    x_tr, y_tr = x[: x.shape[0] - n_hold], y[: y.shape[0] - n_hold]
    x_ho, y_ho = (x[-n_hold:], y[-n_hold:]) if n_hold else (x_tr, y_tr)
    before = relative_error(shared, x_ho, y_ho)
    params = shared.recovery_params()
    if not params or steps <= 0:
        return {"rel_err_before": before, "rel_err_after": before, "steps": 0, "seconds": 0.0}
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
    return {"rel_err_before": before, "rel_err_after": after, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 2)}
