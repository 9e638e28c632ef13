"""A patched (or unpatched) model compiled once per batch size by `torch.compile`, with static shapes.

A method whose token counts follow from the input's shape (`MethodConfig.FIXED_SHAPES`: ToMe, EViT,
Zero-TPrune, PiToMe, MCTF, and the unmerged model) compiles to one graph (`fullgraph=True`,
`dynamic=False`), which `mode="reduce-overhead"` replays as a CUDA graph on the GPU: no Python and
no host synchronisation per forward. The batch size is fixed by the first call (or `batch_size`); a
shorter batch, such as a data set's last, is padded with copies of its last image, whose results are
dropped (each image is reduced independently of the others, so the real images' logits and token
counts are those of an unpadded run); a longer one runs eagerly. Nothing recompiles per size.

ATM decides r from the batch's content in every block (one host synchronisation each): its forward
compiles as one graph per block segment, split at that synchronisation. With `token_bucket` > 1 (the
default, 8) each block merges on the device with r a tensor, its output as long as its input, the
real tokens first and padding of size 0 after them (`patch(..., token_bucket)`: the same logits and
trace); the host reads r and cuts the padding to the next multiple of the bucket. Each segment then
depends on (block, padded length) alone: at most depth x (tokens / bucket + 1) graphs, and once the
lengths the data reaches are met, none new. Its short batches run eagerly (padding the batch would
move the batch-adaptive r).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .patching import _STATE

# Every patched view of a model shares the forward's code object, and ATM's segments are resumptions of one
# code object, each (block, length) a cache entry of it: dynamo's default limit (8) would fall back to eager.
VARIANT_LIMIT = 4096
# ATM's tokens are padded to multiples of this in a compiled model: benchmarks/atm_shapes.py --buckets.
TOKEN_BUCKET = 8


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledModel:
    """`compiled(images)` -> logits, as `model(images)` gives them; `last_trace(compiled.model)` is the trace.

    `fixed_shapes`: one graph serves every batch of `batch_size` (else: ATM's per-segment graphs).
    `last_path`: how the last call ran: "compiled", "padded" (compiled, a short batch padded) or "eager".
    `compile_seconds`: wall time of the calls during which something compiled (`last_compiled` says
    whether the last one did), so that a throughput figure can leave them out. `variants`: graphs
    compiled for this model so far.
    """

    def __init__(self, model: Callable[[Tensor], Tensor], mode: str | None = "auto", batch_size: int | None = None,
                 backend: str | Callable = "inductor", token_bucket: int = TOKEN_BUCKET) -> None:
        state = getattr(model, _STATE, None)
        self.model = model
        self.mode = mode
        self.fixed_shapes = state is None or type(state.config).FIXED_SHAPES
        if not self.fixed_shapes:
            state.token_bucket = token_bucket  # the model pads from now on, eager calls too (same results)
        self.batch_size = batch_size
        self.compile_seconds = 0.0
        self.variants = 0
        self.last_path = ""
        self.last_compiled = False
        self._backend = backend
        self._graphs = False  # CUDA graphs: outputs live in buffers the next replay reuses
        self._run: Callable[[Tensor], Tensor] | None = None  # compiled at the first call, for its device

    def _compile_for(self, images: Tensor) -> Callable[[Tensor], Tensor]:
        if self._run is None:
            if self.mode == "auto":  # CUDA graphs on the GPU (a replay needs no host), torch's default elsewhere
                self.mode = "reduce-overhead" if images.is_cuda else None
            self._graphs = self.mode == "reduce-overhead"
            self._run = torch.compile(_own_frame(self.model), fullgraph=self.fixed_shapes, dynamic=False,
                                      mode=self.mode, backend=self._backend)
        return self._run

    def __call__(self, images: Tensor) -> Tensor:
        if self.batch_size is None:
            self.batch_size = images.shape[0]
        n_images = images.shape[0]
        if n_images == self.batch_size:
            self.last_path = "compiled"
            return self._compiled(images)
        if n_images < self.batch_size and self.fixed_shapes:
            self.last_path = "padded"
            padding = images[-1:].expand(self.batch_size - n_images, *images.shape[1:])
            with torch.inference_mode(images.is_inference()):  # the same tensor kind as the batch: no new guard
                padded = torch.cat([images, padding])
            logits = self._compiled(padded)[:n_images]
            self._trim_trace(n_images)
            return logits
        self.last_path, self.last_compiled = "eager", False
        return self.model(images)

    def _compiled(self, images: Tensor) -> Tensor:
        before, start = _graphs_compiled(), time.perf_counter()
        run = self._compile_for(images)
        if self._graphs and images.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        # A host decision deep in the forward breaks the graph: resumed in the frame where it happened (nested
        # graph breaks), not in each frame above it, it splits the forward into half as many graphs, and ATM's
        # compiled forward on the CPU proxy takes 1.5x the compiled unmerged one's time instead of 1.76x.
        with torch._dynamo.config.patch(recompile_limit=VARIANT_LIMIT, accumulated_recompile_limit=VARIANT_LIMIT,
                                        nested_graph_breaks=not self.fixed_shapes):
            logits = run(images)
        if self._graphs:
            logits = logits.clone()
            self._trim_trace(images.shape[0])  # copies the trace's tensors out of the graph's buffers
        compiled = _graphs_compiled() - before
        self.last_compiled = compiled > 0
        if compiled:
            self.variants += compiled
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
            self.compile_seconds += time.perf_counter() - start
        return logits

    def _trim_trace(self, n_images: int) -> None:
        """The trace's per-image tensors for the first `n_images` images only (copies)."""
        state = getattr(self.model, _STATE, None)
        if state is None or state.trace is None:
            return
        trace = state.trace
        state.trace = dataclasses.replace(
            trace, size=None if trace.size is None else trace.size[:n_images].clone(),
            source=None if trace.source is None else trace.source[:n_images].clone())


_FRAMES = itertools.count()


def _own_frame(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """`model` called from a function with a code object of its own.

    Dynamo keeps compiled code per code object, guarded on types and shapes, not on which module
    instance runs: every patched view of a model shares timm's `forward`, and an ATM view, whose
    graph breaks at its host decision, leaves entries there with guards so weak that another view's
    call would run through them, eagerly. A frame per compiled model keeps each model's graphs its own.
    """
    namespace: dict = {}
    source = "def run_model(images):\n    return model(images)\n"
    exec(compile(source, f"<atm compiled model {next(_FRAMES)}>", "exec"), {"model": model}, namespace)
    return namespace["run_model"]


def compile_patched(model: Callable[[Tensor], Tensor], mode: str | None = "auto", batch_size: int | None = None,
                    backend: str | Callable = "inductor", token_bucket: int = TOKEN_BUCKET) -> CompiledModel:
    """Compile `model` as it is patched now (patch it first; unpatched: the unmerged model; or any function of a
    batch, e.g. one block).

    `mode`: torch.compile's; "auto" (default): "reduce-overhead" (CUDA graphs) when the first batch is on a
    GPU, torch's default otherwise. `batch_size`: the compiled batch size (None: the first call's).
    `token_bucket`: a data-dependent method's (ATM's) tokens are padded to multiples of it (1: no padding,
    one graph per distinct (block, tokens, r); else one per (block, padded length)). Patching the model again afterwards needs a new
    `compile_patched`.
    """
    return CompiledModel(model, mode=mode, batch_size=batch_size, backend=backend, token_bucket=token_bucket)
