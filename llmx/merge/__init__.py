"""Weight-space merging of Hugging Face checkpoints: ParamΔ, task arithmetic, linear, TIES, DARE.

    from llmx.merge import paramdelta, merge, load_manifest, MergeError
    paramdelta("L3-70B-Instruct", "L3-70B", "L3.1-70B", "L3.1-70B-ParamDelta")   # new_base + (post - base)
    merge("ties", "out", models=[("math", 1.0), ("code", 1.0)], base="base", params={"density": 0.5})

Streaming (one tensor at a time, peak memory set by the largest tensor, not the model), validated before
anything is written (one MergeError listing every problem), published atomically with a manifest
(llmx_merge.json: inputs with SHA-256, formula, parameters, vocabulary policy, timings).

    engine   paramdelta(), merge(), load_manifest(), MergeError: validation, planning, the streaming loop
    methods  the per-tensor arithmetic, usable on in-memory tensors (papers and equations in its docstring)
    io       reading safetensors/pickle checkpoints and writing sharded safetensors, tensor by tensor
"""

from llmx.merge.engine import (MANIFEST, METHODS, TOKENIZER_FILES, VOCAB_POLICIES, MergeError, load_manifest,
                               merge, paramdelta)

__all__ = ["paramdelta", "merge", "load_manifest", "MergeError", "METHODS", "VOCAB_POLICIES", "MANIFEST",
           "TOKENIZER_FILES"]
