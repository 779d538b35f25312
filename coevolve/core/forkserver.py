"""Step processes forked from a server that imported torch, transformers, trl, datasets and the step
modules once (multiprocessing's forkserver), instead of fresh interpreters that import them again.

Each step is still its own process, with its own CUDA context, memory and exit code: only the imports
are shared. They cost ~10 s per step on 2 CPU cores, and 15-20 s per step on the GPU machine with
several runs sharing it, where they were half of a sandbox run's wall time. The server itself never
touches CUDA: forked children could not use it otherwise. `launch.preload: false` turns this off.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

_context = None


def _server():
    global _context
    if _context is None:
        from coevolve.cli import STEPS

        # torch's CUDA availability check through NVML leaves the server free of a CUDA driver state
        # that its forked children would inherit.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["coevolve.cli", *STEPS.values()])
    return _context


def _child(argv: list[str], env: dict[str, str], out) -> None:
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    # Line-buffered, as the unbuffered fresh interpreter was: lines must reach the caller as they come.
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    from coevolve.cli import main

    sys.argv = ["coevolve", *argv]
    main(argv)


class ForkedStep:
    """`coevolve ARGV` in a process forked from the server, with the part of `subprocess.Popen`'s
    interface that `launch.run_process` uses: `stdout` (text, stderr merged), poll, wait, terminate, kill."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        ctx = _server()
        read, write = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(argv, env, write), name=f"coevolve {' '.join(argv[:2])}")
        self._proc.start()
        write.close()  # ours: the child holds the only write end, so its exit ends the stream
        self.stdout = os.fdopen(os.dup(read.fileno()), "r", errors="replace")
        read.close()
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"coevolve (pid {self.pid})", timeout)
        return self._proc.exitcode

    def terminate(self) -> None:
        self._proc.terminate()

    def kill(self) -> None:
        self._proc.kill()
