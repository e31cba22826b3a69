"""Tensors that depend only on what a key names (shapes, device, buffer versions), made once
and reused.

Position embeddings, reference points, level indices and frozen batch norm's scale and bias
are the same every step of a fixed-size training run, and making them costs a few to a
dozen small kernel launches each. A module keeps them in a dict through :func:`cached`.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")


def cached(cache: dict, key: Hashable, build: Callable[[], T], max_entries: int = 8) -> T:
    """``build()``, kept in ``cache`` under ``key`` for the next calls.

    - Under torch.compile it is built on every call: traced into the graph, it costs nothing
      at run time there.
    - Inference-mode tensors are kept apart (they cannot be saved for a backward).
    - Nothing is stored while a CUDA graph is being captured: captured kernels produce values
      only on replay.
    - At most ``max_entries`` keys are kept, the least recently used dropped first (an
      evaluation over images of many sizes).

    The callers never modify what they get in place.
    """
    if torch.compiler.is_compiling():
        return build()
    key = (key, torch.is_inference_mode_enabled())
    value = cache.pop(key, None)
    if value is None:
        value = build()
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return value
        while len(cache) >= max_entries:
            cache.pop(next(iter(cache)))
    cache[key] = value  # (re)inserted last: the most recently used
    return value
