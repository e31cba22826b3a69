"""A whole training step captured once in a CUDA graph and replayed (``python -m m2f.train --cuda-graph``).

``GraphStep(step_fn, device)`` takes a function that runs one complete step on its input
tensors (forward, loss, backward, clipping, optimizer step) and returns a dict of output
tensors (the losses). Each call ``graph_step(inputs, key)`` passes host or device tensors:

1. they are copied into static device buffers (from pinned memory, without blocking);
2. the first ``warmup`` calls run ``step_fn`` eagerly on a side stream: real training
   steps, in which everything that happens once happens outside the capture (cuBLAS and
   cuDNN workspaces, Triton autotuning and compilation, torch.compile, the optimizer's
   moments);
3. the next call captures ``step_fn`` into a CUDA graph (capturing runs nothing) and
   replays it; every later call only replays it: one launch for the whole step, no
   Python, no host sync. The outputs are copies of the graph's static output tensors.

What forces a re-capture (the call goes back to step 2, then 3):

- another input signature: the shape or dtype of any input (another crop or batch size,
  another number of target slots per image);
- another ``key``: the caller names what the graph depends on besides the inputs. In
  ``m2f.train`` it holds the AMP dtype, the kernels mode, the identity of the optimizer's
  lr tensors (a schedule that assigns new lr objects instead of filling the captured
  tensors in place) and of its state (``load_state_dict`` replaces the moment tensors);
- ``invalidate()``.

A re-capture costs ``warmup`` eager steps (each the eager step's time, plus compilation if
the new shapes need it) and one capture (about one eager step of host time, no GPU work),
and the new graph's private memory pool: the old pool is freed once the old graph, its
outputs and the gradients it allocated are gone (the warm-up drops the gradients), so
peak memory stays about one step's.

What a graph freezes without noticing (never change these between replays): Python values
read during capture (a float lr, the clipping norm, loss weights, any branch taken), and
the addresses of parameters, gradients and optimizer state (``model.load_state_dict``
copies in place and is fine; replacing a parameter or ``optimizer.load_state_dict`` is not,
unless the key changes). Random numbers: generators passed as ``generators`` (and the
default CUDA generator) are registered with the graph, so each replay draws new numbers,
the same ones the eager step would draw.

Verified on the CPU only: the refusals (``--cuda-graph`` without CUDA and the option
checks), and the bookkeeping and the CLI wiring with a simulated graph (streams that do
nothing, a "capture" that runs the step): warm-up, capture, replays, re-capture triggers,
the eager run's losses and lrs (tests/test_train.py). A real capture, replay, the loss
agreement with eager steps and the absence of host syncs are ``@pytest.mark.gpu`` tests in
tests/test_train.py that have not run yet: no GPU was available when this was written.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Hashable, Optional, Sequence

import torch

# eager steps before a capture (torch's whole-network example uses 3; one already does all
# one-time initialisation of a fixed-shape step, the second checks it does not recur)
WARMUP_STEPS = 2


class GraphCaptureError(RuntimeError):
    """The step could not be captured (usually a host sync or CPU work inside it)."""


class GraphStep:
    """Warm-up, capture and replay of one training step; see the module docstring.

    ``step_fn(*static_inputs) -> {name: tensor}`` runs the whole step on the static input
    buffers; ``generators`` are the CUDA generators it draws from besides the default one.
    ``captures`` and ``replays`` count what happened.
    """

    def __init__(self, step_fn: Callable[..., Dict[str, torch.Tensor]], device, *, warmup: int = WARMUP_STEPS,
                 generators: Sequence[torch.Generator] = ()):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (the first step initialises lazily), got {warmup}")
        self.step_fn, self.device, self.warmup, self.generators = step_fn, device, warmup, tuple(generators)
        self.captures = self.replays = 0
        self._signature: Optional[Hashable] = None
        self._static: tuple = ()
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._outputs: Optional[Dict[str, torch.Tensor]] = None
        self._warm = 0
        self._side = torch.cuda.Stream(device)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def invalidate(self) -> None:
        """Drop the graph: the next call warms up and captures again."""
        self._graph, self._outputs, self._warm = None, None, 0

    def __call__(self, inputs: Sequence[torch.Tensor], key: Hashable = ()) -> Dict[str, torch.Tensor]:
        signature = (tuple((tuple(x.shape), x.dtype) for x in inputs), key)
        if signature != self._signature:
            self.invalidate()
            self._signature = signature
            self._static = tuple(torch.empty(x.shape, dtype=x.dtype, device=self.device) for x in inputs)
        for buffer, x in zip(self._static, inputs):
            if x.device.type == "cpu" and not x.is_pinned():
                x = x.pin_memory()
            buffer.copy_(x, non_blocking=True)
        if self._warm < self.warmup:
            self._warm += 1
            return self._eager()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        self.replays += 1
        return {k: v.clone() for k, v in self._outputs.items()}

    def _eager(self) -> Dict[str, torch.Tensor]:
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            outputs = self.step_fn(*self._static)
        main.wait_stream(self._side)
        return outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        try:
            with torch.cuda.graph(graph):
                outputs = self.step_fn(*self._static)
        except Exception as e:  # noqa: BLE001 - any failure inside the capture means the same
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GraphCaptureError(
                f"the training step could not be captured in a CUDA graph: {first} (a host sync or CPU work "
                "inside the step? torch.cuda.set_sync_debug_mode('error') on an eager step finds it)") from e
        self._graph, self._outputs = graph, outputs
        self.captures += 1


def no_autocast_cache(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast for a captured region: without the cast cache (casts made during capture
    must not be reused outside it), or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
