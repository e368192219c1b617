"""Activation sparsity for inference (the `sparsify` recipe kind): R-Sparse and TEAL.

Plain PyTorch, usable without the launcher:

    from llmx.sparse import calibrate, apply_plan, uniform_plan, layer_shapes
    cal = calibrate(model, calibration_batches)
    apply_plan(model, cal, uniform_plan(layer_shapes(model), s=0.5, alpha=0.95))
"""

from llmx.sparse.rsparse import (
    TARGETS,
    TOKEN_MODES,
    Calibration,
    RSparseLinear,
    SVDCache,
    apply_plan,
    calibrate,
    find_linears,
    layer_shapes,
    model_sparsity,
    rank_for,
    reads_saved,
    remove_sparsity,
    uniform_plan,
)

__all__ = ["TARGETS", "TOKEN_MODES", "Calibration", "RSparseLinear", "SVDCache", "apply_plan", "calibrate", "find_linears",
           "layer_shapes", "model_sparsity", "rank_for", "reads_saved", "remove_sparsity", "uniform_plan"]
