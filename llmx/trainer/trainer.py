"""The training loop every llmx training recipe uses (single process, or FSDP2 under torchrun).

A recipe builds the model, tokenizer and data, then hands them to `Trainer(...).fit()`. The trainer owns
what must be identical across recipes to be trusted: the loss normalisation, gradient accumulation, the
schedule, clipping, evaluation, checkpoints and resume, signals, and metrics. What differs between
methods comes in through three seams: the optimizer (registered by name, see llmx.trainer.optim), the
loss function, and the model the recipe builds.

Loss normalisation. A step's loss is the mean over every target token of the global batch, whatever the
accumulation and the number of ranks: each micro-batch contributes sum(token losses) * world / N, where
N is the step's global target count (all-reduced before the first backward). FSDP averages gradients
over ranks, hence the factor `world`. So 1 process with batch B and 2 processes with B/2 each compute
the same gradient, up to summation order.

Resume. A checkpoint holds model, optimizer, step, tokens seen, the data-loader position and every RNG
state; the lr is a pure function of the step. Resuming therefore continues the same trajectory: bitwise
on CPU (tested for one process and for 2-process FSDP).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmx.trainer import checkpoint as ckpt
from llmx.trainer.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, parallelize
from llmx.trainer.optim import InBackwardOptimizer, build_optimizer, lr_at, optimizers_of, set_lr
from llmx.utils import LlmxError

IGNORE_INDEX = -100
# Fault injection (tests): SIGKILL this process right after the given optimizer step.
_KILL_AT_STEP = int(os.environ.get("LLMX_DEBUG_KILL_AT_STEP", "0") or 0)
# Slow every step down (tests that send a signal mid-run need a run that is still running).
_STEP_SLEEP = float(os.environ.get("LLMX_DEBUG_STEP_SLEEP", "0") or 0)


class NonFiniteLoss(LlmxError):
    pass


class RunInterrupted(LlmxError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's targets.

    `batch` is a LongTensor [B, T] of packed tokens (every position is a target), or a dict with
    input_ids and labels where IGNORE_INDEX marks positions without a target (SFT prompts, padding).
    """
    input_ids, labels = (batch, batch) if torch.is_tensor(batch) else (batch["input_ids"], batch["labels"])
    logits = model(input_ids=input_ids).logits
    # Upcast inside the loss: bf16 logits lose the small probabilities that perplexity depends on.
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(batch) -> int:
    """What a micro-batch's summed loss is divided by: its target tokens, or what a loss function says
    (batch["n_targets"]: pairs for a preference loss, masked tokens for a multi-turn SFT loss)."""
    if torch.is_tensor(batch):
        return batch.shape[0] * (batch.shape[1] - 1)
    if "n_targets" in batch:
        return int(batch["n_targets"])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_inputs(batch) -> int:
    ids = batch if torch.is_tensor(batch) else batch["input_ids"]
    return ids.numel()


def to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # The CPU analogue: this address space's peak resident memory (VmHWM, KiB). Not ru_maxrss: Linux
    # carries that across fork and exec, so a run started by a large parent would report the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StopSignal:
    """First SIGINT/SIGTERM/SIGUSR2: finish the step, checkpoint, exit. A second SIGINT aborts at once.

    SIGUSR2 is what Slurm sends ahead of a time limit (submitit's signal_delay_s)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading_main():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nllmx: received {signal.Signals(signum).name}; finishing this step and writing a checkpoint "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Trainer:
    def __init__(
        self,
        cfg,
        run_dir: Path,
        info: DistInfo,
        model: nn.Module,
        train_loader,
        val_data,
        *,
        tokenizer=None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] = causal_lm_loss,
        eval_batches_fn: Optional[Callable[..., Any]] = None,
        step_metrics: Optional[Callable[[], Dict[str, float]]] = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.info = info
        self.model = model
        self.loader = train_loader
        self.val_data = val_data
        self.tokenizer = tokenizer
        self.loss_fn = loss_fn
        self.eval_batches_fn = eval_batches_fn
        # Extra figures for each logged row (e.g. a loss's parts), gathered by the loss function since the last row.
        self.step_metrics = step_metrics
        self.hf_config = getattr(model, "config", None)
        self.step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Optional[Path] = None

    # ------------------------------------------------------------------ setup
    def _precision(self) -> Optional[torch.dtype]:
        p = str(self.cfg.trainer.precision.value if hasattr(self.cfg.trainer.precision, "value") else self.cfg.trainer.precision)
        if p == "auto":
            return torch.bfloat16 if self.info.device.type == "cuda" else None
        return torch.bfloat16 if p == "bf16" else None

    def _setup(self) -> None:
        t = self.cfg.trainer
        device = self.info.device
        self.compute_dtype = self._precision()
        on_meta = any(p.is_meta for p in self.model.parameters())
        if not on_meta:
            self.model.to(device)
        self.model = parallelize(
            self.model,
            self.info,
            param_dtype=self.compute_dtype,
            activation_checkpointing=t.activation_checkpointing,
            compile=t.compile,
            reshard_after_forward=t.reshard_after_forward,
        )
        if on_meta:
            # Large models are built on the meta device and materialised shard by shard: no rank ever
            # holds the full fp32 model. Initialisation then runs on the local shards.
            self.model.to_empty(device=device)
            with torch.no_grad():
                self.model.init_weights()
        self.model.train()
        # Under FSDP2 the MixedPrecisionPolicy casts; a single process uses autocast instead.
        use_autocast = self.compute_dtype is not None and not self.info.distributed
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=self.compute_dtype)) if use_autocast else nullcontext
        )
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.in_backward = isinstance(self.optimizer, InBackwardOptimizer)

    def _resume(self, metrics) -> None:
        cfg = self.cfg
        path = None
        if self.info.is_main:
            path = ckpt.resolve_resume(cfg.resume, self.run_dir)
        path = broadcast_object(str(path) if path else None)
        if path is None:
            if cfg.resume in ("auto",):
                self.say(f"resume=auto: no complete checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
            return
        self._check_resumable_config(Path(path))
        state = ckpt.load(
            Path(path), self.model, optimizers_of(self.optimizer), rank=self.info.rank, world_size=self.info.world_size
        )
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        metrics.truncate_after(self.step)
        self.last_checkpoint = Path(path)
        self.say(f"resumed from {path} at step {self.step}")

    def _config_tree(self) -> Optional[Dict[str, Any]]:
        from omegaconf import OmegaConf

        if not OmegaConf.is_config(self.cfg):
            return None
        return OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)

    def _check_resumable_config(self, path: Path) -> None:
        """Every rank reads the manifest and decides alike, so a refusal never leaves a rank waiting."""
        saved, now = ckpt.read_manifest(path).get("config"), self._config_tree()
        if saved is None or now is None:
            return
        changes = ckpt.config_changes(saved, now)
        if not changes:
            return
        listing = "\n  ".join(changes)
        if not self.cfg.get("resume_force", False):
            raise LlmxError(f"resume from {path}: this run's config differs from the checkpoint's in settings "
                            f"that change the run:\n  {listing}\nRun with the checkpoint's values, or add "
                            f"resume_force=true to go on with the new ones.")
        self.say(f"resume_force=true: continuing with settings that differ from the checkpoint's:\n  {listing}")

    # ------------------------------------------------------------------ pieces
    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(f"llmx: {msg}", flush=True)

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict()}
        path = ckpt.save(
            self.run_dir / "checkpoints",
            self.step,
            self.model,
            optimizers_of(self.optimizer),
            state,
            rank=self.info.rank,
            world_size=self.info.world_size,
            keep_last=self.cfg.trainer.keep_last,
            extra_manifest={"name": self.cfg.name, "tokens_seen": self.tokens_seen, "config": self._config_tree()},
        )
        self.last_checkpoint = path
        return path

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        from llmx.data import eval_batches

        t = self.cfg.trainer
        fn = self.eval_batches_fn or eval_batches
        batches = list(fn(self.val_data, micro_batch_size=t.micro_batch_size, rank=self.info.rank,
                          world_size=self.info.world_size, max_batches=t.eval_batches))
        # Every rank must run the same number of forwards (FSDP all-gathers inside each): a rank with fewer
        # batches repeats a batch and ignores its loss, so no block is dropped to even the ranks out.
        n_batches = torch.tensor(len(batches))
        if self.info.distributed:
            torch.distributed.all_reduce(n_batches, op=torch.distributed.ReduceOp.MAX)
        if int(n_batches) == 0:
            raise LlmxError("evaluation has no held-out data: check data.val_fraction / data.val_paths")
        filler = batches[-1] if batches else next(iter(fn(self.val_data, micro_batch_size=1, max_batches=1)))
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        count = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for i in range(int(n_batches)):
            mb = batches[i] if i < len(batches) else filler
            with self.autocast():
                loss = self.loss_fn(self.model, to_device(mb, self.info.device)).double()
            if i < len(batches):
                total += loss
                count += count_targets(mb)
        self.model.train()
        all_reduce_sum(total)
        all_reduce_sum(count)
        val_loss = float(total / count)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _stop_requested(self, stop: StopSignal) -> Optional[int]:
        flag = torch.tensor(stop.signum or 0)
        if self.info.distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag) or None

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, Any]:
        from llmx.logging.metrics import MetricsLogger
        from llmx.logging.progress import Progress

        cfg, t = self.cfg, self.cfg.trainer
        self._setup()
        metrics = MetricsLogger(self.run_dir, cfg, enabled=self.info.is_main)
        try:
            self._resume(metrics)
            show_bar = self.info.is_main and cfg.logger.progress
            with StopSignal() as stop, Progress(t.max_steps, start_step=self.step, enabled=show_bar) as bar:
                return self._loop(metrics, bar, stop)
        finally:
            metrics.close()

    def _loop(self, metrics, bar, stop: StopSignal) -> Dict[str, Any]:
        t, o = self.cfg.trainer, self.cfg.optim
        info, device = self.info, self.info.device
        params = [p for p in self.model.parameters() if p.requires_grad]
        # This process's tokens and time only: after a resume, tokens_seen also counts the steps before it.
        window_tokens, window_time, train_time, run_tokens = 0, 0.0, 0.0, 0
        loss_value, grad_norm = float("nan"), None
        val: Dict[str, float] = {}
        start_wall = time.time()

        while self.step < t.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(self.step, base_lr=o.lr, max_steps=t.max_steps, warmup_steps=o.warmup_steps,
                       schedule=str(getattr(o.schedule, "value", o.schedule)), min_lr_ratio=o.min_lr_ratio)
            set_lr(self.optimizer, lr)
            micro = self.loader.next_step()
            n_targets = all_reduce_sum(torch.tensor(sum(count_targets(mb) for mb in micro), dtype=torch.float64))
            scale = info.world_size / float(n_targets)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, mb in enumerate(micro):
                last = i == len(micro) - 1
                if info.distributed:
                    # Reduce-scatter once per step, on the last micro-batch, not after every backward.
                    self.model.set_requires_gradient_sync(last)
                if self.in_backward:
                    self.optimizer.last_micro_batch = last
                with self.autocast():
                    loss = self.loss_fn(self.model, to_device(mb, device))
                (loss * scale).backward()
                loss_sum += loss.detach().double()
            loss_value = float(all_reduce_sum(loss_sum) / n_targets)
            if t.detect_nan and not math.isfinite(loss_value):
                raise NonFiniteLoss(self._nan_message(loss_value, lr))
            if not self.in_backward:
                if o.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                    if t.detect_nan and not math.isfinite(grad_norm):
                        raise NonFiniteLoss(self._nan_message(loss_value, lr, what=f"gradient norm is {grad_norm}"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_tokens = sum(count_inputs(mb) for mb in micro) * info.world_size
            self.tokens_seen += step_tokens
            self.step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            window_tokens += step_tokens
            run_tokens += step_tokens
            window_time += dt
            train_time += dt
            tps = window_tokens / window_time if window_time > 0 else 0.0
            bar.update(self.step, loss=loss_value, tokens_per_s=tps)

            if self.step % t.log_every == 0 or self.step == t.max_steps:
                row = {"loss": loss_value, "lr": lr, "tokens_per_s": tps, "tokens_seen": self.tokens_seen,
                       "step_time_s": window_time / max(1, t.log_every), "peak_mem_mb": peak_memory_mb(device)}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if self.step_metrics is not None:
                    row.update(self.step_metrics())
                metrics.log(self.step, row)
                window_tokens, window_time = 0, 0.0
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                val = self.evaluate()
                metrics.log(self.step, val)
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.max_steps:
                self.save_checkpoint()
            if t.max_seconds and time.time() - start_wall > t.max_seconds and self.step < t.max_steps:
                stop.signum = stop.signum or signal.SIGUSR2
            if _STEP_SLEEP:
                time.sleep(_STEP_SLEEP)
            if self.step == _KILL_AT_STEP:  # fault injection for the resume tests: die like a lost node
                os.kill(os.getpid(), signal.SIGKILL)
            signum = self._stop_requested(stop)
            if signum and self.step < t.max_steps:
                path = self.save_checkpoint()
                raise RunInterrupted(
                    f"stopped by {signal.Signals(signum).name} after step {self.step}/{t.max_steps}; "
                    f"checkpoint written to {path}. Resume with the same command plus resume=auto "
                    f"(or resume={path}).",
                    signum,
                )

        val = self.evaluate()
        metrics.log(self.step, val)
        final = {
            "step": self.step,
            "train_loss": loss_value,
            **val,
            "tokens_seen": self.tokens_seen,
            "train_time_s": train_time,
            "tokens_per_s": (run_tokens / train_time) if train_time > 0 else None,
            "peak_mem_mb": peak_memory_mb(device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "world_size": info.world_size,
        }
        if t.save_final:
            final["checkpoint"] = str(self.save_checkpoint())
        if t.export_hf:
            final["hf_dir"] = str(self.export_hf(self.run_dir / "hf"))
        metrics.log_final(final)
        return final

    def _nan_message(self, loss: float, lr: float, what: Optional[str] = None) -> str:
        where = f"The last good checkpoint is {self.last_checkpoint} (resume={self.last_checkpoint})" if self.last_checkpoint \
            else "No checkpoint was written before it"
        return (f"{what or f'loss is {loss}'} at step {self.step + 1} (lr {lr:.3g}); stopping before the optimizer "
                f"step. {where}. Try a lower optim.lr, more optim.warmup_steps or optim.grad_clip.")

    def export_hf(self, out_dir: Path) -> Optional[Path]:
        """Write a transformers-loadable copy (rank 0 writes; collective under FSDP)."""
        from llmx.models import export_hf, export_hf_from_state_dict

        if self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.info.is_main:
                export_hf_from_state_dict(sd, self.hf_config, self.tokenizer, out_dir)
            barrier()
        else:
            export_hf(self.model, self.tokenizer, out_dir)
        return out_dir
