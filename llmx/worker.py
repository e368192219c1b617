"""Entry point of each rank started by `launcher=torchrun` or `launcher=slurm`:

    torchrun --nproc_per_node=N -m llmx.worker <run_dir>

Reads the resolved config that the launching process saved in <run_dir>/config.yaml, so every rank
runs exactly the same config in the same directory, and runs the recipe. Exit codes: 0 done, 1 error,
128+signal when stopped by a signal after writing a checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    from llmx.launch import load_run_config, run_recipe
    from llmx.trainer.trainer import RunInterrupted
    from llmx.utils import LlmxError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llmx.worker <run_dir>", file=sys.stderr)
        return 2
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        run_recipe(load_run_config(Path(argv[0])))
        return 0
    except RunInterrupted as e:
        if rank0:
            print(f"llmx: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except LlmxError as e:
        if rank0:
            print(f"llmx: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    code = main()
    # Skip interpreter teardown: with gloo process groups and transformers loaded, C++ static
    # destructors sometimes abort ("terminate called without an active exception") after a clean run,
    # which torchrun would report as a failed rank. Everything is flushed and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
