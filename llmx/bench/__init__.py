"""Benchmark generators, graders and evaluation for the `generate-bench` recipe kind.

`base` holds the one generator interface (`BenchGenerator`, `register_bench`, `get_bench`); importing this
package registers the built-in generators. Usable without the launcher:

    from llmx.bench import get_bench, generate_dataset
    bench = get_bench("gsm_infinite")
"""

from llmx.bench.base import BENCHES, BenchError, BenchGenerator, get_bench, register_bench  # noqa: F401
import llmx.bench.gsm_infinite  # noqa: F401,E402  (registers "gsm_infinite")
