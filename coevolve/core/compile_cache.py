"""torch.compile's caches (`train.compile`) in one folder that every step process of every run on the
machine reads and writes, so that a shape compiled once (by the first e-step on the machine) is loaded, not
compiled, by every later step process: the next e-step of the run, its m-steps, later runs.

The folder (`launch.compile_cache`) holds Inductor's cache (`inductor/`: the FX graph cache, AOTAutograd's
cache, autotuning results, dynamo's record of which dimensions turned out dynamic) and Triton's (`triton/`:
compiled kernels, ours in core/fastgen included). `use()` points torch at it in the step process, before
anything compiles (core/step.py, `StepRun.__enter__`): every launcher's processes run `coevolve step`, so
each rank of an accelerate or deepspeed launch sets it for itself. Inductor and Triton key every entry by
the torch or Triton version, the graph and the device, so one folder serves every model, torch build and
GPU; deleting it only costs the next step process a cold compile."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Lengths padded to a multiple of this when compiled: a few shapes to compile instead of one per batch.
PAD_MULTIPLE = 64
_in_use: Path | None = None


def folder(setting: str | None, env: dict[str, str] | os._Environ = os.environ) -> Path:
    """The cache folder for `launch.compile_cache` (None: under the user's cache folder), absolute."""
    if setting:
        return Path(os.path.abspath(os.path.expanduser(os.path.expandvars(setting))))
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(base)) / "coevolve" / "compile"


def use(root: Path) -> dict[str, str]:
    """Point this process's torch.compile and Triton at `root`; returns the variables set. Inductor's and
    AOTAutograd's disk caches are on by torch's default; a value the user gave them (`=0`, to debug) is kept."""
    global _in_use
    env = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
    os.environ.update(env)
    for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        os.environ.setdefault(name, "1")
    # torch reads those two when it imports its compiler's settings, which the step server has done already
    # (a forked step inherits them): they are set here too. The folders it reads at each use.
    inductor: Any = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.fx_graph_cache = os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
        inductor.autotune_local_cache = True
    functorch: Any = sys.modules.get("torch._functorch.config")
    if functorch is not None:
        functorch.enable_autograd_cache = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    _in_use = root
    return env


def in_use() -> Path | None:
    """The folder `use()` set in this process, if any."""
    return _in_use


def stats() -> dict[str, float | int]:
    """This process's compile time so far (torch's own count: graph capture, AOTAutograd, Inductor, and the
    backward compiled at its first call, whether compiled or loaded from the cache) and Inductor's cache
    hits and misses: with a warm cache, hits and few seconds."""
    from torch._dynamo.utils import counters

    try:
        from torch._dynamo.utils import calculate_time_spent

        seconds = round(calculate_time_spent().get("total_wall_time", 0.0), 2)
    except ImportError:  # a torch without it
        seconds = float("nan")
    return {
        "compile_s": seconds,
        "compile_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "compile_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }
