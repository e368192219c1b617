"""Gradient projectors for GaLore and GaLore 2 (2-D weights).

GaLore (Zhao et al., 2024, arXiv 2403.03507), Algorithm 1: every T steps take the SVD of the gradient
G (m x n), keep the top-r singular vectors as a projection P, run Adam on the projected gradient and map
the Adam update back with P, times a scale alpha. The paper writes only the left projection
(R = P^T G with P = U[:, :r]); which side is projected comes from the reference code (galore-torch 1.0):
`std` projects the smaller dimension (m >= n: right, P = Vh[:r], G @ P^T; m < n: left), `reverse_std` the
larger, `left`/`right` are fixed and `full` keeps both, A^T G B^T (r x r).

GaLore 2 (Su et al., 2025, arXiv 2504.20437) replaces the exact SVD of the refresh by a randomized SVD.
The paper's oversampling and power-iteration settings were not available to us (notes/galore.md 2.2), so
`randomized_basis` is the textbook range finder of Halko, Martinsson & Tropp (2011), "Finding structure
with randomness", SIAM Review 53(2): Algorithm 4.4 (randomized subspace iteration) followed by
Algorithm 5.1 (direct SVD of the small projected matrix). The defaults, oversample=10 and power_iters=1
(the config's), follow Halko et al.'s advice of p = 5..10 extra columns and q = 1..2 iterations for
slowly decaying spectra, which is what layer gradients look like. Measured on this repo's tests and a CPU
benchmark (captured energy, 1.0 = the exact top-r subspace): q=1 keeps 0.98-0.99 of the energy of a
randomly initialised Llama's down_proj gradient and 0.97 for a 4096 x 11008 matrix with singular values
i^-0.5; q=2 keeps >= 0.99 on both for about 1.4x the time of q=1; spectra decaying like i^-1 are easy
(>= 0.999 with q=1). Prefer power_iters=2 when the refresh cost allows. The Gaussian test matrix comes from a
generator seeded by (seed, step // update_proj_gap): refreshes are reproducible and a checkpoint needs no
RNG state. GaLoreAdamW gives each parameter its own seed, derived from its name (`param_seed`).

Choices where the papers leave things open (all matching galore-torch unless said otherwise):
- The SVD always runs in fp32 on the full gradient, whatever its dtype; the basis is then stored in the
  gradient's dtype (unless `basis_dtype` says otherwise). Projections take their operands in that dtype
  (rounded further as `precision` says) and return fp32 products; galore-torch returns them in the
  gradient's dtype, which for bf16 gradients rounds the low-rank gradient before Adam sees it.
- The refresh schedule is galore-torch's: a new basis when there is none or when step % T == 0, with
  `step` counted before the optimizer increments it (refreshes at 0, T, 2T, ...).
- Deviation: the projected side is decided once, at the first refresh, and stored. galore-torch
  re-derives the side of `project_back` from the low-rank tensor's shape, which goes wrong for
  `reverse_std` when that tensor is square (ms-swift PR #10146).
- Deviation: a rank larger than min(m, n) is an error; galore-torch silently returns fewer columns.
- The basis is stored as compact copies: slicing U[:, :r] out of the SVD would keep all of U alive.
- Q-GaLore (Zhang et al., 2024, arXiv 2407.08296) stores the projection in 4 bits with groups of 256;
  `quant_bits` does the same (see quant.py) for every side, where Q-GaLore supports only `std`. The
  basis is dequantized at each use: caching the dequantized copy would give back the memory saved.

Precision of the projections (`precision`; the SVD itself always runs in fp32):
- "ieee": fp32 operands and products (on CUDA, TF32 is switched off around the GEMMs);
- "tf32": fp32 operands, TF32 tensor cores on CUDA (10-bit mantissa products, fp32 accumulation);
- "bf16": both operands rounded to bf16, fp32 accumulation inside the GEMM; the GEMM's output is fp32
  where torch offers it (CUDA `mm(..., out_dtype=float32)`), else rounded to bf16 (CPU).
`basis_dtype` ("fp32" / "bf16"; default: the gradient's dtype, as galore-torch) is how the basis is
stored: a bf16 basis halves its memory, and with precision "bf16" loses nothing more, since every use
rounds it to bf16 anyway. scripts/bench_galore.py measures the energy each choice loses.

Row shards (FSDP2 shards parameters on dim 0; see fsdp.py for the layout and the communication):
- `rows` says which rows of the m x n gradient this rank holds. `project` of a right projection returns
  the shard's own rows of the low-rank gradient; for left and full projections it returns the shard's
  partial sum P[rows]^T G_shard, which the caller reduces over ranks.
- A factor may be stored as a DTensor sharded on its dim 0 (`install`): a factor whose rows are the
  gradient's rows (P of a left projection, A of a full one) is then used through its local rows with no
  communication; the other (P of a right projection, B of a full one) is gathered at first use in a
  step and kept until `release()`.
- The refresh is split so that one rank can compute a basis for all: `prepare(shape)` fixes the side
  and checks the rank (every rank), `compute(full_grad, step)` returns the fp32 factors (the owner),
  `install(factors, dtype)` stores them (every rank, each with what it holds).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from llmx.optim.galore.fsdp import is_dtensor
from llmx.optim.galore.quant import dequantize_groupwise, quantize_groupwise

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PRECISIONS = ("ieee", "tf32", "bf16")
BASIS_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}
SVD_METHODS = ("exact", "randomized")
SIDES = (None, "left", "right", "full")  # position = the int stored as state_dict()["side"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # position = state_dict()["dtype"]


def _value(x):
    # The config passes str Enums (ProjType, SVDMethod); compare their plain values.
    return getattr(x, "value", x)


def choose_side(shape: Tuple[int, int], proj_type: str) -> str:
    """The side galore-torch projects for a gradient of `shape` (notes/galore.md, table in 1.1)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _check_rank(shape, rank: int) -> None:
    if not 1 <= rank <= min(shape):
        raise ValueError(f"rank {rank} is not in [1, min(m, n)] for a gradient of shape {tuple(shape)}")


def _compact(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _take(u: Optional[torch.Tensor], vh: torch.Tensor, rank: int, side: str) -> Dict[str, torch.Tensor]:
    if side == "left":
        return {"P": _compact(u[:, :rank])}
    if side == "right":
        return {"P": _compact(vh[:rank])}
    if side == "full":
        return {"A": _compact(u[:, :rank]), "B": _compact(vh[:rank])}
    raise ValueError(f"side must be left, right or full, got {side!r}")


def exact_basis(matrix: torch.Tensor, rank: int, side: str) -> Dict[str, torch.Tensor]:
    """Top-`rank` singular vectors of `matrix` by a full SVD: {"P": U[:, :r]} (left), {"P": Vh[:r]}
    (right) or {"A": U[:, :r], "B": Vh[:r]} (full). Computed in the matrix's dtype: pass fp32."""
    _check_rank(matrix.shape, rank)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _take(u, vh, rank, side)


def randomized_basis(
    matrix: torch.Tensor,
    rank: int,
    side: str,
    oversample: int = 10,
    power_iters: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """Approximate top-`rank` singular vectors (same layout as `exact_basis`) by a randomized range finder.

    Sketch width l = rank + oversample (at most min(m, n), where the sketch spans the whole range and the
    result is exact up to rounding). Each power iteration multiplies by G^T then G, re-orthonormalising by
    QR after every product: without it the columns collapse onto the top singular vector in floating point
    (Halko et al. 2011, Algorithm 4.4). Cost: (2 + 2 q) m n l flops for the products plus QRs of m x l /
    n x l matrices and an SVD of l x n, against O(m n min(m, n)) for the exact SVD.
    """
    _check_rank(matrix.shape, rank)
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    if matrix.device.type == "meta":  # shape-only runs (memory counts): meta has no generator
        generator = None
    omega = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(matrix.T @ q).Q
        q = torch.linalg.qr(matrix @ q).Q
    ub, _, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    u = q @ ub[:, :rank] if side in ("left", "full") else None
    return _take(u, vh, rank, side)


def param_seed(seed: int, name: str) -> int:
    """The sketch seed of one parameter: `seed` mixed with a stable hash (CRC-32) of its name, so that two
    parameters of the same shape draw different test matrices at the same refresh (with one seed for all,
    every q_proj of a model would be sketched by the same Gaussian matrix, correlating their errors)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**32


def sketch_seed(seed: int, refresh_index: int) -> int:
    """The generator seed of one refresh. 32 bits because the CPU generator (mt19937) ignores the high
    half of a 64-bit seed. For a fixed seed, distinct refresh indices give distinct seeds (below 2**32);
    for a fixed index, distinct seeds do too (multiplying by an odd constant is a bijection mod 2**32)."""
    return (seed * 0x9E3779B1 + refresh_index) % 2**32


def _rows_len(total: int, rows: Optional[slice]) -> int:
    return total if rows is None else len(range(total)[rows])


def _sel(t: torch.Tensor, rows: Optional[slice]) -> torch.Tensor:
    return t if rows is None else t[rows]


@contextmanager
def _cuda_fp32_precision(tf32: bool):
    # The legacy flag, as the rest of llmx and its tests use it (torch refuses a mix of the two APIs).
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b in fp32 results, the operands multiplied as `precision` says (module docstring)."""
    if precision == "bf16":
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if a.device.type == "cuda":
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError):  # a torch without the fp32-output bf16 GEMM
                pass
        return (a @ b).float()
    a, b = a.float(), b.float()
    if a.device.type != "cuda":
        return a @ b
    with _cuda_fp32_precision(precision == "tf32"):
        return a @ b


class GaLoreProjector:
    """Projects a 2-D gradient onto a rank-`rank` subspace refreshed every `update_proj_gap` steps.

    Use: `if proj.needs_refresh(step): proj.refresh(full_grad, step)`, then `low = proj.project(grad)`
    and, after the optimizer's low-rank update, `proj.project_back(update)` (multiplied by `scale`).
    """

    def __init__(
        self,
        rank: int,
        proj_type: str = "std",
        update_proj_gap: int = 200,
        scale: float = 1.0,
        svd: str = "exact",
        oversample: int = 10,
        power_iters: int = 1,
        seed: int = 0,
        quant_bits: Optional[int] = None,
        quant_group_size: int = 256,
        basis_dtype: Optional[str] = None,
        precision: str = "ieee",
    ):
        proj_type, svd, precision = _value(proj_type), _value(svd), _value(precision)
        basis_dtype = _value(basis_dtype)
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"rank and update_proj_gap must be >= 1, got {rank}, {update_proj_gap}")
        if quant_bits not in (None, 4, 8):
            raise ValueError(f"quant_bits must be None, 4 or 8, got {quant_bits}")
        if oversample < 0 or power_iters < 0:
            raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if basis_dtype not in BASIS_DTYPES:
            raise ValueError(f"basis_dtype must be one of {list(BASIS_DTYPES)}, got {basis_dtype!r}")
        self.rank = rank
        self.proj_type = proj_type
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.svd = svd
        self.oversample = oversample
        self.power_iters = power_iters
        self.seed = seed
        self.quant_bits = quant_bits
        self.quant_group_size = quant_group_size
        self.basis_dtype = BASIS_DTYPES[basis_dtype]
        self.precision = precision
        self.refreshes = 0
        self._side: Optional[str] = None
        self._shape: Optional[Tuple[int, int]] = None
        self._dtype: Optional[torch.dtype] = None
        # "P" or "A"/"B"; quantized: "<name>.codes", "<name>.scale", "<name>.zero".
        self._state: Dict[str, torch.Tensor] = {}
        self._gathered: Dict[str, torch.Tensor] = {}  # factors gathered from their shards, until release()

    @property
    def side(self) -> Optional[str]:
        return self._side

    def factor_names(self) -> Tuple[str, ...]:
        return ("A", "B") if self._side == "full" else ("P",)

    def indexed_by_rows(self, name: str) -> bool:
        """Whether the factor's rows are the gradient's rows (P of a left projection, A of a full one)."""
        return name == "A" or (name == "P" and self._side == "left")

    def factor_shape(self, name: str) -> Tuple[int, int]:
        m, n = self._shape
        return (m, self.rank) if self.indexed_by_rows(name) else (self.rank, n)

    def _factor(self, name: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                rows: Optional[slice] = None) -> torch.Tensor:
        """The factor as this rank uses it: the `rows` of a row-indexed factor (a sharded one already is
        them), any other factor whole (gathered from its shards once per step)."""
        dtype = dtype or self._dtype
        if self.quant_bits is None:
            keys = (name,)
        else:
            keys = (f"{name}.codes", f"{name}.scale", f"{name}.zero")
        # A checkpoint loaded on another device (galore-torch PR #70): move the state once, not every step.
        for k in keys:
            if self._state[k].device != device:
                self._state[k] = self._state[k].to(device)
        if self.quant_bits is not None:
            codes, scale, zero = (self._state[k] for k in keys)
            full = dequantize_groupwise(
                codes, scale, zero, self.quant_bits, self.quant_group_size, self.factor_shape(name), dtype
            )
            return _sel(full, rows) if self.indexed_by_rows(name) else full
        t = self._state[name]
        if not is_dtensor(t):
            return _sel(t, rows).to(dtype) if self.indexed_by_rows(name) else t.to(dtype)
        if self.indexed_by_rows(name):
            return t.to_local().to(dtype)
        if name not in self._gathered:
            self._gathered[name] = t.full_tensor()
        return self._gathered[name].to(dtype)

    def factor(self, name: str, device: torch.device, rows: Optional[slice] = None) -> torch.Tensor:
        """The factor in its storage dtype, as `project` uses it (see `_factor`)."""
        self._require_basis()
        return self._factor(name, device, rows=rows)

    def release(self) -> None:
        """Drop the factors gathered for this step (call once the parameter's step is done)."""
        self._gathered.clear()

    def _require_basis(self) -> None:
        if self._side is None:
            raise RuntimeError("GaLoreProjector has no basis yet: call refresh(grad, step) first")

    def needs_refresh(self, step: int) -> bool:
        return self._side is None or step % self.update_proj_gap == 0

    def prepare(self, shape: Tuple[int, int]) -> None:
        """Fix the projected side for a gradient of `shape` at the first refresh; check it later."""
        shape = tuple(shape)
        if len(shape) != 2:
            raise ValueError(f"GaLoreProjector needs a 2-D gradient, got shape {shape}")
        if self._side is None:
            _check_rank(shape, self.rank)
            self._side, self._shape = choose_side(shape, self.proj_type), shape
        elif shape != self._shape:
            raise ValueError(f"gradient shape {shape} differs from the shape {self._shape} of the first refresh")

    def storage_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        return self.basis_dtype or grad_dtype

    def compute(self, grad: torch.Tensor, step: int) -> Dict[str, torch.Tensor]:
        """The new basis of the full gradient `grad` (m x n) as fp32 factors, stored nowhere."""
        self.prepare(grad.shape)
        if grad.dtype not in DTYPES:
            raise ValueError(f"unsupported gradient dtype {grad.dtype}")
        matrix = grad.detach().float()
        if self.svd == "exact":
            return exact_basis(matrix, self.rank, self._side)
        gen = None
        if matrix.device.type != "meta":
            gen = torch.Generator(device=matrix.device)
            gen.manual_seed(sketch_seed(self.seed, step // self.update_proj_gap))
        return randomized_basis(matrix, self.rank, self._side, self.oversample, self.power_iters, gen)

    def install(self, factors: Dict[str, torch.Tensor], grad_dtype: torch.dtype) -> None:
        """Store new factors (after `prepare`): whole tensors, or DTensors holding this rank's shard.
        Quantized bases (quant_bits) are stored whole."""
        state = {}
        dtype = self.storage_dtype(grad_dtype)
        for name, t in factors.items():
            if self.quant_bits is None:
                state[name] = t if t.dtype == dtype else t.to(dtype)
            else:
                codes, scale, zero = quantize_groupwise(t, self.quant_bits, self.quant_group_size)
                state.update({f"{name}.codes": codes, f"{name}.scale": scale, f"{name}.zero": zero})
        self._state, self._dtype = state, grad_dtype
        self._gathered.clear()
        self.refreshes += 1

    def refresh(self, grad: torch.Tensor, step: int) -> None:
        """Recompute the basis from the full gradient `grad` (m x n), in fp32."""
        if grad.ndim != 2:
            raise ValueError(f"GaLoreProjector needs a 2-D gradient, got shape {tuple(grad.shape)}")
        self.install(self.compute(grad, step), grad.dtype)

    def project(self, grad: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """right: grad @ P^T; left: P^T @ grad; full: A^T @ grad @ B^T (fp32 results). With `rows` (`grad`
        is that row shard): right gives the shard's rows of the result, left/full this shard's partial sum."""
        self._require_basis()
        m, n = self._shape
        expected = (_rows_len(m, rows), n)
        if tuple(grad.shape) != expected:
            raise ValueError(f"project expects a gradient of shape {expected}, got {tuple(grad.shape)}")
        g, prec = grad.to(self._dtype), self.precision
        if self._side == "right":
            return matmul(g, self._factor("P", g.device).T, prec)
        if self._side == "left":
            return matmul(self._factor("P", g.device, rows=rows).T, g, prec)
        a, b = self._factor("A", g.device, rows=rows), self._factor("B", g.device)
        return matmul(matmul(a.T, g, prec), b.T, prec)

    def project_back(self, low: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """right: low @ P; left: P @ low; full: A @ low @ B; times `scale`. With `rows`: the rows of the
        result for that shard (for right, `low` is already the shard's rows)."""
        self._require_basis()
        self.project_back_shape_check(low, rows)
        x, prec = low.to(self._dtype), self.precision
        if self._side == "right":
            out = matmul(x, self._factor("P", x.device), prec)
        elif self._side == "left":
            out = matmul(self._factor("P", x.device, rows=rows), x, prec)
        else:
            a, b = self._factor("A", x.device, rows=rows), self._factor("B", x.device)
            out = matmul(matmul(a, x, prec), b, prec)
        return (out * self.scale).to(self._dtype)

    def add_back_(self, target: torch.Tensor, low: torch.Tensor, alpha: float, rows: Optional[slice] = None) -> torch.Tensor:
        """target += alpha * project_back(low, rows), in place.

        For left and right projections in ieee / tf32 precision this is one GEMM that accumulates straight
        into the weight (addmm_), so the m x n update is never materialised: one read and one write of
        the weight instead of writing, scaling and re-reading an m x n temporary (the step is memory-bound
        there).
        """
        self._require_basis()
        x = low.to(self._dtype)
        if self._side in ("left", "right") and target.dtype == x.dtype and self.precision != "bf16":
            self.project_back_shape_check(low, rows)
            coef = alpha * self.scale
            if self._side == "right":
                a, b = x, self._factor("P", x.device)
            else:
                a, b = self._factor("P", x.device, rows=rows), x
            if target.device.type != "cuda":
                return target.addmm_(a, b, alpha=coef)
            with _cuda_fp32_precision(self.precision == "tf32"):
                return target.addmm_(a, b, alpha=coef)
        return target.add_(self.project_back(low, rows), alpha=alpha)

    def project_back_shape_check(self, low: torch.Tensor, rows: Optional[slice] = None) -> None:
        m, n = self._shape
        r = self.rank
        expected = {"right": (_rows_len(m, rows), r), "left": (r, n), "full": (r, r)}[self._side]
        if tuple(low.shape) != expected:
            raise ValueError(
                f"project_back ({self._side} projection of a {m}x{n} gradient at rank {r}) expects shape "
                f"{expected}, got {tuple(low.shape)}"
            )

    def basis(self) -> Dict[str, torch.Tensor]:
        """The current basis, whole (gathered from its shards), dequantized, in fp32 ({"P": ...} or
        {"A": ..., "B": ...}); empty before the first refresh. Not a copy when the basis is stored whole
        in fp32: do not modify."""
        if self._side is None:
            return {}
        out = {}
        for name in self.factor_names():
            t = self._state.get(name)
            if t is not None and is_dtensor(t):
                out[name] = t.full_tensor().float()
            else:
                device = next(iter(self._state.values())).device
                out[name] = self._factor(name, device, torch.float32)
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors only (DCP- and `torch.load(weights_only=True)`-safe); hyperparameters are constructor
        arguments. Returns the stored tensors themselves (DTensors when sharded), so an in-place load into
        them works."""
        d = {
            "side": torch.tensor(SIDES.index(self._side), dtype=torch.int64),
            "refreshes": torch.tensor(self.refreshes, dtype=torch.int64),
        }
        if self._side is not None:
            d["shape"] = torch.tensor(self._shape, dtype=torch.int64)
            d["dtype"] = torch.tensor(DTYPES.index(self._dtype), dtype=torch.int64)
            d.update(self._state)
        return d

    def load_state_dict(self, d: Dict[str, torch.Tensor]) -> None:
        side = SIDES[int(d["side"])]
        refreshes = int(d["refreshes"])
        self._gathered.clear()
        if side is None:
            self._side, self._shape, self._dtype, self._state, self.refreshes = None, None, None, {}, refreshes
            return
        shape = tuple(int(x) for x in d["shape"].tolist())
        names = ("A", "B") if side == "full" else ("P",)
        if self.quant_bits is None:
            keys = list(names)
        else:
            keys = [f"{nm}.{k}" for nm in names for k in ("codes", "scale", "zero")]
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(
                f"projector state lacks {missing} (was it saved with quant_bits={self.quant_bits}?)"
            )
        old = (self._side, self._shape)
        self._side, self._shape = side, shape
        for nm in names:
            want = self.factor_shape(nm)
            if self.quant_bits is None:
                ok, got = tuple(d[nm].shape) == want, tuple(d[nm].shape)
            else:
                groups = -(-want[0] * want[1] // self.quant_group_size)
                ok, got = d[f"{nm}.scale"].numel() == groups, f"{d[nm + '.scale'].numel()} quantization groups"
            if not ok:
                self._side, self._shape = old
                raise ValueError(f"saved basis {nm} ({got}) does not fit rank {self.rank} and shape {shape}")
        self._dtype = DTYPES[int(d["dtype"])]
        self._state = {k: d[k] for k in keys}
        self.refreshes = refreshes


def captured_energy(grad: torch.Tensor, proj: GaLoreProjector) -> float:
    """The fraction of the best rank-r subspace's energy that the projector's subspace keeps: ||Q^T G||^2
    (Q an orthonormal basis of that subspace) over the sum of the top-r squared singular values of G. 1.0
    for the exact basis (and for a zero gradient); never above 1.

    In float64, the basis orthonormalised first (an fp32 or bf16 basis is orthonormal only to its rounding,
    which can push a near-1 ratio over 1), and the singular values by the QR-based gesvd driver on CUDA
    (the default there may be iterative: an inexact denominator once gave "energies" of 1.0012)."""
    g = grad.detach().double()
    b = {k: v.double() for k, v in proj.basis().items()}
    cols = lambda m: torch.linalg.qr(m).Q  # noqa: E731 - orthonormal columns spanning m's columns
    low = {"left": lambda: cols(b["P"]).T @ g, "right": lambda: g @ cols(b["P"].T),
           "full": lambda: cols(b["A"]).T @ g @ cols(b["B"].T)}[proj.side]()
    driver = "gesvd" if g.device.type == "cuda" else None
    s = torch.linalg.svdvals(g, driver=driver)
    best = s[: proj.rank].pow(2).sum()
    if best == 0:
        return 1.0
    return float(low.pow(2).sum() / best)
