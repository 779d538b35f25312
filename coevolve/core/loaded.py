"""The models a step holds in memory, so that it reads each model folder once.

A step's phases used to load their models each for itself: the e-step read the policy to sample, again
to train and again to select, the RM to score and again to select, and read back every checkpoint it
had just written. Here the policy that sampled is the start DPO trains a copy of, DPO's reference (a
copy too, when it is the iteration's start) and selection's baseline; the RM that scored serves the
whole step; and a checkpoint the step writes is kept as the weights it wrote, for selection and
measurement.

`StepRun` makes one `Loaded` current for the length of a step (`begin_step`, `current`). Outside a
step (tests, benches) each use gets one of its own, dropped after it. Under several processes nothing
is kept between uses: ZeRO-3 partitions the trainers' models, and a model kept whole beside training
would cost every GPU its memory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from coevolve.core import distributed
from coevolve.core.config import Config
from coevolve.core.models import device_of, dtype_of, load_policy, load_rm, whole_weights

_current: list[Loaded] = []


class Loaded:
    """Models and checkpoint weights by the folder they were read from or written to. Callers share a
    model handed out by `policy` or `rm` and do not change it; one that changes its weights takes it
    (`take_policy`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._models: dict[tuple[str, str], tuple] = {}
        self._weights: dict[str, dict[str, torch.Tensor]] = {}

    def policy(self, path: Path):
        """The policy saved at `path` and its tokenizer, to sample from (eval mode, `policy.dtype`)."""
        key = (_key(path), "policy")
        if key not in self._models:
            self._models[key] = load_policy(path, self.cfg)
        return self._models[key]

    def rm(self, path: Path):
        """The RM saved at `path` and its tokenizer, to score with (eval mode, `rm.dtype`)."""
        key = (_key(path), "rm")
        if key not in self._models:
            self._models[key] = load_rm(path, self.cfg)
        return self._models[key]

    def take_policy(self, path: Path):
        """The policy at `path`, for a caller that copies other weights into it: no longer kept."""
        return self._models.pop((_key(path), "policy"), None) or load_policy(path, self.cfg)

    def copy_of(self, path: Path, role: str, dtype: torch.dtype):
        """A copy of the kept `role` ("policy" or "rm") model of `path` in `dtype`, for a trainer to train
        or to prepare as its reference (which may wrap its forward), or None where none is kept in that
        dtype: the caller reads the folder. A cast copy would not do: `.to(bf16)` casts the rotary
        frequencies too, which `from_pretrained` keeps in float32."""
        kept = self._models.get((_key(path), role))
        if kept is None or kept[0].dtype != dtype or _new_head(kept[0], role):
            return None
        return copy.deepcopy(kept[0])

    def weights(self, path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights of the policy checkpoint at `path`, to copy into a model in `dtype`: those this
        step wrote there where kept, else read on the CPU (only one copy of them is ever on the GPU)."""
        kept = self._weights.get(_key(path))
        if kept is not None:
            return kept
        with whole_weights():
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()

    def wrote_policy(self, path: Path, weights: dict[str, torch.Tensor]) -> None:
        """A policy checkpoint this step wrote at `path`, kept on the CPU in `policy.dtype`: as `weights`
        reads the file (a cast of the same values; the file holds no rotary frequencies)."""
        dtype = dtype_of(self.cfg.policy.dtype, device_of(self.cfg))
        self._weights[_key(path)] = {k: v.to("cpu", dtype, copy=True) for k, v in weights.items()}

    def wrote_rm(self, path: Path, model, tok) -> None:
        """An RM this step trained and wrote at `path` (unwrapped from its trainer's mixed precision),
        kept to score with where it is in `rm.dtype` (else the next use reads the file)."""
        plain = not hasattr(model, "peft_config")  # under LoRA the file holds the merged model
        if plain and model.dtype == dtype_of(self.cfg.rm.dtype, device_of(self.cfg)):
            self._models[(_key(path), "rm")] = (model.eval(), tok)

    def clear(self) -> None:
        self._models, self._weights = {}, {}

    def moved(self, old: Path, new: Path) -> None:
        """Folders under `old` are now under `new` (a phase's output renamed into place)."""
        old_key, new_key = _key(old), _key(new)

        def moved_key(key: str) -> str:
            return new_key + key[len(old_key) :] if key == old_key or key.startswith(old_key + os.sep) else key

        self._models = {(moved_key(k), role): m for (k, role), m in self._models.items()}
        self._weights = {moved_key(k): w for k, w in self._weights.items()}


def copy_of(path: Path, role: str, dtype: torch.dtype):
    """`Loaded.copy_of` of the step's models; None outside a step of one process."""
    return _current[-1].copy_of(path, role, dtype) if keeps() else None


def wrote_policy(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """`Loaded.wrote_policy` of the step's models (a candidate checkpoint of its training)."""
    if keeps():
        _current[-1].wrote_policy(path, weights)


def wrote_rm(path: Path, model, tok) -> None:
    """`Loaded.wrote_rm` of the step's models (the RM its training saved)."""
    if keeps():
        _current[-1].wrote_rm(path, model, tok)


def keeps() -> bool:
    """Whether models are kept between uses: in a step of one process (see the module's docstring)."""
    return bool(_current) and distributed.world_size() == 1


def begin_step(cfg: Config) -> Loaded:
    """The step's models, current until `end_step`."""
    loaded = Loaded(cfg)
    _current.append(loaded)
    return loaded


def end_step(loaded: Loaded) -> None:
    _current.remove(loaded)
    loaded.clear()
    _release_gpu_memory()


@contextmanager
def current(cfg: Config) -> Iterator[Loaded]:
    """The step's models where one of one process runs; else models of this use only, freed after it."""
    if keeps():
        yield _current[-1]
        return
    loaded = Loaded(cfg)
    try:
        yield loaded
    finally:
        loaded.clear()
        _release_gpu_memory()


def _new_head(model, role: str) -> bool:
    """Whether loading gave the model a score head its folder lacks (an RM from a causal LM): a random
    one, which a trainer draws anew after seeding, so a copy of this one would train differently."""
    return role == "rm" and not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or [])


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _release_gpu_memory() -> None:
    """Hand the cached blocks of the models just deleted back to the driver, for the next model or
    another process on the GPU. The models and backends hold no reference cycles, so the `del` freed
    them (tests/test_steps.py checks); a full `gc.collect` cost ~0.3 s a model on the GPU machine."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
