"""Checkpoints of a training run written in the background, for model selection to choose from.

The trainers' own checkpointing writes on the training's path: ~2.5 s for each fp32 checkpoint of a
0.5B model on an H200, 7.6 s of a 50 s iteration (bench/RESULTS.md, 2026-12-02). Here the training
stops only to snapshot the weights; a thread copies them to host memory and writes them while it goes on.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import TrainerCallback

from coevolve.core import io_timing, loaded

log = logging.getLogger("coevolve")


class BackgroundCheckpoints(TrainerCallback):
    """`folder/checkpoint-N` every `every` optimizer steps, and at the end (`finish`): the model as
    `save_pretrained` writes it (adapters only, under LoRA) with the trainer's tokenizer. Every process
    takes part (ZeRO-3 gathers the weights); the main one writes, and holds a snapshot of the weights
    from the first checkpoint to `finish` (in the trained dtype: 4 bytes a parameter in fp32), on the
    GPU where it has room for it (`_snapshot_device`), and then a host copy as well."""

    def __init__(self, trainer, folder: Path, every: int):
        self.trainer, self.folder, self.every = trainer, folder, every
        self.saved: set[int] = set()
        self.writing: Future | None = None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
        # The snapshot's buffers (on `where`) and, for one on the GPU, the host copy's; each checkpoint
        # reuses them once the last one's write has ended.
        self.where: torch.device | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.host_buffers: dict[str, torch.Tensor] = {}
        self.seconds = {"copy": 0.0, "wait": 0.0}
        trainer.add_callback(self)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.save(state.global_step)

    def save(self, step: int) -> None:
        if step in self.saved:
            return
        self.saved.add(step)
        trainer = self.trainer
        start = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        # As the trainer saves: under DeepSpeed every process joins in gathering the weights.
        state = (
            trainer.accelerator.get_state_dict(trainer.deepspeed)
            if trainer.is_deepspeed_enabled
            else model.state_dict()
        )
        if not trainer.is_world_process_zero():
            return
        if _is_peft(model):  # only the adapters (and heads trained in full) are saved
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            state = {name: tensor for name, tensor in state.items() if name in trained}
        gathered = time.perf_counter() - start
        self._wait()
        start = time.perf_counter()
        if self.where is None:
            self.where = _snapshot_device(state)
        snapshot = _copy_into(self.buffers, state, self.where)
        ready = None
        if self.where.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.writing = self.writer.submit(
            self._write, model, snapshot, ready, self.folder / f"checkpoint-{step}", not _is_peft(model)
        )
        copied = gathered + time.perf_counter() - start
        self.seconds["copy"] += copied
        io_timing.charge("save", copied)

    def _write(self, model, snapshot: dict, ready, path: Path, whole: bool) -> None:
        if ready is not None:  # a snapshot on the GPU: copied to host memory on a stream of its own, beside training
            stream = torch.cuda.Stream(self.where)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                snapshot = _copy_into(self.host_buffers, snapshot, torch.device("cpu"))
        # Model selection samples each candidate from these, not from the file (adapters: merged later).
        # Kept before the write, which drops the names of tied weights from the dict it is given.
        if whole:
            loaded.wrote_policy(path, snapshot)
        model.save_pretrained(path, state_dict=snapshot)
        self.trainer.processing_class.save_pretrained(path)

    def finish(self) -> None:
        """The last step's checkpoint too, and every write ended (a failed one raises here)."""
        self.save(self.trainer.state.global_step)
        self._wait()
        self.writer.shutdown()
        self.buffers, self.host_buffers = {}, {}
        if self.trainer.is_world_process_zero():
            memory = "GPU" if self.where is not None and self.where.type == "cuda" else "host"
            log.info(
                f"checkpoints: {len(self.saved)} written in the background; the training waited {self.seconds['copy']:.1f}s "
                f"for snapshots of the weights (in {memory} memory) and {self.seconds['wait']:.1f}s for writes"
            )

    def _wait(self) -> None:
        if self.writing is not None:
            start = time.perf_counter()
            try:
                self.writing.result()
            finally:
                self.writing = None
                waited = time.perf_counter() - start
                self.seconds["wait"] += waited
                io_timing.charge("save", waited, calls=0)


def _snapshot_device(state: dict) -> torch.device:
    """Where the snapshots go: the GPU the weights are on, while its free memory holds two copies of
    them (the training's own use has peaked by the first checkpoint): a device-to-device copy, which
    the training hardly waits for. Else host memory, which the training waits to fill (~1 s a
    checkpoint for a 0.5B model's fp32 weights on an H200, bench/RESULTS.md 2026-12-02)."""
    device = next(iter(state.values())).device
    if device.type != "cuda":
        return torch.device("cpu")
    needed = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    return device if torch.cuda.mem_get_info(device)[0] > 2 * needed else torch.device("cpu")


def _copy_into(buffers: dict, state: dict, device: torch.device) -> dict:
    """`state` copied into `buffers` on `device`, made on first use. Tensors that share storage (tied
    weights) share their copy, or save_pretrained would write both. Host buffers are not pinned:
    pinning 2 GB took longer than the copies it sped up, for the few checkpoints of a step
    (bench/RESULTS.md, 2026-12-02 04:28)."""
    out, copies = {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in copies:
            if name not in buffers:
                buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            copies[key] = buffers[name].copy_(tensor.detach())
        out[name] = copies[key]
    return out


def _is_peft(model) -> bool:
    try:  # peft comes with `coevolve[lora]` only; without it no model is a peft one
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
