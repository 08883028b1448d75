"""Batch embedding of images and texts into clip-retrieval's layout.

``fastclip.embed.embed(output, images=[...], texts=[...], model=...)`` is the Python API of
``fastclip embed`` (its settings are :class:`EmbedJob`'s fields, and ``run(EmbedJob(...))``
does the same); ``fastclip.embed.ray.ClipEmbedder`` is a callable class for Ray Data's
``map_batches``.

One module per role: ``plan`` (the inputs, cut into chunks), ``reader`` (decoding workers),
``device_decode`` (``--gpu-decode``), ``ranks`` (the job's processes), ``output`` (the output
folder and resume), ``writer`` (the background writer), ``runner`` (the job), ``job`` (its
settings).
"""

from .job import EmbedJob
from .plan import expand_braces, plan_job
from .runner import embed, run, summary_line

__all__ = ["EmbedJob", "embed", "expand_braces", "plan_job", "run", "summary_line"]
