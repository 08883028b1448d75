"""Batch embedding of images and texts into clip-retrieval's layout.

``fastclip.embed.embed(output, images=[...], texts=[...], model=...)`` is the Python API of
``fastclip embed`` (its settings are :class:`EmbedJob`'s fields, and ``run(EmbedJob(...))``
does the same); ``fastclip.embed.ray.ClipEmbedder`` is a callable class for Ray Data's
``map_batches``.

One module per role: ``sources`` (what a source names), ``segments`` (its inputs, read again
from any place), ``tables`` (table inputs), ``storage`` (local paths and fsspec URLs),
``plan`` (the inputs, cut into chunks), ``shards`` (WebDataset tars), ``reader`` (decoding
workers), ``device_decode`` (``--gpu-decode``), ``ranks`` (the job's processes), ``output``
(the output folder and resume), ``writer`` (the background writer), ``runner`` (the job),
``job`` (its settings), ``ray`` (Ray Data and Ray tasks).
"""

from .job import EmbedJob
from .plan import expand_braces, plan_job
from .runner import embed, run, summary_line

__all__ = ["EmbedJob", "embed", "expand_braces", "plan_job", "run", "summary_line"]
