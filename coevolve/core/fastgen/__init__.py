"""The "static" generation backend: a hand-run Llama/Qwen2 decoder with a slot KV cache, decode steps
replayed as CUDA graphs, continuous batching and sampling on the device. See backend.py."""

from .backend import StaticGraphBackend
from .model import UnsupportedModel

__all__ = ["StaticGraphBackend", "UnsupportedModel"]
