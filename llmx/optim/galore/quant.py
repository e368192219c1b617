"""Group-wise asymmetric min-max quantization of projection matrices (Q-GaLore, arXiv 2407.08296).

Q-GaLore stores GaLore's projection matrices in 4 bits (uint8 storage, group size 256, a scale and a zero
point per group) because an orthonormal basis tolerates coarse quantization: the projection only has to
keep the gradient in roughly the right subspace, and the basis is recomputed every T steps anyway.

Scheme. The tensor is flattened (row-major) and cut into groups of `group_size` consecutive elements.
For each group with minimum `lo` and maximum `hi`:

    scale = (hi - lo) / (2**bits - 1)        code = round((x - lo) / scale)  in [0, 2**bits - 1]
    zero  = lo                               x'   = code * scale + zero

Error bound: round-to-nearest moves each value by at most half a step, so |x - x'| <= scale / 2 in every
group (up to fp32 rounding in the two affine maps, a few ulps of |x|). `zero` is the group minimum kept as
a float rather than an integer zero point: an integer zero point shifts the grid so that the group
maximum can round past the top code and be clamped, which breaks the scale/2 bound. A constant group
(hi == lo) gets scale 1 and code 0, which reproduces it exactly.

Storage: 8-bit codes one per byte; 4-bit codes two per byte (element 2i in the low nibble, 2i+1 in the
high nibble). Scales and zeros are fp32: at group size 256 they cost 8 bytes per 256 elements, and fp32
keeps the bound above exact rather than loosened by the rounding of a bf16 scale. The last group is
padded by repeating its last element, which leaves its min and max unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

SUPPORTED_BITS = (4, 8)


def _check(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def quantize_groupwise(t: torch.Tensor, bits: int, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `t` to `bits` (4 or 8) per group of `group_size` flattened elements.

    Returns (codes uint8, scale fp32 [groups], zero fp32 [groups]). 4-bit codes are packed two per byte.
    The shape is not stored: pass it to `dequantize_groupwise`.
    """
    _check(bits, group_size)
    flat = t.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    groups = math.ceil(flat.numel() / group_size)
    pad = groups * group_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    g = flat.view(groups, group_size)
    lo = g.amin(dim=1)
    hi = g.amax(dim=1)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - lo[:, None]) / scale[:, None]).clamp_(0, levels).to(torch.uint8).reshape(-1)
    if bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, scale, lo


def dequantize_groupwise(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_groupwise`: a tensor of `shape` in `dtype` (computed in fp32)."""
    _check(bits, group_size)
    if bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)
    groups = scale.numel()
    vals = codes[: groups * group_size].view(groups, group_size).float() * scale[:, None] + zero[:, None]
    numel = math.prod(shape)
    return vals.reshape(-1)[:numel].reshape(tuple(shape)).to(dtype)


def quantized_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes used by `quantize_groupwise` for a tensor of `numel` elements (codes + fp32 scale and zero)."""
    _check(bits, group_size)
    groups = math.ceil(numel / group_size)
    code_bytes = groups * group_size if bits == 8 else math.ceil(groups * group_size / 2)
    return code_bytes + 8 * groups
