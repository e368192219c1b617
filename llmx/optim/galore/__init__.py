"""GaLore / GaLore 2 gradient projectors (see projector.py, tucker.py, quant.py for the papers and choices)."""

from llmx.optim.galore.projector import GaLoreProjector, captured_energy, exact_basis, randomized_basis
from llmx.optim.galore.quant import dequantize_groupwise, quantize_groupwise
from llmx.optim.galore.tucker import TuckerProjector

__all__ = [
    "GaLoreProjector",
    "TuckerProjector",
    "captured_energy",
    "dequantize_groupwise",
    "exact_basis",
    "quantize_groupwise",
    "randomized_basis",
]

# GaLoreAdamW / GaLoreAdamW8bit (adamw.py); the trainer's builder lives in build.py, imported on demand.
from llmx.optim.galore.adamw import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402

__all__ += ["GaLoreAdamW", "GaLoreAdamW8bit"]
