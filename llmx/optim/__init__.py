"""Optimizers for llmx (GaLore / GaLore 2 in llmx.optim.galore)."""

from llmx.optim.galore import GaLoreProjector, TuckerProjector, captured_energy, exact_basis, randomized_basis

__all__ = ["GaLoreProjector", "TuckerProjector", "captured_energy", "exact_basis", "randomized_basis"]

from llmx.optim.galore import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402

__all__ += ["GaLoreAdamW", "GaLoreAdamW8bit"]
