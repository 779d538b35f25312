"""Checkpoints of a training run written in the background, for model selection to choose from.

The trainers' own checkpointing writes on the training's path: ~2.5 s for each fp32 checkpoint of a
0.5B model on an H200, 7.6 s of a 50 s iteration (bench/RESULTS.md, 2026-12-02). Here the training
stops only to copy the weights to host memory; a thread writes them while it goes on.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from coevolve.core import io_timing


class BackgroundCheckpoints(TrainerCallback):
    """`folder/checkpoint-N` every `every` optimizer steps, and at the end (`finish`): the model as
    `save_pretrained` writes it (adapters only, under LoRA) with the trainer's tokenizer. Every process
    takes part (ZeRO-3 gathers the weights); the main one writes."""

    def __init__(self, trainer, folder: Path, every: int):
        self.trainer, self.folder, self.every = trainer, folder, every
        self.saved: set[int] = set()
        self.writing: Future | None = None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
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
        # One write in flight at most: each holds a copy of the weights in host memory.
        self._wait()
        host, copies = {}, {}
        for name, tensor in state.items():
            # Tied weights share storage; their copies must too, or save_pretrained writes both.
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
            if key not in copies:
                copies[key] = tensor.detach().to("cpu", copy=True)
            host[name] = copies[key]
        self.writing = self.writer.submit(self._write, model, host, self.folder / f"checkpoint-{step}")
        io_timing.charge("save", time.perf_counter() - start)

    def _write(self, model, host: dict, path: Path) -> None:
        model.save_pretrained(path, state_dict=host)
        self.trainer.processing_class.save_pretrained(path)

    def finish(self) -> None:
        """The last step's checkpoint too, and every write ended (a failed one raises here)."""
        self.save(self.trainer.state.global_step)
        self._wait()
        self.writer.shutdown()

    def _wait(self) -> None:
        if self.writing is not None:
            start = time.perf_counter()
            try:
                self.writing.result()
            finally:
                self.writing = None
                io_timing.charge("save", time.perf_counter() - start, calls=0)


def _is_peft(model) -> bool:
    try:  # peft comes with `coevolve[lora]` only; without it no model is a peft one
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
