"""CoCoMix (Tack et al., 2025, arXiv 2502.08524): a TopK sparse autoencoder on a teacher's residual stream
(`sae`), concept labels by attribution (`attribution`), and the student that predicts, compresses and interleaves
continuous concepts (`cocomix`)."""
