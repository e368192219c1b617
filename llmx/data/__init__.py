"""Data for llmx: documents -> tokenizer -> packed, cached blocks -> exact, resumable step batches.

    tok = build_tokenizer(cfg.data, model_tokenizer)        # llmx.data.tokenizer
    train, val = build_datasets(cfg.data, tok)              # llmx.data.packing (documents: llmx.data.sources)
    loader = StepLoader(train, batch_size=B, micro_batch_size=M, rank=r, world_size=w, seed=s)
    micro_batches = loader.next_step()                      # llmx.data.loader
    for mb in eval_batches(val, micro_batch_size=M, rank=r, world_size=w, max_batches=K): ...

Synthetic sources register with `@register_generator(name)` (llmx.data.synthetic).

transformers and datasets are imported inside the functions that need them, so importing this
package costs only torch.
"""

from llmx.data.loader import StepLoader, eval_batches
from llmx.data.packing import PackedDataset, StreamingPackedDataset, build_datasets
from llmx.data.synthetic import register_generator
from llmx.data.tokenizer import build_tokenizer

__all__ = [
    "build_tokenizer",
    "build_datasets",
    "StepLoader",
    "eval_batches",
    "register_generator",
    "PackedDataset",
    "StreamingPackedDataset",
]
