"""Latent reasoning tokens: the VQ-VAE of Token Assorted (Su et al., 2025, arXiv 2502.03275) in plain PyTorch."""
