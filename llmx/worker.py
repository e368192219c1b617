"""Entry point of each rank started by `launcher=torchrun` or `launcher=slurm`:

    torchrun --nproc_per_node=N -m llmx.worker <run_dir>

Reads the resolved config that the launching process saved in <run_dir>/config.yaml, so every rank
runs exactly the same config in the same directory, and runs the recipe. Exit codes: 0 done, 1 error,
128+signal when stopped by a signal after writing a checkpoint. A failing rank writes its one-line error (or
its traceback) to <run_dir>/error.txt, where the launching process reads it.

    python -m llmx.worker --torchrun TORCHRUN_ARGS...

is torchrun itself, without the traceback and failure table it prints after a rank fails: the rank has said
what went wrong already, and the launcher repeats it as one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def torchrun(argv) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Its per-process lines after a failure ("Sending process N closing signal", "failed (exitcode: 1)") too.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # a rank killed by signal N: 128 + N, as a shell reports it


def _record_error(run_dir: Path, text: str) -> None:
    """The first failing rank's error in error.txt (rank 0's wins a tie: it is what a single process says)."""
    from llmx.utils import atomic_write_text

    path = run_dir / "error.txt"
    if os.environ.get("RANK", "0") == "0" or not path.exists():
        atomic_write_text(path, text)


def main(argv=None) -> int:
    import traceback

    from llmx.launch import load_run_config, run_recipe
    from llmx.trainer.trainer import RunInterrupted
    from llmx.utils import LlmxError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torchrun"]:
        return torchrun(argv[1:])
    if len(argv) != 1:
        print("usage: python -m llmx.worker <run_dir> | --torchrun TORCHRUN_ARGS...", file=sys.stderr)
        return 2
    rank0 = os.environ.get("RANK", "0") == "0"
    run_dir = Path(argv[0])
    try:
        run_recipe(load_run_config(run_dir))
        return 0
    except RunInterrupted as e:
        if rank0:
            print(f"llmx: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except LlmxError as e:  # the launcher prints it, once
        _record_error(run_dir, f"{e}\n")
        return 1
    except Exception as e:
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        _record_error(run_dir, f"rank {os.environ.get('RANK', '0')}: {type(e).__name__}: {e}\n\n{tb}")
        return 1


if __name__ == "__main__":
    code = main()
    # Skip interpreter teardown: with gloo process groups and transformers loaded, C++ static
    # destructors sometimes abort ("terminate called without an active exception") after a clean run,
    # which torchrun would report as a failed rank. Everything is flushed and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
