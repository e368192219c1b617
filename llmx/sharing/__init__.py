"""Layer sharing: SHARP (adjacent-layer MLP sharing with low-rank recovery), plain PyTorch.

    from llmx.sharing import share_mlps, single_layer_warmup, save_compact, load_compact
"""

from llmx.sharing.compact import load_compact, save_compact, sharing_spec
from llmx.sharing.sharp import (PROJECTIONS, REFERENCES, LowRank, LowRankMLP, SharedMLP, adjacent_similarity,
                                capture_mlp_io, decoder_layers, freeze_all_but_recovery, matched_rank, mlp_storage,
                                padding_mask, recovery_parameters, reference_map, relative_error, select_layers,
                                share_mlps, shared_layers, single_layer_warmup)

__all__ = ["PROJECTIONS", "REFERENCES", "LowRank", "LowRankMLP", "SharedMLP", "adjacent_similarity",
           "capture_mlp_io", "decoder_layers", "freeze_all_but_recovery", "load_compact", "matched_rank",
           "mlp_storage", "padding_mask", "recovery_parameters", "reference_map", "relative_error", "save_compact",
           "select_layers", "share_mlps", "shared_layers", "sharing_spec", "single_layer_warmup"]
