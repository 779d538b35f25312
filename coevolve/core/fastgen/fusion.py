"""The decode step's small pieces run eagerly or fused by torch.compile.

At the row counts the engine runs (tens to hundreds), a decode step is bound by how many kernels it
launches more than by the bytes it reads: eagerly an RMSNorm is six kernels (its reductions, casts and
weight), rope with its cache writes nine, the sampler's hashed uniform a dozen integer ops. Inductor
makes each such piece one or two kernels (bench/NOTES-generation.md has the counts). The step calls
its pieces through `op(fn)`: `eager` is fn itself, `fused` its compiled form, made once per process and
function with dynamic shapes, so that one compilation serves every row bucket; in a step process
Inductor's caches (launch.compile_cache) keep it for the next process too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.fx.experimental._config as shape_config


def eager(fn: Callable) -> Callable:
    return fn


@functools.cache
def fused(fn: Callable) -> Callable:
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    @functools.wraps(fn)
    def run(*args):
        # Without duck shapes: by default two dimensions of equal size when first compiled (the rows of
        # a step and the cache's slots, when every slot is live) become one symbol, and every later step
        # of fewer rows compiles the piece again.
        with shape_config.patch(use_duck_shape=False):
            return compiled(*args)

    return run
