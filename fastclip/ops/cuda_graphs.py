"""CUDA graphs for small batches: replay a model's whole forward as one launch.

At batch 1 to a few dozen, CLIP's towers spend more time launching kernels (a dozen or more
per block) than computing. A CUDA graph records those launches once and replays them with
one call. ``enable_cuda_graphs(model)`` makes ``model.encode_image`` and ``model.encode_text``
(and so ``model(image, text)``) replay graphs.

The static-shape rules, which every CUDA graph imposes:

1. Batch sizes are fixed per graph. A graph is captured, on first use, for each batch size in
   ``batch_sizes``; a batch is padded with zeros up to the smallest of them that holds it and
   the padding rows are dropped from the result (rows never interact in eval mode). Batches
   larger than the largest size run without a graph: their launch overhead is already small
   next to their compute.
2. Everything else is fixed per graph too: the image resolution or token length, the dtype,
   the device. A new trailing shape or dtype captures a new graph (its first call is slow).
3. Memory addresses are fixed. The weights must stay where they were at capture: after
   ``model.to(...)``, ``convert_weights``, ``set_backend`` or assigning new parameters, call
   ``enable_cuda_graphs`` again (it captures afresh). In-place updates such as
   ``load_state_dict`` (which copies into the existing tensors) are seen by later replays.
4. Results are copies, so a later call never overwrites what an earlier one returned.
5. Inference only: graphs are captured and replayed under ``torch.no_grad()``, with the
   model in eval mode. A wrapper is not thread-safe: its input buffers are shared by calls.
"""

import torch

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def captured_batch_size(batch, batch_sizes):
    """The smallest captured size that holds ``batch``, or None to run without a graph."""
    fitting = [size for size in batch_sizes if size >= batch]
    return min(fitting) if fitting else None


class CUDAGraphed:
    """``fn(x, **options)`` replayed from CUDA graphs keyed by (padded batch size, trailing
    shape, dtype, options).

    ``fn`` maps a batch (its first dimension) to a batch of results, row by row; ``options``
    are keyword arguments of plain values (``normalize=True``), each set captured apart.
    """

    def __init__(self, fn, device, batch_sizes=DEFAULT_BATCH_SIZES):
        if not batch_sizes or any(int(size) < 1 for size in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}.")
        self.fn = fn
        self.device = torch.device(device)
        self.batch_sizes = tuple(sorted({int(size) for size in batch_sizes}))
        self.graphs = {}  # key -> (graph, static input, static output)

    @torch.no_grad()
    def __call__(self, x, **options):
        size = captured_batch_size(x.shape[0], self.batch_sizes)
        if size is None:
            return self.fn(x.to(self.device), **options)
        key = (size, tuple(x.shape[1:]), x.dtype, tuple(sorted(options.items())))
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, x.shape[1:], x.dtype, options)
        graph, static_input, static_output = self.graphs[key]
        batch = x.shape[0]
        # The static buffers are captured under inference_mode, whatever mode the first
        # caller was in, so they are written under it too; the clone returned outside it is
        # an ordinary tensor (callers may normalize it in place). Replayed on the model's
        # GPU, whichever one is current.
        with torch.inference_mode(), torch.cuda.device(self.device):
            static_input[:batch].copy_(x)
            static_input[batch:].zero_()
            graph.replay()
        return static_output[:batch].clone()

    def _capture(self, size, shape, dtype, options):
        # Captured on the model's GPU: capturing on another device's stream records nothing
        # of the model's kernels, and its replays would return stale outputs.
        with torch.inference_mode(), torch.cuda.device(self.device):
            static_input = torch.zeros(size, *shape, dtype=dtype, device=self.device)
            # Warm up on a side stream, as PyTorch requires: this compiles the Triton kernels
            # and creates cuBLAS workspaces, which must not happen during capture.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.fn(static_input, **options)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.fn(static_input, **options)
        return graph, static_input, static_output


def enable_cuda_graphs(model, batch_sizes=DEFAULT_BATCH_SIZES):
    """Make ``model.encode_image`` and ``model.encode_text`` replay CUDA graphs for batches up
    to ``max(batch_sizes)``; see this module's docstring for the static-shape rules.

    The model must be on a CUDA device and is put in eval mode. Calling this again (after
    moving or converting the model) discards the old graphs. Returns the model.
    """
    device = model.logit_scale.device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}. "
                         "Move it with model.to('cuda') first, or run without CUDA graphs.")
    disable_cuda_graphs(model)
    model.eval()
    model.encode_image = CUDAGraphed(model.encode_image, device, batch_sizes)
    model.encode_text = CUDAGraphed(model.encode_text, device, batch_sizes)
    return model


def disable_cuda_graphs(model):
    """Undo ``enable_cuda_graphs``: the model runs its plain methods again. Returns it."""
    for name in ("encode_image", "encode_text"):
        if isinstance(model.__dict__.get(name), CUDAGraphed):
            del model.__dict__[name]
    return model
