"""Benchmark generators, graders and evaluation for the `generate-bench` recipe kind.

`base` holds the one generator interface (`BenchGenerator`, `register_bench`, `get_bench`); importing this
package registers the built-in generators. Usable without the launcher:

    from llmx.bench import build_plan, generate_dataset, get_bench, load_bench
    manifest = generate_dataset("gsm_infinite", build_plan(["hard"], ["0", "8k"], "2-20", 50), "out/",
                                tokenizer_path="<tokenizer dir>", workers=8)
"""

from llmx.bench.base import BENCHES, BenchError, BenchGenerator, get_bench, register_bench
from llmx.bench.dataset import build_plan, generate_dataset, load_bench
import llmx.bench.gsm_infinite  # noqa: E402  (registers "gsm_infinite")
import llmx.bench.shortest_path  # noqa: E402  (registers "shortest_path")
import llmx.bench.keys_maze  # noqa: E402  (registers "keys_maze")

__all__ = ["BENCHES", "BenchError", "BenchGenerator", "build_plan", "generate_dataset", "get_bench", "load_bench",
           "register_bench"]
