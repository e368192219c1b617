"""SWEET-RL on ColBench: sandboxed code execution, tasks, simulators, environment, losses (issue 13)."""
