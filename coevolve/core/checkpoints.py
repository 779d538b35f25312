"""Checkpoints of a training run written in the background, for model selection to choose from.

The trainers' own checkpointing writes on the training's path: ~2.5 s for each fp32 checkpoint of a
0.5B model on an H200, 7.6 s of a 50 s iteration (bench/RESULTS.md, 2026-12-02). Here the training
stops only to copy the weights to host memory; a thread writes them while it goes on.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import TrainerCallback

from coevolve.core import io_timing

log = logging.getLogger("coevolve")


class BackgroundCheckpoints(TrainerCallback):
    """`folder/checkpoint-N` every `every` optimizer steps, and at the end (`finish`): the model as
    `save_pretrained` writes it (adapters only, under LoRA) with the trainer's tokenizer. Every process
    takes part (ZeRO-3 gathers the weights); the main one writes, and holds a copy of the weights in host
    memory from the first checkpoint to `finish` (the trained dtype: 4 bytes a parameter in fp32)."""

    def __init__(self, trainer, folder: Path, every: int):
        self.trainer, self.folder, self.every = trainer, folder, every
        self.saved: set[int] = set()
        self.writing: Future | None = None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
        # Host copies of the weights, reused by each checkpoint once the last one's write has ended.
        self.buffers: dict[str, torch.Tensor] = {}
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
        state = trainer.accelerator.get_state_dict(trainer.deepspeed) if trainer.is_deepspeed_enabled else model.state_dict()
        if not trainer.is_world_process_zero():
            return
        if _is_peft(model):  # only the adapters (and heads trained in full) are saved
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            state = {name: tensor for name, tensor in state.items() if name in trained}
        gathered = time.perf_counter() - start
        self._wait()
        start = time.perf_counter()
        host = self._host_copy(state)
        self.writing = self.writer.submit(self._write, model, host, self.folder / f"checkpoint-{step}")
        copied = gathered + time.perf_counter() - start
        self.seconds["copy"] += copied
        io_timing.charge("save", copied)

    def _host_copy(self, state: dict) -> dict:
        """The weights in the host buffers. Not pinned: pinning 2 GB took longer than the copies it
        sped up, for the few checkpoints of a step (bench/RESULTS.md, 2026-12-02 04:28). Tied weights
        share storage, and their copies must too, or save_pretrained writes both."""
        host, copies = {}, {}
        for name, tensor in state.items():
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
            if key not in copies:
                if name not in self.buffers:
                    self.buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype)
                copies[key] = self.buffers[name].copy_(tensor.detach())
            host[name] = copies[key]
        return host

    def _write(self, model, host: dict, path: Path) -> None:
        model.save_pretrained(path, state_dict=host)
        self.trainer.processing_class.save_pretrained(path)

    def finish(self) -> None:
        """The last step's checkpoint too, and every write ended (a failed one raises here)."""
        self.save(self.trainer.state.global_step)
        self._wait()
        self.writer.shutdown()
        self.buffers = {}
        if self.trainer.is_world_process_zero():
            log.info(f"checkpoints: {len(self.saved)} written in the background; the training waited {self.seconds['copy']:.1f}s "
                     f"for copies to host memory and {self.seconds['wait']:.1f}s for writes")

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


def _is_peft(model) -> bool:
    try:  # peft comes with `coevolve[lora]` only; without it no model is a peft one
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
