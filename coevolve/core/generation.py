"""Generation backends: every step that samples from a policy goes through `generate`.

A backend turns chat-rendered prompt texts into `n` sampled completions per prompt. `hf` is plain
`model.generate` (the reference); faster backends implement the same `Backend` protocol and are chosen
by `generation.backend` in the config (`auto`: `choose_backend`). What a backend declares, how one is
added, and why `static` is our own engine and not vLLM or SGLang: docs/generation.md.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from coevolve.core.config import ConfigError, GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()
    # Index of the first prompt in the whole list that these prompts are a share of (several processes):
    # `static` keys each sample by its prompt's index there, so a share samples what the whole list would.
    first_prompt: int = 0
    # Also return each completion's token ids and their log-probs under the untempered model (no top-p,
    # no top-k): a DPO reference equal to the sampling policy need not run again. Backends that cannot
    # leave them None.
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generations:
    """`texts[i]` holds the n completions of prompt i; token counts are of the completions. With
    SamplingParams.logprobs (where the backend supports it): the prompts' token ids, the completions'
    token ids as sampled (EOS included when produced) and each token's log-prob, in the same layout."""

    texts: list[list[str]]
    num_tokens: list[list[int]]
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    prompt_ids: list[list[int]] | None = None
    token_ids: list[list[list[int]]] | None = None
    logprobs: list[list[list[float]]] | None = None

    @property
    def tokens_per_s(self) -> float:
        total = sum(sum(row) for row in self.num_tokens)
        return total / self.seconds if self.seconds > 0 else 0.0


class Backend(Protocol):
    # Called with (items done, items in all) as a call goes on; set per call by the caller.
    progress: Callable[[int, int], None] | None
    # Whether `generate` gives SamplingParams.logprobs (the sampled tokens' untempered log-probs), which
    # spare DPO its reference forward (policy/sampled_reference.py); a backend that cannot leaves them None.
    supports_logprobs: ClassVar[bool]

    def __init__(self, model, tokenizer, **settings: Any) -> None: ...

    @staticmethod
    def unsupported_because(model) -> str | None:
        """Why this backend cannot sample `model`, or None."""

    def generate(self, prompts: list[str], params: SamplingParams) -> Generations: ...

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Sample from these weights (another checkpoint of the same model) from the next call on."""

    # Completions as token ids from prompts as token ids: out[i][j] is sample j of prompt i (EOS included
    # when produced); with params.logprobs, where the backend gives them, each token's log-prob; stats.
    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[list[list[list[int]]], list | None, dict]: ...


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


class HFBackend:
    """Reference backend: left-padded batches through `model.generate`, prompts sorted by length so a
    batch wastes little padding. It returns no log-probs (SamplingParams.logprobs is ignored)."""

    supports_logprobs = False

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: Callable[[int, int], None] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress

    @staticmethod
    def unsupported_because(model) -> str | None:
        return None  # any causal LM of transformers

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Generations:
        tok = self.tokenizer
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        start = time.perf_counter()
        tokens, _, _ = self.generate_ids(encoded, params)
        texts = [
            [truncate_at_stop(tok.decode(ids, skip_special_tokens=True).strip(), params.stop) for ids in rows]
            for rows in tokens
        ]
        return Generations(texts, [[len(ids) for ids in rows] for rows in tokens], time.perf_counter() - start)

    @torch.no_grad()
    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[list[list[list[int]]], None, dict]:
        tok = self.tokenizer
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[list[int]]] = [[] for _ in prompts]
        # Seeding once per call makes the whole call reproducible for a seed, whatever the batching.
        torch.manual_seed(params.seed)
        rows_per_batch = max(1, self.batch_size // params.n)
        device = next(self.model.parameters()).device
        for b in range(0, len(order), rows_per_batch):
            idx = order[b : b + rows_per_batch]
            batch = tok.pad({"input_ids": [prompts[i] for i in idx]}, padding_side="left", return_tensors="pt").to(
                device
            )
            generated = self.model.generate(
                **batch,
                do_sample=not params.greedy,
                temperature=params.temperature if not params.greedy else None,
                top_p=params.top_p if not params.greedy else None,
                top_k=params.top_k if not params.greedy else None,
                max_new_tokens=params.max_new_tokens,
                num_return_sequences=params.n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=self.model.generation_config.eos_token_id or tok.eos_token_id,
            )
            completions = generated[:, batch["input_ids"].shape[1] :]
            for row, seq in enumerate(completions):
                ids = (
                    seq[seq != tok.pad_token_id]
                    if tok.pad_token_id != tok.eos_token_id
                    else _until_eos(seq, tok.eos_token_id)
                )
                out[idx[row // params.n]].append(ids.tolist())
            if self.progress:
                self.progress(min(b + rows_per_batch, len(order)), len(order))
        return out, None, {"backend": "hf"}


def _until_eos(seq: torch.Tensor, eos_id: int) -> torch.Tensor:
    hits = (seq == eos_id).nonzero()
    return seq[: int(hits[0]) + 1] if len(hits) else seq


# Registered by name and imported when chosen: a backend imports this module's API, never the
# other way round, and a run pays only for the backend it uses.
BACKENDS = {"hf": "coevolve.core.generation:HFBackend", "static": "coevolve.core.fastgen:StaticGraphBackend"}


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ConfigError(f"generation.backend: unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)


def choose_backend(name: str, model) -> tuple[str, str]:
    """The backend to sample `model` with, and why: `auto` takes `static` on a GPU for the decoders it
    runs (tens of times HF generate's speed, bench/RESULTS.md) and `hf` elsewhere."""
    if name != "auto":
        return name, "generation.backend"
    if model.device.type != "cuda":
        return "hf", "auto: no CUDA"
    why_not = backend_class("static").unsupported_because(model)
    return ("hf", f"auto: {why_not}") if why_not else ("static", "auto")


def with_logprobs() -> list[str]:
    """The backends that give the sampled tokens' log-probs."""
    return [name for name in BACKENDS if backend_class(name).supports_logprobs]


def make_backend(name: str, model, tokenizer, **kwargs) -> Backend:
    return backend_class(name)(model, tokenizer, **kwargs)


def backend_for(cfg: GenerationConfig, model, tokenizer, autocast: torch.dtype | None = None) -> tuple[Backend, str]:
    """The configured backend for `model` with its settings block, and which it is and why (for the log).
    `autocast`: the dtype a trainer runs the model's forward in (accelerate wraps the module's forward,
    so HF generate samples in it as is); the static engine, which reads the weights, computes in it."""
    name, why = choose_backend(cfg.backend, model)
    if name == "static" and hasattr(model, "peft_config"):
        # The static engine reads the plain decoder's tensors: LoRA adapters would be left out.
        name, why = "hf", "LoRA adapters: the static engine reads plain weights"
    settings = getattr(cfg, name).model_dump() if hasattr(cfg, name) else {}
    if name == "static" and autocast is not None:
        settings["dtype"] = autocast
    return make_backend(name, model, tokenizer, batch_size=cfg.batch_size, **settings), f"{name} ({why})"
