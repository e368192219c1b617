"""Multi-turn RL for LLM agents: SWEET-RL on ColBench (environment, simulators, sandbox, losses)."""
