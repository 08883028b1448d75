"""How each op of CLIP's blocks is computed.

- ``dispatch``: the one place that decides which implementation runs (:class:`Backend`);
- ``reference``: OpenAI's math in plain PyTorch, what every kernel is tested against;
- ``torch_backend`` and ``cpu_linear``: the ``torch`` backend and its CPU fast path;
- ``attention_pool``: the single-query attention pooling, compiled (``fastclip._C``) or not;
- ``triton_autograd``: the backward passes of the Triton kernels (``fastclip.kernels``);
- ``cuda_graphs``: whole-forward replay for small batches;
- ``extension``: the one loader of ``fastclip._C``.

The model imports only ``dispatch``; nothing here imports the model.
"""

from .dispatch import BACKEND_NAMES, REFERENCE, TORCH, Backend, get_backend

__all__ = ["BACKEND_NAMES", "REFERENCE", "TORCH", "Backend", "get_backend"]
