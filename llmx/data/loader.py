"""Step-wise batching for training and evaluation, exact under resume and under data parallelism.

Training consumes one global stream of sequences: global position g is sequence
`perm(epoch)[g % N]` with epoch = g // N, where perm(epoch) is `torch.randperm(N)` from a
`torch.Generator` seeded with a hash of (seed, epoch) (identity when shuffle is off). Optimizer step
k takes global positions [k*B, (k+1)*B). When an epoch runs out mid-step, the step continues into
the next epoch's permutation: every step has exactly B sequences, and no sequence is dropped or
repeated within an epoch. No global RNG state is read or changed.

Rank r of w takes the contiguous slice [r*B/w, (r+1)*B/w) of each step and splits it into
accum = B // (M*w) micro-batches of M, so that the ranks together see exactly the B sequences a
single process with the same B would see: the loss curve does not depend on world_size (up to
floating-point summation order).

The loader state is the global position (epoch, position in epoch): a handful of ints that do not
depend on rank or world size, so a run can even resume on a different number of ranks. Over a
streaming dataset the stream is read sequentially (no shuffle): every rank reads the whole stream
and keeps its slice, and the state also carries the dataset's block count.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, Iterator, List, Optional

import torch

from llmx.utils import LlmxError


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") & (2**63 - 1)


def _check_split(batch_size: int, micro_batch_size: int, rank: int, world_size: int) -> None:
    if min(batch_size, micro_batch_size, world_size) < 1:
        raise LlmxError(
            f"batch_size={batch_size}, micro_batch_size={micro_batch_size} and world_size={world_size} must be >= 1"
        )
    if not 0 <= rank < world_size:
        raise LlmxError(f"rank={rank} is outside world_size={world_size}")


class StepLoader:
    """Yields one optimizer step of micro-batches at a time; see the module docstring."""

    def __init__(self, dataset, batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        _check_split(batch_size, micro_batch_size, rank, world_size)
        if batch_size % (micro_batch_size * world_size):
            raise LlmxError(
                f"batch_size={batch_size} must be divisible by micro_batch_size={micro_batch_size} x "
                f"world_size={world_size} = {micro_batch_size * world_size} "
                "(accumulation steps = batch_size // (micro_batch_size * world_size))"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = batch_size // (micro_batch_size * world_size)
        self.seed = seed
        self.streaming = not hasattr(dataset, "__len__")
        self.shuffle = shuffle and not self.streaming
        self.epoch = 0
        self.position = 0
        self._perm: Optional[torch.Tensor] = None
        self._perm_epoch = -1
        self._iter: Optional[Iterator[torch.Tensor]] = None
        if not self.streaming:
            n = len(dataset)
            if n < batch_size:
                seq_len = getattr(dataset, "seq_len", None) or (dataset[0].shape[-1] if n else "?")
                raise LlmxError(f"data has {n} sequences of {seq_len} tokens, fewer than batch_size={batch_size}")

    # -- map-style -------------------------------------------------------------------------------

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            n = len(self.dataset)
            if self.shuffle:
                gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
                self._perm = torch.randperm(n, generator=gen)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = self.epoch
        return self._perm

    def _global_indices(self) -> List[int]:
        n = len(self.dataset)
        out: List[int] = []
        while len(out) < self.batch_size:
            if self.position == n:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(self.batch_size - len(out), n - self.position)
            out.extend(self._order()[self.position:self.position + take].tolist())
            self.position += take
        return out

    # -- streaming -------------------------------------------------------------------------------

    def _next_block(self) -> torch.Tensor:
        for attempt in range(2):
            if self._iter is None:
                self._iter = iter(self.dataset)
            try:
                block = next(self._iter)
                self.position += 1
                return block
            except StopIteration:
                self._iter = None
                if attempt == 0 and self.position > 0:
                    self.epoch, self.position = self.epoch + 1, 0
                    self.dataset.load_state_dict({"blocks": 0})
                    continue
                break
        raise LlmxError("the data stream yields no sequences of seq_len tokens (too little text, or all held out)")

    # -- public ----------------------------------------------------------------------------------

    def next_step(self) -> List[torch.Tensor]:
        """This rank's share of the next optimizer step: accum_steps LongTensors of shape [M, seq_len]."""
        share = self.batch_size // self.world_size
        lo = self.rank * share
        if self.streaming:
            blocks = [self._next_block() for _ in range(self.batch_size)][lo:lo + share]
        else:
            blocks = [self.dataset[i] for i in self._global_indices()[lo:lo + share]]
        m = self.micro_batch_size
        return [torch.stack(blocks[j * m:(j + 1) * m]).long() for j in range(self.accum_steps)]

    def planned_indices(self, steps: int) -> List[int]:
        """The dataset indices (all ranks) of the next `steps` optimizer steps, in order, without moving the
        loader: what a cache of per-block work must cover for a run of that length (map-style data only)."""
        if self.streaming:
            raise LlmxError("planned_indices needs map-style data (a streamed dataset has no indices)")
        saved = (self.epoch, self.position)
        try:
            return [i for _ in range(steps) for i in self._global_indices()]
        finally:
            self.epoch, self.position = saved

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_sequences": -1 if self.streaming else len(self.dataset),
        }
        if self.streaming:
            state["dataset"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the saved seed and shuffle win over the constructor's."""
        n = -1 if self.streaming else len(self.dataset)
        if int(state["num_sequences"]) != n:
            raise LlmxError(
                f"cannot resume the data loader exactly: the checkpoint's data had {state['num_sequences']} sequences, "
                f"this data has {n} (did data.* or the tokenizer change?)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._perm_epoch = -1
        if self.streaming:
            self.dataset.load_state_dict(state.get("dataset", {"blocks": self.position}))
            self._iter = None


def eval_batches(val, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: Optional[int] = None) -> Iterator[torch.Tensor]:
    """This rank's micro-batches of the first max_batches * micro_batch_size validation blocks, in order.

    The evaluated blocks do not depend on the process count: max_batches counts micro-batches of all ranks
    together, and rank r takes blocks r, r + w, r + 2w, ... of them, so every block is evaluated once whatever w
    is. Ranks may hold one block more than others, or one batch more: the trainer gives the shorter ones a
    forward whose loss it ignores (FSDP needs the same number of forwards on every rank). Empty validation
    yields nothing.
    """
    _check_split(micro_batch_size * world_size, micro_batch_size, rank, world_size)
    n = len(val)
    if max_batches is not None:
        n = min(n, max_batches * micro_batch_size)
    mine = range(rank, n, world_size)
    for start in range(0, len(mine), micro_batch_size):
        yield torch.stack([val[i] for i in mine[start:start + micro_batch_size]]).long()
