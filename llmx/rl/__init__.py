"""SWEET-RL on ColBench: sandboxed collaboration environment, rollouts and the RL losses (plain PyTorch)."""
