"""Batch embedding of images and texts into clip-retrieval's layout.

``fastclip.embed.embed(output, images=[...], texts=[...], model=...)`` is the Python API of
``fastclip embed``; ``fastclip.embed.ray.ClipEmbedder`` is a callable class for Ray Data's
``map_batches``.
"""

from .pipeline import embed, summary_line
from .sources import expand_braces, plan_job

__all__ = ["embed", "expand_braces", "plan_job", "summary_line"]
